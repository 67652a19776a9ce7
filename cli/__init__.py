"""The ``envmgr`` command line: thin typer commands over library functions.

This folder installs as ``envmgr.cli`` only. Importing it under its folder name (``import
cli`` from a checkout) is refused, so nothing ever depends on a generic top-level ``cli``.
"""

if __name__ != "envmgr.cli":
    raise ImportError(
        f"the package {__name__!r} is envmgr's CLI: import it as 'envmgr.cli'", name=__name__
    )


def main() -> None:
    """The ``envmgr`` command. ``envmgr --version`` answers before the CLI (typer and every
    command's modules) is imported; everything else runs :func:`envmgr.cli.app.main`."""
    import sys  # noqa: PLC0415 - nothing is imported with the package itself

    if sys.argv[1:] == ["--version"]:
        from envmgr import __version__  # noqa: PLC0415

        print(f"envmgr {__version__}")
        raise SystemExit(0)
    from envmgr.cli.app import main as run  # noqa: PLC0415

    run()
