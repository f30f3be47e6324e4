"""Conversion from regular checkpoints, save/load round trips, Auto classes, native MTP weights, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipo import PIPOForCausalLM
from pipo.errors import NotAPIPOCheckpointError, PadTokenError, ShapeError, UnsupportedArchitectureError
from pipo.model.tiny import make_tiny_backbone


def outputs(model, ids):
    labels = ids.clone()
    with torch.no_grad():
        logits = model(ids).logits
        losses = model.pipo_losses(ids, labels)
    return logits, losses.mtp_loss, losses.conf_loss


@pytest.mark.parametrize("arch", ["qwen3_5", "llama"])
def test_save_load_round_trip_and_auto_class(pipo_model, arch, tmp_path):
    model = pipo_model(arch)
    with torch.no_grad():
        for p in model.parameters():  # move every head away from its init
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "pipo" and config["compressor_type"] == "mlp"
    assert config["text_config"]["model_type"] in ("qwen3_5_text", "llama")
    assert config["pad_token_id"] == model.pad_token_id
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    for prefix in ("model.", "compressor.", "mtp.", "confidence_head."):
        assert any(k.startswith(prefix) for k in keys), prefix

    ids = torch.randint(5, 300, (2, 12))
    expected = outputs(model, ids)
    for loaded in (PIPOForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, PIPOForCausalLM)
        for a, b in zip(expected, outputs(loaded.float().eval(), ids)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert not loaded.lm_head.weight.requires_grad


def test_native_mtp_weights_are_used(backbone_dir):
    path = backbone_dir("qwen3_5", with_mtp=True)
    native = {k[4:]: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith("mtp.")}
    model = PIPOForCausalLM.from_backbone(str(path))
    assert model.config.mtp_init == "native"
    for key, value in model.mtp.state_dict().items():
        torch.testing.assert_close(value, native[key], rtol=0, atol=0)


def test_without_native_mtp_the_last_full_attention_layer_is_copied(pipo_model):
    model = pipo_model("qwen3_5")
    assert model.config.mtp_init == "last_full_attention"
    last_full = max(i for i, t in enumerate(model.config.text_config.layer_types) if t == "full_attention")
    for key, value in model.model.layers[last_full].state_dict().items():
        torch.testing.assert_close(model.mtp.layers[0].state_dict()[key], value, rtol=0, atol=0)


def test_hub_vision_language_layout_is_accepted(backbone_dir):
    plain = PIPOForCausalLM.from_backbone(str(backbone_dir("qwen3_5", with_mtp=True)))
    hub = PIPOForCausalLM.from_backbone(str(backbone_dir("qwen3_5", with_mtp=True, hub_layout=True)))
    hub.confidence_head.load_state_dict(plain.confidence_head.state_dict())  # the one randomly initialised part
    assert hub.config.text_config.model_type == "qwen3_5_text" and hub.config.mtp_init == "native"
    assert not any("visual" in k for k in hub.state_dict())
    ids = torch.randint(5, 300, (1, 10))
    for a, b in zip(outputs(plain.eval(), ids), outputs(hub.eval(), ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_from_loaded_model_and_untied_backbone(tmp_path):
    path = make_tiny_backbone(tmp_path / "untied", arch="llama", tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_pretrained(path)
    model = PIPOForCausalLM.from_backbone(base, pad_token_id=0)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, base.lm_head.weight, rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_clear_errors(backbone_dir, tmp_path):
    llama = backbone_dir("llama")
    with pytest.raises(NotAPIPOCheckpointError, match="not a PIPO checkpoint"):
        PIPOForCausalLM.from_pretrained(llama)
    with pytest.raises(PadTokenError, match="outside the vocabulary"):
        PIPOForCausalLM.from_backbone(str(llama), pad_token_id=10**6)

    no_pad = make_tiny_backbone(tmp_path / "nopad", arch="llama")
    cfg = json.loads((no_pad / "config.json").read_text())
    cfg["pad_token_id"] = None
    (no_pad / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer_config.json",):
        (no_pad / name).unlink()
    with pytest.raises(PadTokenError, match="defines no pad token"):
        PIPOForCausalLM.from_backbone(str(no_pad))

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8}))
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2'"):
        PIPOForCausalLM.from_backbone(str(gpt2))


def test_layout_errors_in_forward(pipo_model):
    model = pipo_model("llama")
    pad = model.pad_token_id
    with pytest.raises(PadTokenError, match="even position"):
        model(torch.tensor([[5, 6, pad, 7]]))
    with pytest.raises(ShapeError, match=r"\[batch, length\]"):
        model(torch.tensor([5, 6, 7, 8]))


def test_hub_id_resolves_through_huggingface_hub_cache(backbone_dir, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub.snapshot_download; offline, a populated cache serves it."""
    import shutil

    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-qwen" / "snapshots" / ("0" * 40)
    shutil.copytree(backbone_dir("qwen3_5", with_mtp=True, hub_layout=True), snapshot)
    (cache / "models--tiny-org--tiny-qwen" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-qwen" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = PIPOForCausalLM.from_backbone("tiny-org/tiny-qwen")
    assert model.config.mtp_init == "native" and model.config.text_config.model_type == "qwen3_5_text"


@pytest.mark.parametrize("compressor_type", ["mlp", "linear"])
def test_conversion_builds_in_the_final_dtype_and_initialises_only_the_new_heads(backbone_dir, compressor_type):
    """Built on the device in bf16 without a random init of the backbone: loaded weights exact, heads as post_init."""
    path = backbone_dir("qwen3_5")
    state = load_file(str(path / "model.safetensors"))
    torch.manual_seed(0)
    model = PIPOForCausalLM.from_backbone(str(path), compressor_type=compressor_type, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.config.dtype == torch.bfloat16
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, state["model." + key].to(torch.bfloat16), rtol=0, atol=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    hidden = model.config.text_config.hidden_size
    eye = torch.eye(hidden, dtype=torch.bfloat16)
    torch.testing.assert_close(model.compressor.proj.weight, torch.cat([eye, eye], 1), rtol=0, atol=0)
    torch.testing.assert_close(model.mtp.fc.weight, torch.cat([eye, eye], 1), rtol=0, atol=0)
    assert torch.equal(model.confidence_head.norm.weight, torch.ones_like(model.confidence_head.norm.weight))
    std = model.config.text_config.initializer_range
    for linear in (model.confidence_head.fc1, model.confidence_head.fc2):  # drawn by the backbone's own init
        assert 0.5 * std < linear.weight.float().std() < 1.5 * std
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # computed, not cast
