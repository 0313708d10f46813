"""``featurerec simulate``: generate a CloudFlow world, and ``simulate calibrate DIR``.

The group callback generates the world (``invoke_without_command=True``), so other packages
can add sub-commands to the same group (``simulate experiment`` from the feedback loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from featurerec.cli_common import console, err_console, print_json, print_table, progress


def _print_calibration(report: Any) -> None:
    from featurerec.simulate.calibration import report_rows

    print_table(
        report_rows(report),
        title=f"Calibration vs spec (30 days to {report.as_of}, "
        f"{report.active_users_30d:,} active users)",
    )
    verdict = (
        "[green]all within bounds[/green]"
        if report.ok
        else "[yellow]some figures out of bounds[/yellow]"
    )
    console.print(f"calibration: {verdict}")


def simulate(
    ctx: typer.Context,
    users: Annotated[int, typer.Option("--users", help="Users in the world.")] = 5000,
    days: Annotated[int, typer.Option("--days", help="Simulated days (ending at --end).")] = 60,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same world).")] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output directory (created; must be empty or a world)."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="Event file format: parquet or ndjson.")
    ] = "parquet",
    features: Annotated[
        int,
        typer.Option(
            "--features", help="Catalog size: 12 core features plus generated sub-features."
        ),
    ] = 12,
    end: Annotated[
        str, typer.Option("--end", help="First day after the window (YYYY-MM-DD).")
    ] = "2026-03-01",
    activity: Annotated[
        float,
        typer.Option("--activity", help="Activity multiplier (sessions and events per session)."),
    ] = 1.0,
    calibration: Annotated[
        bool, typer.Option("--calibration/--no-calibration", help="Print the calibration report.")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print manifest + calibration as JSON.")
    ] = False,
) -> None:
    """Generate a CloudFlow world: events, product tables and hidden ground truth.

    Default: 5,000 users x 60 days (about 1M events, 0.33M feature_used; a few seconds).
    Sub-commands: calibrate.
    """
    if ctx.invoked_subcommand is not None:
        return
    from datetime import date

    from featurerec.errors import DataError
    from featurerec.simulate.calibration import calibrate
    from featurerec.simulate.params import WorldParams
    from featurerec.simulate.world import WorldConfig, generate_world

    if out is None:
        raise DataError("simulate needs --out DIR (where the world is written)")
    if fmt not in ("parquet", "ndjson"):
        raise DataError(f"--format must be parquet or ndjson (got {fmt!r})")
    try:
        end_date = date.fromisoformat(end)
    except ValueError:
        raise DataError(f"--end must be YYYY-MM-DD (got {end!r})") from None
    if activity <= 0:
        raise DataError(f"--activity must be > 0 (got {activity})")
    config = WorldConfig(
        users=users,
        days=days,
        seed=seed,
        features=features,
        end_date=end_date,
        params=WorldParams(activity_scale=activity),
    )
    world = generate_world(config)
    with progress() as bar:
        task = bar.add_task(
            f"simulating {users:,} users x {days} days", total=len(world.chunks) * days
        )
        manifest = world.write(
            out,
            fmt,  # type: ignore[arg-type]
            on_progress=lambda done, total: bar.update(task, completed=done),
        )
    report = calibrate(out) if calibration else None
    if report is not None:
        import json

        (out / "calibration.json").write_text(json.dumps(report.to_dict(), indent=2))
    if as_json:
        print_json({"manifest": manifest, "calibration": report.to_dict() if report else None})
        return
    err_console.print(
        f"wrote {manifest.events:,} events ({manifest.feature_used_events:,} feature_used, "
        f"{manifest.event_types} event types), {manifest.users:,} users, "
        f"{manifest.workspaces:,} workspaces to {out} in {manifest.seconds:.1f}s "
        f"({manifest.events_per_second:,.0f} events/s)"
    )
    if report is not None:
        _print_calibration(report)


def calibrate_cmd(
    world: Annotated[Path, typer.Argument(help="A directory written by `featurerec simulate`.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """Compare a simulated world's product figures with the spec's (adoption, transitions,
    cold start, features per workspace)."""
    from featurerec.simulate.calibration import calibrate

    report = calibrate(world)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_calibration(report)


def register(app: typer.Typer, groups: Any) -> None:
    """``simulate`` (group callback) and ``simulate calibrate``."""
    groups.simulate.callback(invoke_without_command=True)(simulate)
    groups.simulate.command("calibrate")(calibrate_cmd)
