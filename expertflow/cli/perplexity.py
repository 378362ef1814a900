"""`expertflow perplexity`: the model's perplexity on real text through the offloaded engine, then a table and,
with --json, one JSON line."""

from __future__ import annotations

import argparse

from expertflow.api import ExpertflowModel
from expertflow.cli.options import add_engine_options, apply_threads, engine_config
from expertflow.cli.report import print_json_line, print_note, print_table
from expertflow.datasets import NAMED_TEXTS
from expertflow.perplexity import (DEFAULT_DATASET, DEFAULT_MAX_TOKENS, MAX_DEFAULT_CONTEXT, PerplexityConfig,
                                   dataset_texts, score_texts)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "perplexity", help="the model's perplexity on real text (default: held-out xsum documents)",
        description="Perplexity = exp(mean negative log-likelihood) of the text's tokens. The texts are tokenized "
                    "and joined, each after an eos token, into one stream of --max-tokens + 1 tokens, split into "
                    "disjoint windows of --context tokens (stride = window, as lm-eval's rolling loglikelihood and "
                    "HF's perplexity recipe): every token after the first is scored once, from the tokens before it "
                    "in its window. One forward per window through the offloaded model, so a budget and policy "
                    "apply; the logits are transformers' own.")
    add_engine_options(parser)
    parser.add_argument("--dataset", default=DEFAULT_DATASET, metavar="NAME|PATH",
                        help=f"text to score: {', '.join(NAMED_TEXTS)} (each set's own text, no prompt template), or "
                             f"a .jsonl/.txt/.json file (default {DEFAULT_DATASET}: the documents of XSum's test "
                             "split, which no model here was trained on)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                        help=f"tokens scored (default {DEFAULT_MAX_TOKENS}: about 1 s of forwards on the embedded "
                             "model with 2 CPU cores, 6 s with the load)")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help=f"tokens per window (default: the model's context, at most {MAX_DEFAULT_CONTEXT})")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    config = PerplexityConfig(dataset=args.dataset, max_tokens=args.max_tokens, context=args.context)
    texts = dataset_texts(config.dataset)  # before the model loads: a typo should not cost a load
    engine = engine_config(args)
    model = ExpertflowModel(engine)
    print_note(model.budget_note)
    try:
        result = score_texts(model, texts, config, progress=True)
    finally:
        model.close()
    rows = [("model", model.name), ("dataset", config.dataset),
            ("tokens scored", f"{result.tokens} in {result.windows} windows of {result.context}"),
            ("perplexity", f"{result.perplexity:.4f}"), ("mean NLL", f"{result.nll:.4f} nats/token"),
            ("expert loads", f"{result.expert_loads} (hit ratio {result.hit_ratio:.3f})"),
            ("seconds", f"{result.seconds:.2f}")]
    print_table(f"perplexity: {model.name}, {engine.policy}, {engine.dtype}", ("figure", "value"), rows)
    if args.json:
        print_json_line({**result.as_dict(), "dataset": config.dataset, "model": model.name, "dtype": engine.dtype,
                         "policy": engine.policy, "store": engine.store, "cache_experts": model.cache.figures()
                         .capacity_experts})
    return 0
