"""The web pages (`stamen.api.pages`) and what the monitor reads: HTML with nothing from
other hosts and no secret, static files served from the package, `/v1/swarm`'s host
fields, and the sampled history. Fast: a fake engine, no model."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from stamen.api.app import create_app, static_engines
from stamen.api.engine import HostView, SwarmSnapshot
from stamen.api.pages import PAGES, STATIC_DIR, SwarmHistory
from stamen.api.state import ServingSettings
from stamen.api.swarm_engine import SwarmEngine, reachability
from stamen.swarm_core.protocol.records import HostRecord, HostState, new_host_record
from stamen.transports.base import Credentials

SECRET_KEY = "sk-page-test-0123456789"
MODEL = "fake-model"
NUM_BLOCKS = 4
PAGE_PATHS = [page.path for page in PAGES]
# src= / href= naming a scheme or a protocol-relative host: anything not from this server.
EXTERNAL_REFERENCE = re.compile(
    r"""(?:src|href|action)\s*=\s*["']?\s*(?:[a-z][\w+.-]*:|//)""", re.I
)
EXTERNAL_CSS = re.compile(r"""url\(\s*["']?\s*(?:[a-z][\w+.-]*:|//)|@import""", re.I)


class FakeSwarmEngine:
    """Enough of an `EngineClient` for the pages: a fixed view of two hosts, one of them
    missing blocks [3, 4), that tests may change."""

    model_id = MODEL

    def __init__(self) -> None:
        self.hosts = [
            HostView("peer-a", 0, 2, "online", "alpha", 12.5, 4096, "0.1.0", "tcp", "direct"),
            HostView("peer-b", 2, 3, "joining", None, 0.0, 0, "0.1.0", "webrtc", "relayed"),
        ]

    def ready(self) -> bool:
        return False

    def swarm_snapshot(self) -> SwarmSnapshot:
        return SwarmSnapshot.from_hosts(MODEL, NUM_BLOCKS, self.hosts)


@asynccontextmanager
async def client_for(engine: Any, **settings: Any) -> AsyncIterator[AsyncTestClient]:
    app = create_app(ServingSettings(**settings), static_engines(engine), history_interval_s=0.05)
    async with AsyncTestClient(app) as client:
        yield client


@pytest.mark.parametrize("path", PAGE_PATHS)
async def test_pages_are_html_with_nothing_from_other_hosts(path: str) -> None:
    async with client_for(FakeSwarmEngine()) as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert '<meta name="viewport"' in html and "<html lang=" in html
    assert EXTERNAL_REFERENCE.findall(html) == []
    assert "script-src 'self'" in response.headers["content-security-policy"]
    # No inline script (the policy would refuse it anyway): every script tag has a src.
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None


async def test_every_referenced_asset_is_served_from_the_package() -> None:
    async with client_for(FakeSwarmEngine()) as client:
        html = "".join([(await client.get(path)).text for path in PAGE_PATHS])
        assets = sorted(set(re.findall(r'(?:src|href)="(/static/[^"]+)"', html)))
        answers = {asset: await client.get(asset) for asset in assets}
    assert {"/static/stamen.css", "/static/common.js", "/static/chat.js"} <= set(assets)
    for asset, response in answers.items():
        assert response.status_code == 200, asset
        name = asset.removeprefix("/static/")
        assert response.content == (STATIC_DIR / name).read_bytes()
        if name.endswith(".css"):
            assert EXTERNAL_CSS.findall(response.text) == [], asset
    assert answers["/static/stamen.css"].headers["content-type"].startswith("text/css")


def test_static_files_fetch_nothing_from_other_hosts() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        # The only URL allowed is the SVG namespace name, which is never fetched.
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert urls == set(), path.name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, path.name
        assert "eval(" not in text and "new Function" not in text, path.name


async def test_with_api_keys_pages_open_without_a_key_and_never_contain_it() -> None:
    async with client_for(FakeSwarmEngine(), api_keys=frozenset({SECRET_KEY})) as client:
        pages = [await client.get(path) for path in PAGE_PATHS]
        # A client that sends its key gets the same pages: nothing echoes the key back.
        bearer = {"Authorization": f"Bearer {SECRET_KEY}"}
        pages += [await client.get(path, headers=bearer) for path in PAGE_PATHS]
        script = await client.get("/static/common.js")
        swarm = await client.get("/v1/swarm")
        history = await client.get("/v1/swarm/history")
        allowed = await client.get("/v1/swarm", headers={"Authorization": f"Bearer {SECRET_KEY}"})
    assert [page.status_code for page in pages] == [200] * len(PAGE_PATHS) * 2
    assert all(SECRET_KEY not in page.text for page in pages)
    assert script.status_code == 200 and SECRET_KEY not in script.text
    assert swarm.status_code == 401 and history.status_code == 401
    assert allowed.status_code == 200


async def test_pages_stay_out_of_the_openapi_document() -> None:
    async with client_for(FakeSwarmEngine()) as client:
        document = (await client.get("/schema/openapi.json")).json()
    assert "/v1/swarm/history" in document["paths"]
    for path in [*PAGE_PATHS, "/static/{file_path}"]:
        assert path not in document["paths"]
    assert not any(path.startswith("/static") for path in document["paths"])


