"""Bad files and bad values give one-line errors, never tracebacks or silent garbage: corrupt expert weights
(NaN logits), broken predictor directories, non-UTF-8 prompts, non-finite temperatures, broken trace files."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import expertflow
from expertflow.cli import main
from expertflow.embedded import EMBEDDED_MODEL_DIR, EMBEDDED_PREDICTOR_DIR
from expertflow.errors import ExpertflowError
from expertflow.predictor.baselines import BASELINES_NAME, build_tables
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.traces import FORMAT_NAME, FORMAT_VERSION, HEADER_KEY, TraceHeader, TraceSequence, TraceSet, read_traces
from tests.tiny_models import tiny_config

NAN_LOGITS = "logits are NaN/Inf"
L, E, K = 8, 32, 2  # the embedded predictor's layers, experts, top_k


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("expertflow: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def poison(src: Path, dst: Path, pattern: str) -> Path:
    """A copy of checkpoint `src` with 2 KiB of 0xFF bytes (NaN as fp32) written over the start of every
    tensor whose name matches `pattern`, in place in the safetensors file, as disk corruption would."""
    shutil.copytree(src, dst)
    hit = 0
    for path in dst.glob("*.safetensors"):
        data = bytearray(path.read_bytes())
        (length,) = struct.unpack("<Q", data[:8])
        for name, info in json.loads(data[8 : 8 + length]).items():
            if name != "__metadata__" and re.search(pattern, name):
                start, end = (8 + length + offset for offset in info["data_offsets"])
                data[start : min(end, start + 2048)] = b"\xff" * (min(end, start + 2048) - start)
                hit += 1
        path.write_bytes(bytes(data))
    assert hit, f"no tensor of {src} matches {pattern}"
    return dst


# ---- 1. corrupt expert weights: non-finite logits stop generation -------------------------------------------
@pytest.fixture(scope="module")
def nan_layer0_dir(tiny_mixtral_dir, tmp_path_factory) -> Path:
    return poison(tiny_mixtral_dir, tmp_path_factory.mktemp("nan") / "m", r"layers\.0\..*\.w2\.")


def test_corrupt_experts_stop_generate_and_generate_many_at_prefill_naming_the_layer(nan_layer0_dir):
    model = expertflow.from_pretrained(nan_layer0_dir, cache_experts=12)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    with pytest.raises(ExpertflowError, match=rf"{NAN_LOGITS} at prefill \(first in .* MoE layer 0\)"):
        model.generate(input_ids=prompts[:2], max_new_tokens=4)
    with pytest.raises(ExpertflowError, match=rf"{NAN_LOGITS} at prefill \(first in .* MoE layer 0\)"):
        model.generate_many(input_ids=prompts, batch_size=2, max_new_tokens=4)
    model.close()


def _first_decode_expert(model_dir: Path) -> tuple[list[int], int, int, int]:
    """(prompt, layer, expert, step): an expert the prompt's prefill does not use and the decode forward
    that produces the logits of generated token `step` is the first to use."""
    model = expertflow.from_pretrained(model_dir, cache_experts=12)
    for start in range(3, 60, 3):
        prompt = [start, start + 1, start + 2]
        out = model.generate(input_ids=[prompt], max_new_tokens=12, record_routing=True)
        routing = out.routing[0]  # (prompt + generated, L, K)
        for row in range(len(prompt), len(routing) - 1):  # rows fed by decode forwards whose logits are sampled
            for layer in range(routing.shape[1]):
                for expert in routing[row, layer]:
                    if expert not in routing[:row, layer]:
                        model.close()
                        return prompt, layer, int(expert), row - len(prompt) + 1
    raise AssertionError("every expert the decode steps used was used by the prompts")


def test_an_expert_first_met_while_decoding_names_the_step_and_layer(tiny_mixtral_dir, tmp_path):
    prompt, layer, expert, step = _first_decode_expert(tiny_mixtral_dir)
    broken = poison(tiny_mixtral_dir, tmp_path / "m", rf"layers\.{layer}\..*experts\.{expert}\.w2\.")
    model = expertflow.from_pretrained(broken, cache_experts=12)
    expected = rf"{NAN_LOGITS} at decode step {step} \(first in .* MoE layer {layer}\)"
    with pytest.raises(ExpertflowError, match=expected):
        model.generate(input_ids=[prompt], max_new_tokens=12)
    with pytest.raises(ExpertflowError, match=expected):
        model.generate_many(input_ids=[prompt], batch_size=1, max_new_tokens=12)
    model.close()


def test_corrupt_experts_stop_the_encoder_decoder_engine(tmp_path):
    from tests.test_switch import switch_config

    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(switch_config(), dtype=torch.float32).save_pretrained(tmp_path / "switch")
    broken = poison(tmp_path / "switch", tmp_path / "broken", r"decoder\.block\.1\..*expert_\d+\.wo\.")
    model = expertflow.from_pretrained(broken, cache_experts=16)
    with pytest.raises(ExpertflowError, match=rf"{NAN_LOGITS} at prefill \(first in .* MoE layer 3\)"):
        model.generate(input_ids=[[5, 6, 7]], max_new_tokens=4)
    model.close()


@pytest.fixture(scope="module")
def nan_text_model_dir(tmp_path_factory) -> Path:
    """A tiny mixtral with the embedded model's tokenizer (so text goes in), its layer-0 w2 tensors NaN."""
    root = tmp_path_factory.mktemp("nan-text")
    config = tiny_config("mixtral")
    config.vocab_size = 8192
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "clean")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, root / "clean" / name)
    return poison(root / "clean", root / "nan", r"layers\.0\..*\.w2\.")


