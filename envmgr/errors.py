"""The one error hierarchy of envmgr.

Library code raises these and never prints; the CLI turns them into one line and a non-zero
exit. Each error carries the data a person needs to act: which input, which package or step,
and what to do next.
"""

from __future__ import annotations

__all__ = ["EnvmgrError"]


class EnvmgrError(Exception):
    """Root of every error envmgr raises on purpose.

    ``message`` says what is wrong and names the input; ``hint`` (optional) says what to do.
    ``exit_code`` is what the CLI exits with (2 for bad input, 1 for everything else).
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message
