"""pipo.tracking: one run per rule execution with the contract's name, tags and params; never fatal."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

mlflow = pytest.importorskip("mlflow")

from pipo import tracking  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store per module (creating its tables takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_uri_precedence(monkeypatch, tmp_path):
    assert tracking.tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.tracking_uri("http://server:5000", tmp_path) == "http://server:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking.tracking_uri("http://server:5000", tmp_path) == "sqlite:////elsewhere.db"


def test_flatten_and_run_name():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": None, "f": {}}) == {
        "a.b": "1", "a.c": "[1, 2]", "d": "x", "e": "null", "f": "{}"}
    assert tracking.run_name("generate", {"variant": "base", "method": "mtp"}) == "generate[variant=base,method=mtp]"
    assert tracking.run_name("report", {}) == "report[]"


def test_stage_run_records_the_contract(store, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    small = tmp_path / "metrics.json"
    small.write_text('{"overall": {"avg@4": 0.5}}')
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    wildcards = {"variant": "base", "method": "regular", "benchmark": "aime25", "shard": "0"}
    with tracking.stage_run("generate", wildcards, "eval", {"eval": {"n": 4, "sampling": {"top_k": 20}}},
                            uri=store, experiment="exp-a", model="qwen3.5-4b") as run:
        assert os.environ["MLFLOW_RUN_ID"] == run.run_id and os.environ["MLFLOW_TRACKING_URI"] == store
        assert mlflow.active_run().info.run_id == run.run_id  # the in-process training callback logs here
        run.log_metrics({"loss": 2.0}, step=1)
        run.log_metrics({"loss": 1.0, "overall": {"avg@4": 0.5}, "label": "x"}, step=2)
        run.log_output(small)
        run.log_output(checkpoint, "checkpoint")
    assert "MLFLOW_RUN_ID" not in os.environ
    client = mlflow.MlflowClient(store)
    got = client.get_run(run.run_id)
    assert got.info.run_name == "generate[variant=base,method=regular,benchmark=aime25,shard=0]"
    assert got.info.status == "FINISHED"
    assert client.get_experiment(got.info.experiment_id).name == "exp-a"
    tags = got.data.tags
    assert tags["pipo.stage"] == "eval" and tags["snakemake.rule"] == "generate"
    assert (tags["pipo.model"], tags["pipo.method"], tags["pipo.benchmark"]) == ("qwen3.5-4b", "regular", "aime25")
    assert tags["slurm.job_id"] == "4242" and len(tags["git.commit"]) == 40
    assert tags["output.checkpoint"] == str(checkpoint.resolve())
    assert got.data.params == {"eval.n": "4", "eval.sampling.top_k": "20"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
    assert got.data.metrics["overall.avg_at_4"] == 0.5
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["metrics.json"]


def test_failed_stage_marks_the_run_failed(store):
    with pytest.raises(RuntimeError), tracking.stage_run("sft", {"student": "s"}, "sft", {}, uri=store) as run:
        raise RuntimeError("boom")
    assert mlflow.MlflowClient(store).get_run(run.run_id).info.status == "FAILED"


def test_child_process_sees_the_run(store):
    """A training subprocess attaches through MLFLOW_RUN_ID / MLFLOW_TRACKING_URI."""
    code = ("import mlflow, os; c = mlflow.MlflowClient(os.environ['MLFLOW_TRACKING_URI']);"
            "c.log_metric(os.environ['MLFLOW_RUN_ID'], 'child_loss', 3.0, step=7)")
    with tracking.stage_run("opd", {}, "opd", {}, uri=store) as run:
        subprocess.run([sys.executable, "-c", code], check=True)
    history = mlflow.MlflowClient(store).get_metric_history(run.run_id, "child_loss")
    assert [(m.step, m.value) for m in history] == [(7, 3.0)]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "sqlite:////proc/no/such/dir/mlflow.db"])
def test_unreachable_store_warns_once_and_the_stage_completes(uri, tmp_path):
    out = tmp_path / "out.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracking.stage_run("score", {"benchmark": "b"}, "eval", {"k": 4}, uri=uri) as run:
            run.log_metrics({"acc": 1.0}, step=0)
            out.write_text("{}")
            run.log_output(out)
    assert not run.active and out.is_file()
    assert "MLFLOW_RUN_ID" not in os.environ
    assert len([w for w in caught if "MLflow tracking" in str(w.message)]) == 1


def test_eval_figures_flat_accuracy_and_tokens_per_forward():
    summary = {"k": 2, "overall": {"avg@2": 0.25, "pass@2": 0.5}, "speed": {"tokens_per_forward": 1.8, "device": "cpu"}}
    assert tracking.eval_figures(summary) == {"accuracy": 0.25, "tokens_per_forward": 1.8}
    assert tracking.eval_figures({"k": 2, "overall": {}, "speed": {"tokens_per_forward": None}}) == {}


def test_speedups_land_on_the_newest_score_run_of_their_model_method_benchmark(store):
    """The report writes speed-ups over regular onto the evaluation runs, wall-clock ones named by device."""
    from pipo.report import fill_speedups

    def score(method: str, benchmark: str, rule: str = "score") -> str:
        with tracking.stage_run(rule, {"method": method, "benchmark": benchmark}, "eval", {}, uri=store,
                                experiment="exp-speed", model="tiny") as run:
            pass
        return run.run_id

    stale, regular, pipo_math = score("pipo", "math"), score("regular", "math"), score("pipo", "math")
    generate, other_benchmark = score("pipo", "math", rule="generate"), score("pipo", "mcq")
    rows = fill_speedups([
        {"model": "tiny", "method": "regular", "benchmark": "math", "tokens_per_forward": 1.0, "tpot_s": 0.02,
         "ttft_s": 0.1, "device": "NVIDIA H200"},
        {"model": "tiny", "method": "pipo", "benchmark": "math", "tokens_per_forward": 2.5, "tpot_s": 0.01,
         "ttft_s": 0.1, "device": "NVIDIA H200"},
        {"model": "tiny", "method": "pipo", "benchmark": "unscored", "tokens_per_forward": 2.0},
    ])
    with tracking.stage_run("report", {}, "report", {}, uri=store, experiment="exp-speed") as report:
        assert tracking.log_speedups(report, rows) == 2
    client = mlflow.MlflowClient(store)
    assert client.get_run(pipo_math).data.metrics == {
        "speedup_forwards": 2.5, "speedup_tpot_on_NVIDIA_H200": 2.0, "speedup_ttft_on_NVIDIA_H200": 1.0}
    assert client.get_run(regular).data.metrics["speedup_forwards"] == 1.0
    for untouched in (stale, generate, other_benchmark):
        assert client.get_run(untouched).data.metrics == {}
    assert tracking.log_speedups(tracking.StageRun(store, None), rows) == 0  # tracking off: nothing, no error
