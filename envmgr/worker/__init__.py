"""The worker side: hydrate an env from the store into this host's *env cache* and run in it.

In: a store URL and an env id, a name or a lock. Out: ``<env cache>/envs/<env_id>`` published
atomically, once per host. This folder, :mod:`envmgr.archive`, :mod:`envmgr.cache` and the low
modules they import are what ships to a worker (:func:`envmgr.worker.shipped.worker_sources`);
nothing here imports the builder, a resolver, the specs or the CLI (a test checks it).

Modules: :mod:`.hydrate`, :mod:`.env_cache` (which envs are here, use locks, removal),
:mod:`.bootstrap` (``python -m envmgr.bootstrap``), :mod:`.shipped` (the shipped file list).
"""
