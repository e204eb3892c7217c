"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

    Exception
     ├── APIError               raised by our code: status, type, param, code, headers
     ├── EngineUnavailable      an engine cannot serve now (`stamen.api.engine`): 503
     └── (Litestar HTTPException, anything else)
                                translated at the boundary by `exception_handlers`

Status codes follow OpenAI: 400 for every invalid request (validation included, where
Litestar would say 422), 401 bad key, 404 unknown model, file, job or route, 413 body
(or uploaded file) too large,
429 too many requests in flight, 503 (with Retry-After) while the swarm cannot serve or
the server is stopping; 499 (nginx's "client closed request", for the logs and metrics
only: nobody reads it) when the client left before its answer was ready.
An unexpected exception is logged and answered 500 in the same shape, never a traceback.

This module knows nothing about models or decoding.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from litestar import Request, Response
from litestar.exceptions import HTTPException

from stamen.api.engine import EngineUnavailable

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    499: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client should see as OpenAI would show it."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status_code, "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str | None = None) -> APIError:
    detail = what or f"`{param}`"
    return APIError(
        400,
        f"{detail} is not supported by this server.",
        param=param,
        code="unsupported_parameter",
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def file_not_found(file_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param=param, code="file_not_found")


def job_not_found(job_id: str) -> APIError:
    return APIError(
        404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found"
    )


def file_too_large(max_file_bytes: int) -> APIError:
    return APIError(
        413,
        f"The file is larger than this server accepts ({max_file_bytes} bytes at most; "
        "swarm-api --max-file-bytes).",
        param="file",
        code="file_too_large",
    )


def not_ready(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "The swarm does not serve every block of this model right now; retry shortly.",
        code="service_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def shutting_down(retry_after_s: int) -> APIError:
    return APIError(
        503,
        "The server is shutting down; retry on another replica or shortly.",
        code="service_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def client_closed() -> APIError:
    return APIError(499, "The client closed the request.", code="client_closed_request")


def error_response(error: APIError) -> Response[bytes]:
    return Response(
        orjson.dumps(error.body()),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers,
    )


def _from_api_error(_: Request[Any, Any, Any], error: APIError) -> Response[bytes]:
    return error_response(error)


def _from_http_exception(_: Request[Any, Any, Any], error: HTTPException) -> Response[bytes]:
    status = error.status_code
    if status == 422:
        status = 400
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    message = error.detail or "request failed"
    if status == 413:
        message = "The request body is larger than this server accepts."
    return error_response(APIError(status, message, code=code, headers=dict(error.headers or {})))


def _from_engine_unavailable(
    request: Request[Any, Any, Any], error: EngineUnavailable
) -> Response[bytes]:
    logger.warning("cannot serve %s: %s", request.url.path, error)
    api = getattr(request.app.state, "api", None)
    retry_after_s = api.settings.retry_after_s if api is not None else 5
    return error_response(unavailable(error, retry_after_s))


def unavailable(error: EngineUnavailable, retry_after_s: int) -> APIError:
    return APIError(
        503,
        f"The swarm cannot serve this model right now; retry shortly. ({error})",
        code="service_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def _from_unexpected(request: Request[Any, Any, Any], error: Exception) -> Response[bytes]:
    logger.exception("unexpected error serving %s %s", request.method, request.url.path)
    return error_response(
        APIError(500, "The server had an error while processing your request.", type="server_error")
    )


exception_handlers: Any = {
    APIError: _from_api_error,
    EngineUnavailable: _from_engine_unavailable,
    HTTPException: _from_http_exception,
    Exception: _from_unexpected,
}
