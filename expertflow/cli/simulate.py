"""`expertflow simulate`: replay routing traces through every cache policy; table, JSON line, plot."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from expertflow.cli.options import (add_model_option, add_policy_setting_options, add_sweep_options,
                                    add_threads_option, apply_threads, comma_list)
from expertflow.cli.report import print_json_line, print_table
from expertflow.config import human_bytes
from expertflow.embedded import EMBEDDED_MODEL_NAME, EMBEDDED_PREDICTOR_DIR, shipped_predictor_for
from expertflow.errors import ExpertflowError
from expertflow.hub import resolve_model
from expertflow.outputs import check_output_file, write_atomic
from expertflow.cache.policies import POLICIES, POLICY_NAMES, cli_settings, policy_class, policy_settings
from expertflow.cache.policies.resident import AllResidentPolicy
from expertflow.simulator import SimResult, sweep
from expertflow.traces import TraceSet, read_traces

DEFAULT_POLICIES = "lru,lfu,ring,pregated,expertflow,belady"  # rows report the names given: `expertflow` is plec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="replay routing traces through cache policies")
    p.add_argument("--traces", required=True, type=Path, help="trace file from expertflow trace")
    p.add_argument("--policies", type=comma_list("--policies"), default=DEFAULT_POLICIES, metavar="NAME[,NAME...]",
                   help=f"comma-separated, from every policy but all-resident (default {DEFAULT_POLICIES})")
    add_sweep_options(p, batch_size="1", cache_experts="10%,25%,50%")
    p.add_argument("--predictor", default=None,
                   help="RPP directory for policy plec (expertflow) (default for traces of the embedded model: "
                   "its shipped RPP); or 'oracle' (the true routing: an upper bound) or 'tlp' (the previous "
                   "token's routing)")
    p.add_argument("--transfer-ratio", type=float, default=None, metavar="X",
                   help="expert loads that fit in one layer's compute (default: measured on this machine)")
    add_policy_setting_options(p)
    add_model_option(p, role="the traced model (its expert size; the transfer ratio is measured on it), a ")
    p.add_argument("--include-prefill", action="store_true", help="count prefill forwards too (always replayed)")
    add_threads_option(p)  # the predictor's and the measurement's
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="hit ratio vs cache size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        check_output_file(args.plot, args.overwrite, "--plot")  # before the replay, not after
    policies = _policies(args.policies)
    traces = read_traces(args.traces)
    _traces_ok(traces)
    model = resolve_model(args.model) if args.model is not None else None
    h = traces.header
    caches = [_cache_size(text, h.num_layers * h.num_experts) for text in args.cache_experts]
    batches = list(args.batch_size)
    settings = _settings(cli_settings(args.prefetch_threshold, args.policy_setting), policies)
    if any(policy_class(name).uses_forecast for name in policies) and args.predictor is None:
        args.predictor = _embedded_predictor(traces, model)
    apply_threads(args.threads)
    from expertflow.calibrate import expert_bytes, measure_transfer_ratio, predictions_for

    predictions = predictions_for(traces, args.predictor) if args.predictor else None
    ratio = args.transfer_ratio if args.transfer_ratio is not None else measure_transfer_ratio(model)
    start = time.perf_counter()
    results = sweep(traces, policies, caches, batches, ratio, predictions, args.include_prefill, settings)
    size = expert_bytes(model)
    title = (f"{args.traces.name}: {len(traces.sequences)} sequences, transfer ratio {ratio:.2f} loads/layer, "
             f"predictor {args.predictor or '-'}, {time.perf_counter() - start:.1f} s")
    print_table(title, ("policy", "cache", "batch", "hit ratio", "loads", "correction loads", "prefetch used", "wasted",
                        "stale", "re-loads", "bytes moved", "loads/belady"), [_row(r, size) for r in results])
    if args.plot is not None:
        _plot(results, args.plot, title)
    if args.json:
        print_json_line({"results": [_json(r, size) for r in results]})
    return 0


def _settings(settings: dict[str, float], policies: list[str]) -> dict[str, dict[str, float]]:
    """--prefetch-threshold / --policy-setting as the settings of each policy that has them (PLEC, by whichever
    name it was given), checked now (one line, before any replay)."""
    if not settings:
        return {}
    tunable = [name for name in policies if policy_class(name).settings_class is not None]
    if not tunable:
        raise ExpertflowError("--prefetch-threshold and --policy-setting apply to policy plec (or expertflow); "
                              "add it to --policies")
    for name in tunable:
        policy_settings(name, settings)
    return {name: settings for name in tunable}


def _embedded_predictor(traces: TraceSet, model: Path | None) -> str:
    """Traces of the embedded model (or, with --model, of a widened copy of it) plan from the RPP shipped with it,
    as `generate` does; others must say."""
    if model is not None:
        shipped = shipped_predictor_for(model)
    else:
        shipped = EMBEDDED_PREDICTOR_DIR if traces.header.model == EMBEDDED_MODEL_NAME else None
    if shipped is not None:
        return str(shipped)
    raise ExpertflowError("policy expertflow plans from a routing predictor; pass --predictor DIR "
                          "(or --predictor oracle for the upper bound)")


def _policies(names: tuple[str, ...]) -> list[str]:
    """The policies to replay, by any of their names; all-resident (none) keeps every expert: nothing to replay."""
    unknown = [n for n in names if n not in POLICY_NAMES or policy_class(n) is AllResidentPolicy]
    if unknown:
        replayable = ", ".join(name for name, cls in POLICIES.items() if cls is not AllResidentPolicy)
        raise ExpertflowError(f"unknown policy {unknown[0]!r} for simulate; choose from {replayable} "
                              "(expertflow is plec)")
    return list(names)


def _cache_size(text: str, total: int) -> int:
    """'26' slots, or '10%' of all experts (rounded); checked by the option's parser."""
    if text.endswith("%"):
        return max(1, round(float(text[:-1]) / 100 * total))
    return int(text)


