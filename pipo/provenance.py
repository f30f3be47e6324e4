"""The settings that made an output file, kept next to it, so a resumed run can refuse other settings.

Every resumable or rebuilt output (`pipo generate`, `pipo score`, `pipo build-data`)
gets a sidecar `<output>.meta.json` (a header row would break every reader of the JSONL)::

    {"settings": {...compared on resume...}, "info": {...recorded only...}}

`settings` holds what changes the rows (model fingerprint, method, sampling, seed, input
sha256, format version); `info` what does not (paths, package version, time). A rerun
into an existing output continues only when `settings` match; otherwise one error names
the first setting that differs, old and new, and `--overwrite` starts over.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipo.errors import InputError
from pipo.jsonl import atomic_write_text

META_SUFFIX = ".meta.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
EXIT_AFTER_ROWS_ENV = "PIPO_TEST_EXIT_AFTER_ROWS"  # tests: exit abruptly after N rows, as a kill would
EXIT_AFTER_STEPS_ENV = "PIPO_TEST_EXIT_AFTER_STEPS"  # tests: exit abruptly after N optimizer steps of training


class SettingsMismatchError(InputError):
    """An existing output was made with other settings than this run's."""


def meta_path(output: str | Path) -> Path:
    """The sidecar of `output`: `<output>.meta.json`."""
    output = Path(output)
    return output.with_name(output.name + META_SUFFIX)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of a JSON value in canonical form (sorted keys): the per-row completions hash."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def add_file_stats(digest: Any, root: Path, files: Iterable[Path]) -> None:
    """Feed each file's name (relative to `root`), size and mtime to `digest` (a hashlib object).

    The cheap identity of large inputs: hashing tens of GB of weights would cost minutes,
    while any rewrite of a file changes its mtime, and another file its name or size.
    """
    for path in files:
        stat = path.stat()
        name = path.relative_to(root) if path != root else ""
        digest.update(f"{name}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\n".encode())


def model_fingerprint(folder: str | Path) -> str:
    """A cheap identity of a checkpoint folder: config.json's bytes plus the stats of each weight file."""
    folder = Path(folder)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    add_file_stats(digest, folder, sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()))
    return digest.hexdigest()[:16]


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first difference between two settings trees."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _has_rows(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def start_or_resume(output: str | Path, settings: Mapping[str, Any], info: Mapping[str, Any], *,
                    overwrite: bool = False) -> bool:
    """Prepare `output` for this run; True when it holds rows of a run with the same settings (resume).

    A fresh or empty output starts over: it is removed and the sidecar written before the
    first row. An output with rows made with other settings (or without a sidecar) raises
    `SettingsMismatchError` and is left untouched, unless `overwrite`: then it starts over.
    Same settings always resume: a resumed run writes what a fresh one would.
    """
    output, meta = Path(output), meta_path(output)
    settings = json.loads(json.dumps(settings))  # the form it will have when read back (tuples -> lists)
    if _has_rows(output):
        try:
            _mismatch(output, meta, settings)
        except SettingsMismatchError:
            if not overwrite:
                raise
        else:
            return True
    output.unlink(missing_ok=True)
    write_meta(output, settings, info)
    return False


def _mismatch(output: Path, meta: Path, settings: Mapping[str, Any]) -> None:
    """Raise `SettingsMismatchError` naming the first setting where `meta` differs from `settings`."""
    if not meta.is_file():
        raise SettingsMismatchError(
            f"holds rows but no settings record {meta.name} (made by an older pipo?); "
            "pass --overwrite to start over", file=output)
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))["settings"]
    except (ValueError, KeyError, TypeError) as err:
        raise SettingsMismatchError(f"unreadable settings record ({err}); pass --overwrite to start over",
                                    file=meta) from err
    found = _first_difference(old, settings)
    if found is not None:
        key, before, after = found
        raise SettingsMismatchError(
            f"differs from the run that wrote {output.name} (old {before!r}, new {after!r}); "
            "pass --overwrite to start over", file=output, field=key)


def move_with_meta(source: str | Path, target: str | Path) -> Path:
    """Rename an output and its sidecar together (the workflow's `<output>.partial` -> `<output>`)."""
    source, target = Path(source), Path(target)
    if meta_path(source).is_file():
        os.replace(meta_path(source), meta_path(target))
    os.replace(source, target)
    return target


def write_meta(output: str | Path, settings: Mapping[str, Any], info: Mapping[str, Any]) -> Path:
    """Write the sidecar of an output made in one go (no resume)."""
    record = {"settings": settings, "info": {**info, "pipo_version": _version(), "started": time.time()}}
    return atomic_write_text(meta_path(output), json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def exit_after_rows_for_test(rows_written: int) -> None:
    """With `PIPO_TEST_EXIT_AFTER_ROWS=N`, end the process abruptly (no cleanup, like a kill) after row N.

    The deterministic stand-in for `kill -9` in the reproducible-resume tests.
    """
    _exit_at(EXIT_AFTER_ROWS_ENV, rows_written)


def exit_after_steps_for_test(global_step: int) -> None:
    """With `PIPO_TEST_EXIT_AFTER_STEPS=N`, end a training process abruptly right after optimizer step N,
    before that step's logging and checkpoint: the deterministic stand-in for a kill mid-run."""
    _exit_at(EXIT_AFTER_STEPS_ENV, global_step)


def _exit_at(variable: str, count: int) -> None:
    limit = os.environ.get(variable)
    if limit is not None and count >= int(limit):
        os._exit(75)


def _version() -> str:
    from pipo import __version__

    return __version__

