"""`PIPOForCausalLM`: a pretrained causal LM run on compressed token pairs, with MTP and confidence heads.

Training forward (docs/method.md section 4) and the inference pieces (section 6) live here; the
reference generators (`pipo.model.reference`) and the fast engine build on
`encode_pairs`, `mtp_forward`, `confidence_logits` and `new_cache`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import local_torch_dtype
from transformers.utils import ModelOutput

from pipo.errors import NotAPIPOCheckpointError, PadTokenError, PIPOError
from pipo.model import backbones
from pipo.model.config import PIPOConfig
from pipo.model.heads import Compressor, ConfidenceHead, MTPHead
from pipo.model.losses import assemble_losses, chunked_token_nll, select_supervised
from pipo.model.pairs import check_pad_positions, pad_to_even


@dataclass
class PIPOOutput(ModelOutput):
    """Training forward output: total loss, its components and confidence-head diagnostics."""

    loss: torch.Tensor | None = None
    backbone_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    conf_loss: torch.Tensor | None = None
    conf_mean_pred: torch.Tensor | None = None
    conf_mean_target: torch.Tensor | None = None
    num_backbone_tokens: int | None = None
    num_mtp_tokens: int | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    mtp_hidden_states: torch.Tensor | None = None
    confidence_logits: torch.Tensor | None = None


@dataclass
class PIPOCache:
    """Decoding state: the backbone's cache (one entry per pair) and the MTP layer's own KV cache."""

    backbone: DynamicCache
    mtp: DynamicCache


def rotary_position_ids(rotary: nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
    """Multimodal-RoPE rotaries (Qwen3.5) take [3, B, n] positions; transformers 5.17 does not expand [B, n] itself."""
    if hasattr(rotary, "mrope_section") and position_ids.ndim == 2:
        return position_ids[None].expand(3, -1, -1)
    return position_ids


def run_mtp_head(
    mtp: MTPHead,
    base: nn.Module,
    mtp_config,
    token_ids: torch.Tensor,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: DynamicCache | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """An MTP head over `base`'s embeddings and rotary: token ids [B, n] and hidden [B, n, H] -> normed output.

    Shared by PIPO's MTP head (pair positions) and a regular checkpoint's native one (token positions).
    """
    x = mtp.fuse_inputs(base.embed_tokens(token_ids), hidden)
    if x.shape[1] == 0:  # e.g. a one-pair prompt: no position has a gold token1 yet
        return x
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past, past + x.shape[1], device=x.device).expand(x.shape[0], -1)
    mask = create_causal_mask(
        config=mtp_config,
        inputs_embeds=x,
        attention_mask=attention_mask,
        past_key_values=cache,
        position_ids=position_ids,
    )
    out = mtp.layers[0](
        x,
        position_embeddings=base.rotary_emb(x, rotary_position_ids(base.rotary_emb, position_ids)),
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return mtp.norm(out[0] if isinstance(out, tuple) else out)


class PIPOForCausalLM(PreTrainedModel):
    """PIPO around a decoder-only backbone (`model`), with `compressor`, `mtp` and `confidence_head`.

    The LM head is tied to the embeddings when the backbone ties them, and is frozen
    together with the embeddings (docs/method.md section 4).
    """

    config_class = PIPOConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: PIPOConfig) -> None:
        super().__init__(config)
        text_config = config.text_config
        backbones.check_supported(text_config)
        hidden = text_config.hidden_size
        self.model = AutoModel.from_config(text_config)
        self.lm_head = nn.Linear(hidden, text_config.vocab_size, bias=False)
        self.compressor = Compressor(hidden, config.compressor_type)
        self.mtp = MTPHead(
            hidden,
            backbones.norm_factory(self.model, text_config),
            backbones.build_mtp_layer(self.model, text_config),
        )
        self.confidence_head = ConfidenceHead(hidden, getattr(text_config, "rms_norm_eps", 1e-6))
        self._mtp_config = backbones.mtp_layer_config(text_config)
        self.post_init()
        self.compressor.reset_parameters()
        self.freeze_lm_head()

    def freeze_lm_head(self) -> None:
        """LM head and embeddings stay frozen in every PIPO stage (docs/method.md section 4)."""
        self.lm_head.weight.requires_grad_(False)
        self.model.embed_tokens.weight.requires_grad_(False)

    def _init_weights(self, module: nn.Module) -> None:
        """The backbone family's own init for every leaf module (the MTP layer's norms included).

        The compressor's initialisation (docs/method.md section 2) is applied after `post_init` in `__init__`:
        transformers skips modules without parameters of their own, like `Compressor`.
        """
        type(self.model)._init_weights(self.model, module)

    # ---------------------------------------------------------------- properties
    @property
    def pad_token_id(self) -> int:
        pad = self.config.pad_token_id
        if pad is None:
            raise PadTokenError("this PIPO model has no pad_token_id in its config")
        return pad

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    # ------------------------------------------------------------ building blocks
    def compress(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, 2L] token ids -> [B, L, H] pair latents."""
        embeds = self.model.embed_tokens(input_ids)
        batch, length, hidden = embeds.shape
        return self.compressor(embeds.reshape(batch, length // 2, 2 * hidden))

    def encode_pairs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compress an even-length batch and run the backbone: final hidden `h` [B, L, H].

        With a cache this is prefill (many pairs) or one decode step (one pair); the
        cache grows by one entry per pair. `attention_mask` is token-level [B, past + 2L].
        """
        if input_ids.shape[-1] % 2:
            raise PIPOError(f"encode_pairs needs an even number of tokens, got {input_ids.shape[-1]}")
        pair_mask = attention_mask[:, 0::2] if attention_mask is not None else None
        out = self.model(
            inputs_embeds=self.compress(input_ids),
            attention_mask=pair_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def mtp_forward(
        self,
        token1_ids: torch.Tensor,
        hidden: torch.Tensor,
        pair_attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MTP head over pair positions: token1 ids [B, n] and backbone hidden [B, n, H] -> `m` [B, n, H].

        Full causal attention over pair positions; with a cache, one step per pair.
        """
        return run_mtp_head(
            self.mtp, self.model, self._mtp_config, token1_ids, hidden, pair_attention_mask, cache, position_ids
        )

    def confidence_logits(self, hidden: torch.Tensor, mtp_hidden: torch.Tensor) -> torch.Tensor:
        """Logit that the drafted token2 would be accepted; `sigmoid` gives the probability."""
        return self.confidence_head(hidden, mtp_hidden)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head in float32, for the few positions inference needs (never a whole training batch)."""
        return self.lm_head(hidden).float()

    def new_cache(self) -> PIPOCache:
        """Empty decoding caches for the backbone and the MTP layer."""
        return PIPOCache(DynamicCache(config=self.config.text_config), DynamicCache(config=self._mtp_config))

    # ------------------------------------------------------------------ training
    def pipo_losses(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mtp_weight: float = 1.0,
        conf_weight: float = 1.0,
        chunk_size: int = 2048,
    ) -> PIPOOutput:
        """SFT losses on a teacher-forced compressed batch (docs/method.md section 4).

        backbone: CE(lm_head(h_i), y_2i+2); MTP fed gold x_2i+2: CE(lm_head(m_i), y_2i+3);
        confidence: BCE(c_i, p_mtp(y_2i+3)) with target, h and m detached. The LM head
        runs chunk by chunk over supervised rows only.
        """
        pad_id = self.pad_token_id
        input_ids, labels, attention_mask = pad_to_even(input_ids, pad_id, labels, attention_mask)
        if labels.shape != input_ids.shape:
            raise PIPOError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        h_prev, mtp_hidden, all_conf_logits = self.pair_states(input_ids, attention_mask)
        weight = self.lm_head.weight

        rows, targets, _ = select_supervised(h_prev, labels[:, 2::2])
        backbone_nll = chunked_token_nll(rows, weight, targets, chunk_size)

        rows2, targets2, mask2 = select_supervised(mtp_hidden, labels[:, 3::2])
        mtp_nll = chunked_token_nll(rows2, weight, targets2, chunk_size)

        terms = assemble_losses(backbone_nll, mtp_nll, all_conf_logits[mask2], torch.exp(-mtp_nll.detach()),
                                backbone_like=h_prev, mtp_like=h_prev, mtp_weight=mtp_weight,
                                conf_weight=conf_weight)
        return PIPOOutput(**vars(terms))

    def pair_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced compressed forward of an even-length batch, for pairs i = 0..L-2.

        Returns backbone `h_i` [B, L-1, H] (predicts token1 x_2i+2), MTP `m_i` fed the gold
        x_2i+2 [B, L-1, H] (predicts token2 x_2i+3) and confidence logits [B, L-1] computed on
        detached `h`, `m` (the head judges, it must not shape the representations). Shared
        by the SFT losses and the OPD trainer, which applies its own divergences.
        """
        check_pad_positions(input_ids, self.pad_token_id, attention_mask)
        hidden = self.encode_pairs(input_ids, attention_mask)
        h_prev = hidden[:, :-1]
        pair_mask = attention_mask[:, 0::2][:, :-1] if attention_mask is not None else None
        mtp_hidden = self.mtp_forward(input_ids[:, 2::2], h_prev, pair_mask)
        return h_prev, mtp_hidden, self.confidence_logits(h_prev.detach(), mtp_hidden.detach())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_pair_states: bool = False,
        mtp_weight: float = 1.0,
        conf_weight: float = 1.0,
        chunk_size: int = 2048,
        **kwargs,
    ) -> PIPOOutput:
        """With `labels`: the SFT losses. With `output_pair_states`: `pair_states` (for OPD).
        Otherwise: token1 logits at every pair position.

        Trainers call the model through `forward` (not `pipo_losses` directly) so DDP and
        DeepSpeed wrappers see a regular forward pass.
        """
        if labels is not None:
            return self.pipo_losses(input_ids, labels, attention_mask, mtp_weight, conf_weight, chunk_size)
        input_ids, _, attention_mask = pad_to_even(input_ids, self.pad_token_id, None, attention_mask)
        if output_pair_states:
            h_prev, mtp_hidden, conf_logits = self.pair_states(input_ids, attention_mask)
            return PIPOOutput(hidden_states=h_prev, mtp_hidden_states=mtp_hidden, confidence_logits=conf_logits)
        check_pad_positions(input_ids, self.pad_token_id, attention_mask)
        hidden = self.encode_pairs(input_ids, attention_mask)
        return PIPOOutput(logits=self.token_logits(hidden), hidden_states=hidden)

    # ----------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a PIPO checkpoint; a regular checkpoint gets a clear error instead of random heads."""
        local = Path(str(pretrained_model_name_or_path))
        if local.is_dir():
            model_type = backbones.read_config_dict(local).get("model_type")
            if model_type != PIPOConfig.model_type:
                raise NotAPIPOCheckpointError(
                    f"{local} is not a PIPO checkpoint (model_type={model_type!r}); convert it with "
                    "PIPOForCausalLM.from_backbone(path)"
                )
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.freeze_lm_head()  # loading replaces the Parameter objects
        return model

    @classmethod
    def from_backbone(
        cls,
        path_or_model: str | Path | PreTrainedModel,
        compressor_type: str = "mlp",
        pad_token_id: int | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        device: str | torch.device | None = None,
    ) -> "PIPOForCausalLM":
        """Convert a regular causal LM (local folder, hub id, or loaded model) into a PIPO model.

        Backbone and LM head weights are copied; the MTP head starts from native `mtp.*`
        weights when the checkpoint has them, else from the backbone's last full-attention
        layer. The pad id comes from the argument, else the checkpoint's tokenizer, else its config.
        The model is built directly on `device` in its final dtype (`dtype`, else the
        checkpoint's, else float32) and only the new heads are initialised: a 4B backbone
        built in fp32 on the CPU, randomly initialised and then cast took minutes.
        """
        from pipo.model.conversion import load_backbone_parts

        parts = load_backbone_parts(path_or_model, pad_token_id=pad_token_id, revision=revision)
        config = PIPOConfig(
            text_config=parts.text_config.to_dict(),
            compressor_type=compressor_type,
            pad_token_id=parts.pad_token_id,
            mtp_init="native" if parts.mtp_state else "last_full_attention",
        )
        config.text_config._attn_implementation = parts.text_config._attn_implementation
        build_dtype = dtype or parts.dtype or torch.float32
        config.dtype = config.text_config.dtype = build_dtype  # AutoModel.from_config builds the backbone in it
        with torch.device(device or "cpu"), local_torch_dtype(build_dtype), no_init_weights():
            model = cls(config)  # parameters allocated, not initialised
        model.load_backbone_state(parts.backbone_state, source=parts.source)
        model.tie_weights()
        model.initialize_new_modules()
        if parts.mtp_state:
            model.load_native_mtp(parts.mtp_state, source=parts.source)
        else:
            model.init_mtp_from_last_full_attention()
        return model

    @torch.no_grad()
    def initialize_new_modules(self) -> None:
        """Initialise what a backbone does not provide (compressor, MTP head, confidence head), as `post_init` would.

        Every backbone module counts as initialised (its weights were just loaded), so
        `initialize_weights` reaches only the PIPO heads; the compressor then gets its
        identity initialisation (`Compressor.reset_parameters`).
        """
        for module in [*self.model.modules(), self.lm_head]:
            module._is_hf_initialized = True
        self.initialize_weights()
        self.compressor.reset_parameters()

    def load_backbone_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy `model.*` and (untied) `lm_head.weight` from a regular checkpoint; fail on missing weights."""
        own = {k: v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(
            {k[len("model.") :]: v for k, v in own.items()}, strict=False
        )
        if missing or unexpected:
            raise PIPOError(f"{source}: backbone weights do not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        if not self.config.tie_word_embeddings:
            if "lm_head.weight" not in state:
                raise PIPOError(f"{source}: untied embeddings but no lm_head.weight in the checkpoint")
            self.lm_head.weight.data.copy_(state["lm_head.weight"])

    def load_native_mtp(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load the checkpoint's native `mtp.*` weights (Qwen3.5 ships them) into the MTP head."""
        missing, unexpected = self.mtp.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PIPOError(
                f"{source}: native mtp.* weights do not fit the PIPO MTP head (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )

    @torch.no_grad()
    def init_mtp_from_last_full_attention(self) -> None:
        """No native MTP: copy the last full-attention layer and the final norm; fc starts as `[I | I]`."""
        last_full = backbones.full_attention_layers(self.config.text_config)[-1]
        self.mtp.layers[0].load_state_dict(self.model.layers[last_full].state_dict())
        self.mtp.norm.load_state_dict(self.model.norm.state_dict())
        hidden = self.config.text_config.hidden_size
        eye = torch.eye(hidden, dtype=self.mtp.fc.weight.dtype, device=self.mtp.fc.weight.device)
        self.mtp.fc.weight.copy_(torch.cat([eye, eye], dim=1))


def is_pipo_checkpoint(path: str | Path) -> bool:
    """True when `path` is a local folder whose config says `model_type: pipo`."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == PIPOConfig.model_type


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` resolve `model_type: pipo` through the public API.

    Runs when this module is imported; before that, `import pipo` has already made the
    Auto classes find these classes by name (`pipo._auto`).
    """
    from transformers import AutoModelForCausalLM

    AutoConfig.register(PIPOConfig.model_type, PIPOConfig, exist_ok=True)
    AutoModelForCausalLM.register(PIPOConfig, PIPOForCausalLM, exist_ok=True)


register_auto_classes()
