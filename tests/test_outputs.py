"""Every command that writes checks its output path before any work, refuses to write over what a user has
unless --overwrite is given, and never deletes a file it does not produce."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from expertflow.cli import main
from expertflow.errors import ExpertflowError
from expertflow.outputs import check_output_dir, check_output_file, write_atomic, write_dir
from expertflow.traces import read_traces
from tests.test_predictor_train import synthetic_traces

PREDICTOR_FILES = {"config.json", "model.safetensors", "baselines.safetensors", "training.json"}
SMALL_PREDICTOR = ["--epochs", "1", "--d-model", "16", "--d-ff", "32", "--num-heads", "2", "--encoder-layers", "1",
                   "--decoder-layers", "1", "--window", "4"]


def run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The one line a refused command prints, without its 'expertflow: error: ' prefix."""
    code, err = run(capsys, argv)
    assert code == 2 and err.count("\n") == 1, err
    return err.strip().removeprefix("expertflow: error: ")


def user_files(root: Path) -> Path:
    """A directory holding a user's file and a sub-folder with one: nothing the commands produce."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("mine")
    (root / "keep").mkdir()
    (root / "keep" / "data.bin").write_bytes(b"\x00\x01")
    return root


def assert_user_files_intact(root: Path) -> None:
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / "keep" / "data.bin").read_bytes() == b"\x00\x01"


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob(".*")]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Spies on the expensive first steps of every command: a refusal must come before any of them."""
    import expertflow
    import expertflow.cli.bench as bench
    import expertflow.cli.predictor as predictor
    import expertflow.cli.schedule as schedule
    import expertflow.cli.simulate as simulate
    import expertflow.cli.trace as trace
    import expertflow.widen as widen

    called: list[str] = []

    def spy(name: str):
        def record(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} ran before the output check")
        return record

    monkeypatch.setattr(expertflow, "from_pretrained", spy("from_pretrained"))
    monkeypatch.setattr(trace, "load_prompts", spy("load_prompts"))
    monkeypatch.setattr(predictor, "read_traces", spy("read_traces"))
    monkeypatch.setattr(predictor, "train_predictor", spy("train_predictor"))
    monkeypatch.setattr(widen, "read_config", spy("read_config"))
    monkeypatch.setattr(bench, "_widened", spy("_widened"))
    monkeypatch.setattr(bench, "_prompt_ids", spy("_prompt_ids"))
    monkeypatch.setattr(bench, "run_bench", spy("run_bench"))
    monkeypatch.setattr(simulate, "read_traces", spy("read_traces"))
    monkeypatch.setattr(schedule, "read_traces", spy("read_traces"))
    return called


# The rule itself


def assert_refusals(check, cases: dict[Path, str]) -> None:
    """Each path refused without --overwrite, with exactly its message."""
    for path, message in cases.items():
        with pytest.raises(ExpertflowError) as info:
            check(path, overwrite=False)
        assert str(info.value) == message


def test_a_file_output_is_refused_where_it_cannot_or_may_not_go(tmp_path: Path) -> None:
    check_output_file(tmp_path / "new" / "deeper" / "t.safetensors", overwrite=False)  # missing parents are made
    (tmp_path / "t.safetensors").write_text("old")
    (tmp_path / "d").mkdir()
    cases = {
        tmp_path / "t.safetensors": f"--out {tmp_path}/t.safetensors already exists; pass --overwrite to replace it, "
                                    "or choose a new path",
        tmp_path / "d": f"--out {tmp_path}/d is a directory; give the path of a file to write",
        tmp_path / "t.safetensors" / "x": f"--out {tmp_path}/t.safetensors/x is under {tmp_path}/t.safetensors, "
                                          "which is a file; choose a path in a directory",
    }
    assert_refusals(check_output_file, cases)
    check_output_file(tmp_path / "t.safetensors", overwrite=True)
    with pytest.raises(ExpertflowError, match="is a directory"):
        check_output_file(tmp_path / "d", overwrite=True)  # never a directory turned into a file
    with pytest.raises(ExpertflowError, match="which is a file"):
        check_output_file(tmp_path / "t.safetensors" / "x", overwrite=True)
    with pytest.raises(ExpertflowError, match="^--plot "):
        check_output_file(tmp_path / "t.safetensors", overwrite=False, flag="--plot")


