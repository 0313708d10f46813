"""Incremental import from PostgreSQL by an ``updated_at`` cursor, for databases where
logical replication is not allowed (no ``wal_level=logical``, no replication privilege).

Each mapped table is read in keyset pages ordered by ``(cursor_column, primary key)``, strictly
after the stored ``(cursor, key)`` pair, and upserted into the warehouse; the pair is stored
under the data dir after each page's warehouse commit, so a restart resumes after the last
page applied (a page re-read after a crash re-upserts identical rows: no effect).

Limits, by construction (prefer :mod:`~featurerec.events.sources.postgres_cdc` when you can):

* **deletes are invisible**: a deleted row simply stops appearing; the warehouse keeps it;
* updates that do not bump the cursor column are invisible;
* rows whose cursor column is NULL are never read;
* a transaction that commits late with an older cursor value than rows already read is missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from featurerec.config import Settings, SourceConfig
from featurerec.errors import DataError
from featurerec.events.sources.common import (
    TABLE_KEYS,
    RowChanges,
    SourceState,
    SourceUnavailable,
    utcnow,
)
from featurerec.events.sources.pgoutput import convert_text
from featurerec.events.sources.postgres_common import (
    PostgresOptions,
    RowConverter,
    connect,
    quarantine,
    split_name,
)
from featurerec.events.sources.sinks import RowWriter, write_quarantine


@dataclass
class CursorReport:
    """What one cursor sync did."""

    source: str
    upserts: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    cursors: dict[str, Any] = field(default_factory=dict)


class PostgresCursor:
    """One ``postgres_cursor`` source (see the module doc for what it cannot see)."""

    def __init__(
        self,
        name: str,
        options: PostgresOptions,
        settings: Settings,
        writer: RowWriter,
        engine: Any,
    ) -> None:
        self.name = name
        self.options = options
        self.settings = settings
        self.writer = writer
        self.engine = engine

    @classmethod
    def from_config(
        cls, name: str, source: SourceConfig, settings: Settings, writer: RowWriter, engine: Any
    ) -> PostgresCursor:
        return cls(name, PostgresOptions.from_source(name, source), settings, writer, engine)

    def sync_once(self) -> CursorReport:
        report = CursorReport(source=self.name)
        state = SourceState.load(self.settings, self.name, "postgres_cursor")
        state.last_sync_started = utcnow().isoformat()
        try:
            with connect(self.options.dsn, timeout=self.options.connect_timeout) as conn:
                conn.execute("SET TIME ZONE 'UTC'")
                for source_table, mapping in self.options.tables.items():
                    conv = RowConverter(source_table, mapping)
                    self._sync_table(conn, conv, state, report)
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(f"{self.name}: PostgreSQL connection lost: {exc}") from None
        report.cursors = dict(state.position)
        state.add_counts(upserts=sum(report.upserts.values()), quarantined=report.quarantined)
        state.last_sync_finished = utcnow().isoformat()
        state.save(self.settings)
        return report

    def _sync_table(
        self,
        conn: psycopg.Connection[Any],
        conv: RowConverter,
        state: SourceState,
        report: CursorReport,
    ) -> None:
        schema, table = split_name(conv.source_table)
        mapping = conv.mapping
        reverse = {v: k for k, v in mapping.columns.items()}
        key_cols = [reverse.get(k, k) for k in TABLE_KEYS[mapping.target]]
        cols = conn.execute(
            "SELECT attname, atttypid::int FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            (f"{schema}.{table}",),
        ).fetchall()
        if not cols:
            raise DataError(f"{self.name}: table {schema}.{table} does not exist")
        names = [c for c, _ in cols]
        for needed in [mapping.cursor_column, *key_cols]:
            if needed not in names:
                raise DataError(
                    f"{self.name}: {schema}.{table} has no column {needed!r} (cursor or key)"
                )
        order = [mapping.cursor_column, *key_cols]
        order_sql = sql.SQL(", ").join(sql.Identifier(c) for c in order)
        base = sql.SQL("SELECT {} FROM {} WHERE {} IS NOT NULL").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in names),
            sql.Identifier(schema, table),
            sql.Identifier(mapping.cursor_column),
        )
        pos_key = f"{schema}.{table}"
        while True:
            after = state.position.get(pos_key)
            params: list[Any] = []
            query = base
            if after is not None:
                marks = sql.SQL(", ").join(
                    sql.SQL("CAST({} AS {})").format(
                        sql.Placeholder(), sql.SQL(self._type_name(conn, schema, table, c))
                    )
                    for c in order
                )
                query = query + sql.SQL(" AND ({}) > ({})").format(order_sql, marks)
                params = list(after)
            query = query + sql.SQL(" ORDER BY {} LIMIT {}").format(
                order_sql, sql.Literal(self.options.batch_rows)
            )
            page = conn.execute(query, params).fetchall()
            if not page:
                return
            rows, bad = [], []
            for values in page:
                raw = {c: convert_text(v, oid) for (c, oid), v in zip(cols, values, strict=True)}
                try:
                    row = conv.convert(raw)
                    conv.key_of(row)
                    rows.append(row)
                except (DataError, ValueError) as exc:
                    bad.append(quarantine(self.name, pos_key, str(exc), raw))
            changes = RowChanges.from_rows(mapping.target, rows)
            if changes.upserts.num_rows:
                self.writer.upsert_rows(mapping.target, changes.upserts)
            report.upserts[mapping.target] = (
                report.upserts.get(mapping.target, 0) + changes.upserts.num_rows
            )
            report.quarantined += write_quarantine(self.engine, bad, self.writer)
            last = dict(zip(names, page[-1], strict=True))
            state.position[pos_key] = [last[c] for c in order]
            state.save(self.settings)
            if len(page) < self.options.batch_rows:
                return

    def _type_name(self, conn: psycopg.Connection[Any], schema: str, table: str, col: str) -> str:
        row = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = %s",
            (f"{schema}.{table}", col),
        ).fetchone()
        if row is None:
            raise DataError(f"{self.name}: {schema}.{table}.{col} not found")
        return str(row[0])
