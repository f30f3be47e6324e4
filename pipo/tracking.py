"""MLflow helpers for the workflow (DESIGN "MLflow" contract): one run per rule execution.

`stage_run(rule, wildcards, stage, params, ...)` opens a run named `<rule>[<wildcards>]`
in the config's experiment, tags it (stage, model, method, benchmark, Snakemake rule and
wildcards, SLURM job id, git commit), logs the stage's config as flattened params, and
exports `MLFLOW_RUN_ID` / `MLFLOW_TRACKING_URI` so a training subprocess (ms-swift under
torchrun, see `pipo.train.tracking_callback`) logs its curves into the same run.

Tracking never decides whether a stage succeeds: if the store is unreachable or a call
fails, one warning is printed, the run object turns into a no-op, and the stage's files
on disk remain the source of truth.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

DEFAULT_STORE = "results/mlflow.db"
DEFAULT_EXPERIMENT = "pipo"
ARTIFACT_MAX_BYTES = 20 * 1024 * 1024  # bigger outputs (checkpoints, caches) are recorded by path
PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value
PROBE_TIMEOUT_S = 3.0
ENV_KEYS = ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")
EVAL_RULE = "score"  # its runs hold one (model, method, benchmark)'s evaluation, lined up in the compare view
# metrics-row field -> MLflow metric; wall-clock ones get `_on_<device>` appended (meaningless without it)
SPEEDUP_METRICS = {"forward_speedup": "speedup_forwards", "tpot_speedup": "speedup_tpot",
                   "ttft_speedup": "speedup_ttft"}
WALL_CLOCK_SPEEDUPS = ("tpot_speedup", "ttft_speedup")


def tracking_uri(configured: str | None = None, results_dir: str | Path = "results") -> str:
    """`MLFLOW_TRACKING_URI` if set, else the config's URI, else a SQLite file under `results_dir`.

    The default path is made absolute so every job of a run (local or on SLURM nodes
    sharing the file system) writes to the same store whatever its working directory.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{(Path(results_dir) / 'mlflow.db').resolve()}"


def run_name(rule: str, wildcards: Mapping[str, Any]) -> str:
    """`rule[key=value,...]`: the run name of one rule execution (contract)."""
    return f"{rule}[{','.join(f'{k}={v}' for k, v in wildcards.items())}]"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": value}; lists as JSON, values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:PARAM_MAX_CHARS]
    return out


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The checkout's HEAD commit (None outside a git checkout or without git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def run_tags(rule: str, wildcards: Mapping[str, Any], stage: str, extra: Mapping[str, Any]) -> dict[str, str]:
    """The contract's tags; model/method/benchmark come from `extra`, else from same-named wildcards."""
    tags = {
        "pipo.stage": stage,
        "snakemake.rule": rule,
        "snakemake.wildcards": json.dumps(dict(wildcards), sort_keys=True),
    }
    for key in ("model", "method", "benchmark"):
        value = extra.get(key, wildcards.get(key))
        if value is not None:
            tags[f"pipo.{key}"] = str(value)
    tags.update({k: str(v) for k, v in extra.items() if k not in ("model", "method", "benchmark") and v is not None})
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    commit = git_commit()
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def server_reachable(uri: str) -> bool:
    """A quick probe of an HTTP tracking server, so a dead server costs seconds, not MLflow's retries."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.error  # here, not at the top: http/ssl/email imports slow every Snakemake start
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _local_artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go next to the database file (else MLflow uses ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlflow-artifacts").resolve().as_uri()
    return None


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing (called once at workflow start, so jobs never race on it)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_local_artifact_root(uri))
    except Exception:  # created meanwhile by a concurrent job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class StageRun:
    """One rule execution's MLflow run; every method is a no-op once tracking has failed."""

    def __init__(self, uri: str, run_id: str | None) -> None:
        self.uri = uri
        self.run_id = run_id
        self._warned = False

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def disable(self, err: BaseException | str) -> None:
        """Warn once and stop tracking: the stage goes on, its files stay the source of truth."""
        if not self._warned:
            warnings.warn(f"MLflow tracking at {self.uri} unavailable, continuing without it: {err}", stacklevel=3)
            self._warned = True
        self.run_id = None

    def _call(self, action: Callable[[Any], None]) -> None:
        if self.run_id is None:
            return
        try:
            import mlflow

            action(mlflow.MlflowClient(self.uri))
        except Exception as err:  # tracking is optional: never fail a stage for it
            self.disable(err)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened params, in batches of MLflow's 100-entries limit."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for lo in range(0, len(items), 100):
            self._call(lambda c, batch=items[lo : lo + 100]: c.log_batch(self.run_id, params=batch, synchronous=True))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call(lambda c: c.log_batch(self.run_id, tags=batch, synchronous=True))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric entries of `metrics` (nested dicts flattened to `a.b`), at `step` (default 0)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in _numeric(metrics).items()]
        for lo in range(0, len(batch), 1000):
            self._call(lambda c, part=batch[lo : lo + 1000]: c.log_batch(self.run_id, metrics=part, synchronous=True))

    def log_output(self, path: str | Path, name: str | None = None) -> None:
        """A small file as an artifact; a folder or a large file (checkpoint, cache) by its path as a tag."""
        path = Path(path)
        key = f"output.{name or path.name}"
        if path.is_file() and path.stat().st_size <= ARTIFACT_MAX_BYTES:
            self._call(lambda c: c.log_artifact(self.run_id, str(path)))
        self.set_tags({key: str(path.resolve())})


