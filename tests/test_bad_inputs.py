"""Bad input at the edge: one clear stderr line `pipo <cmd>: <file>:<row>: <field>: <problem>`, exit code 2,
and nothing already written changes. One table across `generate`, `score`, `report`, `sft`, `opd`, `merge`,
`build-data` and `snakemake -n`.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
import yaml

from pipo.cli import main
from pipo.provenance import meta_path
from tests.test_workflow_config import SNAKEMAKE, snakemake, workflow_copy

GOOD_PROMPTS = [{"id": "a", "prompt": "1 + 2 ="}, {"id": "b", "messages": [{"role": "user", "content": "3 * 4"}]}]
GEN_FLAGS = ("--max-new-tokens", "3", "--batch-size", "2", "--max-seq-len", "128", "--temperature", "0")


@dataclass(frozen=True)
class Case:
    """One bad input: how to break the prepared folder (may be None), the argv, the text the line must hold."""

    name: str
    argv: Callable[[Path, Path], list[str]]  # (work folder, model folder) -> argv after `pipo`
    expect: str
    setup: Callable[[Path, Path], None] | None = None


def lines(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def generate(*extra: str, model: str | None = None, inp: str = "in.jsonl") -> Callable[[Path, Path], list[str]]:
    return lambda w, m: ["generate", "--model", model or str(m), "--method", "regular", "--input", str(w / inp),
                         "--output", str(w / "out.jsonl"), *GEN_FLAGS, *extra]


def score(*extra: str, gens: str = "gens.jsonl") -> Callable[[Path, Path], list[str]]:
    return lambda w, m: ["score", "--generations", str(w / gens), "--scores", str(w / "scores.jsonl"),
                         "--metrics", str(w / "metrics.json"), "--no-progress", *extra]


def stage(command: str, *extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda w, m: [command, "--config", str(w / f"{command}.yaml"), *extra]


def with_input(rows: list) -> Callable[[Path, Path], None]:
    return lambda w, m: lines(w / "in.jsonl", rows)


def with_gens(rows: list) -> Callable[[Path, Path], None]:
    return lambda w, m: lines(w / "gens.jsonl", rows)


def with_stage(command: str, **changes) -> Callable[[Path, Path], None]:
    def setup(w: Path, m: Path) -> None:
        config = yaml.safe_load((w / f"{command}.yaml").read_text())
        for key, value in changes.items():
            *parents, leaf = key.split("__")
            section = config
            for name in parents:
                section = section.setdefault(name, {})
            if value is None:
                section.pop(leaf, None)
            else:
                section[leaf] = value
        (w / f"{command}.yaml").write_text(yaml.safe_dump(config))
    return setup


def model_without(*names: str) -> Callable[[Path, Path], None]:
    def setup(w: Path, m: Path) -> None:
        shutil.copytree(m, w / "broken_model")
        for pattern in names:
            for path in (w / "broken_model").glob(pattern):
                path.unlink()
    return setup


def code_row(inputs, outputs) -> dict:
    return {"id": "c1", "benchmark": "livecodebench", "answer": None, "metadata": {}, "completions": ["print(1)"],
            "tests": {"format": "stdin", "inputs": inputs, "outputs": outputs}}


MATH = {"id": "m1", "benchmark": "synthetic_math", "answer": "3", "metadata": {}, "completions": [r"\boxed{3}"]}

CASES = [
    # generate: sampling parameters finite and in range
    Case("temperature nan", generate("--temperature", "nan"), "temperature must be a finite number, got nan"),
    Case("temperature inf", generate("--temperature", "inf"), "temperature must be a finite number, got inf"),
    Case("presence penalty nan", generate("--presence-penalty", "nan"), "presence_penalty must be a finite number"),
    Case("threshold nan", generate("--conf-threshold", "nan"), "conf_threshold must be a finite number"),
    Case("threshold -inf", generate("--conf-threshold=-inf"), "conf_threshold must be a finite number"),
    Case("top-p 0", generate("--top-p", "0"), "top_p must be in (0, 1], got 0.0"),
    Case("top-p 1.5", generate("--top-p", "1.5"), "top_p must be in (0, 1], got 1.5"),
    Case("min-p 1", generate("--min-p", "1"), "min_p must be in [0, 1)"),
    Case("negative temperature", generate("--temperature", "-1"), "temperature must be >= 0"),
    Case("n 0", generate("--n", "0"), "n must be in [1, 1024], got 0"),
    Case("n not a number", generate("--n", "four"), "argument --n: invalid int value: 'four'"),
    Case("unknown method", generate("--method", "fast"), "argument --method: invalid choice: 'fast'"),
    # generate: sizes the model / machine cannot hold
    Case("max-seq-len beyond positions", generate("--max-seq-len", "100000"),
         "max_seq_len 100000 exceeds the model's max_position_embeddings 8192"),
    Case("batch-size beyond memory", generate("--batch-size", "1000000000", "--max-seq-len", "8192"),
         "batch_size 1000000000 x max_seq_len 8192 needs"),
    # generate: device and model folder
    Case("device cuda without CUDA", generate("--device", "cuda"), "CUDA is not available"),
    Case("device name", generate("--device", "gpu0"), "device 'gpu0' is not a device name"),
    Case("missing model folder", generate(model="no/such/model"), "no/such/model: no such model folder"),
    Case("folder without tokenizer", lambda w, m: generate(model=str(w / "broken_model"))(w, m),
         "broken_model: the folder has no tokenizer", model_without("tokenizer*", "vocab*", "merges*")),
    Case("folder without config", lambda w, m: generate(model=str(w / "broken_model"))(w, m),
         "broken_model: not a checkpoint folder (no config.json)", model_without("config.json")),
    # generate: input rows
    Case("missing input", generate(inp="nope.jsonl"), "nope.jsonl: no such file"),
    Case("non-UTF-8 input", generate(), "in.jsonl:2: not UTF-8 text (byte 0xff at column 13)",
         lambda w, m: (w / "in.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')),
    Case("invalid JSON", generate(), "in.jsonl:2: invalid JSON", with_input([{"prompt": "a"}, '{"prompt": '])),
    Case("message without role", generate(), "in.jsonl:1: messages[0].role: must be one of system, user",
         with_input([{"messages": [{"content": "hi"}]}])),
    Case("message content not text", generate(), "in.jsonl:1: messages[1].content: must be a string, got list",
         with_input([{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": ["hi"]}]}])),
    Case("messages not a list", generate(), "in.jsonl:1: messages: must be a non-empty list",
         with_input([{"messages": "hi"}])),
    Case("duplicate id", generate(), "in.jsonl:3: id: duplicate id 'a' (first on line 1)",
         with_input([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}])),
    Case("empty prompt", generate(), "in.jsonl:2: prompt: a row needs a non-empty 'prompt'",
         with_input([{"prompt": "x"}, {"prompt": " "}])),
    Case("prompt too long", generate(), "in.jsonl:1: prompt: ",
         with_input([{"prompt": "one two three " * 60}])),
    Case("other settings", generate("--seed", "3"), "out.jsonl: seed: differs from the run that wrote out.jsonl "
         "(old 0, new 3); pass --overwrite to start over"),
    # score
    Case("missing generations", score(gens="none.jsonl"), "none.jsonl: no such file"),
    Case("tests as a string", score(), "gens.jsonl:1: tests.inputs: must be a list of strings, got str",
         with_gens([code_row("12", "12")])),
    Case("tests lengths differ", score(), "gens.jsonl:1: tests: inputs and outputs differ in length (2 vs 1)",
         with_gens([code_row(["1", "2"], ["1"])])),
    Case("duplicate problem", score(), "gens.jsonl:2: id: duplicate problem 'm1'", with_gens([MATH, MATH])),
    Case("non-UTF-8 generations", score(), "gens.jsonl:1: not UTF-8 text",
         lambda w, m: (w / "gens.jsonl").write_bytes(b'{"id": "\xfe"}\n')),
    Case("k 0", score("--k", "0"), "k and workers must be >= 1"),
    Case("too many workers", score("--workers", "100000"), "workers 100000: this machine has"),
    Case("other completions", score(), "scores.jsonl:1: completions_sha256: the verdicts of 'm1' were made for "
         "other completions", with_gens([{**MATH, "completions": [r"\boxed{4}"]}])),
    # report
    Case("no metrics", lambda w, m: ["report", "--metrics", str(w / "none"), "--out-dir", str(w / "tables")],
         "no metrics files found"),
    Case("metrics not JSON", lambda w, m: ["report", "--metrics", str(w / "bad.json"), "--out-dir", str(w / "t")],
         "bad.json: invalid JSON", lambda w, m: (w / "bad.json").write_text("{")),
    Case("metrics field missing", lambda w, m: ["report", "--metrics", str(w / "bad.json"), "--out-dir", str(w)],
         "bad.json: row 0: missing field 'pass_at_k'", lambda w, m: (w / "bad.json").write_text(json.dumps(
             {"model": "m", "method": "regular", "benchmark": "b", "k": 4, "avg_at_k": 0.5}))),
    # sft / opd
    Case("missing config", lambda w, m: ["sft", "--config", str(w / "none.yaml")], "none.yaml: No such file"),
    Case("config not YAML", stage("sft"), "sft.yaml: not valid YAML",
         lambda w, m: (w / "sft.yaml").write_text("model: [")),
    Case("unknown key", stage("sft"), "unknown SFTStageConfig key(s) ['lerning_rate']",
         with_stage("sft", lerning_rate=1e-4)),
    Case("nested typo", stage("opd"), "unknown pipo training setting(s) ['conf_treshold']",
         with_stage("opd", pipo__conf_treshold=0.9)),
    Case("nested nan", stage("opd"), "pipo.conf_threshold: must be float, got nan",
         with_stage("opd", pipo__conf_threshold=math.nan)),
    Case("wrong type", stage("sft"), "lora_rank: must be int, got 'big'", with_stage("sft", lora_rank="big")),
    Case("missing key", stage("sft"), "missing SFTStageConfig key(s) ['model']", with_stage("sft", model=None)),
    Case("bad override", stage("sft", "--set", "lora_rank"), "--set 'lora_rank' must look like key=value"),
    Case("missing dataset", stage("sft"), "sft dataset", with_stage("sft", dataset="gone.jsonl")),
    Case("dataset row", stage("sft"), "sft.jsonl:1: messages: no assistant turn",
         lambda w, m: lines(w / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])),
    Case("missing model folder in a stage", stage("sft"), "./no/model: model: no such model folder",
         with_stage("sft", model="./no/model")),
    Case("cache of a missing model", lambda w, m: ["cache", "--model", "/no/model", "--dataset", str(w / "sft.jsonl"),
         "--output-dir", str(w / "cache")], "/no/model: --model: no such model folder"),
    Case("opd without teacher", stage("opd"), "the OPD stage needs a teacher", with_stage("opd", teacher=None)),
    # merge / build-data
    Case("merge no adapter", lambda w, m: ["merge", "--adapter", str(w / "none"), "--output-dir", str(w / "x")],
         "is not an ms-swift LoRA checkpoint"),
    Case("build-data nan accuracy", lambda w, m: ["build-data", "--kind", "rl", "--rollouts", str(w / "out.jsonl"),
         "--scores", str(w / "v.jsonl"), "--output", str(w / "rl.jsonl"), "--rl-min-accuracy", "nan"],
         "min_accuracy must be in [0, 1], got nan", lambda w, m: lines(w / "v.jsonl", [
             {"id": "a", "correct": [True]}, {"id": "b", "correct": [False]}])),
    Case("build-data missing verdicts", lambda w, m: ["build-data", "--kind", "sft", "--rollouts",
         str(w / "out.jsonl"), "--scores", str(w / "v.jsonl"), "--output", str(w / "sft_rows.jsonl")],
         "out.jsonl:2: no verdicts for id 'b'", lambda w, m: lines(w / "v.jsonl", [{"id": "a", "correct": [True]}])),
]


@pytest.fixture(scope="module")
def prepared(backbone_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(folder with good inputs and outputs already written, model): every case starts from a copy."""
    model = Path(backbone_dir("llama"))
    work = tmp_path_factory.mktemp("prepared")
    lines(work / "in.jsonl", GOOD_PROMPTS)
    assert main(generate(model=str(model))(work, model)) == 0
    lines(work / "gens.jsonl", [MATH])
    assert main(score()(work, model)) == 0
    lines(work / "sft.jsonl", [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}])
    base = {"model": str(model), "dataset": str(work / "sft.jsonl"), "output_dir": str(work / "train")}
    (work / "sft.yaml").write_text(yaml.safe_dump(base))
    (work / "opd.yaml").write_text(yaml.safe_dump({**base, "teacher": str(model)}))
    return work, model


