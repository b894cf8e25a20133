"""The one exception type a user sees: a one-line message saying what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["OnnxoptError", "PassSkipped"]


class OnnxoptError(Exception):
    """A user-facing error: the CLI prints ``str(err)`` on one line and exits with code 2.

    ``hint`` says how to fix it; it is appended to the message after ``" -- "``.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} -- {hint}")


class PassSkipped(Exception):
    """Raised by a pass that has nothing to do on this model; the manager records the reason and goes on."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
