"""envmgr: locked, built-once, relocatable environments for workflow steps.

Importing this package has no side effects: it sits on every task's start path, so it neither
probes the host nor imports the resolvers.
"""

from envmgr.errors import EnvmgrError

__all__ = ["EnvmgrError", "__version__"]

__version__ = "0.1.0"
