"""Fine-tuning cases of the OpenAI contract suite, through the official `openai` SDK.

    python -m stamen.conformance.openai --base-url URL --model M --fine-tuning

What a user of `client.files` and `client.fine_tuning.jobs` relies on: a JSONL file
uploaded, listed (cursor pages, purpose filter), retrieved, read back and deleted; a job
created from it, polled with `retrieve` to `succeeded`, its events read page by page
(metrics events carry `train_loss`), its checkpoints listed, its result file readable,
and its `fine_tuned_model` listed and chatted with (streaming too); a job cancelled; and
errors in OpenAI's shape (404 unknown file or job, 400 wrong purpose or bad
hyperparameters, a malformed training file ending the job `failed` with an error code).

The jobs here train for one epoch on a dozen short examples, so on a small model they
take seconds to a few minutes; `JOB_TIMEOUT_S` bounds each wait.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from stamen.conformance.openai import CheckFailed, Suite, expect

JOB_TIMEOUT_S = 600.0
POLL_S = 0.5
TERMINAL = {"succeeded", "failed", "cancelled"}

_PAIRS = [
    ("I loved this kettle, it boils fast.", "positive"),
    ("The strap broke on day one.", "negative"),
    ("Great sound for the price.", "positive"),
    ("It arrived scratched and late.", "negative"),
    ("My kids adore this game.", "positive"),
    ("The battery barely lasts an hour.", "negative"),
    ("Comfortable and well made.", "positive"),
    ("Customer support never answered.", "negative"),
    ("Works exactly as described.", "positive"),
    ("Flimsy plastic, do not buy.", "negative"),
    ("Best purchase I made this year.", "positive"),
    ("The screen cracked within a week.", "negative"),
]


def training_jsonl() -> bytes:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": review},
                    {"role": "assistant", "content": label},
                ]
            }
        )  # fmt: skip
        for review, label in _PAIRS
    ]
    return ("\n".join(lines) + "\n").encode()


def _upload(suite: Suite, data: bytes, name: str = "train.jsonl") -> Any:
    return suite.client.files.create(file=(name, data, "application/jsonl"), purpose="fine-tune")


def _create_job(suite: Suite, training_file: str, **kwargs: Any) -> Any:
    kwargs.setdefault("method", {"type": "supervised",
                                 "supervised": {"hyperparameters": {"n_epochs": 1}}})  # fmt: skip
    if suite.fine_tuning_extra:
        kwargs.setdefault("extra_body", suite.fine_tuning_extra)
    return suite.client.fine_tuning.jobs.create(
        model=suite.model, training_file=training_file, **kwargs
    )


def _wait(suite: Suite, job_id: str, until: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = suite.client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise CheckFailed(f"job {job_id} still {job.status} after {JOB_TIMEOUT_S:g} s")
        time.sleep(POLL_S)


def check_files(suite: Suite) -> None:
    data = training_jsonl()
    created = [_upload(suite, data, f"part-{i}.jsonl") for i in range(3)]
    first = created[0]
    expect(first.id.startswith("file-") and first.object == "file", f"file object {first}")
    expect(first.bytes == len(data) and first.purpose == "fine-tune", f"bytes/purpose {first}")
    expect(first.filename == "part-0.jsonl", f"filename {first.filename!r}")
    expect(suite.client.files.retrieve(first.id).id == first.id, "retrieve gave another file")
    expect(suite.client.files.content(first.id).content == data, "content differs from upload")
    page = suite.client.files.list(purpose="fine-tune", limit=2)
    expect(len(page.data) <= 2, f"limit=2 gave {len(page.data)} files")
    seen = [f.id for f in suite.client.files.list(purpose="fine-tune", limit=2)]  # auto-pages
    expect({f.id for f in created} <= set(seen), "paging through the list missed a file")
    expect(len(seen) == len(set(seen)), "paging returned a file twice")
    for file in created:
        deleted = suite.client.files.delete(file.id)
        expect(deleted.deleted and deleted.id == file.id, f"delete {deleted}")
    suite.expect_status(404, lambda: suite.client.files.retrieve(first.id))


def check_file_errors(suite: Suite) -> None:
    suite.expect_status(404, lambda: suite.client.files.retrieve("file-doesnotexist"))
    suite.expect_status(404, lambda: suite.client.files.content("file-doesnotexist"))
    suite.expect_status(
        400,
        lambda: suite.client.files.create(
            file=("x.jsonl", training_jsonl(), "application/jsonl"),
            purpose="no-such-purpose",
        ),
        "purpose",
    )


def check_fine_tuning_job(suite: Suite) -> None:
    file = _upload(suite, training_jsonl())
    job = _create_job(suite, file.id, suffix="conformance", seed=7)
    expect(job.id.startswith("ftjob-") and job.object == "fine_tuning.job", f"job object {job}")
    expect(job.status in {"validating_files", "queued", "running"}, f"new job {job.status}")
    expect(job.model == suite.model and job.training_file == file.id, "model/training_file")
    job = _wait(suite, job.id, lambda j: j.status in TERMINAL)
    expect(job.status == "succeeded", f"job {job.status}: {job.error}")
    tuned = job.fine_tuned_model or ""
    parts = tuned.split(":")
    expect(len(parts) == 5 and parts[0] == "ft" and parts[1] == suite.model, f"name {tuned!r}")
    expect(parts[3] == "conformance" and parts[4] == job.id, f"suffix/job id in {tuned!r}")
    expect((job.trained_tokens or 0) > 0, f"trained_tokens {job.trained_tokens}")
    hyper = job.hyperparameters
    expect(hyper.n_epochs == 1 and isinstance(hyper.batch_size, int), f"hyperparameters {hyper}")
    expect(isinstance(hyper.learning_rate_multiplier, float), "auto lr multiplier not resolved")
    expect(len(job.result_files) == 1, f"result_files {job.result_files}")
    csv = suite.client.files.content(job.result_files[0]).text
    expect(csv.splitlines()[0].startswith("step"), f"result file head {csv[:80]!r}")

    events, after = [], None
    while True:
        page = suite.client.fine_tuning.jobs.list_events(job.id, limit=3, after=after)
        events.extend(page.data)
        if not page.has_more:
            break
        after = page.data[-1].id
    expect(len({e.id for e in events}) == len(events), "event pages overlap")
    metrics = [e for e in events if e.type == "metrics"]
    expect(bool(metrics), "no metrics events")
    expect(all("train_loss" in (e.data or {}) for e in metrics), "metrics without train_loss")
    expect(all(e.object == "fine_tuning.job.event" for e in events), "event object name")

    checkpoints = suite.client.fine_tuning.jobs.checkpoints.list(job.id).data
    expect(len(checkpoints) >= 1, "no checkpoint for one epoch")
    ids = {m.id for m in suite.client.models.list()}
    expect(tuned in ids, f"{tuned} not in /v1/models")
    for checkpoint in checkpoints:
        expect(checkpoint.fine_tuned_model_checkpoint in ids, "checkpoint not served as a model")

    messages: Any = [{"role": "user", "content": _PAIRS[0][0]}]
    chat = suite.client.chat.completions.create(
        model=tuned, messages=messages, temperature=0, max_tokens=4
    )
    expect(chat.model == tuned and bool(chat.choices[0].message.content), "tuned chat")
    stream = suite.client.chat.completions.create(
        model=tuned, messages=messages, temperature=0, max_tokens=4, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    expect(text == chat.choices[0].message.content, f"tuned stream {text!r} != {chat!r}")
    listed = [j.id for j in suite.client.fine_tuning.jobs.list(limit=100)]
    expect(job.id in listed, "job not listed")


def check_fine_tuning_cancel(suite: Suite) -> None:
    file = _upload(suite, training_jsonl() * 4)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5}}}
    job = _create_job(suite, file.id, method=method)
    cancelled = suite.client.fine_tuning.jobs.cancel(job.id)
    expect(cancelled.id == job.id, "cancel answered for another job")
    job = _wait(suite, job.id, lambda j: j.status in TERMINAL)
    expect(job.status == "cancelled", f"cancelled job ended {job.status}")
    suite.expect_status(400, lambda: suite.client.fine_tuning.jobs.cancel(job.id))


def check_fine_tuning_errors(suite: Suite) -> None:
    jobs = suite.client.fine_tuning.jobs
    suite.expect_status(404, lambda: jobs.retrieve("ftjob-doesnotexist"))
    file = _upload(suite, training_jsonl())
    suite.expect_status(404, lambda: _create_job(suite, "file-doesnotexist"), "training_file")
    suite.expect_status(
        404,
        lambda: jobs.create(model="no-such-model", training_file=file.id),
        "model",
    )
    bad_epochs = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}
    suite.expect_status(400, lambda: _create_job(suite, file.id, method=bad_epochs))
    broken = _upload(suite, training_jsonl() + b"{not json\n", "broken.jsonl")
    job = _create_job(suite, broken.id)
    job = _wait(suite, job.id, lambda j: j.status in TERMINAL)
    expect(job.status == "failed" and job.error is not None, f"malformed file: {job.status}")
    expect(bool(job.error.code) and "13" in (job.error.message or ""),
           f"error does not name line 13: {job.error}")  # fmt: skip


CHECKS: list[Callable[[Suite], None]] = [
    check_files,
    check_file_errors,
    check_fine_tuning_job,
    check_fine_tuning_cancel,
    check_fine_tuning_errors,
]
