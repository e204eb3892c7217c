"""`/v1/files` through AsyncTestClient and the official `openai` SDK: upload, list with
cursors, retrieve, content, delete, the size limit and the purpose check."""

from __future__ import annotations

import io
from pathlib import Path

import openai
import pytest

from tests.unit.test_api_jobs import TRAIN_LINES, api_client, upload


async def test_upload_retrieve_download_delete(tmp_path: Path) -> None:
    async with api_client(tmp_path) as client:
        uploaded = await upload(client)
        assert uploaded.status_code == 200, uploaded.text
        file = uploaded.json()
        assert file["id"].startswith("file-") and file["object"] == "file"
        assert file["bytes"] == len(TRAIN_LINES) and file["filename"] == "train.jsonl"
        assert file["purpose"] == "fine-tune" and file["status"] == "processed"
        assert (await client.get(f"/v1/files/{file['id']}")).json() == file
        content = await client.get(f"/v1/files/{file['id']}/content")
        assert content.status_code == 200 and content.content == TRAIN_LINES
        deleted = await client.delete(f"/v1/files/{file['id']}")
        assert deleted.json() == {"id": file["id"], "deleted": True, "object": "file"}
        gone = [
            await client.get(f"/v1/files/{file['id']}"),
            await client.get(f"/v1/files/{file['id']}/content"),
            await client.delete(f"/v1/files/{file['id']}"),
        ]
        assert [r.status_code for r in gone] == [404, 404, 404]
        assert gone[0].json()["error"]["code"] == "file_not_found"
        assert list((tmp_path / "files").iterdir()) == []  # the bytes went too


async def test_list_paginates_with_after_limit_and_order(tmp_path: Path) -> None:
    async with api_client(tmp_path) as client:
        ids = [(await upload(client, f"{n}\n".encode())).json()["id"] for n in range(5)]
        first = (await client.get("/v1/files", params={"limit": 2})).json()
        assert [f["id"] for f in first["data"]] == ids[::-1][:2]  # newest first
        assert first["has_more"] and first["last_id"] == ids[3]
        rest = (await client.get("/v1/files", params={"limit": 10, "after": ids[3]})).json()
        assert [f["id"] for f in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
        ascending = (await client.get("/v1/files", params={"order": "asc", "after": ids[1]})).json()
        assert [f["id"] for f in ascending["data"]] == ids[2:]
        results = (await client.get("/v1/files", params={"purpose": "fine-tune-results"})).json()
        assert results["data"] == [] and results["first_id"] is None
        bad = [
            await client.get("/v1/files", params={"limit": 0}),
            await client.get("/v1/files", params={"order": "sideways"}),
            await client.get("/v1/files", params={"after": "file-nope"}),
        ]
    assert [r.status_code for r in bad] == [400, 400, 400]
    assert bad[2].json()["error"]["param"] == "after"


async def test_a_wrong_purpose_is_400_naming_it(tmp_path: Path) -> None:
    async with api_client(tmp_path) as client:
        response = await upload(client, purpose="assistants")
        missing = await client.post("/v1/files", files={"file": ("a.jsonl", b"x")})
        not_multipart = await client.post("/v1/files", json={"purpose": "fine-tune"})
        listed = (await client.get("/v1/files")).json()["data"]
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "purpose" and "'assistants'" in error["message"]
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "purpose"
    assert not_multipart.status_code == 400
    assert listed == [] and list((tmp_path / "files").iterdir()) == []


@pytest.mark.parametrize("size", [1024 + 1, 4096])
async def test_a_file_over_the_limit_is_413_and_leaves_nothing(tmp_path: Path, size: int) -> None:
    async with api_client(tmp_path, max_file_bytes=1024) as client:
        at_limit = await upload(client, b"x" * 1024)
        over = await upload(client, b"x" * size)
        listed = (await client.get("/v1/files")).json()["data"]
    assert at_limit.status_code == 200
    assert over.status_code == 413
    assert (
        over.json()["error"]["code"] == "file_too_large"
        and "1024" in over.json()["error"]["message"]
    )
    assert [f["id"] for f in listed] == [at_limit.json()["id"]]
    assert len(list((tmp_path / "files").iterdir())) == 1


async def test_an_upload_may_exceed_the_json_body_limit(tmp_path: Path) -> None:
    big = b"y" * (256 * 1024)
    async with api_client(tmp_path, max_body_bytes=1024) as client:
        uploaded = await upload(client, big)
        content = await client.get(f"/v1/files/{uploaded.json()['id']}/content")
        json_body = {"model": "base-model", "training_file": "x" * 2048}
        too_big_json = await client.post("/v1/fine_tuning/jobs", json=json_body)
    assert uploaded.status_code == 200 and content.content == big
    assert too_big_json.status_code == 413


async def test_the_openai_sdk_uploads_lists_and_reads_files(tmp_path: Path) -> None:
    async with api_client(tmp_path) as client:
        sdk = openai.AsyncOpenAI(base_url=f"{client.base_url}/v1", api_key="k", http_client=client)
        created = await sdk.files.create(
            file=("data.jsonl", io.BytesIO(TRAIN_LINES)), purpose="fine-tune"
        )
        assert created.bytes == len(TRAIN_LINES) and created.filename == "data.jsonl"
        page = await sdk.files.list(purpose="fine-tune")
        assert [f.id for f in page.data] == [created.id]
        assert (await sdk.files.content(created.id)).content == TRAIN_LINES
        assert (await sdk.files.delete(created.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await sdk.files.retrieve(created.id)
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await sdk.files.create(file=("a.jsonl", io.BytesIO(b"x")), purpose="batch")
