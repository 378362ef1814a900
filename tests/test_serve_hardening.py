"""`expertflow serve` hardened: the API key, the request-size limit, an event loop that large requests do not
stall, and the port taken before the model loads. Over real HTTP, as in test_serve.py."""

from __future__ import annotations

import itertools
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import httpx
import pytest

import expertflow

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
h11 = pytest.importorskip("h11")

from expertflow.cli import build_parser, main  # noqa: E402
from expertflow.cli.serve import _serve_config, listen  # noqa: E402
from expertflow.errors import ExpertflowError  # noqa: E402
from expertflow.server import ServeConfig, build_service  # noqa: E402
from expertflow.server.app import create_app  # noqa: E402
from tests.serving import serving_app  # noqa: E402

MODEL = "tiny-mixtral-32e"
KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4 * 2**20   # ServeConfig's default max_request_bytes
UNAUTHORIZED = {"error": {
    "message": "missing or incorrect API key: send the header `Authorization: Bearer KEY` with the key the server "
               "was started with (--api-key or EXPERTFLOW_API_KEY)",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
TOO_LARGE = {"error": {
    "message": f"the request body is larger than this server's limit of {LIMIT} bytes: send a smaller request, "
               "or start the server with a larger --max-request-bytes",
    "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
RUN_CLI = "import sys; from expertflow.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    model = expertflow.from_pretrained(cache_experts=64)
    config = ServeConfig(api_key=KEY)
    with serving_app(create_app(build_service(model, config), config)) as base:
        yield base
    model.close()


def completion(prompt, max_tokens: int = 1) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def _no_model(*_, **__):
    raise AssertionError("the model was built before the arguments and the port were checked")


def client_errors(url: str) -> int:
    return httpx.get(url + "/metrics", headers=AUTH, timeout=30).json()["requests"]["client_errors"]


# ---- the API key ---------------------------------------------------------------------------------------
PROTECTED = [("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/v1/nowhere", None),
             ("POST", "/v1/completions", completion("Hello")),
             ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})]
WRONG_AUTHORIZATION = [None, f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer", f"Basic {KEY}", KEY,
                       f"Bearer {KEY.upper()}"]


@pytest.mark.parametrize("authorization", WRONG_AUTHORIZATION)
def test_every_path_but_health_needs_the_key(url, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    before = client_errors(url)
    for method, path, body in PROTECTED:
        r = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
        assert (r.status_code, r.json()) == (401, UNAUTHORIZED), (method, path)
        assert r.headers["www-authenticate"] == "Bearer"
    assert client_errors(url) == before + len(PROTECTED)
    assert httpx.get(url + "/health", headers=headers, timeout=30).json() == {"status": "ok", "running": 0}


def test_the_key_opens_every_path(url):
    for method, path, body in PROTECTED:
        r = httpx.request(method, url + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == (404 if path == "/v1/nowhere" else 200), (path, r.text)
    lower = httpx.get(url + "/v1/models", headers={"authorization": f"bearer {KEY}"}, timeout=30)
    assert lower.status_code == 200   # the scheme is case-insensitive (RFC 7235), the key is not


def test_openai_client_with_and_without_the_key(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="The river", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_a_client_without_the_key_is_refused_before_its_body_is_read(url):
    status, body, sent = send_unfinished(url, [("Content-Length", str(100 * 2**20))], [])
    assert (status, body, sent) == (401, UNAUTHORIZED, 0)


@pytest.mark.parametrize("key, problem", [("", "empty"), ("two words", "without spaces"),
                                          ("clé", "printable ASCII"), ("tab\tkey", "printable ASCII")])
def test_serve_config_refuses_a_key_no_header_can_carry(key, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        ServeConfig(api_key=key)
    assert not key or key not in str(caught.value)   # a message never quotes the key


def test_the_key_stays_out_of_the_config_repr():
    assert KEY not in repr(ServeConfig(api_key=KEY))


def serve_args(*flags: str) -> ServeConfig:
    return _serve_config(build_parser().parse_args(["serve", *flags]))


def test_the_key_comes_from_the_flag_else_the_environment(monkeypatch):
    monkeypatch.delenv("EXPERTFLOW_API_KEY", raising=False)
    assert serve_args().api_key is None
    monkeypatch.setenv("EXPERTFLOW_API_KEY", "from-env")
    assert serve_args().api_key == "from-env"
    assert serve_args("--api-key", "from-flag").api_key == "from-flag"
    monkeypatch.setenv("EXPERTFLOW_API_KEY", "")   # set but empty: no key, as VLLM_API_KEY
    assert serve_args().api_key is None


def test_an_empty_api_key_flag_is_a_cli_error(monkeypatch, capsys):
    monkeypatch.setattr("expertflow.api.ExpertflowModel", _no_model)
    assert main(["serve", "--api-key", ""]) == 2
    assert capsys.readouterr().err == ("expertflow: error: the API key is empty: pass a non-empty --api-key KEY, "
                                       "or leave it out to serve without a key\n")


# ---- the request-size limit ----------------------------------------------------------------------------
def send_unfinished(url: str, headers: list[tuple[str, str]], chunks: Iterable[bytes],
                    authorization: dict[str, str] | None = None) -> tuple[int, dict, int]:
    """POSTs /v1/completions with `headers`, then sends `chunks` one by one until the server answers, never
    ending the body; returns (status, JSON body, body bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    conn = h11.Connection(h11.CLIENT)
    head = [("Host", host), ("Content-Type", "application/json"), *headers, *(authorization or {}).items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(conn.send(h11.Request(method="POST", target="/v1/completions", headers=head)))
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:   # the server answered
                break
            sock.sendall(conn.send(h11.Data(data=chunk)))
            sent += len(chunk)
        status, body = None, b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
    return status, httpx.Response(200, content=body).json(), sent


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(url):
    before = client_errors(url)
    status, body, sent = send_unfinished(url, [("Content-Length", str(LIMIT + 1))], [], AUTH)
    assert (status, body, sent) == (413, TOO_LARGE, 0)
    assert client_errors(url) == before + 1


def test_a_chunked_body_is_refused_once_past_the_limit_without_waiting_for_its_end(url):
    chunks = itertools.repeat(b" " * 2**16, 64 * 2**20 // 2**16)   # up to 64 MiB, never ended
    status, body, sent = send_unfinished(url, [("Transfer-Encoding", "chunked")], chunks, AUTH)
    assert (status, body) == (413, TOO_LARGE)
    assert LIMIT < sent < 64 * 2**20   # the answer came while the body was still being sent


def padded(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = httpx.Request("POST", "/", json=completion("Hello")).content
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_at_the_limit_is_served_and_one_byte_more_is_not(url, chunked):
    def post(body: bytes) -> httpx.Response:
        content = iter([body[:LIMIT // 2], body[LIMIT // 2:]]) if chunked else body
        return httpx.post(url + "/v1/completions", content=content, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})

    at_limit = post(padded(LIMIT))
    assert at_limit.status_code == 200 and at_limit.json()["usage"]["completion_tokens"] == 1
    over = post(padded(LIMIT + 1))
    assert (over.status_code, over.json()) == (413, TOO_LARGE)


def test_max_request_bytes_is_a_size_with_a_floor():
    assert serve_args().max_request_bytes == LIMIT == ServeConfig().max_request_bytes
    assert serve_args("--max-request-bytes", "16MiB").max_request_bytes == 16 * 2**20
    assert serve_args("--max-request-bytes", "65536").max_request_bytes == 65536
    with pytest.raises(ExpertflowError, match="at least 1024"):
        serve_args("--max-request-bytes", "4")


# ---- nothing large runs on the event loop --------------------------------------------------------------
def health_while(url: str, request: Callable[[], httpx.Response]) -> tuple[httpx.Response, list[float]]:
    """`request`'s response, and how long each /health took while it was in flight."""
    out: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: out.setdefault("response", request()))
    worker.start()
    seconds = []
    while worker.is_alive():
        start = time.perf_counter()
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        seconds.append(time.perf_counter() - start)
    worker.join()
    return out["response"], seconds


LONG_TEXT = "word " * 700_000   # 3.5 MB, 700k tokens: seconds of tokenizing, under the 4 MiB limit


@pytest.mark.parametrize("path, body, code, message", [
    ("/v1/completions", completion(LONG_TEXT), "context_length_exceeded", "a prompt of 70000"),   # read whole
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG_TEXT}]},
     "context_length_exceeded", "a prompt of 70000"),
    ("/v1/completions", completion([7] * 1_900_000), "context_length_exceeded", "a prompt of 1900000 "),
    # one string among 1.3M token ids: pydantic by default builds an error per id (seconds, on the loop)
    ("/v1/completions", completion(["a"] + [7] * 1_300_000), "invalid_type", "prompt.str: "),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}] + [7] * 1_300_000},
     "invalid_type", "messages.1: ")],
    ids=["completion", "chat", "token-ids", "mixed-prompt", "bad-messages"])
