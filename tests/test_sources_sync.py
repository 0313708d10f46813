"""Scheduling of sources: frequency, persisted state, backoff for sources that go away, the
``featurerec sources sync / status`` commands, and the trait landing of the HTTP intake."""

from __future__ import annotations

import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from featurerec.cli import app
from featurerec.config import Settings, SourceConfig
from featurerec.errors import DataError
from featurerec.events.ingest import Ingestor
from featurerec.events.sources.common import Backoff, SourceState, SourceUnavailable, TraitsUpdate
from featurerec.events.sources.scheduler import Scheduler, status_rows
from featurerec.events.sources.traits import TraitsLanding
from featurerec.warehouse.engine import DuckDBEngine


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 3, 1, 12, 0, 0)

    def __call__(self) -> datetime:
        return self.t


def _settings(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "sources": {
                "pg": {"kind": "postgres_cdc", "every_seconds": 900, "options": {"dsn": "x"}},
                "assign": {"kind": "postgres_cdc", "every_seconds": 0, "options": {"dsn": "y"}},
                "zd": {"kind": "zendesk", "every_seconds": 900, "enabled": False},
            },
        }
    )


def test_frequency_backoff_and_recovery(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    clock = Clock()
    calls: list[str] = []
    down = {"pg": True}

    def runner(name: str, source: SourceConfig, *_: Any) -> dict[str, Any]:
        calls.append(name)
        if down.get(name):
            raise SourceUnavailable("PostgreSQL unreachable (host=db): connection refused")
        return {"upserts": 3}

    sched = Scheduler(settings, runner=runner, now=clock)
    assert set(sched.sources) == {"pg", "assign"}  # disabled zd is skipped
    out = {o.name: o for o in sched.run_once(None, None)}
    assert out["assign"].ok and not out["pg"].ok
    st = SourceState.load(settings, "pg", "postgres_cdc")
    assert st.consecutive_failures == 1 and "connection refused" in (st.last_error or "")
    first_retry = datetime.fromisoformat(st.next_attempt_at or "")
    assert clock.t < first_retry <= clock.t + timedelta(seconds=1)

    # immediately after: only the real-time source is due
    calls.clear()
    sched.run_once(None, None)
    assert calls == ["assign"]

    # failures back off exponentially
    delays = []
    for _ in range(4):
        clock.t = datetime.fromisoformat(
            SourceState.load(settings, "pg", "x").next_attempt_at or ""
        )
        sched.run_once(None, None)
        st = SourceState.load(settings, "pg", "x")
        delays.append((datetime.fromisoformat(st.next_attempt_at or "") - clock.t).total_seconds())
    assert st.consecutive_failures == 5
    assert delays[-1] > delays[0] * 4

    # the database comes back: success resets the failures; next run in 15 minutes
    down["pg"] = False
    clock.t = datetime.fromisoformat(st.next_attempt_at or "")
    sched.run_once(None, None)
    st = SourceState.load(settings, "pg", "x")
    assert st.consecutive_failures == 0 and st.last_error is None and st.next_attempt_at is None
    calls.clear()
    clock.t += timedelta(seconds=899)
    sched.run_once(None, None)
    assert calls == ["assign"]
    clock.t += timedelta(seconds=2)
    sched.run_once(None, None)
    assert calls == ["assign", "pg", "assign"]
    rows = {r["source"]: r for r in status_rows(settings)}
    assert rows["pg"]["last_success"] is not None and rows["zd"]["enabled"] is False


def test_unknown_source_named() -> None:
    with pytest.raises(DataError, match="unknown source"):
        Scheduler(Settings(), only=["nope"])


def test_backoff_is_seeded_and_capped() -> None:
    a = [Backoff(base=1, cap=10, seed=3).next_delay() for _ in range(1)]
    b1, b2 = Backoff(base=1, cap=10, seed=3), Backoff(base=1, cap=10, seed=3)
    seq1 = [b1.next_delay() for _ in range(8)]
    assert seq1 == [b2.next_delay() for _ in range(8)] and seq1[0] == a[0]
    assert max(seq1) <= 10 and seq1[-1] >= 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_sync_once_reports_a_down_database_and_drains_traits(tmp_path: Path) -> None:
    port = _free_port()
    cfg = tmp_path / "featurerec.toml"
    cfg.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[sources.product_pg]
kind = "postgres_cdc"
options = {{ dsn = "host=127.0.0.1 port={port} user=x dbname=x", connect_timeout = 1 }}
[sources.web]
kind = "segment_http"
every_seconds = 60
options = {{ write_keys = ["k"] }}
"""
    )
    settings = Settings.model_validate({"data_dir": str(tmp_path / "data")})
    landing = TraitsLanding.for_settings(settings)
    t = datetime(2026, 3, 1, 9)
    landing.write(TraitsUpdate.from_traits([("usr_1", {"role": "admin", "team_size": 4}, t)]))
    landing.write(TraitsUpdate.from_traits([("usr_1", {"workspace_id": "ws_2"}, t)]))
    runner = CliRunner()
    res = runner.invoke(app, ["--config", str(cfg), "sources", "sync", "--once", "--json"])
    assert res.exit_code == 3, res.output
    outcomes = {o["name"]: o for o in orjson.loads(res.stdout)}
    assert not outcomes["product_pg"]["ok"]
    assert "PostgreSQL unreachable" in outcomes["product_pg"]["error"]
    assert outcomes["web"]["ok"] and outcomes["web"]["summary"]["traits_users"] == 2
    assert landing.pending() == []

    res = runner.invoke(app, ["--config", str(cfg), "sources", "status", "--json"])
    assert res.exit_code == 0
    status = {r["source"]: r for r in orjson.loads(res.stdout)}
    assert status["product_pg"]["consecutive_failures"] == 1
    assert status["product_pg"]["next_attempt_at"] is not None
    assert status["web"]["last_success"] is not None

    with DuckDBEngine(settings.warehouse_path, read_only=True) as db:
        user = db.query_rows("SELECT * FROM users")[0]
    # the two identify calls merged: role from the first, workspace from the second
    assert user["role"] == "admin" and user["workspace_id"] == "ws_2"
    assert orjson.loads(user["traits"]) == {"role": "admin", "team_size": 4, "workspace_id": "ws_2"}

    res = runner.invoke(app, ["--config", str(cfg), "sources", "status"])
    assert res.exit_code == 0 and "product" in res.stdout


def test_traits_merge_keeps_known_values(tmp_path: Path) -> None:
    settings = Settings.model_validate({"data_dir": str(tmp_path / "data")})
    from featurerec.events.sources.traits import apply_traits

    with DuckDBEngine(":memory:") as db:
        ing = Ingestor(db, settings)
        t = datetime(2026, 3, 1)
        apply_traits(
            ing, TraitsUpdate.from_traits([("u", {"role": "pm", "signup_date": "2026-01-02"}, t)])
        )
        apply_traits(ing, TraitsUpdate.from_traits([("u", {"plan": "business"}, t)]))
        row = db.query_rows("SELECT * FROM users")[0]
        assert row["role"] == "pm" and str(row["signup_date"]) == "2026-01-02"
        assert orjson.loads(row["traits"]) == {
            "role": "pm",
            "signup_date": "2026-01-02",
            "plan": "business",
        }


def test_sync_reports_a_down_kafka_broker_for_backoff(tmp_path: Path) -> None:
    port = _free_port()
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "sources": {
                "events": {
                    "kind": "kafka",
                    "options": {
                        "bootstrap_servers": f"127.0.0.1:{port}",
                        "batch_timeout_seconds": 0.2,
                        "max_seconds_per_sync": 1,
                        "config": {"log_level": "0"},
                    },
                }
            },
        }
    )
    with DuckDBEngine(":memory:") as db:
        out = Scheduler(settings).run_once(Ingestor(db, settings), db, force=True)
    assert not out[0].ok and "Kafka unreachable" in (out[0].error or "")
    assert SourceState.load(settings, "events", "kafka").consecutive_failures == 1


def test_ingest_kafka_alias_is_the_sources_command() -> None:
    res = CliRunner().invoke(app, ["ingest", "kafka", "--help"])
    assert res.exit_code == 0 and "--topic-pattern" in res.stdout
