"""Resolvers: conda specs with py-rattler; PyPI specs with a resolvelib provider.

They live here rather than in ``envmgr.conda`` / ``envmgr.pypi`` because those names are the
decorators (``from envmgr import conda``).
"""
