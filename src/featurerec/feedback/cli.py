"""``featurerec feedback attribute`` and ``featurerec monitor``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer

from featurerec.cli_common import print_json, print_table, settings_from

feedback_app = typer.Typer(
    help="Feedback loop: attribute clicks, dismissals and adoption to served recommendations.",
    no_args_is_help=True,
)

AsOf = Annotated[
    datetime | None,
    typer.Option(
        "--as-of",
        help="Windows end here (UTC); default: the latest timestamp in the warehouse.",
        formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"],
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@feedback_app.command("attribute")
def attribute_cmd(
    ctx: typer.Context,
    as_of: AsOf = None,
    grace_days: Annotated[
        int, typer.Option(help="Keep closed 30-day windows open this much longer.")
    ] = 2,
    json_out: Json = False,
) -> None:
    """Refresh ml.recommendation_feedback (spec Stage 7). Idempotent; late events are
    picked up while a recommendation's 30-day window is open."""
    from featurerec.feedback.attribution import attribute
    from featurerec.warehouse.engine import open_warehouse

    settings = settings_from(ctx)
    with open_warehouse(settings) as engine:
        report = attribute(engine, as_of=as_of, grace_days=grace_days)
    if json_out:
        print_json(report)
    else:
        print_table(
            [{"field": k, "value": v} for k, v in vars(report).items()],
            title="attribution (ml.recommendation_feedback)",
        )


def monitor_cmd(
    ctx: typer.Context,
    as_of: AsOf = None,
    json_out: Json = False,
    no_alerts: Annotated[
        bool, typer.Option("--no-alerts", help="Only print; send no alerts, keep no state.")
    ] = False,
) -> None:
    """Current monitoring metrics against their targets (spec Stage 7); sends alerts for new
    breaches and recoveries to the configured sinks."""
    from featurerec.feedback.alerts import AlertManager
    from featurerec.feedback.monitoring import compute_metrics, load_monitoring_spec
    from featurerec.warehouse.engine import open_warehouse

    settings = settings_from(ctx)
    spec = load_monitoring_spec(settings)
    with open_warehouse(settings, read_only=True) as engine:
        snapshot = compute_metrics(engine, settings, spec, as_of=as_of)
    notices: list[Any] = []
    if not no_alerts:
        notices = AlertManager.from_settings(settings).process(snapshot)
    if json_out:
        print_json({"snapshot": snapshot, "alerts": notices})
        return
    print_table(
        [
            {
                "metric": m.name,
                "value": m.value,
                "target": m.target,
                "alert when": m.alert_rule,
                "status": m.status,
                "window": m.window,
                "n": m.sample_size,
            }
            for m in snapshot.metrics
        ],
        title=f"monitoring {spec.model} as of {snapshot.as_of:%Y-%m-%d %H:%M}",
    )
    for n in notices:
        typer.echo(f"{n.kind}: {n.message}")


def register(app: typer.Typer, groups: Any) -> None:
    """Add this package's commands to the root ``app`` / shared ``groups``."""
    app.add_typer(feedback_app, name="feedback")
    app.command("monitor")(monitor_cmd)
