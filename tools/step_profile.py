"""Where a decode step's time goes, at batch 1: model compute, RPP, planning, waits, copies, other Python.

    python tools/step_profile.py [--model DIR] [--predictor DIR] [--systems all-in-memory,none,lru,expertflow]
        [--cache-experts 26] [--store host|disk] [--prompts 4] [--max-new-tokens 32] [--repeats 2]
        [--tree before=/tmp/ef-before --tree after=.] [--path many|one] [--no-sample]

Each (tree, system) runs in a fresh process with `PYTHONPATH=tree`, so two checkouts compare side by side,
alternating. A process warms up, times `--repeats` runs, then runs once more under py-spy (`pip install
py-spy`; `--no-sample` skips it) and sorts the samples by the frames on each stack (MAIN_RULES): a category's
share of the main thread's samples times the seconds per token gives its ms per token; reader threads and the
scheduling worker are reported in ms of their own thread per token. Systems: `all-in-memory` (transformers
generate), `none` (the engine, every expert resident) and engine policies (`lru`, `expertflow`, ...).
`--model` defaults to the embedded model and `--predictor` to the RPP shipped for it. Prints a table per
tree and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (category, a frame that marks it), first match wins, checked on main-thread stacks (innermost frames last).
# py-spy names a frame `Class.function (path/relative/to/sys.path.py:line)`; each rule is a substring of one.
MAIN_RULES = [
    ("copy on main thread", "_copy (expertflow/cache/expert_cache.py"),  # a layer copies what no reader started
    ("wait for transfer", "_await (expertflow/cache/expert_cache.py"),
    ("worker handoff (submit)", "submit (expertflow/cache/transfers.py"),
    ("planning (policy+planner)", "begin_step (expertflow/cache/expert_cache.py"),
    ("planning (policy+planner)", "route (expertflow/cache/expert_cache.py"),
    ("planning (policy+planner)", "finish_layer (expertflow/cache/expert_cache.py"),
    ("planning (policy+planner)", "batch_forecast (expertflow/cache/policies/"),
    ("cache acquire/release", "acquire (expertflow/cache/expert_cache.py"),
    ("cache acquire/release", "release (expertflow/cache/expert_cache.py"),
    ("RPP (main thread)", "(expertflow/predictor/"),
    ("wait for scheduler", "_wait (expertflow/engine/loop.py"),
    ("expert math", "expert_forward (expertflow/adapters/"),
    ("expert math", "(transformers/integrations/moe.py"),
    ("expert math", "Experts.forward (transformers/"),
    ("expert dispatch (Python)", "(expertflow/cache/offloaded_experts.py"),
    ("rest of model", "ForCausalLM.forward (transformers/"),
]
CATEGORIES = list(dict.fromkeys([c for c, _ in MAIN_RULES] + ["other Python"]))
BACKGROUND = [("copy (reader threads)", "_copy (expertflow/cache/expert_cache.py"),
              ("RPP (worker)", "(expertflow/predictor/"), ("scheduler (worker)", "(expertflow/scheduler/")]
RUN_FRAME = "timed_run (step_profile.py"


def stale_rules(tree: Path) -> list[str]:
    """The rules' frames naming a file, folder or function that `tree`'s expertflow does not have: their samples
    would fall to a later rule or to "other Python"."""
    stale = []
    for frame in dict.fromkeys(frame for _, frame in MAIN_RULES + BACKGROUND):
        function, _, path = frame.rpartition("(")
        if not path.startswith("expertflow/"):
            continue
        target = tree / path
        files = [target] if target.is_file() else sorted(target.rglob("*.py")) if target.is_dir() else []
        name = function.strip().rsplit(".", 1)[-1]
        if not files or (name and not any(re.search(rf"def {re.escape(name)}\b", f.read_text()) for f in files)):
            stale.append(frame)
    return stale


def classify(stack: str, rules: list[tuple[str, str]]) -> str | None:
    return next((category for category, frame in rules if frame in stack), None)


def tally(raw: str) -> tuple[collections.Counter, collections.Counter, int]:
    """py-spy raw lines `thread (id): name;frame;...;frame N` -> main-thread category samples (inside the
    profiled run), background-thread category samples, and the main thread's sample count."""
    main, background, total = collections.Counter(), collections.Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        if "MainThread" in stack.split(";", 1)[0]:
            if RUN_FRAME in stack:
                main[classify(stack, MAIN_RULES) or "other Python"] += n
                total += n
        elif (category := classify(stack, BACKGROUND)) is not None:
            background[category] += n
    return main, background, total


