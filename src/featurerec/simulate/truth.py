"""Hidden ground truth of a simulated world, for evaluation's oracle and the response model.

Only :mod:`featurerec.evaluation` (to rank by true utility: the ceiling) and the simulator's
own response model / online continuation may import this module. The engine (transforms,
models, serving) never does; a test greps for it.

``GroundTruth.load(world_dir)`` reads ``world_dir/ground_truth/``:

* ``utility`` (users x features, float32): the utility each user would get from each feature
  (context + latent taste + noise, see :mod:`featurerec.simulate.dynamics`). Higher is better;
  ``sigmoid(utility)`` reads as "how likely this feature is worth it to them".
* ``eligible`` (bool): the feature is on the user's plan and inside its flag rollout.
* ``adopt_day`` (int32): day index (0 = first simulated day) of the user's first use; negative
  for first uses before the window; :data:`NOT_ADOPTED` if never.
* ``kept`` (bool): the user kept using the feature after trying it.
* ``churn_day``: the day the user's workspace churned (they are gone after it).

Example (oracle top-3 among features not yet used)::

    truth = GroundTruth.load("world")
    idx = truth.user_index(["usr_0000042"])
    scores = truth.oracle_scores(idx)          # -inf where adopted or not eligible
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurerec.errors import DataError

NOT_ADOPTED = 2**30


@dataclass
class GroundTruth:
    features: tuple[str, ...]
    groups: np.ndarray
    utility: np.ndarray
    eligible: np.ndarray
    adopt_day: np.ndarray
    kept: np.ndarray
    signup_day: np.ndarray
    start: date
    days: int
    #: last day the user can be active: their workspace's churn day (NOT_ADOPTED if never)
    churn_day: np.ndarray | None = None
    #: organic discovery model (see adoption_propensity)
    item_discover: np.ndarray | None = None
    p_active: np.ndarray | None = None
    hazard: dict[str, Any] | None = None

    @classmethod
    def load(cls, world_dir: Path | str) -> GroundTruth:
        gt = Path(world_dir) / "ground_truth"
        meta_path = gt / "truth.json"
        if not meta_path.exists():
            raise DataError(f"{world_dir}: no ground_truth/truth.json (not a simulated world?)")
        meta = json.loads(meta_path.read_text())
        n_chunks = len(meta["chunks"])
        utility = np.concatenate([np.load(gt / f"utility-{c:05d}.npy") for c in range(n_chunks)])
        eligible = np.concatenate([np.load(gt / f"eligible-{c:05d}.npy") for c in range(n_chunks)])
        adopt, kept, ws_churn = [], [], []
        for c in range(n_chunks):
            with np.load(gt / f"state-{c:05d}.npz") as z:
                adopt.append(z["adopt_day"])
                kept.append(z["kept"])
                ws_churn.append(z["ws_churn"])
        with np.load(gt / "population.npz") as pop:
            signup = pop["user_signup_day"].copy()
            user_ws = pop["user_ws"]
            discover = pop["item_discover"].copy() if "item_discover" in pop else None
            p_active = pop["user_p_active"].copy() if "user_p_active" in pop else None
        return cls(
            features=tuple(meta["features"]),
            groups=np.array(meta["groups"], dtype=np.int32),
            utility=utility,
            eligible=eligible,
            adopt_day=np.concatenate(adopt),
            kept=np.concatenate(kept),
            signup_day=signup,
            start=date.fromisoformat(meta["start"]),
            days=int(meta["days"]),
            churn_day=np.concatenate(ws_churn)[user_ws],
            item_discover=discover,
            p_active=p_active,
            hazard=meta.get("hazard"),
        )

    # ------------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return int(self.utility.shape[0])

    def user_index(self, user_ids: list[str] | np.ndarray | pa.Array) -> np.ndarray:
        """Row indexes of ``usr_NNNNNNN`` ids; unknown ids raise :class:`DataError`."""
        arr = user_ids if isinstance(user_ids, pa.Array) else pa.array(list(user_ids), pa.string())
        if len(arr) == 0:
            return np.empty(0, dtype=np.int64)
        ok = pc.all(pc.match_substring_regex(arr, r"^usr_\d+$")).as_py()
        if not ok:
            bad = [u for u in arr.to_pylist() if not (u or "").startswith("usr_")][:3]
            raise DataError(f"not simulated user ids: {bad}")
        idx = pc.cast(pc.utf8_slice_codeunits(arr, 4), pa.int64()).to_numpy()
        if (idx >= self.n_users).any():
            raise DataError(f"user index out of range for a {self.n_users}-user world")
        return idx

    def feature_index(self, features: list[str] | np.ndarray) -> np.ndarray:
        pos = {f: i for i, f in enumerate(self.features)}
        try:
            return np.array([pos[f] for f in features], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"unknown feature {exc.args[0]!r} (world has {len(pos)})") from None

    def day_of(self, when: datetime | np.ndarray) -> np.ndarray:
        """Fractional day index (0 = world start) of timestamps."""
        t0 = np.datetime64(datetime(self.start.year, self.start.month, self.start.day), "us")
        w = np.asarray(when, dtype="datetime64[us]")
        return (w - t0).astype(np.int64) / 86_400_000_000

    def adopted_by(self, day: float) -> np.ndarray:
        """(users, features) bool: first use happened before ``day`` ends."""
        return self.adopt_day <= np.floor(day)

    def oracle_scores(self, users: np.ndarray, as_of_day: float | None = None) -> np.ndarray:
        """True utility with -inf where the feature was already used (by ``as_of_day``,
        default: the end of the simulated window) or is not available to the user."""
        day = self.days - 1 if as_of_day is None else as_of_day
        u = np.asarray(users, dtype=np.int64)
        s = self.utility[u].astype(np.float64)
        s[(self.adopt_day[u] <= np.floor(day)) | ~self.eligible[u]] = -np.inf
        return s

    def adoption_propensity(
        self, users: np.ndarray, as_of_day: float | None = None, horizon_days: float = 7.0
    ) -> np.ndarray:
        """Probability that each user first uses each feature *by themselves* within
        ``horizon_days`` after ``as_of_day`` (default: the end of the window), from the
        world's own discovery hazard (visibility x sigmoid(utility) x boosts from features
        already used x onboarding).

        This is the ceiling for "which features will they adopt next" (a time-split offline
        evaluation), whereas :meth:`oracle_scores` (utility) is the ceiling for "which feature
        is worth recommending": visible features get adopted without help, valuable hidden
        ones do not. 0 where already used, not available, or the user is not present.
        """
        if self.item_discover is None or self.p_active is None or self.hazard is None:
            raise DataError("this world's ground truth predates adoption_propensity; regenerate")
        hz = self.hazard
        day = np.floor(self.days - 1 if as_of_day is None else as_of_day)
        u = np.asarray(users, dtype=np.int64)
        adopted = self.adopt_day[u] <= day
        n_groups = len(hz["boost"])
        areas = np.zeros((len(u), n_groups))
        for g in range(n_groups):
            cols = self.groups == g
            if cols.any():
                areas[:, g] = adopted[:, cols].any(axis=1)
        boost = 1.0 + (areas @ np.asarray(hz["boost"]))[:, self.groups]
        age = np.maximum(day - self.signup_day[u], 0)
        onboard = 1.0 + hz["onboarding_boost"] * np.exp(-age / hz["onboarding_days"])
        util = self.utility[u].astype(np.float64) - hz["discover_offset"]
        h = self.item_discover[None, :] / (1.0 + np.exp(-util)) * boost * onboard[:, None]
        sub = np.bincount(self.groups) > 1
        if sub.any():
            is_core = np.zeros(len(self.features), dtype=bool)
            is_core[:n_groups] = True
            h *= np.where(is_core[None, :] | (areas[:, self.groups] > 0), 1.0, 0.1)
        week = (5 + 2 * hz["weekend_factor"]) / 7
        active_days = self.p_active[u] * horizon_days * week
        p = -np.expm1(-h * active_days[:, None])
        present = self.signup_day[u] <= day
        if self.churn_day is not None:
            present &= self.churn_day[u] > day
        p[adopted | ~self.eligible[u] | ~present[:, None]] = 0.0
        return p

    def day_datetime(self, day: float) -> datetime:
        return datetime(self.start.year, self.start.month, self.start.day) + timedelta(days=day)
