"""``featurerec pipeline run | history | show | schedule | validate | build-features``."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from featurerec.cli_common import (
    console,
    err_console,
    print_json,
    print_table,
    progress,
    settings_from,
)
from featurerec.config import Settings
from featurerec.errors import FeaturerecError

app = typer.Typer(
    help="The daily training pipeline (spec Stage 4): run, history, show, schedule.",
    no_args_is_help=True,
)

SpecOpt = Annotated[
    str | None,
    typer.Option(
        "--spec",
        help="Pipeline JSON (default: settings pipeline.spec; builtin:NAME for shipped ones).",
    ),
]
AsOfOpt = Annotated[
    str | None,
    typer.Option("--as-of", help="Windows end here (ISO time; default: latest event)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of the tree/table.")]


class RichSink:
    """Progress bars on stderr fed by StageContext.progress; one line per finished stage."""

    def __init__(self) -> None:
        self.bar = progress(transient=True)
        self.tasks: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichSink:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def stage_started(self, name: str, attempt: int) -> None:
        label = name if attempt == 1 else f"{name} (attempt {attempt})"
        with self._lock:
            if name in self.tasks:
                self.bar.remove_task(self.tasks[name])
            self.tasks[name] = self.bar.add_task(label, total=None)

    def stage_progress(self, name: str, done: float, total: float, message: str) -> None:
        with self._lock:
            task = self.tasks.get(name)
            if task is not None:
                desc = f"{name}: {message}" if message else name
                self.bar.update(task, completed=done, total=total or None, description=desc)

    def stage_finished(self, name: str, record: Any) -> None:
        from featurerec.pipeline.tree import fmt_duration

        with self._lock:
            task = self.tasks.pop(name, None)
            if task is not None:
                self.bar.remove_task(task)
        err_console.print(
            f"[dim]{name}: {record.status}"
            + (f" in {fmt_duration(record.duration_s)}" if record.duration_s is not None else "")
            + "[/dim]"
        )


def _spec_path(settings: Settings, spec: str | None) -> str:
    return spec or settings.pipeline.spec


def _run(
    settings: Settings,
    spec_arg: str | None,
    as_of: str | None,
    resume: str | None,
    scheduled_for: datetime | None = None,
) -> Any:
    from featurerec.pipeline.history import RunHistory
    from featurerec.pipeline.runner import PipelineRunner
    from featurerec.pipeline.spec import load_spec
    from featurerec.registry import registry_for
    from featurerec.warehouse.engine import open_warehouse

    history = RunHistory.for_settings(settings)
    source = _spec_path(settings, spec_arg)
    spec = load_spec(source, settings) if resume is None else None
    engine = open_warehouse(settings)
    try:
        with RichSink() as sink:
            runner = PipelineRunner(
                spec if spec is not None else _placeholder_spec(history, resume),
                settings,
                engine,
                registry_for(settings),
                history,
                sink=sink,
                spec_source=source,
            )
            if resume is not None:
                return runner.resume(resume)
            return runner.run(as_of, scheduled_for=scheduled_for)
    finally:
        engine.close()


def _placeholder_spec(history: Any, run_id: str | None) -> Any:
    from featurerec.pipeline.spec import parse_spec

    record = history.load(run_id or "latest")
    spec_dir = Path(record.spec_dir) if record.spec_dir else None
    return parse_spec(record.spec, spec_dir=spec_dir, source=f"run {record.run_id}")


def _print_run(record: Any, as_json: bool) -> None:
    from featurerec.pipeline.tree import render_tree

    if as_json:
        print_json(record.model_dump(mode="json"))
        return
    for line in render_tree(record):
        console.print(line, highlight=False, markup=False)


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    spec: SpecOpt = None,
    as_of: AsOfOpt = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Rerun the failed/skipped stages of RUN_ID ('latest' ok)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the pipeline once and print the execution tree (exit 1 if a stage failed)."""
    settings = settings_from(ctx)
    record = _run(settings, spec, as_of, resume)
    _print_run(record, as_json)
    if record.status != "passed":
        raise typer.Exit(1)


