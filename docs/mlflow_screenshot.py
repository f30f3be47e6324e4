"""Screenshot of the MLflow UI comparing a workflow's evaluation runs, taken in headless Chromium.

Starts `mlflow ui` on the store (loopback, a free port), finds the experiment's evaluation
runs (rule `score`, one per model, method and benchmark), opens MLflow's compare view of them
in Debian's `chromium` driven by Playwright (`apt-get install chromium`, `pip install -e .[docs]`),
waits until the runs are on the page (the UI keeps polling, so "page loaded" never comes) and
saves a PNG.

    python docs/mlflow_screenshot.py --store results/mlflow.db --experiment pipo-demo --out docs/mlflow_compare.png
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def eval_runs(uri: str, experiment: str) -> tuple[str, dict[str, str]]:
    """The experiment id and its evaluation runs, name -> id (the newest per name, so reruns do not repeat)."""
    import mlflow

    from pipo.tracking import EVAL_RULE

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"{uri} has no experiment {experiment!r}: run the workflow first")
    where = f"tags.`pipo.stage` = 'eval' and tags.`snakemake.rule` = '{EVAL_RULE}'"
    runs = client.search_runs([found.experiment_id], where, order_by=["start_time DESC"])
    newest: dict[str, str] = {}
    for run in runs:
        newest.setdefault(run.info.run_name, run.info.run_id)
    if not newest:
        raise SystemExit(f"{uri}: experiment {experiment!r} holds no evaluation runs")
    return found.experiment_id, newest


# The compare view shows its metrics in a virtualized grid a few rows high: give each grid (and the two boxes
# around it) the height of all its rows, so the shot holds accuracy, tokens per forward and the speed-ups, not
# only the first metrics alphabetically. Returns the height of the scrolling main pane's content.
UNCLIP_JS = """() => {
  for (const grid of document.querySelectorAll('.ReactVirtualized__Grid')) {
    grid.style.height = grid.scrollHeight + 'px';
    grid.style.overflow = 'visible';
    for (let box = grid.parentElement, i = 0; box && i < 2; box = box.parentElement, i++) box.style.height = 'auto';
  }
  const main = document.querySelector('main');
  return main ? main.scrollHeight : document.body.scrollHeight;
}"""


def screenshot(browser: str, url: str, wait_for_text: str, out: Path, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = chromium.new_page(viewport={"width": width, "height": height})
        page.goto(url, timeout=180_000, wait_until="domcontentloaded")
        page.get_by_text(wait_for_text).first.wait_for(timeout=180_000)
        close = page.get_by_label("Close")  # MLflow's assistant side panel hides half of the comparison
        if close.count():
            close.first.click()
        page.wait_for_timeout(6000)  # the plots lay out again once the panel closes
        artifacts = page.get_by_text("Artifacts", exact=True)  # empty previews, one per run: not worth the height
        if artifacts.count():
            artifacts.first.click()
        page.wait_for_timeout(1000)
        page.set_viewport_size({"width": width, "height": max(height, page.evaluate(UNCLIP_JS) + 32)})
        page.wait_for_timeout(2000)
        page.screenshot(path=str(out), full_page=True)
        chromium.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("results/mlflow.db"))
    parser.add_argument("--experiment", default="pipo")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    parser.add_argument("--size", default="3000,1200", help="window width,height in pixels (taller pages grow to fit)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    if not args.store.is_file():
        raise SystemExit(f"{args.store}: no such MLflow store")
    uri = f"sqlite:///{args.store.resolve()}"
    experiment_id, runs = eval_runs(uri, args.experiment)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(base + "/health", 120)
        query = urllib.parse.urlencode({"runs": json.dumps(list(runs.values())),
                                        "experiments": json.dumps([experiment_id])})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        width, height = (int(v) for v in args.size.split(","))
        screenshot(browser, f"{base}/#/compare-runs?{query}", next(iter(runs)), args.out, width, height)
    finally:  # the UI runs worker processes of its own: stop its whole session
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(f"{len(runs)} evaluation runs compared: {args.out}")


if __name__ == "__main__":
    main()
