"""`/v1/responses`: OpenAI's Responses API on the chat machinery and the SQLite store.

POST   /v1/responses                        create (JSON, or typed SSE events with `stream`)
GET    /v1/responses/{id}                   a stored response
DELETE /v1/responses/{id}                   `{"id", "object": "response", "deleted": true}`
GET    /v1/responses/{id}/input_items       `after`, `limit` (1..100), `order` (default desc)

A request becomes a chat completion request (`responses_translate`): `instructions`, the
conversation of `previous_response_id` (every earlier response's input items and output,
read back from the store, so it survives a restart), then `input`. `serving.chat_job`
validates and renders it like any chat request, and `responses_run.ResponseRun` turns
the generation into output items and events. Unless `store: false`, the finished
response and its input items are written to the store before the client is told it is
done; with `store: false` nothing is kept and retrieving it is a 404.

A generation ends early when its client disconnects or the server stops, as chat does:
streams through `sse_stream`, whole responses through `unless_abandoned`. An abandoned
response is not stored.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter

from stamen.api.cancellation import unless_abandoned
from stamen.api.errors import APIError, invalid_request, unsupported
from stamen.api.responses_run import ResponseRun
from stamen.api.responses_schemas import (
    InputItemList,
    Item,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
    TextConfig,
)
from stamen.api.responses_translate import (
    chat_request,
    function_tools,
    in_responses_terms,
    input_items,
    message_items,
    new_item_id,
    refuse_unsupported,
)
from stamen.api.schemas import decode_request
from stamen.api.serving import chat_job, check_ready
from stamen.api.state import ApiState
from stamen.api.store import Database, MissingResponse, Store, UnknownCursor
from stamen.api.streaming import sse_stream

Api = NamedDependency[ApiState]
Stored = NamedDependency[Store]
AnyRequest = Request[Any, Any, Any]
Limit = Annotated[int, QueryParameter(ge=1, le=100)]

MAX_CONVERSATION_RESPONSES = 1024  # earlier responses a `previous_response_id` may chain


def response_not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(
        404,
        f"Response with id '{response_id}' not found.",
        param=param,
        code="previous_response_not_found" if param else "response_not_found",
    )


async def _history(store: Store, previous_id: str | None) -> list[Item]:
    """The items of the conversation `previous_id` ends: each response's input, then its
    output, oldest first."""
    if previous_id is None:
        return []
    try:
        chain = await store.run(Database.response_chain, previous_id, MAX_CONVERSATION_RESPONSES)
    except MissingResponse as missing:
        if missing.response_id == previous_id:
            raise response_not_found(previous_id, "previous_response_id") from None
        raise APIError(
            404,
            f"Response '{missing.response_id}', an earlier turn of '{previous_id}', was deleted.",
            param="previous_response_id",
            code="previous_response_not_found",
        ) from None
    except ValueError as error:
        raise invalid_request(f"Invalid 'previous_response_id': {error}.",
                              param="previous_response_id") from None  # fmt: skip
    items: list[Item] = []
    for stored in chain:
        items += stored.input_items
        items += stored.response.output
    return items


def _initial(body: ResponsesRequest, model: str) -> ResponseObject:
    """The response as it starts: no output yet, the request's parameters echoed."""
    text_format = body.text.format if body.text and body.text.format else {"type": "text"}
    return ResponseObject(
        id=new_item_id("resp"),
        created_at=int(time.time()),
        model=model,
        status="in_progress",
        output=[],
        parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        tool_choice="auto" if body.tool_choice is None else body.tool_choice,
        tools=function_tools(body.tools),
        text=TextConfig(format=text_format, verbosity="medium"),
        store=body.store is not False,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_output_tokens=body.max_output_tokens,
        instructions=body.instructions,
        previous_response_id=body.previous_response_id,
        metadata=body.metadata or {},
        user=body.user,
        safety_identifier=body.safety_identifier,
        prompt_cache_key=body.prompt_cache_key,
    )


@post(
    "/v1/responses",
    status_code=200,
    request_body=ResponsesRequest,
    response_body=ResponseObject,
    streams=True,
)
async def create_response(request: AnyRequest, api: Api, store: Stored) -> Response[Any]:
    """Create a model response (JSON, or server-sent events with `stream: true`)."""
    body = decode_request(await request.body(), ResponsesRequest)
    refuse_unsupported(body)
    engine = api.engine(body.model)
    new_items = input_items(body.input)
    history = await _history(store, body.previous_response_id)
    chat = chat_request(body, history + new_items)
    check_ready(engine, api.settings.retry_after_s)
    try:
        # Off the event loop: compiling the tools' grammar can take a second.
        job = await asyncio.to_thread(
            chat_job,
            chat,
            engine,
            max_n=api.settings.max_n,
            default_max_tokens=api.settings.default_max_tokens,
        )
    except APIError as error:
        origins = message_items(body.instructions, history + new_items)
        inputs = [None if n is None or n < len(history) else n - len(history) for n in origins]
        raise in_responses_terms(error, inputs) from None
    response = _initial(body, engine.model_id)

    async def save(finished: ResponseObject) -> None:
        await store.run(Database.add_response, finished, new_items)

    run = ResponseRun(
        engine, job, response, save=save if response.store else None, metrics=api.metrics
    )
    release = api.admit()
    if body.stream:
        return sse_stream(
            run.streamed_events(),
            keepalive_s=api.settings.keepalive_s,
            on_close=release,
            stopping=api.stopping,
            retry_after_s=api.settings.retry_after_s,
        )
    try:
        whole = await unless_abandoned(
            run.whole(),
            receive=request.receive,
            stopping=api.stopping,
            retry_after_s=api.settings.retry_after_s,
        )
    finally:
        release()
    return Response(whole)


async def _found(store: Store, response_id: str) -> ResponseObject:
    response = await store.run(Database.get_response, response_id)
    if response is None:
        raise response_not_found(response_id)
    return response


@get("/v1/responses/{response_id:str}", response_body=ResponseObject)
async def retrieve_response(
    store: Stored,
    response_id: FromPath[str],
    stream: FromQuery[bool | None] = None,
    include: FromQuery[list[str] | None] = None,
) -> ResponseObject:
    """Retrieve a stored response."""
    if stream:
        raise unsupported("stream", "Streaming a stored response again (`stream=true`)")
    if include:
        raise unsupported("include")
    return await _found(store, response_id)


@delete("/v1/responses/{response_id:str}", status_code=200, response_body=ResponseDeleted)
async def delete_response(store: Stored, response_id: FromPath[str]) -> ResponseDeleted:
    """Delete a stored response (its input items too)."""
    if not await store.run(Database.delete_response, response_id):
        raise response_not_found(response_id)
    return ResponseDeleted(response_id)


@get("/v1/responses/{response_id:str}/input_items", response_body=InputItemList)
async def list_input_items(
    store: Stored,
    response_id: FromPath[str],
    after: FromQuery[str | None] = None,
    limit: Limit = 20,
    order: FromQuery[Literal["asc", "desc"]] = "desc",
    include: FromQuery[list[str] | None] = None,
) -> InputItemList:
    """The input items of a stored response, newest first unless `order=asc`; `after`
    is an item id (the cursor)."""
    if include:
        raise unsupported("include")
    await _found(store, response_id)
    try:
        page = await store.run(Database.list_input_items, response_id, after, limit, order)
    except UnknownCursor:
        raise invalid_request(f"No input item {after} to list after.", param="after") from None
    data: list[Item] = page.items  # type: ignore[assignment]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return InputItemList(data, first, last, page.has_more)


response_handlers = [create_response, retrieve_response, delete_response, list_input_items]
