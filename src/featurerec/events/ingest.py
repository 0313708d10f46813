"""Storing validated events and product rows in the warehouse: the one append path.

:class:`Ingestor` owns the write side of the warehouse for raw data. Every way events come
in ends in :meth:`Ingestor.append`, which stores one :class:`ValidatedBatch` in ONE
transaction: the new events (deduplicated against the warehouse on ``event_id`` with an
anti-join, so loading the same data twice adds nothing), the batch's quarantined records and
an ``ingest_batches`` row. A crash before the commit leaves nothing of the batch; a crash
after it loses nothing. The ``events`` table has no primary-key index on purpose: an
index on tens of millions of ids makes every insert slower than the anti-join does. The
anti-join reads only stored events within ``settings.ingest.dedupe_margin_hours`` (default
24 h) of the batch's time range — a re-sent event keeps its timestamp — so DuckDB skips the
other row groups by their min/max and the check stays fast at tens of millions of rows;
``dedupe_margin_hours = None`` compares with every stored event.

Files (:meth:`Ingestor.ingest_paths`): NDJSON (``.ndjson``, ``.jsonl``, ``.json``),
Parquet and CSV, optionally gzip-compressed (``.gz``), chosen by extension; directories are
walked. A directory written by ``featurerec simulate`` (:meth:`Ingestor.ingest_world`) is
loaded in one go: product tables first, then the events. A file named after a product
table (``users.parquet``, ``feature_flags.csv``, ...) is upserted into that table.

NDJSON is read in large blocks cut at line ends; each block's lines go through the
vectorised validation in :mod:`featurerec.events.validate` as one batch, so a malformed line
is quarantined with its ``file:line`` and never rejects the rest of the file.

Example::

    >>> from featurerec.config import Settings
    >>> from featurerec.events.validate import normalize_records
    >>> from featurerec.warehouse.engine import DuckDBEngine
    >>> settings = Settings()
    >>> ev = {"event_id": "e1", "user_id": "u1", "event_type": "feature_used",
    ...       "timestamp": "2026-02-28T14:23:17Z"}
    >>> with DuckDBEngine(":memory:") as db:
    ...     ing = Ingestor(db, settings)
    ...     first = ing.append(normalize_records([ev], settings=settings, source="doc"))
    ...     again = ing.append(normalize_records([ev], settings=settings, source="doc"))
    ...     (first.accepted, again.accepted, again.duplicate)
    (1, 0, 1)
"""

from __future__ import annotations

import gzip
import io
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.schema import EVENT_COLUMNS
from featurerec.events.validate import (
    QUARANTINE_ARROW_SCHEMA,
    QuarantineRecord,
    ValidatedBatch,
    normalize_lines,
    normalize_table,
    quarantine_table,
)
from featurerec.warehouse.engine import DuckDBEngine, WarehouseError

#: Product tables a world directory / a file named after them loads into, in load order.
PRODUCT_TABLES: tuple[str, ...] = (
    "workspaces",
    "users",
    "feature_flags",
    "ab_assignments",
    "support_tickets",
)

NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)

#: Bytes of NDJSON read per block (cut at the last line end); one block = one batch.
NDJSON_BLOCK_BYTES = 64 << 20

#: Blocks validated in parallel (each in its own thread and single-threaded DuckDB cursor)
#: while the current batch is stored; 0 validates inline.
VALIDATION_WORKERS = 2

#: ``on_progress(bytes_done)``: called as input bytes are consumed.
ProgressHook = Callable[[int], None]


# -- reports ---------------------------------------------------------------------------------


@dataclass
class FileReport:
    """What one input file (or stream) contributed."""

    path: str
    kind: str  # "events" or the product table name
    format: str
    received: int = 0
    accepted: int = 0
    duplicate: int = 0
    filtered: int = 0
    quarantined: int = 0
    #: Product tables: rows upserted.
    rows: int = 0
    batches: int = 0
    #: Batches skipped because their batch_id was already committed (landing re-drains).
    skipped_batches: int = 0


