"""Segment-compatible HTTP intake, driven by the official Segment Python client against a
uvicorn server started on a free loopback port, plus hand-made requests for gzip, limits,
auth and durability."""

from __future__ import annotations

import base64
import gzip
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from segment.analytics import Client
from segment.analytics.request import APIError

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.sources.common import TraitsUpdate
from featurerec.events.sources.segment import corrected_timestamp, snake_case
from featurerec.events.sources.segment_http import IntakeConfig, build_router
from featurerec.events.validate import ValidatedBatch

KEY = "wk_test_123"


class Collector:
    """on_batch that records what was handed over (stands in for Landing.write)."""

    def __init__(self) -> None:
        self.batches: list[Any] = []
        self.fail = False

    def __call__(self, batch: Any) -> str:
        if self.fail:
            raise OSError("disk full")
        self.batches.append(batch)
        return "receipt"

    @property
    def events(self) -> list[dict[str, Any]]:
        return [
            r for b in self.batches if isinstance(b, ValidatedBatch) for r in b.events.to_pylist()
        ]

    @property
    def quarantine(self) -> list[dict[str, Any]]:
        return [
            r
            for b in self.batches
            if isinstance(b, ValidatedBatch)
            for r in b.quarantine.to_pylist()
        ]

    @property
    def traits(self) -> list[dict[str, Any]]:
        return [r for b in self.batches if isinstance(b, TraitsUpdate) for r in b.rows.to_pylist()]


def _settings(tmp_path: Any, **opts: Any) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "sources": {"web": {"kind": "segment_http", "options": {"write_keys": [KEY], **opts}}},
        }
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Any) -> Iterator[tuple[str, Collector]]:
    """A real uvicorn server with the Segment router, on a free loopback port."""
    collector = Collector()
    app = FastAPI()
    app.include_router(build_router(_settings(tmp_path), collector, collector))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", collector
    srv.should_exit = True
    thread.join(timeout=5)


def _client(host: str, key: str = KEY, **kw: Any) -> tuple[Client, list[Exception]]:
    errors: list[Exception] = []
    client = Client(
        key,
        host=host,
        sync_mode=True,
        max_retries=0,
        on_error=lambda e, batch: errors.append(e),
        **kw,
    )
    return client, errors


def test_official_client_track_page_identify(server: tuple[str, Collector]) -> None:
    host, got = server
    client, errors = _client(host)
    ts = datetime(2026, 2, 28, 14, 23, 17, tzinfo=UTC)
    client.track(
        user_id="usr_1",
        event="Feature Used",
        properties={"feature_category": "automations", "is_first_use": True, "extra": 1},
        context={"traits": {"role": "project_manager", "plan": "business"}},
        timestamp=ts,
        message_id="m-1",
    )
    client.page(user_id="usr_1", name="Board", properties={"path": "/boards"}, message_id="m-2")
    client.identify(
        user_id="usr_1",
        traits={"role": "admin", "workspace_id": "ws_9", "team_size": 12},
        message_id="m-3",
    )
    # duplicate messageId in a later request: landed again, deduped on event_id when the
    # landing is drained into the warehouse (see test_segment_through_real_landing)
    client.track(user_id="usr_1", event="Feature Used", timestamp=ts, message_id="m-1")
    client.track(user_id="usr_1", event="heartbeat", message_id="m-4")  # excluded type
    assert errors == []
    events: dict[str, dict[str, Any]] = {}
    for e in got.events:
        events.setdefault(e["event_id"], e)
    assert [e["event_id"] for e in got.events] == ["m-1", "m-2", "m-1"]
    track = events["m-1"]
    assert track["event_type"] == "feature_used"
    assert track["feature_category"] == "automations" and track["is_first_use"] is True
    assert orjson.loads(track["properties"]) == {"extra": 1, "segment_event": "Feature Used"}
    assert orjson.loads(track["user_traits"])["role"] == "project_manager"
    # sentAt was "now" on the same clock: the skew correction keeps the timestamp (± 2 s)
    assert abs(track["timestamp"] - ts.replace(tzinfo=None)) < timedelta(seconds=2)
    assert events["m-2"]["event_type"] == "page_viewed"
    assert orjson.loads(events["m-2"]["properties"])["page_name"] == "Board"
    traits = got.traits
    assert len(traits) == 1 and traits[0]["role"] == "admin"
    assert traits[0]["workspace_id"] == "ws_9"
    assert orjson.loads(traits[0]["traits"])["team_size"] == 12
    # filtered counted, not stored
    assert sum(b.filtered for b in got.batches if isinstance(b, ValidatedBatch)) == 1


