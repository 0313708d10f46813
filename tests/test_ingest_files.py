"""Ingestor: files, worlds, idempotency, quarantine, crash safety, product tables."""

from __future__ import annotations

import gzip
import json
from datetime import date, datetime
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.ingest import Ingestor
from featurerec.events.validate import normalize_records
from featurerec.warehouse.engine import DuckDBEngine, WarehouseError


def ev(i: int, **over: object) -> dict:
    e: dict = {
        "event_id": f"evt_{i}",
        "user_id": f"usr_{i % 3}",
        "workspace_id": "ws_1",
        "event_type": "feature_used",
        "properties": {"feature_category": "automations", "session_sequence": i},
        "user_traits": {"role": "pm"},
        "timestamp": f"2026-02-{1 + i % 27:02d}T10:00:00Z",
    }
    e.update(over)
    return e


def write_ndjson(path: Path, records: list, gz: bool = False) -> Path:
    lines = [r if isinstance(r, str) else orjson.dumps(r).decode() for r in records]
    data = ("\n".join(lines) + "\n").encode()
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def db():
    with DuckDBEngine(":memory:") as engine:
        yield engine


@pytest.fixture
def ing(db, settings) -> Ingestor:
    return Ingestor(db, settings)


def count(db, table: str = "events") -> int:
    return int(db.scalar(f"SELECT count(*) FROM {table}"))


def test_same_file_twice_adds_zero_rows(tmp_path, ing, db):
    f = write_ndjson(tmp_path / "a.ndjson", [ev(i) for i in range(50)] + ["{broken"])
    first = ing.ingest_paths([f])
    assert (first.accepted, first.quarantined, first.duplicate) == (50, 1, 0)
    before = (count(db), count(db, "ingest_quarantine"))
    again = ing.ingest_paths([f])
    assert again.accepted == 0 and again.duplicate == 50
    assert (count(db), count(db, "ingest_quarantine")) == before == (50, 1)
    assert count(db, "ingest_batches") == 2


def test_bad_lines_are_quarantined_with_file_line_and_the_rest_loads(tmp_path, ing, db):
    records = [ev(1), ev(2), "", "{not json", ev(3, timestamp="soon"), ev(4)]
    f = write_ndjson(tmp_path / "events.ndjson", records)
    rep = ing.ingest_paths([f])
    assert rep.accepted == 3 and rep.quarantined == 2
    rows = db.query_rows("SELECT location, reason, raw FROM ingest_quarantine ORDER BY location")
    assert [r["location"] for r in rows] == [f"{f}:4", f"{f}:5"]
    assert rows[0]["reason"].startswith("invalid JSON") and rows[0]["raw"] == "{not json"
    assert "timestamp: not an ISO-8601 timestamp (got 'soon')" in rows[1]["reason"]
    assert sorted(r["event_id"] for r in db.query_rows("SELECT event_id FROM events")) == [
        "evt_1",
        "evt_2",
        "evt_4",
    ]
    assert rep.files[0].quarantined == 2 and rep.files[0].received == 5


def test_gzip_and_directories_and_blocks(tmp_path, ing, db, monkeypatch):
    import featurerec.events.ingest as mod

    monkeypatch.setattr(mod, "NDJSON_BLOCK_BYTES", 300)  # many blocks, lines cut across reads
    d = tmp_path / "in"
    d.mkdir()
    write_ndjson(d / "a.ndjson.gz", [ev(i) for i in range(20)] + ["{bad"], gz=True)
    write_ndjson(d / "b.jsonl", [ev(i) for i in range(15, 40)])
    (d / "notes.txt").write_text("ignored")
    rep = ing.ingest_paths([d])
    assert rep.accepted == 40 and rep.duplicate == 5 and rep.quarantined == 1
    assert db.scalar("SELECT location FROM ingest_quarantine").endswith("a.ndjson.gz:21")
    assert rep.batches > 2


def test_include_exclude_filter_is_applied(tmp_path, ing, db):
    f = write_ndjson(
        tmp_path / "a.ndjson",
        [
            ev(1),
            ev(2, event_type="heartbeat"),
            ev(3, event_type="session_keepalive"),
            ev(4, event_type="x_other"),
        ],
    )
    rep = ing.ingest_paths([f])
    assert rep.accepted == 1 and rep.filtered == 3
    assert db.query_rows("SELECT DISTINCT event_type FROM events") == [
        {"event_type": "feature_used"}
    ]


