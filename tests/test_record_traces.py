"""`serve --record-traces FILE`: the routing of the requests served, as a trace file the routing predictor goes on
training on. Recorded off the engine thread (a stalled writer never holds up a request), rotated without touching
other files, equal to what `generate(record_routing=True)` records for the same tokens."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import expertflow
from expertflow.cli import main as cli_main
from expertflow.engine.sampling import Sampler
from expertflow.engine.sequence import Sequence
from expertflow.errors import ExpertflowError
from expertflow.predictor.model import load_model
from expertflow.traces import TraceHeader, TraceSet, read_traces

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from expertflow.server import ServeConfig, build_service  # noqa: E402
from expertflow.server.app import create_app  # noqa: E402
from expertflow.server.trace_recorder import RecordingConfig, TraceRecorder, check_recording  # noqa: E402
from tests.serving import serving_app  # noqa: E402

MODEL = "tiny-mixtral-32e"
SHIPPED_RPP = Path(expertflow.__file__).parent / "models" / "tiny-mixtral-32e-rpp"
REQUESTS = [("The capital of France is", 6), ("Describe crepes.", 1), ("Once upon a time", 9)]  # text, max_tokens


@pytest.fixture(scope="module")
def model():
    model = expertflow.from_pretrained(cache_experts=64)
    yield model
    model.close()


def complete(url: str, ids: list[int], max_tokens: int, timeout: float = 60) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=timeout,
                   json={"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def recording_figures(url: str, until, seconds: float = 30) -> dict:
    """/metrics' recording figures once `until(figures)` holds (the writer runs on its own thread)."""
    deadline = time.monotonic() + seconds
    while True:
        figures = httpx.get(url + "/metrics", timeout=10).json()["recording"]
        if until(figures) or time.monotonic() > deadline:
            return figures
        time.sleep(0.05)


@pytest.fixture(scope="module")
def recorded(model, tmp_path_factory):
    """REQUESTS served one after another with recording on: the file, the responses, /metrics' figures."""
    path = tmp_path_factory.mktemp("served") / "served.safetensors"
    config = ServeConfig(max_batch_size=4, recording=RecordingConfig(path, flush_sequences=2))
    with serving_app(create_app(build_service(model, config))) as url:
        responses = [complete(url, model.encode(text), n) for text, n in REQUESTS]
        # two requests are written at once, the third waits for a flush (30 s) or the shutdown
        figures = recording_figures(url, lambda f: f["sequences"] == 2 and f["waiting"] == 1)
    return path, responses, figures


def test_the_recording_holds_the_tokens_fed_and_their_routing_bit_equal_to_generate(model, recorded):
    path, responses, figures = recorded
    traces = read_traces(path)
    h = traces.header
    assert (h.model, h.dataset, h.runs, h.temperature, h.seed) == (MODEL, "served", 1, 0.0, None)
    assert (h.num_layers, h.num_experts, h.top_k, h.vocab_size) == (
        model.num_moe_layers, model.num_experts, model.top_k, model.model.config.vocab_size)
    assert len(traces.sequences) == len(REQUESTS)
    for (text, n), response, seq in zip(REQUESTS, responses, sorted(traces.sequences, key=lambda s: s.prompt_index)):
        ids = model.encode(text)
        ref = model.generate(input_ids=[ids], max_new_tokens=n, record_routing=True)
        tokens = ref.sequences[0]
        # the response's tokens are those generated alone; the last was never fed to the model, so not recorded
        assert response["choices"][0]["text"] == model.decode(tokens)
        assert response["usage"]["completion_tokens"] == len(tokens)
        assert seq.prompt_ids.tolist() == ids and seq.generated_ids.tolist() == tokens[:-1]
        assert seq.routing.dtype == np.int16
        np.testing.assert_array_equal(seq.routing, ref.routing[0][: len(ids) + len(tokens) - 1])
    assert figures["dropped"] == 0 and figures["writes"] == 1 and figures["file_bytes"] > 0
    assert figures["path"] == str(path)


