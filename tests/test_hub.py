"""`--model owner/name`: hub ids resolved from a Hugging Face cache laid out as huggingface_hub lays it out (no
network here: offline, or a local stand-in for the Hub), and the one-line errors when a model cannot be had."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

import expertflow
from expertflow.cli import main
from expertflow.errors import ExpertflowError
from expertflow.hub import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT_IDS = [3, 17, 5, 42, 9]


def cache_model(cache: Path, repo_id: str, source: Path, skip: tuple[str, ...] = ()) -> Path:
    """Put `source`'s files in `cache` as a download would: content-named blobs, a snapshot of relative symlinks
    to them for one commit, and refs/main naming that commit. Returns the snapshot directory."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / COMMIT
    for directory in (repo / "blobs", repo / "refs", snapshot):
        directory.mkdir(parents=True)
    for file in sorted(p for p in source.iterdir() if p.is_file() and p.name not in skip):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, tiny_mixtral_dir, embedded_model_dir) -> Path:
    cache = tmp_path_factory.mktemp("hf-home").resolve() / "hub"
    cache_model(cache, "tiny/mixtral", tiny_mixtral_dir)
    cache_model(cache, "tiny/embedded", embedded_model_dir)
    return cache


@pytest.fixture
def offline(monkeypatch, hub_cache) -> Path:
    """The shared cache, offline. Set per test: huggingface_hub read its own copies of these at import."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("expertflow: error: "), err
    return lines[0]


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(offline):
    repos = {repo.repo_id: repo for repo in scan_cache_dir(offline).repos}
    assert set(repos) == {"tiny/mixtral", "tiny/embedded"}
    revision = next(iter(repos["tiny/mixtral"].revisions))
    assert revision.commit_hash == COMMIT and revision.refs == {"main"}
    found = try_to_load_from_cache("tiny/mixtral", "config.json", cache_dir=offline)
    assert found == str(offline / "models--tiny--mixtral" / "snapshots" / COMMIT / "config.json")


@pytest.mark.parametrize("spec", ["tiny/mixtral", "tiny/mixtral@main", f"tiny/mixtral@{COMMIT}"])
def test_a_hub_id_resolves_to_its_cached_snapshot(offline, spec):
    assert resolve_model(spec) == offline / "models--tiny--mixtral" / "snapshots" / COMMIT


def test_hf_home_locates_the_cache(monkeypatch, offline):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(offline.parent))
    assert resolve_model("tiny/mixtral") == offline / "models--tiny--mixtral" / "snapshots" / COMMIT


def test_inspect_by_hub_id_reports_what_the_directory_does(capsys, offline, tiny_mixtral_dir):
    reports = []
    for model in ("tiny/mixtral", str(tiny_mixtral_dir)):
        rc, out, err = _run(capsys, "inspect", "--model", model, "--json")
        assert rc == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert reports[0] == reports[1]


def test_from_pretrained_by_hub_id_decodes_the_directorys_greedy_tokens(offline, tiny_mixtral_dir):
    runs = {}
    for model in ("tiny/mixtral", tiny_mixtral_dir):
        lm = expertflow.from_pretrained(model, cache_experts=6)
        runs[str(model)] = (lm.name, lm.generate(input_ids=[PROMPT_IDS], max_new_tokens=8).sequences)
    (hub_name, hub_tokens), (dir_name, dir_tokens) = runs.values()
    assert hub_tokens == dir_tokens and hub_tokens[0]  # the new tokens
    assert hub_name == "tiny/mixtral" and dir_name == tiny_mixtral_dir.name  # served and traced under its hub id


def test_generate_by_hub_id_prints_the_directorys_tokens(capsys, offline, embedded_model_dir):
    tokens = []
    for model in ("tiny/embedded", str(embedded_model_dir)):
        rc, out, err = _run(capsys, "generate", "--model", model, "--prompt", "The capital of France is",
                            "--max-new-tokens", "6", "--json")
        assert rc == 0, err
        tokens.append(json.loads(out.strip().splitlines()[-1])["token_ids"])
    assert tokens[0] == tokens[1]


def test_a_local_directory_wins_over_the_same_hub_id(capsys, monkeypatch, offline, tiny_model_dirs):
    monkeypatch.chdir(offline.parent)
    (offline.parent / "tiny").mkdir(exist_ok=True)
    local = Path("tiny", "mixtral")
    if not local.exists():
        local.symlink_to(tiny_model_dirs["olmoe"], target_is_directory=True)  # another family than the cached one
    assert resolve_model("tiny/mixtral") == local
    rc, out, err = _run(capsys, "inspect", "--model", "tiny/mixtral", "--json")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["model_type"] == "olmoe"


@pytest.mark.parametrize("command", [("generate", "--prompt", "hi"), ("inspect",),
                                     ("widen", "--intermediate-size", "64", "--out", "{tmp}/wide")])
def test_not_cached_and_offline_is_one_line_naming_the_fix(capsys, offline, tmp_path, command):
    argv = [a.format(tmp=tmp_path) for a in command]
    rc, _, err = _run(capsys, *argv, "--model", "nobody/missing")
    line = _one_line_error(rc, err)
    assert "'nobody/missing' is neither a directory nor in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line and "`hf download nobody/missing`" in line and "--model DIR" in line


def test_an_incomplete_snapshot_is_not_taken_for_the_model(tmp_path, monkeypatch, tiny_mixtral_dir):
    cache_model(tmp_path / "hub", "tiny/partial", tiny_mixtral_dir, skip=("model.safetensors",))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExpertflowError, match="'tiny/partial' is neither a directory nor in the Hugging Face cache"):
        resolve_model("tiny/partial")


@pytest.mark.parametrize("spec", ["/no/such/dir", "a/b/c", "bare-name", "~/no-such-model", "a--b/c", "a/b@"])
def test_what_is_not_shaped_like_a_hub_id_keeps_the_directory_error(offline, spec):
    with pytest.raises(ExpertflowError, match=r"model directory .* does not exist; pass --model DIR"):
        resolve_model(spec)


def test_the_error_as_a_user_sees_it(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "expertflow", "inspect", "--model", "nobody/missing"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "hf download nobody/missing" in proc.stderr


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the Hub's API answering every request with one error, as the Hub marks it."""

    status, code = 404, "RepoNotFound"

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("X-Error-Code", self.code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.mark.skipif(constants.HF_HUB_OFFLINE, reason="huggingface_hub was imported offline: it will not connect")
@pytest.mark.parametrize("status, code, message", [
    (401, "RepoNotFound", "is neither a directory nor a repo on the Hugging Face Hub"),
    (403, "GatedRepo", "is gated on the Hugging Face Hub: accept its terms at https://huggingface.co/nobody/missing"),
    (404, "RevisionNotFound", "the Hugging Face Hub has no revision"),
    (None, None, "cannot fetch model 'nobody/missing' from the Hugging Face Hub"),
])
def test_online_failures_are_one_line(capsys, monkeypatch, tmp_path, status, code, message):
    handler = type("Hub", (_Hub,), {"status": status, "code": code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nothing listens: the network is down
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    try:
        rc, _, err = _run(capsys, "inspect", "--model", "nobody/missing")
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    line = _one_line_error(rc, err)
    assert message in line
