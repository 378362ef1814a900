"""`expertflow serve` over real HTTP: the app runs in uvicorn on a loopback port (in a thread of this process)
and clients talk to it with httpx, the `openai` package and lm-eval's `local-completions`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import expertflow
from expertflow.engine.steps import Batch, BatchRun, BatchRunner
from expertflow.datasets import alpaca_records, load_prompts
from expertflow.embedded import EMBEDDED_MODEL_DIR
from expertflow.scheduler import scheduler_class

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from expertflow.server import SERVE_SCHEDULERS, ServeConfig, build_service  # noqa: E402
from expertflow.server.app import create_app  # noqa: E402
from tests.serving import serving_app  # noqa: E402

MODEL = "tiny-mixtral-32e"
POISON = 4242  # a prompt starting with this token id makes FailingRunner's batch fail


class FailingRunner(BatchRunner):
    """A runner whose decode batches fail when they hold a poisoned prompt: a fault inside the engine."""

    def run_batch(self, batch: Batch) -> BatchRun:
        if any(seq.prompt[0] == POISON for seq in batch.members):
            raise RuntimeError("injected expert load failure")
        return super().run_batch(batch)


def serving(model, config: ServeConfig, runner: BatchRunner | None = None):
    """The app in uvicorn on a free loopback port; yields its base URL, stops it on exit."""
    return serving_app(create_app(build_service(model, config, runner)))


@pytest.fixture(scope="module")
def reference():
    """A separate model: what each request would produce alone (engine.generate, one prompt, greedy)."""
    model = expertflow.from_pretrained(cache_experts=64)
    yield lambda ids, n: model.generate(input_ids=[ids], max_new_tokens=n).sequences[0]
    model.close()


@pytest.fixture(scope="module")
def model():
    model = expertflow.from_pretrained(cache_experts=64)  # 25% of the experts: lru loads on the way
    yield model
    model.close()


@pytest.fixture(scope="module")
def url(model) -> Iterator[str]:
    with serving(model, ServeConfig(scheduler="fifo", max_batch_size=4)) as base:
        yield base


def post(url: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout)


def sse_events(response: httpx.Response) -> list:
    lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def health(url: str) -> dict:
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def test_completion_equals_greedy_alone_whole_and_streamed(url, model, reference):
    ids = model.encode("The history of the city")
    expected = model.decode(reference(ids, 8))
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "The history of the city", "max_tokens": 8,
                                      "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] == len(ids)
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 8,
                                                             "temperature": 0, "stream": True}, timeout=60) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(s)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


def test_chat_uses_the_plain_template_whole_and_streamed(url, model, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = "system: Be brief.\nuser: Name a colour.\nassistant:"   # the documented plain template
    expected = model.decode(reference(model.encode(prompt), 6))
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": expected}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        chunks = sse_events(s)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stop_string_ends_the_choice(url, model, reference):
    ids = model.encode("The history of the city")
    full = model.decode(reference(ids, 12))
    stop = full.strip().split()[1]
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 12, "temperature": 0,
                                      "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:full.find(stop)] and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("scheduler", ["fifo", "similarity"])
def test_32_concurrent_requests_each_equal_to_greedy_alone(scheduler, reference):
    prompts = [p[:60] for p in load_prompts("alpaca", limit=32)]
    model = expertflow.from_pretrained(cache_experts=64)
    expected = [model.decode(reference(model.encode(p), 4)) for p in prompts]

    async def ask_all(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(*[client.post("/v1/completions", json={
                "model": MODEL, "prompt": p, "max_tokens": 4, "temperature": 0}) for p in prompts])

    with serving(model, ServeConfig(scheduler=scheduler, max_batch_size=4)) as base:
        responses = asyncio.run(ask_all(base))
        metrics = httpx.get(base + "/metrics").json()
    model.close()
    assert [r.status_code for r in responses] == [200] * 32
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    assert metrics["requests"]["succeeded"] == 32 and metrics["requests"]["running"] == 0
    assert metrics["cache"]["loads"] > 0 and metrics["cache"]["capacity_experts"] == 64
    assert 0 < metrics["cache"]["hit_ratio"] < 1 and metrics["latency_seconds"]["count"] == 32


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_type"),
    ("/v1/completions", {"prompt": "hi"}, 400, "missing_field"),
    ("/v1/completions", {"model": MODEL}, 400, "missing_field"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "8"}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": 12}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": [7] * 1020, "max_tokens": 8}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty_prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "invalid_token_ids"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "missing_field"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_type"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model_not_found"),
    ("/v1/nowhere", {}, 404, None),
]


def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(url):
    for path, body, status, code in BAD_REQUESTS:
        r = (httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
             if isinstance(body, bytes) else post(url, path, body))
        assert r.status_code == status, (path, body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["code"] == code, (body, error)
    assert health(url) == {"status": "ok", "running": 0}
    ok = post(url, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_client_disconnect_mid_stream_frees_its_slot(url):
    before = httpx.get(url + "/metrics").json()["requests"]["cancelled"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # 1000 tokens would take far longer than this: the engine dropped the sequence when the client left
    deadline = time.monotonic() + 20
    while health(url)["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(url)["running"] == 0
    assert httpx.get(url + "/metrics").json()["requests"]["cancelled"] == before + 1


def test_engine_failure_fails_that_request_with_500_and_the_server_keeps_serving():
    model = expertflow.from_pretrained()
    runner = FailingRunner(model.engine, scheduler_class("fifo")(), batch_size=4)
    with serving(model, ServeConfig(), runner) as base:
        r = post(base, "/v1/completions", {"model": MODEL, "prompt": [POISON, 5, 6], "max_tokens": 4})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and "injected" in r.json()["error"]["message"]
        assert health(base) == {"status": "ok", "running": 0}
        ok = post(base, "/v1/completions", {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(base + "/metrics").json()["requests"]["server_errors"] == 1
    model.close()


def test_engine_failure_fails_only_the_failing_batch():
    """Two requests in flight in different batches: the poisoned one gets a 500, the other its answer."""
    model = expertflow.from_pretrained()  # its own engine: a session owns its engine's routing recorder
    runner = FailingRunner(model.engine, scheduler_class("fifo")(), batch_size=1)
    expected = model.generate(input_ids=[[5, 6, 7]], max_new_tokens=6).sequences[0]
    with serving(model, ServeConfig(), runner) as base:
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(post, base, "/v1/completions",
                              {"model": MODEL, "prompt": [POISON, 5, 6], "max_tokens": 6, "temperature": 0})
            good = pool.submit(post, base, "/v1/completions",
                               {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0})
            bad, good = bad.result(), good.result()
        assert bad.status_code == 500 and "injected" in bad.json()["error"]["message"]
        assert good.status_code == 200
        assert good.json()["choices"][0]["text"] == model.decode(expected)
        assert health(base) == {"status": "ok", "running": 0}
    model.close()


def test_echo_logprobs_equal_a_transformers_forward(url, model):
    from transformers import AutoModelForCausalLM

    ids = model.encode("Describe a process of making crepes.")
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": [ids], "max_tokens": 1, "temperature": 0,
                                      "echo": True, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    hf = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32)
    with torch.inference_mode():
        full = ids + [int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
        logp = torch.log_softmax(hf(input_ids=torch.tensor([full])).logits[0], dim=-1)
    expected = logp[torch.arange(len(full) - 1), torch.tensor(full[1:])]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), expected, rtol=0, atol=1e-5)
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # the greedy token is the top one


def test_openai_client_chat_completion_and_streaming(url, model, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    expected = model.decode(reference(model.encode("The river"), 5))
    completion = client.completions.create(model=MODEL, prompt="The river", max_tokens=5, temperature=0)
    assert completion.choices[0].text == expected and completion.usage.completion_tokens == 5
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_cli_registers_serve_with_the_server_schedulers():
    from expertflow.cli import build_parser
    from expertflow.cli.serve import SERVE_SCHEDULERS as CLI_SCHEDULERS

    assert CLI_SCHEDULERS == SERVE_SCHEDULERS
    args = build_parser().parse_args(["serve", "--port", "0", "--scheduler", "similarity", "--cache-experts", "64"])
    assert (args.command, args.scheduler, args.max_batch_size, args.host) == ("serve", "similarity", 8, "127.0.0.1")
    with pytest.raises(ValueError, match="scheduler"):
        ServeConfig(scheduler="exact")


def write_lm_eval_task(root: Path) -> None:
    """A multiple-choice task over alpaca records: the right response's opening words vs another's."""
    records = alpaca_records()[:4]
    with open(root / "items.jsonl", "w") as f:
        for i, rec in enumerate(records):
            other = records[(i + 1) % len(records)]
            choices = [" " + " ".join(r["output"].split()[:5]) for r in (rec, other)]
            f.write(json.dumps({"context": f"Instruction: {rec['instruction']}\nResponse:", "choices": choices,
                                "gold": 0}) + "\n")
    (root / "task.yaml").write_text(
        "task: alpaca_pick\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'items.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def test_lm_eval_local_completions_through_serve_equals_hf_backend(url, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the task's data are local files: never ask the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_lm_eval_task(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path))
    path = str(EMBEDDED_MODEL_DIR)
    backends = {"local-completions": {"base_url": url + "/v1/completions", "model": MODEL, "tokenizer": path,
                                      "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1},
                "hf": {"pretrained": path, "dtype": "float32", "device": "cpu", "batch_size": 1}}
    results = {name: lm_eval.simple_evaluate(model=name, model_args=args, tasks=["alpaca_pick"],
                                             task_manager=tasks, log_samples=True)
               for name, args in backends.items()}
    served, hf = (results[n] for n in backends)
    assert served["results"]["alpaca_pick"]["acc,none"] == hf["results"]["alpaca_pick"]["acc,none"]
    ll = {n: torch.tensor([[c[0] for c in s["filtered_resps"]] for s in r["samples"]["alpaca_pick"]],
                          dtype=torch.float64) for n, r in results.items()}
    torch.testing.assert_close(ll["local-completions"], ll["hf"], rtol=0, atol=1e-4)
