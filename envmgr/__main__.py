"""``python -m envmgr``: the same as the ``envmgr`` command."""

from envmgr.cli.app import main

main()
