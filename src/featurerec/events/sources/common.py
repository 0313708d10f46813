"""Pieces every external source shares.

* :class:`SourceState`: a small JSON state file per source under
  ``<data_dir>/sources/<name>/state.json`` (cursor / LSN / last sync, counts, last error),
  written atomically (temp file, fsync, rename) so a crash never leaves half a state.
* :class:`Backoff`: seeded exponential backoff with jitter for sources that go away.
* :class:`TraitsUpdate`: the typed batch that carries user-trait changes (Segment ``identify``,
  ``context.traits``) to the ``users`` table through the same landing / ingest path as events.
* :class:`RowChanges`: upserts and deletes of one raw warehouse table (CDC, cursor, Zendesk).
* :func:`warehouse_schema`: the Arrow schema of a raw warehouse table, derived from the one
  DDL in :mod:`featurerec.warehouse.schema` so it can never drift from it.
* :func:`parse_timestamp`: ISO-8601 / epoch → UTC, timezone-naive ``datetime``.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from featurerec.config import Settings
from featurerec.errors import DataError, FeaturerecError
from featurerec.warehouse.schema import RAW_TABLES

#: Primary-key columns of the raw tables sources write rows to.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "users": ("user_id",),
    "workspaces": ("workspace_id",),
    "feature_flags": ("flag_id",),
    "ab_assignments": ("experiment", "user_id"),
    "support_tickets": ("ticket_id",),
}


@cache
def warehouse_schema(table: str) -> pa.Schema:
    """Arrow schema of raw warehouse ``table`` (from the DDL, via an in-memory DuckDB)."""
    if table not in RAW_TABLES:
        raise DataError(f"unknown warehouse table {table!r}; known: {sorted(RAW_TABLES)}")
    con = duckdb.connect(":memory:")
    try:
        con.execute(RAW_TABLES[table])
        schema: pa.Schema = con.sql(f'SELECT * FROM "{table}" LIMIT 0').to_arrow_table().schema
    finally:
        con.close()
    return schema


def key_schema(table: str) -> pa.Schema:
    """Arrow schema of the primary-key columns of ``table`` (for deletes)."""
    schema = warehouse_schema(table)
    return pa.schema([schema.field(k) for k in TABLE_KEYS[table]])


def parse_timestamp(value: Any, *, what: str = "timestamp") -> datetime:
    """ISO-8601 text, epoch seconds or a ``datetime`` → UTC, timezone-naive ``datetime``.

    Raises :class:`DataError` naming ``what`` and the value when it cannot be read.
    """
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        dt = datetime.fromtimestamp(float(value), tz=UTC)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise DataError(f"{what}: not an ISO-8601 timestamp (got {value!r})") from None
    else:
        raise DataError(f"{what}: missing or not a timestamp (got {value!r})")
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


def format_timestamp(dt: datetime) -> str:
    """UTC naive ``datetime`` → ``2026-02-28T14:23:17.123456Z`` (the spec's event format)."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utcnow() -> datetime:
    """Wall-clock now as UTC naive (only for receipt times, never for windows)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class QuarantinedRecord:
    """A record a source could not accept, with where it came from and why."""

    source: str
    location: str
    reason: str
    raw: str

    def as_row(self, at: datetime) -> dict[str, Any]:
        return {
            "source": self.source,
            "location": self.location,
            "reason": self.reason,
            "raw": self.raw,
            "quarantined_at": at,
        }


def raw_text(value: Any, limit: int = 10_000) -> str:
    """A record as text for the quarantine table (bytes decoded leniently, capped)."""
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = orjson.dumps(value, default=str).decode()
        except TypeError:
            text = repr(value)
    return text[:limit]


@dataclass(frozen=True)
class RowChanges:
    """Upserts and deletes for one raw warehouse table, applied in that order.

    ``upserts`` has exactly the table's columns (:func:`warehouse_schema`); ``deletes`` has
    its key columns (:func:`key_schema`).
    """

    table: str
    upserts: pa.Table
    deletes: pa.Table

    @classmethod
    def from_rows(
        cls,
        table: str,
        upserts: list[dict[str, Any]],
        deletes: list[dict[str, Any]] | None = None,
    ) -> RowChanges:
        schema = warehouse_schema(table)
        try:
            up = pa.Table.from_pylist([_complete(r, schema) for r in upserts], schema=schema)
            dl = pa.Table.from_pylist(deletes or [], schema=key_schema(table))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"{table}: rows do not fit the warehouse schema: {exc}") from None
        return cls(table, up, dl)

    def __len__(self) -> int:
        return self.upserts.num_rows + self.deletes.num_rows


def _complete(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    return {name: row.get(name) for name in schema.names}


@dataclass(frozen=True)
class TraitsUpdate:
    """User-trait changes for the ``users`` table (Segment ``identify`` and ``context.traits``).

    One row per user: the promoted columns (``workspace_id``, ``role``, ``signup_cohort``,
    ``signup_date``) where the call carried them, and every trait as JSON in ``traits``.
    Columns a call did not carry are null and mean "unchanged": the row is merged into the
    existing user (see :func:`merge_traits_rows`), never replacing known values with nulls.
    """

    rows: pa.Table
    source: str = "segment_http"

    #: Trait keys promoted to ``users`` columns.
    PROMOTED = ("workspace_id", "role", "signup_cohort", "signup_date")

    @classmethod
    def from_traits(
        cls, items: list[tuple[str, dict[str, Any], datetime]], source: str = "segment_http"
    ) -> TraitsUpdate:
        """Build from ``(user_id, traits, timestamp)``; the latest call per user wins per key."""
        merged: dict[str, tuple[dict[str, Any], datetime]] = {}
        for user_id, traits, ts in sorted(items, key=lambda it: it[2]):
            old, _ = merged.get(user_id, ({}, ts))
            merged[user_id] = ({**old, **traits}, ts)
        rows = []
        for user_id, (traits, ts) in merged.items():
            row: dict[str, Any] = {"user_id": user_id, "updated_at": ts}
            for key in cls.PROMOTED:
                value = traits.get(key)
                if key == "signup_date" and value is not None:
                    try:
                        value = parse_timestamp(value, what=f"traits.{key}").date()
                    except DataError:
                        value = None
                row[key] = None if value is None else value
                if key != "signup_date" and value is not None:
                    row[key] = str(value)
            row["traits"] = orjson.dumps(traits, default=str).decode() if traits else None
            rows.append(row)
        return cls(RowChanges.from_rows("users", rows).upserts, source)

    def __len__(self) -> int:
        return self.rows.num_rows


def merge_traits_rows(existing: pa.Table, update: pa.Table) -> pa.Table:
    """Merge ``update`` users rows into ``existing`` ones: non-null columns win, trait JSON
    objects are merged key by key. Both tables have the ``users`` schema."""
    old = {r["user_id"]: r for r in existing.to_pylist()}
    out = []
    for new in update.to_pylist():
        prev = old.get(new["user_id"])
        if prev is None:
            out.append(new)
            continue
        row = dict(prev)
        for k, v in new.items():
            if k == "traits":
                merged = {**json_object(prev.get("traits")), **json_object(v)}
                row[k] = orjson.dumps(merged, default=str).decode() if merged else None
            elif v is not None:
                row[k] = v
        out.append(row)
    return pa.Table.from_pylist(out, schema=update.schema)


def json_object(text: Any) -> dict[str, Any]:
    """A JSON object from ``text``; {} when it is empty, not JSON or not an object."""
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# -- state ------------------------------------------------------------------------------


def sources_dir(settings: Settings) -> Path:
    return settings.data_path / "sources"


@dataclass
class SourceState:
    """Persisted state of one source: position, last sync, counts, last error.

    ``position`` is source-specific (Kafka: nothing, offsets live in the consumer group;
    CDC: the last applied LSN; cursor: per-table ``updated_at`` cursors; Zendesk: the
    ``after_cursor``).
    """

    name: str
    kind: str
    position: dict[str, Any] = field(default_factory=dict)
    last_sync_started: str | None = None
    last_sync_finished: str | None = None
    last_success: str | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    next_attempt_at: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    lag: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def path_for(settings: Settings, name: str) -> Path:
        return sources_dir(settings) / name / "state.json"

    @classmethod
    def load(cls, settings: Settings, name: str, kind: str) -> SourceState:
        path = cls.path_for(settings, name)
        if not path.exists():
            return cls(name=name, kind=kind)
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise DataError(f"source state {path} is corrupt: {exc}") from None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, settings: Settings) -> None:
        atomic_write_bytes(
            self.path_for(settings, self.name),
            orjson.dumps(self.__dict__, option=orjson.OPT_INDENT_2, default=str),
        )

    def add_counts(self, **counts: int) -> None:
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class Backoff:
    """Exponential backoff with full jitter, seeded: ``base * 2**attempt`` capped at ``cap``."""

    base: float = 1.0
    cap: float = 300.0
    seed: int = 0
    attempt: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def next_delay(self) -> float:
        """The delay before the next try; each call doubles the ceiling."""
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


class SourceUnavailable(FeaturerecError):
    """A source (broker, database, HTTP API) cannot be reached now; retry with backoff."""


# -- rows → warehouse types ---------------------------------------------------------------


def coerce_row(row: dict[str, Any], schema: pa.Schema, *, where: str) -> dict[str, Any]:
    """Coerce one row's values to the Arrow ``schema``'s column types.

    Text for string columns (objects and lists become JSON text), numbers for numeric
    columns, UTC naive datetimes for timestamps, dates for dates. Raises
    :class:`DataError` naming ``where`` and the column when a value does not fit.
    """
    out: dict[str, Any] = {}
    for f in schema:
        value = row.get(f.name)
        if value is None:
            out[f.name] = None
            continue
        t = f.type
        try:
            if pa.types.is_string(t) or pa.types.is_large_string(t):
                if isinstance(value, dict | list):
                    value = orjson.dumps(value, default=str).decode()
                elif isinstance(value, datetime):
                    value = format_timestamp(parse_timestamp(value))
                out[f.name] = str(value)
            elif pa.types.is_timestamp(t):
                out[f.name] = parse_timestamp(value, what=f"{where}.{f.name}")
            elif pa.types.is_date(t):
                out[f.name] = parse_timestamp(value, what=f"{where}.{f.name}").date()
            elif pa.types.is_boolean(t):
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "t", "f", "1", "0"):
                        raise ValueError(value)
                    value = value.lower() in ("true", "t", "1")
                out[f.name] = bool(value)
            elif pa.types.is_integer(t):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                out[f.name] = int(value)
            elif pa.types.is_floating(t):
                if isinstance(value, bool):
                    raise ValueError(value)
                out[f.name] = float(value)
            else:
                out[f.name] = value
        except DataError:
            raise
        except (TypeError, ValueError):
            raise DataError(f"{where}.{f.name}: {value!r} does not fit column type {t}") from None
    return out
