"""Discovery (spec Stage 2): event volume, the feature ontology and the cold-start profile.

The queries are the SQL files ``analysis/sql/discovery_*.sql`` (bound parameters, windows
relative to an as-of time: by default the latest event in the warehouse, never the wall
clock). :func:`discovery_report` runs them and returns a typed :class:`DiscoveryReport`;
``featurerec report discovery [--as-of T] [--json]`` prints it.

Example::

    >>> from featurerec.config import Settings
    >>> from featurerec.warehouse.engine import DuckDBEngine
    >>> with DuckDBEngine(":memory:") as db:
    ...     db.execute("INSERT INTO events (event_id, user_id, event_type, timestamp, "
    ...                "feature_category, is_first_use) VALUES "
    ...                "('e1', 'u1', 'feature_used', '2026-02-27 10:00', 'forms', true)")
    ...     rep = discovery_report(db, Settings())
    >>> [(w.total_events, w.first_use_events) for w in rep.weekly_volume]
    [(1, 1)]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import date, datetime
from typing import Annotated, Any

import typer

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.warehouse.engine import SQLEngine, load_sql

_PACKAGE = "featurerec.analysis"


@dataclass(frozen=True)
class WeeklyVolume:
    """One week of feature_used events (spec: Event Volume Analysis)."""

    week: date
    total_events: int
    unique_users: int
    distinct_features: int
    first_use_events: int


@dataclass(frozen=True)
class OntologyRow:
    """One enabled feature flag and its usage in the window (spec: Feature Ontology)."""

    flag_id: str
    feature_name: str
    rollout_percentage: float | None
    target_segments: str | None
    users_30d: int
    workspaces_30d: int
    events_30d: int
    first_event: datetime | None
    last_event: datetime | None
    adoption_rate: float | None


@dataclass(frozen=True)
class ColdStartRow:
    """New users of one (role, plan, team size bucket) segment (spec: Cold-Start Profiling)."""

    role: str | None
    plan: str | None
    team_size_bucket: str
    new_users: int
    avg_events: float
    avg_features_used: float


@dataclass(frozen=True)
class ColdStartShare:
    """Share of active users with fewer than ``max_events`` feature_used events."""

    active_users: int
    cold_start_users: int
    cold_start_share: float | None
    max_events: int


@dataclass(frozen=True)
class DiscoveryReport:
    """Everything ``featurerec report discovery`` shows."""

    as_of: datetime
    weeks: int
    ontology_days: int
    signup_days: int
    weekly_volume: list[WeeklyVolume] = field(default_factory=list)
    ontology: list[OntologyRow] = field(default_factory=list)
    cold_start: list[ColdStartRow] = field(default_factory=list)
    cold_start_share: ColdStartShare | None = None


def latest_event_time(engine: SQLEngine) -> datetime:
    """The default as-of time: the latest event in the warehouse."""
    rows = engine.query_rows("SELECT MAX(timestamp) AS t FROM events")
    latest = rows[0]["t"] if rows else None
    if latest is None:
        raise DataError("no events in the warehouse: run `featurerec ingest` first")
    return latest  # type: ignore[no-any-return]


def _typed(cls: type, rows: list[dict[str, Any]]) -> list[Any]:
    names = [f.name for f in fields(cls)]
    return [cls(**{n: r[n] for n in names}) for r in rows]


def weekly_volume(engine: SQLEngine, as_of: datetime, weeks: int) -> list[WeeklyVolume]:
    rows = engine.query_rows(
        load_sql("discovery_weekly_volume", _PACKAGE), {"as_of": as_of, "weeks": weeks}
    )
    return _typed(WeeklyVolume, rows)


def feature_ontology(engine: SQLEngine, as_of: datetime, days: int) -> list[OntologyRow]:
    rows = engine.query_rows(
        load_sql("discovery_feature_ontology", _PACKAGE), {"as_of": as_of, "days": days}
    )
    for r in rows:
        if r["adoption_rate"] is not None:
            r["adoption_rate"] = float(r["adoption_rate"])
    return _typed(OntologyRow, rows)


def cold_start_profile(engine: SQLEngine, as_of: datetime, days: int) -> list[ColdStartRow]:
    rows = engine.query_rows(
        load_sql("discovery_cold_start", _PACKAGE), {"as_of": as_of, "days": days}
    )
    for r in rows:
        r["avg_events"] = float(r["avg_events"])
        r["avg_features_used"] = float(r["avg_features_used"])
    return _typed(ColdStartRow, rows)


def cold_start_share(
    engine: SQLEngine, as_of: datetime, days: int, max_events: int
) -> ColdStartShare:
    row = engine.query_rows(
        load_sql("discovery_cold_start_share", _PACKAGE),
        {"as_of": as_of, "days": days, "max_events": max_events},
    )[0]
    share = row["cold_start_share"]
    return ColdStartShare(
        active_users=int(row["active_users"]),
        cold_start_users=int(row["cold_start_users"] or 0),
        cold_start_share=None if share is None else float(share),
        max_events=max_events,
    )


def discovery_report(
    engine: SQLEngine, settings: Settings, as_of: datetime | None = None
) -> DiscoveryReport:
    """Run the discovery queries with windows from ``settings.windows`` ending at ``as_of``."""
    as_of = as_of or latest_event_time(engine)
    w = settings.windows
    return DiscoveryReport(
        as_of=as_of,
        weeks=w.discovery_weeks,
        ontology_days=w.ontology_days,
        signup_days=w.cold_start_signup_days,
        weekly_volume=weekly_volume(engine, as_of, w.discovery_weeks),
        ontology=feature_ontology(engine, as_of, w.ontology_days),
        cold_start=cold_start_profile(engine, as_of, w.cold_start_signup_days),
        cold_start_share=cold_start_share(engine, as_of, w.ontology_days, w.cold_start_max_events),
    )


# -- CLI ---------------------------------------------------------------------------------------


def _print(rep: DiscoveryReport) -> None:
    from dataclasses import asdict

    from featurerec.cli_common import console, print_table

    console.print(f"[bold]Discovery[/bold] as of {rep.as_of:%Y-%m-%d %H:%M:%S} UTC")
    print_table(
        [asdict(r) for r in rep.weekly_volume],
        title=f"weekly feature_used volume (last {rep.weeks} weeks)",
    )
    print_table(
        [
            {
                "feature": r.feature_name,
                "flag": r.flag_id,
                f"users {rep.ontology_days}d": r.users_30d,
                "workspaces": r.workspaces_30d,
                "events": r.events_30d,
                "rollout": r.rollout_percentage,
                "adoption rate": r.adoption_rate,
                "first event": f"{r.first_event:%Y-%m-%d}" if r.first_event else None,
                "last event": f"{r.last_event:%Y-%m-%d}" if r.last_event else None,
            }
            for r in rep.ontology
        ],
        title=f"feature ontology: enabled flags x {rep.ontology_days}-day usage",
    )
    print_table(
        [asdict(r) for r in rep.cold_start],
        title=f"cold-start profile: users who signed up in the last {rep.signup_days} days",
    )
    cs = rep.cold_start_share
    if cs is not None and cs.cold_start_share is not None:
        console.print(
            f"cold-start users (< {cs.max_events} feature_used events): "
            f"{cs.cold_start_users:,} of {cs.active_users:,} active users "
            f"({cs.cold_start_share:.1%}; spec: 35%)"
        )


def discovery_cmd(
    ctx: typer.Context,
    as_of: Annotated[
        datetime | None,
        typer.Option("--as-of", help="Windows end here (UTC); default: latest event."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Event volume, feature ontology and cold-start profile (spec Stage 2)."""
    from featurerec.cli_common import print_json, settings_from
    from featurerec.warehouse.engine import open_warehouse

    settings = settings_from(ctx)
    with open_warehouse(settings, read_only=True) as engine:
        rep = discovery_report(engine, settings, as_of)
    if json_out:
        print_json(rep)
    else:
        _print(rep)


def register_discovery(groups: Any) -> None:
    """Add ``featurerec report discovery`` to the shared ``report`` group."""
    groups.report.command("discovery")(discovery_cmd)
