"""Attribution (spec Stage 7): did a served recommendation get clicked, dismissed, adopted?

Builds ``ml.recommendation_feedback`` from ``ml.recommendation_log``, the clicks view
``ml.recommendation_clicks``, dismissals in ``ml.recommendation_events`` and first-use
product events (``events.is_first_use`` with ``feature_category`` = the recommended feature,
after the recommendation was generated). See ``feedback/sql/attribution.sql`` for how this
differs from the spec's SQL: rows whose 30-day window is still open are recomputed in one
transaction, so late events are picked up and a rerun adds nothing.

Example::

    >>> from featurerec.warehouse.engine import DuckDBEngine
    >>> with DuckDBEngine(":memory:") as db:   # empty log: nothing to attribute
    ...     attribute(db, as_of=datetime(2026, 3, 1)).inserted
    0
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from featurerec.feedback.common import load_named_sql, resolve_as_of

#: The longest attribution window (adopted_30d).
ATTRIBUTION_WINDOW_DAYS = 30


@dataclass(frozen=True)
class AttributionReport:
    """What one attribution run did."""

    as_of: datetime
    window_start: datetime
    #: Rows recomputed (deleted then re-inserted) because their window was still open.
    recomputed: int
    #: Rows written in this run (recomputed + new).
    inserted: int
    #: Net new rows in ml.recommendation_feedback.
    added: int
    total_rows: int
    clicked: int
    dismissed: int
    adopted_7d: int
    adopted_30d: int


def attribute(
    engine: Any, *, as_of: datetime | None = None, grace_days: int = 2
) -> AttributionReport:
    """Refresh ``ml.recommendation_feedback`` as of ``as_of`` (default: latest warehouse
    timestamp). ``grace_days`` keeps a closed window open a little longer for late events."""
    if grace_days < 0:
        raise ValueError(f"grace_days must be >= 0 (got {grace_days})")
    as_of = resolve_as_of(engine, as_of)
    window_start = as_of - timedelta(days=ATTRIBUTION_WINDOW_DAYS + grace_days)
    sql = load_named_sql("attribution", "featurerec.feedback")
    params = {"as_of": as_of, "window_start": window_start}
    count = "SELECT COUNT(*) AS n FROM ml.recommendation_feedback"
    with engine.transaction():
        before = engine.query_rows(count)[0]["n"]
        recomputed = engine.query_rows(
            "SELECT COUNT(*) AS n FROM ml.recommendation_feedback "
            "WHERE generated_at >= $window_start AND generated_at <= $as_of",
            params,
        )[0]["n"]
        engine.execute(sql["delete_open"], params)
        engine.execute(sql["insert"], params)
        after = engine.query_rows(count)[0]["n"]
    stats = engine.query_rows(
        """SELECT COALESCE(SUM(clicked), 0) AS clicked, COALESCE(SUM(dismissed), 0) AS dismissed,
                  COALESCE(SUM(adopted_7d), 0) AS a7, COALESCE(SUM(adopted_30d), 0) AS a30
           FROM ml.recommendation_feedback"""
    )[0]
    return AttributionReport(
        as_of=as_of,
        window_start=window_start,
        recomputed=int(recomputed),
        inserted=int(after - before + recomputed),
        added=int(after - before),
        total_rows=int(after),
        clicked=int(stats["clicked"]),
        dismissed=int(stats["dismissed"]),
        adopted_7d=int(stats["a7"]),
        adopted_30d=int(stats["a30"]),
    )
