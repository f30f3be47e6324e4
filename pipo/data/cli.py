"""`pipo build-data`: SFT chat rows or RL prompt rows from graded teacher rollouts (see `pipo.data.build`)."""
from __future__ import annotations

import argparse

from pipo.data.build import KINDS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `build-data` to the `pipo` parser."""
    p = subparsers.add_parser("build-data", help="SFT / RL rows from graded teacher rollouts",
                              description="Join `pipo generate` rollouts with their `pipo score` verdicts by id "
                                          "and write SFT chat rows or RL prompt rows (with a settings sidecar).")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--rollouts", required=True, nargs="+", help="rollout JSONL files (from `pipo generate`)")
    p.add_argument("--scores", required=True, nargs="+", help="their scores JSONL files (from `pipo score`)")
    p.add_argument("--output", required=True)
    p.add_argument("--sft-selection", choices=("shortest", "all"), default="shortest",
                   help="sft: the shortest correct completion per prompt, or all of them")
    p.add_argument("--rl-min-accuracy", type=float, default=0.5, help="rl: keep prompts the teacher solves this often")
    p.add_argument("--overwrite", action="store_true", help="rebuild an output made from other inputs or settings")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pipo.data.build import build_data_file

    built = build_data_file(args.kind, args.rollouts, args.scores, args.output, sft_selection=args.sft_selection,
                            rl_min_accuracy=args.rl_min_accuracy, overwrite=args.overwrite)
    state = "written" if built.written else "up to date"
    print(f"{args.output}: {len(built.rows)} rows from {len(built.graded)} prompts ({state})")
    return 0
