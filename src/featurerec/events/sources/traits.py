"""User-trait updates (Segment ``identify``) from processes that do not own the warehouse.

The HTTP server cannot write the warehouse (DuckDB has one writer), so a
:class:`~featurerec.events.sources.common.TraitsUpdate` is made durable here first, like event
batches in ``events.landing``: one Parquet file per update under
``<data_dir>/sources/traits-landing/``, written to a temp name, fsynced and renamed.
:meth:`TraitsLanding.drain` (run by ``featurerec sources sync``) applies the files in arrival
order through :func:`apply_traits` (``Ingestor.upsert_rows`` after merging with the stored
users), then removes them. Applying a file twice gives the same users (a merge is
idempotent), so a crash between the warehouse commit and the removal loses nothing and
changes nothing.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from featurerec.config import Settings
from featurerec.events.sources.common import TraitsUpdate, merge_traits_rows, utcnow


def apply_traits(ingestor: Any, update: TraitsUpdate) -> int:
    """Merge ``update`` into the ``users`` table (non-null columns win, traits merged by key)."""
    if not len(update):
        return 0
    name = f"_fr_traits_{uuid.uuid4().hex[:12]}"
    engine = ingestor.engine
    engine.register_arrow(name, update.rows.select(["user_id"]))
    try:
        existing = engine.query_arrow(
            f"SELECT u.* FROM users u JOIN {name} k ON u.user_id = k.user_id"
        )
    finally:
        engine.unregister(name)
    merged = merge_traits_rows(existing.cast(update.rows.schema), update.rows)
    return int(ingestor.upsert_rows("users", merged) or 0)


class TraitsLanding:
    """Durable folder of pending trait updates (see the module doc)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @classmethod
    def for_settings(cls, settings: Settings) -> TraitsLanding:
        return cls(settings.data_path / "sources" / "traits-landing")

    def write(self, update: TraitsUpdate) -> Path:
        """Store ``update`` durably; returns the file (the receipt)."""
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = utcnow().strftime("%Y%m%dT%H%M%S%f")
        final = self.root / f"{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.root / f".{final.name}.tmp"
        table = update.rows.replace_schema_metadata({"source": update.source})
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final

    def pending(self) -> list[Path]:
        return sorted(self.root.glob("*.parquet")) if self.root.exists() else []

    def drain(self, ingestor: Any) -> int:
        """Apply every pending file in order; returns users written."""
        written = 0
        for path in self.pending():
            table: pa.Table = pq.read_table(path)
            source = (table.schema.metadata or {}).get(b"source", b"segment_http").decode()
            written += apply_traits(
                ingestor, TraitsUpdate(table.replace_schema_metadata(None), source)
            )
            path.unlink()
        return written
