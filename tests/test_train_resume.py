"""When a training stage resumes and when it starts over (`prepare_run`), on checkpoint folders made by hand."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipo.train.stages import DONE_FILE, RUN_FILE, STEP_LOGS, SFTStageConfig, _finish, prepare_run, stage_fingerprint


def _checkpoint(out: Path, step: int, max_steps: int = 8) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    return path


def _config(tmp_path: Path, **changes) -> SFTStageConfig:
    """A stage on a model folder and a `pipo cache` dataset folder (files made by hand)."""
    model, data = tmp_path / "model", tmp_path / "cache" / "train"
    if not model.exists():
        model.mkdir()
        (model / "config.json").write_text("{}")
        data.mkdir(parents=True)
        (data / "data-00000-of-00001.arrow").write_text("rows")
    values = {"model": str(model), "dataset": str(data.parent), "output_dir": str(tmp_path / "out"), **changes}
    return SFTStageConfig(**values)


def test_killed_run_resumes_from_its_newest_checkpoint(tmp_path):
    out = tmp_path / "out"
    assert prepare_run(out, "a") == (None, None)
    _checkpoint(out, 2), _checkpoint(out, 4)
    assert prepare_run(out, "a") == (None, out / "checkpoint-4")
    assert json.loads((out / RUN_FILE).read_text())["resumed_from"] == ["checkpoint-4"]


def test_resume_drops_the_log_rows_written_after_its_checkpoint(tmp_path):
    """Steps 3-4 were logged after checkpoint-2, then the kill cut a line: the resumed run logs 3-4 again."""
    out = tmp_path / "out"
    prepare_run(out, "a")
    _checkpoint(out, 2)
    steps = [{"global_step/max_steps": f"{step}/8", "loss": step} for step in range(1, 5)]
    (out / "logging.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [{"args": 1}, *steps]) + '{"los')
    # ms-swift writes ensure_ascii=False: line and paragraph separators stay raw inside the strings
    rollouts = [{"step": [str(step)] * 2, "completion": ["a\u2028b", "c\x85d"]} for step in range(1, 5)]
    (out / "completions.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rollouts), encoding="utf-8")
    assert prepare_run(out, "a") == (None, out / "checkpoint-2")
    logged = {name: [json.loads(line) for line in (out / name).read_text(encoding="utf-8").split("\n") if line]
              for name in STEP_LOGS}
    assert logged == {"logging.jsonl": [{"args": 1}, *steps[:2]], "completions.jsonl": rollouts[:2]}


def test_run_killed_before_its_first_checkpoint_starts_its_logs_over(tmp_path):
    out = tmp_path / "out"
    prepare_run(out, "a")
    (out / "logging.jsonl").write_text(json.dumps({"args": 1}) + "\n" + json.dumps({"global_step/max_steps": "1/8"}))
    assert prepare_run(out, "a") == (None, None)
    assert (out / "logging.jsonl").read_text() == json.dumps({"args": 1}) + "\n"


def test_finished_run_is_returned_then_started_over_when_its_record_is_deleted(tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path)
    prepare_run(out, "a")
    _checkpoint(out, 8)
    assert _finish(str(out), config, "a") == out / "checkpoint-8" and not (out / RUN_FILE).exists()
    assert prepare_run(out, "a") == (out / "checkpoint-8", None)
    (out / DONE_FILE).unlink()  # what `snakemake --forcerun` does before the job runs
    assert prepare_run(out, "a") == (None, None)
    assert not list(out.glob("checkpoint-*"))


def test_changed_fingerprint_starts_over(tmp_path):
    out = tmp_path / "out"
    prepare_run(out, "a")
    _checkpoint(out, 2)
    assert prepare_run(out, "b") == (None, None)
    assert not (out / "checkpoint-2").exists() and json.loads((out / RUN_FILE).read_text())["fingerprint"] == "b"


def test_fingerprint_follows_settings_and_input_files_not_the_output_dir(tmp_path):
    base = stage_fingerprint(_config(tmp_path))
    assert stage_fingerprint(_config(tmp_path, output_dir=str(tmp_path / "elsewhere"))) == base
    assert stage_fingerprint(_config(tmp_path, learning_rate=5e-5)) != base
    (tmp_path / "cache" / "train" / "cache-0123.arrow").write_text("written by `datasets` while training")
    assert stage_fingerprint(_config(tmp_path)) == base
    data = tmp_path / "cache" / "train" / "data-00000-of-00001.arrow"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1))
    assert stage_fingerprint(_config(tmp_path)) != base
