"""Tiny hand-built warehouse fixtures for the feedback / analysis / experiment tests.

Not a test module by itself; the other LOOP tests import its builders.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from featurerec.warehouse.engine import DuckDBEngine

T0 = datetime(2026, 3, 1, 12, 0, 0)


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def d(days: float) -> datetime:
    return T0 + timedelta(days=days)


def add_rec(
    db: DuckDBEngine,
    rec_id: str,
    user: str,
    feature: str,
    at: datetime,
    *,
    strategy: str = "hybrid",
    placement: str = "sidebar_panel",
    experiment: str | None = None,
    variant: str | None = None,
    propensity: float = 0.5,
    score: float = 0.5,
    position: int = 1,
) -> None:
    db.execute(
        "INSERT INTO ml.recommendation_log VALUES ($id, $req, $u, $f, $score, $pos, $pl, $st,"
        " $exp, $var, 'v1', $p, false, $at)",
        {
            "id": rec_id,
            "req": f"req_{rec_id}",
            "u": user,
            "f": feature,
            "score": score,
            "pos": position,
            "pl": placement,
            "st": strategy,
            "exp": experiment,
            "var": variant,
            "p": propensity,
            "at": at,
        },
    )


def add_feedback(db: DuckDBEngine, rec_id: str, kind: str, at: datetime, user: str = "") -> None:
    db.execute(
        "INSERT INTO ml.recommendation_events VALUES ($fid, $rid, $u, $k, $at)",
        {"fid": f"{rec_id}:{kind}:{at.isoformat()}", "rid": rec_id, "u": user, "k": kind, "at": at},
    )


_N = [0]


def add_event(
    db: DuckDBEngine,
    user: str,
    feature: str | None,
    at: datetime,
    *,
    first_use: bool = False,
    event_type: str = "feature_used",
    workspace: str = "ws_1",
) -> None:
    _N[0] += 1
    db.execute(
        "INSERT INTO events (event_id, user_id, workspace_id, event_type, timestamp,"
        " feature_category, is_first_use) VALUES ($id, $u, $ws, $t, $at, $f, $fu)",
        {
            "id": f"evt_{_N[0]}",
            "u": user,
            "ws": workspace,
            "t": event_type,
            "at": at,
            "f": feature,
            "fu": first_use,
        },
    )


def feedback_rows(db: DuckDBEngine) -> dict[str, dict[str, Any]]:
    rows = db.query_rows("SELECT * FROM ml.recommendation_feedback ORDER BY recommendation_id")
    return {r["recommendation_id"]: r for r in rows}
