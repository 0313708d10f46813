"""Helpers every model shares: the item space, batch matrices from user states, score
calibration, seeded hashing and the artifact format.

Artifacts are a folder with ``meta.json`` (kind, params, item names) and ``arrays.npz``
(numbers only, loaded with ``allow_pickle=False``): nothing executable is ever unpickled
from a registry folder.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from featurerec.errors import ModelError
from featurerec.models.base import UserState

ARTIFACT_META = "meta.json"
ARTIFACT_ARRAYS = "arrays.npz"


class ItemSpace:
    """The ordered item (feature) names of a model and their integer ids."""

    def __init__(self, features: Sequence[str]) -> None:
        self.features = list(features)
        if len(set(self.features)) != len(self.features):
            raise ModelError("feature names must be unique in the item space")
        self.index = {f: i for i, f in enumerate(self.features)}

    def __len__(self) -> int:
        return len(self.features)

    def ids(self, names: Sequence[str]) -> np.ndarray:
        """Ids of ``names``; unknown names get -1."""
        return np.array([self.index.get(n, -1) for n in names], dtype=np.int64)


def interactions_csr(users: Sequence[UserState], space: ItemSpace) -> sp.csr_matrix:
    """(n_users, n_items) CSR of interaction strengths; features outside the space are dropped."""
    indptr = [0]
    indices: list[int] = []
    data: list[float] = []
    index = space.index
    for u in users:
        for f, v in u.interactions.items():
            j = index.get(f)
            if j is not None:
                indices.append(j)
                data.append(v)
        indptr.append(len(indices))
    m = sp.csr_matrix(
        (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int32), indptr),
        shape=(len(users), len(space)),
    )
    m.sum_duplicates()
    return m


def adopted_mask(users: Sequence[UserState], space: ItemSpace) -> np.ndarray:
    """(n_users, n_items) bool: True where the user already uses the feature."""
    m = interactions_csr(users, space)
    out = np.zeros(m.shape, dtype=bool)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    out[rows, m.indices] = True
    return out


def recency_matrix(users: Sequence[UserState], space: ItemSpace, decay: float) -> sp.csr_matrix:
    """(n_users, n_items) weights of each user's recent features: the most recent gets 1,
    the one before ``decay``, then ``decay**2``, ... (a feature seen twice keeps its max)."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    index = space.index
    for r, u in enumerate(users):
        n = len(u.recent_features)
        for pos, f in enumerate(u.recent_features):
            j = index.get(f)
            if j is not None:
                rows.append(r)
                cols.append(j)
                vals.append(decay ** (n - 1 - pos))
    m = sp.coo_matrix(
        (np.asarray(vals, dtype=np.float32), (rows, cols)), shape=(len(users), len(space))
    ).tocsr()
    if m.nnz:
        # duplicates: keep the max weight, not the sum
        dense_max = sp.coo_matrix((np.asarray(vals, dtype=np.float32), (rows, cols)), shape=m.shape)
        order = np.lexsort((-dense_max.data, dense_max.col, dense_max.row))
        r_, c_, v_ = dense_max.row[order], dense_max.col[order], dense_max.data[order]
        first = np.ones(len(r_), dtype=bool)
        first[1:] = (r_[1:] != r_[:-1]) | (c_[1:] != c_[:-1])
        m = sp.csr_matrix((v_[first], (r_[first], c_[first])), shape=m.shape)
    return m


def stable_user_hash(user_ids: Sequence[str], seed: int) -> np.ndarray:
    """A uint64 per user id, stable across processes and platforms (crc32 + seed mix)."""
    h = np.fromiter(
        (zlib.crc32(u.encode()) for u in user_ids), dtype=np.uint64, count=len(user_ids)
    )
    return splitmix64(h ^ np.uint64(seed & 0xFFFFFFFF) << np.uint64(32))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser: a good 64-bit mixing of integers."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform_from_hash(h: np.ndarray) -> np.ndarray:
    """Map uint64 hashes to floats in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class Calibrator:
    """Maps raw scores of one model to 0..1 by their empirical CDF over training scores.

    Rank-preserving, and it puts every component on the same scale, so blends and the
    bandit's inputs mean the same thing whatever the model ("0.87" = higher than 87% of the
    model's scores for training users).
    """

    quantiles: np.ndarray

    @classmethod
    def fit(
        cls, scores: np.ndarray, n: int = 201, max_sample: int = 200_000, seed: int = 0
    ) -> Calibrator:
        s = np.asarray(scores, dtype=np.float64).ravel()
        s = s[np.isfinite(s)]
        if s.size == 0:
            return cls(np.array([0.0, 1.0]))
        if s.size > max_sample:
            s = np.random.default_rng(seed).choice(s, max_sample, replace=False)
        q = np.quantile(s, np.linspace(0, 1, n))
        return cls(q)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        q = self.quantiles
        grid = np.linspace(0, 1, len(q))
        # distinct quantile values only (ties would make interp ambiguous)
        uq, first = np.unique(q, return_index=True)
        if len(uq) == 1:
            return np.where(np.asarray(scores) >= uq[0], 1.0, 0.0).astype(np.float32)
        last = np.r_[first[1:] - 1, len(q) - 1]
        mid = (grid[first] + grid[last]) / 2
        return np.interp(scores, uq, mid).astype(np.float32)


# -- artifact format -------------------------------------------------------------------


def write_artifact(
    path: Path, kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]
) -> None:
    """Write ``meta.json`` + ``arrays.npz`` into ``path`` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / ARTIFACT_ARRAYS, **arrays)  # type: ignore[arg-type]
    (path / ARTIFACT_META).write_text(json.dumps({"kind": kind, **meta}, indent=2, sort_keys=True))


def read_artifact(path: Path, kind: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read an artifact written by :func:`write_artifact`, checking its kind."""
    path = Path(path)
    meta_file = path / ARTIFACT_META
    if not meta_file.exists():
        raise ModelError(f"model artifact missing: {meta_file} does not exist")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model artifact corrupt: {meta_file}: {exc}") from None
    if meta.get("kind") != kind:
        raise ModelError(f"{path}: artifact kind is {meta.get('kind')!r}, expected {kind!r}")
    arrays: dict[str, np.ndarray] = {}
    arr_file = path / ARTIFACT_ARRAYS
    if arr_file.exists():
        try:
            with np.load(arr_file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # zipfile / value errors from a truncated file
            raise ModelError(f"model artifact corrupt: {arr_file}: {exc}") from None
    return meta, arrays


def artifact_kind(path: Path) -> str | None:
    """The kind recorded in an artifact folder, or None if it has none."""
    meta_file = Path(path) / ARTIFACT_META
    if not meta_file.exists():
        return None
    try:
        return str(json.loads(meta_file.read_text()).get("kind"))
    except json.JSONDecodeError:
        return None


def segment_of(event_count: int, cold_max: int = 5, warm_max: int = 50) -> str:
    """Spec Stage 5 segments: cold (< 5 events), warm (5-49), active (50+)."""
    if event_count < cold_max:
        return "cold"
    if event_count < warm_max:
        return "warm"
    return "active"
