"""CLI commands of this package (registered by featurerec.cli): ``featurerec report bias |
cold-start | diversity | impact`` (LOOP) and ``report discovery`` (INGEST, registered by
:mod:`featurerec.analysis.discovery` when present)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer

from featurerec.cli_common import console, fmt, print_json, print_table, settings_from

Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
AsOf = Annotated[
    datetime | None,
    typer.Option("--as-of", help="Windows end here (UTC); default: latest in the warehouse."),
]


def _open(ctx: typer.Context) -> tuple[Any, Any]:
    from featurerec.warehouse.engine import open_warehouse

    settings = settings_from(ctx)
    return settings, open_warehouse(settings, read_only=True)


def bias_cmd(
    ctx: typer.Context,
    as_of: AsOf = None,
    days: Annotated[int, typer.Option(help="Recommendations of the last N days.")] = 7,
    json_out: Json = False,
) -> None:
    """Recommendation share vs usage share and popularity bias per feature (spec Stage 5)."""
    from featurerec.analysis.reports import popularity_bias

    settings, engine = _open(ctx)
    with engine:
        rep = popularity_bias(engine, settings, as_of=as_of, rec_days=days)
    if json_out:
        print_json(rep)
        return
    print_table(
        [vars(r) for r in rep.rows],
        title=f"popularity bias: last {days} d of recommendations vs {rep.usage_days} d usage",
    )
    if rep.rank_correlation is not None:
        console.print(
            f"Spearman(rec share, usage share) = {rep.rank_correlation:+.2f} "
            "(> 0: recommends what is already popular)"
        )


def cold_start_cmd(
    ctx: typer.Context,
    as_of: AsOf = None,
    days: Annotated[int, typer.Option(help="Recommendations of the last N days.")] = 30,
    json_out: Json = False,
) -> None:
    """CTR and 7-day adoption by user segment against the random baseline (spec Stage 5)."""
    from featurerec.analysis.reports import cold_start

    settings, engine = _open(ctx)
    with engine:
        rep = cold_start(engine, settings, as_of=as_of, days=days)
    if json_out:
        print_json(rep)
        return
    print_table(
        [
            {
                "segment": r.label,
                "recs": r.recommendations,
                "CTR": r.click_through_rate,
                "7d adoption": r.adoption_rate_7d,
                "random recs": r.random_recommendations,
                "random CTR": r.random_click_through_rate,
                "random 7d adoption": r.random_adoption_rate_7d,
                "CTR x random": r.ctr_vs_random,
                "adoption x random": r.adoption_vs_random,
            }
            for r in rep.rows
        ],
        title=f"cold start vs random baseline (last {days} d; run `feedback attribute` first)",
    )
    if rep.note:
        console.print(f"[yellow]{rep.note}[/yellow]")


def diversity_cmd(
    ctx: typer.Context,
    as_of: AsOf = None,
    days: Annotated[int, typer.Option(help="Per user over the last N days.")] = 7,
    json_out: Json = False,
) -> None:
    """Distribution of per-user diversity (unique features / recommendations; spec Stage 5)."""
    from featurerec.analysis.reports import diversity

    settings, engine = _open(ctx)
    with engine:
        rep = diversity(engine, settings, as_of=as_of, days=days)
    if json_out:
        print_json(rep)
        return
    print_table(
        [{"diversity_score": s, "user_count": c} for s, c in rep.distribution],
        title=f"diversity per user, last {days} d",
    )
    console.print(
        f"users {rep.users:,}  mean {fmt(rep.mean)}  median {fmt(rep.median)}  "
        f"target > {rep.target:g}  below target {fmt(rep.share_below_target)}"
    )


def impact_cmd(
    ctx: typer.Context,
    launch: Annotated[
        datetime | None, typer.Option(help="Before vs after this launch date (UTC).")
    ] = None,
    experiment: Annotated[
        str | None, typer.Option(help="Or control vs treatment of this experiment.")
    ] = None,
    control: Annotated[str | None, typer.Option(help="Control variant name.")] = None,
    treatment: Annotated[str | None, typer.Option(help="Treatment variant name.")] = None,
    window_days: Annotated[int, typer.Option(help="Length of each window.")] = 30,
    as_of: AsOf = None,
    json_out: Json = False,
) -> None:
    """Combined impact: features adopted per workspace, 30-day feature adoption rate, time to
    value for new users, churn of workspaces with > 5 features; bootstrap 95% intervals."""
    from featurerec.analysis.reports import impact
    from featurerec.experiments.spec import find_experiment

    settings, engine = _open(ctx)
    if experiment is not None and control is None:
        try:
            control = find_experiment(settings, experiment).control_variant
        except Exception:  # an experiment only in the warehouse: fall back to names
            control = None
    with engine:
        rep = impact(
            engine,
            settings,
            launch=launch,
            experiment=experiment,
            control=control,
            treatment=treatment,
            window_days=window_days,
            as_of=as_of,
        )
    if json_out:
        print_json(rep)
        return

    def ci(v: float | None, c: tuple[float, float] | None) -> str:
        if v is None:
            return "n/a"
        return f"{fmt(v)} [{fmt(c[0])}, {fmt(c[1])}]" if c else fmt(v)

    a, b = rep.groups
    print_table(
        [
            {
                "metric": r.metric,
                a: ci(r.before, r.before_ci),
                b: ci(r.after, r.after_ci),
                "change": "n/a" if r.change is None else f"{r.change:+.0%}",
                "change 95% CI": "n/a"
                if r.change_ci is None
                else f"[{r.change_ci[0]:+.0%}, {r.change_ci[1]:+.0%}]",
                f"n {a}": r.n_before,
                f"n {b}": r.n_after,
            }
            for r in rep.rows
        ],
        title=f"combined impact: {a} vs {b} (bootstrap 95% intervals)",
    )
    for n in rep.notes:
        console.print(f"[dim]- {n}[/dim]")


def register(app: typer.Typer, groups: Any) -> None:
    """Add this package's commands to the root ``app`` / shared ``groups``."""
    groups.report.command("bias")(bias_cmd)
    groups.report.command("cold-start")(cold_start_cmd)
    groups.report.command("diversity")(diversity_cmd)
    groups.report.command("impact")(impact_cmd)
    __import__("featurerec.analysis.discovery", fromlist=["_"]).register_discovery(groups)
