"""``featurerec evaluate``: offline evaluation of every strategy (spec Stage 4/5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from featurerec.cli_common import err_console, print_json, print_table, settings_from

COLUMNS = (
    "strategy",
    "ndcg@5",
    "hit_rate@3",
    "precision@5",
    "recall@5",
    "coverage",
    "novelty",
    "diversity_score",
    "gap_closed[ndcg@5]",
    "gap_to_perfect_closed[ndcg@5]",
    "users",
)


def evaluate_cmd(
    ctx: typer.Context,
    holdout_days: Annotated[
        int, typer.Option("--holdout-days", help="Test window after the cut (time split).")
    ] = 7,
    split: Annotated[
        str, typer.Option("--split", help="time (global cut) or last-k (per user).")
    ] = "time",
    k: Annotated[int, typer.Option("--k", help="Features held out per user (last-k).")] = 1,
    world: Annotated[
        Path | None,
        typer.Option("--world", help="Simulated world folder: adds the oracle row."),
    ] = None,
    segments: Annotated[
        bool, typer.Option("--segments/--no-segments", help="Also print per-segment tables.")
    ] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Also write rows, per-user ndcg@5 / hit_rate@3, split/training info and "
            "machine facts here.",
        ),
    ] = None,
) -> None:
    """Train on the past, rank for the held-out window, and score every strategy
    (plus random, popularity and, with --world, the oracle)."""
    from featurerec.cli_common import progress
    from featurerec.evaluation.runner import run_evaluation

    settings = settings_from(ctx)
    with progress() as bar:
        task = bar.add_task("evaluating", total=None)

        def report(done: float, total: float, msg: str) -> None:
            bar.update(task, completed=done, total=total, description=msg)

        result = run_evaluation(
            settings, split=split, holdout_days=holdout_days, k=k, world=world, progress=report
        )
    if out is not None:
        _write(out, result, world)
    if json_out:
        print_json(result.rows)
        return
    info = result.info
    err_console.print(
        f"[dim]{info.get('split')} split; {info.get('test_users', 0):,} test users, "
        f"{info.get('test_adoptions', 0):,} held-out adoptions, {info.get('features')} features; "
        f"ALS {info.get('als_params')}[/dim]"
    )
    print_table(_table(result.rows), title="offline evaluation", columns=COLUMNS)
    if segments:
        for seg in ("cold", "warm", "active"):
            rows = {
                name: row["segments"][seg]
                for name, row in result.rows.items()
                if seg in row.get("segments", {})
            }
            if rows:
                print_table(_table(rows), title=f"segment: {seg}", columns=(*COLUMNS[:-3], "users"))


def _write(path: Path, result: Any, world: Path | None) -> None:
    import json
    import os
    import platform
    from datetime import UTC, datetime

    from featurerec.cli_common import to_json

    manifest = None
    if world is not None and (world / "manifest.json").exists():
        m = json.loads((world / "manifest.json").read_text())
        manifest = {
            k: m.get(k)
            for k in ("config", "users", "events", "feature_used_events", "start", "end")
        }
    doc = {
        "rows": result.rows,
        "info": result.info,
        "per_user": result.per_user,
        "world": manifest,
        "machine": {
            "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(doc))


def _table(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"strategy": name, **{c: r.get(c) for c in COLUMNS[1:]}} for name, r in rows.items()]


def register(app: typer.Typer, groups: Any) -> None:
    """Add this package's commands to the root ``app`` / shared ``groups``."""
    app.command("evaluate")(evaluate_cmd)
