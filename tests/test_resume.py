"""Resume refuses outputs made with other settings, and a killed run resumes to the uninterrupted run's rows.

`pipo generate`, `pipo score` and `pipo build-data` keep a sidecar `<output>.meta.json`;
a rerun continues only when its settings match (else one line naming the setting, exit 2,
the output untouched; `--overwrite` starts over). The kills are deterministic: the
`PIPO_TEST_EXIT_AFTER_ROWS` hook ends the process without cleanup after N rows.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipo.cli import main
from pipo.provenance import EXIT_AFTER_ROWS_ENV, meta_path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [{"id": f"p{i}", "prompt": f"{i} + {i + 1} ="} for i in range(5)]
SAMPLED = ("--temperature", "1.0", "--top-p", "0.9", "--n", "2", "--max-new-tokens", "5", "--batch-size", "2",
           "--max-seq-len", "128", "--seed", "7")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generate_argv(model: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--method", "regular", "--input", str(inp), "--output", str(out),
            *SAMPLED, *extra]


def killed_after(rows: int, argv: list[str]) -> None:
    """Run `pipo <argv>` in a child process that exits abruptly after `rows` rows."""
    env = {**os.environ, EXIT_AFTER_ROWS_ENV: str(rows), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-m", "pipo.cli", *argv], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 75, result.stderr


def decoded(path: Path) -> list[tuple]:
    """What must repeat exactly: each row's key, texts, token ids and finish reasons (not the timings)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["id"], r["row"], r["completions"], r["token_ids"], r["finish_reasons"]) for r in rows]


