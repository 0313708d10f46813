"""Popularity and random baselines (the floor every strategy must beat)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np

from featurerec.errors import ModelError
from featurerec.models.base import TrainingData, UserState
from featurerec.models.common import (
    ItemSpace,
    read_artifact,
    splitmix64,
    stable_user_hash,
    uniform_from_hash,
    write_artifact,
)


class PopularityScorer:
    """Score = share of training users who use the feature (the same for every user)."""

    name = "popularity"

    def __init__(self) -> None:
        self.space = ItemSpace([])
        self.share = np.zeros(0, dtype=np.float32)

    def fit(self, data: TrainingData) -> Self:
        if not data.features:
            raise ModelError("popularity: the training data has no features")
        self.space = ItemSpace(data.features)
        n_users = max(data.matrix.shape[0], 1)
        users_per_item = np.bincount(data.matrix.indices, minlength=len(self.space))
        self.share = (users_per_item / n_users).astype(np.float32)
        return self

    def score(self, users: Sequence[UserState]) -> np.ndarray:
        return np.broadcast_to(self.share, (len(users), len(self.share))).copy()

    def save(self, path: Path) -> None:
        write_artifact(path, self.name, {"features": self.space.features}, {"share": self.share})

    @classmethod
    def load(cls, path: Path) -> Self:
        meta, arrays = read_artifact(path, cls.name)
        obj = cls()
        obj.space = ItemSpace(meta["features"])
        obj.share = arrays["share"].astype(np.float32)
        return obj


class RandomScorer:
    """Uniform random scores, a deterministic function of (seed, user id, item).

    The same user gets the same random order in every process (no hidden state), so the
    random baseline is reproducible and its propensity is exactly uniform.
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.space = ItemSpace([])

    def fit(self, data: TrainingData) -> Self:
        self.space = ItemSpace(data.features)
        return self

    def score(self, users: Sequence[UserState]) -> np.ndarray:
        h = stable_user_hash([u.user_id for u in users], self.seed)
        items = np.arange(len(self.space), dtype=np.uint64)
        with np.errstate(over="ignore"):
            mixed = splitmix64(h[:, None] * np.uint64(0x100000001B3) + items[None, :])
        return uniform_from_hash(mixed).astype(np.float32)

    def save(self, path: Path) -> None:
        write_artifact(path, self.name, {"features": self.space.features, "seed": self.seed}, {})

    @classmethod
    def load(cls, path: Path) -> Self:
        meta, _ = read_artifact(path, cls.name)
        obj = cls(seed=int(meta["seed"]))
        obj.space = ItemSpace(meta["features"])
        return obj