def test_cli_generate_with_corrupt_experts_is_a_one_line_error(capsys, tmp_path, nan_text_model_dir):
    rc, err = _run(capsys, "generate", "--model", str(nan_text_model_dir), "--prompt", "hi",
                   "--cache-experts", "12", "--max-new-tokens", "3")
    _assert_one_line_error(rc, err, f"{NAN_LOGITS} at prefill", "MoE layer 0", "re-download the checkpoint")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nworld\n")
    rc, err = _run(capsys, "generate", "--model", str(nan_text_model_dir), "--prompts-file", str(prompts),
                   "--cache-experts", "12", "--max-new-tokens", "3")
    _assert_one_line_error(rc, err, f"{NAN_LOGITS} at prefill", "MoE layer 0")


# ---- serve: NaN logits fail the request with a 500; a lone surrogate is a 400 -------------------------------
@pytest.fixture(scope="module")
def nan_server(nan_text_model_dir):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from expertflow.server import ServeConfig, build_service
    from expertflow.server.app import create_app
    from tests.serving import serving_app

    model = expertflow.from_pretrained(nan_text_model_dir, cache_experts=12)
    with serving_app(create_app(build_service(model, ServeConfig(max_batch_size=2)))) as base:
        yield base, model.name
    model.close()


def _post_raw(url: str, body: str) -> httpx.Response:
    """`body` sent as it is: a JSON escape like \\ud800 stays an escape (httpx's json= would fail to encode it)."""
    return httpx.post(url, content=body.encode(), headers={"content-type": "application/json"}, timeout=60)