def _numeric(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_numeric(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name.replace("@", "_at_")] = float(value)
    return out


def _start(uri: str, experiment: str, name: str, tags: Mapping[str, str]) -> tuple[StageRun, Any]:
    """Create the run and make it MLflow's active run (so the in-process training callback finds it)."""
    import mlflow

    run = StageRun(uri, None)
    if not server_reachable(uri):
        run.disable(f"no answer from {uri}/health within {PROBE_TIMEOUT_S:.0f}s")
        return run, None
    try:
        mlflow.set_tracking_uri(uri)
        experiment_id = ensure_experiment(uri, experiment)
        active = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=dict(tags))
    except Exception as err:
        run.disable(err)
        return run, None
    run.run_id = active.info.run_id
    return run, active


@contextmanager
def _exported(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (child processes inherit them), then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def stage_run(
    rule: str,
    wildcards: Mapping[str, Any],
    stage: str,
    params: Mapping[str, Any],
    *,
    uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    **tags: Any,
) -> Iterator[StageRun]:
    """Track one rule execution; the run ends FINISHED, or FAILED if the block raises.

    `tags` may name `model`, `method`, `benchmark` (defaults: same-named wildcards) and
    any extra tag. `uri` defaults to `tracking_uri()`.
    """
    import mlflow

    uri = uri or tracking_uri()
    run, active = _start(uri, experiment, run_name(rule, wildcards), run_tags(rule, wildcards, stage, tags))
    run.log_params(params)
    exported = {"MLFLOW_RUN_ID": run.run_id, "MLFLOW_TRACKING_URI": uri} if run.active else {}
    status = "FAILED"
    try:
        with _exported(exported):
            yield run
        status = "FINISHED"
    finally:
        if active is not None:
            try:
                mlflow.end_run(status)
            except Exception as err:
                run.disable(err)


def eval_figures(summary: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation run's headline metrics from its metrics.json: `accuracy` (avg@k) and `tokens_per_forward`.

    Flat names, so MLflow's compare view lines runs up on them without digging into `overall.avg_at_4`.
    """
    figures = {"accuracy": (summary.get("overall") or {}).get(f"avg@{summary.get('k')}"),
               "tokens_per_forward": (summary.get("speed") or {}).get("tokens_per_forward")}
    return {key: float(value) for key, value in figures.items() if isinstance(value, (int, float))}


def speedup_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A report metrics row's speed-ups over regular decoding as MLflow metrics, wall-clock ones named by device."""
    device = re.sub(r"[^A-Za-z0-9._-]+", "_", str(row.get("device") or "")).strip("_")
    out = {}
    for field, name in SPEEDUP_METRICS.items():
        value = row.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{name}_on_{device}" if device and field in WALL_CLOCK_SPEEDUPS else name] = float(value)
    return out


def log_speedups(run: StageRun, rows: Iterable[Mapping[str, Any]]) -> int:
    """Log each row's speed-ups onto its evaluation run; return how many runs got some.

    Speed-ups need the regular run's figures, so only the report (which sees every
    metrics.json) knows them; it writes them back onto the newest `score` run of the same
    experiment tagged with the row's model, method and benchmark, where the compare view
    shows them next to accuracy. Never fatal, like all tracking.
    """
    if not run.active:
        return 0
    import time

    import mlflow
    from mlflow.entities import Metric

    try:
        client = mlflow.MlflowClient(run.uri)
        experiment_id = client.get_run(run.run_id).info.experiment_id
        newest: dict[tuple[str, str, str], str] = {}
        for found in client.search_runs([experiment_id], f"tags.`snakemake.rule` = '{EVAL_RULE}'",
                                        order_by=["start_time DESC"], max_results=5000):
            key = tuple(found.data.tags.get(f"pipo.{t}", "") for t in ("model", "method", "benchmark"))
            newest.setdefault(key, found.info.run_id)
        now, logged = int(time.time() * 1000), 0
        for row in rows:
            target = newest.get((str(row.get("model")), str(row.get("method")), str(row.get("benchmark"))))
            metrics = [Metric(name, value, now, 0) for name, value in speedup_metrics(row).items()]
            if target and metrics:
                client.log_batch(target, metrics=metrics, synchronous=True)
                logged += 1
        return logged
    except Exception as err:  # tracking is optional: never fail the report for it
        warnings.warn(f"MLflow tracking at {run.uri}: speed-ups not logged onto the evaluation runs: {err}",
                      stacklevel=2)
        return 0
