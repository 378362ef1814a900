"""ASGI middleware that answers a request before any route sees it: a missing or wrong API key (401) and a
body over the size limit (413), each with the OpenAI error object."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from expertflow.server.errors import APIError, too_large, unauthorized

OPEN_PATHS = frozenset({"/health"})   # liveness probes carry no key


async def _answer(error: APIError, scope: Scope, receive: Receive, send: Send,
                  on_error: Callable[[int], None], headers: dict[str, str] | None = None) -> None:
    on_error(error.status)
    await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)


class RequireAPIKey:
    """Every path but `/health` needs `Authorization: Bearer KEY`. Checked from the headers alone, so a client
    without the key is refused before its body is read."""

    def __init__(self, app: ASGIApp, api_key: str, on_error: Callable[[int], None]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            await _answer(unauthorized(), scope, receive, send, self.on_error, {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = value.strip().partition(b" ")
        # compare_digest takes as long whatever prefix of the key a guess gets right
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)


class LimitBody:
    """Reads each request's body up to `max_bytes` and hands it on whole; a body over the limit gets a 413 as
    soon as that is known: from its Content-Length before any of it is read, or, sent chunked, at the chunk
    that crosses the limit. So no more than `max_bytes` and one chunk of a body is ever held."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_error: Callable[[int], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _content_length(scope) > self.max_bytes:
            await _answer(too_large(self.max_bytes), scope, receive, send, self.on_error)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":   # the client left before sending its whole body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _answer(too_large(self.max_bytes), scope, receive, send, self.on_error)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _content_length(scope: Scope) -> int:
    """The declared body size; 0 without a header (chunked, or no body). The HTTP server has already refused a
    malformed one."""
    value = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
    return int(value) if value.isdigit() else 0


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body as one message, then whatever the client sends next (a
    disconnect, which streaming responses listen for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
