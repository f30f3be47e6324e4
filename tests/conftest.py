"""Shared fixtures: tiny backbones of each supported family, written once per test session."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (pipo/engine/flash_decode.py) run in Triton's interpreter on CPU tensors; it is chosen when
    # triton is first imported, so before any pipo module is
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pipo  # noqa: F401  (registers the Auto classes)
from pipo import PIPOForCausalLM
from pipo.model.tiny import make_tiny_backbone

FAMILIES = ("qwen3_5", "llama")

# Triton kernels run on CPU tensors under Triton's interpreter, switched on above where there is no GPU
TRITON_ON_CPU = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="triton is not installed, or a GPU runs it (tests/test_gpu.py)")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker: on a 2-core machine, 2 workers x 2 torch threads thrash
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are opt-in on a machine with CUDA (`python -m pytest -m gpu`); elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same torch RNG state, whatever ran before it (any order, under xdist, alone)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory):
    """`backbone_dir(arch, **options)` -> path of a tiny checkpoint, cached per option set.

    A build reseeds torch; it runs inside `fork_rng`, so whether this call built or found the
    checkpoint leaves the caller's random stream the same.
    """
    cache: dict = {}

    def build(arch: str = "qwen3_5", **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            with torch.random.fork_rng(devices=[]):
                cache[key] = make_tiny_backbone(tmp_path_factory.mktemp(arch), arch=arch, **options)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def pipo_model(backbone_dir):
    """`pipo_model(arch, compressor_type)` -> a fresh fp32 PIPO model in eval mode, the same whatever ran before.

    The heads' random init draws from seed 0 after the backbone exists, inside `fork_rng`, so
    building a model leaves the caller's random stream untouched.
    """

    def build(arch: str = "qwen3_5", compressor_type: str = "mlp", **options):
        path = str(backbone_dir(arch, **options))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = PIPOForCausalLM.from_backbone(path, compressor_type=compressor_type)
        return model.float().eval()

    return build


@pytest.fixture(scope="session")
def decode_target(backbone_dir, pipo_model):
    """`decode_target(method)` -> what an engine of `method` decodes on the tiny qwen3_5 backbone: the backbone
    folder, or (pipo) a PIPO model whose sharpened confidence head keeps some drafts and rejects others."""

    def build(method: str):
        if method != "pipo":
            return backbone_dir("qwen3_5")
        target = pipo_model("qwen3_5")
        with torch.no_grad():
            target.confidence_head.fc2.weight.normal_(0, 2.0)
        return target

    return build
