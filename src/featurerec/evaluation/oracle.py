"""The oracle ranking: a simulated world's true utilities (the ceiling of any model).

Only evaluation reads the hidden ground truth (``DIR/ground_truth/``) through
:meth:`featurerec.simulate.truth.GroundTruth.load`. Users or features the truth does not
know get -inf (never ranked above a known one).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from featurerec.errors import DataError


def oracle_scores(
    world: Path,
    user_ids: Sequence[str],
    features: Sequence[str],
    *,
    as_of: datetime | None = None,
    horizon_days: float = 7.0,
) -> dict[str, np.ndarray]:
    """Ceiling rankings from the world's hidden truth, each (n_users, n_features):

    - ``oracle``: with ``as_of`` (a time split) and a world that records it, the probability
      that the user adopts each feature by themselves in the ``horizon_days`` after the cut
      (the world's own discovery hazard): the ceiling for "what will they adopt next";
      otherwise the true utility;
    - ``oracle_utility``: the true utility (the ceiling for "what is worth recommending",
      which is not what a time split scores: visible features get adopted anyway).

    -inf where the feature is not available to the user (plan / flag rollout) or unknown.
    """
    try:
        from featurerec.simulate.truth import GroundTruth
    except ImportError as exc:
        raise DataError(f"--world needs the simulator's ground truth module: {exc}") from None
    truth: Any = GroundTruth.load(Path(world))
    rows = truth.user_index(list(user_ids))
    pos = {f: j for j, f in enumerate(truth.features)}
    cols = np.array([pos.get(f, -1) for f in features], dtype=np.int64)
    safe = np.maximum(cols, 0)
    elig = np.asarray(truth.eligible[rows], dtype=bool)[:, safe]
    util = np.asarray(truth.utility[rows], dtype=np.float64)[:, safe]
    out = {"oracle_utility": np.where(elig, util, -np.inf)}
    prop = None
    if as_of is not None and hasattr(truth, "adoption_propensity"):
        try:
            day = float(truth.day_of(np.datetime64(as_of, "us")))
            prop = np.asarray(
                truth.adoption_propensity(rows, as_of_day=day, horizon_days=horizon_days),
                dtype=np.float64,
            )[:, safe]
        except DataError:
            prop = None  # a world generated before the simulator recorded its hazard
    out["oracle"] = np.where(elig, prop, -np.inf) if prop is not None else out["oracle_utility"]
    for v in out.values():
        v[:, cols < 0] = -np.inf
    return out