@dataclass
class IngestReport:
    """Counts of one ingestion run: totals, per file and per product table.

    ``duplicate`` counts events dropped because their ``event_id`` was already in the
    batch or in the warehouse; ``filtered`` those the include/exclude filter dropped.
    """

    accepted: int = 0
    duplicate: int = 0
    filtered: int = 0
    quarantined: int = 0
    received: int = 0
    batches: int = 0
    seconds: float = 0.0
    files: list[FileReport] = field(default_factory=list)
    #: Product table -> rows upserted.
    tables: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: IngestReport) -> None:
        """Fold ``other`` into this report (files appended, counts summed)."""
        self.accepted += other.accepted
        self.duplicate += other.duplicate
        self.filtered += other.filtered
        self.quarantined += other.quarantined
        self.received += other.received
        self.batches += other.batches
        self.files.extend(other.files)
        for t, n in other.tables.items():
            self.tables[t] = self.tables.get(t, 0) + n

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["events_per_second"] = round(self.events_per_second, 1)
        out["seconds"] = round(self.seconds, 3)
        return out


# -- helpers -----------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def detect_format(path: Path) -> str:
    """``ndjson`` / ``parquet`` / ``csv`` from the file name (``.gz`` allowed on top)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for fmt, suffixes in (
        ("ndjson", NDJSON_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
        ("csv", CSV_SUFFIXES),
    ):
        if name.endswith(suffixes):
            if fmt == "parquet" and path.name.lower().endswith(".gz"):
                raise DataError(f"{path}: gzip-compressed Parquet is not supported; decompress it")
            return fmt
    raise DataError(
        f"{path}: unknown file format; expected one of "
        f"{', '.join(NDJSON_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES)} (optionally .gz)"
    )


def _table_name_for(path: Path) -> str | None:
    """The product table a file loads into, from its stem (``users.parquet`` -> users)."""
    stem = path.name.lower()
    for suffix in (".gz", *NDJSON_SUFFIXES, *PARQUET_SUFFIXES, *CSV_SUFFIXES):
        stem = stem.removesuffix(suffix)
    return stem if stem in PRODUCT_TABLES else None


def is_world_dir(path: Path) -> bool:
    """True for a directory written by ``featurerec simulate`` (manifest + events/)."""
    return path.is_dir() and (path / "manifest.json").is_file() and (path / "events").is_dir()


def _open_binary(path: Path) -> BinaryIO:
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def iter_ndjson_blocks(
    path: Path, block_bytes: int | None = None, on_progress: ProgressHook | None = None
) -> Iterator[NdjsonBlock]:
    """Yield the :class:`NdjsonBlock` s of an NDJSON file, blank lines left out.

    Lines are zero-copy slices of one buffer per block (an Arrow string array built from
    the newline offsets), so splitting costs a numpy scan, not a Python loop. A plain file
    is read block by block with a seek back to the start of the cut line (no copying);
    a gzip stream carries the partial line over to the next block.
    """
    block_bytes = block_bytes or NDJSON_BLOCK_BYTES
    with _open_binary(path) as fh:
        gz = isinstance(fh, gzip.GzipFile)
        raw_fh = fh.fileobj if gz else fh  # type: ignore[attr-defined]
        last_pos = 0
        carry = b""
        next_line = 1
        size = block_bytes
        while True:
            chunk = fh.read(size)
            data = carry + chunk if carry else chunk
            if not data:
                break
            end = len(data)
            at_eof = len(chunk) < size
            if chunk and at_eof and not gz:
                chunk = b""  # the last block of a plain file: handled as the final one
            if chunk:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: read more
                    if gz:
                        carry = data
                    else:
                        fh.seek(-len(data), os.SEEK_CUR)
                    size *= 2
                    continue
                size = block_bytes
                if gz:
                    carry = data[cut:]
                elif cut < end:
                    fh.seek(cut - end, os.SEEK_CUR)
                end = cut
            else:
                carry = b""
                if not data.endswith(b"\n"):
                    data += b"\n"
                    end = len(data)
            buf = np.frombuffer(data, dtype=np.uint8, count=end)
            ends = np.flatnonzero(buf == 10)
            starts = np.empty_like(ends)
            starts[0] = 0
            starts[1:] = ends[:-1] + 1
            n_lines = len(ends)
            # A line is blank when it holds nothing but an optional \r.
            length = ends - starts
            blank = (length == 0) | ((length == 1) & (buf[np.minimum(starts, end - 1)] == 13))
            numbers = np.arange(next_line, next_line + n_lines, dtype=np.int64)
            next_line += n_lines
            if blank.any():
                keep = ~blank
                starts, ends, numbers = starts[keep], ends[keep], numbers[keep]
            lines = _lines_from_offsets(data, starts, ends)
            invalid: list[tuple[int, str]] = []
            if lines is None:  # invalid UTF-8 somewhere in the block (rare): find the lines
                lines, numbers, invalid = _split_invalid_utf8(data, starts, ends, numbers)
            if on_progress is not None:
                pos = raw_fh.tell()
                on_progress(pos - last_pos)
                last_pos = pos
            if len(numbers) or invalid:
                yield NdjsonBlock(lines, numbers, invalid)
            if not chunk:
                break


@dataclass(frozen=True)
class NdjsonBlock:
    """One block of an NDJSON file: its lines, their line numbers, and the lines that are
    not valid UTF-8 (``(line number, text with U+FFFD)``), which never reach the parser."""

    lines: pa.Array
    numbers: np.ndarray
    invalid_utf8: list[tuple[int, str]]


def _lines_from_offsets(data: bytes, starts: np.ndarray, ends: np.ndarray) -> pa.Array | None:
    """An Arrow string array of ``data[starts[i]:ends[i]]`` without copying the bytes.

    Arrow strings are contiguous, so each value runs to the next start: the newline (and
    anything between lines, e.g. left-out blank lines) stays at its end; JSON parsers skip
    that whitespace and raw texts are stripped before they are shown.
    """
    n = len(starts)
    if n == 0:
        return pa.array([], pa.string())
    offsets = np.empty(n + 1, dtype=np.int64 if len(data) >= 2**31 else np.int32)
    offsets[:n] = starts
    offsets[n] = ends[-1]
    typ = pa.large_string() if offsets.dtype == np.int64 else pa.string()
    arr = pa.Array.from_buffers(typ, n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        return None  # not valid UTF-8
    return arr


def _split_invalid_utf8(
    data: bytes, starts: np.ndarray, ends: np.ndarray, numbers: np.ndarray
) -> tuple[pa.Array, np.ndarray, list[tuple[int, str]]]:
    """Slow path for a block with invalid UTF-8: decode line by line, set bad lines aside."""
    texts: list[str] = []
    keep: list[int] = []
    invalid: list[tuple[int, str]] = []
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        raw = data[s:e]
        try:
            texts.append(raw.decode("utf-8"))
            keep.append(i)
        except UnicodeDecodeError:
            invalid.append((int(numbers[i]), raw.decode("utf-8", errors="replace").rstrip("\r")))
    return pa.array(texts, pa.string()), numbers[keep], invalid


# -- the ingestor ----------------------------------------------------------------------------------


class Ingestor:
    """Writes raw data into the warehouse: events (:meth:`append`), files, worlds, product rows.

    Needs a read-write :class:`~featurerec.warehouse.engine.DuckDBEngine` (DuckDB allows one
    writer process; processes that do not own the warehouse use
    :class:`featurerec.events.landing.Landing`).
    """

    def __init__(self, engine: DuckDBEngine, settings: Settings) -> None:
        if getattr(engine, "read_only", False):
            raise WarehouseError("the ingestor needs a read-write warehouse (got a read-only one)")
        self.engine = engine
        self.settings = settings
        self._keys_cache: dict[str, tuple[str, ...]] = {}

    # -- events ------------------------------------------------------------------------------
    def append(self, batch: ValidatedBatch, *, batch_id: str | None = None) -> IngestReport:
        """Store ``batch`` in one transaction; return what happened to its records.

        Events whose ``event_id`` is already in the warehouse are counted as duplicates and
        not inserted. With a ``batch_id`` that was already committed (a landing file loaded
        twice), nothing is written at all and the batch counts as skipped.
        """
        t0 = time.perf_counter()
        batch_id = batch_id or f"{batch.source}:{uuid.uuid4().hex}"
        report = IngestReport(received=batch.received)
        now = _utcnow()
        db = self.engine
        name = f"_fr_batch_{uuid.uuid4().hex[:12]}"
        qname = f"{name}_q"
        db.register_arrow(name, batch.events)
        db.register_arrow(qname, _with_time(batch.quarantine, now))
        cols = ", ".join(f'"{c}"' for c in EVENT_COLUMNS)
        try:
            with db.transaction():
                done = _scalar(
                    db, "SELECT count(*) FROM ingest_batches WHERE batch_id = $id", {"id": batch_id}
                )
                if done:
                    report.seconds = time.perf_counter() - t0
                    report.received = 0
                    return report
                inserted = 0
                if batch.events.num_rows:
                    stored, params = self._dedupe_scope(batch)
                    inserted = int(
                        _scalar(
                            db,
                            f"INSERT INTO events ({cols}, source, received_at) "
                            f"SELECT {', '.join('b.' + c for c in cols.split(', '))}, $source, $now "
                            f"FROM {name} b ANTI JOIN ({stored}) e ON e.event_id = b.event_id",
                            {"source": batch.source, "now": now, **params},
                        )
                        or 0
                    )
                if batch.quarantine.num_rows:
                    # The same bad record loaded again (the same file twice) is kept once.
                    db.execute(
                        "INSERT INTO ingest_quarantine (source, location, reason, raw, quarantined_at) "
                        f"SELECT q.source, q.location, q.reason, q.raw, q.quarantined_at FROM {qname} q "
                        "ANTI JOIN ingest_quarantine o ON o.location = q.location "
                        "AND o.reason = q.reason AND o.raw IS NOT DISTINCT FROM q.raw"
                    )
                report.accepted = inserted
                report.duplicate = batch.duplicates + (batch.events.num_rows - inserted)
                report.filtered = batch.filtered
                report.quarantined = batch.quarantined
                report.batches = 1
                self._record_batch(batch_id, batch.source, report, now)
        finally:
            db.unregister(name)
            db.unregister(qname)
        report.seconds = time.perf_counter() - t0
        return report

    def _dedupe_scope(self, batch: ValidatedBatch) -> tuple[str, dict[str, Any]]:
        """The stored events a batch is deduplicated against (SQL and its parameters).

        The whole table when ``settings.ingest.dedupe_margin_hours`` is None; otherwise the
        events within that margin of the batch's time range: a filter on ``timestamp`` that
        DuckDB answers from row-group min/max, so the anti-join reads only the row groups
        of that period instead of every event_id ever stored.
        """
        margin = self.settings.ingest.dedupe_margin_hours
        if margin is None:
            return "SELECT event_id FROM events", {}
        lo, hi = pc.min_max(batch.events.column("timestamp")).values()
        pad = timedelta(hours=margin)
        return (
            "SELECT event_id FROM events WHERE timestamp BETWEEN $lo AND $hi",
            {"lo": lo.as_py() - pad, "hi": hi.as_py() + pad},
        )

    def _record_batch(
        self, batch_id: str, source: str, report: IngestReport, now: datetime
    ) -> None:
        self.engine.execute(
            "INSERT INTO ingest_batches (batch_id, source, accepted, duplicate, filtered, "
            "quarantined, committed_at) VALUES ($id, $source, $a, $d, $f, $q, $now)",
            {
                "id": batch_id,
                "source": source,
                "a": report.accepted,
                "d": report.duplicate,
                "f": report.filtered,
                "q": report.quarantined,
                "now": now,
            },
        )

    def batch_committed(self, batch_id: str) -> bool:
        """Whether a batch with this id has been committed (idempotent re-loads)."""
        return bool(
            _scalar(
                self.engine,
                "SELECT count(*) FROM ingest_batches WHERE batch_id = $id",
                {"id": batch_id},
            )
        )

    def write_quarantine(self, records: Sequence[QuarantineRecord]) -> int:
        """Store quarantined records that never become an event batch (e.g. CDC rows)."""
        if not records:
            return 0
        table = _with_time(quarantine_table(records), _utcnow())
        name = f"_fr_q_{uuid.uuid4().hex[:12]}"
        self.engine.register_arrow(name, table)
        try:
            self.engine.execute(
                "INSERT INTO ingest_quarantine (source, location, reason, raw, quarantined_at) "
                f"SELECT source, location, reason, raw, quarantined_at FROM {name}"
            )
        finally:
            self.engine.unregister(name)
        return table.num_rows

    # -- files -------------------------------------------------------------------------------
    def ingest_paths(
        self,
        paths: Iterable[str | os.PathLike[str]],
        mapping: Mapping[str, str] | None = None,
        *,
        source: str | None = None,
        on_progress: ProgressHook | None = None,
    ) -> IngestReport:
        """Load files and directories; a ``featurerec simulate`` directory loads as a world.

        ``mapping`` (canonical event field -> column/key in the files) applies to event
        files; when None, ``settings.ingest.column_map`` is used if it is set. ``source``
        is stored with the events (default: ``file``, or ``simulate`` for a world).
        """
        t0 = time.perf_counter()
        plan = self.plan_paths(paths)
        mapping = self._mapping(mapping)
        report = IngestReport()
        for item in plan:
            if item.world is not None:
                report.add(
                    self.ingest_world(
                        item.world, source=source or "simulate", on_progress=on_progress
                    )
                )
            else:
                report.add(
                    self._ingest_file(
                        item.path,
                        item.table,
                        mapping,
                        source=source or "file",
                        on_progress=on_progress,
                    )
                )
        report.seconds = time.perf_counter() - t0
        return report

    def plan_paths(self, paths: Iterable[str | os.PathLike[str]]) -> list[PlannedInput]:
        """Resolve paths into the files/worlds to load, failing early on bad input."""
        plan: list[PlannedInput] = []
        given = list(paths)
        if not given:
            raise DataError("no input paths given")
        for raw in given:
            p = Path(raw)
            if not p.exists():
                raise DataError(f"path not found: {p}")
            if is_world_dir(p):
                plan.append(PlannedInput(path=p, world=p))
            elif p.is_dir():
                files = sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file() and not f.name.startswith(".") and _known_format(f)
                )
                if not files:
                    raise DataError(f"{p}: no NDJSON, Parquet or CSV files found in this directory")
                plan.extend(PlannedInput(path=f, table=_table_name_for(f)) for f in files)
            else:
                detect_format(p)  # raises a clear error for unknown formats
                plan.append(PlannedInput(path=p, table=_table_name_for(p)))
        return plan

    def ingest_world(
        self,
        directory: str | os.PathLike[str],
        *,
        source: str = "simulate",
        on_progress: ProgressHook | None = None,
    ) -> IngestReport:
        """Load a directory written by ``featurerec simulate``: product tables, then events.

        Product tables present as ``<table>.parquet`` (or .csv/.ndjson) are upserted by
        primary key, so re-loading a world changes nothing; events in ``events/`` are
        appended with dedupe. ``ground_truth/`` is never read.
        """
        t0 = time.perf_counter()
        d = Path(directory)
        if not d.is_dir():
            raise DataError(f"world directory not found: {d}")
        if not (d / "manifest.json").is_file():
            raise DataError(f"{d}: not a simulate output directory (no manifest.json)")
        report = IngestReport()
        for table in PRODUCT_TABLES:
            for f in sorted(d.glob(f"{table}.*")):
                if _known_format(f):
                    report.add(
                        self._ingest_file(f, table, None, source=source, on_progress=on_progress)
                    )
        events_dir = d / "events"
        event_files = (
            sorted(
                f
                for f in events_dir.rglob("*")
                if f.is_file() and not f.name.startswith(".") and _known_format(f)
            )
            if events_dir.is_dir()
            else []
        )
        if not event_files:
            raise DataError(f"{d}: no event files in {events_dir}")
        for f in event_files:
            report.add(self._ingest_file(f, None, None, source=source, on_progress=on_progress))
        report.seconds = time.perf_counter() - t0
        return report

    def _mapping(self, mapping: Mapping[str, str] | None) -> dict[str, str]:
        if mapping is not None:
            return dict(mapping)
        return dict(self.settings.ingest.column_map)

    def _ingest_file(
        self,
        path: Path,
        table: str | None,
        mapping: Mapping[str, str] | None,
        *,
        source: str,
        on_progress: ProgressHook | None,
    ) -> IngestReport:
        fmt = detect_format(path)
        fr = FileReport(path=str(path), kind=table or "events", format=fmt)
        report = IngestReport(files=[fr])
        if table is not None:
            rows = _read_table_file(path, fmt)
            n = self.upsert_rows(table, rows)
            fr.rows = n
            fr.received = rows.num_rows
            report.tables[table] = n
            if on_progress:
                on_progress(path.stat().st_size)
            return report
        for batch in self.iter_file_batches(path, mapping, source=source, on_progress=on_progress):
            part = self.append(batch)
            fr.received += part.received
            fr.accepted += part.accepted
            fr.duplicate += part.duplicate
            fr.filtered += part.filtered
            fr.quarantined += part.quarantined
            fr.batches += part.batches
            report.accepted += part.accepted
            report.duplicate += part.duplicate
            report.filtered += part.filtered
            report.quarantined += part.quarantined
            report.received += part.received
            report.batches += part.batches
        return report

    def iter_file_batches(
        self,
        path: Path,
        mapping: Mapping[str, str] | None = None,
        *,
        source: str = "file",
        on_progress: ProgressHook | None = None,
        workers: int | None = None,
    ) -> Iterator[ValidatedBatch]:
        """Validated batches of one event file (NDJSON blocks, Parquet/CSV record batches).

        Blocks are read here, in order, and validated by ``workers`` threads (default
        :data:`VALIDATION_WORKERS`) while the caller stores earlier ones; batches come out in
        file order. Validation runs in DuckDB and numpy, which release the GIL.
        """
        fmt = detect_format(path)
        settings = self.settings
        now = _utcnow()
        origin = str(path)

        def lines_batch(block: NdjsonBlock) -> ValidatedBatch:
            batch = normalize_lines(
                block.lines,
                settings=settings,
                source=source,
                location_prefix=origin,
                line_numbers=block.numbers,
                mapping=mapping,
                now=now,
                origin=origin,
            )
            if block.invalid_utf8:
                bad = quarantine_table(
                    [
                        QuarantineRecord(source, f"{origin}:{no}", "not valid UTF-8", text)
                        for no, text in block.invalid_utf8
                    ]
                )
                batch = replace(
                    batch,
                    quarantine=pa.concat_tables([bad, batch.quarantine]),
                    received=batch.received + bad.num_rows,
                )
            return batch

        def table_batch(item: tuple[int, pa.Table]) -> ValidatedBatch:
            first, rb = item
            return normalize_table(
                rb,
                settings=settings,
                source=source,
                mapping=mapping,
                location_prefix=origin,
                first_row=first,
                now=now,
                origin=origin,
            )

        n_workers = VALIDATION_WORKERS if workers is None else workers
        if fmt == "ndjson":
            yield from _ordered_map(
                lines_batch, iter_ndjson_blocks(path, on_progress=on_progress), n_workers
            )
            return

        def numbered() -> Iterator[tuple[int, pa.Table]]:
            first = 1
            for rb in _iter_table_batches(path, fmt, settings.ingest.batch_size):
                yield first, rb
                first += rb.num_rows
            if on_progress:
                on_progress(path.stat().st_size)

        yield from _ordered_map(table_batch, numbered(), n_workers)

    # -- product tables ------------------------------------------------------------------------
    def table_keys(self, table: str) -> tuple[str, ...]:
        """Primary-key columns of a warehouse table (from DuckDB's catalog)."""
        if table in self._keys_cache:
            return self._keys_cache[table]
        if table == "events" or not self.engine.table_exists(table):
            raise DataError(f"unknown product table {table!r}; known: {', '.join(PRODUCT_TABLES)}")
        rows = self.engine.query_rows(
            "SELECT constraint_column_names AS cols FROM duckdb_constraints() "
            "WHERE table_name = $t AND schema_name = 'main' AND constraint_type = 'PRIMARY KEY'",
            {"t": table},
        )
        if not rows:
            raise DataError(f"table {table!r} has no primary key, so rows cannot be upserted")
        keys = tuple(rows[0]["cols"])
        self._keys_cache[table] = keys
        return keys

    def _table_columns(self, table: str) -> list[str]:
        rows = self.engine.query_rows(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'main' AND table_name = $t ORDER BY ordinal_position",
            {"t": table},
        )
        return [r["column_name"] for r in rows]

    def upsert_rows(
        self,
        table: str,
        rows: pa.Table,
        *,
        batch_id: str | None = None,
        source: str = "rows",
    ) -> int:
        """Insert or replace ``rows`` of a product table by primary key, in one transaction.

        ``rows`` may hold any subset of the table's columns that includes the key; missing
        columns become NULL (a full-row replace). Within ``rows`` the last row of a key
        wins. Timezone-aware timestamps are converted to UTC naive. With a ``batch_id``
        the upsert is recorded in ``ingest_batches`` in the same transaction and skipped
        (returning 0) if that id was committed before. Returns rows written.
        """
        keys = self.table_keys(table)
        columns = self._table_columns(table)
        unknown = [c for c in rows.column_names if c not in columns]
        if unknown:
            raise DataError(
                f"{table}: unknown column(s) {', '.join(unknown)}; columns: {', '.join(columns)}"
            )
        missing_keys = [k for k in keys if k not in rows.column_names]
        if missing_keys:
            raise DataError(f"{table}: rows lack key column(s) {', '.join(missing_keys)}")
        if rows.num_rows == 0:
            return 0
        rows = _naive_utc(rows)
        null_keys = sum(rows.column(k).null_count for k in keys)
        if null_keys:
            raise DataError(f"{table}: {null_keys} row(s) have a NULL key ({', '.join(keys)})")
        data = rows.append_column("_fr_ord", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
        name = f"_fr_rows_{uuid.uuid4().hex[:12]}"
        cols = [c for c in columns if c in rows.column_names]
        col_sql = ", ".join(f'"{c}"' for c in cols)
        part = ", ".join(f'"{k}"' for k in keys)
        self.engine.register_arrow(name, data)
        try:
            with self.engine.transaction():
                if batch_id is not None and self.batch_committed(batch_id):
                    return 0
                n = _scalar(
                    self.engine,
                    f'INSERT OR REPLACE INTO "{table}" ({col_sql}) '
                    f"SELECT {col_sql} FROM {name} "
                    f"QUALIFY row_number() OVER (PARTITION BY {part} ORDER BY _fr_ord DESC) = 1",
                )
                if batch_id is not None:
                    done = IngestReport(accepted=int(n or 0))
                    self._record_batch(batch_id, source, done, _utcnow())
        except WarehouseError as exc:
            raise DataError(f"{table}: rows do not fit the table: {exc}") from None
        finally:
            self.engine.unregister(name)
        return int(n or 0)

    def delete_rows(self, table: str, keys: pa.Table) -> int:
        """Delete the rows of a product table whose primary key is in ``keys``; returns count."""
        key_cols = self.table_keys(table)
        missing = [k for k in key_cols if k not in keys.column_names]
        if missing:
            raise DataError(f"{table}: delete keys lack column(s) {', '.join(missing)}")
        if keys.num_rows == 0:
            return 0
        name = f"_fr_keys_{uuid.uuid4().hex[:12]}"
        cond = " AND ".join(f't."{k}" = k."{k}"' for k in key_cols)
        self.engine.register_arrow(name, keys.select(list(key_cols)))
        try:
            with self.engine.transaction():
                n = _scalar(
                    self.engine,
                    f'DELETE FROM "{table}" t WHERE EXISTS (SELECT 1 FROM {name} k WHERE {cond})',
                )
        finally:
            self.engine.unregister(name)
        return int(n or 0)


def _ordered_map(
    fn: Callable[[Any], ValidatedBatch], items: Iterator[Any], workers: int
) -> Iterator[ValidatedBatch]:
    """``map(fn, items)`` with up to ``workers`` calls running ahead in threads, in order.

    The items are produced (read) in the caller's thread; the results are consumed (stored)
    there too, so reading, validating and storing overlap. ``workers=0`` runs inline.
    Errors surface in the caller, in order.
    """
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featurerec-ingest") as pool:
        pending: deque[Future[ValidatedBatch]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


@dataclass(frozen=True)
class PlannedInput:
    """One thing :meth:`Ingestor.ingest_paths` will load."""

    path: Path
    table: str | None = None
    world: Path | None = None


def _scalar(engine: DuckDBEngine, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    """First value of the first row, with the result read to the end (DuckDB keeps a
    connection busy while a result is partly fetched)."""
    rows = engine.query_rows(sql, params)
    return next(iter(rows[0].values())) if rows else None


def _known_format(path: Path) -> bool:
    try:
        detect_format(path)
    except DataError:
        return False
    return True


def _with_time(quarantine: pa.Table, now: datetime) -> pa.Table:
    return quarantine.append_column(
        "quarantined_at", pa.array([now] * quarantine.num_rows, pa.timestamp("us"))
    )


def _naive_utc(table: pa.Table) -> pa.Table:
    """Timezone-aware timestamp columns -> UTC naive (the warehouse convention)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type.tz is not None:
            col = table.column(i).cast(pa.timestamp(f.type.unit, tz="UTC"))
            naive = col.cast(pa.timestamp(f.type.unit))
            table = table.set_column(i, f.name, naive)
    return table


def _read_table_file(path: Path, fmt: str) -> pa.Table:
    """A whole product-table file as Arrow (these tables are small)."""
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "csv":
            with _open_binary(path) as fh:
                return pacsv.read_csv(fh)
        with _open_binary(path) as fh:
            rows = [orjson.loads(line) for line in fh if line.strip()]
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, orjson.JSONDecodeError, OSError) as exc:
        raise DataError(f"{path}: cannot read {fmt}: {exc}") from None


def _iter_table_batches(path: Path, fmt: str, batch_size: int) -> Iterator[pa.Table]:
    """Event batches of a Parquet or CSV file (CSV columns all read as text, so one odd
    value never changes a column's type; validation converts and names bad values)."""
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            for rb in pf.iter_batches(batch_size=batch_size):
                yield pa.Table.from_batches([rb])
            return
        with _open_binary(path) as fh:
            head = fh.read(1 << 20)
        header = pacsv.read_csv(
            io.BytesIO(head.split(b"\n", 1)[0] + b"\n"),
            read_options=pacsv.ReadOptions(autogenerate_column_names=False),
        ).column_names
        convert = pacsv.ConvertOptions(
            column_types=dict.fromkeys(header, pa.string()), strings_can_be_null=True
        )
        with _open_binary(path) as fh:
            reader = pacsv.open_csv(fh, convert_options=convert)
            pending: list[pa.RecordBatch] = []
            rows = 0
            for rb in reader:
                pending.append(rb)
                rows += rb.num_rows
                if rows >= batch_size:
                    yield pa.Table.from_batches(pending)
                    pending, rows = [], 0
            if pending:
                yield pa.Table.from_batches(pending)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: cannot read {fmt}: {exc}") from None


__all__ = [
    "PRODUCT_TABLES",
    "QUARANTINE_ARROW_SCHEMA",
    "FileReport",
    "IngestReport",
    "Ingestor",
    "NdjsonBlock",
    "PlannedInput",
    "detect_format",
    "is_world_dir",
    "iter_ndjson_blocks",
]
