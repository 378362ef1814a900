"""Does the disk serve several expert reads at once faster than one after another?

Reads a checkpoint's experts through `DiskStore` with the page cache bypassed, by three methods: `placed`
(O_DIRECT straight into slots laid out as the engine's cache lays them), `direct` (O_DIRECT through a bounce
buffer) and `buffered` (pread, then posix_fadvise DONTNEED), from 1, 2, 4, 8 threads at once, each reading its
own experts. Every pass drops the checkpoint's page cache first. Prints MB/s, wall time per expert and each
read's median latency (median pass of `--repeats`), then one JSON line.

    python tools/disk_reads.py --model DIR [--threads 1,2,4,8] [--experts 48] [--repeats 3]
                               [--methods placed,direct,buffered]

DIR is any checkpoint expertflow loads; with the embedded model's small experts, a widened copy gives reads of
a realistic size: `expertflow widen --intermediate-size 4096 --out results/widened/tiny-mixtral-32e-i4096`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the box is shared; the reads need no torch threads

import torch  # noqa: E402  (after the thread setting, which torch reads at import)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from expertflow.adapters import adapter_for  # noqa: E402
from expertflow.cache.stores import DiskStore, Key  # noqa: E402
from expertflow.checkpoint import Checkpoint  # noqa: E402
from expertflow.config import EngineConfig  # noqa: E402
from expertflow.loading import read_config  # noqa: E402

METHODS = ("placed", "direct", "buffered")


def _label(row: dict) -> str:
    if not row["reads"].startswith("O_DIRECT"):
        return "buffered + DONTNEED"
    return "O_DIRECT into the slot" if row["placed"] else "O_DIRECT via bounce"


def open_store(model_dir: Path, direct_io: bool = True) -> DiskStore:
    config = EngineConfig(model=model_dir)
    adapter = adapter_for(read_config(config))
    checkpoint = Checkpoint(config.model)
    layers = sorted({int(k.split(".")[2]) for k in checkpoint.keys() if adapter.is_expert_tensor(k)})
    return DiskStore(checkpoint, adapter, layers, torch.float32, page_cache=False, direct_io=direct_io)


def drop_page_cache(store: DiskStore) -> None:
    """Flush and drop every checkpoint file from the page cache, so no read of the pass is served from RAM."""
    for path in {e.path for extents in store.extents.values() for e in extents}:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages (a freshly written checkpoint) are not dropped by DONTNEED
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_concurrently(store: DiskStore, keys: list[Key], threads: int, placed: bool) -> dict:
    """Thread i reads keys[i::threads], one after another, into its own slot (`placed`: laid out by the
    store's `place`, as the engine's cache does; else a plain buffer); all threads start together."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def reader(own: list[Key]) -> None:
        slot = torch.zeros(store.slot_bytes(torch.device("cpu")), dtype=torch.uint8)
        plain = torch.zeros(store.numel, dtype=store.dtype)
        start.wait()
        for key in own:
            began = time.perf_counter()
            store.read_into(key, store.place(key, slot) if placed else plain)
            with lock:
                latencies.append(1e3 * (time.perf_counter() - began))

    workers = [threading.Thread(target=reader, args=(keys[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began, cpu_began = time.perf_counter(), time.process_time()
    for w in workers:
        w.join()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    return {"reads": store.read_method, "placed": placed, "threads": threads, "experts": len(keys), "wall_s": wall,
            "mb_per_s": len(keys) * store.expert_bytes / wall / 1e6,
            "wall_ms_per_expert": 1e3 * wall / len(keys),
            "cpu_ms_per_expert": 1e3 * cpu / len(keys),  # this process's CPU (kernel copy included): is it CPU-bound?
            "read_ms_median": statistics.median(latencies)}


def sweep(stores: dict[str, DiskStore], thread_counts: list[int], per_pass: int, repeats: int) -> list[dict]:
    """Every (repeat, method, threads) pass reads experts no earlier pass of the same repeat read, in random
    order; the passes of one repeat alternate methods and thread counts, so the disk's drift (large here:
    a host-backed virtual disk) favours none of them."""
    combos = [(m, t) for m in stores for t in thread_counts]
    total = len(next(iter(stores.values())).keys)
    if per_pass * len(combos) > total:
        raise SystemExit(f"{per_pass} experts x {len(combos)} passes exceeds the {total} experts")
    passes: dict[tuple[str, int], list[dict]] = {c: [] for c in combos}
    for r in range(repeats):
        keys_in_order = next(iter(stores.values())).keys
        random.Random(r).shuffle(keys_in_order)  # the engine fetches scattered experts, not file order
        for i, (method, threads) in enumerate(combos if r % 2 == 0 else combos[::-1]):
            keys = keys_in_order[i * per_pass : (i + 1) * per_pass]
            drop_page_cache(stores[method])
            passes[(method, threads)].append(read_concurrently(stores[method], keys, threads, method == "placed"))
    return [min(runs, key=lambda p: abs(p["mb_per_s"] - statistics.median(q["mb_per_s"] for q in runs)))
            for runs in passes.values()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--experts", type=int, default=48, help="experts read per pass (split over the threads)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="placed,direct,buffered",
                   help="placed (O_DIRECT into the slot), direct (O_DIRECT via a bounce buffer), buffered (+ DONTNEED)")
    args = p.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    stores = {m: open_store(args.model, direct_io=m != "buffered") for m in methods}
    expert_bytes = stores[methods[0]].expert_bytes
    try:
        rows = sweep(stores, [int(t) for t in args.threads.split(",")], args.experts, args.repeats)
    finally:
        for store in stores.values():
            store.close()
    base = rows[0]["mb_per_s"]
    table = Table("reads", "threads", "MB/s", "vs first row", "wall ms / expert", "CPU ms / expert", "read ms (median)",
                  title=f"{args.experts} expert reads of {expert_bytes / 2**20:.1f} MiB, page cache dropped, "
                        f"median of {args.repeats} passes; load average {os.getloadavg()[0]:.1f}")
    for r in rows:
        table.add_row(_label(r), str(r["threads"]), f"{r['mb_per_s']:.0f}", f"{r['mb_per_s'] / base:.2f}x",
                      f"{r['wall_ms_per_expert']:.2f}", f"{r['cpu_ms_per_expert']:.2f}", f"{r['read_ms_median']:.2f}")
    Console().print(table)
    print(json.dumps({"model": str(args.model), "expert_bytes": expert_bytes, "experts_per_pass": args.experts,
                      "repeats": args.repeats, "load_average": os.getloadavg(), "results": rows}))


if __name__ == "__main__":
    main()
