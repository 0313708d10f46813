"""Per-round rewards: one definition for off-policy estimates and the online results they are
compared with.

A *round* is one served recommendation (one slot of a slate), the unit the logged propensity
refers to. Its rewards, read from ``ml.recommendation_feedback`` (attribution):

* ``click_through_rate``: ``clicked`` (0/1);
* ``rec_adoption_7d``: ``adopted_7d`` (0/1), the recommended feature's first use within 7
  days of the recommendation. Only rounds whose 7-day window has closed by ``as_of`` count
  (``generated_at + 7 days <= as_of``): an open window can only miss adoptions, so mixing
  open and closed windows biases the rate down by however many rounds are recent.

Both sides of an OPE-vs-online comparison use :func:`load_rounds` and :data:`METRICS`, so
the reward, its denominator (rounds) and its censoring rule are the same; the online rate is
sum(reward) / rounds per variant with a user-clustered delta-method interval (the user is
the randomisation unit), as OPE's intervals cluster by user too.

Example::

    >>> from featurerec.warehouse.engine import DuckDBEngine
    >>> from datetime import datetime
    >>> with DuckDBEngine(":memory:") as db:
    ...     load_rounds(db, as_of=datetime(2026, 3, 1)).n
    0
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from featurerec.experiments import stats as st

#: Metric -> attribution window in days (None: known as soon as the round is responded to).
METRICS: dict[str, int | None] = {"click_through_rate": None, "rec_adoption_7d": 7}
_COLUMN = {"click_through_rate": "clicked", "rec_adoption_7d": "adopted_7d"}
#: Exposure strata of a round: the user's first, second, or third or later showing of the
#: feature (``Rounds.showing`` 1, 2, >= 3).
SHOWINGS = ("first", "second", "third+")


@dataclass(frozen=True)
class Rounds:
    """Parallel arrays, one entry per round."""

    recommendation_id: np.ndarray
    user_id: np.ndarray
    variant: np.ndarray
    generated_at: np.ndarray
    clicked: np.ndarray
    adopted_7d: np.ndarray
    as_of: datetime
    #: How many times the user had been recommended this feature up to and including this
    #: round (by anyone, at any time in the recommendation log): 1 = a first showing
    showing: np.ndarray
    #: 1 when the user dismissed the recommendation
    dismissed: np.ndarray

    @property
    def n(self) -> int:
        return int(self.recommendation_id.shape[0])

    def reward(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(reward per round, mask of rounds whose window for ``metric`` has closed)."""
        if metric not in METRICS:
            raise KeyError(f"unknown per-round metric {metric!r} (known: {list(METRICS)})")
        r = getattr(self, _COLUMN[metric]).astype(np.float64)
        window = METRICS[metric]
        if window is None:
            return r, np.ones(self.n, dtype=bool)
        cutoff = np.datetime64(self.as_of - timedelta(days=window), "us")
        return r, self.generated_at <= cutoff

    def subset(self, mask: np.ndarray) -> Rounds:
        return Rounds(
            self.recommendation_id[mask],
            self.user_id[mask],
            self.variant[mask],
            self.generated_at[mask],
            self.clicked[mask],
            self.adopted_7d[mask],
            self.as_of,
            self.showing[mask],
            self.dismissed[mask],
        )


