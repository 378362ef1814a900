"""A checkpoint shaped like a real one, and what expertflow does with it: tokens and peak memory.

`build` writes random weights with OLMoE-1B-7B's layer shapes (hidden 2048, 64 experts of intermediate 1024
per layer, top-8, 16 heads, vocabulary 50304), a few layers, in bf16 and sharded with an index, as a hub
checkpoint is; the embedded model's tokenizer is copied in (its 8,192 ids are a subset of the vocabulary).
`measure` runs, each in a fresh process so each peak RSS is its own: transformers' own greedy generation at its
default dtype; expertflow at its defaults with every expert resident; expertflow with 25% of the experts
cached on the disk store; and a bare `import torch, transformers` (torch's own footprint). It prints each
run's tokens and peak RSS against the bounds the engine is held to, and ends with one JSON line.

    python tools/real_shape_checkpoint.py build --out results/olmoe-shape --layers 4
    python tools/real_shape_checkpoint.py measure --model results/olmoe-shape
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT_IDS = [[37, 4344, 883, 70, 261, 1975, 292, 2332, 1305, 81, 278, 15]]
MiB = 2**20


def build(out: Path, layers: int, seed: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from expertflow.embedded import EMBEDDED_MODEL_DIR

    if out.exists():
        raise SystemExit(f"{out} exists; choose a new --out")
    config = AutoConfig.for_model(
        "olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=1, eos_token_id=0, bos_token_id=0,
        # Wider than the default 0.02, so random weights give varied tokens and routing rather than one token over
        # and over: a token-for-token comparison then means something.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = out.with_name(out.name + ".partial")
    model.save_pretrained(staging, max_shard_size="1GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, staging / name)
    staging.rename(out)
    return out


def _child(what: str, model: str, new_tokens: int) -> dict:
    """One measured run in this process; its peak RSS is the process's own."""
    import torch

    if what == "reference":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model).eval()  # transformers' default dtype: the checkpoint's
        with torch.no_grad():
            out = hf.generate(torch.tensor(PROMPT_IDS), max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=1, output_logits=True, return_dict_in_generate=True)
        result = {"tokens": out.sequences[0, len(PROMPT_IDS[0]):].tolist(), "dtype": str(hf.dtype),
                  "last_logits_sha256": _digest(out.logits[-1])}
    elif what == "baseline":
        import transformers  # noqa: F401  (torch's and transformers' own footprint, nothing loaded)

        result = {}
    else:
        import expertflow

        budget = {} if what == "all-in-memory" else {"cache_experts": int(what.removeprefix("cache-"))}
        m = expertflow.from_pretrained(model, **budget)
        start = time.perf_counter()
        out = m.generate(input_ids=PROMPT_IDS, max_new_tokens=new_tokens)
        m.close()
        stats = out.stats
        result = {"tokens": out.sequences[0], "last_logits_sha256": _digest(out.last_logits),
                  "dtype": m.config.dtype, "store": m.config.store,
                  "policy": m.config.policy, "seconds": time.perf_counter() - start,
                  "resident_bytes": stats.resident_bytes, "peak_expert_bytes": stats.peak_expert_bytes,
                  "all_expert_bytes": stats.all_expert_bytes, "cache_experts": stats.cache_experts}
    return {**result, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _digest(logits) -> str:
    """A fingerprint of one step's logits, as float32 bytes: equal only if every value is."""
    import hashlib

    import torch

    return hashlib.sha256(logits.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _run_child(what: str, model: Path, new_tokens: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "child", what, str(model), str(new_tokens)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(model: Path, new_tokens: int) -> dict:
    from expertflow.checkpoint import Checkpoint

    checkpoint = Checkpoint(model)
    checkpoint_bytes = sum(checkpoint.extent_of(name).nbytes for name in checkpoint.keys())
    total_experts = json.loads((model / "config.json").read_text())
    total_experts = total_experts["num_experts"] * total_experts["num_hidden_layers"]
    quarter = f"cache-{total_experts // 4}"
    runs = {what: _run_child(what, model, new_tokens) for what in ("baseline", "reference", "all-in-memory", quarter)}
    torch_bytes = runs["baseline"]["peak_rss_bytes"]
    cached = runs[quarter]
    bounds = {
        "all-in-memory": 1.2 * checkpoint_bytes + torch_bytes,
        quarter: cached["resident_bytes"] + cached["peak_expert_bytes"] + torch_bytes + 300 * MiB,
    }
    print(f"{model}: {checkpoint_bytes / MiB:,.0f} MiB of weights; torch + transformers alone: "
          f"{torch_bytes / MiB:,.0f} MiB RSS")
    print(f"{'run':<16}{'dtype':<16}{'store':<7}{'same tokens, logits':<21}{'peak RSS MiB':>13}{'bound MiB':>11}")
    reference = runs["reference"]
    same = {what: (runs[what]["tokens"] == reference["tokens"],
                   runs[what]["last_logits_sha256"] == reference["last_logits_sha256"])
            for what in ("reference", "all-in-memory", quarter)}
    for what in ("reference", "all-in-memory", quarter):
        run = runs[what]
        bound = f"{bounds[what] / MiB:,.0f}" if what in bounds else "-"
        print(f"{what:<16}{run['dtype']:<16}{run.get('store', '-'):<7}{'%s, %s' % same[what]:<21}"
              f"{run['peak_rss_bytes'] / MiB:>13,.0f}{bound:>11}")
    print(f"tokens: {reference['tokens']}")
    result = {"model": str(model), "checkpoint_bytes": checkpoint_bytes, "torch_footprint_bytes": torch_bytes,
              "runs": runs, "bounds": bounds,
              "within_bounds": {what: runs[what]["peak_rss_bytes"] <= bound for what, bound in bounds.items()},
              "tokens_equal": {what: same[what][0] for what in ("all-in-memory", quarter)},
              "last_logits_equal": {what: same[what][1] for what in ("all-in-memory", quarter)}}
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the random real-shape checkpoint")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="tokens and peak RSS of transformers and expertflow on it")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--max-new-tokens", type=int, default=8)
    c = sub.add_parser("child")
    c.add_argument("what")
    c.add_argument("model")
    c.add_argument("new_tokens", type=int)
    args = parser.parse_args()
    if args.command == "build":
        print(f"wrote {build(args.out, args.layers, args.seed)}")
    elif args.command == "measure":
        measure(args.model, args.max_new_tokens)
    else:
        print(json.dumps(_child(args.what, args.model, args.new_tokens)))


if __name__ == "__main__":
    main()