async def test_swarm_lists_version_transport_and_address_kind_and_readiness() -> None:
    async with client_for(FakeSwarmEngine()) as client:
        body = (await client.get("/v1/swarm")).json()
    (model,) = body["models"]
    assert model["ready"] is False and model["covered_blocks"] == 2
    alpha, beta = model["hosts"]
    assert alpha["version"] == "0.1.0" and alpha["public_name"] == "alpha"
    assert (alpha["transport"], alpha["address_kind"]) == ("tcp", "direct")
    assert (beta["transport"], beta["address_kind"]) == ("webrtc", "relayed")
    assert alpha["cache_tokens_left"] == 4096 and alpha["throughput"] == 12.5


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (("tcp://10.0.0.1:4000",), ("tcp", "direct")),
        (("webrtc://relay.example:7000/ab12",), ("webrtc", "relayed")),
        (("webrtc://relay:7000/ab12", "tcp://10.0.0.1:4000"), ("webrtc", "relayed")),
        (("tcp://10.0.0.1:4000", "webrtc://relay:7000/ab12"), ("tcp", "direct")),
        ((), (None, None)),
        (("10.0.0.1:4000",), (None, None)),
    ],
)
def test_reachability_follows_the_first_address(
    addresses: tuple[str, ...], expected: tuple[str | None, str | None]
) -> None:
    assert reachability(addresses) == expected


async def test_history_serves_samples_and_only_new_ones_after_since() -> None:
    engine = FakeSwarmEngine()
    async with client_for(engine) as client:
        first = (await client.get("/v1/swarm/history")).json()
        for _ in range(200):  # samples every 0.05 s: 10 s at most
            if len(first["data"]) >= 2:
                break
            await asyncio.sleep(0.05)
            first = (await client.get("/v1/swarm/history")).json()
        engine.hosts = engine.hosts[:1]  # peer-b left
        last_time = first["data"][-1]["time_s"]
        later = (await client.get("/v1/swarm/history", params={"since": last_time})).json()
        for _ in range(200):
            if later["data"]:
                break
            await asyncio.sleep(0.05)
            later = (await client.get("/v1/swarm/history", params={"since": last_time})).json()
    assert first["object"] == "swarm.history" and first["interval_s"] == 0.05
    sample = first["data"][0]
    (model,) = sample["models"]
    assert model["model"] == MODEL and model["num_blocks"] == NUM_BLOCKS
    assert {h["peer_id"]: (h["start"], h["end"], h["state"]) for h in model["hosts"]} == {
        "peer-a": (0, 2, "online"),
        "peer-b": (2, 3, "joining"),
    }
    assert all(s["time_s"] > last_time for s in later["data"])
    assert [h["peer_id"] for h in later["data"][-1]["models"][0]["hosts"]] == ["peer-a"]


def test_history_rate_is_decode_steps_per_second_over_a_bounded_window() -> None:
    steps = [0]
    history = SwarmHistory(lambda: [], lambda: steps[0], interval_s=2.0, window_s=10.0)
    for second in range(0, 20, 2):
        steps[0] += 30  # 30 steps every 2 s
        history.sample(now_s=1000.0 + second, monotonic_s=float(second))
    samples = history.samples()
    assert len(samples) == 5  # 10 s of 2 s samples
    assert [s.time_s for s in samples] == [1010.0, 1012.0, 1014.0, 1016.0, 1018.0]
    assert all(s.tokens_per_s == pytest.approx(15.0) for s in samples)
    assert [s.time_s for s in history.samples(since_s=1014.0)] == [1016.0, 1018.0]


def test_history_refuses_an_interval_longer_than_its_window() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        SwarmHistory(lambda: [], lambda: 0, interval_s=5.0, window_s=1.0)


@pytest.mark.parametrize("since", ["yesterday", "", "1e999999", "nan", "-inf"])
async def test_a_since_that_is_no_finite_number_is_a_400_in_openais_shape(since: str) -> None:
    async with client_for(FakeSwarmEngine()) as client:
        response = await client.get("/v1/swarm/history", params={"since": since})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


class FakeSwarm:
    """What `SwarmEngine.swarm_snapshot` reads of a `SwarmClient`."""

    num_blocks = NUM_BLOCKS

    def __init__(self, records: list[HostRecord]) -> None:
        self._records = records

    def records(self) -> list[HostRecord]:
        return self._records


def test_the_swarm_engine_shows_what_host_records_announce() -> None:
    direct = msgspec.structs.replace(
        new_host_record(Credentials.generate(), model=MODEL, start_block=0, end_block=2,
                        addresses=["tcp://127.0.0.1:4000"]),
        version="0.1.0", public_name="alpha", free_cache_tokens=512,
        throughput_tokens_per_s=20.0,
    )  # fmt: skip
    relayed = new_host_record(
        Credentials.generate(), model=MODEL, start_block=2, end_block=4,
        state=HostState.JOINING, addresses=["webrtc://127.0.0.1:7000/abcd"],
    )  # fmt: skip
    engine = SwarmEngine(
        MODEL,
        config=object(),
        tokenizer=object(),
        head=cast(Any, object()),
        swarm=cast(Any, FakeSwarm([direct, relayed])),
    )
    snapshot = engine.swarm_snapshot()
    assert snapshot.covered_blocks == 2  # the joining host's blocks are not served yet
    first, second = snapshot.hosts
    assert (first.version, first.public_name, first.transport, first.address_kind) == (
        "0.1.0",
        "alpha",
        "tcp",
        "direct",
    )
    assert (first.cache_tokens_left, first.throughput) == (512, 20.0)
    assert (second.state, second.transport, second.address_kind) == ("joining", "webrtc", "relayed")
    assert second.version is None and second.public_name is None  # not announced
