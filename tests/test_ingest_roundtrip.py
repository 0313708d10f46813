"""Property: any valid event round-trips through validation and the warehouse unchanged."""

from __future__ import annotations

from datetime import datetime

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from featurerec.config import Settings
from featurerec.events.ingest import Ingestor
from featurerec.events.schema import EVENT_COLUMNS, to_spec_dict
from featurerec.events.validate import normalize_records
from featurerec.warehouse.engine import DuckDBEngine

SETTINGS = Settings.model_validate({"ingest": {"include_types": [], "exclude_types": []}})

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
ident = text.filter(lambda s: s.strip(" ") != "")
json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | text
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
)
json_value = st.recursive(
    json_scalar,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
    max_leaves=6,
)
promoted = st.fixed_dictionaries(
    {},
    optional={
        "feature_category": text,
        "feature_name": text,
        "context": text,
        "session_id": text,
        "session_sequence": st.integers(-(2**31), 2**31 - 1),
        "time_on_page_seconds": st.floats(allow_nan=False, allow_infinity=False, width=64),
        "is_first_use": st.booleans(),
    },
)
extra_props = st.dictionaries(
    text.filter(
        lambda k: (
            k
            not in {
                "feature_category",
                "feature_name",
                "context",
                "session_id",
                "session_sequence",
                "time_on_page_seconds",
                "is_first_use",
            }
        )
    ),
    json_value,
    max_size=3,
)
timestamps = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2026, 1, 1))


def spec_time(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if ts.microsecond else "%Y-%m-%dT%H:%M:%SZ")


@st.composite
def events(draw):
    out = {
        "event_id": draw(ident),
        "user_id": draw(ident),
        "workspace_id": draw(st.none() | text),
        "event_type": draw(ident),
        "properties": {**draw(extra_props), **draw(promoted)},
        "timestamp": spec_time(draw(timestamps)),
    }
    traits = draw(st.none() | st.dictionaries(text, json_value, max_size=4))
    if traits is not None:
        out["user_traits"] = traits
    return out


_DB: list[DuckDBEngine] = []


def _db() -> DuckDBEngine:
    """One in-memory warehouse for all examples (emptied per example): creating the schema
    per example would dominate the test's time."""
    if not _DB:
        _DB.append(DuckDBEngine(":memory:"))
    db = _DB[0]
    db.execute("DELETE FROM events")
    db.execute("DELETE FROM ingest_batches")
    return db


@hsettings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), min_size=1, max_size=5, unique_by=lambda e: e["event_id"]))
def test_valid_events_round_trip_unchanged(batch_events):
    batch = normalize_records(batch_events, settings=SETTINGS, source="prop")
    assert batch.quarantine.to_pylist() == []
    db = _db()
    rep = Ingestor(db, SETTINGS).append(batch)
    assert rep.accepted == len(batch_events)
    cols = ", ".join(f'"{c}"' for c in EVENT_COLUMNS)
    stored = {r["event_id"]: to_spec_dict(r) for r in db.query_rows(f"SELECT {cols} FROM events")}
    for e in batch_events:
        assert stored[e["event_id"]] == e
