"""Spec Stage 5 analysis reports (popularity bias, cold start vs random, diversity) and the
spec's "Combined Impact" report, each a typed result computed from the SQL in
``analysis/sql``. Windows end at ``as_of`` (default: the latest warehouse timestamp).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.feedback.common import bind, resolve_as_of
from featurerec.warehouse.engine import load_sql

PKG = "featurerec.analysis"
#: Users with at least this many feature_used events before a recommendation are "active".
ACTIVE_MIN_EVENTS = 50


def _q(engine: Any, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    sql = load_sql(name, PKG)
    return engine.query_rows(sql, bind(sql, params))


# -- popularity bias -----------------------------------------------------------------------
@dataclass(frozen=True)
class BiasRow:
    feature: str
    times_recommended: int
    unique_users_shown: int
    current_users: int
    rec_share: float
    usage_share: float
    popularity_bias: float
    assessment: str


@dataclass(frozen=True)
class BiasReport:
    as_of: datetime
    rec_days: int
    usage_days: int
    rows: list[BiasRow]
    #: Spearman correlation of rec share with usage share (> 0: recommends what is popular).
    rank_correlation: float | None


def _assess(rec_share: float, usage_share: float, bias: float) -> str:
    if rec_share == 0:
        return "never recommended"
    if usage_share == 0:
        return "recommended, not used yet"
    if bias > 0.02:
        return "promotes an under-adopted feature"
    if bias < -0.02:
        return "not over-recommending a popular feature"
    return "in line with usage"


def popularity_bias(
    engine: Any, settings: Settings, *, as_of: datetime | None = None, rec_days: int = 7
) -> BiasReport:
    as_of = resolve_as_of(engine, as_of)
    usage_days = settings.windows.interaction_days
    rows = _q(
        engine,
        "popularity_bias",
        {"as_of": as_of, "rec_days": rec_days, "usage_days": usage_days},
    )
    out = [
        BiasRow(
            feature=r["feature"],
            times_recommended=int(r["times_recommended"]),
            unique_users_shown=int(r["unique_users_shown"]),
            current_users=int(r["current_users"]),
            rec_share=float(r["rec_share"] or 0),
            usage_share=float(r["usage_share"] or 0),
            popularity_bias=float(r["popularity_bias"] or 0),
            assessment=_assess(
                float(r["rec_share"] or 0),
                float(r["usage_share"] or 0),
                float(r["popularity_bias"] or 0),
            ),
        )
        for r in rows
    ]
    corr = None
    if len(out) >= 3:
        from scipy import stats

        rs = [r.rec_share for r in out]
        us = [r.usage_share for r in out]
        if np.ptp(rs) > 0 and np.ptp(us) > 0:
            corr = float(stats.spearmanr(rs, us).statistic)
    return BiasReport(as_of, rec_days, usage_days, out, corr)


# -- cold start vs random --------------------------------------------------------------------
Segment = Literal["cold", "warm", "active"]
SEGMENT_ORDER: tuple[Segment, ...] = ("cold", "warm", "active")


@dataclass(frozen=True)
class SegmentRow:
    segment: str
    label: str
    recommendations: int
    users: int
    click_through_rate: float | None
    adoption_rate_7d: float | None
    random_recommendations: int
    random_click_through_rate: float | None
    random_adoption_rate_7d: float | None
    #: model CTR / random CTR (the spec reports 4x for cold-start users).
    ctr_vs_random: float | None
    adoption_vs_random: float | None


@dataclass(frozen=True)
class ColdStartReport:
    as_of: datetime
    days: int
    rows: list[SegmentRow]
    note: str = ""


def cold_start(
    engine: Any, settings: Settings, *, as_of: datetime | None = None, days: int = 30
) -> ColdStartReport:
    as_of = resolve_as_of(engine, as_of)
    cold_max = settings.windows.cold_start_max_events
    rows = _q(
        engine,
        "cold_start",
        {"as_of": as_of, "days": days, "cold_max": cold_max, "active_min": ACTIVE_MIN_EVENTS},
    )
    cells = {(r["segment"], r["arm"]): r for r in rows}
    labels = {
        "cold": f"Cold start (< {cold_max} events)",
        "warm": f"Warm ({cold_max}-{ACTIVE_MIN_EVENTS - 1} events)",
        "active": f"Active ({ACTIVE_MIN_EVENTS}+ events)",
    }
    out = []
    for seg in SEGMENT_ORDER:
        m, r = cells.get((seg, "model")), cells.get((seg, "random"))
        if m is None and r is None:
            continue

        def f(row: dict[str, Any] | None, key: str) -> float | None:
            return None if row is None or row[key] is None else float(row[key])

        ctr, rctr = f(m, "click_through_rate"), f(r, "click_through_rate")
        ad, rad = f(m, "adoption_rate_7d"), f(r, "adoption_rate_7d")
        out.append(
            SegmentRow(
                segment=seg,
                label=labels[seg],
                recommendations=int(m["recommendations"]) if m else 0,
                users=int(m["users"]) if m else 0,
                click_through_rate=ctr,
                adoption_rate_7d=ad,
                random_recommendations=int(r["recommendations"]) if r else 0,
                random_click_through_rate=rctr,
                random_adoption_rate_7d=rad,
                ctr_vs_random=ctr / rctr if ctr is not None and rctr else None,
                adoption_vs_random=ad / rad if ad is not None and rad else None,
            )
        )
    note = (
        ""
        if any(r.random_recommendations for r in out)
        else "no random-baseline rows (strategy='random') in the log: serve a small random "
        "holdout to compare against"
    )
    return ColdStartReport(as_of, days, out, note)


# -- diversity ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiversityReport:
    as_of: datetime
    days: int
    #: (diversity score rounded to 0.01, users) ascending.
    distribution: list[tuple[float, int]]
    users: int
    mean: float | None
    median: float | None
    target: float
    share_below_target: float | None


def diversity(
    engine: Any, settings: Settings, *, as_of: datetime | None = None, days: int = 7
) -> DiversityReport:
    as_of = resolve_as_of(engine, as_of)
    rows = _q(engine, "diversity", {"as_of": as_of, "days": days})
    dist = [(float(r["diversity_score"]), int(r["user_count"])) for r in rows]
    n = sum(c for _, c in dist)
    target = settings.serving.min_weekly_diversity
    if n == 0:
        return DiversityReport(as_of, days, [], 0, None, None, target, None)
    scores = np.repeat([s for s, _ in dist], [c for _, c in dist])
    return DiversityReport(
        as_of,
        days,
        dist,
        n,
        float(scores.mean()),
        float(np.median(scores)),
        target,
        float(np.mean(scores < target)),
    )


# -- combined impact ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ImpactRow:
    metric: str
    unit: str
    before: float | None
    before_ci: tuple[float, float] | None
    after: float | None
    after_ci: tuple[float, float] | None
    change: float | None
    change_ci: tuple[float, float] | None
    n_before: int
    n_after: int


@dataclass(frozen=True)
class ImpactReport:
    mode: Literal["launch", "experiment"]
    groups: tuple[str, str]
    windows: dict[str, tuple[datetime, datetime]]
    rows: list[ImpactRow]
    n_boot: int
    notes: list[str] = field(default_factory=list)


def _boot_stat(
    x: np.ndarray, fn: Any, rng: np.random.Generator, n_boot: int
) -> tuple[float | None, tuple[float, float] | None, np.ndarray]:
    if x.size == 0:
        return None, None, np.empty(0)
    value = float(fn(x))
    chunk = max(1, 2_000_000 // x.size)  # bound memory: resample in chunks
    reps = np.concatenate(
        [
            fn(x[rng.integers(0, x.size, size=(min(chunk, n_boot - i), x.size))], axis=1)
            for i in range(0, n_boot, chunk)
        ]
    )
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return value, (float(lo), float(hi)), reps


def _impact_row(
    metric: str,
    unit: str,
    a: np.ndarray,
    b: np.ndarray,
    fn: Any,
    rng: np.random.Generator,
    n_boot: int,
) -> ImpactRow:
    va, ca, ra = _boot_stat(a, fn, rng, n_boot)
    vb, cb, rb = _boot_stat(b, fn, rng, n_boot)
    change = change_ci = None
    if va is not None and vb is not None and va != 0:
        change = vb / va - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = rb / ra - 1
        rel = rel[np.isfinite(rel)]
        if rel.size:
            lo, hi = np.quantile(rel, [0.025, 0.975])
            change_ci = (float(lo), float(hi))
    return ImpactRow(metric, unit, va, ca, vb, cb, change, change_ci, int(a.size), int(b.size))


def _period(
    engine: Any, start: datetime, end: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    users = _q(engine, "impact_users", {"start": start, "end": end})
    workspaces = _q(engine, "impact_workspaces", {"start": start, "end": end})
    return users, workspaces


def _arrays(
    users: list[dict[str, Any]], workspaces: list[dict[str, Any]], min_features: int
) -> dict[str, np.ndarray]:
    return {
        "features_per_workspace": np.array([w["features_adopted"] for w in workspaces], float),
        "adoption_30d": np.array([u["adopted_30d"] for u in users], float),
        "ttv": np.array(
            [u["ttv_days"] for u in users if u["is_new"] and u["ttv_days"] is not None], float
        ),
        "churn": np.array(
            [w["churned"] for w in workspaces if w["features_adopted"] > min_features], float
        ),
    }


def impact(
    engine: Any,
    settings: Settings,
    *,
    launch: datetime | None = None,
    experiment: str | None = None,
    control: str | None = None,
    treatment: str | None = None,
    window_days: int = 30,
    as_of: datetime | None = None,
    n_boot: int = 1000,
    min_features: int = 5,
) -> ImpactReport:
    """Before vs after ``launch`` (two windows of ``window_days``), or control vs treatment of
    ``experiment`` (the ``window_days`` before ``as_of``); bootstrap 95% intervals."""
    if (launch is None) == (experiment is None):
        raise DataError("impact report: give exactly one of --launch DATE or --experiment NAME")
    rng = np.random.default_rng(settings.seed)
    notes = [
        "features per workspace: distinct features its users used by the window's end",
        "30-day adoption: share of active users with a first use of a feature (other than the "
        "one they arrived with) within 30 days of the window start or of their arrival",
        "time to value: new users' median days from first event to first use of a second "
        "feature (users reaching it within 30 days)",
        f"churn: workspaces with > {min_features} features whose churned_at is in the window",
    ]
    if launch is not None:
        w_before = (launch - timedelta(days=window_days), launch)
        w_after = (launch, launch + timedelta(days=window_days))
        a = _arrays(*_period(engine, *w_before), min_features)
        b = _arrays(*_period(engine, *w_after), min_features)
        groups = ("before", "after")
        windows = {"before": w_before, "after": w_after}
        mode: Literal["launch", "experiment"] = "launch"
    else:
        assert experiment is not None
        end = resolve_as_of(engine, as_of) + timedelta(microseconds=1)
        win = (end - timedelta(days=window_days), end)
        users, workspaces = _period(engine, *win)
        variant_rows = _q(engine, "impact_user_variants", {"experiment": experiment})
        variant = {r["user_id"]: r["variant"] for r in variant_rows}
        names = sorted(set(variant.values()))
        if len(names) < 2:
            raise DataError(
                f"experiment {experiment!r}: need two variants with users (found {names})"
            )
        c = control or names[0]
        t = treatment or next(n for n in names if n != c)
        for v in (c, t):
            if v not in names:
                raise DataError(f"experiment {experiment!r}: no users in variant {v!r} ({names})")
        # A workspace belongs to the variant most of its users are in.
        ws_votes: dict[str, Counter[str]] = {}
        for u in users:
            if u["user_id"] in variant and u["workspace_id"] is not None:
                ws_votes.setdefault(u["workspace_id"], Counter())[variant[u["user_id"]]] += 1
        ws_variant = {w: votes.most_common(1)[0][0] for w, votes in ws_votes.items()}
        a = _arrays(
            [u for u in users if variant.get(u["user_id"]) == c],
            [w for w in workspaces if ws_variant.get(w["workspace_id"]) == c],
            min_features,
        )
        b = _arrays(
            [u for u in users if variant.get(u["user_id"]) == t],
            [w for w in workspaces if ws_variant.get(w["workspace_id"]) == t],
            min_features,
        )
        groups, windows, mode = (c, t), {"window": win}, "experiment"
        notes.append(
            "users are randomised, workspaces are not: a workspace counts for the variant "
            "most of its users are in, so workspace metrics are diluted"
        )
    rows = [
        _impact_row(
            "features adopted per workspace",
            "features",
            a["features_per_workspace"],
            b["features_per_workspace"],
            np.mean,
            rng,
            n_boot,
        ),
        _impact_row(
            "feature adoption rate (30d)",
            "share",
            a["adoption_30d"],
            b["adoption_30d"],
            np.mean,
            rng,
            n_boot,
        ),
        _impact_row(
            "time to value (new users)", "days", a["ttv"], b["ttv"], np.median, rng, n_boot
        ),
        _impact_row(
            f"churn (workspaces with > {min_features} features)",
            "share",
            a["churn"],
            b["churn"],
            np.mean,
            rng,
            n_boot,
        ),
    ]
    for r in rows:
        if r.before is not None and math.isnan(r.before):
            raise DataError(f"impact: {r.metric} is NaN")
    return ImpactReport(mode, groups, windows, rows, n_boot, notes)
