"""Locks: exact packages (URL + hashes) per target platform, in every format envmgr reads.

In: a solve's records, or a lock file someone hands in (conda-lock v1, pylock.toml, uv.lock,
pixi.lock, ``@EXPLICIT``). Out: :class:`~envmgr.locks.lock.PlatformLock` values, whose
``env_id`` names the env, and lock files in other tools' formats.

Modules: :mod:`.lock` (the model and conda-lock v1), :mod:`.formats` (which format a file
is), :mod:`.pixi` and :mod:`.pylock` (other tools' locks), :mod:`.export` (to other formats,
and ``@EXPLICIT`` files), :mod:`.graph` (``tree``/``why``), :mod:`.python_target` (wheel tags
and markers of a target, which selecting from a universal lock needs too).
"""
