"""The Responses API without a model: input items and their chat translation, refused
fields, and stored responses in SQLite (a version-1 database migrated in place)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stamen.api import schemas as s
from stamen.api import serving, tools
from stamen.api.errors import APIError, invalid_request
from stamen.api.responses_schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputTextPart,
    MessageItem,
    OutputTextPart,
    ResponseObject,
    ResponsesRequest,
    TextConfig,
)
from stamen.api.responses_translate import (
    chat_messages,
    chat_request,
    in_responses_terms,
    input_items,
    message_items,
    refuse_unsupported,
)
from stamen.api.store import MIGRATIONS, Database, MissingResponse, StoreTooNew, UnknownCursor


def request(**fields: Any) -> ResponsesRequest:
    return msgspec.convert({"model": "m", "input": "hi", **fields}, ResponsesRequest)


def refused_param(call: Any) -> str | None:
    with pytest.raises(APIError) as raised:
        call()
    assert raised.value.status_code == 400
    return raised.value.param


def test_input_in_every_accepted_shape_becomes_items() -> None:
    items = input_items(
        [
            {"role": "user", "content": "plain"},
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "ok",
                                               "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f",
             "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1",
             "output": [{"type": "input_text", "text": "done"}]},
        ]
    )  # fmt: skip
    first, second, third, fourth, fifth = items
    assert isinstance(first, MessageItem) and first.content == [InputTextPart("plain")]
    assert isinstance(second, MessageItem) and [p.text for p in second.content] == ["a", "b"]  # type: ignore[union-attr]
    assert isinstance(third, MessageItem) and third.content == [OutputTextPart("ok")]
    assert fourth == FunctionCallItem("fc_1", "c1", "f", "{}")
    assert isinstance(fifth, FunctionCallOutputItem) and fifth.output == "done"
    assert len({item.id for item in items}) == 5
    (text,) = input_items("just text")
    assert isinstance(text, MessageItem) and text.role == "user" and text.id.startswith("msg_")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ("", "input"),
        ([], "input"),
        (["text"], "input[0]"),
        ([{"role": "tool", "content": "x"}], "input[0].role"),
        ([{"role": "user", "content": []}], "input[0].content"),
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}],
         "input[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}],
         "input[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "input_text", "text": 3}]}],
         "input[0].content[0].text"),
        ([{"type": "function_call", "call_id": "c", "name": "f"}], "input[0].arguments"),
        ([{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
        ([{"type": "reasoning", "summary": []}], "input[0].type"),
        ([{"role": "user", "content": "a", "id": "x"}, {"role": "user", "content": "b", "id": "x"}],
         "input"),
    ],
)  # fmt: skip
def test_malformed_input_items_are_refused_naming_the_field(raw: Any, param: str) -> None:
    assert refused_param(lambda: input_items(raw)) == param


def test_calls_after_the_models_text_make_one_assistant_message() -> None:
    items = input_items(
        [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Let me look."},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2", "output": "two"},
            {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
        ]
    )
    messages = chat_messages("Be brief.", items)
    assert [type(m).__name__ for m in messages] == [
        "SystemMessage", "UserMessage", "AssistantMessage", "ToolMessage", "ToolMessage",
        "AssistantMessage",
    ]  # fmt: skip
    assistant = messages[2]
    assert isinstance(assistant, s.AssistantMessage) and assistant.content == "Let me look."
    assert [c["id"] for c in assistant.tool_calls or []] == ["c1", "c2"]
    assert (assistant.tool_calls or [])[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert [(m.tool_call_id, m.content) for m in messages[3:5]] == [("c1", "one"), ("c2", "two")]  # type: ignore[union-attr]
    last = messages[5]
    assert isinstance(last, s.AssistantMessage) and last.content is None


def test_tools_text_format_and_sampling_map_to_chat_fields() -> None:
    tool = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"},
            "strict": True}  # fmt: skip
    body = request(
        tools=[tool], tool_choice={"type": "function", "name": "f"}, parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"},
                         "strict": True}},
        max_output_tokens=7, temperature=0.5, top_p=0.9, user="u",
    )  # fmt: skip
    chat = chat_request(body, input_items("hi"))
    assert chat.tools == [{"type": "function", "function": {
        "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}}]  # fmt: skip
    assert chat.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert chat.parallel_tool_calls is False
    assert chat.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True},
    }
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p) == (7, 0.5, 0.9)
    json_object = request(text={"format": {"type": "json_object"}})
    assert chat_request(json_object, []).response_format == {"type": "json_object"}
    plain = chat_request(request(text={"format": {"type": "text"}}), [])
    assert plain.response_format is None and plain.tools is None and plain.tool_choice is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "p"}}, "prompt"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ],
)
def test_fields_this_server_does_not_honour_are_refused(fields: dict[str, Any], param: str) -> None:
    assert refused_param(lambda: refuse_unsupported(request(**fields))) == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "name": "f", "defer_loading": True}]},
         "tools[0].defer_loading"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "mcp"}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format"),
    ],
)  # fmt: skip
def test_bad_tools_and_formats_are_refused(fields: dict[str, Any], param: str) -> None:
    assert refused_param(lambda: chat_request(request(**fields), [])) == param


def test_chat_errors_are_renamed_to_this_requests_fields() -> None:
    renamed = in_responses_terms(
        invalid_request("Invalid 'max_completion_tokens': too many.", param="max_completion_tokens")
    )
    assert (renamed.param, renamed.message) == ("max_output_tokens", "Invalid 'max_output_tokens': too many.")  # fmt: skip
    assert in_responses_terms(invalid_request("x", param="messages[3].content")).param == "input"
    assert in_responses_terms(invalid_request("x", param="response_format")).param == "text.format"
    assert in_responses_terms(invalid_request("x", param="seed")).param == "seed"


def responses_error(body: ResponsesRequest, items: list[Any], check: Any) -> APIError:
    """The error `check` raises on the chat form of `body`, in Responses terms (as the
    route reports it)."""
    chat = chat_request(body, items)
    with pytest.raises(APIError) as raised:
        check(chat)
    return in_responses_terms(raised.value, message_items(body.instructions, items))


@pytest.mark.parametrize(
    ("tool", "choice", "param"),
    [
        ({"name": "bad name"}, None, "tools[0].name"),
        ({"name": "f", "parameters": {"type": "array"}}, None, "tools[0].parameters"),
        ({"name": "f"}, {"type": "function", "name": "g"}, "tool_choice.name"),
    ],
)
def test_tool_errors_name_the_responses_fields(
    tool: dict[str, Any], choice: Any, param: str
) -> None:
    body = request(tools=[{"type": "function", **tool}], tool_choice=choice)
    error = responses_error(body, [], tools.parse_tools)
    assert error.param == param and "function" not in error.message.split("'")[1]


def test_an_orphan_call_output_names_its_input_item() -> None:
    history = input_items("earlier turn")
    new = input_items([{"role": "user", "content": "hi"},
                       {"type": "function_call_output", "call_id": "c9", "output": "x"}])  # fmt: skip
    body = request(instructions="Be brief.")
    items = [*history, *new]
    chat = chat_request(body, items)
    with pytest.raises(APIError) as raised:
        serving._conversation(chat.messages, native=False)
    origins = message_items(body.instructions, items)
    inputs = [None if n is None or n < len(history) else n - len(history) for n in origins]
    error = in_responses_terms(raised.value, inputs)
    assert error.param == "input[1].call_id" and "'input[1].call_id'" in error.message


def test_a_text_format_schema_error_names_text_format() -> None:
    chat_error = invalid_request(
        "Invalid schema for response_format 'n': bad.", param="response_format.json_schema.schema"
    )
    assert in_responses_terms(chat_error).param == "text.format.schema"


def test_an_unknown_tool_choice_string_is_an_invalid_value() -> None:
    body = request(tools=[{"type": "function", "name": "f"}], tool_choice="sometimes")
    with pytest.raises(APIError) as raised:
        chat_request(body, [])
    assert raised.value.status_code == 400 and raised.value.param == "tool_choice"
    assert raised.value.code == "invalid_value"


# -- the store -----------------------------------------------------------------------------


def response(response_id: str, previous: str | None = None, text: str = "a") -> ResponseObject:
    output = [MessageItem(f"msg_{response_id}", "assistant", [OutputTextPart(text)])]
    return ResponseObject(
        id=response_id, created_at=1, model="m", status="completed", output=output,  # type: ignore[arg-type]
        parallel_tool_calls=True, tool_choice="auto", tools=[],
        text=TextConfig(format={"type": "text"}), store=True, previous_response_id=previous,
    )  # fmt: skip


def test_a_version_1_database_gains_the_responses_tables_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stamen.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.executescript(f"BEGIN; {MIGRATIONS[0]}; INSERT INTO schema_version VALUES (1); COMMIT;")
    old.execute(
        "INSERT INTO files (id, purpose, path, body) VALUES ('file-1', 'fine-tune', 'p', '{}')"
    )
    old.close()
    database = Database(path)
    try:
        assert database._db.execute("SELECT MAX(version) FROM schema_version").fetchone() == (2,)
        assert database._db.execute("SELECT id FROM files").fetchall() == [("file-1",)]
        database.add_response(response("resp_1"), input_items("hi"))
        assert database.get_response("resp_1") == response("resp_1")
    finally:
        database.close()
    reopened = Database(path)  # migrating again is a no-op
    try:
        assert reopened.get_response("resp_1") == response("resp_1")
    finally:
        reopened.close()


def _migrate_by_hand(connection: sqlite3.Connection) -> None:
    for number, script in enumerate(MIGRATIONS, start=1):
        for statement in script.split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute("INSERT INTO schema_version VALUES (?)", (number,))


def test_a_store_opened_while_another_process_migrates_waits_for_it(tmp_path: Path) -> None:
    path = tmp_path / "stamen.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    other.execute("BEGIN IMMEDIATE")  # the other process has read version 0 and migrates
    _migrate_by_hand(other)
    opened: list[Any] = []

    def open_store() -> None:
        try:
            opened.append(Database(path))
        except Exception as error:
            opened.append(error)

    thread = threading.Thread(target=open_store)
    thread.start()
    time.sleep(0.3)  # this one reads the version meanwhile, unless it waits for the lock
    other.execute("COMMIT")
    thread.join(timeout=30)
    (database,) = opened
    assert isinstance(database, Database), database
    try:
        assert database._db.execute("SELECT version FROM schema_version").fetchall() == [
            (1,),
            (2,),
        ]
    finally:
        database.close()
        other.close()


def test_a_store_newer_than_this_server_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stamen.sqlite3"
    Database(path).close()
    newer = sqlite3.connect(path, isolation_level=None)
    newer.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
    newer.close()
    with pytest.raises(StoreTooNew, match="newer than this server"):
        Database(path)


def test_chains_pages_and_deletes(tmp_path: Path) -> None:
    database = Database(tmp_path / "db.sqlite3")
    try:
        first_items = input_items([{"role": "user", "content": str(n)} for n in range(5)])
        database.add_response(response("resp_1", text="one"), first_items)
        database.add_response(response("resp_2", "resp_1", text="two"), input_items("more"))
        chain = database.response_chain("resp_2", max_length=10)
        assert [c.response.id for c in chain] == ["resp_1", "resp_2"]
        assert chain[0].input_items == first_items
        with pytest.raises(ValueError):
            database.response_chain("resp_2", max_length=1)

        page = database.list_input_items("resp_1", None, 2, "desc")
        assert [i.id for i in page.items] == [first_items[4].id, first_items[3].id]  # type: ignore[attr-defined]
        assert page.has_more
        rest = database.list_input_items("resp_1", first_items[3].id, 10, "desc")
        assert [i.id for i in rest.items] == [i.id for i in first_items[:3]][::-1]  # type: ignore[attr-defined]
        assert not rest.has_more
        with pytest.raises(UnknownCursor):
            database.list_input_items("resp_2", first_items[0].id, 10, "asc")

        assert database.delete_response("resp_1") and not database.delete_response("resp_1")
        assert database.list_input_items("resp_1", None, 10, "asc").items == []
        with pytest.raises(MissingResponse) as missing:
            database.response_chain("resp_2", max_length=10)
        assert missing.value.response_id == "resp_1"
    finally:
        database.close()
