"""Chunked LM-head CE against unchunked CE, and each PIPO loss against a direct computation from full logits."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pipo.model.losses import chunked_token_nll, reference_token_nll
from tests.conftest import FAMILIES


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_nll_matches_unchunked_value_and_gradient(chunk_size):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=gen)
    upstream = torch.randn(13, generator=gen, dtype=torch.float64)

    chunked = chunked_token_nll(hidden, weight, targets, chunk_size)
    (chunked.double() * upstream).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    ref = reference_token_nll(hidden, weight, targets)
    (ref.double() * upstream).sum().backward()

    torch.testing.assert_close(chunked.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_w, weight.grad, rtol=1e-6, atol=1e-9)


def test_chunked_nll_gradcheck():
    """The hand-written backward against finite differences (float64)."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (5,), generator=gen)
    assert torch.autograd.gradcheck(lambda h, w: chunked_token_nll(h, w, targets, 2), (hidden, weight))


def direct_losses(model, ids, labels):
    """docs/method.md section 4 computed the obvious way: full logits, F.cross_entropy with ignore_index."""
    hidden = model.encode_pairs(ids)
    h_prev = hidden[:, :-1]
    logits1 = model.lm_head(h_prev).float()
    y1 = labels[:, 2::2]
    backbone = F.cross_entropy(logits1.flatten(0, 1), y1.flatten(), ignore_index=-100)
    m = model.mtp_forward(ids[:, 2::2], h_prev)
    logits2 = model.lm_head(m).float()
    y2 = labels[:, 3::2]
    mtp = F.cross_entropy(logits2.flatten(0, 1), y2.flatten(), ignore_index=-100)
    valid = y2 != -100
    p_gold = torch.softmax(logits2, -1).gather(-1, y2.clamp(min=0)[..., None]).squeeze(-1)[valid]
    conf_logits = model.confidence_logits(h_prev, m)[valid]
    conf = F.binary_cross_entropy_with_logits(conf_logits, p_gold)
    return backbone, mtp, conf, torch.sigmoid(conf_logits).mean(), p_gold.mean()


@pytest.mark.parametrize("arch", FAMILIES)
def test_pipo_losses_equal_direct_computation(pipo_model, arch):
    model = pipo_model(arch)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, model.config.text_config.vocab_size, (2, 22), generator=gen)
    ids[:, 13] = model.pad_token_id
    labels = ids.clone()
    labels[:, :6] = -100
    labels[ids == model.pad_token_id] = -100
    out = model.pipo_losses(ids, labels, chunk_size=5)
    with torch.no_grad():
        backbone, mtp, conf, pred, target = direct_losses(model, ids, labels)
    torch.testing.assert_close(out.backbone_loss, backbone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, mtp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.conf_loss, conf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.conf_mean_pred, pred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.conf_mean_target, target, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, backbone + mtp + conf, rtol=1e-5, atol=1e-6)
    assert out.num_backbone_tokens == int((labels[:, 2::2] != -100).sum())


def test_loss_weights_and_forward_with_labels(pipo_model):
    model = pipo_model("llama")
    ids = torch.randint(5, 300, (1, 12))
    labels = ids.clone()
    a = model.pipo_losses(ids, labels, mtp_weight=0.5, conf_weight=2.0)
    torch.testing.assert_close(a.loss, a.backbone_loss + 0.5 * a.mtp_loss + 2.0 * a.conf_loss)
    torch.testing.assert_close(model(ids, labels=labels).loss, model.pipo_losses(ids, labels).loss)


def test_confidence_loss_only_trains_the_confidence_head(pipo_model):
    """Detach rules: the confidence loss must not reach backbone, compressor or MTP head."""
    model = pipo_model("qwen3_5")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(5, 300, (2, 16))
    out = model.pipo_losses(ids, ids.clone())
    out.conf_loss.backward()
    for name, p in model.named_parameters():
        touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert touched == name.startswith("confidence_head."), name


def test_odd_length_batch_is_padded_with_ignored_pad(pipo_model):
    model = pipo_model("llama")
    ids = torch.randint(5, 300, (1, 11))
    out_odd = model.pipo_losses(ids, ids.clone())
    padded = torch.cat([ids, torch.tensor([[model.pad_token_id]])], 1)
    labels = padded.clone()
    labels[0, -1] = -100
    out_even = model.pipo_losses(padded, labels)
    torch.testing.assert_close(out_odd.loss, out_even.loss)


