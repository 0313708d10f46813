"""The SQL engine interface and its embedded default, DuckDB.

Transforms are written once, in DuckDB's dialect, as ``.sql`` files under
``featurerec/warehouse/sql`` (and the ``sql`` folders of ``analysis`` and ``feedback``).
Parameters are bound (``$as_of``, ``$days``), never formatted into the text. Another engine
(Spark, Trino) implements :class:`SQLEngine` and receives the same text transpiled by
sqlglot (:func:`transpile`).

Example::

    >>> from featurerec.warehouse.engine import DuckDBEngine
    >>> with DuckDBEngine(":memory:") as db:
    ...     db.query_rows("SELECT 1 + $x AS y", {"x": 1})
    [{'y': 2}]
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import duckdb
import pyarrow as pa
import sqlglot

from featurerec.warehouse.schema import all_ddl

SQL_DIALECT = "duckdb"


class WarehouseError(RuntimeError):
    """A warehouse operation failed; the message says which table or statement."""


@runtime_checkable
class SQLEngine(Protocol):
    """What every stage needs from a SQL engine."""

    dialect: str

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None: ...

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table: ...

    def query_rows(
        self, sql: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]: ...

    def table_exists(self, name: str) -> bool: ...

    def close(self) -> None: ...


def transpile(sql: str, to_dialect: str) -> str:
    """Translate featurerec's DuckDB SQL into another dialect with sqlglot."""
    if to_dialect == SQL_DIALECT:
        return sql
    return ";\n".join(sqlglot.transpile(sql, read=SQL_DIALECT, write=to_dialect))


def load_sql(name: str, package: str = "featurerec.warehouse") -> str:
    """Read ``sql/<name>.sql`` shipped in ``package``."""
    fname = name if name.endswith(".sql") else f"{name}.sql"
    try:
        return (resources.files(package) / "sql" / fname).read_text()
    except FileNotFoundError:
        raise WarehouseError(f"unknown SQL file {fname!r} in {package}/sql") from None


class DuckDBEngine:
    """DuckDB-backed :class:`SQLEngine`. One connection per engine; thread-safe via a lock.

    ``read_only=True`` opens the file without taking the writer lock, so ``featurerec sql``
    and reports can run while nothing writes.
    """

    dialect = SQL_DIALECT

    def __init__(
        self,
        path: str | Path = ":memory:",
        *,
        read_only: bool = False,
        memory_limit: str | None = None,
        threads: int | None = None,
        init_schema: bool = True,
    ) -> None:
        self.path = str(path)
        self.read_only = read_only
        if self.path != ":memory:":
            p = Path(self.path)
            if read_only and not p.exists():
                raise WarehouseError(
                    f"warehouse {p} does not exist yet: run `featurerec ingest` first"
                )
            p.parent.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {}
        if memory_limit:
            config["memory_limit"] = memory_limit
        if threads:
            config["threads"] = threads
        try:
            self.conn = duckdb.connect(self.path, read_only=read_only, config=config)
        except duckdb.IOException as exc:
            raise WarehouseError(f"cannot open warehouse {self.path}: {exc}") from None
        self._lock = threading.RLock()
        if init_schema and not read_only:
            for ddl in all_ddl():
                self.conn.execute(ddl)

    # -- SQLEngine -----------------------------------------------------------------------
    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._run(sql, params)

    def query_arrow(self, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        with self._lock:
            try:
                rel = self.conn.sql(sql, params=dict(params) if params else None)
                return rel.to_arrow_table() if rel is not None else pa.table({})
            except duckdb.Error as exc:
                raise _wrap(exc) from None

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._run(sql, params)
            cols = [d[0] for d in cur.description or []]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        with self._lock:
            # fetchall, not fetchone: a partly read result keeps the connection busy and
            # a later register_arrow() fails with "unfinished result".
            rows = self._run(sql, params).fetchall()
            return rows[0][0] if rows else None

    def table_exists(self, name: str) -> bool:
        schema, _, table = name.rpartition(".")
        rows = self.query_rows(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = $s AND table_name = $t",
            {"s": schema or "main", "t": table},
        )
        return bool(rows)

    def register_arrow(self, name: str, table: pa.Table) -> None:
        """Expose an Arrow table to SQL under ``name`` (for bulk inserts)."""
        with self._lock:
            self.conn.register(name, table)

    def unregister(self, name: str) -> None:
        with self._lock:
            self.conn.unregister(name)

    @contextmanager
    def transaction(self) -> Iterator[DuckDBEngine]:
        """All statements inside commit together or not at all."""
        with self._lock:
            self.conn.execute("BEGIN TRANSACTION")
            try:
                yield self
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> DuckDBEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _run(self, sql: str, params: Mapping[str, Any] | None) -> duckdb.DuckDBPyConnection:
        try:
            if params:
                return self.conn.execute(sql, dict(params))
            return self.conn.execute(sql)
        except duckdb.Error as exc:
            raise _wrap(exc) from None


def _wrap(exc: duckdb.Error) -> WarehouseError:
    if isinstance(exc, duckdb.CatalogException):
        return WarehouseError(f"{_first_line(exc)} (is the data ingested?)")
    return WarehouseError(f"{type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def open_warehouse(settings: Any, *, read_only: bool = False) -> DuckDBEngine:
    """The one factory for the configured engine (only DuckDB is embedded today)."""
    wh = settings.warehouse
    return DuckDBEngine(
        settings.warehouse_path,
        read_only=read_only,
        memory_limit=wh.memory_limit,
        threads=wh.threads,
    )
