"""PyPI resolution: an index client (with its page cache), a resolvelib provider, sdists.

In: requirement strings and a :class:`~envmgr.locks.python_target.PythonTarget`. Out: locked
wheels and sdists (URL + sha256). :mod:`.sdist` also builds an sdist's wheel once for the
builder, which imports it from here.
"""