def _row(r: SimResult, expert_bytes: int) -> list[str]:
    c = r.counters
    return [r.config.policy, str(r.config.cache_experts), str(r.config.batch_size), f"{c.hit_ratio:.3f}",
            str(c.loads), str(c.correction_loads), str(c.prefetch_hits), str(c.wasted_prefetches),
            str(c.stale_prefetches), str(c.reloads), human_bytes(c.loads * expert_bytes), f"{r.loads_vs_belady:.2f}"]


def _json(r: SimResult, expert_bytes: int) -> dict:
    """The contract's fields first, then where the loads went (see CacheCounters)."""
    c = r.counters
    return {"policy": r.config.policy, "cache_experts": r.config.cache_experts, "batch_size": r.config.batch_size,
            "hit_ratio": c.hit_ratio, "loads": c.loads, "bytes_moved": c.loads * expert_bytes,
            "loads_vs_belady": r.loads_vs_belady, "correction_loads": c.correction_loads,
            "demand_loads": c.correction_loads,  # the old name, for scripts that read it
            "prefetch_loads": c.prefetch_loads,
            "prefetch_hits": c.prefetch_hits, "wasted_prefetches": c.wasted_prefetches,
            "stale_prefetches": c.stale_prefetches, "reloads": c.reloads}


def _plot(results: list[SimResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.config.batch_size for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for policy in dict.fromkeys(r.config.policy for r in results):
            points = sorted((r.config.cache_experts, r.counters.hit_ratio) for r in results
                            if r.config.policy == policy and r.config.batch_size == batch)
            ax.plot(*zip(*points), marker="o", label=policy)
        ax.set(title=f"batch {batch}", xlabel="cache (experts)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit ratio")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix[1:] or "png", dpi=120)  # rendered first, so the file appears whole
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def _traces_ok(traces: TraceSet) -> None:
    if not traces.sequences:
        raise ExpertflowError("the trace file holds no sequences")