def test_serve_fails_a_request_whose_logits_go_nan_with_500_and_keeps_serving(nan_server):
    base, name = nan_server
    for _ in range(2):  # the server is still serving after the first failure
        r = httpx.post(base + "/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and NAN_LOGITS in r.json()["error"]["message"]
    assert httpx.get(base + "/health", timeout=10).json()["running"] == 0


@pytest.mark.parametrize("path,field", [
    ("/v1/completions", '"prompt": "caf\\ud800"'),
    ("/v1/completions", '"prompt": ["ok", "\\udce9"]'),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": "caf\\udce9"}]'),
])
def test_serve_answers_a_lone_surrogate_with_400(nan_server, path, field):
    base, name = nan_server
    r = _post_raw(base + path, f'{{"model": "{name}", {field}, "max_tokens": 2}}')
    assert r.status_code == 400, r.text  # refused by the JSON parser, or else where the text is encoded


def test_the_server_refuses_to_encode_a_lone_surrogate():
    pytest.importorskip("fastapi")
    from expertflow.server.errors import APIError
    from expertflow.server.prompts import encode_prompts

    for prompt in ("caf\ud800", ["ok", "\udce9"]):
        with pytest.raises(APIError, match="prompt must be UTF-8 text") as info:
            encode_prompts(lambda text: {"input_ids": [5] * len(text)}, prompt, vocab_size=96)
        assert info.value.status == 400


# ---- 2 and 3. predictor directories: NaN weights, truncated weights, missing or corrupt config -------------
def _predictor_copy(tmp_path: Path, damage: str) -> Path:
    out = tmp_path / f"rpp-{damage}"
    shutil.copytree(EMBEDDED_PREDICTOR_DIR, out)
    weights, config = out / "model.safetensors", out / "config.json"
    if damage == "nan":
        tensors = load_file(str(weights))
        tensors[sorted(tensors)[0]].view(-1)[3] = float("nan")
        save_file(tensors, str(weights))
    elif damage == "inf":
        tensors = load_file(str(weights))
        tensors[sorted(tensors)[-1]].view(-1)[0] = float("inf")
        save_file(tensors, str(weights))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no-config":
        config.unlink()
    elif damage == "config-json":
        config.write_text('{"vocab_size": 8192,')
    elif damage == "config-list":
        config.write_text("[1, 2]")
    elif damage == "config-fields":
        config.write_text(json.dumps({**json.loads(config.read_text()), "d_model": 64}))
    return out


PREDICTOR_DAMAGE = {"nan": "holds NaN/Inf", "inf": "holds NaN/Inf", "truncated": "is truncated or corrupt",
                    "no-config": "not a predictor directory", "config-json": "is not a predictor config",
                    "config-list": "is not a predictor config", "config-fields": "does not fit"}


@pytest.mark.parametrize("damage", list(PREDICTOR_DAMAGE))
def test_a_broken_predictor_is_refused_on_load(tmp_path, damage):
    directory = _predictor_copy(tmp_path, damage)
    with pytest.raises(ExpertflowError) as info:
        RoutingPredictor.load(directory)
    message = str(info.value)
    assert "\n" not in message and str(directory) in message and PREDICTOR_DAMAGE[damage] in message
    if damage != "no-config":
        assert "retrain" in message


def _trace_file(path: Path, sequences: int = 3) -> Path:
    rng = np.random.default_rng(0)
    header = TraceHeader(model="tiny-mixtral-32e", num_layers=L, num_experts=E, top_k=K, vocab_size=8192)
    seqs = [TraceSequence(rng.integers(3, 8000, 6), rng.integers(3, 8000, 5), rng.integers(0, E, (11, L, K)), i)
            for i in range(sequences)]
    return TraceSet(header, seqs).write(path)


@pytest.mark.parametrize("damage", ["nan", "truncated", "config-json"])
def test_cli_with_a_broken_predictor_is_a_one_line_error(capsys, tmp_path, damage):
    directory = _predictor_copy(tmp_path, damage)
    traces = _trace_file(tmp_path / "t.safetensors")
    rc, err = _run(capsys, "eval-predictor", "--predictor", str(directory), "--traces", str(traces))
    _assert_one_line_error(rc, err, str(directory), PREDICTOR_DAMAGE[damage])
    rc, err = _run(capsys, "generate", "--prompt", "hi", "--max-new-tokens", "2", "--policy", "expertflow",
                   "--predictor", str(directory))
    _assert_one_line_error(rc, err, str(directory), PREDICTOR_DAMAGE[damage])


def test_eval_predictor_with_truncated_baseline_tables_is_a_one_line_error(capsys, tmp_path):
    directory = _predictor_copy(tmp_path, "tables")
    traces = _trace_file(tmp_path / "t.safetensors")
    build_tables([read_traces(traces)], vocab_size=8192).save(directory)
    tables = directory / BASELINES_NAME
    tables.write_bytes(tables.read_bytes()[:100])
    rc, err = _run(capsys, "eval-predictor", "--predictor", str(directory), "--traces", str(traces))
    _assert_one_line_error(rc, err, str(tables), "truncated or corrupt")


# ---- 4. prompts that are not UTF-8 ----------------------------------------------------------------------------
def test_a_prompt_argument_that_is_not_utf8_is_a_one_line_error(capsys, tmp_path):
    """Linux hands argv bytes that are not UTF-8 over as lone surrogates; checked before the model loads."""
    rc, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "caf\udce9")
    _assert_one_line_error(rc, err, "--prompt must be UTF-8 text")


