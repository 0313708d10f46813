"""PostgreSQL CDC (logical replication, pgoutput) and the updated_at cursor mode, against a
REAL throwaway PostgreSQL cluster with wal_level=logical that this module starts and stops."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.ingest import Ingestor
from featurerec.events.sources.common import SourceState, SourceUnavailable
from featurerec.events.sources.pgoutput import decode_message, lsn_to_int, parse_array
from featurerec.events.sources.postgres_cdc import PostgresCDC
from featurerec.events.sources.postgres_common import PostgresOptions
from featurerec.events.sources.postgres_cursor import PostgresCursor
from featurerec.warehouse.engine import DuckDBEngine

pytestmark = pytest.mark.postgres


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(cands[-1]).parent if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[str]:
    """A throwaway cluster (initdb + pg_ctl, wal_level=logical) on a free loopback port."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    root = Path(tempfile.mkdtemp(prefix="featurerec-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres OS user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' OS user to run initdb as")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    subprocess.run([*as_user, *initdb, "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    opts = (
        f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} "
        "-c wal_level=logical -c max_replication_slots=8 -c max_wal_senders=8 -c fsync=off"
    )
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log")]
    subprocess.run([*as_user, *pg_ctl, "-w", "start"], check=True, capture_output=True)
    try:
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


_DDL = """
CREATE TABLE users (user_id text PRIMARY KEY, workspace_id text, role text,
    signup_date date, signup_cohort text, team_size int, updated_at timestamptz);
CREATE TABLE workspaces (workspace_id text PRIMARY KEY, name text, plan text, industry text,
    seat_count int, created_at timestamp, churned_at timestamp, updated_at timestamp);
CREATE TABLE feature_flags (flag_id text PRIMARY KEY, name text NOT NULL, enabled boolean NOT NULL,
    rollout_percentage numeric, target_segments jsonb, plans text[], updated_at timestamp);
CREATE TABLE ab_assignments (experiment text, user_id text, variant text NOT NULL,
    assigned_at timestamp, PRIMARY KEY (experiment, user_id));
"""


