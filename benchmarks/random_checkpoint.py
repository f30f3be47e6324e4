"""Write a random-weight Qwen3.5-shaped backbone and its PIPO conversion, for load tests on a GPU.

The test checkpoints (`make_tiny_backbone`) are so small that every step is host overhead; this
one has real layer shapes (head_dim 256, 128-wide linear-attention heads, every 4th layer full
attention) so a step costs GPU time, and the tiny trained tokenizer with the chat template so
`pipo serve` can run it. Writes `OUT/backbone` and `OUT/pipo`.

    python benchmarks/random_checkpoint.py --out /tmp/ckpt --hidden 1024 --layers 24
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

from pipo.model.modeling import PIPOForCausalLM
from pipo.model.tiny import add_tensors, default_corpus, native_mtp_state, train_tokenizer


def qwen35_config(vocab: int, pad: int, eos: int, hidden: int, layers: int) -> Qwen3_5TextConfig:
    """Qwen3.5 layer shapes at a chosen width and depth (heads scale with the width)."""
    heads = hidden // 128
    return Qwen3_5TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(3.5 * hidden), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=256,
        linear_num_key_heads=heads, linear_num_value_heads=2 * heads, linear_key_head_dim=128,
        linear_value_head_dim=128,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        tie_word_embeddings=True, pad_token_id=pad, eos_token_id=eos, max_position_embeddings=32768,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    tokenizer = train_tokenizer(default_corpus(seed=args.seed))
    config = qwen35_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, args.hidden, args.layers)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "backbone")
    tokenizer.save_pretrained(out / "backbone")
    add_tensors(out / "backbone", native_mtp_state(model, config, args.seed))
    PIPOForCausalLM.from_backbone(str(out / "backbone")).save_pretrained(out / "pipo")
    tokenizer.save_pretrained(out / "pipo")
    print(f"wrote {out}/backbone and {out}/pipo ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")


if __name__ == "__main__":
    main()
