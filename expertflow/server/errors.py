"""OpenAI-style error objects: `{"error": {"message", "type", "param", "code"}}` with a matching HTTP status.

Every failure a client can see goes through `APIError`, so the body shape is the same whether the request
was malformed, named an unknown model, overflowed the context or hit a failure inside the engine."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client: its HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized() -> APIError:
    """No key, or not the server's; OpenAI answers a bad key the same way (401, `invalid_api_key`)."""
    return APIError(401, "missing or incorrect API key: send the header `Authorization: Bearer KEY` with the key "
                         "the server was started with (--api-key or EXPERTFLOW_API_KEY)", code="invalid_api_key")


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes: send a smaller "
                         "request, or start the server with a larger --max-request-bytes", code="request_too_large")


def server_error(exc: BaseException) -> APIError:
    """A failure inside the engine: the request could not be completed through no fault of its own."""
    return APIError(500, f"the engine failed while running this request: {type(exc).__name__}: {exc}",
                    type="server_error", code="engine_failure")


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem, named by its field path, as one line (pydantic lists them all)."""
    first = exc.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return invalid(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                       code="invalid_json")
    param = ".".join(where) or None
    return invalid(f"{param or 'body'}: {first['msg']}", param=param,
                   code="missing_field" if first.get("type") == "missing" else "invalid_type")


def install_error_handlers(app: FastAPI, on_error: Callable[[int], None]) -> None:
    """Answer every error with the OpenAI error object (FastAPI's defaults are 422 and `{"detail": ...}`);
    `on_error(status)` counts each one."""

    def answer(error: APIError) -> JSONResponse:
        on_error(error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return answer(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while handling a request")
        return answer(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))
