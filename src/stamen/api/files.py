"""`/v1/files`: upload, list, retrieve, delete and download files, as OpenAI's API does.

POST   /v1/files                  multipart/form-data: `file` and `purpose` ("fine-tune")
GET    /v1/files                  `purpose`, `after`, `limit` (1..10000), `order` (asc/desc)
GET    /v1/files/{file_id}        the file object
DELETE /v1/files/{file_id}        `{"id", "object": "file", "deleted": true}`
GET    /v1/files/{file_id}/content  the bytes as uploaded (a job's results: plain CSV)

An upload is streamed to disk as it arrives, never held in memory; only this route
lifts the small JSON body limit (`--max-body-bytes`), and the file part may be at most
`--max-file-bytes` (413 beyond, told at once by a larger Content-Length). Clients upload
"fine-tune" files only; "fine-tune-results" files are written by jobs.

This module knows nothing about training; files live in the `Store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from litestar import Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import File
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from stamen.api.errors import file_not_found, file_too_large, invalid_request
from stamen.api.ft_schemas import FileDeleted, FileList, FileObject, FileUpload
from stamen.api.state import ApiState
from stamen.api.store import Database, Store, UnknownCursor, new_id

logger = logging.getLogger(__name__)

Api = NamedDependency[ApiState]
Files = NamedDependency[Store]
AnyRequest = Request[Any, Any, Any]

UPLOAD_PURPOSE = "fine-tune"
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and small fields around the file
SMALL_FIELD_BYTES = 1024  # `purpose` and any other non-file field
WRITE_CHUNK_BYTES = 1 << 20  # file bytes gathered before a write (in a thread)


class _Upload:
    """The parts of one multipart body as they stream in; the file part goes to disk."""

    def __init__(self, path: Path, max_file_bytes: int) -> None:
        self.path = path
        self.max_file_bytes = max_file_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self._segment: MultipartSegment | None = None
        self._small = bytearray()
        self._pending = bytearray()
        self._out: IO[bytes] | None = None

    async def feed(self, parser: PushMultipartParser, chunk: bytes) -> None:
        for event in parser.parse(chunk):
            if isinstance(event, MultipartSegment):
                self._segment = event
            elif event:
                await self._data(bytes(event))
            else:
                await self._end()

    async def _data(self, data: bytes) -> None:
        assert self._segment is not None
        if self._segment.name != "file":
            self._small.extend(data)
            if len(self._small) > SMALL_FIELD_BYTES:
                raise invalid_request(f"The form field `{self._segment.name}` is too long.")
            return
        self.file_bytes += len(data)
        if self.file_bytes > self.max_file_bytes:
            raise file_too_large(self.max_file_bytes)
        self._pending.extend(data)
        if len(self._pending) >= WRITE_CHUNK_BYTES:
            await self._write()

    async def _write(self) -> None:
        if self._out is None:
            self._out = await asyncio.to_thread(self.path.open, "wb")
        data, self._pending = bytes(self._pending), bytearray()
        await asyncio.to_thread(self._out.write, data)

    async def _end(self) -> None:
        segment, self._segment = self._segment, None
        assert segment is not None
        if segment.name == "file":
            if self.filename is not None:
                raise invalid_request("Send one `file` per upload.", param="file")
            self.filename = segment.filename or "file"
            await self._write()
            return
        value, self._small = self._small.decode(segment.charset or "utf-8", "replace"), bytearray()
        if segment.name == "purpose":
            _check_purpose(value)
        else:
            logger.info("ignoring the upload form field %r", segment.name)
        self.fields[segment.name] = value

    async def close(self) -> None:
        if self._out is not None:
            await asyncio.to_thread(self._out.close)


def _check_purpose(purpose: str) -> None:
    if purpose != UPLOAD_PURPOSE:
        raise invalid_request(
            f"'{purpose}' is not a purpose this server accepts for uploads; use "
            f"'{UPLOAD_PURPOSE}'.",
            param="purpose",
            code="invalid_purpose",
        )


def _boundary(request: AnyRequest) -> str:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != "multipart/form-data" or not options.get("boundary"):
        raise invalid_request(
            "Upload files as multipart/form-data with the fields `file` and `purpose`."
        )
    return str(options["boundary"])


async def _receive(request: AnyRequest, upload: _Upload) -> None:
    announced = request.headers.get("content-length")
    if announced and announced.isdigit():
        if int(announced) > upload.max_file_bytes + FORM_OVERHEAD_BYTES:
            raise file_too_large(upload.max_file_bytes)
    try:
        with PushMultipartParser(_boundary(request), max_segment_count=16) as parser:
            async for chunk in request.stream():
                await upload.feed(parser, chunk)
                if parser.closed:
                    break
    except MultipartError as error:
        raise invalid_request(f"Invalid multipart/form-data body: {error}") from None


@post(
    "/v1/files",
    status_code=200,
    request_max_body_size=None,  # bounded by `_Upload`, by --max-file-bytes
    multipart_body=FileUpload,
    response_body=FileObject,
)
async def upload_file(request: AnyRequest, api: Api, files: Files) -> FileObject:
    """Upload a file (multipart/form-data: `file`, `purpose` = "fine-tune")."""
    file_id = new_id("file")
    path = files.files_dir / file_id
    upload = _Upload(path, api.settings.fine_tuning.max_file_bytes)
    try:
        try:
            await _receive(request, upload)
        finally:
            await upload.close()
        if "purpose" not in upload.fields:
            raise invalid_request("Missing the form field `purpose`.", param="purpose")
        if upload.filename is None:
            raise invalid_request("Missing the form field `file`.", param="file")
        if upload.file_bytes == 0:
            await asyncio.to_thread(path.touch)
        file = FileObject(
            file_id, upload.file_bytes, int(time.time()), upload.filename, "fine-tune"
        )
        await files.run(Database.add_file, file, path)
    except BaseException:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(os.unlink, path)
        raise
    logger.info("stored %s (%s, %d bytes)", file_id, upload.filename, upload.file_bytes)
    return file


Limit = Annotated[int, QueryParameter(ge=1, le=10_000)]


@get("/v1/files", response_body=FileList)
async def list_files(
    files: Files,
    purpose: FromQuery[str | None] = None,
    after: FromQuery[str | None] = None,
    limit: Limit = 10_000,
    order: FromQuery[Literal["asc", "desc"]] = "desc",
) -> FileList:
    """List files, newest first unless `order=asc`; `after` is a file id (the cursor)."""
    try:
        page = await files.run(Database.list_files, purpose, after, limit, order)
    except UnknownCursor:
        raise invalid_request(f"No file {after} to list after.", param="after") from None
    data: list[FileObject] = page.items  # type: ignore[assignment]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return FileList(data, first, last, page.has_more)


async def _found(files: Store, file_id: str) -> tuple[FileObject, Path]:
    found = await files.run(Database.get_file, file_id)
    if found is None:
        raise file_not_found(file_id)
    return found


@get("/v1/files/{file_id:str}", response_body=FileObject)
async def retrieve_file(files: Files, file_id: FromPath[str]) -> FileObject:
    """Retrieve a file object."""
    file, _ = await _found(files, file_id)
    return file


@delete("/v1/files/{file_id:str}", status_code=200, response_body=FileDeleted)
async def delete_file(files: Files, file_id: FromPath[str]) -> FileDeleted:
    """Delete a file (its bytes too)."""
    path = await files.run(Database.delete_file, file_id)
    if path is None:
        raise file_not_found(file_id)
    await asyncio.to_thread(path.unlink, missing_ok=True)
    return FileDeleted(file_id)


@get("/v1/files/{file_id:str}/content", media_type="application/octet-stream")
async def file_content(files: Files, file_id: FromPath[str]) -> File:
    """The bytes of a file."""
    file, path = await _found(files, file_id)
    return File(path=path, filename=file.filename, media_type="application/octet-stream")


file_handlers = [upload_file, list_files, retrieve_file, delete_file, file_content]
