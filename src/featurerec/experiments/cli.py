"""``featurerec experiment report|assign|list`` and ``featurerec simulate experiment``."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from featurerec.cli_common import console, fmt, print_json, print_table, settings_from

experiment_app = typer.Typer(
    help="A/B experiments: deterministic assignment and reports with sound statistics.",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _ci(e: Any) -> str:
    if e.value is None:
        return "n/a"
    if e.ci_low is None:
        return fmt(e.value)
    return f"{fmt(e.value)} [{fmt(e.ci_low)}, {fmt(e.ci_high)}]"


def print_report(report: Any) -> None:
    """Render an :class:`ExperimentReport` as terminal tables."""
    from featurerec.experiments.report import METRICS

    console.print(
        f"[bold]{report.experiment}[/bold]  control: {report.control}  "
        f"primary: {report.primary_metric}"
        + (f"  as of {report.as_of:%Y-%m-%d %H:%M}" if report.as_of else "")
    )
    if report.hypothesis:
        console.print(f"[dim]{report.hypothesis}[/dim]")
    rows = []
    for v in report.variants:
        row: dict[str, Any] = {"variant": v.name, "users": v.users, "recs": v.recommendations}
        for m, (label, _) in METRICS.items():
            row[label] = _ci(v.metrics[m])
        rows.append(row)
    print_table(rows, title="per variant (95% intervals)")
    print_table(
        [
            {
                "variant": c.variant,
                "metric": METRICS[c.metric][0],
                "lift": "n/a" if c.lift is None else f"{c.lift:+.1%}",
                "lift 95% CI": "n/a"
                if c.lift_ci_low is None
                else f"[{c.lift_ci_low:+.1%}, {c.lift_ci_high:+.1%}]",
                "p": c.p_value,
                "p (holm)": c.p_adjusted,
                "significant": "yes" if c.significant else "",
                "test": c.test,
            }
            for c in report.comparisons
        ],
        title=f"lift vs {report.control} (two-sided, Holm-corrected)",
    )
    s = report.srm
    srm_line = (
        f"sample ratio check: chi2 = {s.chi2:.2f}, p = {s.p_value:.3g} "
        + ("[red]MISMATCH[/red]" if s.mismatch else "ok")
        if s.p_value is not None
        else "sample ratio check: no users yet"
    )
    console.print(srm_line)
    style = "yellow" if not report.enough_data or s.mismatch else "green"
    console.print(f"[{style}]{report.message}[/{style}]")


def _variant_latencies(path: Path, experiment: str) -> dict[str, np.ndarray]:
    """Per-variant request latencies from the serving request log, when its lines carry
    ``experiment`` and ``variant`` (empty otherwise)."""
    import orjson

    out: dict[str, list[float]] = {}
    if not path.exists():
        return {}
    with path.open("rb") as fh:
        for line in fh:
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if rec.get("experiment") == experiment and rec.get("variant") and "latency_ms" in rec:
                out.setdefault(rec["variant"], []).append(float(rec["latency_ms"]))
    return {k: np.asarray(v) for k, v in out.items()}


@experiment_app.command("report")
def report_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Experiment name, or path of its JSON spec.")],
    as_of: Annotated[
        datetime | None,
        typer.Option("--as-of", help="Windows end here (UTC); default: latest in warehouse."),
    ] = None,
    json_out: Json = False,
) -> None:
    """Per-variant CTR, 7/30-day adoption, diversity, dismissal rate and p99 latency with 95%
    intervals, lift vs control, Holm-corrected tests and a sample-ratio-mismatch check."""
    from featurerec.experiments.report import experiment_report
    from featurerec.experiments.spec import find_experiment
    from featurerec.warehouse.engine import open_warehouse

    settings = settings_from(ctx)
    spec = find_experiment(settings, name)
    src = settings.monitoring.serving_metrics
    log_path = Path("serving/requests.jsonl" if src == "auto" else src)
    if not log_path.is_absolute():
        log_path = settings.data_path / log_path
    lat = (
        _variant_latencies(log_path, spec.name)
        if not settings.monitoring.serving_metrics.startswith("http")
        else {}
    )
    with open_warehouse(settings, read_only=True) as engine:
        report = experiment_report(engine, spec, as_of=as_of, latencies=lat, seed=settings.seed)
    if json_out:
        print_json(report)
    else:
        print_report(report)


def _when(text: str | None, option: str) -> datetime | None:
    from featurerec.errors import FeaturerecError

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text).replace(tzinfo=None)
    except ValueError:
        raise FeaturerecError(
            f"{option}: expected a date or date-time like 2026-03-01 or 2026-03-01T12:00 "
            f"(got {text!r})"
        ) from None


class ExposureMode(StrEnum):
    """``featurerec experiment ope --exposure``: whose exposure the candidate is replayed
    with (:class:`featurerec.experiments.offline.SelfExposure`)."""

    own = "own"
    logged = "logged"


@experiment_app.command("ope")
def ope_cmd(
    ctx: typer.Context,
    strategy: Annotated[
        str | None,
        typer.Option(help="Strategy to evaluate (default: the config's serving.default_strategy)."),
    ] = None,
    ranker: Annotated[
        str | None,
        typer.Option(
            help="Ranker model URI, e.g. models:/feature-recommender-bandit/7 "
            "(default: the deployment's, i.e. production)."
        ),
    ] = None,
    candidate_generator: Annotated[
        str | None,
        typer.Option(help="Candidate-generator (MF) model URI (default: the deployment's)."),
    ] = None,
    index: Annotated[
        str | None, typer.Option(help="ANN index URI (default: the deployment's).")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Log start (UTC date or date-time; default: 28 days before --until)."),
    ] = None,
    until: Annotated[str | None, typer.Option(help="Log end (default: --as-of).")] = None,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Rewards known up to here (default: latest in warehouse)."),
    ] = None,
    experiments: Annotated[
        bool,
        typer.Option(
            "--experiments/--no-experiments",
            help="Use the rounds served inside experiments too (each logged with its "
            "variant's propensities).",
        ),
    ] = True,
    exposure: Annotated[
        ExposureMode,
        typer.Option(
            help="own: replay the candidate with its own exposure (serving's caps, "
            "cooldowns and diversity rule on what it would have shown: what it gets once it "
            "serves for weeks); logged: on the log's eligibility (one-step).",
        ),
    ] = ExposureMode.own,
    seed: Annotated[int, typer.Option(help="Seed of the own-exposure replay's draws.")] = 0,
    json_out: Json = False,
) -> None:
    """Off-policy evaluation: estimate a candidate model's CTR and 7-day adoption per
    recommendation from the logged recommendations (their propensities and decision
    contexts) before any user sees it. IPS, SNIPS and doubly robust, with user-clustered 95%
    intervals, next to the logged policy's own rate. By default the candidate is replayed
    with its own exposure history (--exposure own). Load the serving log and run
    attribution first (`featurerec reclog load`, `featurerec feedback attribute`)."""
    from datetime import timedelta

    from featurerec.experiments.offline import evaluate_candidate
    from featurerec.feedback.common import resolve_as_of
    from featurerec.registry import registry_for
    from featurerec.serving.deployment import deployment_for
    from featurerec.serving.eligibility import EligibilityRules
    from featurerec.warehouse.engine import open_warehouse

    settings = settings_from(ctx)
    with open_warehouse(settings, read_only=True) as engine:
        when = resolve_as_of(engine, _when(as_of, "--as-of"))
        end = _when(until, "--until") or when
        start = _when(since, "--since") or end - timedelta(days=28)
        report = evaluate_candidate(
            engine,
            registry_for(settings),
            deployment_for(settings),
            strategy=strategy or settings.serving.default_strategy,
            as_of=when,
            since=start,
            until=end,
            ranker_uri=ranker,
            candidate_generator_uri=candidate_generator,
            index_uri=index,
            experiments=experiments,
            rules=EligibilityRules.from_settings(settings.serving)
            if exposure is ExposureMode.own
            else None,
            seed=seed,
        )
    if json_out:
        print_json(report)
        return
    print_ope_report(report)


def print_ope_report(report: Any) -> None:
    """Render a :class:`~featurerec.experiments.offline.CandidateReport`."""
    exposure = {
        "own": "replayed with its own exposure",
        "logged": "on the log's eligibility (one-step)",
    }[report.exposure]
    console.print(
        f"[bold]{report.candidate}[/bold]  strategy: {report.strategy}  log: "
        f"{fmt(report.since)} .. {fmt(report.until)}  ({report.rounds:,} rounds in "
        f"{report.requests:,} requests)  {exposure}"
    )
    rows = []
    for metric, res in report.results.items():
        if isinstance(res, str):
            rows.append({"metric": metric, "estimator": "-", "estimate (95% CI)": res})
            continue
        rows.append({"metric": metric, "estimator": "logged policy",
                     "estimate (95% CI)": _ci(res.logged), "rounds": res.n})  # fmt: skip
        for name, e in res.estimates.items():
            rows.append(
                {
                    "metric": metric,
                    "estimator": name,
                    "estimate (95% CI)": f"{fmt(e.value)} [{fmt(e.ci_low)}, {fmt(e.ci_high)}]",
                    "rounds": e.n,
                    "ESS": round(e.effective_sample_size),
                    "max weight": e.max_weight,
                }
            )
    print_table(
        rows,
        title="candidate value per recommendation (user-clustered 95% CIs)",
        columns=["metric", "estimator", "estimate (95% CI)", "rounds", "ESS", "max weight"],
    )
    strata = [
        {
            "metric": metric,
            "showing": name,
            "snips (95% CI)": f"{fmt(x.estimate.value)} [{fmt(x.estimate.ci_low)}, "
            f"{fmt(x.estimate.ci_high)}]",
            "candidate's share": f"{x.target_share:.0%}",
        }
        for metric, res in report.results.items()
        if not isinstance(res, str)
        for name, x in res.strata.items()
    ]
    if strata and report.exposure == "logged":
        # a policy that runs for weeks repeats what it showed: this says how the value
        # changes with repeats and how much of the log's support is on them (by the log's
        # showings, so only for the one-step estimate)
        print_table(strata, title="by the user's showing of the logged feature")
    for metric, res in report.results.items():
        if isinstance(res, str):
            continue
        if res.unsupported_mass > 0.01:
            console.print(
                f"[yellow]{metric}: replayed with its own exposure, the candidate puts "
                f"{res.unsupported_mass:.1%} of each slot on items the logging policy's caps "
                "and cooldowns had excluded at that request, so the log has no reward for "
                "them there; IPS counts those as 0 and SNIPS renormalises, DR fills them in "
                "with its reward model: prefer DR[/yellow]"
            )
        if res.dismissed_ratio is not None:
            console.print(
                f"[dim]{metric}: DR's reward model takes {res.dismissed_ratio:.2f} x its value "
                "for an item the user had dismissed before (the logged ratio on such "
                "re-showings)[/dim]"
            )
        if res.unlogged_mass > 0.01:
            console.print(
                f"[yellow]{metric}: the candidate puts {res.unlogged_mass:.1%} of each slot "
                "on items this log never showed; the estimate cannot see those rewards (a log "
                "with more exploration helps)[/yellow]"
            )
        if res.empty_mass > 0.01:
            console.print(
                f"[dim]{metric}: the candidate leaves {res.empty_mass:.1%} of the logged "
                "slots empty (fewer eligible features); the estimates are per recommendation "
                "it shows[/dim]"
            )
    if report.exposure == "own" and report.no_exposure_log:
        console.print(
            f"[yellow]{report.no_exposure_log:,} requests were logged without their exposure "
            "exclusions (before serving wrote them): there the replay keeps the logging "
            "policy's caps and cooldowns on top of the candidate's own[/yellow]"
        )
    if report.missing_context:
        console.print(
            f"[dim]left out: {report.missing_context:,} rounds without a decision context "
            "(logged before contexts were, or with [serving] log_decision_context off)[/dim]"
        )
    if report.unknown_action:
        console.print(
            f"[dim]{report.unknown_action:,} rounds show items the candidate does not know "
            "(counted with weight 0: it would never show them)[/dim]"
        )
    if report.overlaps_log:
        console.print(
            f"[yellow]the candidate was trained on data up to {fmt(report.trained_as_of)}, "
            "after the log starts: it has learned from rounds it is evaluated on, so the "
            "estimate is optimistic; evaluate it on a log written after its training[/yellow]"
        )


@experiment_app.command("assign")
def assign_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Experiment name or JSON path.")],
    user_ids: Annotated[list[str], typer.Argument(help="User ids.")],
    json_out: Json = False,
) -> None:
    """Show the variant (and the strategy / placement it selects) for some users."""
    from featurerec.experiments.assignment import assign, bucket
    from featurerec.experiments.spec import find_experiment

    spec = find_experiment(settings_from(ctx), name)
    rows = []
    for u in user_ids:
        v = assign(spec, u)
        rows.append(
            {
                "user_id": u,
                "bucket": bucket(spec.name, u),
                "variant": v.name,
                "strategy": v.resolved_strategy,
                "placement": v.resolved_placement,
            }
        )
    print_json(rows) if json_out else print_table(rows, title=spec.name)


@experiment_app.command("list")
def list_cmd(ctx: typer.Context, json_out: Json = False) -> None:
    """Experiments the config names plus the shipped ones."""
    from featurerec.experiments.spec import known_experiments

    specs = known_experiments(settings_from(ctx))
    rows = [
        {
            "name": s.name,
            "variants": ", ".join(f"{v.name}={v.allocation:g}" for v in s.variants),
            "control": s.control_variant,
            "primary": s.primary_metric,
            "weeks": s.duration_weeks,
            "min users/variant": s.min_sample_per_variant,
        }
        for s in specs.values()
    ]
    print_json(rows) if json_out else print_table(rows, title="experiments")


def register(app: typer.Typer, groups: Any) -> None:
    """Add this package's commands to the root ``app`` / shared ``groups``."""
    app.add_typer(experiment_app, name="experiment")
    try:
        from featurerec.simulate.online import simulate_experiment_cmd
    except ModuleNotFoundError as exc:  # online simulation not in this build yet
        if exc.name != "featurerec.simulate.online":
            raise
        return
    groups.simulate.command("experiment")(simulate_experiment_cmd)
