"""Validation rules (featurerec.events.validate): reasons, filter, dedupe, shapes, mapping."""

from __future__ import annotations

from datetime import datetime

import orjson
import pyarrow as pa
import pytest

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.schema import EVENT_ARROW_SCHEMA
from featurerec.events.validate import (
    normalize_lines,
    normalize_records,
    normalize_table,
)

NOW = datetime(2026, 3, 1, 12, 0, 0)


def ev(i: int = 1, **over: object) -> dict:
    e: dict = {
        "event_id": f"evt_{i}",
        "user_id": "usr_1",
        "workspace_id": "ws_1",
        "event_type": "feature_used",
        "properties": {
            "feature_category": "automations",
            "feature_name": "create_automation_rule",
            "context": "project_settings",
            "session_id": "sess_abc123",
            "session_sequence": 14,
            "time_on_page_seconds": 45,
            "is_first_use": True,
        },
        "user_traits": {"role": "project_manager", "team_size": 12, "plan": "business"},
        "timestamp": "2026-02-28T14:23:17Z",
    }
    e.update(over)
    return e


def norm(records, settings: Settings | None = None, **kw):
    return normalize_records(records, settings=settings or Settings(), source="t", now=NOW, **kw)


def test_spec_event_is_flattened_into_promoted_columns():
    batch = norm([ev(properties={**ev()["properties"], "extra": {"a": [1, None]}})])
    assert batch.accepted == 1 and batch.quarantined == 0
    assert batch.events.schema == EVENT_ARROW_SCHEMA
    row = batch.events.to_pylist()[0]
    assert row["feature_category"] == "automations"
    assert row["session_sequence"] == 14
    assert row["time_on_page_seconds"] == 45.0
    assert row["is_first_use"] is True
    assert row["timestamp"] == datetime(2026, 2, 28, 14, 23, 17)
    assert orjson.loads(row["properties"]) == {"extra": {"a": [1, None]}}
    assert orjson.loads(row["user_traits"])["team_size"] == 12


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {"user_id": "u", "event_type": "feature_used"},
            r"missing required field\(s\): event_id, timestamp",
        ),
        (ev(event_id=""), r"event_id: must not be empty"),
        (ev(user_id="  "), r"user_id: must not be empty"),
        (ev(event_id={"a": 1}), r"event_id: expected a string, got an object"),
        (ev(event_type=["x"]), r"event_type: expected a string, got an array"),
        (ev(timestamp="yesterday"), r"timestamp: not an ISO-8601 timestamp \(got 'yesterday'\)"),
        (ev(timestamp="infinity"), r"timestamp: not an ISO-8601"),
        (ev(timestamp=1772000000), r"timestamp: not an ISO-8601 timestamp \(got '1772000000'\)"),
        (
            ev(timestamp="2026-03-01T12:10:00Z"),
            r"more than 300 s after the ingestion time 2026-03-01T12:00:00Z",
        ),
        (
            ev(properties={"session_sequence": "14"}),
            r"properties.session_sequence: expected an integer, got a string",
        ),
        (
            ev(properties={"session_sequence": 1.5}),
            r"properties.session_sequence: expected an integer, got 1.5",
        ),
        (ev(properties={"session_sequence": 2**40}), r"out of range for a 32-bit integer"),
        (
            ev(properties={"time_on_page_seconds": "long"}),
            r"time_on_page_seconds: expected a number, got a string",
        ),
        (
            ev(properties={"is_first_use": 1}),
            r"properties.is_first_use: expected a boolean, got an integer",
        ),
        (ev(properties=[1, 2]), r"properties: expected an object, got an array"),
        (
            ev(user_traits="not json"),
            r"user_traits: expected an object, got a string that is not JSON",
        ),
        ("[1, 2]", r"not a JSON object \(got an array\)"),
        ("{nope", r"invalid JSON: .*line 1 column 2"),
        (b"\xff\xfe", r"not valid UTF-8"),
    ],
)
def test_malformed_records_are_quarantined_with_reason(record, reason):
    batch = norm([ev(100), record, ev(101)], location_prefix="in.ndjson")
    assert batch.accepted == 2, batch.quarantine.to_pylist()
    assert batch.quarantined == 1
    q = batch.quarantine.to_pylist()[0]
    assert q["location"] == "in.ndjson:2"
    assert q["source"] == "t"
    import re

    assert re.search(reason, q["reason"]), q["reason"]
    assert q["raw"]  # the record's text is kept


def test_offsets_are_converted_to_utc_and_naive_is_utc():
    batch = norm(
        [
            ev(1, timestamp="2026-02-28T14:23:17.5+02:00"),
            ev(2, timestamp="2026-02-28T14:23:17"),
            ev(3, timestamp=datetime(2026, 2, 28, 1, 2, 3)),
        ]
    )
    ts = batch.events.column("timestamp").to_pylist()
    assert ts == [
        datetime(2026, 2, 28, 12, 23, 17, 500000),
        datetime(2026, 2, 28, 14, 23, 17),
        datetime(2026, 2, 28, 1, 2, 3),
    ]