def run_pipo(argv: list[str]) -> int:
    """`pipo <argv>`'s exit code, whether main returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return int(exit.code)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_keeps_outputs(case, prepared, tmp_path, capsys):
    if case.name == "device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    source, model = prepared
    work = tmp_path / "work"
    shutil.copytree(source, work)
    for config in ("sft.yaml", "opd.yaml"):  # point the stage configs at this copy
        (work / config).write_text((work / config).read_text().replace(str(source), str(work)))
    if case.setup is not None:
        case.setup(work, model)
    outputs = {name: (work / name).read_bytes() for name in ("out.jsonl", "scores.jsonl")}
    sidecars = {name: meta_path(work / name).read_bytes() for name in outputs}
    before = snapshot(work)
    code = run_pipo(case.argv(work, model))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # no bars
    command = case.argv(work, model)[0]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"pipo {command}: "), err
    assert case.expect in err[0], err[0]
    assert snapshot(work) == before
    assert all((work / name).read_bytes() == data for name, data in outputs.items())
    assert all(meta_path(work / name).read_bytes() == data for name, data in sidecars.items())


SNAKEMAKE_CASES = [
    ("nested typo", {"opd": {"pipo": {"conf_treshold": 0.9}}}, "unknown config key(s) ['opd.pipo.conf_treshold']"),
    ("nested type", {"sft": {"pipo": {"mtp_weight": "heavy"}}},
     "config key 'sft.pipo.mtp_weight': 'heavy' is not of type 'number'"),
    ("nan temperature", {"eval": {"temperature": math.nan}}, "config key 'eval.temperature': nan is not a finite"),
    ("section typo", {"eval": {"conf_treshold": 0.9}}, "unknown config key(s) ['eval.conf_treshold']"),
]


@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake not installed")
@pytest.mark.parametrize("name, change, expect", SNAKEMAKE_CASES, ids=[c[0] for c in SNAKEMAKE_CASES])
def test_snakemake_stops_at_start_with_one_line(tmp_path, name, change, expect):
    workdir = workflow_copy(tmp_path)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for section, values in change.items():
        for key, value in values.items():
            config[section][key] = {**config[section].get(key, {}), **value} if isinstance(value, dict) else value
    (workdir / "bad.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", "bad.yaml", "--", "all")
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(err) == 1 and err[0].startswith("snakemake: invalid config: ") and expect in err[0], err
    assert not (workdir / "results").exists()


def test_schema_of_nested_pipo_sections_follows_the_settings_dataclass():
    """`sft.pipo` / `opd.pipo` in the schema: exactly TrainSettings' fields, their JSON types, closed to
    other keys, and the dataclass defaults valid against it (so the two cannot drift)."""
    import jsonschema

    from pipo.model.config import COMPRESSOR_TYPES
    from pipo.train.settings import DIVERGENCES, TrainSettings
    from pipo.workflow import load_schema, merged_ref
    from tests.test_workflow_config import SCHEMA

    schema = load_schema(SCHEMA)
    nested = schema["$defs"]["train_pipo"]
    assert nested["additionalProperties"] is False
    for section in ("sft", "opd"):
        assert merged_ref(schema["properties"][section], schema)["properties"]["pipo"]["$ref"] == "#/$defs/train_pipo"
    json_type = {"float": "number", "int": "integer", "str": "string", "bool": "boolean"}
    expected = {f.name: json_type[type(f.default).__name__] for f in fields(TrainSettings)}
    enums = {"divergence": list(DIVERGENCES), "compressor_type": list(COMPRESSOR_TYPES)}
    assert set(nested["properties"]) == set(expected)
    for name, prop in nested["properties"].items():
        prop = merged_ref(prop, schema)
        if name in enums:
            assert prop["enum"] == enums[name], name
        else:
            assert prop["type"] == expected[name], name
    defaults = {f.name: f.default for f in fields(TrainSettings)}
    jsonschema.validate(defaults, {**nested, "$defs": schema["$defs"]})


def test_debug_shows_the_traceback(prepared, capsys):
    from pipo.errors import PIPOError

    work, model = prepared
    with pytest.raises(PIPOError, match="temperature must be a finite number"):
        main(["--debug", *generate("--temperature", "nan")(work, model)])