def test_health_answers_while_a_large_body_is_read(url, path, body, code, message):
    response, seconds = health_while(url, lambda: httpx.post(url + path, json=body, headers=AUTH, timeout=120))
    assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert response.json()["error"]["message"].startswith(message)
    assert len(seconds) >= 2 and max(seconds) < 1.0, seconds


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_health_answers_while_a_huge_body_is_refused(url, chunked):
    body = httpx.Request("POST", "/", json=completion([7] * 4_000_000)).content   # 12 MB
    content = (body[i:i + 2**20] for i in range(0, len(body), 2**20)) if chunked else body
    response, seconds = health_while(url, lambda: httpx.post(url + "/v1/completions", content=content,
                                                             headers=AUTH, timeout=120))
    assert (response.status_code, response.json()) == (413, TOO_LARGE)
    assert max(seconds, default=0) < 1.0, seconds


# ---- the port ------------------------------------------------------------------------------------------
@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def in_use(port: int) -> str:
    return (f"expertflow: error: port {port} on 127.0.0.1 is in use; pass --port N with a free port, or stop "
            "the server listening there\n")


def test_a_port_in_use_fails_before_the_model_is_built(taken_port, monkeypatch, capsys):
    monkeypatch.setattr("expertflow.api.ExpertflowModel", _no_model)
    start = time.perf_counter()
    assert main(["serve", "--port", str(taken_port)]) == 2
    assert time.perf_counter() - start < 2.0
    assert capsys.readouterr().err == in_use(taken_port)