def test_official_client_gzip_and_batching(server: tuple[str, Collector]) -> None:
    host, got = server
    client = Client(KEY, host=host, gzip=True, upload_size=50, max_retries=0)
    for i in range(120):
        client.track(user_id=f"u{i % 7}", event="task_created", message_id=f"g-{i}")
    client.flush()
    client.join()
    assert len(got.events) == 120
    assert len([b for b in got.batches if isinstance(b, ValidatedBatch)]) >= 3  # 50 per upload


def test_wrong_key_is_401_and_nothing_stored(server: tuple[str, Collector]) -> None:
    host, got = server
    client, _ = _client(host, key="wrong")
    with pytest.raises(APIError, match="invalid write key") as info:
        client.track(user_id="u", event="task_created", message_id="x")
    assert info.value.status == 401
    r = httpx.post(f"{host}/v1/track", json={"userId": "u", "event": "task_created"})
    assert r.status_code == 401 and r.json()["message"].startswith("missing write key")
    assert got.batches == []


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def test_hand_made_gzip_limits_and_bad_json(server: tuple[str, Collector]) -> None:
    host, got = server
    msg = {"type": "track", "userId": "u1", "event": "board_created", "messageId": "h1"}
    body = gzip.compress(orjson.dumps({"batch": [msg]}))
    r = httpx.post(
        f"{host}/v1/batch",
        content=body,
        headers={**_auth(), "Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200 and r.json()["success"] is True
    assert [e["event_id"] for e in got.events] == ["h1"]

    big = {**msg, "messageId": "h2", "properties": {"blob": "x" * 33_000}}
    r = httpx.post(f"{host}/v1/track", json=big, headers=_auth())
    assert r.status_code == 400 and "limit is 32768 bytes per message" in r.json()["message"]

    batch = {
        "batch": [
            {**msg, "messageId": f"b{i}", "properties": {"p": "y" * 20_000}} for i in range(30)
        ]
    }
    r = httpx.post(f"{host}/v1/batch", json=batch, headers=_auth())
    assert r.status_code == 413 and "per batch" in r.json()["message"]
    # the same over-limit batch gzipped (small on the wire) is still refused after inflating
    r = httpx.post(
        f"{host}/v1/batch",
        content=gzip.compress(orjson.dumps(batch)),
        headers={**_auth(), "Content-Encoding": "gzip"},
    )
    assert r.status_code == 413

    r = httpx.post(f"{host}/v1/batch", content=b"{not json", headers=_auth())
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"
    r = httpx.post(
        f"{host}/v1/batch", content=b"garbage", headers={**_auth(), "Content-Encoding": "gzip"}
    )
    assert r.status_code == 400 and "gzip" in r.json()["message"]
    assert [e["event_id"] for e in got.events] == ["h1"]  # nothing else stored


def test_bad_messages_quarantined_rest_accepted(server: tuple[str, Collector]) -> None:
    host, got = server
    batch = {
        "batch": [
            {"type": "track", "userId": "u1", "event": "form_created", "messageId": "ok1"},
            {"type": "track", "event": "form_created", "messageId": "noid"},
            {"type": "track", "userId": "u1", "messageId": "noevent"},
            {"type": "track", "userId": "u1", "event": "form_created", "timestamp": "soon"},
            "not an object",
            {"type": "group", "userId": "u1", "groupId": "ws1"},
        ]
    }
    r = httpx.post(f"{host}/v1/batch", json=batch, headers=_auth())
    assert r.status_code == 200
    body = r.json()
    assert body["accepted"] == 1 and body["quarantined"] == 4 and body["ignored"] == 1
    reasons = " | ".join(q["reason"] for q in got.quarantine)
    assert "neither userId nor anonymousId" in reasons
    assert "without an event name" in reasons
    assert "not an ISO-8601 timestamp" in reasons
    assert "not a JSON object" in reasons
    assert all(q["location"].startswith("http:/v1/batch@") for q in got.quarantine)


def test_success_only_after_durable_write(server: tuple[str, Collector]) -> None:
    host, got = server
    got.fail = True
    r = httpx.post(
        f"{host}/v1/track",
        json={"userId": "u1", "event": "task_created", "messageId": "d1"},
        headers=_auth(),
    )
    assert r.status_code == 503 and r.json()["success"] is False
    assert "disk full" in r.json()["message"]
    got.fail = False
    r = httpx.post(
        f"{host}/v1/track",
        json={"userId": "u1", "event": "task_created", "messageId": "d1"},
        headers=_auth(),
    )
    assert r.json() == {
        "success": True,
        "accepted": 1,
        "quarantined": 0,
        "filtered": 0,
        "duplicates": 0,
        "traits": 0,
        "ignored": 0,
    }


def test_clock_skew_correction() -> None:
    received = datetime(2026, 3, 1, 12, 0, 0)
    # client clock 10 minutes fast: sent "12:10", event at "12:09" → really 11:59
    msg = {"timestamp": "2026-03-01T12:09:00Z", "sentAt": "2026-03-01T12:10:00+00:00"}
    assert corrected_timestamp(msg, received_at=received) == datetime(2026, 3, 1, 11, 59)
    # batch-level sentAt applies when the message has none
    msg2 = {"timestamp": "2026-03-01T12:09:00Z"}
    assert corrected_timestamp(
        msg2, received_at=received, batch_sent_at="2026-03-01T12:10:00Z"
    ) == datetime(2026, 3, 1, 11, 59)
    assert corrected_timestamp({}, received_at=received) == received


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Feature Used", "feature_used"),
        ("featureUsed", "feature_used"),
        ("feature_used", "feature_used"),
        ("Board-Created!", "board_created"),
        ("API Key Generated", "api_key_generated"),
    ],
)
def test_snake_case(name: str, expected: str) -> None:
    assert snake_case(name) == expected


