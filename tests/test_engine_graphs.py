"""The CUDA-graph decode path on CPU: the engine with graphs enabled, captured and replayed by a recording fake.

`torch.cuda.graph` is replaced by a recorder of every aten op run inside the capture block;
`replay()` re-runs those ops on the tensors they saw and writes results into the tensors
captured as outputs, as a real graph replays its kernels on fixed memory. So the graphs
path runs exactly as on a GPU: static `kv_len` over the whole table, one graph per batch
bucket with idle padding rows, inputs copied into static buffers, sampling graphs reading
the model graph's static outputs, values read one step late while the next step has
overwritten them. A host synchronisation inside a capture fails, as it does under CUDA.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipo.engine import Engine
from pipo.engine.engine import batch_buckets
from pipo.model.sampling import GREEDY, SamplingParams

EOS = [2]
# mixed lengths and budgets: rows finish at different steps, so later steps pad idle rows inside a bucket
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 52)), [100]]
BUDGETS = [14, 3, 6, 8]
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, min_p=0.01, presence_penalty=1.5)
# greedy with a presence penalty: the tiny models' plain argmax repeats one token, which would hide a running row's
# next input being overwritten by a sampling graph captured mid-run (it would write the same token again)
GREEDY_PENALIZED = SamplingParams(temperature=0.0, presence_penalty=1.5)
HOST_SYNC = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class _Recorder(TorchDispatchMode):
    """Runs and records every aten op (with the tensors it read and wrote) of a capture block."""

    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNC:
            raise RuntimeError(f"host synchronisation ({func}) inside a CUDA graph capture")
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out


class FakeGraph:
    """A captured op list; `replay` recomputes it and writes each op's result into the captured output tensor."""

    replays = 0

    def __init__(self) -> None:
        self.ops: list = []

    def replay(self) -> None:
        FakeGraph.replays += 1
        for func, args, kwargs, out in self.ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_leaves(out), tree_leaves(fresh)):
                if isinstance(old, torch.Tensor) and old.data_ptr() != new.data_ptr():
                    old.copy_(new)


class _Stream:
    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def _capture(graph: FakeGraph, pool=None):
    with _Recorder(graph.ops):
        yield


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """The torch.cuda calls of graph capture, on CPU tensors; returns the FakeGraph class (its replay count)."""
    for name, value in {
        "graph_pool_handle": lambda: None, "Stream": _Stream, "current_stream": _Stream,
        "stream": lambda stream: contextlib.nullcontext(), "CUDAGraph": FakeGraph, "graph": _capture,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    FakeGraph.replays = 0
    return FakeGraph


def run(engine: Engine) -> list[list[int]]:
    """Raw ids per prompt. Two greedy rows start (the long one penalised); when the short one ends, sampled rows
    come in while the long greedy one still runs (the new sampling mode is captured mid-run, its warm-ups writing
    the running row's next input) and rows go idle at different steps."""
    for i, (chunk, budget, params) in enumerate(zip(PROMPTS, BUDGETS, (GREEDY_PENALIZED, GREEDY, SAMPLED, SAMPLED))):
        engine.add_request(str(i), chunk, params, max_new_tokens=budget, seed=11 + i)
    done = {}
    while engine.has_unfinished():
        for update in engine.step():
            if update.finished:
                done[update.request_id] = update.completion.raw_ids
    return [done[str(i)] for i in range(len(PROMPTS))]


def test_batch_buckets_cover_every_batch_up_to_256():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_buckets(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    for top in (3, 64, 200, 256):
        buckets = batch_buckets(top)
        for rows in range(1, top + 1):  # the step's bucket: the smallest that holds slots [0, rows)
            batch = next(b for b in buckets if b >= rows)
            assert rows <= batch < 2 * rows or batch == top


@pytest.mark.parametrize("method", ["regular", "pipo"])
def test_graphed_decode_equals_eager(decode_target, fake_cuda_graphs, method):
    """Sampled and greedy rows (a mode switch captures new sampling graphs mid-run, with sequences running):
    the same raw ids as eager decoding, and every decode step replayed its graphs."""
    target = decode_target(method)
    kw = dict(max_batch_size=2, max_seq_len=40, block_size=4, eos_token_ids=EOS, prefill_chunk=8)
    eager = Engine(target, method, cuda_graphs=False, **kw)
    graphed = Engine(target, method, cuda_graphs=True, **kw)
    assert graphed.decoder.kv_len({}) == graphed.decoder.capacity  # static: the whole table, masked
    graphs_per_step = 2 if method == "regular" else 4  # model graph(s) and sampling graph(s) of one pass
    assert run(graphed) == run(eager)
    # every step replayed its graphs, none ran eagerly (a slot-0 `first` may replay the batch-1 MTP graph too)
    assert fake_cuda_graphs.replays >= graphs_per_step * graphed.metrics["steps"] > 0
    assert graphed.metrics["steps"] == eager.metrics["steps"]
