"""``featurerec sources …``: external sources (Kafka, PostgreSQL CDC / cursor, Zendesk,
the Segment HTTP intake's landing) — run them, schedule them, see how they are doing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from featurerec.cli_common import err_console, fmt, print_json, print_table, settings_from, to_json

sources_app = typer.Typer(
    help="External sources: Kafka, PostgreSQL CDC, Zendesk, Segment intake; sync and status.",
    no_args_is_help=True,
)


def register(app: typer.Typer, groups: Any) -> None:
    """Add ``featurerec sources`` to the root ``app``, and ``featurerec ingest kafka`` (the
    issue's name for the same command) to the ``ingest`` group when it has no ``kafka``."""
    app.add_typer(sources_app, name="sources")
    for group in app.registered_groups:
        if group.name == "ingest" and group.typer_instance is not None:
            names = {c.name for c in group.typer_instance.registered_commands}
            if "kafka" not in names:
                group.typer_instance.command("kafka", help=kafka_cmd.__doc__)(kafka_cmd)


def _open(settings: Any) -> tuple[Any, Any]:
    from featurerec.events.ingest import Ingestor
    from featurerec.warehouse.engine import open_warehouse

    engine = open_warehouse(settings)
    return engine, Ingestor(engine, settings)


@sources_app.command("kafka")
def kafka_cmd(
    ctx: typer.Context,
    source: Annotated[
        str | None, typer.Option(help="A kafka source in the config to take options from.")
    ] = None,
    bootstrap_servers: Annotated[str | None, typer.Option("--bootstrap-servers", "-b")] = None,
    topic_pattern: Annotated[
        str | None,
        typer.Option(help=r"Glob or ^regex (default: segment.cloudflow.events.*)."),
    ] = None,
    group: Annotated[str | None, typer.Option(help="Consumer group id.")] = None,
    sink: Annotated[
        str | None,
        typer.Option(help="landing (default; for a warehouse another process owns) or warehouse."),
    ] = None,
    max_messages: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    idle_timeout: Annotated[
        float | None, typer.Option(help="Stop when nothing arrives for this many seconds.")
    ] = None,
    kafka_config: Annotated[
        list[str] | None,
        typer.Option("-X", "--kafka-config", help="librdkafka setting KEY=VALUE (repeatable)."),
    ] = None,
) -> None:
    """Consume Kafka topics into featurerec (at-least-once + dedupe; SIGTERM stops cleanly)."""
    from rich.live import Live

    from featurerec.config import SourceConfig
    from featurerec.events.sources.kafka import KafkaIngest, KafkaOptions, KafkaProgress

    settings = settings_from(ctx)
    name = source or "kafka"
    base: dict[str, Any] = {}
    if source is not None:
        cfg = settings.sources.get(source)
        if cfg is None or cfg.kind != "kafka":
            raise typer.BadParameter(f"no kafka source named {source!r} in the config")
        base = dict(cfg.options)
    overrides = {
        "bootstrap_servers": bootstrap_servers,
        "topic_pattern": topic_pattern,
        "group_id": group,
        "sink": sink,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    for item in kafka_config or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"-X expects KEY=VALUE (got {item!r})")
        base["config"] = {**base.get("config", {}), key.strip(): value.strip()}
    options = KafkaOptions.from_source(name, SourceConfig(kind="kafka", options=base))
    engine = None
    if options.sink == "warehouse":
        engine, ingestor = _open(settings)
        write = ingestor.append
    else:
        from featurerec.events.landing import Landing

        write = Landing.for_settings(settings).write

    def line(p: KafkaProgress) -> str:
        lag = f"lag {fmt(p.total_lag)}" if p.lag else "lag ?"
        err = f"  [yellow]broker: {p.broker_error}[/yellow]" if p.broker_error else ""
        return (
            f"[bold]{name}[/bold] consumed {fmt(p.consumed)}  "
            f"{fmt(p.rate)} msg/s  accepted {fmt(p.accepted)}  filtered {fmt(p.filtered)}  "
            f"quarantined {fmt(p.quarantined)}  {lag}{err}"
        )

    with Live(line(KafkaProgress()), console=err_console, refresh_per_second=4) as live:
        ingest = KafkaIngest(
            name, options, settings, write, on_progress=lambda p: live.update(line(p))
        )
        ingest.install_signal_handlers()
        try:
            progress = ingest.run(max_messages=max_messages, idle_timeout=idle_timeout)
        finally:
            if engine is not None:
                engine.close()
    print_json(
        {
            "source": name,
            "consumed": progress.consumed,
            "accepted": progress.accepted,
            "filtered": progress.filtered,
            "duplicates": progress.duplicates,
            "quarantined": progress.quarantined,
            "batches": progress.batches,
            "messages_per_second": round(progress.rate, 1),
            "lag": progress.total_lag,
        }
    )


@sources_app.command("sync")
def sync_cmd(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Run every source once and exit.")] = False,
    only: Annotated[
        list[str] | None, typer.Option("--source", "-s", help="Only these sources.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the outcomes as JSON.")] = False,
) -> None:
    """Run every configured source at its frequency (--once: each once, now).

    A source that fails is reported and retried with backoff; exit code 3 after --once when
    any source failed.
    """
    import signal

    from featurerec.events.sources.scheduler import Scheduler, SyncOutcome

    settings = settings_from(ctx)
    if not settings.sources:
        err_console.print("[yellow]no sources configured ([sources.NAME] in featurerec.toml)[/]")
        raise typer.Exit(0)
    scheduler = Scheduler(settings, only=only or None)
    engine, ingestor = _open(settings)

    def show(outcomes: list[SyncOutcome]) -> None:
        if json_out:
            print_json(outcomes)
            return
        print_table(
            [
                {
                    "source": o.name,
                    "kind": o.kind,
                    "ok": "yes" if o.ok else "NO",
                    "seconds": round(o.seconds, 2),
                    "result": _err(o.error) if o.error else _compact(o.summary),
                    "retry at": (o.next_attempt_at or "")[11:19],
                }
                for o in outcomes
            ],
            title=f"sources sync {time.strftime('%H:%M:%S')}",
        )

    try:
        if once:
            outcomes = scheduler.run_once(ingestor, engine, force=True)
            show(outcomes)
            if any(not o.ok for o in outcomes):
                raise typer.Exit(3)
            return
        signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
        signal.signal(signal.SIGINT, lambda *_: scheduler.stop())
        err_console.print(
            f"syncing {', '.join(scheduler.sources)}; Ctrl-C / SIGTERM stops after the current source"
        )
        scheduler.run_forever(ingestor, engine, on_turn=show)
    finally:
        engine.close()


def _short(summary: dict[str, Any]) -> str:
    text = to_json(summary).replace("\n", " ")
    text = " ".join(text.split())
    return text if len(text) < 120 else text[:117] + "..."


def _compact(summary: dict[str, Any], limit: int = 60) -> str:
    """``{"upserts": {"users": 2}, "lsn": "0/1"}`` → ``upserts=2 lsn=0/1`` (numbers summed)."""
    parts = []
    for key, value in summary.items():
        if isinstance(value, dict):
            nums = [
                v for v in value.values() if isinstance(v, int | float) and not isinstance(v, bool)
            ]
            if not nums:
                continue
            value = sum(nums)
        if value in (None, 0, [], "") or isinstance(value, list):
            continue
        parts.append(f"{key}={fmt(value)}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _err(error: str, limit: int = 70) -> str:
    """An error without its timestamp prefix, cut to ``limit`` characters."""
    text = error.split(" ", 1)[1] if error[:4].isdigit() and " " in error else error
    return text if len(text) <= limit else text[: limit - 1] + "…"


@sources_app.command("status")
def status_cmd(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Last sync, lag, counts and errors of every configured source."""
    from featurerec.events.sources.scheduler import status_rows

    settings = settings_from(ctx)
    rows = status_rows(settings)
    if json_out:
        print_json(rows)
        return
    print_table(
        [
            {
                "source": r["source"],
                "kind": r["kind"],
                "every": "real-time" if r["every_seconds"] == 0 else f"{r['every_seconds']} s",
                "last success": (r["last_success"] or "never")[:19].replace("T", " "),
                "lag": _compact(r["lag"], 30) if r["lag"] else "",
                "counts": _compact(r["counts"], 40) if r["counts"] else "",
                "failures": r["consecutive_failures"],
                "last error": _err(r["last_error"], 50) if r["last_error"] else "",
            }
            for r in rows
        ],
        title="sources",
    )


@sources_app.command("zendesk-import")
def zendesk_import_cmd(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="Zendesk JSON export files.", exists=True)],
    source: Annotated[str, typer.Option(help="The zendesk source (feature topics).")] = "zendesk",
) -> None:
    """Import support tickets from Zendesk export files (NDJSON / JSON)."""
    from featurerec.events.sources.zendesk import ZendeskTickets

    settings = settings_from(ctx)
    cfg = settings.sources.get(source)
    if cfg is None or cfg.kind != "zendesk":
        raise typer.BadParameter(f"no zendesk source named {source!r} in the config")
    engine, ingestor = _open(settings)
    try:
        report = ZendeskTickets.from_config(source, cfg, settings, ingestor, engine).import_files(
            files
        )
    finally:
        engine.close()
    print_json(report)
