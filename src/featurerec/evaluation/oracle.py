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


def _truth_matrix(truth: Any) -> tuple[list[str], list[str], np.ndarray]:
    """(user ids, feature names, utility matrix) from whatever shape GroundTruth has."""
    for users_attr, feats_attr, mat_attr in (
        ("user_ids", "features", "utility"),
        ("users", "features", "utility"),
        ("user_ids", "feature_names", "utility"),
        ("user_ids", "features", "utilities"),
    ):
        if all(hasattr(truth, a) for a in (users_attr, feats_attr, mat_attr)):
            return (
                [str(u) for u in getattr(truth, users_attr)],
                [str(f) for f in getattr(truth, feats_attr)],
                np.asarray(getattr(truth, mat_attr), dtype=np.float64),
            )
    raise DataError(
        f"ground truth object {type(truth).__name__} has no (user_ids, features, utility); "
        "cannot build the oracle"
    )


def oracle_scores(world: Path, user_ids: Sequence[str], features: Sequence[str]) -> np.ndarray:
    """(n_users, n_features) true utilities for the given users and feature order."""
    try:
        from featurerec.simulate.truth import GroundTruth
    except ImportError as exc:
        raise DataError(f"--world needs the simulator's ground truth module: {exc}") from None
    world = Path(world)
    if not (world / "ground_truth").exists():
        raise DataError(f"{world} has no ground_truth/ folder: not a simulated world")
    truth = GroundTruth.load(world)
    if hasattr(truth, "utility_for"):
        return np.asarray(truth.utility_for(list(user_ids), list(features)), dtype=np.float64)
    t_users, t_feats, util = _truth_matrix(truth)
    u_idx = {u: i for i, u in enumerate(t_users)}
    f_idx = {f: j for j, f in enumerate(t_feats)}
    rows = np.array([u_idx.get(u, -1) for u in user_ids])
    cols = np.array([f_idx.get(f, -1) for f in features])
    out = np.full((len(user_ids), len(features)), -np.inf)
    ok_r, ok_c = rows >= 0, cols >= 0
    sub = util[np.ix_(rows[ok_r], cols[ok_c])]
    out[np.ix_(np.nonzero(ok_r)[0], np.nonzero(ok_c)[0])] = sub
    return out
