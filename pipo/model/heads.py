"""The three modules PIPO adds to a backbone: compressor, MTP head, confidence head (docs/method.md section 2)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Plain RMSNorm (`x / rms(x) * w`, w initialised to ones) for the confidence head."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class Compressor(nn.Module):
    """Folds each pair of token embeddings `[e_2i ; e_2i+1]` into one latent `z_i`.

    `linear`: Linear(2H->H) initialised to `[I | I]`, so `z = e_a + e_b` at the start.
    `mlp`: Linear(2H->2H) -> SiLU -> Linear(2H->H), first layer identity, second `[I | I]`,
    so `z = silu(e_a) + silu(e_b)` at the start (docs/method.md section 2, taken literally).
    """

    def __init__(self, hidden_size: int, compressor_type: str) -> None:
        super().__init__()
        self.compressor_type = compressor_type
        h = hidden_size
        if compressor_type == "linear":
            self.proj = nn.Linear(2 * h, h, bias=True)
        else:
            self.up = nn.Linear(2 * h, 2 * h, bias=True)
            self.act = nn.SiLU()
            self.proj = nn.Linear(2 * h, h, bias=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        h = self.proj.out_features
        eye = torch.eye(h, dtype=self.proj.weight.dtype, device=self.proj.weight.device)
        self.proj.weight.copy_(torch.cat([eye, eye], dim=1))
        self.proj.bias.zero_()
        if self.compressor_type == "mlp":
            self.up.weight.copy_(torch.eye(2 * h, dtype=self.up.weight.dtype, device=self.up.weight.device))
            self.up.bias.zero_()

    def forward(self, pair_embeds: torch.Tensor) -> torch.Tensor:
        """`pair_embeds`: [B, L, 2H] (the two embeddings of each pair concatenated) -> [B, L, H]."""
        if self.compressor_type == "mlp":
            pair_embeds = self.act(self.up(pair_embeds))
        return self.proj(pair_embeds)


class MTPHead(nn.Module):
    """`m_i = norm(Layer(fc([norm_e(embed(x_2i+2)) ; norm_h(h_i)])))`.

    Parameter names match the native Qwen3.5 `mtp.*` checkpoint keys (`fc`,
    `pre_fc_norm_embedding`, `pre_fc_norm_hidden`, `layers.0`, `norm`) so native
    weights load by name. Norms use the backbone's own RMSNorm class (Qwen3.5's is
    zero-centred), and the layer is the backbone's full-attention decoder layer.
    """

    def __init__(self, hidden_size: int, norm_factory, layer: nn.Module) -> None:
        super().__init__()
        self.pre_fc_norm_embedding = norm_factory()
        self.pre_fc_norm_hidden = norm_factory()
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.layers = nn.ModuleList([layer])
        self.norm = norm_factory()

    def fuse_inputs(self, token_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's input: fc over the normalised token embedding and backbone hidden."""
        fused = torch.cat([self.pre_fc_norm_embedding(token_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
        return self.fc(fused)


class ConfidenceHead(nn.Module):
    """`RMSNorm(2H) -> Linear(2H->H) -> SiLU -> Linear(H->1)` on `[h_i ; m_i]`: a logit that token2 is accepted."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(2 * hidden_size, eps)
        self.fc1 = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor, mtp_hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(torch.cat([hidden, mtp_hidden], dim=-1))
        return self.fc2(self.act(self.fc1(x))).squeeze(-1)
