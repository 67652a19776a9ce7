"""Specs: what a step asks for, as one frozen value.

In: ``@conda``/``@pypi``/``@conda_base``/``@pypi_base`` arguments, ``environment.yml``,
``requirements.txt``, ``pyproject.toml``, CLI flags, and flow files read without running them.
Out: an :class:`~envmgr.specs.model.EnvSpec` per step (:mod:`.flows` merges a step's spec over
its flow's, the one rule the CLI and the Metaflow extension share).

Modules: :mod:`.model` (``EnvSpec``), :mod:`.decorators`, :mod:`.files` (spec files),
:mod:`.requirements` (pip requirement lines), :mod:`.discovery` (flow files), :mod:`.flows`.
"""
