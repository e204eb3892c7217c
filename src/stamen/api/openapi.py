"""The OpenAPI 3.1 document of this server, built once from its routes and msgspec schemas.

Request bodies are read by `schemas.decode_request`, not by Litestar, so Litestar cannot
describe them. Each route names its body and its answer instead, in its `opt`:

    @post("/v1/chat/completions", request_body=s.ChatCompletionRequest,
          response_body=s.ChatCompletion, streams=True)

and `openapi_document` turns those types into JSON Schema with msgspec: the same types
that decode requests, so the document states exactly what the server accepts, numeric
ranges included. Every operation also lists the errors it can answer, in OpenAI's shape.
A route without `response_body` is documented as answering some JSON object. An upload
names its form instead (`multipart_body=`, a struct of the form's fields), and a
handler's keyword parameters with defaults are its query parameters.

This module knows nothing about models; it reads route handlers and types only.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Iterable
from typing import Any

import msgspec
from litestar.handlers import HTTPRouteHandler

OPENAPI_PATH = "/schema/openapi.json"

_REF = "#/components/schemas/{name}"
_PATH_PARAMETER = re.compile(r"\{(\w+):\w+\}")


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """Every 4xx and 5xx answer: `{"error": {...}}` (`stamen.api.errors`)."""

    error: ErrorDetail


_ERRORS = {
    "400": "Invalid request (a field named in `error.param`)",
    "401": "Missing or wrong API key (when the server has keys)",
    "404": "Unknown model, file, job or route",
    "413": "Request body (or uploaded file) larger than the server accepts",
    "429": "Too many generations in flight; retry after `Retry-After`",
    "503": "The swarm cannot serve now, or the server is stopping; retry after `Retry-After`",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(struct: type) -> dict[str, Any]:
    return {"$ref": _REF.format(name=struct.__name__)}


def _query_parameters(handler: HTTPRouteHandler) -> list[dict[str, Any]]:
    hints = typing.get_type_hints(handler.fn, include_extras=True)
    parameters = []
    for name, parameter in inspect.signature(handler.fn).parameters.items():
        if parameter.default is inspect.Parameter.empty:
            continue  # dependencies and path parameters
        schema = msgspec.json.schema(hints[name])
        parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
    return parameters


def _operation(handler: HTTPRouteHandler, method: str, parameters: list[str]) -> dict[str, Any]:
    opt = handler.opt
    answer: dict[str, Any] = (
        _json(_ref(opt["response_body"])) if "response_body" in opt else _json({"type": "object"})
    )
    if opt.get("streams"):
        answer["text/event-stream"] = {"schema": {"type": "string"}}
    if handler.media_type.startswith("text/plain"):
        answer = {"text/plain": {"schema": {"type": "string"}}}
    operation: dict[str, Any] = {
        "operationId": handler.handler_name,
        "summary": (handler.fn.__doc__ or handler.handler_name).strip().splitlines()[0],
        "responses": {"200": {"description": "OK", "content": answer}},
    }
    if "request_body" in opt:
        operation["requestBody"] = {"required": True, "content": _json(_ref(opt["request_body"]))}
    if "multipart_body" in opt:
        form = {"multipart/form-data": {"schema": _ref(opt["multipart_body"])}}
        operation["requestBody"] = {"required": True, "content": form}
    query = _query_parameters(handler)
    if parameters or query:
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in parameters
        ] + query
    if method != "GET" or parameters:
        errors = {code: text for code, text in _ERRORS.items() if method != "GET" or code == "404"}
        for code, text in errors.items():
            operation["responses"][code] = {
                "description": text,
                "content": _json(_ref(ErrorResponse)),
            }
    return operation


def openapi_document(
    handlers: Iterable[HTTPRouteHandler], *, title: str, version: str
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `handlers` (those with `include_in_schema`)."""
    paths: dict[str, dict[str, Any]] = {}
    structs: list[type] = [ErrorResponse]
    for handler in handlers:
        if handler.include_in_schema is False:
            continue
        for key in ("request_body", "response_body", "multipart_body"):
            if key in handler.opt:
                structs.append(handler.opt[key])
        for path in sorted(handler.paths):
            parameters = _PATH_PARAMETER.findall(path)
            item = paths.setdefault(_PATH_PARAMETER.sub(r"{\1}", path), {})
            for method in sorted(handler.http_methods):
                item[method.lower()] = _operation(handler, method, parameters)
    _, components = msgspec.json.schema_components(structs, ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
