"""Landing zone: durable writes (fsync + atomic rename) and idempotent drains."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurerec.events.ingest import Ingestor
from featurerec.events.landing import Landing
from featurerec.events.validate import normalize_records
from featurerec.warehouse.engine import DuckDBEngine


def ev(i: int, **over: object) -> dict:
    e = {
        "event_id": f"evt_{i}",
        "user_id": "u1",
        "event_type": "feature_used",
        "properties": {"feature_category": "forms"},
        "timestamp": "2026-02-20T10:00:00Z",
    }
    e.update(over)
    return e


@pytest.fixture
def db():
    with DuckDBEngine(":memory:") as engine:
        yield engine


def rows(db, table: str = "events") -> int:
    return int(db.query_rows(f"SELECT count(*) AS n FROM {table}")[0]["n"])


def test_write_is_complete_on_disk_before_the_receipt(tmp_path, settings):
    landing = Landing(tmp_path / "landing")
    batch = normalize_records([ev(1), ev(2), "{bad"], settings=settings, source="segment_http")
    receipt = landing.write(batch)
    assert receipt.rows == 2 and receipt.quarantined == 1
    files = landing.pending()
    assert [str(p) for p in files] == [receipt.path]
    assert not list(landing.pending_dir.glob(".tmp-*"))
    meta, table = Landing.read(files[0])  # a complete, readable Parquet file
    assert table.num_rows == 2 and meta["source"] == "segment_http"
    assert meta["quarantine"][0]["reason"].startswith("invalid JSON")


def test_failed_write_leaves_nothing_pending(tmp_path, settings, monkeypatch):
    landing = Landing(tmp_path / "landing")
    batch = normalize_records([ev(1)], settings=settings, source="s")

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        landing.write(batch)
    assert landing.pending() == []
    assert list(landing.pending_dir.iterdir()) == []


def test_drain_loads_once_and_a_crash_before_mark_done_does_not_duplicate(tmp_path, settings, db):
    landing = Landing(tmp_path / "landing")
    landing.write(normalize_records([ev(1), ev(2), "{bad"], settings=settings, source="http"))
    landing.write(normalize_records([ev(2), ev(3)], settings=settings, source="http"))
    ing = Ingestor(db, settings)
    rep = landing.drain(ing)
    assert rep.accepted == 3 and rep.duplicate == 1 and rep.quarantined == 1
    assert landing.pending() == [] and len(list(landing.done_dir.iterdir())) == 2
    assert (rows(db), rows(db, "ingest_quarantine")) == (3, 1)

    # Crash between commit and move: the loaded files are still pending on restart.
    for f in landing.done_dir.iterdir():
        shutil.copy(f, landing.pending_dir / f.name)
    again = landing.drain(ing)
    assert again.accepted == 0 and again.batches == 0
    assert all(f.skipped_batches == 1 for f in again.files)
    assert (rows(db), rows(db, "ingest_quarantine")) == (3, 1)
    assert landing.pending() == []


def test_drain_with_lost_batch_record_still_dedupes_events(tmp_path, settings, db):
    """Even without the ingest_batches row, event_id dedupe keeps a re-load at zero rows."""
    landing = Landing(tmp_path / "landing")
    landing.write(normalize_records([ev(1), ev(2)], settings=settings, source="k"))
    ing = Ingestor(db, settings)
    landing.drain(ing)
    db.execute("DELETE FROM ingest_batches")
    for f in landing.done_dir.iterdir():
        shutil.copy(f, landing.pending_dir / f.name)
    assert landing.drain(ing).accepted == 0
    assert rows(db) == 2


def test_rows_land_and_upsert_on_drain(tmp_path, settings, db):
    landing = Landing(tmp_path / "landing")
    landing.write_rows("users", pa.table({"user_id": ["u1"], "role": ["pm"]}), source="identify")
    landing.write_rows("users", pa.table({"user_id": ["u1"], "role": ["admin"]}), source="identify")
    rep = landing.drain(Ingestor(db, settings))
    assert rep.tables == {"users": 2}
    assert db.query_rows("SELECT role FROM users") == [{"role": "admin"}]  # oldest first


def test_landing_for_settings_lives_in_the_data_dir(settings):
    assert Landing.for_settings(settings).root == settings.data_path / "landing"