def test_csv_with_mapping(tmp_path, settings, db):
    f = tmp_path / "export.csv"
    f.write_text(
        "id,uid,kind,ts,feature_category,session_sequence\n"
        "a1,u1,feature_used,2026-02-01T10:00:00Z,forms,1\n"
        "a2,u2,feature_used,2026-02-01 11:00:00,kanban_boards,x\n"
        "a3,u1,page_viewed,2026-02-02T10:00:00+01:00,,\n"
    )
    ing = Ingestor(db, settings)
    mapping = {"event_id": "id", "user_id": "uid", "event_type": "kind", "timestamp": "ts"}
    rep = ing.ingest_paths([f], mapping)
    assert rep.accepted == 2 and rep.quarantined == 1
    q = db.query_rows("SELECT location, reason FROM ingest_quarantine")[0]
    assert q["location"] == f"{f}:row 2"
    assert "session_sequence: cannot read 'x' as an integer" in q["reason"]
    rows = db.query_rows("SELECT event_id, timestamp, feature_category FROM events ORDER BY 1")
    assert rows[1] == {
        "event_id": "a3",
        "timestamp": datetime(2026, 2, 2, 9, 0),
        "feature_category": None,
    }
    # The same mapping from config: settings.ingest.column_map.
    cfg = settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"column_map": mapping})}
    )
    assert Ingestor(db, cfg).ingest_paths([f]).duplicate == 2


def test_parquet_flat_and_nested(tmp_path, ing, db, settings):
    flat = normalize_records([ev(i) for i in range(10)], settings=settings, source="x").events
    pq.write_table(flat, tmp_path / "flat.parquet")
    pq.write_table(
        pa.Table.from_pylist([ev(i) for i in range(10, 15)]), tmp_path / "nested.parquet"
    )
    rep = ing.ingest_paths([tmp_path / "flat.parquet", tmp_path / "nested.parquet"])
    assert rep.accepted == 15
    assert db.scalar("SELECT count(*) FROM events WHERE session_sequence IS NOT NULL") == 15


def test_clear_errors_for_bad_paths(tmp_path, ing):
    with pytest.raises(DataError, match=r"path not found: .*missing.ndjson"):
        ing.ingest_paths([tmp_path / "missing.ndjson"])
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(DataError, match=r"x.xlsx: unknown file format; expected one of .ndjson"):
        ing.ingest_paths([tmp_path / "x.xlsx"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no NDJSON, Parquet or CSV files found"):
        ing.ingest_paths([tmp_path / "empty"])
    with pytest.raises(DataError, match="no input paths"):
        ing.ingest_paths([])


def test_crash_inside_append_leaves_no_half_batch(tmp_path, ing, db, settings, monkeypatch):
    ing.append(normalize_records([ev(1)], settings=settings, source="x"))
    batch = normalize_records([ev(2), ev(3), "{bad"], settings=settings, source="x")

    def boom(*a, **k):
        raise RuntimeError("power cut")

    monkeypatch.setattr(Ingestor, "_record_batch", boom)  # runs after events + quarantine
    with pytest.raises(RuntimeError, match="power cut"):
        ing.append(batch)
    assert count(db) == 1 and count(db, "ingest_quarantine") == 0
    assert count(db, "ingest_batches") == 1
    monkeypatch.undo()
    assert ing.append(batch).accepted == 2  # nothing was half-written, so all of it loads now
    assert count(db) == 3


def test_read_only_engine_is_refused(tmp_path, settings):
    path = tmp_path / "w.duckdb"
    DuckDBEngine(path).close()
    with (
        DuckDBEngine(path, read_only=True) as ro,
        pytest.raises(WarehouseError, match="read-write"),
    ):
        Ingestor(ro, settings)


def test_upsert_and_delete_product_rows(ing, db):
    rows = pa.table(
        {
            "user_id": ["u1", "u2", "u1"],
            "role": ["pm", "dev", "admin"],
            "signup_date": [date(2026, 1, 1)] * 3,
            "updated_at": pa.array(
                [datetime(2026, 1, 1, 12)] * 3, pa.timestamp("us", tz="Europe/Berlin")
            ),
        }
    )
    assert ing.upsert_rows("users", rows) == 2
    got = {r["user_id"]: r for r in db.query_rows("SELECT * FROM users")}
    assert got["u1"]["role"] == "admin"  # last row of a key wins
    assert got["u1"]["updated_at"] == datetime(2026, 1, 1, 12)  # UTC naive
    assert ing.upsert_rows("users", pa.table({"user_id": ["u2"], "role": ["lead"]})) == 1
    assert db.scalar("SELECT role FROM users WHERE user_id = 'u2'") == "lead"
    assert ing.delete_rows("users", pa.table({"user_id": ["u1", "zz"]})) == 1
    assert count(db, "users") == 1
    two_keys = pa.table({"experiment": ["e", "e"], "user_id": ["a", "b"], "variant": ["c", "t"]})
    assert ing.upsert_rows("ab_assignments", two_keys) == 2
    assert ing.delete_rows("ab_assignments", pa.table({"experiment": ["e"], "user_id": ["b"]})) == 1
    with pytest.raises(DataError, match=r"users: unknown column\(s\) nope"):
        ing.upsert_rows("users", pa.table({"user_id": ["x"], "nope": [1]}))
    with pytest.raises(DataError, match=r"unknown product table 'events'"):
        ing.upsert_rows("events", pa.table({"event_id": ["x"]}))
    with pytest.raises(DataError, match=r"lack key column\(s\) flag_id"):
        ing.upsert_rows("feature_flags", pa.table({"name": ["x"]}))


def make_world(root: Path, settings: Settings, fmt: str = "parquet") -> Path:
    """A tiny directory in the layout `featurerec simulate` writes."""
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"users": 2}))
    (root / "events").mkdir()
    (root / "ground_truth").mkdir()
    (root / "ground_truth" / "secret.parquet").write_text("never read")
    events = [ev(i, user_id=f"u{i % 2}") for i in range(12)] + [ev(99, event_type="heartbeat")]
    if fmt == "parquet":
        table = normalize_records(
            events,
            settings=Settings.model_validate(
                {"ingest": {"include_types": [], "exclude_types": []}}
            ),
            source="sim",
        ).events
        pq.write_table(table.slice(0, 7), root / "events" / "part-00000.parquet")
        pq.write_table(table.slice(7), root / "events" / "part-00001.parquet")
    else:
        write_ndjson(root / "events" / "part-00000.ndjson", events)
    pq.write_table(
        pa.table({"user_id": ["u0", "u1"], "workspace_id": ["w", "w"], "role": ["pm", "dev"]}),
        root / "users.parquet",
    )
    pq.write_table(
        pa.table({"workspace_id": ["w"], "plan": ["pro"], "seat_count": pa.array([3], pa.int32())}),
        root / "workspaces.parquet",
    )
    pacsv.write_csv(
        pa.table({"flag_id": ["f1"], "name": ["automations"], "enabled": [True]}),
        root / "feature_flags.csv",
    )
    return root


