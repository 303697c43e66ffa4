"""Errors of the data import. They derive from `AirlockError` (message + hint).

Messages name the input by its relative path and line/row/record number and never quote
record contents: an operator's terminal may be filmed, and a catalog row may be exported.
"""

from __future__ import annotations

from appliance.errors import AirlockError


class DataError(AirlockError):
    """An import, dataset lookup or export cannot proceed as asked."""


class FileRejected(Exception):
    """One input file cannot be imported at all; `reason` is one line without record contents."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
