"""The error a command reports to its user: one sentence and an exit code."""

from __future__ import annotations


class CommandError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
