"""Where sources hand their data over: the one append path owned by ``featurerec.events``.

Sources never write warehouse tables themselves. Events go through
``featurerec.events.validate.normalize_records`` and then either
``featurerec.events.ingest.Ingestor.append`` (a process that owns the warehouse) or
``featurerec.events.landing.Landing.write`` (a process that does not: the HTTP server, the
Kafka consumer). Rows of the raw tables (users, workspaces, flags, assignments, tickets) go
through ``Ingestor.upsert_rows`` / ``Ingestor.delete_rows``. The protocols below are the parts of
that API sources use, so tests can check a source against a small fake as well as the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from featurerec.events.sources.common import QuarantinedRecord, utcnow


@runtime_checkable
class RowWriter(Protocol):
    """Upserts / deletes rows of a raw warehouse table, each call one transaction."""

    def upsert_rows(self, table: str, rows: pa.Table) -> Any: ...

    def delete_rows(self, table: str, keys: pa.Table) -> Any: ...


QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("location", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("quarantined_at", pa.timestamp("us")),
    ]
)


def quarantine_table(records: Sequence[QuarantinedRecord]) -> pa.Table:
    """Quarantine records as an ``ingest_quarantine``-shaped Arrow table."""
    at = utcnow()
    return pa.Table.from_pylist([r.as_row(at) for r in records], schema=QUARANTINE_SCHEMA)


def write_quarantine(
    engine: Any, records: Sequence[QuarantinedRecord], writer: Any | None = None
) -> int:
    """Append row-level quarantine records (CDC, cursor, Zendesk) to ``ingest_quarantine``.

    Event quarantine goes with the event batch through ``Ingestor.append``; this is for
    records that never become events. Goes through ``writer.write_quarantine`` (the
    ingestor's) when the writer has it, else inserts through ``engine``.
    """
    if not records:
        return 0
    if writer is not None and hasattr(writer, "write_quarantine"):
        from featurerec.events.validate import QuarantineRecord

        return int(writer.write_quarantine([QuarantineRecord(**r.__dict__) for r in records]))
    table = quarantine_table(records)
    name = "_featurerec_sources_quarantine"
    engine.register_arrow(name, table)
    try:
        engine.execute(
            "INSERT INTO ingest_quarantine (source, location, reason, raw, quarantined_at) "
            f"SELECT source, location, reason, raw, quarantined_at FROM {name}"
        )
    finally:
        engine.unregister(name)
    return table.num_rows
