"""``featurerec experiment report NAME``: per-variant metrics with 95% intervals, lift
against control, Holm-corrected two-sided tests, a sample-ratio-mismatch check, and a plain
"not enough data yet" below the spec's ``min_sample_per_variant``.

:func:`analyze` works on per-user arrays (:class:`UserMetrics`), so it is testable and reusable
by the simulated online experiment; :func:`experiment_report` reads them from the warehouse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from featurerec.experiments import stats as st
from featurerec.experiments.spec import ExperimentSpec
from featurerec.feedback.common import resolve_as_of
from featurerec.warehouse.engine import load_sql

#: Metric name -> (label, kind). Kinds: proportion (per user), ratio (per rec, clustered),
#: mean (per user), quantile (per request).
METRICS: dict[str, tuple[str, str]] = {
    "click_through_rate": ("CTR", "ratio"),
    "feature_adoption_7d": ("7d adoption", "proportion"),
    "feature_adoption_30d": ("30d adoption", "proportion"),
    "diversity_score": ("diversity", "mean"),
    "dismissal_rate": ("dismissal rate", "ratio"),
    #: per recommendation: share of recommendations adopted within 7 days (the per-round
    #: reward off-policy evaluation estimates; user-clustered like CTR)
    "rec_adoption_7d": ("7d adoption per rec", "ratio"),
    "p99_latency": ("p99 latency ms", "quantile"),
}
#: Metrics tested against control (latency gets a bootstrap interval and p-value too).
TESTED = tuple(METRICS)


@dataclass
class UserMetrics:
    """Per-user arrays of one variant (the user is the randomisation unit)."""

    recs: np.ndarray
    clicks: np.ndarray
    dismissals: np.ndarray
    adopted_7d: np.ndarray
    adopted_30d: np.ndarray
    diversity: np.ndarray
    #: recommendations of the user adopted within 7 days (None: not loaded -> zeros)
    adopted_recs_7d: np.ndarray | None = None

    @property
    def users(self) -> int:
        return int(self.recs.size)

    @classmethod
    def empty(cls) -> UserMetrics:
        z = np.zeros(0)
        return cls(z, z, z, z, z, z, z)

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> UserMetrics:
        def col(name: str) -> np.ndarray:
            return np.array([float(r[name] or 0) for r in rows], dtype=np.float64)

        return cls(
            col("recs"),
            col("clicks"),
            col("dismissals"),
            col("adopted_7d"),
            col("adopted_30d"),
            col("diversity"),
            col("adopted_recs_7d") if rows and "adopted_recs_7d" in rows[0] else None,
        )


@dataclass
class VariantSummary:
    name: str
    users: int
    recommendations: int
    metrics: dict[str, st.Estimate]


@dataclass
class ExperimentReport:
    experiment: str
    hypothesis: str
    as_of: datetime | None
    control: str
    primary_metric: str
    min_sample_per_variant: int
    enough_data: bool
    message: str
    srm: st.SRMResult
    variants: list[VariantSummary]
    comparisons: list[st.Comparison]
    correction: str = "holm"
    notes: list[str] = field(default_factory=list)


def _estimates(u: UserMetrics, latency: np.ndarray | None, seed: int) -> dict[str, st.Estimate]:
    out = {
        "click_through_rate": st.ratio_of_sums(u.clicks, u.recs),
        "feature_adoption_7d": st.proportion(u.adopted_7d),
        "feature_adoption_30d": st.proportion(u.adopted_30d),
        "diversity_score": st.mean(u.diversity),
        "dismissal_rate": st.ratio_of_sums(u.dismissals, u.recs),
        "rec_adoption_7d": st.ratio_of_sums(
            u.adopted_recs_7d if u.adopted_recs_7d is not None else np.zeros_like(u.recs), u.recs
        ),
    }
    if latency is not None and latency.size:
        out["p99_latency"] = st.quantile_bootstrap(latency, 0.99, seed=seed)[0]
    else:
        out["p99_latency"] = st.Estimate(None, None, None, 0, "no latency data")
    return out


def analyze(
    spec: ExperimentSpec,
    users: Mapping[str, UserMetrics],
    *,
    latencies: Mapping[str, np.ndarray] | None = None,
    as_of: datetime | None = None,
    alpha: float = 0.05,
    seed: int = 0,
) -> ExperimentReport:
    """The whole report from per-user arrays per variant (missing variants count as empty)."""
    lat = dict(latencies or {})
    control = spec.control_variant
    summaries: list[VariantSummary] = []
    for i, v in enumerate(spec.variants):
        u = users.get(v.name, UserMetrics.empty())
        summaries.append(
            VariantSummary(
                v.name, u.users, int(np.sum(u.recs)), _estimates(u, lat.get(v.name), seed + i)
            )
        )
    by_name = {s.name: s for s in summaries}
    comps: list[st.Comparison] = []
    for v in spec.variants:
        if v.name == control:
            continue
        t_u = users.get(v.name, UserMetrics.empty())
        c_u = users.get(control, UserMetrics.empty())
        for metric in TESTED:
            kind = METRICS[metric][1]
            t_est, c_est = by_name[v.name].metrics[metric], by_name[control].metrics[metric]
            if kind == "quantile":
                tl, cl = lat.get(v.name, np.zeros(0)), lat.get(control, np.zeros(0))
                lift, lo, hi, p = st.bootstrap_lift(tl, cl, 0.99, seed=seed)
                diff = (
                    None
                    if t_est.value is None or c_est.value is None
                    else t_est.value - c_est.value
                )
                comps.append(
                    st.Comparison(metric, v.name, control, diff, lift, lo, hi, p, test="bootstrap")
                )
                continue
            test = {"proportion": "two-proportion z", "ratio": "delta z", "mean": "welch t"}[kind]
            comp = st.compare_normal(metric, v.name, control, t_est, c_est, test)
            if kind == "proportion":
                arr = "adopted_7d" if metric.endswith("7d") else "adopted_30d"
                xt, xc = getattr(t_u, arr), getattr(c_u, arr)
                p = st.two_proportion_test(int(xt.sum()), xt.size, int(xc.sum()), xc.size)
                comp = _with_p(comp, p)
            elif kind == "mean":
                comp = _with_p(comp, st.welch_test(t_u.diversity, c_u.diversity))
            comps.append(comp)
    adjusted = st.holm([math.nan if c.p_value is None else c.p_value for c in comps])
    comps = [
        st.Comparison(
            c.metric,
            c.variant,
            c.control,
            c.diff,
            c.lift,
            c.lift_ci_low,
            c.lift_ci_high,
            c.p_value,
            None if math.isnan(a) else a,
            (not math.isnan(a)) and a < alpha,
            c.test,
        )
        for c, a in zip(comps, adjusted, strict=True)
    ]
    srm = st.srm_check(
        {s.name: s.users for s in summaries}, {v.name: v.allocation for v in spec.variants}
    )
    smallest = min(s.users for s in summaries)
    enough = smallest >= spec.min_sample_per_variant
    if not enough:
        short = [s.name for s in summaries if s.users < spec.min_sample_per_variant]
        message = (
            f"not enough data yet: {', '.join(short)} below {spec.min_sample_per_variant} users "
            f"per variant (smallest has {smallest}); numbers below are preliminary"
        )
    elif srm.mismatch:
        message = (
            f"sample ratio mismatch (chi-square p = {srm.p_value:.2g}): assignment or exposure "
            "logging is broken; do not trust the comparisons"
        )
    else:
        winners = [
            c
            for c in comps
            if c.metric == spec.primary_metric and c.significant and (c.diff or 0) > 0
        ]
        message = (
            "significant improvement on the primary metric: "
            + ", ".join(f"{c.variant} ({c.lift:+.1%})" for c in winners if c.lift is not None)
            if winners
            else f"no variant beats {control} on {spec.primary_metric} after Holm correction"
        )
    notes = [
        "users are the randomisation unit: CTR and dismissal rate use user-clustered "
        "delta-method intervals; adoption uses per-user Wilson intervals",
        "adoption windows of users exposed near the as-of time may still be open "
        "(the same for every variant, so comparisons stay fair)",
    ]
    return ExperimentReport(
        experiment=spec.name,
        hypothesis=spec.hypothesis,
        as_of=as_of,
        control=control,
        primary_metric=spec.primary_metric,
        min_sample_per_variant=spec.min_sample_per_variant,
        enough_data=enough,
        message=message,
        srm=srm,
        variants=summaries,
        comparisons=comps,
        notes=notes,
    )


def _with_p(c: st.Comparison, p: float) -> st.Comparison:
    return st.Comparison(
        c.metric,
        c.variant,
        c.control,
        c.diff,
        c.lift,
        c.lift_ci_low,
        c.lift_ci_high,
        None if math.isnan(p) else p,
        test=c.test,
    )


def load_user_metrics(engine: Any, spec: ExperimentSpec, as_of: datetime) -> dict[str, UserMetrics]:
    rows = engine.query_rows(
        load_sql("experiment_users", "featurerec.analysis"),
        {"experiment": spec.name, "as_of": as_of},
    )
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    return {v: UserMetrics.from_rows(rs) for v, rs in by_variant.items()}


def experiment_report(
    engine: Any,
    spec: ExperimentSpec,
    *,
    as_of: datetime | None = None,
    latencies: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> ExperimentReport:
    """The report for ``spec`` from ``ml.recommendation_feedback`` as of ``as_of``."""
    as_of = resolve_as_of(engine, as_of)
    return analyze(
        spec, load_user_metrics(engine, spec, as_of), latencies=latencies, as_of=as_of, seed=seed
    )
