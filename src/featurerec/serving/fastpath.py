"""Request-path accelerators for a model bundle that keep MODELS' strategy code in charge.

The strategies API is batch-first; for a batch of one its fixed costs dominate (solving the
ALS user factor through ``implicit`` with a thread-pool probe, building scipy sparse
matrices for the recency weights). Serving swaps two components of the bundle for drop-in
equivalents and then calls the unchanged :class:`featurerec.models.strategies.Strategy`:

* :class:`CachedALS`: the user factors of every user in the online state are computed once,
  in one batch, when the model loads (the same ``ALSScorer.user_factors``); a request looks
  the factor up, and recomputes it (through the real scorer) only when the user's
  interactions changed since (keyed by a hash of the interactions);
* :class:`DenseSequence`: the same transition-score formula on a dense (items x items)
  matrix with a small numpy recency vector instead of scipy matrices.

``tests/test_serving_fastpath.py`` checks that the accelerated bundle ranks exactly like the
original one for every strategy.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from featurerec.models.base import UserState

_OVERFLOW = 100_000


def interactions_key(user: UserState) -> int:
    """Hash of a user's interactions (what the ALS factor depends on)."""
    return hash(tuple(sorted(user.interactions.items())))


class CachedALS:
    """``ALSScorer`` with precomputed user factors (see module doc)."""

    def __init__(self, als: Any, users: Sequence[UserState], batch: int = 20_000) -> None:
        self.inner = als
        self.name = als.name
        self.space = als.space
        self.params = als.params
        self.item_factors = als.item_factors
        self._item_t = np.ascontiguousarray(als.item_factors.T)
        self._row = {u.user_id: i for i, u in enumerate(users)}
        self._key = np.fromiter((interactions_key(u) for u in users), np.int64, len(users))
        parts = [als.user_factors(users[s : s + batch]) for s in range(0, len(users), batch)]
        k = als.item_factors.shape[1]
        self._factors = (
            np.vstack(parts).astype(np.float32) if parts else np.zeros((0, k), np.float32)
        )
        self._overflow: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __getattr__(self, name: str) -> Any:  # anything else: the real scorer
        return getattr(self.inner, name)

    def user_factors(self, users: Sequence[UserState]) -> np.ndarray:
        out = np.zeros((len(users), self.item_factors.shape[1]), dtype=np.float32)
        missing: list[int] = []
        keys: list[int] = []
        for i, u in enumerate(users):
            key = interactions_key(u)
            keys.append(key)
            row = self._row.get(u.user_id)
            if row is not None and self._key[row] == key:
                out[i] = self._factors[row]
                continue
            hit = self._overflow.get((u.user_id, key))
            if hit is not None:
                out[i] = hit
            else:
                missing.append(i)
        if missing:
            fresh = self.inner.user_factors([users[i] for i in missing])
            for i, f in zip(missing, fresh, strict=True):
                out[i] = f
                self._overflow[(users[i].user_id, keys[i])] = f
            while len(self._overflow) > _OVERFLOW:
                self._overflow.popitem(last=False)
        return out

    def score(self, users: Sequence[UserState]) -> np.ndarray:
        return (self.user_factors(users) @ self._item_t).astype(np.float32)

    @property
    def cached_users(self) -> int:
        return len(self._row)


class DenseSequence:
    """``SequenceScorer`` on a dense transition matrix (identical scores)."""

    def __init__(self, seq: Any) -> None:
        self.inner = seq
        self.name = seq.name
        self.space = seq.space
        self.decay = seq.decay
        self.transitions = seq.transitions
        self._t = np.asarray(seq.transitions.toarray(), dtype=np.float32)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _weights(self, users: Sequence[UserState]) -> np.ndarray:
        w = np.zeros((len(users), len(self.space)), dtype=np.float32)
        index = self.space.index
        for r, u in enumerate(users):
            n = len(u.recent_features)
            for pos, f in enumerate(u.recent_features):
                j = index.get(f)
                if j is not None:
                    w[r, j] = max(w[r, j], np.float32(self.decay ** (n - 1 - pos)))
        return w

    def score(self, users: Sequence[UserState]) -> np.ndarray:
        return (self._weights(users) @ self._t).astype(np.float32)

    def strongest_source(self, users: Sequence[UserState], item_ids: np.ndarray) -> np.ndarray:
        w = self._weights(users)
        safe = np.maximum(item_ids, 0)
        contrib = w[:, None, :] * self._t.T[safe]
        best = contrib.argmax(axis=2)
        has = contrib.max(axis=2) > 0
        return np.where(has & (item_ids >= 0), best, -1)


def accelerate(bundle: Any, users: Sequence[UserState]) -> Any:
    """A copy of ``bundle`` with :class:`CachedALS` / :class:`DenseSequence` swapped in."""
    changes: dict[str, Any] = {}
    if bundle.als is not None:
        changes["als"] = CachedALS(bundle.als, users)
    if bundle.sequence is not None:
        changes["sequence"] = DenseSequence(bundle.sequence)
    return dataclasses.replace(bundle, **changes) if changes else bundle
