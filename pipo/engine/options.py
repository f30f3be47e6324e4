"""The options of a generation run, typed, with the only defaults they have.

`pipo generate` parses its flags into `GenerateOptions`; the workflow's rollout / generate
rules build the same object from their config section (`GenerateOptions.from_section`);
`pipo serve` and `Engine` take their engine defaults from `ENGINE_DEFAULTS`. The config
schema (rules/config.schema.yaml) repeats these defaults for the keys it has, and
tests/test_workflow_config.py holds the two equal. Torch-free: `pipo generate --help` stays instant.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

BACKENDS = ("native", "sglang")
DTYPES = ("auto", "bfloat16", "float16", "float32")  # a torch dtype name, or the checkpoint's own ("auto")


@dataclass(frozen=True)
class EngineOptions:
    """What an engine is opened with besides the model and the method."""

    conf_threshold: float = 0.5  # pipo: keep token2 when sigmoid(confidence) >= this
    eagle_k: int = 3  # eagle: tokens drafted per step
    batch_size: int = 8  # sequences in flight at most (decode slots)
    max_seq_len: int = 8192  # prompt + completion tokens per sequence (a limit: KV blocks are taken as sequences grow)
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights, states, workspace and the KV block pool
    num_blocks: int | None = None  # KV blocks in the pool (overrides the budget)
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str = "auto"
    backend: str = "native"


ENGINE_DEFAULTS = EngineOptions()


@dataclass(frozen=True)
class GenerateOptions(EngineOptions):
    """Engine options plus what each prompt is sampled with (row i with seed `derive_seed(seed, i)`)."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    max_new_tokens: int = 1024
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings
    stop_token_ids: tuple[int, ...] = ()  # extra stop token ids

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> GenerateOptions:
        """The options of a workflow config section (rollout / eval): its keys that name an option."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in section.items() if key in names})
