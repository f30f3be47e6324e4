"""The `pipo` command: every pipeline stage runnable by hand.

Each stage group owns its sub-commands in a module exposing `register(subparsers)`
(its `cli` module; `pipo.report` registers `pipo report` itself); this file only assembles
them. Expected errors (bad input, missing files, mismatched settings) end as one line on stderr,
`pipo <command>: <file>:<row>: <field>: <problem>`, with exit code 2; `--debug`
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import yaml

from pipo.errors import PIPOError

# Modules that contribute sub-commands, in help order.
_COMMAND_MODULES: tuple[str, ...] = ("pipo.eval.cli", "pipo.report", "pipo.engine.cli", "pipo.train.cli",
                                   "pipo.data.cli", "pipo.serve.cli")
# What a user can fix: our own errors, files that are missing or unreadable, malformed YAML/text.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (PIPOError, OSError, yaml.YAMLError, UnicodeError,
                                                   json.JSONDecodeError)
USAGE_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`pipo generate: argument --n: ...`), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pipo", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():  # `pipo generate --debug ...` works too
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def describe(err: BaseException) -> str:
    """One line for an expected error (OSError as `file: reason`, multi-line messages joined)."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as err:
        if args.debug:
            raise
        print(f"pipo {args.command}: {describe(err)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