def load_rounds(
    engine: Any,
    *,
    as_of: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
    experiment: str | None = None,
    logging: bool = False,
    include_random: bool = False,
) -> Rounds:
    """Rounds generated in [``start``, ``end``] (and by ``as_of``) of ``experiment`` (its
    variants), or with ``logging=True`` the rounds served outside any experiment by a
    non-random strategy (the production policy whose log OPE reads; a random holdout
    served next to it is not part of it). With ``include_random=True`` rounds served by
    the random strategy count too: a logging policy that serves uniformly at random part
    of the time (its propensities are the mixture's) must be read whole, or OPE would see a
    sample selected by which strategy served. Run attribution as of ``as_of`` first."""
    where = ["generated_at <= $as_of"]
    params: dict[str, Any] = {"as_of": as_of}
    if start is not None:
        where.append("generated_at >= $start")
        params["start"] = start
    if end is not None:
        where.append("generated_at <= $end")
        params["end"] = end
    if logging:
        where.append("experiment IS NULL")
        if not include_random:
            where.append("strategy <> 'random'")
    elif experiment is not None:
        where.append("experiment = $experiment AND variant IS NOT NULL")
        params["experiment"] = experiment
    rows = engine.query_rows(
        # showings are counted over the whole log, before the filter
        "WITH f AS (SELECT *, ROW_NUMBER() OVER (PARTITION BY user_id, recommended_feature "
        "ORDER BY generated_at, recommendation_id) AS showing "
        "FROM ml.recommendation_feedback) "
        "SELECT recommendation_id, user_id, COALESCE(variant, '') AS variant, generated_at, "
        "clicked, adopted_7d, showing, dismissed FROM f WHERE "
        + " AND ".join(where)
        + " ORDER BY generated_at, recommendation_id",
        params,
    )
    return Rounds(
        np.array([r["recommendation_id"] for r in rows], dtype=object),
        np.array([r["user_id"] for r in rows], dtype=object),
        np.array([r["variant"] for r in rows], dtype=object),
        np.array([r["generated_at"] for r in rows], dtype="datetime64[us]"),
        np.array([int(r["clicked"] or 0) for r in rows], dtype=np.int64),
        np.array([int(r["adopted_7d"] or 0) for r in rows], dtype=np.int64),
        as_of,
        np.array([int(r["showing"]) for r in rows], dtype=np.int64),
        np.array([int(r["dismissed"] or 0) for r in rows], dtype=np.int64),
    )


def showing_stratum(showing: np.ndarray) -> np.ndarray:
    """``Rounds.showing`` as the labels of :data:`SHOWINGS`."""
    k = np.minimum(np.asarray(showing, dtype=np.int64), len(SHOWINGS)) - 1
    if k.size and k.min() < 0:
        raise ValueError("showing counts start at 1")
    return np.asarray(SHOWINGS, dtype=object)[k]


def online_rate(rounds: Rounds, metric: str) -> st.Estimate:
    """sum(reward) / rounds over the rounds whose window has closed, with a user-clustered
    delta-method 95% interval (users without such rounds do not count)."""
    r, mask = rounds.reward(metric)
    if not mask.any():
        return st.Estimate(None, None, None, 0, "no closed windows")
    _, inv = np.unique(rounds.user_id[mask], return_inverse=True)
    num = np.bincount(inv, weights=r[mask])
    den = np.bincount(inv).astype(np.float64)
    return st.ratio_of_sums(num, den)


def online_rates(rounds: Rounds, variants: list[str]) -> dict[str, dict[str, st.Estimate]]:
    """:func:`online_rate` per variant and metric."""
    return {
        v: {m: online_rate(rounds.subset(rounds.variant == v), m) for m in METRICS}
        for v in variants
    }


def consistent(a: st.Estimate | Any, b: st.Estimate | Any) -> tuple[float | None, bool | None]:
    """Two-sided p-value of ``a.value - b.value = 0`` from two independent normal estimates
    (``se`` each), and whether it is >= 0.05: a check that accounts for the uncertainty of
    both sides, unlike "is a's point inside b's interval", which a perfectly unbiased but
    noisier ``a`` fails most of the time."""
    if a.value is None or b.value is None or a.se is None or b.se is None:
        return None, None
    se = float(np.hypot(a.se, b.se))
    if not np.isfinite(se) or se <= 0:
        return None, None
    from scipy import stats

    p = float(2 * stats.norm.sf(abs(a.value - b.value) / se))
    return p, p >= 0.05
