"""The ASGI app: OpenAI-compatible routes over a `Service`, built by `create_app` from its parts.

POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from expertflow.server.errors import install_error_handlers
from expertflow.server.schemas import ChatRequest, CompletionRequest
from expertflow.server.service import Service


def create_app(service: Service) -> FastAPI:
    """The app for `service`; its engine thread starts and stops with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.loop.start()
        yield
        service.loop.stop()

    app = FastAPI(title="expertflow", lifespan=lifespan)
    install_error_handlers(app, on_error=service.metrics.count_status)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return _respond(await service.completion(req))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        return _respond(await service.chat(req))

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


def _respond(result: dict | AsyncIterator[str]) -> dict | StreamingResponse:
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
