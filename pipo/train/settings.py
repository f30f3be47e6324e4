"""PIPO training knobs that ms-swift has no argument for, carried through `--model_kwargs`.

ms-swift turns every `--model_kwargs` key into an upper-cased environment variable, also in
torchrun workers, so the stage writes them as `PIPO_*` keys and the trainers read them back
with `TrainSettings.from_env()`. ms-swift's own arguments stay authoritative for everything
they cover (learning rate, `--beta` for JSD, `--temperature`, `--max_completion_length`, ...).
"""
from __future__ import annotations

import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipo.errors import InputError, PIPOError

DIVERGENCES = ("sampled", "topk", "full")
ENV_PREFIX = "PIPO_"


def parse_bool(raw: str, name: str) -> bool:
    """`True`/`False` as `str(bool)` writes them (also 1/0, true/false); anything else is an error naming the setting."""
    value = raw.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise PIPOError(f"{ENV_PREFIX}{name.upper()} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class TrainSettings:
    """Loss weights, PAD augmentation, OPD divergence and PIPO rollout settings."""

    compressor_type: str = "mlp"  # used when a regular backbone is converted at the start of SFT
    mtp_weight: float = 1.0
    conf_weight: float = 1.0
    chunk_size: int = 2048  # LM-head rows per chunk (spec: 2048)
    max_pad_ratio: float = 0.25  # SFT PAD augmentation: r ~ U[0, max_pad_ratio] per step
    pad_seed: int = 0
    divergence: str = "topk"  # OPD: sampled | topk | full
    topk: int = 32
    conf_threshold: float = 0.95  # OPD rollouts: token2 kept when sigmoid(c) >= threshold
    fill_rejected_drafts: bool = True  # OPD: MTP target at a rejected draft = the student's top token (as the original)
    top_p: float = 0.95
    top_k: int = 20
    presence_penalty: float = 1.5

    def __post_init__(self) -> None:
        check_field_types(type(self), asdict(self), "pipo")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise PIPOError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")
        if self.mtp_weight < 0 or self.conf_weight < 0:
            raise PIPOError(f"mtp_weight and conf_weight must be >= 0, got {self.mtp_weight} and {self.conf_weight}")
        if self.divergence not in DIVERGENCES:
            raise PIPOError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not 0 <= self.max_pad_ratio <= 0.5:
            raise PIPOError(f"max_pad_ratio must be in [0, 0.5], got {self.max_pad_ratio}")
        if self.topk < 1 or self.chunk_size < 1:
            raise PIPOError(f"topk and chunk_size must be >= 1, got {self.topk} and {self.chunk_size}")

    def to_model_kwargs(self) -> dict[str, str]:
        """`--model_kwargs` entries that `from_env` reads back (in this or any worker process)."""
        return {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "TrainSettings":
        """Settings from `PIPO_*` environment variables; missing ones keep their defaults."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f"{ENV_PREFIX}{f.name.upper()}")
            if raw is not None:
                values[f.name] = parse_bool(raw, f.name) if isinstance(f.default, bool) else type(f.default)(raw)
        return cls(**values)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a field annotation (int for float is fine; bool is never a number)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_field_types(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Every known key of `values` fits the dataclass field's type (numbers finite); the error names the key."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _matches(value, hints[name]):
            raise InputError(f"must be {_type_name(hints[name])}, got {value!r}",
                             field=f"{where}.{name}" if where else name)
