"""Build a tiny random Switch Transformers model with 32 experts, for routing traces on real prompts.

Switch-base's shape scaled down: 6 encoder + 6 decoder blocks, every other one sparse (3 + 3 MoE layers),
32 experts, top-1, expert capacity 64, with the embedded tiny-mixtral-32e's BPE-8192 tokenizer so real
WMT16 / XSum prompts can be fed to it. Its weights are random (transformers' init), so its routing is
untrained: figures from it show the machinery, not what a trained Switch-32 would give.

    python tools/tiny_switch32.py --out results/sw32/model
    expertflow trace --model results/sw32/model --dataset wmt16 --samples 64 --out results/sw32/wmt16.safetensors
    expertflow simulate --traces results/sw32/wmt16.safetensors --model results/sw32/model ...
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from expertflow.embedded import EMBEDDED_MODEL_DIR


def build(out: Path, seed: int) -> Path:
    config = AutoConfig.for_model(
        "switch_transformers", vocab_size=8192, d_model=64, d_kv=16, d_ff=128, num_heads=4,
        num_layers=6, num_decoder_layers=6, num_sparse_encoder_layers=3, num_sparse_decoder_layers=3,
        num_experts=32, expert_capacity=64, pad_token_id=1, eos_token_id=0, decoder_start_token_id=1,
        # An untied head: with tied embeddings a random decoder mostly repeats its input token.
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    AutoModelForSeq2SeqLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {build(args.out, args.seed)}")


if __name__ == "__main__":
    main()
