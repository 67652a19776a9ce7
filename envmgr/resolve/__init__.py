"""Resolve: specs into locks, for any target platform on any host.

In: ``EnvSpec`` values and a target (platform, virtual packages). Out: a
:class:`~envmgr.locks.lock.PlatformLock` per target, kept in the store's *resolution cache*
(``locks/<spec_id>/<platform>.json``) so an unchanged spec is never solved twice.

Modules: :mod:`.resolution_cache` (the entry point, ``resolve_specs``), :mod:`.conda`
(py-rattler), :mod:`.pypi` (the index client with its *page cache*, the resolvelib provider,
sdist metadata). The folder is ``resolve`` rather than ``conda``/``pypi`` because those names
are the decorators (``from envmgr import conda``).
"""
