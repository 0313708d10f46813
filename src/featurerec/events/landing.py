"""A durable landing zone for processes that do not own the warehouse.

DuckDB allows one writer process, so the HTTP server and the Kafka consumer never open the
warehouse: they validate what they receive (:func:`featurerec.events.validate.normalize_records`)
and hand the :class:`ValidatedBatch` to :meth:`Landing.write`, which returns only after the
batch is on disk for good (Parquet written to a temporary name, ``fsync``, atomic rename into
``pending/``, ``fsync`` of the folder). Only then may the caller acknowledge (answer
``{"success": true}``, commit a Kafka offset).

The process that owns the warehouse calls :meth:`Landing.drain` (``featurerec ingest
landing``): each pending file is appended through :meth:`Ingestor.append` with the file's
name as ``batch_id`` and then moved to ``done/``. A file loaded twice adds nothing: the
``batch_id`` is already in ``ingest_batches`` (so not even its quarantine rows are repeated),
and a crash between the commit and the move is covered by the same check and, for events,
by the dedupe on ``event_id``.

Rows for product tables (e.g. Segment ``identify`` traits for ``users``) land the same way
with :meth:`Landing.write_rows` and are upserted on drain.

Layout::

    <dir>/pending/<ns-time>-<uuid>.events.parquet     waiting to be loaded
    <dir>/pending/<ns-time>-<uuid>.<table>.rows.parquet
    <dir>/done/...                                      loaded (kept for audit)
    <dir>/pending/.tmp-*                                being written (ignored)
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from featurerec.errors import DataError
from featurerec.events.schema import EVENT_ARROW_SCHEMA
from featurerec.events.validate import QUARANTINE_ARROW_SCHEMA, ValidatedBatch

if TYPE_CHECKING:
    from featurerec.events.ingest import Ingestor, IngestReport

_META_KEY = b"featurerec.landing"
#: Temporary files older than this are left-overs of a crashed writer and are removed.
STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class LandingReceipt:
    """Proof that a batch is durably landed: acknowledge the sender only after getting one."""

    path: str
    batch_id: str
    kind: str  # "events" or the product table name
    rows: int
    quarantined: int
    written_at: datetime


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Landing:
    """The landing zone in ``directory`` (default for a project: ``<data_dir>/landing``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.root = Path(directory)
        self.pending_dir = self.root / "pending"
        self.done_dir = self.root / "done"

    @classmethod
    def for_settings(cls, settings: Any) -> Landing:
        """The project's landing zone under its data directory."""
        return cls(Path(settings.data_path) / "landing")

    # -- writing -------------------------------------------------------------------------------
    def write(self, batch: ValidatedBatch) -> LandingReceipt:
        """Durably land a validated event batch (its quarantined records travel with it)."""
        meta = {
            "kind": "events",
            "source": batch.source,
            "origin": batch.origin,
            "received": batch.received,
            "filtered": batch.filtered,
            "duplicates": batch.duplicates,
            "quarantine": batch.quarantine.to_pylist(),
        }
        table = batch.events.cast(EVENT_ARROW_SCHEMA)
        return self._write(table, meta, "events", batch.quarantined)

    def write_rows(self, table: str, rows: pa.Table, *, source: str = "landing") -> LandingReceipt:
        """Durably land rows for a product table (upserted by primary key on drain)."""
        if not table.isidentifier():
            raise DataError(f"landing: bad table name {table!r}")
        meta = {"kind": "rows", "table": table, "source": source}
        return self._write(rows, meta, table, 0)

    def _write(
        self, table: pa.Table, meta: dict[str, Any], kind: str, quarantined: int
    ) -> LandingReceipt:
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
        name = f"{stem}.events.parquet" if kind == "events" else f"{stem}.{kind}.rows.parquet"
        schema = table.schema.with_metadata(
            {**(table.schema.metadata or {}), _META_KEY: orjson.dumps(meta, default=str)}
        )
        tmp = self.pending_dir / f".tmp-{stem}"
        final = self.pending_dir / name
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table.replace_schema_metadata(schema.metadata), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.pending_dir)
        return LandingReceipt(
            path=str(final),
            batch_id=f"landing:{name}",
            kind=kind,
            rows=table.num_rows,
            quarantined=quarantined,
            written_at=datetime.now(UTC).replace(tzinfo=None),
        )

    # -- reading ---------------------------------------------------------------------------------
    def pending(self) -> list[Path]:
        """Landed files not yet loaded, oldest first."""
        if not self.pending_dir.is_dir():
            return []
        return sorted(
            p
            for p in self.pending_dir.iterdir()
            if p.name.endswith(".parquet") and not p.name.startswith(".")
        )

    @staticmethod
    def read(path: Path) -> tuple[dict[str, Any], pa.Table]:
        """The metadata and table of one landed file."""
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"landing file {path} cannot be read: {exc}") from None
        raw = (table.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise DataError(f"landing file {path} has no featurerec metadata")
        return orjson.loads(raw), table.replace_schema_metadata(None)

    @staticmethod
    def batch_of(meta: dict[str, Any], table: pa.Table) -> ValidatedBatch:
        """Rebuild the :class:`ValidatedBatch` a landed events file holds."""
        quarantine = pa.Table.from_pylist(
            meta.get("quarantine") or [], schema=QUARANTINE_ARROW_SCHEMA
        )
        return ValidatedBatch(
            events=table.cast(EVENT_ARROW_SCHEMA),
            quarantine=quarantine,
            source=meta.get("source") or "landing",
            received=int(meta.get("received", table.num_rows + quarantine.num_rows)),
            filtered=int(meta.get("filtered", 0)),
            duplicates=int(meta.get("duplicates", 0)),
            origin=meta.get("origin"),
        )

    @contextmanager
    def _drain_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".drain.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(f"another process is draining {self.root}") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def drain(self, ingestor: Ingestor, *, limit: int | None = None) -> IngestReport:
        """Load pending files into the warehouse (idempotently), then move them to ``done/``."""
        from featurerec.events.ingest import FileReport, IngestReport

        t0 = time.perf_counter()
        report = IngestReport()
        with self._drain_lock():
            self._remove_stale_tmp()
            files = self.pending()[: limit if limit is not None else None]
            self.done_dir.mkdir(parents=True, exist_ok=True)
            for path in files:
                meta, table = self.read(path)
                batch_id = f"landing:{path.name}"
                if meta.get("kind") == "rows":
                    tname = str(meta["table"])
                    fr = FileReport(path=str(path), kind=tname, format="parquet")
                    # Upserts are idempotent by key; the batch row marks the file as loaded.
                    if not ingestor.batch_committed(batch_id):
                        fr.rows = ingestor.upsert_rows(
                            tname,
                            table,
                            batch_id=batch_id,
                            source=str(meta.get("source") or "landing"),
                        )
                        fr.received = table.num_rows
                        report.tables[tname] = report.tables.get(tname, 0) + fr.rows
                    else:
                        fr.skipped_batches = 1
                    report.files.append(fr)
                else:
                    batch = self.batch_of(meta, table)
                    part = ingestor.append(batch, batch_id=batch_id)
                    fr = FileReport(
                        path=str(path),
                        kind="events",
                        format="parquet",
                        received=part.received,
                        accepted=part.accepted,
                        duplicate=part.duplicate,
                        filtered=part.filtered,
                        quarantined=part.quarantined,
                        batches=part.batches,
                        skipped_batches=0 if part.batches else 1,
                    )
                    part.files = [fr]
                    report.add(part)
                os.replace(path, self.done_dir / path.name)
            if files:
                _fsync_dir(self.done_dir)
                _fsync_dir(self.pending_dir)
        report.seconds = time.perf_counter() - t0
        return report

    def _remove_stale_tmp(self) -> None:
        if not self.pending_dir.is_dir():
            return
        cutoff = time.time() - STALE_TMP_SECONDS
        for p in self.pending_dir.glob(".tmp-*"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except FileNotFoundError:
                pass
