"""Monitoring (spec Stage 7): the spec's monitoring JSON is the config; this computes every
metric it names, as of a point in time, and says which ones breach their alert threshold.

Metric definitions (windows end at ``as_of``; SQL in ``feedback/sql/monitoring.sql``):

* ``click_through_rate``: clicked / served recommendations generated in the window (1 h).
* ``feature_adoption_after_rec``: users with a recommendation adopted within 7 days / users
  shown one, for users shown one in the 7 days that end 7 days before ``as_of`` (complete
  windows only). Read from ``ml.recommendation_feedback`` (run attribution first).
* ``time_to_first_use``: median hours from recommendation to first use of its feature, for
  recommendations in the last 30 days adopted within 30 days.
* ``recommendation_diversity``: per user, unique features / recommendations in the last
  week; mean over users.
* ``novelty_score``: mean over last week's recommendations of ``1 - usage share``, where the
  usage share of a feature is the share of active users (any feature use in the last 30 days)
  who used it. 1 = nobody uses it yet, 0 = everybody does.
* ``coverage``: features that appear in at least 1% of last week's recommendations / all
  features (every feature seen in events, recommended, or in the catalog).
* ``p99_latency`` and ``error_rate``: from the serving metrics source (see
  :mod:`featurerec.feedback.serving_metrics`).

Alert rules: an explicit ``alert_threshold`` ("< 0.08") or serving ``threshold[_ms]`` wins;
otherwise a metric breaches when it is worse than its target by more than
``settings.monitoring.alert_margin`` (relative). A metric without data never breaches.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from featurerec.config import Settings
from featurerec.errors import SpecError
from featurerec.feedback.common import bind, load_named_sql, resolve_as_of
from featurerec.feedback.serving_metrics import read_serving_stats

Status = Literal["ok", "breach", "no data"]

#: Metrics where a lower value is better; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"time_to_first_use", "p99_latency", "error_rate"})
#: Share of recommendations a feature needs to count as covered.
COVERAGE_MIN_SHARE = 0.01


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RealtimeMetric(_M):
    name: str
    type: str = "engagement"
    definition: str = ""
    window: str = "1h"
    alert_threshold: str | None = None
    target: float | None = None
    target_hours: float | None = None
    alert: str | None = None


class QualityMetric(_M):
    name: str
    type: str = "quality"
    definition: str = ""
    window: str = "7d"
    target: float
    alert_threshold: str | None = None
    alert: str | None = None
    note: str = ""


class ServingMetric(_M):
    name: str
    threshold_ms: float | None = None
    threshold: float | None = None
    window: str = "1h"
    alert: str | None = None


class MonitoringSpec(_M):
    """The spec's ``monitoring`` object."""

    model: str
    realtime_metrics: list[RealtimeMetric] = Field(default_factory=list)
    quality_metrics: list[QualityMetric] = Field(default_factory=list)
    serving_metrics: list[ServingMetric] = Field(default_factory=list)


def parse_monitoring(raw: Any, *, source: str = "<monitoring>") -> MonitoringSpec:
    if isinstance(raw, dict) and set(raw) == {"monitoring"}:
        raw = raw["monitoring"]
    try:
        spec = MonitoringSpec.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{loc}: {msg}")
        raise SpecError(f"{source}: invalid monitoring spec: {'; '.join(parts)}") from None
    metrics: list[RealtimeMetric | QualityMetric] = [
        *spec.realtime_metrics,
        *spec.quality_metrics,
    ]
    for m in metrics:
        if m.alert_threshold is not None:
            parse_threshold(m.alert_threshold, where=f"{source}: {m.name}.alert_threshold")
        parse_window(m.window, where=f"{source}: {m.name}.window")
    for s in spec.serving_metrics:
        if s.threshold_ms is None and s.threshold is None:
            raise SpecError(f"{source}: {s.name}: needs threshold_ms or threshold")
    known = set(METRIC_QUERIES) | {"coverage", "p99_latency", "error_rate"}
    names = [m.name for m in metrics] + [s.name for s in spec.serving_metrics]
    unknown = sorted(set(names) - known)
    if unknown:
        raise SpecError(f"{source}: unknown metric(s) {unknown}; known are {sorted(known)}")
    return spec


def load_monitoring_spec(settings: Settings) -> MonitoringSpec:
    path = settings.resolve(settings.monitoring.spec)
    if not path.exists():
        raise SpecError(f"monitoring spec not found: {path} (settings monitoring.spec)")
    try:
        raw = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SpecError(f"{path}: invalid JSON: {exc}") from None
    return parse_monitoring(raw, source=str(path))


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_THRESHOLD = re.compile(r"^\s*(<=|>=|<|>)\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])(?:_rolling)?\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_threshold(text: str, *, where: str = "alert_threshold") -> tuple[str, float]:
    """``"< 0.08"`` -> ``("<", 0.08)``."""
    m = _THRESHOLD.match(text)
    if not m:
        raise SpecError(f"{where}: cannot read {text!r}; expected e.g. '< 0.08' or '>= 48'")
    return m.group(1), float(m.group(2))


def parse_window(text: str, *, where: str = "window") -> timedelta:
    """``"1h"``, ``"7d_rolling"``, ``"30d"``, ``"2w"`` -> a timedelta."""
    m = _WINDOW.match(text)
    if not m:
        raise SpecError(f"{where}: cannot read {text!r}; expected e.g. '1h', '7d_rolling', '30d'")
    return timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})


@dataclass(frozen=True)
class MetricValue:
    """One metric's value against its target and alert rule."""

    name: str
    group: str
    value: float | None
    target: float | None
    #: e.g. "< 0.08"; the metric breaches when ``value`` satisfies it.
    alert_rule: str
    status: Status
    window: str
    sample_size: int
    higher_is_better: bool
    #: Alert sinks named by the spec for this metric (the defaults are added by the alerter).
    sinks: tuple[str, ...] = ()
    unit: str = ""


