"""``featurerec sql``: read-only SQL on the warehouse (the spec's users explore with SQL)."""

from __future__ import annotations

from typing import Annotated, Any

import duckdb
import typer

from featurerec.cli_common import console, print_json, print_table, settings_from
from featurerec.errors import DataError

#: Statement types ``featurerec sql`` runs; everything else is refused before it runs.
READ_ONLY_STATEMENTS = frozenset({"SELECT", "EXPLAIN", "PRAGMA"})


def check_read_only(sql: str) -> str:
    """Return the single statement in ``sql`` if it only reads, else raise :class:`DataError`.

    Parsed by DuckDB itself (no regex guessing): ``SELECT``, ``WITH ... SELECT``, ``SHOW``,
    ``DESCRIBE``, ``SUMMARIZE`` and ``EXPLAIN`` pass; ``INSERT``, ``UPDATE``, ``DELETE``,
    ``CREATE``, ``DROP``, ``COPY``, ``ATTACH``, ``SET`` ... are refused.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise DataError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise DataError(f"featurerec sql runs exactly one statement (got {len(statements)})")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS or (kind == "PRAGMA" and not _safe_pragma(sql)):
        raise DataError(
            f"featurerec sql is read-only: {kind} statements are refused; "
            "use SELECT / WITH / SHOW / DESCRIBE / EXPLAIN"
        )
    return statements[0].query


def _safe_pragma(sql: str) -> bool:
    text = sql.strip().lower()
    return text.startswith(("pragma table_info", "pragma show", "pragma database_size"))


def run_sql(settings: Any, sql: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Run one read-only statement on the warehouse, opened read-only."""
    from featurerec.warehouse.engine import open_warehouse

    query = check_read_only(sql)
    with open_warehouse(settings, read_only=True) as engine:
        rows = engine.query_rows(query)
    return rows if limit is None else rows[:limit]


def register(app: typer.Typer, groups: Any) -> None:
    """Add ``featurerec sql``."""

    @app.command("sql")
    def sql_command(
        ctx: typer.Context,
        sql: Annotated[str, typer.Argument(help='One read-only statement, e.g. "SELECT ..."')],
        as_json: Annotated[bool, typer.Option("--json", help="Print rows as JSON.")] = False,
        max_rows: Annotated[
            int, typer.Option(help="Rows shown in the terminal table (JSON prints all).")
        ] = 200,
    ) -> None:
        """Run read-only SQL on the warehouse and print a table (or JSON)."""
        rows = run_sql(settings_from(ctx), sql)
        if as_json:
            print_json(rows)
            return
        print_table(rows[:max_rows])
        if len(rows) > max_rows:
            console.print(
                f"[dim]… {len(rows) - max_rows:,} more row(s); use --max-rows or --json[/dim]"
            )