def test_bad_options_name_the_field(tmp_path: Any) -> None:
    s = _settings(tmp_path, max_message_bytes=0)
    with pytest.raises(DataError, match=r"sources\.web\.options\.max_message_bytes"):
        IntakeConfig.from_settings(s)


def test_segment_through_real_landing(tmp_path: Any) -> None:
    """Official client → router → Landing.write (durable) → Landing.drain → warehouse:
    a messageId sent twice in separate requests is stored once."""
    from featurerec.events.ingest import Ingestor
    from featurerec.events.landing import Landing
    from featurerec.warehouse.engine import DuckDBEngine

    settings = _settings(tmp_path)
    landing = Landing.for_settings(settings)
    app = FastAPI()
    app.include_router(build_router(settings, landing.write))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        client, errors = _client(f"http://127.0.0.1:{port}")
        for _ in range(2):
            client.track(user_id="u1", event="Board Created", message_id="dup-1")
        client.track(user_id="u2", event="Board Created", message_id="m-2")
        assert errors == []
        assert len(landing.pending()) == 3  # each answer came after its file was durable
    finally:
        srv.should_exit = True
        thread.join(timeout=5)
    with DuckDBEngine(settings.warehouse_path) as db:
        report = landing.drain(Ingestor(db, settings))
        assert report.accepted == 2 and report.duplicate == 1
        rows = db.query_rows("SELECT event_id, event_type, source FROM events ORDER BY event_id")
    assert rows == [
        {"event_id": "dup-1", "event_type": "board_created", "source": "web"},
        {"event_id": "m-2", "event_type": "board_created", "source": "web"},
    ]
