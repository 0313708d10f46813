"""The oracle ranking: a simulated world's true utilities (the ceiling of any model).

Only evaluation reads the hidden ground truth (``DIR/ground_truth/``) through
:meth:`featurerec.simulate.truth.GroundTruth.load`. Users or features the truth does not
know get -inf (never ranked above a known one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurerec.errors import DataError


def oracle_scores(world: Path, user_ids: Sequence[str], features: Sequence[str]) -> np.ndarray:
    """(n_users, n_features) true utilities for the given users and feature order; -inf
    where the feature is not available to the user (plan / flag rollout), which the ceiling
    may know. Features the world does not have get -inf."""
    try:
        from featurerec.simulate.truth import GroundTruth
    except ImportError as exc:
        raise DataError(f"--world needs the simulator's ground truth module: {exc}") from None
    truth: Any = GroundTruth.load(Path(world))
    rows = truth.user_index(list(user_ids))
    pos = {f: j for j, f in enumerate(truth.features)}
    cols = np.array([pos.get(f, -1) for f in features], dtype=np.int64)
    util = np.asarray(truth.utility[rows], dtype=np.float64)[:, np.maximum(cols, 0)]
    elig = np.asarray(truth.eligible[rows], dtype=bool)[:, np.maximum(cols, 0)]
    out = np.where(elig, util, -np.inf)
    out[:, cols < 0] = -np.inf
    return out
