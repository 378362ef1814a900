"""The bench's PNG figures: throughput vs cache size per batch size, peak memory per system, hit ratio
vs cache size. Each is rendered to bytes and written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from expertflow.outputs import write_atomic

MIB = 2**20


def write_plots(doc: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    paths = []
    for name, draw in (("throughput.png", _throughput), ("memory.png", _memory), ("hit_ratio.png", _hit_ratio)):
        fig = draw(doc)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        write_atomic(out / name, buffer.getvalue())
        paths.append(out / name)
        plt.close(fig)
    return paths


def _series(doc: dict, batch: int, system: str) -> tuple[list[float], list[float], list[float | None]]:
    rows = sorted((r for r in doc["results"] if r["batch_size"] == batch and r["system"] == system),
                  key=lambda r: r["cache_share"])
    return [100 * r["cache_share"] for r in rows], [r["tokens_per_s"] for r in rows], [r["hit_ratio"] for r in rows]


def _ceiling(doc: dict, batch: int) -> list[tuple[float, float]]:
    """Per cache size, the median over engine runs of `belady_ceiling_tokens_per_s` (each run's own routing)."""
    by_share: dict[float, list[float]] = {}
    for r in doc["results"]:
        if r["batch_size"] == batch and r.get("belady_ceiling_tokens_per_s"):
            by_share.setdefault(100 * r["cache_share"], []).append(r["belady_ceiling_tokens_per_s"])
    return [(share, sorted(v)[len(v) // 2]) for share, v in sorted(by_share.items())]


def _batches(doc: dict) -> list[int]:
    return sorted({r["batch_size"] for r in doc["results"]})


def _systems(doc: dict) -> list[str]:
    return list(dict.fromkeys(r["system"] for r in doc["results"]))


def _throughput(doc: dict):
    import matplotlib.pyplot as plt

    batches = _batches(doc)
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for system in _systems(doc):
            shares, speeds, _ = _series(doc, batch, system)
            if system == "all-in-memory" and speeds:
                ax.axhline(speeds[0], color="black", linestyle="--", label="all-in-memory")
            elif speeds:
                ax.plot(shares, speeds, marker="o", label=system)
        ceiling = _ceiling(doc, batch)
        if ceiling:
            ax.plot(*zip(*ceiling), color="grey", linestyle=":", marker="_", label="Belady ceiling")
        ax.set(title=f"batch {batch}", xlabel="cache size (% of experts)", ylabel="tokens/s")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Throughput vs expert cache size")
    fig.tight_layout()
    return fig


def _memory(doc: dict):
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r["batch_size"] == _batches(doc)[0]]
    labels = [r["system"] if r["system"] == "all-in-memory" else f"{r['system']}\n{r['cache_share']:.0%}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["peak_fast_tier_bytes"] / MIB for r in rows], width=0.4, label="peak fast tier")
    ax.bar([x + 0.2 for x in xs], [r["peak_rss_bytes"] / MIB for r in rows], width=0.4, label="peak process RSS")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set(ylabel="MiB", title=f"Peak memory per system (batch {_batches(doc)[0]})")
    ax.legend()
    fig.tight_layout()
    return fig


def _hit_ratio(doc: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in _batches(doc):
        for system in _systems(doc):
            shares, _, hits = _series(doc, batch, system)
            if system != "all-in-memory" and shares and None not in hits:
                ax.plot(shares, hits, marker="o", label=f"{system} b{batch}")
    ax.set(xlabel="cache size (% of experts)", ylabel="hit ratio", title="Expert cache hit ratio", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
