"""Load test of `pipo serve` on loopback: requests/s, time to first token and tokens/s at 1, 8, 32 clients.

Starts `pipo serve` on a free loopback port for `--model` (or targets `--url`, which must be a
loopback address), then for each concurrency level runs `--requests` streamed chat requests
from that many client threads (official `openai` client) and prints one row per level. The
run is bounded: a fixed number of requests per level, each with a timeout.

    python benchmarks/serve_load.py --model CKPT --method pipo --max-tokens 128 --json out.json
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
from openai import OpenAI

PROMPTS = [f"Compute {a} + {b} and explain the steps." for a, b in zip(range(3, 40, 3), range(5, 70, 5))]


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"--url must point at a loopback address, got {host}")
    return url.rstrip("/")


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pipo.cli", "serve", "--model", args.model, "--method", args.method,
           "--port", str(port), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
           "--served-model-name", "bench"]
    if args.device:
        cmd += ["--device", args.device]
    if args.conf_threshold is not None:
        cmd += ["--conf-threshold", str(args.conf_threshold)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pipo serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("pipo serve did not start in time")


def one_request(client: OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed chat request."""
    start, first = time.perf_counter(), None
    tokens = 0
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=1.0,
        stream=True, stream_options={"include_usage": True},
    ):
        if first is None and chunk.choices and (chunk.choices[0].delta.content or "") != "":
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    with ThreadPoolExecutor(clients) as pool:  # warm-up: one round at this level's concurrency
        list(pool.map(lambda i: one_request(client, model, PROMPTS[i % len(PROMPTS)], 8), range(clients)))
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens),
                                range(requests)))
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"clients": clients, "requests": requests, "wall_s": round(wall, 3),
            "requests_per_s": round(requests / wall, 3),
            "ttft_median_s": round(statistics.median(ttfts), 4), "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 4),
            "output_tokens_per_s": round(sum(r[2] for r in results) / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to serve (starts `pipo serve`)")
    parser.add_argument("--method", default="pipo")
    parser.add_argument("--url", help="an already running loopback server instead of --model")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--device", default=None)
    parser.add_argument("--conf-threshold", type=float, default=None, help="pipo: passed to `pipo serve`")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    proc = None
    if args.url:
        url = loopback_only(args.url)
    elif args.model:
        proc, url = start_server(args)
    else:
        parser.error("give --model or --url")
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        rows = [run_level(url, model, int(c), max(args.requests, int(c)), args.max_tokens)
                for c in args.clients.split(",")]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    print("| clients | requests/s | TTFT median (s) | TTFT p90 (s) | output tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests_per_s']} | {r['ttft_median_s']} | {r['ttft_p90_s']} | "
              f"{r['output_tokens_per_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"method": args.method, "conf_threshold": args.conf_threshold, "max_tokens": args.max_tokens,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
