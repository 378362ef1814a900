"""The ASGI app: OpenAI-compatible routes over a `Service`, built by `create_app` from its parts.

POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics. With an API key set, every path but /health
needs it; bodies over `max_request_bytes` are refused unread (`middleware`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from expertflow.server import ServeConfig
from expertflow.server.errors import install_error_handlers
from expertflow.server.middleware import LimitBody, RequireAPIKey
from expertflow.server.schemas import ChatRequest, CompletionRequest
from expertflow.server.service import Service

RequestT = TypeVar("RequestT", bound=BaseModel)


def create_app(service: Service, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The app for `service`, guarded by `config`'s API key and body limit; its engine thread starts and stops
    with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.loop.start()
        yield
        service.loop.stop()

    app = FastAPI(title="expertflow", lifespan=lifespan)
    install_error_handlers(app, on_error=service.metrics.count_status)
    # The last added runs first: a request without the key is refused before its body is read.
    app.add_middleware(LimitBody, max_bytes=config.max_request_bytes, on_error=service.metrics.count_status)
    if config.api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=config.api_key, on_error=service.metrics.count_status)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return _respond(await service.completion(await read_body(request, CompletionRequest)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return _respond(await service.chat(await read_body(request, ChatRequest)))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": service.model_id, "object": "model", "created": int(service.metrics.started),
            "owned_by": "expertflow", "max_model_len": service.max_positions}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = service.loop.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped", "running": service.loop.running,
                             **await service.loop.report()}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> dict:
        snapshot = service.metrics.snapshot(await service.loop.cache_report(), service.loop.running)
        return {**snapshot, **await service.loop.report()}

    return app


async def read_body(request: Request, schema: type[RequestT]) -> RequestT:
    """The JSON body as `schema`, parsed and validated in a worker thread rather than by FastAPI on the event
    loop, where a body of megabytes would hold up every other request, `/health` included."""
    return await to_thread.run_sync(_validate, schema, await request.body())


def _validate(schema: type[RequestT], body: bytes) -> RequestT:
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:   # answered as FastAPI's own validation errors are
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


def _respond(result: dict | AsyncIterator[str]) -> dict | StreamingResponse:
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