class Sampler:
    """py-spy recording this process while the `with` block runs (raw output, every thread, idle included)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.out = Path(tempfile.mkstemp(suffix=".txt")[1])

    def __enter__(self) -> "Sampler":
        self.proc = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--nonblocking", "--idle",
                                      "--threads", "-r", str(self.rate), "-f", "raw", "-o", str(self.out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # py-spy attaches
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self.raw = self.out.read_text()
        self.out.unlink()


# ---- one system in this process -------------------------------------------------------------------------
def load_system(spec: dict):
    """A callable decoding every prompt once -> (sequences, cache figures delta or None)."""
    import torch

    torch.set_num_threads(1)
    if spec["system"] == "all-in-memory":
        return hf_runner(spec)
    from expertflow.api import ExpertflowModel
    from expertflow.config import EngineConfig

    budget = {} if spec["system"] == "none" else {"cache_experts": spec["cache_experts"]}
    predictor = spec["predictor"] if spec["system"] == "expertflow" else None
    model = ExpertflowModel(EngineConfig(model=spec["model"], policy=spec["system"], store=spec["store"],
                                         predictor=predictor, io_threads=spec["io_threads"], **budget))
    return engine_runner(model, spec)


def engine_runner(model, spec: dict):
    prompts, new = spec["prompts"], spec["max_new_tokens"]

    def run():
        if spec["path"] == "many":
            out = model.generate_many(input_ids=prompts, batch_size=1, scheduler="swap", max_new_tokens=new)
            return out.sequences, out.stats
        outs = [model.generate(input_ids=[p], max_new_tokens=new) for p in prompts]
        return [s for o in outs for s in o.sequences], [o.stats for o in outs]

    model.generate(input_ids=prompts[:1], max_new_tokens=2)
    return run


def hf_runner(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    eos = model.config.eos_token_id

    def run():
        sequences = []
        for prompt in spec["prompts"]:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["max_new_tokens"],
                                 do_sample=False, pad_token_id=model.config.pad_token_id)
            new = out[0, len(prompt):].tolist()
            sequences.append(new[: new.index(eos) + 1] if eos in new else new)
        return sequences, None

    run()
    return run


def figures(stats) -> dict:
    """Counts and the engine's own timers from a run's stats (a list of them for `--path one`)."""
    if stats is None:
        return {}
    items = stats if isinstance(stats, list) else [stats]
    total = lambda name: sum(getattr(s, name, 0) for s in items)  # noqa: E731
    return {"hits": total("hits"), "misses": total("correction_loads"), "loads": total("expert_loads"),
            "transfer_wait_s": total("transfer_wait_seconds")}


def timed_run(run) -> tuple[float, list, object]:
    start = time.perf_counter()
    sequences, stats = run()
    return time.perf_counter() - start, sequences, stats


def worker(spec: dict) -> dict:
    import expertflow

    run = load_system(spec)
    times, counts = [], []
    for _ in range(spec["repeats"]):
        seconds, sequences, stats = timed_run(run)
        times.append(seconds)
        counts.append(figures(stats))
    result = {"expertflow_file": expertflow.__file__, "seconds": times, "counts": counts,
              "tokens": sum(map(len, sequences)), "sequences": sequences}
    if spec["sample"]:
        with Sampler(spec["rate"]) as sampler:
            sampled_seconds, _, _ = timed_run(run)
        main, background, total = tally(sampler.raw)
        result.update(main_samples=dict(main), background_samples=dict(background), main_total=total,
                      sampled_seconds=sampled_seconds)
    return result


# ---- the sweep ------------------------------------------------------------------------------------------
def launch(tree: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({spec['system']} in {tree}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def breakdown(result: dict) -> dict:
    """ms per generated token: total (median of the timed runs) and each category's share of it."""
    times = sorted(result["seconds"])
    ms_per_token = 1000 * times[len(times) // 2] / result["tokens"]
    row = {"ms_per_token": ms_per_token, "tokens_per_s": 1000 / ms_per_token}
    total = result.get("main_total", 0)
    if total:
        row.update({c: ms_per_token * result["main_samples"].get(c, 0) / total for c in CATEGORIES})
        hz = total / result["sampled_seconds"]  # the rate py-spy achieved on the main thread
        row.update({c: 1000 * n / hz / result["tokens"] for c, n in result["background_samples"].items()})
    return row


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def trees_of(args: argparse.Namespace) -> dict[str, str]:
    return dict(t.split("=", 1) for t in args.tree) if args.tree else {"tree": "."}


def sweep(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    trees = trees_of(args)
    results: dict = {name: collections.defaultdict(list) for name in trees}
    loads = [load_average()]
    for _ in range(args.rounds):
        for name, tree in trees.items():
            for system in args.systems.split(","):
                spec = {"system": system, "model": str(Path(args.model).resolve()), "prompts": prompts,
                        "predictor": str(Path(args.predictor).resolve()) if args.predictor else None,
                        "cache_experts": args.cache_experts, "store": args.store, "io_threads": args.io_threads,
                        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "path": args.path,
                        "sample": not args.no_sample, "rate": args.rate}
                results[name][system].append(launch(Path(tree).resolve(), spec))
                loads.append(load_average())
    return {"trees": trees, "results": results, "load_average": loads}


def merged(runs: list[dict]) -> dict:
    """One system's rounds as one result: every timed run, the samples summed."""
    out = {"seconds": [s for r in runs for s in r["seconds"]], "tokens": runs[0]["tokens"],
           "counts": runs[0]["counts"][0],  # the first timed run's: later ones start from a warm cache
           "sequences": runs[0]["sequences"], "main_total": sum(r.get("main_total", 0) for r in runs),
           "sampled_seconds": sum(r.get("sampled_seconds", 0) for r in runs)}
    for key in ("main_samples", "background_samples"):
        summed = collections.Counter()
        for r in runs:
            summed.update(r.get(key, {}))
        out[key] = dict(summed)
    return out


def report(doc: dict) -> dict:
    summary = {}
    for name, systems in doc["results"].items():
        rows = {system: {**breakdown(merged(runs)), **merged(runs)["counts"]} for system, runs in systems.items()}
        reference = rows.get("all-in-memory", {}).get("tokens_per_s")
        for row in rows.values():
            row["vs_all_in_memory"] = row["tokens_per_s"] / reference if reference else None
        summary[name] = rows
        print_table(name, rows)
    check_tokens(doc)
    return summary


def print_table(name: str, rows: dict) -> None:
    columns = ["ms_per_token", "tokens_per_s", "vs_all_in_memory", *CATEGORIES,
               *[c for c, _ in BACKGROUND], "loads", "hits", "transfer_wait_s"]
    systems = list(rows)
    print(f"\n## {name}  (ms per generated token unless named)\n")
    print("| figure | " + " | ".join(systems) + " |")
    print("|---|" + "---|" * len(systems))
    for column in columns:
        cells = [rows[s].get(column) for s in systems]
        if all(c is None for c in cells):  # a category no system sampled (or --no-sample)
            continue
        print(f"| {column} | " + " | ".join("" if c is None else f"{c:.2f}" if isinstance(c, float) else str(c)
                                             for c in cells) + " |")


def check_tokens(doc: dict) -> None:
    """Same tokens everywhere, and each system's first-run counts (hits, loads) equal in every tree."""
    sequences = [runs[0]["sequences"] for systems in doc["results"].values() for runs in systems.values()]
    same = all(s == sequences[0] for s in sequences)
    counts = collections.defaultdict(list)
    for systems in doc["results"].values():
        for system, runs in systems.items():
            counts[system] += [{k: v for k, v in r["counts"][0].items() if k != "transfer_wait_s"} for r in runs]
    same_counts = all(all(c == cs[0] for c in cs) for cs in counts.values())
    print(f"\nsame tokens in every tree and system: {same}; same first-run hits and loads in every tree and "
          f"round: {same_counts}; load average during the run: {doc['load_average'][0]} ... {doc['load_average'][-1]}")


def prompt_ids(args: argparse.Namespace) -> list[list[int]]:
    from transformers import AutoTokenizer

    from expertflow.datasets import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    return [list(tokenizer(p)["input_ids"]) for p in load_prompts(args.dataset, limit=args.prompts)]


def parse_args() -> argparse.Namespace:
    from expertflow.embedded import EMBEDDED_MODEL_DIR  # here, not at the top: a worker imports its own tree's

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    p.add_argument("--predictor", default=None, help="RPP directory for `expertflow` (default: the one shipped "
                                                     "for the model)")
    p.add_argument("--systems", default="all-in-memory,none,lru,expertflow")
    p.add_argument("--cache-experts", type=int, default=26)
    p.add_argument("--store", default="host", choices=["host", "disk"])
    p.add_argument("--io-threads", type=int, default=1)
    p.add_argument("--dataset", default="alpaca")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per process")
    p.add_argument("--rounds", type=int, default=1, help="processes per (tree, system), interleaved")
    p.add_argument("--path", default="many", choices=["many", "one"],
                   help="many: generate_many at batch 1, swap scheduler (as the bench's engine systems); "
                        "one: generate per prompt")
    p.add_argument("--tree", action="append", help="NAME=DIR of an expertflow checkout (repeatable)")
    p.add_argument("--no-sample", action="store_true", help="timings only, no py-spy breakdown")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    return p.parse_args()


def main() -> None:
    if "--worker" in sys.argv:
        sys.stdout.write(json.dumps(worker(json.loads(sys.stdin.read()))) + "\n")
        return
    args = parse_args()
    if not args.no_sample and shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: `pip install py-spy`, or run with --no-sample")
    for name, tree in trees_of(args).items():
        if stale := stale_rules(Path(tree)):
            print(f"warning: {name} ({tree}) has no code for these frames, so their samples count further down "
                  f"the rules: {', '.join(stale)}", file=sys.stderr)
    doc = sweep(args, prompt_ids(args))
    summary = report(doc)
    print(json.dumps({"summary": summary, "load_average": doc["load_average"], "trees": doc["trees"],
                      "args": vars(args)}))


if __name__ == "__main__":
    main()
