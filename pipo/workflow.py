"""Helpers the Snakemake workflow calls (the library never imports the workflow).

- config: JSON-schema validation (rules/config.schema.yaml) whose errors name the offending key, and
  that fills in every default the schema declares (nested values are overridden with
  `--config 'section={key: value}'`, which Snakemake merges recursively);
- scripts: `rule_script(snakemake, stage, params)` sends a rule's output to its log file,
  sets the thread count, and opens the rule's MLflow run (`pipo.tracking.stage_run`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipo.engine.generate import generate_jsonl
from pipo.engine.options import GenerateOptions
from pipo.errors import PIPOError
from pipo.tracking import StageRun, stage_run, tracking_uri


class ConfigError(PIPOError):
    """The workflow config does not match its schema; the message names the key."""

    def __init__(self, schema_path: str | Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid config (schema {schema_path}):\n  " + "\n  ".join(problems))


def _key_path(path: Any) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: Any, root: Mapping[str, Any]) -> str:
    """One error as `config key 'a.b': what is wrong`, naming unknown keys themselves."""
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        known = sorted(merged_ref(error.schema, root).get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        where = [f"{_key_path(error.absolute_path)}.{k}".lstrip(".").replace("<top level>.", "") for k in extra]
        return f"unknown config key(s) {where}; known here: {known}"
    return f"config key '{_key_path(error.absolute_path)}': {error.message}"


def _wants_text(schema: Mapping[str, Any]) -> bool:
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    return "string" in kinds or not (kinds or "enum" in schema)


def merged_ref(schema: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """A sub-schema with its local `$ref` (`#/$defs/name`) merged in: its own keywords win, `properties` are joined."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return dict(schema)
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    base, own = merged_ref(target, root), {k: v for k, v in schema.items() if k != "$ref"}
    return {**base, **own, "properties": {**base.get("properties", {}), **own.get("properties", {})}}


