"""Reference generators: simple, correct, batch-size-1 decoding loops used as oracles for the fast engine.

`generate_pipo_reference` follows docs/method.md section 6 step by step (pair prefill with a
drafted token2, then two-phase decode with confidence gating); `generate_regular_reference`
is plain autoregressive decoding of a causal LM; `generate_mtp_reference` commits a native
MTP head's draft after every backbone token. None is fast; all are exact.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from pipo.errors import ShapeError
from pipo.model.backbones import mtp_layer_config
from pipo.model.heads import MTPHead
from pipo.model.modeling import PIPOForCausalLM, run_mtp_head
from pipo.model.sampling import SamplingParams, apply_presence_penalty, probabilities, sample


@dataclass
class GenerationResult:
    """Tokens a generator produced and how it produced them."""

    token_ids: list[int]  # what the user sees: PADs removed
    raw_ids: list[int] = field(default_factory=list)  # every emitted slot, PADs included
    pad_tokens: int = 0
    forward_passes: int = 0  # backbone forward passes (prefill counts one)
    drafted: int = 0  # token2 drafts scored by the confidence head
    accepted: int = 0  # drafts kept
    finished: bool = False  # stopped on EOS (else: token budget)

    @property
    def emitted_tokens(self) -> int:
        return len(self.token_ids)


def _check_prompt(prompt_ids: Sequence[int]) -> list[int]:
    if len(prompt_ids) == 0:
        raise ShapeError("empty prompt: nothing to condition on")
    return list(prompt_ids)


def _emit(result: GenerationResult, token: int, seen: torch.Tensor, eos: set[int], max_new_tokens: int) -> bool:
    """Record a real (non-PAD) token; True when generation must stop (EOS or token budget)."""
    result.token_ids.append(token)
    result.raw_ids.append(token)
    seen[0, token] = True
    result.finished = token in eos
    return result.finished or result.emitted_tokens >= max_new_tokens


def _pick(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, banned: list[int], gen) -> int:
    logits = apply_presence_penalty(logits, seen, params.presence_penalty)
    return int(sample(probabilities(logits, params, torch.tensor(banned, dtype=torch.long)), gen)[0])


@torch.no_grad()
def generate_pipo_reference(
    model: PIPOForCausalLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    conf_threshold: float = 0.5,
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    draft_at_prefill: bool = True,
) -> GenerationResult:
    """PIPO decoding of one prompt.

    Each step feeds the previous pair `(t1, t2)`, samples token1 from the backbone, then
    (unless `conf_threshold >= 1`) token2 from the MTP head; token2 becomes PAD when
    `sigmoid(confidence) < conf_threshold` (so `conf_threshold < 0` keeps every draft).
    PAD is never sampled. `draft_at_prefill=False` reproduces the original implementation,
    which forced PAD as the first token2.
    """
    device = model.device
    pad = model.pad_token_id
    prompt = _check_prompt(prompt_ids)
    if len(prompt) % 2:
        prompt.append(pad)
    eos = set(eos_token_ids)
    use_mtp = conf_threshold < 1
    cache = model.new_cache()
    ids = torch.tensor([prompt], device=device)
    hidden = model.encode_pairs(ids, cache=cache.backbone)
    result = GenerationResult(token_ids=[], forward_passes=1)
    if use_mtp and hidden.shape[1] > 1:  # the MTP cache sees the prompt's gold token1s
        model.mtp_forward(ids[:, 2::2], hidden[:, :-1], cache=cache.mtp)
    seen = torch.zeros(1, model.config.text_config.vocab_size, dtype=torch.bool, device=device)
    h_last = hidden[:, -1:]
    first_step = True
    while True:
        t1 = _pick(model.token_logits(h_last)[:, -1], params, seen, [pad], generator)
        if _emit(result, t1, seen, eos, max_new_tokens):
            break
        t2 = pad
        if use_mtp:
            m = model.mtp_forward(torch.tensor([[t1]], device=device), h_last, cache=cache.mtp)
            draft = _pick(model.token_logits(m)[:, -1], params, seen, [pad], generator)
            if not (first_step and not draft_at_prefill):
                confidence = float(torch.sigmoid(model.confidence_logits(h_last, m)[0, -1]))
                result.drafted += 1
                if confidence >= conf_threshold:
                    t2 = draft
                    result.accepted += 1
        if t2 == pad:
            result.raw_ids.append(pad)
            result.pad_tokens += 1
        elif _emit(result, t2, seen, eos, max_new_tokens):
            break
        h_last = model.encode_pairs(torch.tensor([[t1, t2]], device=device), cache=cache.backbone)
        result.forward_passes += 1
        first_step = False
    return result


@torch.no_grad()
def generate_regular_reference(
    model: PreTrainedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    banned_token_ids: Sequence[int] = (),
) -> GenerationResult:
    """Plain token-by-token decoding of a Hugging Face causal LM (the `regular` baseline's oracle)."""
    device = model.device
    prompt = _check_prompt(prompt_ids)
    eos = set(eos_token_ids)
    cache = DynamicCache(config=model.config)
    logits = model(torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True).logits
    result = GenerationResult(token_ids=[], forward_passes=1)
    seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=device)
    while True:
        token = _pick(logits[:, -1], params, seen, list(banned_token_ids), generator)
        if _emit(result, token, seen, eos, max_new_tokens):
            break
        logits = model(torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True).logits
        result.forward_passes += 1
    return result


@torch.no_grad()
def generate_mtp_reference(
    model: PreTrainedModel,
    mtp_head: MTPHead,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Native MTP decoding without verification (the `mtp` baseline's oracle).

    The backbone's final hidden h_t predicts x_{t+1}; the MTP head, fed (x_{t+1}, h_t) at
    position t, predicts x_{t+2}, which is committed unchecked. Each backbone pass then
    consumes both new tokens. The MTP cache first takes the prompt's gold entries.
    """
    device = model.device
    prompt = _check_prompt(prompt_ids)
    eos = set(eos_token_ids)
    base = model.model
    mtp_config = mtp_layer_config(model.config)
    cache, mtp_cache = DynamicCache(config=model.config), DynamicCache(config=mtp_config)
    ids = torch.tensor([prompt], device=device)
    hidden = base(ids, past_key_values=cache, use_cache=True).last_hidden_state
    result = GenerationResult(token_ids=[], forward_passes=1)
    seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
    mtp_tokens, mtp_hidden, h_last = ids[:, 1:], hidden[:, :-1], hidden[:, -1:]

    def emit(token: int) -> bool:
        result.token_ids.append(token)
        result.raw_ids.append(token)
        seen[0, token] = True
        result.finished = token in eos
        return result.finished or result.emitted_tokens >= max_new_tokens

    while True:
        token = _pick(model.lm_head(h_last)[:, -1].float(), params, seen, [], generator)
        if emit(token):
            break
        tokens = torch.cat([mtp_tokens, torch.tensor([[token]], device=device)], dim=1)
        m = run_mtp_head(mtp_head, base, mtp_config, tokens, torch.cat([mtp_hidden, h_last], dim=1), cache=mtp_cache)
        draft = _pick(model.lm_head(m)[:, -1].float(), params, seen, [], generator)
        result.drafted += 1
        result.accepted += 1
        if emit(draft):
            break
        hidden = base(torch.tensor([[token, draft]], device=device), past_key_values=cache, use_cache=True).last_hidden_state
        result.forward_passes += 1
        mtp_tokens, mtp_hidden, h_last = torch.tensor([[draft]], device=device), hidden[:, :1], hidden[:, 1:]
    return result