@pytest.mark.parametrize("arch", FAMILIES)
def test_right_padded_batch_equals_rows_one_by_one(pipo_model, arch):
    """Batch padding (attention_mask 0) must not leak into valid positions of any loss."""
    model = pipo_model(arch)
    gen = torch.Generator().manual_seed(11)
    lengths = [18, 10]
    rows = [torch.randint(5, 300, (1, n), generator=gen) for n in lengths]
    ids = torch.full((2, max(lengths)), model.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : row.shape[1]] = row
        mask[i, : row.shape[1]] = 1
    labels = ids.masked_fill(mask == 0, -100)
    batch = model.pipo_losses(ids, labels, mask)
    singles = [model.pipo_losses(row, row.clone()) for row in rows]
    for name, count in (("backbone_loss", "num_backbone_tokens"), ("mtp_loss", "num_mtp_tokens")):
        total = sum(getattr(s, name) * getattr(s, count) for s in singles)
        n = sum(getattr(s, count) for s in singles)
        assert getattr(batch, count) == n
        torch.testing.assert_close(getattr(batch, name), total / n, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(pipo_model):
    model = pipo_model("qwen3_5")
    model.train()
    ids = torch.randint(5, 300, (2, 16))

    def grads():
        model.zero_grad()
        model.pipo_losses(ids, ids.clone()).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    model.gradient_checkpointing_disable()
    assert plain.keys() == checkpointed.keys() and any(n.startswith("compressor.") for n in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7)


def looped_losses(model, ids, labels):
    """docs/method.md section 4 per position, from a decoding loop: the backbone and the MTP head take one pair at a time
    through their caches (another path than the teacher-forced batch), targets read at 2i+2 and 2i+3 one by one."""
    nll1, nll2, conf_pred, conf_bce, p_gold = [], [], [], [], []
    for row in range(ids.shape[0]):
        cache = model.new_cache()
        pairs = ids.shape[1] // 2
        hidden = [model.encode_pairs(ids[row : row + 1, 2 * i : 2 * i + 2], cache=cache.backbone) for i in range(pairs)]
        for i in range(pairs - 1):
            token1, token2 = int(labels[row, 2 * i + 2]), int(labels[row, 2 * i + 3])
            m = model.mtp_forward(ids[row : row + 1, 2 * i + 2 : 2 * i + 3], hidden[i], cache=cache.mtp)
            if token1 != -100:
                nll1.append(-model.lm_head(hidden[i])[0, 0].float().log_softmax(-1)[token1])
            if token2 != -100:
                p = model.lm_head(m)[0, 0].float().softmax(-1)[token2]
                c = model.confidence_head(hidden[i], m)[0, 0]
                nll2.append(-p.log())
                p_gold.append(p)
                conf_pred.append(torch.sigmoid(c))
                conf_bce.append(-(p * F.logsigmoid(c) + (1 - p) * F.logsigmoid(-c)))
    mean = lambda values: torch.stack(values).mean()  # noqa: E731
    return mean(nll1), mean(nll2), mean(conf_bce), mean(conf_pred), mean(p_gold), len(nll1), len(nll2)


@pytest.mark.parametrize("arch", FAMILIES)
def test_pipo_losses_equal_a_per_position_decoding_loop(pipo_model, arch):
    model = pipo_model(arch)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(5, model.config.text_config.vocab_size, (2, 14), generator=gen)
    ids[0, 9] = model.pad_token_id  # a rejected-draft PAD in the second slot, unsupervised
    labels = ids.clone()
    labels[:, :4] = -100
    labels[0, 9] = -100
    out = model.pipo_losses(ids, labels, chunk_size=3)
    with torch.no_grad():
        backbone, mtp, conf, pred, target, n1, n2 = looped_losses(model, ids, labels)
    for got, expected in ((out.backbone_loss, backbone), (out.mtp_loss, mtp), (out.conf_loss, conf),
                          (out.conf_mean_pred, pred), (out.conf_mean_target, target)):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-7)  # p(gold) is ~1e-3 here
    assert (out.num_backbone_tokens, out.num_mtp_tokens) == (n1, n2) == (10, 9)
