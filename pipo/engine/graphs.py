"""CUDA-graph replay of decode-step calls and the asynchronous copy of a step's values to the host.

A decode step is a few calls (backbone pass, MTP pass, sampling) on fixed rows `[0, B)`;
`GraphedFn` captures each per batch-size bucket and replays it, so a step costs a handful of
launches whatever the model's depth. `launch` starts the copy of the step's sampled values
to pinned host memory; the engine queues the next step before it reads them (`Launched`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


_CAPTURING = [False]


def capturing() -> bool:
    """True while a `GraphedFn` warms up or captures: the calls whose shapes recur, which run shape-specialised
    torch.compile'd code. Prefill runs code compiled for dynamic shapes; other calls (first tokens, rows
    without a graph) vary in rows and would recompile for seconds in the middle of a run, and eager code
    costs the host about as much as a compiled region's guards."""
    return _CAPTURING[0]


class GraphedFn:
    """`fn(rows, kv_len, *tensors)`; replays a CUDA graph when one was captured for these rows and shapes."""

    def __init__(self, fn: Callable, pool=None) -> None:
        self.fn = fn
        self.pool = pool
        self.graphs: dict = {}

    @staticmethod
    def _key(rows: slice, kv_len: int, tensors) -> tuple:
        return rows.start, rows.stop, kv_len, tuple(tuple(t.shape) for t in tensors)

    def output(self, rows: slice, kv_len: int, *examples: torch.Tensor):
        """The static outputs of the graph captured for these rows and shapes."""
        return self.graphs[self._key(rows, kv_len, examples)][2]

    def capture(self, rows: slice, kv_len: int, *examples: torch.Tensor, share: bool = False) -> None:
        """`share`: the examples themselves become the static inputs (another graph's static outputs,
        which then need no copy on replay); else copies of them."""
        static = list(examples) if share else [t.clone() for t in examples]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        _CAPTURING[0] = True
        try:
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: compilation, kernel selection and Triton autotuning stay out of the graph
                    self.fn(rows, kv_len, *static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(rows, kv_len, *static)
        finally:
            _CAPTURING[0] = False
        self.graphs[self._key(rows, kv_len, static)] = (graph, static, out)

    def __call__(self, rows: slice | torch.Tensor, kv_len: int, *tensors: torch.Tensor):
        """Replays the graph captured for these rows and shapes; rows named by an index tensor run eagerly."""
        entry = self.graphs.get(self._key(rows, kv_len, tensors)) if isinstance(rows, slice) else None
        if entry is None:
            return self.fn(rows, kv_len, *tensors)
        graph, static, out = entry
        for dst, src in zip(static, tensors):
            if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():
                dst.copy_(src)
        graph.replay()
        return out


@dataclass
class Launched:
    """A decode step queued on the device: its sampled values [B, n] on their way to the host.

    `seqs` is the step's slot -> sequence map as it was at launch; `emit(seqs, rows)` hands
    the values to the sequences that have not finished meanwhile (the engine launches step
    t+1 before it reads step t, so a sequence that stopped at step t had step t+1 computed:
    its values are dropped, and its slot is reset when the next request takes it).
    """

    seqs: dict
    values: torch.Tensor
    emit: Callable
    event: torch.cuda.Event | None = None

    def finish(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        self.emit(self.seqs, self.values.tolist())


def launch(seqs: dict, values: torch.Tensor, emit: Callable) -> Launched:
    """Start the copy of a step's values [B, n] to the host (pinned, asynchronous on CUDA); `finish` waits."""
    if values.is_cuda:
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Launched(dict(seqs), host, emit, event)
    return Launched(dict(seqs), values.clone(), emit)