def test_serve_on_a_port_in_use_exits_2_with_one_line(taken_port):
    done = subprocess.run([sys.executable, "-c", RUN_CLI, "serve", "--port", str(taken_port)],
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (2, in_use(taken_port))


def test_listen_names_an_address_it_cannot_take():
    with pytest.raises(ExpertflowError, match=r"cannot listen on 203\.0\.113\.1 port 8000: .*; pass another --host"):
        listen("203.0.113.1", 8000)   # TEST-NET-3: no interface of this machine has it


def wait_for_health(base: str, proc: subprocess.Popen) -> httpx.Response:
    """/health once the server process listens (its socket does before the model loads; until it starts
    serving, a connection waits in the backlog)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            return httpx.get(base + "/health", timeout=300)
        except httpx.ConnectError:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)


def test_serve_end_to_end_with_the_key_from_the_environment():
    """The real command serves on the socket it took before the load, guarded by the key it read."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "EXPERTFLOW_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-c", RUN_CLI, "serve", "--port", str(port), "--cache-experts", "64",
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for_health(base, proc).json() == {"status": "ok", "running": 0}
        assert httpx.get(base + "/v1/models", timeout=30).status_code == 401
        models = httpx.get(base + "/v1/models", headers=AUTH, timeout=30)
        assert [m["id"] for m in models.json()["data"]] == [MODEL]
    finally:
        proc.send_signal(signal.SIGINT)   # as Ctrl-C: uvicorn shuts down, then the CLI reports the interrupt
        _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr.splitlines()[-1]) == (130, "expertflow: interrupted"), stderr


def test_help_names_the_new_flags(capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "--help"])
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--api-key KEY" in text and "EXPERTFLOW_API_KEY" in text
    assert "--max-request-bytes SIZE" in text and "(default 4MiB)" in text