@app.command("history")
def history_cmd(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Most recent N runs.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recorded runs, most recent first."""
    from featurerec.pipeline.history import RunHistory

    runs = RunHistory.for_settings(settings_from(ctx)).list(limit)
    rows = [r.summary_row() for r in runs]
    if as_json:
        print_json(rows)
    else:
        print_table(rows, title="pipeline runs")


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="Run id, or 'latest'.")] = "latest",
    as_json: JsonOpt = False,
) -> None:
    """The execution tree of one recorded run."""
    from featurerec.pipeline.history import RunHistory

    _print_run(RunHistory.for_settings(settings_from(ctx)).load(run_id), as_json)


@app.command("validate")
def validate_cmd(ctx: typer.Context, spec: SpecOpt = None) -> None:
    """Check a pipeline spec and print its stages in run order."""
    from featurerec.pipeline.spec import load_spec

    settings = settings_from(ctx)
    ps = load_spec(_spec_path(settings, spec), settings)
    rows = [
        {
            "stage": n,
            "type": ps.stage(n).type,
            "runs": ps.stage(n).function_name or ps.stage(n).query_ref or "",
            "after": ", ".join(ps.deps(n)),
        }
        for n in ps.order()
    ]
    print_table(rows, title=f"{ps.name}: {len(rows)} stages, schedule {ps.schedule or '-'}")


@app.command("schedule")
def schedule_cmd(
    ctx: typer.Context,
    spec: SpecOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Run once now, then exit.")] = False,
    max_runs: Annotated[
        int | None, typer.Option("--max-runs", help="Stop after N scheduled runs.")
    ] = None,
) -> None:
    """Run the pipeline at its cron times (UTC), in the foreground, until interrupted."""
    from featurerec.pipeline.schedule import run_schedule
    from featurerec.pipeline.spec import load_spec

    settings = settings_from(ctx)
    ps = load_spec(_spec_path(settings, spec), settings)
    if not ps.schedule and not once:
        raise FeaturerecError(f"pipeline {ps.name!r} has no 'schedule' (use --once)")

    def run_once(fire: datetime) -> None:
        try:
            record = _run(settings, spec, None, None, scheduled_for=fire)
        except FeaturerecError as exc:
            err_console.print(f"[red]run at {fire:%Y-%m-%d %H:%M} failed to start:[/red] {exc}")
            return
        _print_run(record, False)

    def on_wait(fire: datetime) -> None:
        err_console.print(f"[dim]{ps.name}: next run at {fire:%Y-%m-%d %H:%M} UTC[/dim]")

    run_schedule(
        ps.schedule or "* * * * *", run_once, once=once, max_runs=max_runs, on_wait=on_wait
    )


@app.command("build-features")
def build_features_cmd(ctx: typer.Context, as_of: AsOfOpt = None, as_json: JsonOpt = False) -> None:
    """Only the Stage 3 transforms (all ml.* feature tables), with row counts."""
    from featurerec.warehouse.engine import open_warehouse
    from featurerec.warehouse.transforms import build_features

    settings = settings_from(ctx)
    engine = open_warehouse(settings)
    try:
        with progress() as bar:
            task = bar.add_task("transforms", total=None)
            counts = build_features(
                engine,
                settings,
                as_of,
                progress=lambda d, t, m: bar.update(task, completed=d, total=t, description=m),
            )
    finally:
        engine.close()
    if as_json:
        print_json(counts)
    else:
        print_table([{"table": k, "rows": v} for k, v in counts.items()], title="Stage 3 tables")


def register(app_root: typer.Typer, groups: Any) -> None:
    """Add ``featurerec pipeline ...``."""
    app_root.add_typer(app, name="pipeline")
