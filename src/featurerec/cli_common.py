"""Pieces every CLI sub-command shares: settings from the global options, output as a
rich table or JSON, and progress bars."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from featurerec.config import Settings, load_settings


def _console(stderr: bool = False) -> Console:
    # Piped output (make demo, CI logs) would default to 80 columns and truncate tables.
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=160)


console = _console()
err_console = _console(stderr=True)


def settings_from(ctx: typer.Context) -> Settings:
    """The settings built from ``--config`` / ``--data-dir`` on the root command."""
    root = ctx.find_root()
    obj = root.obj or {}
    if "settings" not in obj:
        obj["settings"] = load_settings(obj.get("config"), data_dir=obj.get("data_dir"))
        root.obj = obj
    settings: Settings = obj["settings"]
    return settings


def _default(o: Any) -> Any:
    if isinstance(o, datetime | date):
        return o.isoformat()
    if isinstance(o, Decimal):
        return float(o)
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    return orjson.dumps(
        obj, default=_default, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
    ).decode()


def print_json(obj: Any) -> None:
    """Print JSON on stdout, nothing else (for scripts)."""
    typer.echo(to_json(obj))


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def print_table(
    rows: Sequence[Mapping[str, Any]],
    title: str | None = None,
    columns: Sequence[str] | None = None,
) -> None:
    """Print rows as a table; columns default to the first row's keys."""
    cols = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title, title_justify="left", header_style="bold")
    for c in cols:
        table.add_column(c, justify="right" if rows and _numeric(rows[0].get(c)) else "left")
    for r in rows:
        table.add_row(*[fmt(r.get(c)) for c in cols])
    if not rows:
        console.print(f"[dim]{title or 'result'}: no rows[/dim]")
        return
    console.print(table)


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float | Decimal) and not isinstance(v, bool)


def progress(transient: bool = True) -> Progress:
    """A progress bar on stderr for long work."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=transient,
    )


def fail(message: str, code: int = 2) -> None:
    """Print an error the user can act on and exit with ``code``."""
    err_console.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code)


def echo_lines(lines: Iterable[str]) -> None:
    for line in lines:
        console.print(line)