class StalledRecorder(TraceRecorder):
    """A recorder whose writes hang until released: a disk that stopped answering."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.writing, self.release = threading.Event(), threading.Event()

    def _write(self, traces: TraceSet, path: Path) -> None:
        self.writing.set()
        self.release.wait(120)
        super()._write(traces, path)


def test_a_stalled_writer_never_holds_up_a_request_and_overflow_is_counted(model, tmp_path):
    path = tmp_path / "served.safetensors"
    config = ServeConfig(max_batch_size=4)
    recorder = StalledRecorder(RecordingConfig(path, flush_sequences=1, queue_size=2), _header(model))
    n = 7
    ids = model.encode("The capital of France is")
    with serving_app(create_app(build_service(model, config, recorder=recorder))) as url:
        complete(url, ids, 3)
        assert recorder.writing.wait(30)   # the writer holds the first request, stuck in its write
        seconds = []
        for _ in range(n - 1):
            start = time.perf_counter()
            complete(url, ids, 3, timeout=30)
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            seconds.append(time.perf_counter() - start)
        assert max(seconds) < 10   # a request and /health take well under a second here
        figures = recording_figures(url, lambda f: f["dropped"] + f["waiting"] == n)
        assert (figures["waiting"], figures["dropped"], figures["sequences"]) == (3, n - 3, 0)  # 1 + a queue of 2
        recorder.release.set()
    assert len(read_traces(path).sequences) == 3 and recorder.figures()["sequences"] == 3


def _header(model) -> TraceHeader:
    return TraceHeader(model=model.name, num_layers=model.num_moe_layers, num_experts=model.num_experts,
                       top_k=model.top_k, dataset="served")


L, E, K = 2, 4, 2


def _finished(index: int, prompt_len: int = 50, fed: int = 30) -> Sequence:
    """A finished sequence as the engine leaves it: prompt + fed tokens routed, one more generated, unfed."""
    routing = [np.full((prompt_len, L, K), index % E, np.int16)] + [np.zeros((1, L, K), np.int16)] * fed
    return Sequence(index, [1] * prompt_len, fed + 1, Sampler(0.0, None), generated=list(range(fed + 1)), fed=fed,
                    routing=routing)


def _synthetic_recorder(path: Path, **config) -> TraceRecorder:
    return TraceRecorder(RecordingConfig(path, **config), TraceHeader(model="m", num_layers=L, num_experts=E,
                                                                      top_k=K, dataset="served"))


def test_rotation_keeps_at_most_keep_plus_one_files_and_never_touches_another(tmp_path):
    path = tmp_path / "served.safetensors"
    others = {tmp_path / "served.safetensors.3": b"not the recorder's", tmp_path / "served.safetensors.bak": b"x",
              tmp_path / "notes.txt": b"y"}
    for other, data in others.items():
        other.write_bytes(data)
    # a sequence of 80 tokens is about 1 KB (80 x 4 B ids + 80 x L x K x 2 B routing): 3 to a 4 KiB file
    recorder = _synthetic_recorder(path, max_bytes=4096, keep=2, flush_sequences=4)
    check_recording(recorder.config, overwrite=False)
    recorder.start()
    for i in range(20):
        recorder.offer(_finished(i))
    recorder.close()
    files = [path, tmp_path / "served.safetensors.1", tmp_path / "served.safetensors.2"]
    assert sorted(tmp_path.iterdir()) == sorted([*files, *others])
    assert all(other.read_bytes() == data for other, data in others.items())
    held = [[s.prompt_index for s in read_traces(f).sequences] for f in files]
    assert held == [[18, 19], [15, 16, 17], [12, 13, 14]]
    assert all(f.stat().st_size <= 4096 for f in files)
    figures = recorder.figures()
    assert (figures["sequences"], figures["dropped"], figures["rotations"], figures["waiting"]) == (20, 0, 6, 0)


def test_a_file_put_in_a_rotation_slot_while_serving_is_never_replaced(tmp_path):
    path = tmp_path / "served.safetensors"
    foreign = tmp_path / "served.safetensors.2"
    recorder = _synthetic_recorder(path, max_bytes=4096, keep=3, flush_sequences=1)
    recorder.start()
    for i in range(4):   # FILE, then FILE -> FILE.1
        recorder.offer(_finished(i))
    while recorder.figures()["sequences"] < 4:
        time.sleep(0.01)
    foreign.write_bytes(b"someone else's")
    for i in range(4, 12):
        recorder.offer(_finished(i))
    recorder.close()
    assert foreign.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served.safetensors", "served.safetensors.1",
                                                           "served.safetensors.2"]
    assert [s.prompt_index for s in read_traces(tmp_path / "served.safetensors.1").sequences] == [6, 7, 8]


def test_an_existing_recording_is_refused_before_the_model_loads_unless_overwrite(tmp_path, capsys):
    path = tmp_path / "served.safetensors"
    path.write_bytes(b"an earlier recording")
    config = RecordingConfig(path)
    with pytest.raises(ExpertflowError, match="already exists; pass --overwrite"):
        check_recording(config, overwrite=False)
    check_recording(config, overwrite=True)
    (tmp_path / "served.safetensors.2").write_bytes(b"its rotation")
    with pytest.raises(ExpertflowError, match="never replaces a file it did not write"):
        check_recording(config, overwrite=True)
    for argv, message in [(["--record-traces", str(path)], "already exists"),
                          (["--record-traces-keep", "2"], "need --record-traces FILE"),
                          (["--record-traces", str(tmp_path / "new"), "--record-traces-max-bytes", "1KiB"],
                           "at least 4096"),
                          (["--record-traces", str(tmp_path / "new"), "--replicas", "2"], "--replicas")]:
        code = cli_main(["serve", "--port", "0", *argv])   # each fails before a model loads or a port opens
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert path.read_bytes() == b"an earlier recording"


def test_train_predictor_goes_on_from_the_shipped_predictor_on_recordings(recorded, tmp_path, capsys):
    path = recorded[0]
    again = shutil.copy(path, tmp_path / "served-again.safetensors")   # several recordings at once
    out = tmp_path / "rpp"
    code = cli_main(["train-predictor", "--init-predictor", str(SHIPPED_RPP), "--traces", str(path), str(again),
                     "--out", str(out), "--epochs", "1", "--batch-size", "4", "--val-fraction", "0", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    assert load_model(out).config == load_model(SHIPPED_RPP).config
    assert json.loads((out / "training.json").read_text())["train_sequences"] == 2 * len(REQUESTS)


@pytest.mark.parametrize("command", ["train-predictor", "trace-info", "eval-predictor"])
def test_a_truncated_recording_is_a_one_line_error(recorded, tmp_path, capsys, command):
    data = recorded[0].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    argv = {"train-predictor": ["--init-predictor", str(SHIPPED_RPP), "--traces", str(broken),
                                "--out", str(tmp_path / "rpp")],
            "trace-info": [str(broken)],
            "eval-predictor": ["--predictor", str(SHIPPED_RPP), "--traces", str(broken)]}[command]
    code = cli_main([command, *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{broken}: not a readable trace file" in err, err


def test_waiting_requests_are_written_after_flush_seconds_and_mixed_temperatures_are_nan(tmp_path):
    path = tmp_path / "served.safetensors"
    recorder = _synthetic_recorder(path, flush_seconds=0.2)
    recorder.start()
    hot = _finished(1)
    hot.sampler = Sampler(0.7, 5)
    for seq in (_finished(0), hot):
        recorder.offer(seq)
    deadline = time.monotonic() + 30
    while recorder.figures()["sequences"] < 2 and time.monotonic() < deadline:   # no close: the timer writes
        time.sleep(0.02)
    traces = read_traces(path)
    assert len(traces.sequences) == 2 and np.isnan(traces.header.temperature)
    recorder.close()