def test_a_directory_output_is_refused_where_it_cannot_or_may_not_go(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new" / "rpp", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", overwrite=False)  # an empty directory holds nothing to lose
    user_files(tmp_path / "full")
    (tmp_path / "t.safetensors").write_text("trace")
    cases = {
        tmp_path / "full": f"--out {tmp_path}/full is a non-empty directory; pass --overwrite to write into it, "
                           "or choose a new path",
        tmp_path / "t.safetensors": f"--out {tmp_path}/t.safetensors is a file, not a directory; choose a new path",
        tmp_path / "t.safetensors" / "rpp": f"--out {tmp_path}/t.safetensors/rpp is under {tmp_path}/t.safetensors, "
                                            "which is a file; choose a path in a directory",
    }
    assert_refusals(check_output_dir, cases)
    check_output_dir(tmp_path / "full", overwrite=True)
    with pytest.raises(ExpertflowError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "t.safetensors", overwrite=True)  # never a file turned into a directory


def test_a_directory_we_may_not_write_in_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # os.access stands in for the permission bits, which do not bind root (these tests may run as root)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    message = f"--out {locked}/rpp: cannot write in {locked} (permission denied); choose a writable path"
    with pytest.raises(ExpertflowError) as info:
        check_output_dir(locked / "rpp", overwrite=False)
    assert str(info.value) == message
    with pytest.raises(ExpertflowError, match="permission denied"):
        check_output_file(locked / "t.safetensors", overwrite=True)
    with pytest.raises(ExpertflowError, match="permission denied"):
        check_output_dir(locked, overwrite=True)


