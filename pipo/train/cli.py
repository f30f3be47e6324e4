"""`pipo cache | sft | merge | opd`: the training stages by hand (configs as JSON or YAML files)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from pipo.errors import InputError, PIPOError


def _load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """A stage config from a JSON/YAML file, with `key=value` overrides (values parsed as YAML; a dotted
    key such as `pipo.conf_threshold` reaches into a nested section)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        config = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise PIPOError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                        f"({str(err).splitlines()[0]})") from err
    if not isinstance(config, dict):
        raise PIPOError(f"{path}: a stage config must be a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PIPOError(f"--set {item!r} must look like key=value")
        *parents, leaf = key.split(".")
        section = config
        for name in parents:
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                raise PIPOError(f"--set {item!r}: {name!r} is not a section")
        section[leaf] = yaml.safe_load(value)
    return config


def check_model_source(model: object, key: str) -> None:
    """A model given as a local path must exist: a hub id has exactly one '/' and no leading '/' or '.';
    anything else would reach the hub and fail there with "Repo id must be in the form ..."."""
    if not isinstance(model, str) or Path(model).exists():
        return
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise InputError("no such model folder", file=model, field=key)


def _cache(args: argparse.Namespace) -> None:
    from pipo.train.stages import run_cache

    check_model_source(args.model, "--model")
    print(run_cache(args.model, args.dataset, args.output_dir, args.model_type, args.max_length))


def _stage_config(args: argparse.Namespace) -> dict[str, Any]:
    config = _load_config(args.config, args.set)
    for key in ("model", "teacher"):
        check_model_source(config.get(key), key)
    return config


def _sft(args: argparse.Namespace) -> None:
    from pipo.train.stages import run_sft

    print(run_sft(_stage_config(args)))


def _opd(args: argparse.Namespace) -> None:
    from pipo.train.stages import run_opd

    print(run_opd(_stage_config(args)))


def _merge(args: argparse.Namespace) -> None:
    from pipo.train.stages import run_merge

    print(run_merge(args.adapter, args.output_dir))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training sub-commands to the `pipo` parser."""
    cache = subparsers.add_parser("cache", help="tokenize an SFT jsonl once (ms-swift cached dataset, pair layout)")
    cache.add_argument("--model", required=True, help="backbone or PIPO checkpoint (for its tokenizer)")
    cache.add_argument("--dataset", required=True, help="SFT chat jsonl")
    cache.add_argument("--output-dir", required=True)
    cache.add_argument("--model-type", default="pipo_qwen3_5")
    cache.add_argument("--max-length", type=int, default=65535)
    cache.set_defaults(func=_cache)
    for name, func, what in (("sft", _sft, "PIPO SFT with LoRA"), ("opd", _opd, "on-policy distillation from a teacher")):
        stage = subparsers.add_parser(name, help=f"{what} (resumes after a kill)")
        stage.add_argument("--config", required=True, help="stage config (JSON or YAML)")
        stage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        stage.set_defaults(func=func)
    merge = subparsers.add_parser("merge", help="merge a LoRA checkpoint into a standalone PIPO checkpoint")
    merge.add_argument("--adapter", required=True, help="LoRA checkpoint folder (checkpoint-N)")
    merge.add_argument("--output-dir", required=True)
    merge.set_defaults(func=_merge)
