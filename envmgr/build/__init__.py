"""Build: a lock into a prefix for any target on any host, once, packed and stored.

In: a :class:`~envmgr.locks.lock.PlatformLock` and a store. Out: the env's archive, lock and
manifest in the store (manifest last), built by one builder while others wait on its lease.

Modules: :mod:`.once` (``build_and_store``: the lease, pack, upload), :mod:`.prefix`
(installing conda packages and wheels into a prefix, running nothing of the target),
:mod:`.wheels` (wheel installs in worker processes), :mod:`.bytecode` (``.pyc`` for the
target's Python), :mod:`.processes` (the build's worker processes).
"""
