"""The ground floor of file I/O: atomic writes and JSONL rows, read, appended and repaired.

Every layer (model, engine, data, train, eval, report, workflow) writes its outputs
through here, so a crash never leaves half a file, and reads JSONL through one row
parser, so every bad line is reported the same way: `file:line: problem`. This module
imports nothing from pipo but `pipo.errors`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from pipo.errors import PIPOError, RecordError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temp file in the same folder and os.replace, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make results unreadable to collaborators
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text flavour of atomic_write_bytes (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write one JSON document (sorted keys, indented): readers see the old or the new file."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Atomically write one JSON object per line."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def append_jsonl(handle: IO[str], row: Mapping[str, Any]) -> None:
    """Append one row, flushed and synced, so a crash loses at most the row in flight."""
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def drop_partial_last_line(path: str | Path) -> int:
    """Cut a last line left without its newline by a killed writer; returns the bytes dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return len(data) - keep


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield `(line number, text)` of a UTF-8 text file; bytes that are not UTF-8 raise naming the line."""
    path = Path(path)
    if not path.is_file():
        raise PIPOError(f"{path}: no such file")
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(path, lineno, f"not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                                f"{exc.start + 1})") from None


def parse_row(path: str | Path, lineno: int, line: str) -> dict[str, Any]:
    """One JSONL line as a JSON object; anything else raises RecordError naming file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(path, lineno, f"invalid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise RecordError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
    return row


def numbered_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line number, object)` of a JSONL file, blank lines skipped; a bad line raises naming file and line."""
    for lineno, line in numbered_lines(path):
        if line.strip():
            yield lineno, parse_row(path, lineno, line)


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file (see `numbered_jsonl` for errors)."""
    return (row for _, row in numbered_jsonl(path))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All objects of a JSONL file (see iter_jsonl for errors)."""
    return list(iter_jsonl(path))