def one_error_line(capsys, command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pipo {command}: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def model(backbone_dir) -> Path:
    return Path(backbone_dir("llama"))


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory) -> tuple[Path, Path]:
    """(input, output) of one uninterrupted sampled run."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    inp = write_rows(tmp / "in.jsonl", PROMPTS)
    assert main(generate_argv(model, inp, tmp / "out.jsonl")) == 0
    return inp, tmp / "out.jsonl"


@pytest.mark.slow  # one child process loads torch and the model
def test_generate_killed_then_resumed_equals_uninterrupted(model, uninterrupted, tmp_path):
    inp, reference = uninterrupted
    out = tmp_path / "out.jsonl"
    killed_after(2, generate_argv(model, inp, out))
    assert len(out.read_text().splitlines()) == 2 and meta_path(out).is_file()
    assert main(generate_argv(model, inp, out)) == 0
    assert decoded(out) == decoded(reference)


def test_generate_refuses_other_settings_model_and_input(model, uninterrupted, tmp_path, capsys):
    inp, reference = uninterrupted
    out = tmp_path / "out.jsonl"
    shutil.copy(reference, out)
    shutil.copy(meta_path(reference), meta_path(out))
    before = out.read_bytes()

    assert main(generate_argv(model, inp, out, "--seed", "8")) == 2  # the later --seed wins
    assert "seed: differs from the run that wrote out.jsonl (old 7, new 8); pass --overwrite" in one_error_line(
        capsys, "generate")
    assert main(generate_argv(model, inp, out, "--temperature", "0.5")) == 2
    assert "sampling.temperature: differs" in one_error_line(capsys, "generate")

    copy = tmp_path / "model"
    shutil.copytree(model, copy)  # same weights (copy2 keeps mtimes): same fingerprint, resumes
    assert main(generate_argv(copy, inp, out)) == 0 and out.read_bytes() == before
    os.utime(next(copy.glob("*.safetensors")), ns=(1, 1))  # "retrained" in place
    assert main(generate_argv(copy, inp, out)) == 2
    assert ": model: differs" in one_error_line(capsys, "generate")

    other_input = write_rows(tmp_path / "in.jsonl", PROMPTS[:4])
    assert main(generate_argv(model, other_input, out)) == 2
    assert "input_sha256: differs" in one_error_line(capsys, "generate")
    assert out.read_bytes() == before

    assert main(generate_argv(model, other_input, out, "--overwrite")) == 0
    assert [r[0] for r in decoded(out)] == ["p0", "p1", "p2", "p3"]
    assert json.loads(meta_path(out).read_text())["settings"]["input_sha256"] != json.loads(
        meta_path(reference).read_text())["settings"]["input_sha256"]


def test_generate_refuses_an_output_without_settings_record(model, uninterrupted, tmp_path, capsys):
    inp, reference = uninterrupted
    out = tmp_path / "out.jsonl"
    shutil.copy(reference, out)
    assert main(generate_argv(model, inp, out)) == 2
    assert "no settings record out.jsonl.meta.json" in one_error_line(capsys, "generate")
    assert out.read_bytes() == reference.read_bytes()


# ---------------------------------------------------------------------------------------------- score


def math_row(i: int) -> dict:
    return {"id": f"m{i}", "benchmark": "synthetic_math", "prompt": "?", "answer": str(i), "metadata": {},
            "completions": [rf"\boxed{{{i}}}", r"\boxed{-1}"]}


def score_argv(gens: Path, scores: Path, *extra: str) -> list[str]:
    return ["score", "--generations", str(gens), "--scores", str(scores), "--metrics",
            str(scores.with_suffix(".metrics.json")), "--k", "2", "--no-progress", *extra]


@pytest.mark.slow  # one child process imports the graders
def test_score_killed_then_resumed_equals_uninterrupted(tmp_path):
    gens = write_rows(tmp_path / "gens.jsonl", [math_row(i) for i in range(5)])
    reference, resumed = tmp_path / "ref.jsonl", tmp_path / "scores.jsonl"
    assert main(score_argv(gens, reference)) == 0
    killed_after(2, score_argv(gens, resumed))
    assert len(resumed.read_text().splitlines()) == 2
    assert main(score_argv(gens, resumed)) == 0
    assert resumed.read_text() == reference.read_text()


def test_score_keeps_verdicts_only_for_the_same_completions(tmp_path, capsys):
    rows = [math_row(i) for i in range(3)]
    gens = write_rows(tmp_path / "gens.jsonl", rows)
    scores = tmp_path / "scores.jsonl"
    assert main(score_argv(gens, scores)) == 0
    before = scores.read_bytes()
    rows[1]["completions"] = [r"\boxed{-1}", r"\boxed{1}"]  # regenerated: the verdicts no longer apply
    write_rows(gens, rows)
    assert main(score_argv(gens, scores)) == 2
    line = one_error_line(capsys, "score")
    assert f"{scores}:2: completions_sha256: the verdicts of 'm1' were made for other completions" in line
    assert "--overwrite" in line and scores.read_bytes() == before
    assert main(score_argv(gens, scores, "--overwrite")) == 0
    assert [json.loads(x)["correct"] for x in scores.read_text().splitlines()][1] == [False, True]


def test_score_refuses_other_grading_settings(tmp_path):
    from pipo.eval.scoring import score_generations
    from pipo.provenance import SettingsMismatchError

    gens = write_rows(tmp_path / "gens.jsonl", [math_row(1)])
    scores = tmp_path / "scores.jsonl"
    score_generations(gens, scores, tmp_path / "m.json", progress=False)
    with pytest.raises(SettingsMismatchError, match=r"math_timeout_s: differs .*new 3.0"):
        score_generations(gens, scores, tmp_path / "m.json", progress=False, math_timeout_s=3.0)


# ------------------------------------------------------------------------------------------ build-data


def test_build_data_refuses_other_inputs_and_settings(tmp_path, capsys):
    rollouts = write_rows(tmp_path / "roll.jsonl", [
        {"id": "a", "prompt": "1+1", "metadata": {"split": "sft"}, "completions": ["2", "3"],
         "finish_reasons": ["eos", "eos"]},
        {"id": "b", "prompt": "2+2", "metadata": {"split": "rl"}, "completions": ["4", "4"],
         "finish_reasons": ["eos", "eos"]}])
    scores = write_rows(tmp_path / "scores.jsonl", [{"id": "a", "correct": [True, False]},
                                                   {"id": "b", "correct": [True, True]}])
    out = tmp_path / "sft.jsonl"
    argv = ["build-data", "--kind", "sft", "--rollouts", str(rollouts), "--scores", str(scores), "--output", str(out)]
    assert main(argv) == 0
    assert "(written)" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(argv) == 0
    assert "(up to date)" in capsys.readouterr().out
    assert main([*argv, "--sft-selection", "all"]) == 2
    assert "selection: differs" in one_error_line(capsys, "build-data")
    write_rows(scores, [{"id": "a", "correct": [False, True]}, {"id": "b", "correct": [True, True]}])
    assert main(argv) == 2
    assert "scores_sha256: differs" in one_error_line(capsys, "build-data")
    assert out.read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["messages"][1]["content"] == "3"
