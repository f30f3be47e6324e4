"""GPU check of the paged engine: greedy outputs equal the reference generators for every method.

A tiny random Qwen3.5-shaped checkpoint (`pipo.model.tiny.make_tiny_backbone`), fp32 on both sides
(TF32 off) so that ties cannot differ by rounding; the engine runs its GPU path (CUDA graphs,
the Triton paged decode kernel over blocks of 16, fla's gated-delta kernels when installed)
with a pool small enough that sequences are preempted, n = 2 samples sharing prompt blocks.
The references run on the GPU too (Hugging Face's forward; with fla installed its CPU path would
call fla's Triton kernels on CPU tensors). Prints one line per method; exits 1 on any mismatch.
`python benchmarks/gpu_equality.py [--compile]` (`--compile`: torch.compile the layers too).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from pipo.engine import Engine, load_regular
from pipo.model.modeling import PIPOForCausalLM
from pipo.model.reference import generate_mtp_reference, generate_pipo_reference, generate_regular_reference
from pipo.model.sampling import GREEDY
from pipo.model.tiny import make_tiny_backbone

EOS = [2]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 52)), [5, 6, 7, 8, 9, 10, 11, 12, 13], [100],
           [20, 21, 22]]
NEW = 16
TIGHT = dict(block_size=16, max_seq_len=64, max_batch_size=3, prefill_chunk=8, prefill_rows=2, max_prefill_tokens=16)


def engine(model, method: str, compile_layers: bool, spare: int, **kw) -> Engine:
    """A CUDA fp32 engine whose pool holds one sequence of max_seq_len and `spare` blocks more."""
    opts = dict(device="cuda", dtype=torch.float32, eos_token_ids=EOS, compile_layers=compile_layers, **TIGHT, **kw)
    probe = Engine(model, method, num_blocks=64, cuda_graphs=False, **opts)
    blocks = probe.blocks_per_seq + spare
    del probe
    return Engine(model, method, num_blocks=blocks, cuda_graphs=True, **opts)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--methods", default="regular,mtp,eagle,pipo")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = make_tiny_backbone(tempfile.mkdtemp(), arch="qwen3_5", with_mtp=True)
    failed = False
    for method in args.methods.split(","):
        start = time.perf_counter()
        if method == "pipo":
            torch.manual_seed(0)
            ref_model = PIPOForCausalLM.from_backbone(str(path), compressor_type="mlp").float().cuda().eval()
            with torch.no_grad():  # make the confidence head's decisions vary between steps
                ref_model.confidence_head.fc2.weight.normal_(0, 2.0)
            expected = [generate_pipo_reference(ref_model, p, NEW, GREEDY, 0.5, EOS).raw_ids for p in PROMPTS]
            gpu = engine(ref_model, "pipo", args.compile, spare=1, conf_threshold=0.5)
            got = gpu.generate(PROMPTS, GREEDY, max_new_tokens=NEW, n=2)
            got_ids = [[c.raw_ids for c in row] for row in got]
        else:
            model, mtp = load_regular(path, with_mtp=True)
            model, mtp = model.float().cuda().eval(), mtp.float().cuda().eval()
            if method == "mtp":
                expected = [generate_mtp_reference(model, mtp, p, NEW, GREEDY, EOS).token_ids for p in PROMPTS]
            else:
                expected = [generate_regular_reference(model, p, NEW, GREEDY, EOS).token_ids for p in PROMPTS]
            gpu = engine(path, method, args.compile, spare=4)
            got = gpu.generate(PROMPTS, GREEDY, max_new_tokens=NEW, n=2)
            got_ids = [[c.token_ids for c in row] for row in got]
        pairs = [(e, g) for e, row in zip(expected, got_ids) for g in row]
        same = sum(e == g for e, g in pairs)
        failed |= same != len(pairs)
        diffs = [first_difference(e, g) for e, g in pairs if e != g]
        print(f"{method}: {same}/{len(pairs)} samples equal to the reference; preemptions "
              f"{gpu.metrics['preemptions']}, prefix-block hits {gpu.prefix_cache.hit_blocks}; first differences at "
              f"{diffs}; {time.perf_counter() - start:.1f} s", flush=True)
        del gpu
        torch.cuda.empty_cache()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
