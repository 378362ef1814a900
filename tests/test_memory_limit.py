"""The bench's OS-enforced memory budget: cgroup discovery and protocol on a fake hierarchy, a real limit
reclaiming page cache where this machine allows one, and accelerate run under it with exact tokens."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from expertflow.bench.harness import measure
from expertflow.bench.hf import WORKING_HEADROOM, bounded_limit
from expertflow.bench.memory_limit import MiB, MemoryLimit, drop_cached
from expertflow.bench.spec import RunSpec


def _fake_v1(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    (root / "memory" / "jobs" / "mine").mkdir(parents=True)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/jobs/mine\n0::/\n")
    return root, proc


def test_joins_a_child_of_its_own_v1_group_with_the_limit_and_moves_back(tmp_path: Path) -> None:
    root, proc = _fake_v1(tmp_path)
    own = root / "memory" / "jobs" / "mine"
    with MemoryLimit(300 * MiB, root=root, proc_cgroup=proc, name="run") as held:
        group = own / "run"
        assert held.bounded
        assert (group / "memory.limit_in_bytes").read_text() == str(300 * MiB)
        assert (group / "cgroup.procs").read_text() == str(os.getpid())
        assert held.method == "cgroup v1 memory.limit_in_bytes = 300 MiB, page cache included"
        (group / "memory.max_usage_in_bytes").write_text(str(123 * MiB))
    assert (own / "cgroup.procs").read_text() == str(os.getpid())  # back in its own group
    assert held.bounded and held.peak_bytes() == 123 * MiB         # the peak outlives the group


def test_a_v2_only_process_caps_memory_max(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "unified" / "jobs" / "mine").mkdir(parents=True)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/jobs/mine\n")
    with MemoryLimit(64 * MiB, root=root, proc_cgroup=proc, name="run") as held:
        assert (root / "unified" / "jobs" / "mine" / "run" / "memory.max").read_text() == str(64 * MiB)
    assert held.method == "cgroup v2 memory.max = 64 MiB, page cache included"


def test_without_a_writable_memory_hierarchy_the_run_is_unbounded_and_says_why(tmp_path: Path) -> None:
    root, proc = _fake_v1(tmp_path)
    proc.write_text("9:name=systemd:/\n")
    with MemoryLimit(MiB, root=root, proc_cgroup=proc) as held:
        assert not held.bounded and held.peak_bytes() is None
    assert held.method == "unbounded: no memory cgroup hierarchy"

    proc.write_text("4:memory:/not/there\n")
    with MemoryLimit(MiB, root=root, proc_cgroup=proc) as held:
        assert not held.bounded
    assert held.method.startswith("unbounded: cgroup v1: cannot create a group (")

    with MemoryLimit(MiB, root=root, proc_cgroup=tmp_path / "missing") as held:
        assert not held.bounded
    assert held.method.startswith(f"unbounded: cannot read {tmp_path / 'missing'}")

    with pytest.raises(ValueError, match="must be positive"):
        MemoryLimit(0)


def test_limit_covers_the_unplaced_budget_the_running_module_and_working_memory() -> None:
    assert bounded_limit(budget=400, placed=150, largest_offloaded=90) == 250 + 90 + WORKING_HEADROOM
    # A device map that placed more than the budget leaves no page cache beyond the running module.
    assert bounded_limit(budget=100, placed=150, largest_offloaded=90) == 90 + WORKING_HEADROOM


def _bounded_here() -> bool:
    with MemoryLimit(512 * MiB) as held:
        return held.bounded


def test_a_real_limit_reclaims_page_cache_beyond_it(tmp_path: Path) -> None:
    if not _bounded_here():
        pytest.skip("this machine does not let the process create a memory cgroup")
    data = tmp_path / "big.bin"
    with data.open("wb") as f:
        for _ in range(160):
            f.write(os.urandom(MiB))
    drop_cached([data])
    with MemoryLimit(48 * MiB) as held, data.open("rb") as f:
        total = sum(len(chunk) for chunk in iter(lambda: f.read(4 * MiB), b""))
    assert total == 160 * MiB               # read through, its pages reclaimed rather than the process killed
    assert 0 < held.peak_bytes() <= 48 * MiB


def test_accelerate_under_the_bound_gives_the_reference_tokens(tiny_mixtral_dir: Path, tmp_path: Path) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 96) for _ in range(6)] for _ in range(2)]
    spec = dict(model=str(tiny_mixtral_dir), batch_size=1, prompts=prompts, max_new_tokens=5,
                offload_dir=str(tmp_path))
    reference = measure(RunSpec(system="all-in-memory", cache_experts=None, **spec))
    bounded = measure(RunSpec(system="accelerate", cache_experts=6, page_cache=False, **spec))
    free = measure(RunSpec(system="accelerate", cache_experts=6, page_cache=True, **spec))
    assert bounded["sequences"] == free["sequences"] == reference["sequences"]
    assert free["notes"]["offload_reads"] == "page cache (not bypassed; unbounded, as --page-cache asks)"
    notes = bounded["notes"]
    if _bounded_here():
        assert notes["offload_reads"].startswith("page cache bounded: cgroup v")
        assert 0 < notes["bounded_peak_bytes"] <= notes["memory_limit_bytes"]
    else:
        assert notes["offload_reads"].startswith("page cache (not bypassed; unbounded: ")
        assert notes["memory_limit_bytes"] is None


def test_an_accelerate_run_killed_under_its_limit_is_a_one_line_error(monkeypatch, tmp_path: Path) -> None:
    import subprocess
    import signal

    from expertflow.errors import ExpertflowError

    def killed(*args, **kwargs):
        return subprocess.CompletedProcess(args, -signal.SIGKILL, stdout="", stderr="Loading weights: 12%\n")

    monkeypatch.setattr(subprocess, "run", killed)
    spec = RunSpec(system="accelerate", model=str(tmp_path), cache_experts=6, batch_size=4, prompts=[[5]],
                   max_new_tokens=2, page_cache=False)
    with pytest.raises(ExpertflowError, match=r"^bench run accelerate \(cache 6, batch 4\) was killed, most likely by "
                                              r"its memory cgroup's limit .*rerun with --page-cache") as e:
        measure(spec)
    assert "\n" not in str(e.value)