@pytest.mark.parametrize("name,content", [
    ("bad.txt", b"caf\xe9\n"),
    ("bad.jsonl", b'{"prompt": "caf\xe9"}\n'),
    ("escaped.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\\udce9"}\n'),
    ("escaped.json", b'["caf\\ud800"]'),
])
def test_a_prompts_file_that_is_not_utf8_is_a_one_line_error(capsys, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    rc, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompts-file", str(path))
    _assert_one_line_error(rc, err, str(path), "UTF-8")


# ---- 5. temperature ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,shown", [("nan", "nan"), ("inf", "inf"), ("-1", "-1.0")])
def test_a_bad_temperature_is_a_one_line_error_before_the_model_loads(capsys, tmp_path, value, shown):
    message = f"--temperature must be a finite number >= 0, got {shown}"
    rc, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--temperature", value)
    _assert_one_line_error(rc, err, message)
    rc, err = _run(capsys, "trace", "--model", str(tmp_path / "nope"), "--dataset", "alpaca", "--temperature", value,
                   "--out", str(tmp_path / "t.safetensors"))
    _assert_one_line_error(rc, err, message)


def test_the_api_refuses_a_non_finite_temperature(tiny_mixtral_dir):
    model = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=12)
    for value in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ExpertflowError, match="--temperature must be a finite number >= 0"):
            model.generate(input_ids=[[5, 6]], max_new_tokens=2, temperature=value)
        with pytest.raises(ExpertflowError, match="--temperature must be a finite number >= 0"):
            model.generate_many(input_ids=[[5, 6]], max_new_tokens=2, temperature=value)
    model.close()


# ---- 6. trace files that are not traces ---------------------------------------------------------------------
def _raw_trace(path: Path, header: object = None, **replace: np.ndarray) -> Path:
    """A trace file written by hand, with some of its tensors (or its header) replaced."""
    rng = np.random.default_rng(1)
    tensors = {"prompt_lens": np.array([6, 6]), "generated_lens": np.array([5, 5]), "prompt_index": np.array([0, 1]),
               "run": np.array([0, 0]), "token_ids": rng.integers(3, 8000, 22).astype(np.int32),
               "routing": rng.integers(0, E, (22, L, K)).astype(np.int16)}
    if header is None:
        header = dict(format=FORMAT_NAME, version=FORMAT_VERSION, model="m", num_layers=L, num_experts=E, top_k=K)
    save_numpy({**tensors, **replace}, str(path), metadata={HEADER_KEY: json.dumps(header)})
    return path


BAD_TRACES = {
    "header-list": lambda p: _raw_trace(p, header=[1, 2]),
    "routing-2d": lambda p: _raw_trace(p, routing=np.zeros((22, L), np.int16)),
    "negative-length": lambda p: _raw_trace(p, prompt_lens=np.array([-4, 16])),
    "float-lengths": lambda p: _raw_trace(p, prompt_lens=np.array([6.0, 6.0])),
    "short-prompt-index": lambda p: _raw_trace(p, prompt_index=np.array([0])),
    "negative-token-ids": lambda p: _raw_trace(p, token_ids=-np.ones(22, np.int32)),
}


@pytest.mark.parametrize("damage", list(BAD_TRACES))
def test_a_trace_file_that_is_not_a_trace_is_a_one_line_error(capsys, tmp_path, damage):
    path = BAD_TRACES[damage](tmp_path / f"{damage}.safetensors")
    with pytest.raises(ExpertflowError) as info:
        read_traces(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    rc, err = _run(capsys, "eval-predictor", "--predictor", str(EMBEDDED_PREDICTOR_DIR), "--traces", str(path))
    _assert_one_line_error(rc, err, str(path))
    rc, err = _run(capsys, "train-predictor", "--traces", str(path), "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, str(path))


def test_eval_predictor_on_a_trace_without_sequences_is_a_one_line_error(capsys, tmp_path):
    path = _trace_file(tmp_path / "empty.safetensors", sequences=0)
    rc, err = _run(capsys, "eval-predictor", "--predictor", str(EMBEDDED_PREDICTOR_DIR), "--traces", str(path),
                   "--baseline-traces", str(_trace_file(tmp_path / "t.safetensors")))
    _assert_one_line_error(rc, err, str(path), "holds no sequences")
