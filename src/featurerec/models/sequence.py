"""Sequence model: which feature comes next, given the user's recent features.

Built from ``ml.feature_transition_probs`` (P(to | from) over consecutive distinct features
within sessions). A user's score for feature ``j`` is a recency-weighted sum over the
user's recent features ``f_1 .. f_n`` (most recent last)::

    score(j) = sum_t decay**(n - t) * P(j | f_t)

i.e. a mixture of first-order Markov predictions in which the latest feature counts most.
One sparse product per batch: ``recency (users x items) @ P (items x items)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np
import scipy.sparse as sp

from featurerec.errors import ModelError
from featurerec.models.base import TrainingData, UserState
from featurerec.models.common import ItemSpace, read_artifact, recency_matrix, write_artifact


class SequenceScorer:
    """Next-feature scores from transition probabilities with recency decay."""

    name = "sequence"

    def __init__(self, decay: float = 0.5) -> None:
        if not 0 < decay <= 1:
            raise ModelError(f"sequence model: decay must be in (0, 1] (got {decay})")
        self.decay = decay
        self.space = ItemSpace([])
        self.transitions = sp.csr_matrix((0, 0), dtype=np.float32)

    def fit(self, data: TrainingData) -> Self:
        if not data.features:
            raise ModelError("sequence model: the training data has no features")
        self.space = ItemSpace(data.features)
        n = len(self.space)
        rows, cols, vals = [], [], []
        for (a, b), p in data.transitions.items():
            i, j = self.space.index.get(a), self.space.index.get(b)
            if i is not None and j is not None and i != j and p > 0:
                rows.append(i)
                cols.append(j)
                vals.append(float(p))
        self.transitions = sp.csr_matrix(
            (np.asarray(vals, dtype=np.float32), (rows, cols)), shape=(n, n)
        )
        return self

    def score(self, users: Sequence[UserState]) -> np.ndarray:
        w = recency_matrix(users, self.space, self.decay)
        return np.asarray((w @ self.transitions).todense(), dtype=np.float32)

    def strongest_source(self, users: Sequence[UserState], item_ids: np.ndarray) -> np.ndarray:
        """For each (user, item) the recent feature whose transition contributes most to
        the item's score (id), or -1 when none does; used by serving for reasons. Ties go to
        the lowest feature id. Only the users' recent features are looked at (a handful
        each), so the cost does not grow with items x items."""
        ids = np.asarray(item_ids)
        n = ids.shape[0]
        out = np.full(ids.shape, -1, dtype=np.int64)
        w = recency_matrix(users, self.space, self.decay).tocsr()
        if w.nnz == 0 or ids.size == 0:
            return out
        w.sort_indices()  # each user's sources by id: argmax keeps the lowest on ties
        counts = np.diff(w.indptr)
        row = np.repeat(np.arange(n), counts)
        slot = np.arange(w.nnz) - w.indptr[row]
        width = int(counts.max())
        sources, where = np.unique(w.indices, return_inverse=True)
        src = np.full((n, width), -1, dtype=np.int64)
        src[row, slot] = w.indices
        at = np.zeros((n, width), dtype=np.int64)  # row of the source in `rows` below
        at[row, slot] = where
        wts = np.zeros((n, width), dtype=w.dtype)  # 0 pads: they never win
        wts[row, slot] = w.data
        rows = self.transitions[sources].toarray()  # (sources, items)
        safe = np.maximum(ids, 0)
        # contribution[u, r, c] = w[u, source r] * P(item c | source r)
        contrib = wts[:, :, None] * rows[at[:, :, None], safe[:, None, :]]
        best = np.take_along_axis(src, contrib.argmax(axis=1), axis=1)
        has = contrib.max(axis=1) > 0
        return np.where(has & (ids >= 0), best, out)

    def save(self, path: Path) -> None:
        t = self.transitions.tocoo()
        write_artifact(
            path,
            self.name,
            {"features": self.space.features, "decay": self.decay},
            {"row": t.row, "col": t.col, "val": t.data},
        )

    @classmethod
    def load(cls, path: Path) -> Self:
        meta, arrays = read_artifact(path, cls.name)
        obj = cls(decay=float(meta["decay"]))
        obj.space = ItemSpace(meta["features"])
        n = len(obj.space)
        obj.transitions = sp.csr_matrix(
            (arrays["val"].astype(np.float32), (arrays["row"], arrays["col"])), shape=(n, n)
        )
        return obj
