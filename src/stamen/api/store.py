"""The API's store: files' metadata, fine-tuning jobs, events and checkpoints, and stored
responses (`/v1/responses`) in SQLite, file bytes on disk, all under one data directory
that outlives the server.

    DATA_DIR/stamen.sqlite3      the database (WAL mode)
    DATA_DIR/files/FILE_ID       the bytes of each file
    DATA_DIR/jobs/JOB_ID/        each job's workdir (the trainer's checkpoints)

A row holds the OpenAI object itself (`ft_schemas`, msgspec JSON) beside the columns
that queries need, so what is stored is what is shown. `schema_version` records the
migrations applied; `MIGRATIONS[i]` takes the database from version i to i + 1, so a
database written by an older server gains the tables it lacks and keeps its rows.

A stored response is its `ResponseObject` (output included) plus its input items, one row
each in order; `previous_id` links a response to the one it continues, and
`response_chain` walks those links back so a conversation can be replayed.

`Database` is synchronous and used from one thread only: `Store` owns that thread (a
single-worker executor), so every read and write is serialized in submission order and
the event loop never waits on SQLite. `Store.run` awaits a call; `Store.submit` queues
one without waiting (for a trainer's report, which may call from its own thread), and
`Store.flush` waits until everything queued so far is written.

This module knows nothing about HTTP, training or generation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import msgspec

from stamen.api.ft_schemas import FileObject, FineTuningJob, JobCheckpoint, JobEvent
from stamen.api.responses_schemas import Item, ResponseObject
from stamen.api.training import CheckpointInfo

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

MIGRATIONS = [
    """
    CREATE TABLE files (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        purpose TEXT NOT NULL, path TEXT NOT NULL, body BLOB NOT NULL);
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL, workdir TEXT NOT NULL, prompts_path TEXT, body BLOB NOT NULL);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL, body BLOB NOT NULL);
    CREATE INDEX events_by_job ON events (job_id, seq);
    CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL, step INTEGER NOT NULL, epoch INTEGER NOT NULL,
        prompts_path TEXT NOT NULL, state_path TEXT NOT NULL, metrics BLOB NOT NULL,
        body BLOB NOT NULL);
    CREATE INDEX checkpoints_by_job ON checkpoints (job_id, seq);
    """,
    """
    CREATE TABLE responses (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        previous_id TEXT, body BLOB NOT NULL);
    CREATE TABLE response_items (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL, id TEXT NOT NULL,
        body BLOB NOT NULL, UNIQUE (response_id, id));
    """,
]


class StoreTooNew(RuntimeError):
    """The database was written by a newer server: its schema is one this code does not
    know, so reading or writing it could lose data."""

    def __init__(self, path: Path, version: int) -> None:
        super().__init__(
            f"The store {path} has schema version {version}, newer than this server's "
            f"{len(MIGRATIONS)}: run a newer stamen, or point it at another data directory."
        )
        self.version = version


class UnknownCursor(Exception):
    """`after` names no item of the list."""


class MissingResponse(KeyError):
    """A response of a conversation is not stored (never was, or was deleted)."""

    def __init__(self, response_id: str) -> None:
        super().__init__(response_id)
        self.response_id = response_id


@dataclass(frozen=True)
class StoredResponse:
    """A stored response and the input items it was created from, in their order."""

    response: ResponseObject
    input_items: list[Item]


@dataclass(frozen=True)
class Page:
    """`limit` items following the cursor in the listing's order, and whether more follow."""

    items: list[msgspec.Struct]
    has_more: bool


@dataclass(frozen=True)
class TunedModel:
    """A servable tuned model: a job's final prompts or one of its checkpoints."""

    model_id: str
    base_model: str
    prompts_path: Path
    created_at: int


