"""Exceptions with messages that say what to fix: every bad input names its source."""
from __future__ import annotations


class PIPOError(ValueError):
    """Base class for every user-facing PIPO error."""


class PadTokenError(PIPOError):
    """The pad token is missing, outside the vocabulary, or sits where the layout forbids it."""


class ShapeError(PIPOError):
    """A tensor has a shape the PIPO layout cannot use."""


class UnsupportedArchitectureError(PIPOError):
    """The backbone's architecture has no PIPO adapter."""


class NotAPIPOCheckpointError(PIPOError):
    """A regular checkpoint was loaded where a PIPO one is required."""


class InputError(PIPOError):
    """Bad input at a known place; the message reads `file:row: field: problem` (absent parts left out)."""

    def __init__(self, problem: str, *, file: object = None, row: int | None = None, field: str | None = None) -> None:
        self.file, self.row, self.field, self.problem = file, row, field, problem
        where = ":".join(str(part) for part in (file, row) if part is not None)
        super().__init__(": ".join(part for part in (where, field, problem) if part))


class RecordError(InputError):
    """A malformed row of a JSONL file; the message reads `file:line: problem`."""

    def __init__(self, path: object, line: int, problem: str) -> None:
        super().__init__(problem, file=path, row=line)
        self.path, self.line = str(path), line