@pytest.mark.parametrize("fmt", ["parquet", "ndjson"])
def test_world_directory_loads_in_one_go_and_reloads_idempotently(tmp_path, ing, db, settings, fmt):
    world = make_world(tmp_path / "world", settings, fmt)
    rep = ing.ingest_paths([world])
    assert rep.accepted == 12 and rep.filtered == 1
    assert rep.tables == {"workspaces": 1, "users": 2, "feature_flags": 1}
    assert count(db, "users") == 2 and count(db, "feature_flags") == 1
    again = ing.ingest_world(world)
    assert again.accepted == 0 and again.duplicate == 12
    assert count(db) == 12 and count(db, "users") == 2
    assert not any("ground_truth" in f.path for f in rep.files)


@pytest.mark.parametrize("gz", [False, True])
def test_lines_longer_than_a_block_and_no_final_newline(tmp_path, ing, db, monkeypatch, gz):
    import featurerec.events.ingest as mod

    monkeypatch.setattr(mod, "NDJSON_BLOCK_BYTES", 64)
    big = ev(1, properties={"feature_category": "forms", "note": "x" * 500})
    lines = [orjson.dumps(r).decode() for r in (ev(0), big, ev(2))]
    data = ("\r\n".join(lines)).encode()  # CRLF line ends, no newline at the end
    f = tmp_path / ("a.ndjson.gz" if gz else "a.ndjson")
    f.write_bytes(gzip.compress(data) if gz else data)
    rep = ing.ingest_paths([f])
    assert rep.accepted == 3 and rep.quarantined == 0
    note = db.query_rows("SELECT properties FROM events WHERE event_id = 'evt_1'")[0]["properties"]
    assert orjson.loads(note) == {"note": "x" * 500}


def test_invalid_utf8_line_is_quarantined_and_the_rest_loads(tmp_path, ing, db):
    good = [orjson.dumps(ev(i)) for i in range(3)]
    f = tmp_path / "mixed.ndjson"
    f.write_bytes(b"\n".join([good[0], b'{"event_id": "\xff\xfe"}', good[1], good[2]]) + b"\n")
    rep = ing.ingest_paths([f])
    assert (rep.accepted, rep.quarantined, rep.received) == (3, 1, 4)
    q = db.query_rows("SELECT location, reason, raw FROM ingest_quarantine")[0]
    assert q["location"] == f"{f}:2" and q["reason"] == "not valid UTF-8"
    assert "\ufffd" in q["raw"]


def test_errors_in_validation_workers_reach_the_caller(tmp_path, ing, db):
    f = tmp_path / "x.csv"
    f.write_text("id,user_id,event_type,timestamp\na,u,feature_used,2026-02-01T00:00:00Z\n")
    with pytest.raises(
        DataError, match=r"mapped column\(s\) not found: event_id \(column 'nope'\)"
    ):
        ing.ingest_paths([f], {"event_id": "nope"})
    assert count(db) == 0


def test_dedupe_window_follows_the_batch_time_range(db, settings):
    ing = Ingestor(db, settings)
    ing.append(
        normalize_records([ev(1, timestamp="2026-02-10T10:00:00Z")], settings=settings, source="x")
    )
    retry = ev(1, timestamp="2026-02-10T10:00:03Z")  # same event, clock-corrected timestamp
    assert ing.append(normalize_records([retry], settings=settings, source="x")).duplicate == 1
    far = ev(1, timestamp="2026-02-20T10:00:00Z")  # id reused 10 days later: outside 24 h
    assert ing.append(normalize_records([far], settings=settings, source="x")).accepted == 1
    whole = settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"dedupe_margin_hours": None})}
    )
    again = ev(1, timestamp="2026-01-01T00:00:00Z")
    assert (
        Ingestor(db, whole).append(normalize_records([again], settings=whole, source="x")).duplicate
        == 1
    )
