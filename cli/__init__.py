"""The ``envmgr`` command line: thin typer commands over library functions.

This folder installs as ``envmgr.cli`` only. Importing it under its folder name (``import
cli`` from a checkout) is refused, so nothing ever depends on a generic top-level ``cli``.
"""

if __name__ != "envmgr.cli":
    raise ImportError(
        f"the package {__name__!r} is envmgr's CLI: import it as 'envmgr.cli'", name=__name__
    )