def coerce_to_schema(config: dict[str, Any], schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> None:
    """Parse, in place, text values where the schema wants a number, boolean, list or null.

    Snakemake hands nested `--config 'eval={n: 8}'` values over as text ("8"); they are
    read as YAML here. Text that does not parse to the wanted type stays text, so the
    validation error names the key.
    """
    import yaml

    root = schema if root is None else root
    schema = merged_ref(schema, root)
    properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
    for key, value in config.items():
        sub = properties.get(key, extra if isinstance(extra, Mapping) else None)
        if sub is None:
            continue
        sub = merged_ref(sub, root)
        if isinstance(value, dict):
            coerce_to_schema(value, sub, root)
        elif isinstance(value, str) and not _wants_text(sub):
            try:
                config[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
            if isinstance(config[key], str):
                config[key] = value


def load_schema(schema_path: str | Path) -> dict[str, Any]:
    """The config schema (YAML), read with libyaml when PyYAML has it (start-up time)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(Path(schema_path).read_text(encoding="utf-8"), Loader=loader)


def _filling_validator(schema: Mapping[str, Any]) -> Any:
    """A draft 2020-12 validator that also fills in, in place, each absent property that has a `default`
    (a copy of it, at any depth, through `$ref`s and the entries of `additionalProperties` maps)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def properties(validator: Any, props: Mapping[str, Any], instance: Any, subschema: Any) -> Iterator[Any]:
        if isinstance(instance, dict):
            for key, sub in props.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, props, instance, subschema)

    return jsonschema.validators.extend(base, {"properties": properties})(schema)


def validate_config(config: dict[str, Any], schema_path: str | Path) -> None:
    """Fill the schema's defaults into `config` (after `coerce_to_schema`); raise ConfigError listing every
    schema violation, each naming its key."""
    schema = load_schema(schema_path)
    coerce_to_schema(config, schema)
    errors = sorted(_filling_validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [_describe(e, schema) for e in errors] + [
        f"config key '{key}': {value} is not a finite number" for key, value in _non_finite(config)]
    if problems:
        raise ConfigError(schema_path, problems)


def validate_config_or_exit(config: dict[str, Any], schema_path: str | Path) -> None:
    """`validate_config` for the Snakefile: a bad config stops Snakemake at start with one line on stderr
    naming the keys, exit code 2 (Snakemake would report the exception as a multi-line traceback)."""
    try:
        validate_config(config, schema_path)
    except ConfigError as err:
        print(f"snakemake: invalid config: {'; '.join(err.problems)}", file=sys.stderr)
        sys.exit(2)


def _non_finite(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every NaN or infinity in a config (YAML's `.nan` / `.inf`; JSON schema's
    number type and bounds let them through)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path or "<top level>", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _non_finite(item, f"{path}.{key}".lstrip("."))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _non_finite(item, f"{path}[{i}]")


@contextlib.contextmanager
def logged_to(path: str | os.PathLike | None) -> Iterator[None]:
    """Send this process's stdout/stderr (Python and file-descriptor level, so child processes
    and C extensions too) to the rule's log file for the block."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def rule_script(snakemake: Any, stage: str, params: Mapping[str, Any], **tags: Any) -> Iterator[StageRun]:
    """Everything a `script:` body shares: log file, threads, and one MLflow run for the rule execution."""
    import torch

    torch.set_num_threads(max(1, int(snakemake.threads)))
    mlflow_config = snakemake.config["mlflow"]
    uri = tracking_uri(mlflow_config["tracking_uri"])
    wildcards = {k: v for k, v in snakemake.wildcards.items()}
    log = snakemake.log[0] if len(snakemake.log) else None
    with logged_to(log), stage_run(snakemake.rule, wildcards, stage, params, uri=uri,
                                   experiment=mlflow_config["experiment"], **tags) as run:
        yield run


def generate_shard(
    records: str | Path, model: str | Path, method: str, output: str | Path, options: GenerateOptions,
    *, prompt_budget: int | None, shard: int, shards: int,
) -> Path:
    """Decode shard `shard` of `shards` of a records JSONL into `output` (`generate_jsonl`).

    Rows go to `<output>.partial` (resumed if a killed job reruns: Snakemake only deletes
    declared outputs; a partial made with other settings starts over); when complete, each
    completion's stats get the device it was decoded on (`device_label`: wall-clock speeds
    mean nothing without it) and the rows are renamed into place with their settings sidecar.
    Prompts marked for truncation (LongBench v2) are first fitted to the prompt budget
    (`prompt_budget`, else max_seq_len - max_new_tokens) with the model's tokenizer (`pipo.eval.truncation`).
    """
    from pipo.data.build import shard as take_shard
    from pipo.eval.truncation import fit_to_model
    from pipo.jsonl import read_jsonl, write_jsonl
    from pipo.provenance import move_with_meta

    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    shard_input = output.with_name(output.name + ".input.jsonl")
    limits = {"max_seq_len": options.max_seq_len, "max_new_tokens": options.max_new_tokens,
              "prompt_budget": prompt_budget}
    write_jsonl(shard_input, fit_to_model(take_shard(read_jsonl(records), shard, shards), model, limits, method))
    generate_jsonl(model, method, shard_input, partial, options, overwrite=True)
    device = device_label()
    rows = read_jsonl(partial)
    for row in rows:
        for stat in row.get("stats") or []:
            stat["device"] = device
    write_jsonl(partial, rows)
    move_with_meta(partial, output)
    shard_input.unlink()
    return output


def device_label() -> str:
    """The device `pipo generate` decodes on in this process (its default): the GPU's name, else the CPU's."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"CPU ({platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def concat_files(sources: list[str], target: str | Path) -> Path:
    """Concatenate text files (JSONL shards) into `target`, atomically."""
    from pipo.jsonl import atomic_write_text

    return atomic_write_text(target, "".join(Path(s).read_text(encoding="utf-8") for s in sources))
