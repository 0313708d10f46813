"""What the two PostgreSQL modes share: typed options, table mapping, row conversion.

Product tables map to the warehouse's raw tables (``users``, ``workspaces``,
``feature_flags``, ``ab_assignments``). Columns map by name, with optional renames per table;
for a target with a ``traits`` column (``users``) the source columns that map to nothing are
kept as JSON in ``traits`` so no attribute a product stores is lost; for other targets they are
dropped. Rows whose values do not fit the warehouse types are quarantined with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from featurerec.config import SourceConfig
from featurerec.errors import DataError
from featurerec.events.sources.common import (
    TABLE_KEYS,
    QuarantinedRecord,
    SourceUnavailable,
    coerce_row,
    raw_text,
    warehouse_schema,
)

CDCTable = Literal["users", "workspaces", "feature_flags", "ab_assignments"]


class TableMapping(BaseModel):
    """One product table → one warehouse table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Warehouse table the rows land in.
    target: CDCTable
    #: Source column → warehouse column renames.
    columns: dict[str, str] = Field(default_factory=dict)
    #: Cursor mode only: the monotonically increasing "last changed" column.
    cursor_column: str = "updated_at"


def _default_tables() -> dict[str, TableMapping]:
    return {
        "public.users": TableMapping(target="users"),
        "public.workspaces": TableMapping(target="workspaces"),
        "public.feature_flags": TableMapping(target="feature_flags"),
        "public.ab_assignments": TableMapping(target="ab_assignments", cursor_column="assigned_at"),
    }


class PostgresOptions(BaseModel):
    """``[sources.NAME.options]`` of a ``postgres_cdc`` or ``postgres_cursor`` source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: libpq connection string, e.g. ``host=db port=5432 dbname=product user=featurerec``.
    dsn: str
    #: ``schema.table`` → mapping. Defaults to the four spec tables in ``public``.
    tables: dict[str, TableMapping] = Field(default_factory=_default_tables)
    #: CDC: replication slot and publication names.
    slot: str = Field(default="featurerec", pattern=r"^[a-z0-9_]{1,63}$")
    publication: str = Field(default="featurerec", pattern=r"^[a-z0-9_]{1,63}$")
    #: CDC: create the publication when it is missing (needs table ownership).
    create_publication: bool = True
    #: CDC: most changes read per poll (whole transactions; a poll may exceed it slightly).
    max_changes: int = Field(default=100_000, gt=0)
    #: Rows per fetch for snapshots and cursor pages.
    batch_rows: int = Field(default=50_000, gt=0)
    connect_timeout: int = Field(default=5, gt=0)

    @classmethod
    def from_source(cls, name: str, source: SourceConfig) -> PostgresOptions:
        try:
            return cls.model_validate(source.options)
        except ValidationError as exc:
            errs = "; ".join(
                f"sources.{name}.options.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors()
            )
            raise DataError(errs) from None


def split_name(qualified: str) -> tuple[str, str]:
    """``'public.users'`` → ``('public', 'users')``; a bare name is in ``public``."""
    schema, _, table = qualified.rpartition(".")
    return (schema or "public", table)


@dataclass(frozen=True)
class RowConverter:
    """Turns source rows (column → Python value) into warehouse rows for one mapping."""

    source_table: str
    mapping: TableMapping

    def convert(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Rename, fold extras into ``traits`` where the target has it, coerce types."""
        schema = warehouse_schema(self.mapping.target)
        out: dict[str, Any] = {}
        extras: dict[str, Any] = {}
        for col, value in row.items():
            target = self.mapping.columns.get(col, col)
            if target in schema.names:
                out[target] = value
            else:
                extras[col] = value
        if "traits" in schema.names and extras and "traits" not in out:
            out["traits"] = orjson.dumps(extras, default=str).decode()
        return coerce_row(out, schema, where=f"{self.source_table}")

    def key_of(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """The warehouse key of a converted row; DataError if a key column is null."""
        keys = TABLE_KEYS[self.mapping.target]
        values = tuple(row.get(k) for k in keys)
        if any(v is None for v in values):
            raise DataError(f"{self.source_table}: key {keys} is null in {raw_text(row, 300)}")
        return values


def quarantine(source: str, location: str, reason: str, raw: Any) -> QuarantinedRecord:
    return QuarantinedRecord(source=source, location=location, reason=reason, raw=raw_text(raw))


def connect(dsn: str, *, timeout: int, replication: bool = False) -> psycopg.Connection[Any]:
    """Open an autocommit connection; an unreachable server is :class:`SourceUnavailable`."""
    conninfo = psycopg.conninfo.make_conninfo(
        dsn, connect_timeout=timeout, **({"replication": "database"} if replication else {})
    )
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceUnavailable(f"PostgreSQL unreachable ({_redact(dsn)}): {first}") from None


def _redact(dsn: str) -> str:
    parts = []
    for token in dsn.split():
        k, _, _ = token.partition("=")
        parts.append(f"{k}=***" if k.lower() == "password" else token)
    return " ".join(parts)