@dataclass(frozen=True)
class MetricsSnapshot:
    as_of: datetime
    model: str
    metrics: list[MetricValue] = field(default_factory=list)

    def get(self, name: str) -> MetricValue:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)


#: Metric name -> named statement in monitoring.sql.
METRIC_QUERIES = {
    "click_through_rate": "click_through_rate",
    "feature_adoption_after_rec": "feature_adoption_after_rec",
    "time_to_first_use": "time_to_first_use",
    "recommendation_diversity": "recommendation_diversity",
    "novelty_score": "novelty_score",
}


def _rule(
    name: str, explicit: str | None, target: float | None, margin: float
) -> tuple[str, float] | None:
    if explicit is not None:
        return parse_threshold(explicit)
    if target is None:
        return None
    if name in LOWER_IS_BETTER:
        return ">", target * (1 + margin)
    return "<", target * (1 - margin)


def _value(
    name: str,
    group: str,
    value: float | None,
    n: int,
    target: float | None,
    rule: tuple[str, float] | None,
    window: str,
    sinks: tuple[str, ...],
    unit: str = "",
) -> MetricValue:
    if value is None or n == 0:
        status: Status = "no data"
    elif rule is not None and _OPS[rule[0]](value, rule[1]):
        status = "breach"
    else:
        status = "ok"
    return MetricValue(
        name=name,
        group=group,
        value=None if value is None else float(value),
        target=target,
        alert_rule=f"{rule[0]} {rule[1]:g}" if rule else "",
        status=status,
        window=window,
        sample_size=int(n),
        higher_is_better=name not in LOWER_IS_BETTER,
        sinks=sinks,
        unit=unit,
    )


def compute_metrics(
    engine: Any, settings: Settings, spec: MonitoringSpec, *, as_of: datetime | None = None
) -> MetricsSnapshot:
    """Every metric of ``spec`` as of ``as_of`` (default: latest warehouse timestamp)."""
    as_of = resolve_as_of(engine, as_of)
    sql = load_named_sql("monitoring", "featurerec.feedback")
    margin = settings.monitoring.alert_margin
    out: list[MetricValue] = []

    def run(stmt: str, window: timedelta, shift: timedelta = timedelta(0)) -> dict[str, Any]:
        end = as_of - shift
        params = {"as_of": as_of, "start": end - window, "end": end}
        rows = engine.query_rows(sql[stmt], bind(sql[stmt], params))
        return rows[0]

    def ratio(row: dict[str, Any]) -> tuple[float | None, int]:
        n = int(row["n"] or 0)
        return (float(row["hits"]) / n if n else None), n

    for rm in spec.realtime_metrics:
        window = parse_window(rm.window)
        target = rm.target_hours if rm.name == "time_to_first_use" else rm.target
        sinks = (rm.alert,) if rm.alert else ()
        rule = _rule(rm.name, rm.alert_threshold, target, margin)
        if rm.name == "feature_adoption_after_rec":
            value, n = ratio(run("feature_adoption_after_rec", window, shift=timedelta(days=7)))
        elif rm.name == "click_through_rate":
            value, n = ratio(run("click_through_rate", window))
        else:
            row = run(METRIC_QUERIES[rm.name], window)
            value, n = row["value"], int(row["n"] or 0)
        unit = "hours" if rm.name == "time_to_first_use" else ""
        out.append(_value(rm.name, "realtime", value, n, target, rule, rm.window, sinks, unit))

    for qm in spec.quality_metrics:
        window = parse_window(qm.window)
        sinks = (qm.alert,) if qm.alert else ()
        rule = _rule(qm.name, qm.alert_threshold, qm.target, margin)
        if qm.name == "coverage":
            value, n = _coverage(engine, settings, sql, as_of, window)
        else:
            row = run(METRIC_QUERIES[qm.name], window)
            value, n = row["value"], int(row["n"] or 0)
        out.append(_value(qm.name, "quality", value, n, qm.target, rule, qm.window, sinks))

    if spec.serving_metrics:
        windows = {parse_window(s.window) for s in spec.serving_metrics}
        stats = {w: read_serving_stats(settings, start=as_of - w, end=as_of) for w in windows}
        for sm in spec.serving_metrics:
            st = stats[parse_window(sm.window)]
            sinks = (sm.alert,) if sm.alert else ()
            if sm.name == "p99_latency":
                limit = sm.threshold_ms if sm.threshold_ms is not None else sm.threshold
                value, unit = st.p99_ms, "ms"
            else:
                limit = sm.threshold if sm.threshold is not None else sm.threshold_ms
                value, unit = st.error_rate, ""
            assert limit is not None
            out.append(
                _value(
                    sm.name,
                    "serving",
                    value,
                    st.requests,
                    limit,
                    (">", limit),
                    sm.window,
                    sinks,
                    unit,
                )
            )
    return MetricsSnapshot(as_of=as_of, model=spec.model, metrics=out)


def _coverage(
    engine: Any, settings: Settings, sql: dict[str, str], as_of: datetime, window: timedelta
) -> tuple[float | None, int]:
    stmt = sql["coverage_counts"]
    counts = engine.query_rows(stmt, bind(stmt, {"as_of": as_of, "start": as_of - window}))
    features = {r["feature"] for r in engine.query_rows(sql["all_features"])}
    features |= set(settings.catalog.features)
    total = sum(int(r["n"]) for r in counts)
    if total == 0 or not features:
        return None, total
    covered = sum(1 for r in counts if int(r["n"]) / total >= COVERAGE_MIN_SHARE)
    return covered / len(features), total
