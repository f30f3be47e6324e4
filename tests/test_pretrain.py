"""Demo pretraining: a real loop on the synthetic task whose loss falls; output loads as a checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipo.errors import PIPOError
from pipo.model.backbones import mtp_layer_config
from pipo.model.modeling import run_mtp_head
from pipo.model.tiny import make_tiny_backbone
from pipo.train.pretrain import PretrainConfig, batch, lr_factor, new_mtp_head, pretrain, pretrain_losses

TASK = {"ops": "+-", "max_operand": 9, "max_value": 40}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only adds spin-waits (minutes when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_drops_and_checkpoint_is_complete(tmp_path):
    config = PretrainConfig(hidden_size=32, num_layers=2, documents=200, steps=40, batch_size=16,
                            learning_rate=5e-3, warmup_steps=5, with_mtp=True, task=TASK)
    losses = pretrain(tmp_path / "m", config)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    out = tmp_path / "m"
    assert not (tmp_path / "m.partial").exists()
    assert json.loads((out / "pretrain.json").read_text())["config"]["task"] == TASK
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as weights:
        assert any(key.startswith("mtp.") for key in weights.keys())  # native-style MTP kept after save


def test_same_corpus_same_tokenizer(tmp_path):
    """Teacher and student share a tokenizer (OPD compares them id by id) when built from one corpus."""
    small = dict(hidden_size=32, num_layers=1, documents=100, steps=1, task=TASK)
    pretrain(tmp_path / "a", PretrainConfig(**small, seed=0))
    pretrain(tmp_path / "b", PretrainConfig(**small, seed=1, arch="llama"))
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_schedule_and_unknown_keys():
    config = PretrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(100, config) == pytest.approx(0.1)
    with pytest.raises(PIPOError, match="stepz"):
        PretrainConfig.from_dict({"stepz": 1})


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A tiny Qwen3.5 hybrid (gated delta net + full attention) with a fresh native MTP head."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_backbone(tmp_path_factory.mktemp("hybrid"), arch="qwen3_5", hidden_size=32, num_layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, new_mtp_head(model).eval()


# Two rows of different lengths (right padding), the first 2 / 3 tokens are the prompt.
ROWS = [([5, 9, 17, 30, 41, 12, 7], 2), ([8, 3, 22, 19, 6], 3)]


def test_mtp_objective_position_by_position(hybrid):
    """Each MTP term is the head at position t, fed (x_t+1, h_t) over the prefix only, scoring x_t+2."""
    model, head = hybrid
    config = mtp_layer_config(model.config)
    lm_terms, mtp_terms = [], []
    with torch.no_grad():
        for ids, prompt_len in ROWS:
            tokens = torch.tensor([ids])
            h = model.model(input_ids=tokens).last_hidden_state
            for t in range(len(ids) - 1):
                if t + 1 >= prompt_len:  # x_t+1 supervised: the backbone at t predicts it
                    lm_terms.append(-torch.log_softmax(model.lm_head(h[0, t]), -1)[ids[t + 1]])
                if t + 2 < len(ids) and t + 2 >= prompt_len:  # x_t+2 supervised: the MTP head at t predicts it
                    m = run_mtp_head(head, model.model, config, tokens[:, 1 : t + 2], h[:, : t + 1])
                    mtp_terms.append(-torch.log_softmax(model.lm_head(m[0, -1]), -1)[ids[t + 2]])
        out = pretrain_losses(model, head, batch(ROWS, pad_id=0), mtp_weight=0.5)
    assert len(lm_terms) == len(mtp_terms) == 5 + 2  # supervised tokens: positions 2..6 and 3..4
    lm, mtp = torch.stack(lm_terms).mean(), torch.stack(mtp_terms).mean()
    torch.testing.assert_close(out.lm_loss, lm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.mtp_loss, mtp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, lm + 0.5 * mtp, atol=1e-4, rtol=1e-4)


def test_mtp_objective_uniform_logits_by_hand(hybrid):
    """Zero embeddings (tied LM head): every prediction is uniform, so L = (1 + w) ln V exactly."""
    model, head = hybrid
    saved = model.model.embed_tokens.weight.detach().clone()
    try:
        with torch.no_grad():
            model.model.embed_tokens.weight.zero_()
            out = pretrain_losses(model, head, batch(ROWS, pad_id=0), mtp_weight=0.3)
    finally:
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(saved)
    ln_v = torch.log(torch.tensor(float(model.config.vocab_size)))
    torch.testing.assert_close(out.lm_loss, ln_v)
    torch.testing.assert_close(out.mtp_loss, ln_v)
    torch.testing.assert_close(out.loss, 1.3 * ln_v)


def test_pretrained_mtp_head_is_trained_and_loads_natively(tmp_path):
    """The saved `mtp.*` weights are the trained head (loss falls) and PIPO starts its MTP head from them."""
    from pipo import PIPOForCausalLM

    config = PretrainConfig(arch="qwen3_5", hidden_size=32, num_layers=2, full_attention_interval=2, documents=100,
                            steps=12, batch_size=8, learning_rate=5e-3, warmup_steps=2, with_mtp=True, task=TASK)
    logged = []
    pretrain(tmp_path / "m", config, log=lambda metrics, step: logged.append(metrics))
    assert logged[-1]["mtp_loss"] < logged[0]["mtp_loss"]
    model = PIPOForCausalLM.from_backbone(str(tmp_path / "m"))
    assert model.config.mtp_init == "native"
    with safe_open(str(next((tmp_path / "m").glob("*.safetensors"))), "pt") as weights:
        torch.testing.assert_close(model.mtp.fc.weight, weights.get_tensor("mtp.fc.weight"))
