"""PIPO training math without ms-swift: pair layout, PAD compaction, OPD divergences, confidence targets, input checks."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from pipo.errors import PadTokenError, PIPOError
from pipo.model.pairs import IGNORE_INDEX as X
from pipo.model.pairs import REJECTED_DRAFT as R
from pipo.model.pairs import collate_rows, pair_layout, rollout_row
from pipo.train.divergences import chunked_head_loss, divergence_row_loss, union_indices
from pipo.train.opd import compact_pads, opd_losses, teacher_rows_for_targets
from pipo.train.settings import TrainSettings
from pipo.train.validation import check_teacher_tokenizer, require_pad_token, validate_jsonl

P = 0  # pad id in hand-built sequences


def test_pair_layout_moves_response_to_pair_boundary():
    ids, labels = pair_layout([5, 6, 7, 8, 9], [X, X, X, 8, 9], P)
    assert ids == [5, 6, 7, P, 8, 9]
    assert labels == [X, X, X, X, 8, 9]
    ids, labels = pair_layout([5, 6, 7, 8, 9], [X, X, 7, 8, 9], P)
    assert ids == [5, 6, 7, 8, 9, P] and labels == [X, X, 7, 8, 9, X]


def test_pair_layout_rejects_supervised_pad():
    with pytest.raises(PadTokenError, match="pad token"):
        pair_layout([5, 6, P], [X, X, P], P)


def test_rollout_row_marks_rejected_drafts():
    ids, labels = rollout_row([5, 6, 7], [8, P, 9], P)
    assert ids == [5, 6, 7, P, 8, P, 9, P]
    assert labels == [X, X, X, X, 8, R, 9, X]  # the student's PAD is a rejected draft; the final one only evens out


def test_compaction_maps_teacher_outputs_back():
    # prompt a b | c PAD | d e | f PAD ; second row shorter (right padding)
    ids = torch.tensor([[1, 2, 3, P, 4, 5, 6, P], [1, 2, 3, 4, P, P, P, P]])
    mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])
    compact = compact_pads(ids, mask, P)
    assert compact.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, P, P]]
    assert compact.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    # a PAD position takes the previous real token's position
    assert compact.source_index[0].tolist() == [0, 1, 2, 2, 3, 4, 5, 5]
    # teacher "hidden" = its compact position; the token at t is predicted from t-1
    teacher_hidden = torch.arange(6.0)[None, :, None].expand(2, 6, 1)
    positions = torch.tensor([[4, 6], [2, 3]])
    rows = teacher_rows_for_targets(teacher_hidden, compact.source_index, positions, torch.ones(2, 2, dtype=torch.bool))
    # row 0: token 4 (pos 4) after PAD at 3 -> teacher pos of '3' (2); token 6 (pos 6) -> pos of '5' (4)
    assert rows.squeeze(-1).tolist() == [2.0, 4.0, 1.0, 2.0]


def _heads(seed=0, n=7, h=5, v=11):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g),
            torch.randn(n, h + 2, generator=g), torch.randn(v, h + 2, generator=g), torch.randint(0, v, (n,), generator=g))


def test_confidence_target_is_min_ratio_by_hand():
    hs, ws, ht, wt, y = _heads()
    for mode in ("sampled", "topk"):
        _, alpha = chunked_head_loss(hs, ws, divergence_row_loss(mode, ht, wt, y, k=3), chunk_size=3)
        ps = torch.softmax(hs @ ws.T, -1).gather(1, y[:, None]).squeeze(1)
        pt = torch.softmax(ht @ wt.T, -1).gather(1, y[:, None]).squeeze(1)
        torch.testing.assert_close(alpha, torch.clamp(pt / ps, max=1.0))
    _, alpha = chunked_head_loss(hs, ws, divergence_row_loss("full", ht, wt, y), chunk_size=3)
    torch.testing.assert_close(alpha, torch.minimum(torch.softmax(hs @ ws.T, -1), torch.softmax(ht @ wt.T, -1)).sum(-1))


def _reference_divergence(mode, zs, zt, y, k=3, beta=1.0):
    ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
    if mode == "full":
        if beta == 1:
            return (ls.exp() * (ls - lt)).sum(-1)
        m = ((1 - beta) * ls.exp() + beta * lt.exp()).log()
        return beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)
    out = []
    for i in range(zs.shape[0]):
        union = sorted(set(zs[i].topk(k).indices.tolist()) | set(zt[i].topk(k).indices.tolist()) | {int(y[i])})
        s, t = zs[i, union].log_softmax(-1), zt[i, union].log_softmax(-1)
        out.append((s.exp() * (s - t)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("mode,beta", [("topk", 1.0), ("full", 1.0), ("full", 0.5)])
def test_chunked_divergence_matches_unchunked_value_and_gradient(mode, beta):
    hs, ws, ht, wt, y = _heads(1)
    hs.requires_grad_(True)
    div, _ = chunked_head_loss(hs, ws, divergence_row_loss(mode, ht, wt, y, k=3, beta=beta), chunk_size=2)
    (grad,) = torch.autograd.grad(div.sum(), hs)
    h2 = hs.detach().clone().requires_grad_(True)
    ref = _reference_divergence(mode, h2 @ ws.T, ht @ wt.T, y, beta=beta)
    (grad_ref,) = torch.autograd.grad(ref.sum(), h2)
    torch.testing.assert_close(div, ref)
    torch.testing.assert_close(grad, grad_ref)


def test_sampled_divergence_value_and_score_function_gradient():
    hs, ws, ht, wt, y = _heads(2)
    hs.requires_grad_(True)
    div, _ = chunked_head_loss(hs, ws, divergence_row_loss("sampled", ht, wt, y), chunk_size=4)
    ls = -F.cross_entropy(hs @ ws.T, y, reduction="none")
    lt = -F.cross_entropy(ht @ wt.T, y, reduction="none")
    torch.testing.assert_close(div, (ls - lt).detach())
    (grad,) = torch.autograd.grad(div.sum(), hs)
    (grad_ref,) = torch.autograd.grad(((ls - lt).detach() * ls).sum(), hs)
    torch.testing.assert_close(grad, grad_ref)


def test_union_marks_duplicates_invalid():
    student = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    teacher = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    indices, valid = union_indices(student, teacher, torch.tensor([0]), k=2)
    assert sorted(set(indices[valid].tolist())) == [0, 1, 2, 3]
    assert int(valid.sum()) == 4


# One rollout row by hand: prompt (1, 2), then pairs (a, b) (c, PAD) (d, e) -- the draft after c was rejected.
# Labels leave the prompt and the rejected draft unsupervised. Every distribution below is given as
# probabilities over the 4-token vocabulary (PAD = 0); logits are their logs.
OPD_IDS = [1, 2, 3, 1, 2, P, 3, 1]
OPD_LABELS = [X, X, 3, 1, 2, X, 3, 1]
STUDENT_BACKBONE = [[0.1, 0.2, 0.3, 0.4], [0.1, 0.4, 0.3, 0.2], [0.15, 0.1, 0.45, 0.3]]  # predict a=3, c=2, d=3
STUDENT_MTP = [[0.1, 0.5, 0.25, 0.15], [0.7, 0.1, 0.15, 0.05], [0.2, 0.15, 0.25, 0.4]]  # predict b=1, (PAD), e=1
CONF_LOGITS = [0.5, -1.0, 2.0]
# teacher next-token distributions at each position of the PAD-free sequence 1 2 3 1 2 3 1
TEACHER = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.1, 0.6], [0.1, 0.3, 0.4, 0.2], [0.2, 0.1, 0.5, 0.2],
           [0.1, 0.2, 0.2, 0.5], [0.2, 0.5, 0.15, 0.15], [0.3, 0.35, 0.2, 0.15]]
# (student distribution, teacher position, target) per supervised row: the token at t is predicted from the
# teacher's position of the last real token before t; d follows the PAD, so it takes c's position (4), not 5
BACKBONE_ROWS = [(STUDENT_BACKBONE[0], 1, 3), (STUDENT_BACKBONE[1], 3, 2), (STUDENT_BACKBONE[2], 4, 3)]
MTP_ROWS = [(STUDENT_MTP[0], 2, 1), (STUDENT_MTP[2], 5, 1)]
MTP_CONF = [CONF_LOGITS[0], CONF_LOGITS[2]]


def kl(s: list[float], t: list[float], support) -> float:
    """Reverse KL of s from t over `support`, both renormalised there."""
    zs, zt = sum(s[v] for v in support), sum(t[v] for v in support)
    return sum(s[v] / zs * math.log((s[v] / zs) / (t[v] / zt)) for v in support)


def top1(p: list[float]) -> int:
    return max(range(len(p)), key=p.__getitem__)


def hand_divergence(mode: str, s: list[float], t: list[float], y: int) -> tuple[float, float]:
    """(divergence, confidence target) of one row, docs/method.md section 5, with k = 1 for `topk`."""
    if mode == "sampled":
        return math.log(s[y]) - math.log(t[y]), min(1.0, t[y] / s[y])
    if mode == "topk":
        return kl(s, t, {top1(s), top1(t), y}), min(1.0, t[y] / s[y])
    return kl(s, t, range(len(s))), sum(min(a, b) for a, b in zip(s, t))


def bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def one_hot_rows(n: int, offset: int, width: int) -> torch.Tensor:
    """Rows e_offset..e_offset+n-1: with a weight whose columns are logits, row i picks column offset+i."""
    return torch.eye(width, dtype=torch.float64)[offset : offset + n]


def run_opd(mode: str, student_backbone, student_mtp, teacher, conf_logits=CONF_LOGITS):
    """`opd_losses` on the hand row; student and teacher logits come out of one-hot hidden states."""
    ids = torch.tensor([OPD_IDS])
    compact = compact_pads(ids, torch.ones_like(ids), P)
    assert compact.input_ids.tolist() == [[1, 2, 3, 1, 2, 3, 1]]
    student_weight = torch.tensor(student_backbone + student_mtp, dtype=torch.float64).log().T.contiguous()
    teacher_weight = torch.tensor(teacher, dtype=torch.float64).log().T.contiguous()
    hidden = one_hot_rows(3, 0, 6)[None].requires_grad_(True)
    mtp = one_hot_rows(3, 3, 6)[None].requires_grad_(True)
    conf = torch.tensor([conf_logits], dtype=torch.float64, requires_grad=True)
    out = opd_losses(hidden, mtp, conf, student_weight, torch.eye(7, dtype=torch.float64)[None], teacher_weight,
                     torch.tensor([OPD_LABELS]), compact.source_index, divergence=mode, k=1, chunk_size=2)
    return out, (hidden, mtp, conf)


@pytest.mark.parametrize("mode", ["sampled", "topk", "full"])
def test_opd_losses_by_hand_with_a_rejected_draft(mode):
    out, (_, mtp, conf) = run_opd(mode, STUDENT_BACKBONE, STUDENT_MTP, TEACHER)
    backbone = [hand_divergence(mode, s, TEACHER[pos], y)[0] for s, pos, y in BACKBONE_ROWS]
    mtp_rows = [hand_divergence(mode, s, TEACHER[pos], y) for s, pos, y in MTP_ROWS]
    alphas = [alpha for _, alpha in mtp_rows]
    expected = {
        "backbone_loss": sum(backbone) / 3,
        "mtp_loss": sum(d for d, _ in mtp_rows) / 2,
        "conf_loss": sum(bce(c, a) for c, a in zip(MTP_CONF, alphas)) / 2,
        "conf_mean_target": sum(alphas) / 2,
        "conf_mean_pred": sum(1 / (1 + math.exp(-c)) for c in MTP_CONF) / 2,
    }
    expected["loss"] = expected["backbone_loss"] + expected["mtp_loss"] + expected["conf_loss"]
    got = {name: float(getattr(out, name).detach()) for name in expected}
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)  # the row losses run in float32
    assert (out.num_backbone_tokens, out.num_mtp_tokens) == (3, 2)
    out.loss.backward()  # the rejected draft's MTP row and confidence logit get no gradient, the others do
    assert float(conf.grad[0, 1]) == 0 and not mtp.grad[0, 1].any()
    assert conf.grad[0, [0, 2]].ne(0).all() and mtp.grad[0, [0, 2]].abs().sum(-1).ne(0).all()


@pytest.mark.parametrize("mode", ["sampled", "topk", "full"])
def test_opd_teacher_equal_to_student_costs_only_the_confidence_head(mode):
    """Same distributions on both sides: every divergence is 0, every draft is accepted (target 1)."""
    teacher = [TEACHER[0], STUDENT_BACKBONE[0], STUDENT_MTP[0], STUDENT_BACKBONE[1], STUDENT_BACKBONE[2],
               STUDENT_MTP[2], TEACHER[6]]
    out, (hidden, mtp, _) = run_opd(mode, STUDENT_BACKBONE, STUDENT_MTP, teacher)
    assert abs(float(out.backbone_loss.detach())) < 1e-6 and abs(float(out.mtp_loss.detach())) < 1e-6
    assert float(out.conf_mean_target) == pytest.approx(1.0, rel=1e-6)
    assert float(out.conf_loss.detach()) == pytest.approx(sum(bce(c, 1.0) for c in MTP_CONF) / 2, rel=1e-6)
    (out.backbone_loss + out.mtp_loss).backward()
    assert float(hidden.grad.abs().max()) < 1e-6 and float(mtp.grad.abs().max()) < 1e-6


def test_opd_rejected_draft_target_is_students_top_token_by_hand():
    """Rollout (prompt 1 2 | 4 PAD | 6 7 | EOS=3 PAD): the rejected draft after token1 4 gets the MTP head's top token.

    Identity LM heads make logits = hidden rows, so every term is computed here directly. With
    the `sampled` divergence the MTP term at the rejected draft is log p_s(y) - log p_t(y) for
    y = the student's top non-PAD token, and its confidence target is min(1, p_t(y) / p_s(y)).
    """
    v = 8
    ids = torch.tensor([[1, 2, 4, P, 6, 7, 3, P]])
    labels = torch.tensor([[X, X, 4, R, 6, 7, 3, X]])
    eye = torch.eye(v)
    hidden = torch.randn(1, 3, v, generator=torch.Generator().manual_seed(0))
    s_rejected = torch.tensor([9.0, 0.0, 3.0, 1.0, 0.0, 0.5, 0.0, 0.0])  # PAD (0) is highest, then token 2
    s_kept = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.5])
    mtp = torch.stack([s_rejected, s_kept, torch.zeros(v)])[None]
    conf = torch.tensor([[0.3, -0.2, 0.0]])
    compact = compact_pads(ids, torch.ones_like(ids), P)  # 1 2 4 6 7 3: position 3 is predicted from compact 2
    teacher = torch.randn(1, 6, v, generator=torch.Generator().manual_seed(1))
    args = (hidden, mtp, conf, eye, teacher, eye, labels, compact.source_index)
    out = opd_losses(*args, divergence="sampled", pad_id=P)
    ls, lt = s_rejected.log_softmax(-1)[2], teacher[0, 2].log_softmax(-1)[2]
    ls_kept, lt_kept = s_kept.log_softmax(-1)[7], teacher[0, 3].log_softmax(-1)[7]  # token 7 predicted from compact 3 (6)
    assert out.num_mtp_tokens == 2 and out.num_backbone_tokens == 3
    torch.testing.assert_close(out.mtp_loss, ((ls - lt) + (ls_kept - lt_kept)) / 2)
    alpha = torch.exp(torch.clamp(torch.stack([lt - ls, lt_kept - ls_kept]), max=0.0))
    torch.testing.assert_close(out.conf_loss, F.binary_cross_entropy_with_logits(conf[0, :2], alpha))
    off = opd_losses(*args, divergence="sampled", pad_id=P, fill_rejected=False)
    assert off.num_mtp_tokens == 1
    torch.testing.assert_close(off.mtp_loss, ls_kept - lt_kept)
    torch.testing.assert_close(off.backbone_loss, out.backbone_loss)


def test_settings_round_trip_through_model_kwargs():
    settings = TrainSettings(divergence="full", topk=8, conf_threshold=0.5, max_pad_ratio=0.1, fill_rejected_drafts=False)
    assert TrainSettings.from_env(settings.to_model_kwargs()) == settings
    assert TrainSettings().fill_rejected_drafts  # on by default, as in the original implementation
    with pytest.raises(PIPOError, match="PIPO_FILL_REJECTED_DRAFTS"):
        TrainSettings.from_env({"PIPO_FILL_REJECTED_DRAFTS": "maybe"})
    with pytest.raises(PIPOError, match="divergence"):
        TrainSettings(divergence="reverse")


def test_collate_pads_right():
    batch = collate_rows([([1, 2, 3, 4], [X, X, 3, 4]), ([1, 2], [X, 2])], P)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, P, P]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_row_without_assistant_turn_names_the_row(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]},
            {"messages": [{"role": "user", "content": "2+2"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(PIPOError, match=r"sft.jsonl:2: messages: no assistant turn"):
        validate_jsonl(path, "sft")
    assert validate_jsonl(path, "opd") == 2


def test_missing_pad_token_names_the_model(backbone_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir("llama")))
    tokenizer.pad_token = None
    with pytest.raises(PadTokenError, match="model /some/model: the tokenizer has no pad token"):
        require_pad_token(tokenizer, "model /some/model")


def test_teacher_tokenizer_mismatch_names_both_models(backbone_dir):
    student, other = backbone_dir("llama"), backbone_dir("llama", seed=1)
    check_teacher_tokenizer(student, backbone_dir("llama", hidden_size=96))
    with pytest.raises(PIPOError, match=rf"tokenizer mismatch between student model {student} and teacher model {other}"):
        check_teacher_tokenizer(student, other)