def new_id(prefix: str) -> str:
    """An object id in OpenAI's style: `file-...`, `ftjob-...`, `ftevent-...`, `ftckpt-...`."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _encode(item: msgspec.Struct) -> bytes:
    return msgspec.json.encode(item)


class Database:
    """Synchronous SQLite access; one thread only (`Store`'s)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Bring the schema up to date in one write transaction: the version is read under
        the lock, so of two processes opening one directory only the first migrates (the
        second waits, then finds the work done). A newer schema than ours is refused."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] or 0
            if version > len(MIGRATIONS):
                raise StoreTooNew(self._path, version)
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                logger.info("migrating the store to schema version %d", number)
                for statement in script.split(";"):  # DDL only: no ';' inside a statement
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute("INSERT INTO schema_version VALUES (?)", (number,))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- listing --------------------------------------------------------------------------

    def _page(
        self,
        table: str,
        kind: Any,  # the Struct type of a row's body, or a tagged union of them
        *,
        where: str,
        args: tuple[object, ...],
        after: str | None,
        limit: int,
        descending: bool = True,
    ) -> Page:
        if after is not None:
            row = self._db.execute(
                f"SELECT seq FROM {table} WHERE id = ? AND {where}", (after, *args)
            ).fetchone()
            if row is None:
                raise UnknownCursor(after)
            where += " AND seq < ?" if descending else " AND seq > ?"
            args = (*args, row[0])
        order = "DESC" if descending else "ASC"
        rows = self._db.execute(
            f"SELECT body FROM {table} WHERE {where} ORDER BY seq {order} LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        items: list[msgspec.Struct] = [msgspec.json.decode(r[0], type=kind) for r in rows[:limit]]
        return Page(items, len(rows) > limit)

    # -- files ----------------------------------------------------------------------------

    def add_file(self, file: FileObject, path: Path) -> None:
        self._db.execute(
            "INSERT INTO files (id, purpose, path, body) VALUES (?, ?, ?, ?)",
            (file.id, file.purpose, str(path), _encode(file)),
        )

    def get_file(self, file_id: str) -> tuple[FileObject, Path] | None:
        row = self._db.execute("SELECT body, path FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else (msgspec.json.decode(row[0], type=FileObject), Path(row[1]))

    def list_files(self, purpose: str | None, after: str | None, limit: int, order: str) -> Page:
        where, args = ("purpose = ?", (purpose,)) if purpose else ("1", ())
        return self._page(
            "files", FileObject, where=where, args=args, after=after, limit=limit,
            descending=order == "desc",
        )  # fmt: skip

    def delete_file(self, file_id: str) -> Path | None:
        row = self._db.execute(
            "DELETE FROM files WHERE id = ? RETURNING path", (file_id,)
        ).fetchone()
        return None if row is None else Path(row[0])

    # -- jobs -----------------------------------------------------------------------------

    def add_job(self, job: FineTuningJob, workdir: Path) -> None:
        self._db.execute(
            "INSERT INTO jobs (id, status, workdir, body) VALUES (?, ?, ?, ?)",
            (job.id, job.status, str(workdir), _encode(job)),
        )

    def get_job(self, job_id: str) -> FineTuningJob | None:
        row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else msgspec.json.decode(row[0], type=FineTuningJob)

    def job_workdir(self, job_id: str) -> Path:
        row = self._db.execute("SELECT workdir FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Path(row[0])

    def update_job(self, job_id: str, **changes: object) -> FineTuningJob:
        """Replace the named fields of a job (read, change, write in one transaction)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            job = self.get_job(job_id)
            if job is None:
                raise KeyError(job_id)
            job = msgspec.structs.replace(job, **changes)
            self._db.execute(
                "UPDATE jobs SET status = ?, body = ? WHERE id = ?",
                (job.status, _encode(job), job_id),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return job

    def set_prompts_path(self, job_id: str, path: Path) -> None:
        self._db.execute("UPDATE jobs SET prompts_path = ? WHERE id = ?", (str(path), job_id))

    def list_jobs(self, after: str | None, limit: int) -> Page:
        return self._page("jobs", FineTuningJob, where="1", args=(), after=after, limit=limit)

    def jobs_with_status(self, *statuses: str) -> list[FineTuningJob]:
        """Oldest first: the order to queue them in again."""
        marks = ",".join("?" * len(statuses))
        rows = self._db.execute(
            f"SELECT body FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses
        ).fetchall()
        return [msgspec.json.decode(r[0], type=FineTuningJob) for r in rows]

    # -- events and checkpoints -----------------------------------------------------------

    def add_event(self, job_id: str, event: JobEvent) -> None:
        self._db.execute(
            "INSERT INTO events (id, job_id, body) VALUES (?, ?, ?)",
            (event.id, job_id, _encode(event)),
        )

    def list_events(self, job_id: str, after: str | None, limit: int) -> Page:
        return self._page(
            "events", JobEvent, where="job_id = ?", args=(job_id,), after=after, limit=limit
        )

    def add_checkpoint(self, checkpoint: JobCheckpoint, info: CheckpointInfo) -> None:
        self._db.execute(
            "INSERT INTO checkpoints (id, job_id, step, epoch, prompts_path, state_path,"
            " metrics, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                checkpoint.id,
                checkpoint.fine_tuning_job_id,
                info.step,
                info.epoch,
                str(info.prompts_path),
                str(info.state_path),
                msgspec.json.encode(info.metrics),
                _encode(checkpoint),
            ),
        )

    def list_checkpoints(self, job_id: str, after: str | None, limit: int) -> Page:
        return self._page(
            "checkpoints", JobCheckpoint, where="job_id = ?", args=(job_id,), after=after,
            limit=limit,
        )  # fmt: skip

    def last_checkpoint(self, job_id: str) -> CheckpointInfo | None:
        row = self._db.execute(
            "SELECT step, epoch, prompts_path, state_path, metrics FROM checkpoints"
            " WHERE job_id = ? ORDER BY seq DESC LIMIT 1",
            (job_id,),
        ).fetchone()
        if row is None:
            return None
        metrics = msgspec.json.decode(row[4], type=dict[str, float])
        return CheckpointInfo(row[0], row[1], Path(row[2]), Path(row[3]), metrics)

    def tuned_models(self) -> list[TunedModel]:
        """Every succeeded job's model and every checkpoint's, oldest first."""
        models = []
        for body, prompts_path in self._db.execute(
            "SELECT body, prompts_path FROM jobs WHERE status = 'succeeded'"
            " AND prompts_path IS NOT NULL ORDER BY seq"
        ):
            job = msgspec.json.decode(body, type=FineTuningJob)
            assert job.fine_tuned_model is not None  # set with the status, in one write
            created = job.finished_at or job.created_at
            models.append(TunedModel(job.fine_tuned_model, job.model, Path(prompts_path), created))
        for checkpoint_body, job_body, prompts_path in self._db.execute(
            "SELECT c.body, j.body, c.prompts_path FROM checkpoints c"
            " JOIN jobs j ON j.id = c.job_id ORDER BY c.seq"
        ):
            checkpoint = msgspec.json.decode(checkpoint_body, type=JobCheckpoint)
            job = msgspec.json.decode(job_body, type=FineTuningJob)
            models.append(
                TunedModel(
                    checkpoint.fine_tuned_model_checkpoint,
                    job.model,
                    Path(prompts_path),
                    checkpoint.created_at,
                )
            )
        return models

    # -- responses ------------------------------------------------------------------------

    def add_response(self, response: ResponseObject, input_items: list[Item]) -> None:
        """Store a response with its input items, in one transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT INTO responses (id, previous_id, body) VALUES (?, ?, ?)",
                (response.id, response.previous_response_id, _encode(response)),
            )
            self._db.executemany(
                "INSERT INTO response_items (response_id, id, body) VALUES (?, ?, ?)",
                [(response.id, item.id, _encode(item)) for item in input_items],
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get_response(self, response_id: str) -> ResponseObject | None:
        row = self._db.execute("SELECT body FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else msgspec.json.decode(row[0], type=ResponseObject)

    def _input_items(self, response_id: str) -> list[Item]:
        rows = self._db.execute(
            "SELECT body FROM response_items WHERE response_id = ? ORDER BY seq", (response_id,)
        ).fetchall()
        return [msgspec.json.decode(r[0], type=Item) for r in rows]

    def response_chain(self, response_id: str, max_length: int) -> list[StoredResponse]:
        """The conversation ending with `response_id`, oldest first: each response and its
        input items, following `previous_response_id` back. Raises `MissingResponse` for
        the first response of the chain that is not stored, `ValueError` beyond
        `max_length` responses."""
        chain: list[StoredResponse] = []
        current: str | None = response_id
        while current is not None:
            if len(chain) == max_length:
                raise ValueError(f"the conversation is longer than {max_length} responses")
            response = self.get_response(current)
            if response is None:
                raise MissingResponse(current)
            chain.append(StoredResponse(response, self._input_items(current)))
            current = response.previous_response_id
        return chain[::-1]

    def list_input_items(self, response_id: str, after: str | None, limit: int, order: str) -> Page:
        return self._page(
            "response_items", Item, where="response_id = ?", args=(response_id,), after=after,
            limit=limit, descending=order == "desc",
        )  # fmt: skip

    def delete_response(self, response_id: str) -> bool:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            deleted = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            self._db.execute("DELETE FROM response_items WHERE response_id = ?", (response_id,))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return deleted.rowcount > 0


class Store:
    """`Database` on its own thread, for the event loop (module docstring)."""

    def __init__(self, data_dir: Path, database: Database, executor: concurrent.futures.Executor):
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self.jobs_dir = data_dir / "jobs"
        self._database = database
        self._executor = executor

    async def run(
        self, fn: Callable[Concatenate[Database, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        # Awaited: a failure reaches the caller (an unknown cursor is a 400), not the log.
        future = self._executor.submit(fn, self._database, *args, **kwargs)
        return await asyncio.wrap_future(future)

    def submit(
        self, fn: Callable[Concatenate[Database, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Queue a call without waiting (any thread); failures are logged."""
        future = self._executor.submit(fn, self._database, *args, **kwargs)
        future.add_done_callback(_log_failure)
        return future

    async def flush(self) -> None:
        """Wait until every call submitted before this one has run."""
        await self.run(lambda _: None)


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        logger.error("store write failed: %r", error, exc_info=error)


@asynccontextmanager
async def open_store(data_dir: Path) -> AsyncIterator[Store]:
    """Open (creating and migrating) the store under `data_dir`; closed on exit."""
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stamen-store")
    loop = asyncio.get_running_loop()
    try:
        for sub in ("files", "jobs"):
            await asyncio.to_thread((data_dir / sub).mkdir, parents=True, exist_ok=True)
        database = await loop.run_in_executor(executor, Database, data_dir / "stamen.sqlite3")
        store = Store(data_dir, database, executor)
        try:
            yield store
        finally:
            await store.flush()
            await loop.run_in_executor(executor, database.close)
    finally:
        executor.shutdown(wait=True)
