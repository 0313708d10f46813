"""``featurerec ingest``: load files, simulated worlds and the landing zone into the warehouse.

``featurerec ingest PATH...`` loads NDJSON / Parquet / CSV files and directories (a
directory written by ``featurerec simulate`` loads as a whole world);
``featurerec ingest landing`` drains the landing zone the server and Kafka consumer write to.
Other packages add sub-commands to :data:`ingest_app` (e.g. ``featurerec ingest kafka``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from featurerec.cli_common import err_console, print_json, print_table, progress, settings_from
from featurerec.errors import DataError


class _PathsByDefault(TyperGroup):
    """A group whose unknown first word is a PATH for the default ``files`` command, so that
    ``featurerec ingest data/ more.ndjson`` and ``featurerec ingest landing`` both work."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["files", *args]
        return super().parse_args(ctx, args)


ingest_app = typer.Typer(
    cls=_PathsByDefault,
    help="Load events and product tables into the warehouse: files, a simulated world "
    "(featurerec ingest PATH...), or the landing zone (featurerec ingest landing).",
    no_args_is_help=True,
)


def parse_mapping(items: list[str] | None) -> dict[str, str] | None:
    """``["user_id=uid", "timestamp=ts"]`` -> ``{"user_id": "uid", "timestamp": "ts"}``."""
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise DataError(f"--map expects FIELD=COLUMN, e.g. --map user_id=uid (got {item!r})")
        out[field.strip()] = column.strip()
    return out


def _show(report: Any, as_json: bool, title: str) -> None:
    if as_json:
        print_json(report.to_dict())
        return
    print_table(
        [
            {
                "received": report.received,
                "accepted": report.accepted,
                "duplicate": report.duplicate,
                "filtered": report.filtered,
                "quarantined": report.quarantined,
                "batches": report.batches,
                "seconds": round(report.seconds, 2),
                "events/s": round(report.events_per_second),
            }
        ],
        title=title,
    )
    if report.files:
        print_table(
            [
                {
                    "file": f.path,
                    "kind": f.kind,
                    "received": f.received,
                    "accepted": f.accepted,
                    "duplicate": f.duplicate,
                    "filtered": f.filtered,
                    "quarantined": f.quarantined,
                    "rows upserted": f.rows,
                }
                for f in report.files
            ],
            title="per file",
        )
    if report.quarantined:
        err_console.print(
            f"[yellow]{report.quarantined:,} record(s) quarantined[/yellow]: see "
            '`featurerec sql "SELECT location, reason FROM ingest_quarantine '
            'ORDER BY quarantined_at DESC LIMIT 20"`'
        )


@ingest_app.command("files")
def ingest_files(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(help="Files (.ndjson/.jsonl/.json, .parquet, .csv; .gz ok) or directories."),
    ],
    map_: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            help="Column mapping FIELD=COLUMN for shapes that are not the spec's, "
            "e.g. --map user_id=uid --map timestamp=ts (repeatable).",
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(help="Source name stored with the events (default: file / simulate)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Load event files, product-table files or a `featurerec simulate` directory."""
    from featurerec.events.ingest import Ingestor
    from featurerec.warehouse.engine import open_warehouse

    settings = settings_from(ctx)
    mapping = parse_mapping(map_)
    with open_warehouse(settings) as engine:
        ingestor = Ingestor(engine, settings)
        plan = ingestor.plan_paths(paths)  # fails early on missing paths / unknown formats
        total = sum(_size(p.world or p.path) for p in plan)
        with progress() as bar:
            task = bar.add_task("ingesting", total=total or None)
            report = ingestor.ingest_paths(
                paths,
                mapping,
                source=source,
                on_progress=lambda n: bar.advance(task, n),
            )
    _show(report, as_json, "ingested")


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(
        f.stat().st_size for f in p.rglob("*") if f.is_file() and "ground_truth" not in f.parts
    )


@ingest_app.command("landing")
def ingest_landing(
    ctx: typer.Context,
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Landing zone (default: <data dir>/landing)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Load what the server / Kafka consumer landed (idempotent; files move to done/)."""
    from featurerec.events.ingest import Ingestor
    from featurerec.events.landing import Landing
    from featurerec.warehouse.engine import open_warehouse

    settings = settings_from(ctx)
    landing = Landing(directory) if directory else Landing.for_settings(settings)
    with open_warehouse(settings) as engine:
        report = landing.drain(Ingestor(engine, settings))
    _show(report, as_json, f"drained {landing.root}")


def register(app: typer.Typer, groups: Any) -> None:
    """Add ``featurerec ingest`` to the root app."""
    app.add_typer(ingest_app, name="ingest")
