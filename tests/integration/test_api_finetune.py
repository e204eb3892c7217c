"""Fine-tuning jobs end to end: the official `openai` SDK against `swarm-api` processes
over real swarms of `swarm-host` processes on 127.0.0.1.

The task (tests/data/finetune, written for these tests): short product reviews in the
user turn, one label word ("positive" / "negative") in the assistant turn, no
instruction anywhere. SmolLM2-135M-Instruct answers such a message with a sentence, so
its exact-match accuracy starts near 0; prompt tuning through the swarm teaches it the
answer format. Measured on the held-out file by greedy chat through the API.

- default run: a short job on the shared two-host swarm (a quarter of the data, one
  epoch), plus the SDK conformance cases for files and fine-tuning jobs;
- slow: the whole task (validation loss falls >= 30 %, accuracy rises), a host SIGKILLed
  mid-job while a replica of its span is up (the job succeeds with the undisturbed loss
  curve), and `swarm-api` SIGKILLed mid-job and restarted on the same data directory (the
  job is listed, resumes from its checkpoint and succeeds).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from stamen.conformance.openai import format_table, run_suite
from tests.integration.conftest import SwarmProcesses
from tests.integration.test_api_lifecycle import Api, start_api

DATA = Path(__file__).parents[1] / "data" / "finetune"
MODEL_ID = "SmolLM2-135M-Instruct"
LABELS = ("positive", "negative")
JOB_TIMEOUT_S = 1200.0


def read_jsonl(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def jsonl(examples: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(e) for e in examples) + "\n").encode()


def start_stack_api(tmp_path: Path, gguf: Path, dht: str, data_dir: Path) -> Api:
    return start_api(
        tmp_path,
        "--model",
        f"{MODEL_ID}={gguf}",
        "--initial-peers",
        dht,
        "--data-dir",
        str(data_dir),
    )


def sdk(api: Api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.base_url}/v1", api_key="none", max_retries=0, timeout=120)


def stop(api: Api) -> None:
    api.process.terminate()
    try:
        api.process.wait(timeout=20)
    except Exception:
        api.process.kill()
        api.process.wait(timeout=10)


def upload(client: openai.OpenAI, examples: list[dict[str, Any]], name: str) -> str:
    file = client.files.create(file=(name, jsonl(examples), "application/jsonl"),
                               purpose="fine-tune")  # fmt: skip
    return file.id


def create_job(
    client: openai.OpenAI, train: str, valid: str | None, *, epochs: int, batch: int, seed: int = 3
) -> Any:
    method: Any = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": epochs, "batch_size": batch},
            "tuning_mode": "ptune",
            "pre_seq_len": 16,
        },
    }
    return client.fine_tuning.jobs.create(
        model=MODEL_ID, training_file=train, validation_file=valid, seed=seed, method=method,
        suffix="labels",
    )  # fmt: skip


def wait_for(client: openai.OpenAI, job_id: str, until: Any, api: Api) -> Any:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        assert job.status not in {"failed", "cancelled"}, (job.error, api.log())
        assert time.monotonic() < deadline, (job.status, api.log())
        time.sleep(0.5)


def succeeded(job: Any) -> bool:
    return bool(job.status == "succeeded")


def all_events(client: openai.OpenAI, job_id: str) -> list[Any]:
    """Every event of the job, oldest first, read page by page."""
    events, after = [], None
    while True:
        page = client.fine_tuning.jobs.list_events(job_id, limit=50, after=after)
        events.extend(page.data)
        if not page.has_more:
            break
        after = page.data[-1].id
    return events[::-1]  # pages come newest first


def losses(events: list[Any], key: str) -> list[tuple[int, float]]:
    """(step, loss) of the metrics events that carry `key`, by step; for `valid_loss`,
    the loss measured before training comes first as step 0."""
    out = {}
    for event in events:
        before = re.fullmatch(r"valid_loss before training: (\S+)", event.message)
        if key == "valid_loss" and before:
            out[0] = float(before.group(1))
        data = event.data or {}
        if event.type == "metrics" and data.get(key) is not None:
            out[int(data["step"])] = float(data[key])
    return sorted(out.items())


def accuracy(client: openai.OpenAI, model: str, examples: list[dict[str, Any]]) -> float:
    """Exact-match rate of greedy answers (case and surrounding space ignored)."""
    hits = 0
    for example in examples:
        user = [m for m in example["messages"] if m["role"] != "assistant"]
        label = example["messages"][-1]["content"]
        answer = client.chat.completions.create(
            model=model, messages=user, temperature=0, max_tokens=4
        )
        text = (answer.choices[0].message.content or "").strip().lower().rstrip(".")
        hits += text == label
    return hits / len(examples)


# -- default run: the shared two-host swarm ------------------------------------------------


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, smollm2_swarm: SwarmProcesses, smollm2_gguf: Path
) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("finetune-api")
    started = start_stack_api(tmp, smollm2_gguf, smollm2_swarm.dht, tmp / "data")
    try:
        yield started
    finally:
        stop(started)


@pytest.mark.slow  # ~90 s through a real swarm; unit tests cover the jobs API by default
def test_a_short_job_lowers_the_loss_and_serves_the_tuned_model(api: Api) -> None:
    client = sdk(api)
    train = upload(client, read_jsonl("train.jsonl")[:40], "train.jsonl")
    valid = upload(client, read_jsonl("valid.jsonl")[:16], "valid.jsonl")
    job = create_job(client, train, valid, epochs=1, batch=8)
    job = wait_for(client, job.id, succeeded, api)
    events = all_events(client, job.id)
    valid_losses = losses(events, "valid_loss")
    print("valid loss by step:", valid_losses)
    assert len(losses(events, "train_loss")) == 5  # 40 examples / batch 8, one epoch
    assert valid_losses[0][0] == 0 and valid_losses[-1][0] == 5, valid_losses
    assert valid_losses[-1][1] <= 0.7 * valid_losses[0][1], valid_losses
    tuned = job.fine_tuned_model
    assert tuned in {m.id for m in client.models.list()}
    message: Any = read_jsonl("test.jsonl")[0]["messages"][:1]
    whole = client.chat.completions.create(model=tuned, messages=message, max_tokens=4,
                                           temperature=0)  # fmt: skip
    stream = client.chat.completions.create(model=tuned, messages=message, max_tokens=4,
                                            temperature=0, stream=True)  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole.choices[0].message.content
    completion = client.completions.create(model=tuned, prompt="The kettle", max_tokens=3)
    assert completion.model == tuned and completion.choices[0].text


@pytest.mark.slow  # needs the ~45 s swarm set-up of the test above
def test_fine_tuning_conformance_cases_pass(api: Api) -> None:
    results = run_suite(f"{api.base_url}/v1", MODEL_ID, only_fine_tuning=True)
    print(format_table(results))
    assert all(r.passed for r in results), format_table(results)


# -- slow: the whole task, and churn during jobs -------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 40 steps of 8 examples and 120 greedy answers: ~6 min here
def test_the_whole_task_teaches_the_label_format(api: Api) -> None:
    client = sdk(api)
    train = upload(client, read_jsonl("train.jsonl"), "train.jsonl")
    valid = upload(client, read_jsonl("valid.jsonl"), "valid.jsonl")
    test = read_jsonl("test.jsonl")
    before = accuracy(client, MODEL_ID, test)
    job = create_job(client, train, valid, epochs=2, batch=8)
    job = wait_for(client, job.id, succeeded, api)
    valid_losses = losses(all_events(client, job.id), "valid_loss")
    after = accuracy(client, job.fine_tuned_model, test)
    first, last = valid_losses[0][1], valid_losses[-1][1]
    print(
        f"valid loss {first:.3f} -> {last:.3f} ({1 - last / first:.0%} lower); "
        f"held-out accuracy {before:.0%} -> {after:.0%} on {len(test)} examples"
    )
    assert last <= 0.7 * first, valid_losses
    assert after >= before + 0.3, (before, after)


@pytest.fixture(scope="module")
def replicated_swarm(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[SwarmProcesses]:
    """Blocks [0, 15) on one host, [15, 30) on two."""
    processes = SwarmProcesses(tmp_path_factory.mktemp("replicated-swarm"))
    try:
        processes.start_bootstrap()
        hosts = [
            processes.start_host(smollm2_gguf, "--blocks", blocks)
            for blocks in ("0:15", "15:30", "15:30")
        ]
        processes.wait_ready(*hosts)
        yield processes
    finally:
        processes.close()


@pytest.mark.slow
def test_a_restarted_api_resumes_its_running_job(
    tmp_path: Path, replicated_swarm: SwarmProcesses, smollm2_gguf: Path
) -> None:
    data_dir = tmp_path / "data"
    api = start_stack_api(tmp_path, smollm2_gguf, replicated_swarm.dht, data_dir)
    try:
        client = sdk(api)
        train = upload(client, read_jsonl("train.jsonl")[:32], "train.jsonl")
        job = create_job(client, train, None, epochs=3, batch=8)
        has_checkpoint = lambda j: bool(client.fine_tuning.jobs.checkpoints.list(j.id).data)  # noqa: E731
        wait_for(client, job.id, has_checkpoint, api)
        api.process.kill()
        api.process.wait(timeout=10)
    finally:
        stop(api)
    api = start_stack_api(tmp_path, smollm2_gguf, replicated_swarm.dht, data_dir)
    try:
        client = sdk(api)
        assert job.id in [j.id for j in client.fine_tuning.jobs.list()]
        assert train in [f.id for f in client.files.list()]
        done = wait_for(client, job.id, succeeded, api)
        steps = [s for s, _ in losses(all_events(client, job.id), "train_loss")]
        assert steps[-1] == 12 and sorted(set(steps)) == list(range(1, 13)), steps
        messages = [e.message for e in all_events(client, job.id)]
        assert any("resum" in m.lower() for m in messages), messages
        assert done.fine_tuned_model in {m.id for m in client.models.list()}
    finally:
        stop(api)


@pytest.mark.slow
def test_a_job_survives_a_host_killed_mid_job(
    tmp_path: Path, replicated_swarm: SwarmProcesses, smollm2_gguf: Path
) -> None:
    api = start_stack_api(tmp_path, smollm2_gguf, replicated_swarm.dht, tmp_path / "data")
    try:
        client = sdk(api)
        train = upload(client, read_jsonl("train.jsonl")[:48], "train.jsonl")
        undisturbed = wait_for(
            client, create_job(client, train, None, epochs=1, batch=4).id, succeeded, api
        )
        expected = losses(all_events(client, undisturbed.id), "train_loss")
        job = create_job(client, train, None, epochs=1, batch=4)
        wait_for(client, job.id, lambda j: len(losses(all_events(client, j.id), "train_loss")) >= 3,
                 api)  # fmt: skip
        victim = next(h for h in replicated_swarm.hosts() if h.blocks == (15, 30))
        victim.kill()
        done = wait_for(client, job.id, succeeded, api)
        got = losses(all_events(client, done.id), "train_loss")
        print("undisturbed:", expected, "\nwith a host killed:", got)
        assert [s for s, _ in got] == [s for s, _ in expected]
        for (_, want), (_, have) in zip(expected, got, strict=True):
            assert abs(have - want) <= 1e-3 * abs(want), (expected, got)
    finally:
        stop(api)
