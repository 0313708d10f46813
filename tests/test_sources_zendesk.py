"""Zendesk tickets: incremental import through a local fake server that implements the shape
of the cursor-based incremental ticket export API, and import from export files."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import orjson
import pytest

from featurerec.config import Settings, SourceConfig
from featurerec.errors import DataError
from featurerec.events.ingest import Ingestor
from featurerec.events.sources.common import SourceUnavailable
from featurerec.events.sources.zendesk import ZendeskOptions, ZendeskTickets
from featurerec.warehouse.engine import DuckDBEngine

AUTH = "Basic " + base64.b64encode(b"ops@cloudflow.test/token:tok").decode()
FEATURES = {
    "automations": {"tags": ["automation_rules"], "keywords": ["automation", "trigger"]},
    "gantt_charts": {"tags": ["gantt"], "keywords": ["gantt"]},
}


class FakeZendesk:
    """Tickets ordered by (updated_at, id); pages of ``page_size``; opaque cursors."""

    def __init__(self, page_size: int = 2) -> None:
        self.tickets: list[dict[str, Any]] = []
        self.users = [
            {"id": 900 + i, "external_id": f"usr_{i}", "email": f"u{i}@x.test"} for i in range(5)
        ]
        self.page_size = page_size
        self.requests: list[dict[str, list[str]]] = []
        self.rate_limit_next = 0

    def add(self, tid: int, updated: str, **kw: Any) -> None:
        self.tickets = [t for t in self.tickets if t["id"] != tid]
        self.tickets.append(
            {
                "id": tid,
                "requester_id": 900 + tid % 5,
                "created_at": "2026-02-01T10:00:00Z",
                "updated_at": updated,
                "subject": kw.pop("subject", "Question"),
                "tags": kw.pop("tags", []),
                "status": kw.pop("status", "open"),
                **kw,
            }
        )
        self.tickets.sort(key=lambda t: (t["updated_at"], t["id"]))

    def page(self, query: dict[str, list[str]]) -> tuple[int, dict[str, str], Any]:
        self.requests.append(query)
        if self.rate_limit_next:
            self.rate_limit_next -= 1
            return 429, {"Retry-After": "0"}, {"error": "APIRateLimitExceeded"}
        if "cursor" in query:  # like Zendesk's: "<updated epoch>|<id>" of the last item sent
            ts, tid = base64.b64decode(query["cursor"][0]).decode().split("|")
            after = (int(ts), int(tid))
        else:
            after = (int(query["start_time"][0]) - 1, 10**9)
        rest = [t for t in self.tickets if (_epoch(t["updated_at"]), t["id"]) > after]
        chunk = rest[: self.page_size]
        last = (_epoch(chunk[-1]["updated_at"]), chunk[-1]["id"]) if chunk else after
        cursor = base64.b64encode(f"{last[0]}|{last[1]}".encode()).decode()
        body: dict[str, Any] = {
            "tickets": chunk,
            "after_cursor": cursor,
            "after_url": f"/api/v2/incremental/tickets/cursor.json?cursor={cursor}",
            "before_cursor": None,
            "end_of_stream": len(rest) <= self.page_size,
        }
        if query.get("include") == ["users"]:
            body["users"] = self.users
        return 200, {}, body


def _epoch(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeZendesk]]:
    api = FakeZendesk()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path != "/api/v2/incremental/tickets/cursor.json":
                self.send_response(404)
                self.end_headers()
                return
            if self.headers.get("Authorization") != AUTH:
                self.send_response(401)
                self.end_headers()
                return
            status, headers, body = api.page(parse_qs(url.query))
            data = orjson.dumps(body)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", api
    server.shutdown()
    server.server_close()


def _source(settings: Settings, url: str, engine: DuckDBEngine, **opts: Any) -> ZendeskTickets:
    options = ZendeskOptions.model_validate(
        {
            "base_url": url,
            "email": "ops@cloudflow.test",
            "api_token": "tok",
            "features": FEATURES,
            "start_time": "2026-01-01T00:00:00Z",
            **opts,
        }
    )
    return ZendeskTickets(
        "zendesk", options, settings, Ingestor(engine, settings), engine, sleep=lambda s: None
    )


def test_incremental_cursor_import_and_feature_mapping(
    settings: Settings, fake: tuple[str, FakeZendesk]
) -> None:
    url, api = fake
    api.add(1, "2026-02-01T10:00:00Z", subject="How do I set up an automation?")
    api.add(2, "2026-02-02T10:00:00Z", tags=["gantt", "billing"], subject="Chart broken")
    api.add(3, "2026-02-03T10:00:00Z", subject="Invoice question")
    api.add(4, "2026-02-04T10:00:00Z", tags=["automation_rules"], status="solved")
    api.add(5, "2025-12-01T10:00:00Z", subject="Before the start time")  # excluded by start_time
    with DuckDBEngine(settings.warehouse_path) as db:
        zd = _source(settings, url, db)
        report = zd.sync_once()
        assert report.pages == 2 and report.upserts == 4 and report.feature_tickets == 3
        rows = {r["ticket_id"]: r for r in db.query_rows("SELECT * FROM support_tickets")}
        assert set(rows) == {"1", "2", "3", "4"}
        assert rows["1"]["feature"] == "automations"  # keyword in subject
        assert rows["2"]["feature"] == "gantt_charts"  # tag
        assert rows["3"]["feature"] is None
        assert rows["4"]["feature"] == "automations" and rows["4"]["status"] == "solved"
        assert rows["1"]["user_id"] == "usr_1"  # requester's external_id (side-loaded)
        assert orjson.loads(rows["2"]["tags"]) == ["gantt", "billing"]
        assert "start_time" in api.requests[0] and "cursor" in api.requests[1]

        # next sync continues from the stored cursor: only the changed tickets
        api.add(3, "2026-02-05T10:00:00Z", subject="Trigger not firing", status="open")
        api.add(2, "2026-02-06T10:00:00Z", status="deleted")
        api.requests.clear()
        again = _source(settings, url, db).sync_once()
        assert "cursor" in api.requests[0]
        assert again.upserts == 1 and again.deletes == 1
        rows = {r["ticket_id"]: r for r in db.query_rows("SELECT * FROM support_tickets")}
        assert set(rows) == {"1", "3", "4"} and rows["3"]["feature"] == "automations"


def test_rate_limit_waits_and_bad_tickets_quarantined(
    settings: Settings, fake: tuple[str, FakeZendesk]
) -> None:
    url, api = fake
    api.add(1, "2026-02-01T10:00:00Z")
    api.add(2, "2026-02-02T10:00:00Z", created_at="not a date")
    api.rate_limit_next = 2
    with DuckDBEngine(settings.warehouse_path) as db:
        report = _source(settings, url, db).sync_once()
        assert report.rate_limited == 2 and report.upserts == 1 and report.quarantined == 1
        q = db.query_rows("SELECT * FROM ingest_quarantine")
        assert "created_at: not an ISO-8601 timestamp" in q[0]["reason"]
        assert q[0]["location"].startswith("zendesk:/api/v2/incremental/tickets/cursor.json")


def test_wrong_credentials_and_unreachable(
    settings: Settings, fake: tuple[str, FakeZendesk]
) -> None:
    url, _ = fake
    with DuckDBEngine(":memory:") as db:
        with pytest.raises(DataError, match="refused the credentials"):
            _source(settings, url, db, api_token="nope").sync_once()
        with pytest.raises(SourceUnavailable, match="Zendesk unreachable"):
            _source(settings, "http://127.0.0.1:9", db, max_retries=1).sync_once()


def test_import_export_files(settings: Settings, tmp_path: Path) -> None:
    ndjson = tmp_path / "tickets.json"
    lines = [
        orjson.dumps(
            {
                "id": 10,
                "created_at": "2026-02-01T10:00:00Z",
                "subject": "Gantt export",
                "tags": [],
                "status": "open",
                "requester_id": 1,
            }
        ),
        b"{broken",
        orjson.dumps(
            {
                "id": 11,
                "created_at": "2026-02-01T11:00:00Z",
                "subject": "Login",
                "tags": [],
                "status": "pending",
            }
        ),
    ]
    ndjson.write_bytes(b"\n".join(lines))
    api_shape = tmp_path / "page.json"
    api_shape.write_bytes(
        orjson.dumps(
            {
                "tickets": [
                    {
                        "id": 12,
                        "created_at": "2026-02-02T10:00:00Z",
                        "tags": ["automation_rules"],
                        "requester_id": 7,
                    }
                ],
                "users": [{"id": 7, "external_id": "usr_7"}],
            }
        )
    )
    with DuckDBEngine(settings.warehouse_path) as db:
        zd = _source(settings, "http://unused", db)
        report = zd.import_files([ndjson, api_shape])
        assert report.upserts == 3 and report.quarantined == 1
        rows = {r["ticket_id"]: r for r in db.query_rows("SELECT * FROM support_tickets")}
        assert rows["10"]["feature"] == "gantt_charts" and rows["11"]["feature"] is None
        assert rows["12"]["user_id"] == "usr_7" and rows["12"]["feature"] == "automations"
        q = db.query_rows("SELECT location FROM ingest_quarantine")
        assert q == [{"location": f"{ndjson}:2"}]


def test_options_errors() -> None:
    src = SourceConfig(kind="zendesk", options={"features": {}})
    with pytest.raises(DataError, match=r"give options\.base_url or options\.subdomain"):
        _ = ZendeskOptions.from_source("zd", src).url
    src = SourceConfig(kind="zendesk", options={"subdomain": "x", "user_id_from": "email"})
    with pytest.raises(DataError, match="unknown id source 'email'"):
        ZendeskOptions.from_source("zd", src)


def test_scheduler_runs_zendesk_from_config(tmp_path: Path, fake: tuple[str, FakeZendesk]) -> None:
    from featurerec.events.sources.common import SourceState
    from featurerec.events.sources.scheduler import Scheduler

    url, api = fake
    api.add(1, "2026-02-01T10:00:00Z", tags=["gantt"])
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "sources": {
                "support": {
                    "kind": "zendesk",
                    "options": {
                        "base_url": url,
                        "email": "ops@cloudflow.test",
                        "api_token": "tok",
                        "features": FEATURES,
                    },
                }
            },
        }
    )
    with DuckDBEngine(settings.warehouse_path) as db:
        out = Scheduler(settings).run_once(Ingestor(db, settings), db)
        assert out[0].ok and out[0].summary["upserts"] == 1
        assert db.query_rows("SELECT feature FROM support_tickets") == [{"feature": "gantt_charts"}]
    state = SourceState.load(settings, "support", "zendesk")
    assert state.position["after_cursor"] and state.counts["upserts"] == 1
    assert state.last_success is not None