@pytest.fixture
def product_db(pg_cluster: str) -> Iterator[str]:
    """A fresh database with the four product tables, dropped (with its slot) afterwards."""
    name = f"product_{int(time.time() * 1e6) % 10**9}"
    with psycopg.connect(pg_cluster, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    dsn = pg_cluster.replace("dbname=postgres", f"dbname={name}")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(_DDL)
        c.execute(
            "INSERT INTO workspaces VALUES ('ws1','Acme','business','saas',12,'2026-01-01',NULL,"
            "'2026-01-01'), ('ws2','Beta','free','retail',3,'2026-01-02',NULL,'2026-01-02')"
        )
        c.execute(
            "INSERT INTO users VALUES ('u1','ws1','pm','2026-01-03','2026-Q1',12,"
            "'2026-01-03 10:00+02'), ('u2','ws2','engineer','2026-01-04','2026-Q1',3,"
            "'2026-01-04 10:00+00')"
        )
        c.execute(
            "INSERT INTO feature_flags VALUES ('f1','automations',true,80.5,"
            "'{\"roles\": [\"pm\"]}', '{business,enterprise}', '2026-01-01')"
        )
        c.execute("INSERT INTO ab_assignments VALUES ('exp1','u1','treatment','2026-01-05')")
    yield dsn
    with psycopg.connect(pg_cluster, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = %s",
            (name,),
        )
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


class FakeIngestor(Ingestor):
    """The real Ingestor, recording its upsert / delete calls so a test sees whether
    anything was applied."""

    def __init__(self, engine: DuckDBEngine, settings: Settings) -> None:
        super().__init__(engine, settings)
        self.calls: list[tuple[str, str, int]] = []

    def upsert_rows(self, table: str, rows: Any) -> int:
        self.calls.append(("upsert", table, rows.num_rows))
        return super().upsert_rows(table, rows)

    def delete_rows(self, table: str, keys: Any) -> int:
        self.calls.append(("delete", table, keys.num_rows))
        return super().delete_rows(table, keys)


@pytest.fixture
def warehouse(settings: Settings) -> Iterator[DuckDBEngine]:
    with DuckDBEngine(settings.warehouse_path) as engine:
        yield engine


def _cdc(settings: Settings, dsn: str, engine: DuckDBEngine, **opts: Any) -> PostgresCDC:
    options = PostgresOptions.model_validate({"dsn": dsn, **opts})
    return PostgresCDC("product_pg", options, settings, FakeIngestor(engine, settings), engine)


def _exec(dsn: str, *stmts: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for s in stmts:
            c.execute(s)


def _rows(engine: DuckDBEngine, sql: str) -> list[dict[str, Any]]:
    return engine.query_rows(sql)


def test_snapshot_then_stream_insert_update_delete(
    settings: Settings, product_db: str, warehouse: DuckDBEngine
) -> None:
    cdc = _cdc(settings, product_db, warehouse)
    first = cdc.sync_once()
    assert first.snapshot and first.not_published == []
    assert first.upserts == {"users": 2, "workspaces": 2, "feature_flags": 1, "ab_assignments": 1}
    users = _rows(warehouse, "SELECT * FROM users ORDER BY user_id")
    assert [u["user_id"] for u in users] == ["u1", "u2"]
    # timestamptz to UTC naive; unknown column team_size kept in traits
    assert users[0]["updated_at"] == datetime(2026, 1, 3, 8, 0)
    assert '"team_size":12' in users[0]["traits"]
    flag = _rows(warehouse, "SELECT * FROM feature_flags")[0]
    assert flag["rollout_percentage"] == 80.5 and flag["enabled"] is True
    assert flag["plans"] == '["business","enterprise"]'

    _exec(
        product_db,
        "INSERT INTO users VALUES ('u3','ws1','designer','2026-02-01','2026-Q1',12,now())",
        "UPDATE users SET role = 'admin' WHERE user_id = 'u1'",
        "DELETE FROM users WHERE user_id = 'u2'",
        "UPDATE ab_assignments SET variant = 'control' WHERE user_id = 'u1'",
        "DELETE FROM workspaces WHERE workspace_id = 'ws2'",
    )
    second = cdc.sync_once()
    assert not second.snapshot
    assert second.transactions == 5
    roles = {r["user_id"]: r["role"] for r in _rows(warehouse, "SELECT * FROM users")}
    assert roles == {"u1": "admin", "u3": "designer"}
    assert _rows(warehouse, "SELECT variant FROM ab_assignments") == [{"variant": "control"}]
    assert [r["workspace_id"] for r in _rows(warehouse, "SELECT * FROM workspaces")] == ["ws1"]
    assert second.lag_bytes is not None and second.lag_bytes >= 0

    # nothing new: nothing applied
    third = cdc.sync_once()
    assert third.transactions == 0 and third.upserts == {} and third.deletes == {}


def test_snapshot_is_consistent_with_slot_start(
    settings: Settings, product_db: str, warehouse: DuckDBEngine
) -> None:
    """A row changed while the snapshot runs is seen exactly once, in its final state."""
    cdc = _cdc(settings, product_db, warehouse)
    original = cdc._copy_table

    def copy_and_write(conn: Any, schema: str, table: str, conv: Any, report: Any) -> None:
        if table == "users":  # a concurrent writer commits after the snapshot was exported
            _exec(product_db, "UPDATE users SET role = 'cto' WHERE user_id = 'u2'")
        original(conn, schema, table, conv, report)

    cdc._copy_table = copy_and_write  # type: ignore[method-assign]
    report = cdc.sync_once()
    assert report.snapshot and report.transactions == 1  # the concurrent update streamed
    role = warehouse.query_rows("SELECT role FROM users WHERE user_id = 'u2'")[0]["role"]
    assert role == "cto"


def test_restart_resumes_from_stored_lsn_nothing_lost_nothing_twice(
    settings: Settings, product_db: str, warehouse: DuckDBEngine
) -> None:
    cdc = _cdc(settings, product_db, warehouse)
    cdc.sync_once()
    _exec(product_db, "UPDATE users SET role = 'lead' WHERE user_id = 'u1'")

    # Crash after the warehouse commit and state write, before the slot advance.
    def crash(*_: Any) -> None:
        raise RuntimeError("killed before slot advance")

    real_execute = psycopg.Connection.execute

    def execute(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        if isinstance(query, str) and "pg_replication_slot_advance" in query:
            crash()
        return real_execute(self, query, params, **kw)

    with (
        pytest.MonkeyPatch.context() as mp,
        pytest.raises(RuntimeError, match="killed before slot advance"),
    ):
        mp.setattr(psycopg.Connection, "execute", execute)
        cdc.sync_once()
    state = SourceState.load(settings, "product_pg", "postgres_cdc")
    with psycopg.connect(product_db) as c:
        slot_lsn = c.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
        ).fetchone()
    assert slot_lsn is not None and lsn_to_int(slot_lsn[0]) < lsn_to_int(state.position["lsn"])

    # A new process: the slot still holds the update, the stored LSN says it is applied.
    restarted = _cdc(settings, product_db, warehouse)
    writer = restarted.writer
    assert isinstance(writer, FakeIngestor)
    report = restarted.sync_once()
    assert report.skipped_transactions == 1 and report.transactions == 0
    assert writer.calls == []  # nothing applied twice
    # and changes made while it was down still arrive
    _exec(product_db, "INSERT INTO ab_assignments VALUES ('exp1','u3','control','2026-03-01')")
    report = restarted.sync_once()
    assert report.transactions == 1 and report.upserts == {"ab_assignments": 1}
    assert warehouse.query_rows("SELECT count(*) AS n FROM ab_assignments")[0]["n"] == 2


def test_key_change_truncate_and_bad_rows_quarantined(
    settings: Settings, product_db: str, warehouse: DuckDBEngine
) -> None:
    cdc = _cdc(settings, product_db, warehouse)
    cdc.sync_once()
    _exec(
        product_db,
        "UPDATE users SET user_id = 'u1b' WHERE user_id = 'u1'",
        # a value that cannot be a warehouse INTEGER seat_count
        "ALTER TABLE workspaces ALTER COLUMN seat_count TYPE text",
        "UPDATE workspaces SET seat_count = 'lots' WHERE workspace_id = 'ws1'",
        "UPDATE workspaces SET plan = 'enterprise' WHERE workspace_id = 'ws2'",
        "TRUNCATE ab_assignments",
    )
    report = cdc.sync_once()
    users = sorted(r["user_id"] for r in warehouse.query_rows("SELECT user_id FROM users"))
    assert users == ["u1b", "u2"]
    assert report.quarantined == 1
    q = warehouse.query_rows("SELECT * FROM ingest_quarantine")
    assert len(q) == 1 and "seat_count" in q[0]["reason"] and "lots" in q[0]["raw"]
    assert q[0]["location"].startswith("public.workspaces xid")
    plans = {r["workspace_id"]: r["plan"] for r in warehouse.query_rows("SELECT * FROM workspaces")}
    assert plans["ws2"] == "enterprise" and plans["ws1"] == "business"  # bad update not applied
    assert report.truncates == ["ab_assignments"]
    assert warehouse.query_rows("SELECT count(*) AS n FROM ab_assignments")[0]["n"] == 0


def test_unreachable_database_is_source_unavailable(settings: Settings, tmp_path: Path) -> None:
    port = _free_port()
    options = PostgresOptions(dsn=f"host=127.0.0.1 port={port} user=x dbname=x password=secret")
    with DuckDBEngine(":memory:") as engine:
        cdc = PostgresCDC("down", options, settings, FakeIngestor(engine, settings), engine)
        with pytest.raises(SourceUnavailable, match=r"PostgreSQL unreachable .*password=\*\*\*"):
            cdc.sync_once()


def test_options_errors_name_the_field() -> None:
    from featurerec.config import SourceConfig

    src = SourceConfig(kind="postgres_cdc", options={"dsn": "x", "slot": "Bad-Slot"})
    with pytest.raises(DataError, match=r"sources\.pg\.options\.slot"):
        PostgresOptions.from_source("pg", src)


def test_cursor_mode_incremental_no_deletes(
    settings: Settings, product_db: str, warehouse: DuckDBEngine
) -> None:
    options = PostgresOptions.model_validate({"dsn": product_db, "batch_rows": 1})
    cur = PostgresCursor(
        "product_cursor", options, settings, FakeIngestor(warehouse, settings), warehouse
    )
    first = cur.sync_once()
    assert first.upserts == {"users": 2, "workspaces": 2, "feature_flags": 1, "ab_assignments": 1}
    _exec(
        product_db,
        "UPDATE users SET role = 'vp', updated_at = '2026-05-01' WHERE user_id = 'u2'",
        "DELETE FROM users WHERE user_id = 'u1'",
    )
    second = cur.sync_once()
    assert second.upserts == {"users": 1}
    roles = {r["user_id"]: r["role"] for r in warehouse.query_rows("SELECT * FROM users")}
    assert roles == {"u1": "pm", "u2": "vp"}  # the delete is invisible to cursor mode
    assert cur.sync_once().upserts == {}
    # the cursor is persisted: a new instance starts where the last stopped
    again = PostgresCursor(
        "product_cursor", options, settings, FakeIngestor(warehouse, settings), warehouse
    )
    assert again.sync_once().upserts == {}


def test_pgoutput_decoder_details() -> None:
    assert parse_array('{a,"b c",NULL,"x\\"y"}') == ["a", "b c", None, 'x"y']
    with pytest.raises(DataError, match="ends early"):
        decode_message(b"B\x00\x00")
    with contextlib.suppress(DataError):
        decode_message(b"Izzzz")


def test_cli_sync_once_runs_cdc_from_config(tmp_path: Path, product_db: str) -> None:
    from typer.testing import CliRunner

    from featurerec.cli import app

    cfg = tmp_path / "featurerec.toml"
    cfg.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        "[sources.product_pg]\n"
        'kind = "postgres_cdc"\n'
        f'options = {{ dsn = "{product_db}", slot = "cli_slot", publication = "cli_pub" }}\n'
    )
    runner = CliRunner()
    res = runner.invoke(app, ["--config", str(cfg), "sources", "sync", "--once", "--json"])
    assert res.exit_code == 0, res.output
    out = orjson.loads(res.stdout)[0]
    assert out["ok"] and out["summary"]["snapshot"] is True
    assert out["summary"]["upserts"]["users"] == 2
    _exec(product_db, "DELETE FROM users WHERE user_id = 'u1'")
    res = runner.invoke(app, ["--config", str(cfg), "sources", "sync", "--once", "--json"])
    assert orjson.loads(res.stdout)[0]["summary"]["deletes"] == {"users": 1}
    res = runner.invoke(app, ["--config", str(cfg), "sources", "status", "--json"])
    row = orjson.loads(res.stdout)[0]
    assert (
        row["position"]["lsn"] and row["counts"]["upserts"] == 6 and row["counts"]["deletes"] == 1
    )


def test_unchanged_toast_values_are_kept(
    settings: Settings, product_db: str, warehouse: DuckDBEngine
) -> None:
    """An update that leaves a large (TOASTed) value alone does not send it; the value kept in
    the warehouse (a column, or a key of the traits JSON) must survive."""
    big = "".join(f"{i:x}" for i in range(4000))  # ~14 KB, stored out of line
    _exec(
        product_db,
        "ALTER TABLE users ALTER COLUMN role SET STORAGE EXTERNAL",
        "ALTER TABLE users ADD COLUMN bio text",
        "ALTER TABLE users ALTER COLUMN bio SET STORAGE EXTERNAL",
        f"UPDATE users SET bio = '{big}', role = 'r{big}' WHERE user_id = 'u1'",
    )
    cdc = _cdc(settings, product_db, warehouse)
    cdc.sync_once()
    _exec(product_db, "UPDATE users SET signup_cohort = '2026-Q2' WHERE user_id = 'u1'")
    # two updates of the same row in one batch, the second also leaving the big values alone
    _exec(product_db, "UPDATE users SET team_size = 99 WHERE user_id = 'u1'")
    import featurerec.events.sources.postgres_cdc as mod
    from featurerec.events.sources.pgoutput import UNCHANGED, Update

    seen: list[int] = []
    real = mod.decode_message

    def spy(data: Any) -> Any:
        msg = real(data)
        if isinstance(msg, Update):
            seen.append(sum(v is UNCHANGED for v in msg.new))
        return msg

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "decode_message", spy)
        report = cdc.sync_once()
    assert seen == [2, 2]  # role and bio were not sent: the path under test ran
    assert report.transactions == 2
    row = warehouse.query_rows("SELECT * FROM users WHERE user_id = 'u1'")[0]
    assert row["signup_cohort"] == "2026-Q2"
    assert row["role"] == f"r{big}"  # unchanged TOAST column, filled from the warehouse
    traits = orjson.loads(row["traits"])
    assert traits["bio"] == big and traits["team_size"] == 99  # traits merged by key


def test_existing_publication_missing_tables_is_reported(
    settings: Settings, product_db: str, warehouse: DuckDBEngine
) -> None:
    _exec(product_db, "CREATE PUBLICATION only_users FOR TABLE users")
    report = _cdc(settings, product_db, warehouse, publication="only_users").sync_once()
    assert report.not_published == [
        "public.workspaces",
        "public.feature_flags",
        "public.ab_assignments",
    ]