def test_write_dir_swaps_a_new_directory_in_and_merges_into_an_existing_one(tmp_path: Path) -> None:
    def fill(directory: Path) -> None:
        (directory / "config.json").write_text("new")
        (directory / "sub").mkdir()
        (directory / "sub" / "a.bin").write_bytes(b"new")

    write_dir(tmp_path / "fresh", fill)
    (tmp_path / "empty").mkdir()
    write_dir(tmp_path / "empty", fill)
    target = user_files(tmp_path / "full")
    (target / "config.json").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "b.bin").write_bytes(b"theirs")
    write_dir(target, fill)
    for directory in (tmp_path / "fresh", tmp_path / "empty", target):
        assert (directory / "config.json").read_text() == "new"
        assert (directory / "sub" / "a.bin").read_bytes() == b"new"
    assert_user_files_intact(target)
    assert (target / "sub" / "b.bin").read_bytes() == b"theirs"
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o755
    assert no_temp_files(tmp_path)

    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "config.json").mkdir()
    (tmp_path / "blocked" / "config.json" / "x").write_text("theirs")
    with pytest.raises(ExpertflowError, match=r"blocked/config.json is in the way of the file"):
        write_dir(tmp_path / "blocked", fill)
    assert (tmp_path / "blocked" / "config.json" / "x").read_text() == "theirs" and no_temp_files(tmp_path)

    def fail(directory: Path) -> None:
        (directory / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_dir(tmp_path / "never", fail)
    assert not (tmp_path / "never").exists() and no_temp_files(tmp_path)


def test_write_atomic_leaves_a_readable_file_and_no_temp_files(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a" / "results.json", "{}\n")
    write_atomic(tmp_path / "a" / "results.json", b"[]\n")
    assert (tmp_path / "a" / "results.json").read_text() == "[]\n"
    assert stat.S_IMODE((tmp_path / "a" / "results.json").stat().st_mode) == 0o644
    assert no_temp_files(tmp_path)


# trace


def test_trace_refuses_its_out_before_the_model_loads(tmp_path: Path, capsys, no_work) -> None:
    existing = tmp_path / "t.safetensors"
    existing.write_text("an earlier trace")
    (tmp_path / "dir").mkdir()
    base = ["trace", "--dataset", "alpaca", "--samples", "1", "--out"]
    assert refused(capsys, [*base, existing]) == (f"--out {existing} already exists; pass --overwrite to replace "
                                                  "it, or choose a new path")
    assert refused(capsys, [*base, tmp_path / "dir"]) == (f"--out {tmp_path}/dir is a directory; give the path of a "
                                                          "file to write")
    assert refused(capsys, [*base, existing / "x.safetensors", "--overwrite"]) == (
        f"--out {existing}/x.safetensors is under {existing}, which is a file; choose a path in a directory")
    assert no_work == [] and existing.read_text() == "an earlier trace"


def test_trace_overwrites_only_its_file(tmp_path: Path, capsys) -> None:
    root = user_files(tmp_path / "traces")
    out = root / "alpaca.safetensors"
    out.write_text("an earlier trace")
    code, _ = run(capsys, ["trace", "--dataset", "alpaca", "--samples", "1", "--max-new-tokens", "2", "--out", out,
                           "--overwrite"])
    assert code == 0 and len(read_traces(out).sequences) == 1
    assert_user_files_intact(root)
    assert no_temp_files(root)


# train-predictor (and its --distill-model, which loads the model: all after the check)


def test_train_predictor_refuses_its_out_before_reading_or_training(tmp_path: Path, capsys, no_work,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    traces = tmp_path / "t.safetensors"
    traces.write_text("stands in for a trace file")
    full = user_files(tmp_path / "rpp")
    base = ["train-predictor", "--traces", traces, "--distill-model", tmp_path / "model", "--out"]
    assert refused(capsys, [*base, full]) == (f"--out {full} is a non-empty directory; pass --overwrite to write into "
                                              "it, or choose a new path")
    assert refused(capsys, [*base, traces, "--overwrite"]) == (f"--out {traces} is a file, not a directory; choose a "
                                                               "new path")
    monkeypatch.chdir(full)
    assert refused(capsys, [*base, "."]) == ("--out . is a non-empty directory; pass --overwrite to write into it, "
                                             "or choose a new path")
    assert no_work == []
    assert_user_files_intact(full)
    assert traces.read_text() == "stands in for a trace file"


def test_train_predictor_overwrite_replaces_the_predictors_files_and_keeps_the_rest(tmp_path: Path, capsys) -> None:
    traces = synthetic_traces(n=8).write(tmp_path / "t.safetensors")
    out = user_files(tmp_path / "rpp")
    (out / "config.json").write_text("an older predictor's")
    code, _ = run(capsys, ["train-predictor", "--traces", traces, "--out", out, "--overwrite", *SMALL_PREDICTOR])
    assert code == 0
    assert {p.name for p in out.iterdir()} == PREDICTOR_FILES | {"notes.txt", "keep"}
    assert json.loads((out / "config.json").read_text())["d_model"] == 16
    assert_user_files_intact(out)
    assert no_temp_files(tmp_path)

    fresh = tmp_path / "empty"
    fresh.mkdir()
    code, _ = run(capsys, ["train-predictor", "--traces", traces, "--out", fresh, *SMALL_PREDICTOR])
    assert code == 0 and {p.name for p in fresh.iterdir()} == PREDICTOR_FILES


# widen


def test_widen_refuses_its_out_before_reading_the_model(tmp_path: Path, capsys, no_work, tiny_mixtral_dir) -> None:
    full = user_files(tmp_path / "wide")
    (tmp_path / "file").write_text("x")
    base = ["widen", "--model", tiny_mixtral_dir, "--intermediate-size", "32", "--out"]
    assert refused(capsys, [*base, full]) == (f"--out {full} is a non-empty directory; pass --overwrite to write into "
                                              "it, or choose a new path")
    assert refused(capsys, [*base, tmp_path / "file", "--overwrite"]) == (
        f"--out {tmp_path}/file is a file, not a directory; choose a new path")
    assert no_work == [] and (tmp_path / "file").read_text() == "x"
    assert_user_files_intact(full)


def test_widen_overwrite_keeps_the_users_files(tmp_path: Path, capsys, tiny_mixtral_dir) -> None:
    out = user_files(tmp_path / "wide")
    code, _ = run(capsys, ["widen", "--model", tiny_mixtral_dir, "--intermediate-size", "32", "--out", out,
                           "--overwrite"])
    assert code == 0 and json.loads((out / "config.json").read_text())["intermediate_size"] == 32
    assert (out / "model.safetensors.index.json").is_file()
    assert_user_files_intact(out)
    assert no_temp_files(tmp_path)
    (tmp_path / "empty").mkdir()
    code, _ = run(capsys, ["widen", "--model", tiny_mixtral_dir, "--intermediate-size", "32", "--out",
                           tmp_path / "empty"])
    assert code == 0 and (tmp_path / "empty" / "config.json").is_file()


# bench


def test_bench_refuses_its_out_before_any_run(tmp_path: Path, capsys, no_work) -> None:
    full = user_files(tmp_path / "out")
    (tmp_path / "file").write_text("x")
    assert refused(capsys, ["bench", "--widen", "64", "--out", full]) == (
        f"--out {full} is a non-empty directory; pass --overwrite to write into it, or choose a new path")
    assert refused(capsys, ["bench", "--out", tmp_path / "file", "--overwrite"]) == (
        f"--out {tmp_path}/file is a file, not a directory; choose a new path")
    assert no_work == []
    assert_user_files_intact(full)


def test_bench_overwrite_replaces_its_results_and_keeps_the_rest(tmp_path: Path, capsys) -> None:
    out = user_files(tmp_path / "out")
    (out / "results.md").write_text("an earlier sweep")
    code, _ = run(capsys, ["bench", "--systems", "lru", "--prompts", "1", "--max-new-tokens", "2", "--batch-size", "1",
                           "--cache-experts", "50%", "--out", out, "--overwrite"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "throughput.png", "memory.png",
                                               "hit_ratio.png", "notes.txt", "keep"}
    assert "an earlier sweep" not in (out / "results.md").read_text()
    assert_user_files_intact(out)
    assert no_temp_files(out)


# simulate and schedule-eval --plot (eval-predictor writes no file: its --json is a stdout line)


@pytest.mark.parametrize("command", ["simulate", "schedule-eval"])
def test_plots_are_refused_before_the_replay(tmp_path: Path, capsys, no_work, command: str) -> None:
    plot = tmp_path / "hit.png"
    plot.write_text("an earlier plot")
    assert refused(capsys, [command, "--traces", tmp_path / "t.safetensors", "--plot", plot]) == (
        f"--plot {plot} already exists; pass --overwrite to replace it, or choose a new path")
    assert refused(capsys, [command, "--traces", tmp_path / "t.safetensors", "--plot", tmp_path, "--overwrite"]) == (
        f"--plot {tmp_path} is a directory; give the path of a file to write")
    assert no_work == [] and plot.read_text() == "an earlier plot"


@pytest.mark.parametrize("command, flags", [
    ("simulate", ["--policies", "lru", "--cache-experts", "4", "--transfer-ratio", "2"]),
    ("schedule-eval", ["--batch-size", "2", "--schedule-unit", "2", "--schedulers", "fifo,swap"]),
])
def test_plots_overwrite_their_file(tmp_path: Path, capsys, command: str, flags: list[str]) -> None:
    traces = synthetic_traces(n=8).write(tmp_path / "t.safetensors")
    plot = tmp_path / "plot.png"
    plot.write_text("an earlier plot")
    code, _ = run(capsys, [command, "--traces", traces, *flags, "--plot", plot, "--overwrite"])
    assert code == 0 and plot.read_bytes()[:4] == b"\x89PNG" and no_temp_files(tmp_path)
