"""The one event schema every source lands in.

The spec's event (Stage 1) is nested: ``properties`` and ``user_traits`` objects. In the
warehouse the properties the engine reads on every query are promoted to typed columns
(``feature_category`` … ``is_first_use``), so the spec's
``JSON_EXTRACT_SCALAR(properties, '$.feature_category')`` becomes the column
``feature_category``. Everything else stays as JSON text in ``properties`` (the remaining
property keys) and ``user_traits``, so nothing a product sends is lost: see
:func:`to_spec_dict` for the way back.

``EVENT_ARROW_SCHEMA`` is the canonical flat shape: the simulator writes it to Parquet, the
warehouse ``events`` table has the same columns plus ``source`` and ``received_at``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa

#: Property keys promoted to columns, with their Arrow types.
PROMOTED_PROPERTIES: dict[str, pa.DataType] = {
    "feature_category": pa.string(),
    "feature_name": pa.string(),
    "context": pa.string(),
    "session_id": pa.string(),
    "session_sequence": pa.int32(),
    "time_on_page_seconds": pa.float64(),
    "is_first_use": pa.bool_(),
}

#: Required top-level fields of an event.
REQUIRED_FIELDS: tuple[str, ...] = ("event_id", "user_id", "event_type", "timestamp")

EVENT_ARROW_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("workspace_id", pa.string()),
        pa.field("event_type", pa.string(), nullable=False),
        # UTC, microseconds, timezone-naive (DuckDB TIMESTAMP).
        pa.field("timestamp", pa.timestamp("us"), nullable=False),
        *[pa.field(k, t) for k, t in PROMOTED_PROPERTIES.items()],
        # JSON text of the property keys that are not promoted (None when there are none).
        pa.field("properties", pa.string()),
        # JSON text of the user_traits object (None when absent).
        pa.field("user_traits", pa.string()),
    ]
)

EVENT_COLUMNS: tuple[str, ...] = tuple(EVENT_ARROW_SCHEMA.names)


def to_spec_dict(row: dict[str, Any]) -> dict[str, Any]:
    """Turn a flat warehouse/Arrow row back into the spec's nested event shape."""
    props: dict[str, Any] = {}
    extra = row.get("properties")
    for key in PROMOTED_PROPERTIES:
        value = row.get(key)
        if value is not None:
            props[key] = value
    if extra:
        props.update(orjson.loads(extra))
    ts = row["timestamp"]
    if isinstance(ts, datetime):
        ts = (
            ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if ts.microsecond
            else ts.strftime("%Y-%m-%dT%H:%M:%SZ")
        )
    out: dict[str, Any] = {
        "event_id": row["event_id"],
        "user_id": row["user_id"],
        "workspace_id": row.get("workspace_id"),
        "event_type": row["event_type"],
        "properties": props,
        "timestamp": ts,
    }
    traits = row.get("user_traits")
    if traits:
        out["user_traits"] = orjson.loads(traits)
    return out