def test_include_exclude_filter_counts_filtered():
    records = [
        ev(1),
        ev(2, event_type="heartbeat"),
        ev(3, event_type="weird_type"),
        ev(4, event_type="page_viewed"),
    ]
    default = norm(records)  # spec filter: include list + exclude heartbeat
    assert default.accepted == 2 and default.filtered == 2
    assert set(default.events.column("event_type").to_pylist()) == {"feature_used", "page_viewed"}
    only_exclude = Settings.model_validate(
        {"ingest": {"include_types": [], "exclude_types": ["heartbeat"]}}
    )
    b = norm(records, only_exclude)
    assert b.accepted == 3 and b.filtered == 1
    assert "weird_type" in b.events.column("event_type").to_pylist()
    everything = Settings.model_validate({"ingest": {"include_types": [], "exclude_types": []}})
    assert norm(records, everything).accepted == 4
    assert norm(records, everything).received == 4


def test_in_batch_duplicates_keep_the_first():
    batch = norm([ev(1, user_id="first"), ev(2), ev(1, user_id="second")])
    assert batch.accepted == 2 and batch.duplicates == 1
    rows = {r["event_id"]: r["user_id"] for r in batch.events.to_pylist()}
    assert rows["evt_1"] == "first"
    assert batch.received == batch.accepted + batch.duplicates + batch.filtered + batch.quarantined


def test_flat_shape_records_and_integer_ids_are_accepted():
    flat = {
        "event_id": 7,
        "user_id": 42,
        "event_type": "feature_used",
        "timestamp": "2026-02-28T10:00:00Z",
        "feature_category": "forms",
        "session_sequence": 3,
        "properties": '{"k": "v"}',
        "user_traits": '{"plan": "pro"}',
    }
    row = norm([flat]).events.to_pylist()[0]
    assert (row["event_id"], row["user_id"]) == ("7", "42")
    assert row["feature_category"] == "forms" and row["session_sequence"] == 3
    assert orjson.loads(row["properties"]) == {"k": "v"}
    assert orjson.loads(row["user_traits"]) == {"plan": "pro"}


def test_mapping_renames_keys_and_rejects_unknown_fields():
    rec = {"id": "e1", "uid": "u1", "event_type": "feature_used", "ts": "2026-02-28T10:00:00Z"}
    batch = norm([rec], mapping={"event_id": "id", "user_id": "uid", "timestamp": "ts"})
    assert batch.accepted == 1
    assert batch.events.column("user_id").to_pylist() == ["u1"]
    with pytest.raises(DataError, match=r"unknown event field\(s\) 'userid'"):
        norm([rec], mapping={"userid": "uid"})


def test_explicit_locations_for_streams():
    batch = norm([ev(1), "{bad"], locations=["topic[0]@10", "topic[0]@11"])
    assert batch.quarantine.column("location").to_pylist() == ["topic[0]@11"]


def test_lines_with_line_numbers():
    lines = pa.array([orjson.dumps(ev(1)).decode(), '{"event_id": 5}'])
    batch = normalize_lines(
        lines,
        settings=Settings(),
        source="f",
        location_prefix="x.ndjson",
        line_numbers=[3, 9],
        now=NOW,
    )
    assert batch.quarantine.column("location").to_pylist() == ["x.ndjson:9"]


def test_table_flat_schema_and_nested_struct_and_csv_strings():
    flat = normalize_records([ev(1), ev(2)], settings=Settings(), source="t", now=NOW).events
    b = normalize_table(flat, settings=Settings(), source="p", location_prefix="f.parquet", now=NOW)
    assert b.accepted == 2
    assert b.events.equals(flat)

    nested = pa.Table.from_pylist([ev(1), ev(2, properties={"feature_category": "forms", "x": 1})])
    b = normalize_table(nested, settings=Settings(), source="p", now=NOW)
    rows = b.events.to_pylist()
    assert rows[0]["session_sequence"] == 14 and rows[1]["feature_category"] == "forms"
    assert rows[0]["properties"] is None  # only promoted keys
    assert orjson.loads(rows[1]["properties"]) == {"x": 1}

    csv_like = pa.table(
        {
            "id": ["a", "b", "c"],
            "uid": ["u", "u", "u"],
            "event_type": ["feature_used"] * 3,
            "ts": ["2026-02-28 10:00:00", "2026-02-28T11:00:00Z", "2026-02-28"],
            "session_sequence": ["1", "x", "3"],
            "is_first_use": ["true", "false", None],
        }
    )
    b = normalize_table(
        csv_like,
        settings=Settings(),
        source="csv",
        mapping={"event_id": "id", "user_id": "uid", "timestamp": "ts"},
        location_prefix="f.csv",
        now=NOW,
    )
    assert b.accepted == 2
    q = b.quarantine.to_pylist()[0]
    assert q["location"] == "f.csv:row 2"
    assert "session_sequence: cannot read 'x' as an integer" in q["reason"]
    assert "'uid': 'u'" in q["raw"] or '"uid":"u"' in q["raw"]


def test_table_mapping_to_missing_column_is_an_error():
    t = pa.table({"event_id": ["a"]})
    with pytest.raises(DataError, match=r"mapped column\(s\) not found: user_id \(column 'uid'\)"):
        normalize_table(t, settings=Settings(), source="x", mapping={"user_id": "uid"})


def test_filter_applies_before_checks_but_not_to_unreadable_types():
    """Noise is dropped like a source-side filter would: a broken heartbeat is 'filtered'; a
    record whose event_type cannot be read is quarantined."""
    batch = norm(
        [ev(1, event_type="heartbeat", timestamp="bad"), ev(2, event_type={"x": 1}), ev(3)]
    )
    assert (batch.accepted, batch.filtered, batch.quarantined) == (1, 1, 1)
    assert "event_type: expected a string" in batch.quarantine.column("reason")[0].as_py()
