"""Content-based (context) model for cold-start users.

For every user attribute (role, team size bucket, plan, industry) and value ``v``, the
adoption rate of feature ``i`` among training users with that value, shrunk toward the
global rate by an empirical-Bayes Beta prior whose strength is estimated per
(attribute, feature) from the spread of the group rates (method of moments). The
attributes are combined in log-odds space (naive-Bayes style)::

    logit p(i | u) = logit p_i + sum_a w_a * (logit r_a(v_a(u), i) - logit p_i)

with ``w_a = 1 / n_attributes`` by default (the attributes are correlated; averaging their
evidence is a conservative choice). Scores are probabilities in 0..1, and the shrunk
per-attribute rates and group sizes are kept so reasons can quote a true number
("38% of project managers on teams your size use automations").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np
import scipy.sparse as sp

from featurerec.errors import ModelError
from featurerec.models.base import TrainingData, UserContext, UserState
from featurerec.models.common import ItemSpace, read_artifact, write_artifact

ATTRIBUTES = ("role", "team_size_bucket", "plan", "industry")
UNKNOWN = "__unknown__"


def _value(ctx: UserContext, attr: str) -> str:
    v = getattr(ctx, attr)
    return UNKNOWN if v is None or v == "" else str(v)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class ContextScorer:
    """Adoption rate given role / team size / plan / industry, shrunk to the global rate."""

    name = "context"

    def __init__(self, min_prior: float = 2.0, max_prior: float = 2000.0) -> None:
        self.min_prior = min_prior
        self.max_prior = max_prior
        self.space = ItemSpace([])
        self.global_rate = np.zeros(0, dtype=np.float64)
        #: attribute -> (values list, rates (n_values, n_items), counts (n_values,))
        self.values: dict[str, list[str]] = {}
        self.rates: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def fit(self, data: TrainingData) -> Self:
        if not data.features:
            raise ModelError("context model: the training data has no features")
        self.space = ItemSpace(data.features)
        n_items = len(self.space)
        # every user with a context row counts in the denominator (0 adoptions is data too)
        extra = sorted(set(data.contexts) - set(data.users))
        users = list(data.users) + extra
        if not users:
            raise ModelError("context model: no users in the training data")
        m = data.matrix.tocsr()
        ind = sp.csr_matrix(  # copies: the training data may be shared with other stages
            (np.ones(m.nnz), m.indices.copy(), m.indptr.copy()), shape=m.shape, dtype=np.float64
        )
        ind.sum_duplicates()
        ind.data[:] = 1.0
        adopted = sp.vstack([ind, sp.csr_matrix((len(extra), n_items))]).tocsr()
        self.global_rate = np.asarray(adopted.sum(axis=0)).ravel() / len(users)
        ctxs = [data.contexts.get(u, UserContext()) for u in users]
        for attr in ATTRIBUTES:
            vals = [_value(c, attr) for c in ctxs]
            uniq, inv = np.unique(np.asarray(vals, dtype=object), return_inverse=True)
            k = len(uniq)
            counts = np.bincount(inv, minlength=k).astype(np.float64)
            onehot = sp.csr_matrix(
                (np.ones(len(users)), (np.arange(len(users)), inv)), shape=(len(users), k)
            )
            sums = np.asarray((onehot.T @ adopted).todense())
            prior = self._prior_strength(sums, counts)
            rates = (sums + prior[None, :] * self.global_rate[None, :]) / (
                counts[:, None] + prior[None, :]
            )
            self.values[attr] = [str(v) for v in uniq]
            self.rates[attr] = rates
            self.counts[attr] = counts
        return self

    def _prior_strength(self, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Beta prior strength per item by the method of moments over the group rates.

        Var_between(rate) ~ p(1-p)/(m+1) + sampling noise; a large spread means a weak
        prior (the attribute matters), a small one a strong prior.
        """
        n = counts.sum()
        p = self.global_rate
        with np.errstate(divide="ignore", invalid="ignore"):
            rates = np.where(counts[:, None] > 0, sums / counts[:, None], p[None, :])
            w = counts / max(n, 1.0)
            var = (w[:, None] * (rates - p[None, :]) ** 2).sum(axis=0)
            noise = (w[:, None] * (p * (1 - p))[None, :] / np.maximum(counts, 1)[:, None]).sum(
                axis=0
            )
            signal = np.maximum(var - noise, 1e-9)
            m = p * (1 - p) / signal - 1
        m = np.where(np.isfinite(m), m, self.max_prior)
        return np.clip(m, self.min_prior, self.max_prior)

    def _lookup(self, users: Sequence[UserState], attr: str) -> np.ndarray:
        """Row index into ``self.rates[attr]`` per user; -1 for values unseen at fit."""
        idx = {v: i for i, v in enumerate(self.values[attr])}
        return np.array([idx.get(_value(u.context, attr), -1) for u in users], dtype=np.int64)

    def attribute_rates(
        self, users: Sequence[UserState], attr: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rates (n_users, n_items), group sizes (n_users,)) for one attribute; unseen
        values get the global rate and size 0."""
        rows = self._lookup(users, attr)
        rates = np.where(
            rows[:, None] >= 0, self.rates[attr][np.maximum(rows, 0)], self.global_rate[None, :]
        )
        sizes = np.where(rows >= 0, self.counts[attr][np.maximum(rows, 0)], 0.0)
        return rates, sizes

    def score(self, users: Sequence[UserState]) -> np.ndarray:
        base = _logit(self.global_rate)[None, :]
        total = np.repeat(base, len(users), axis=0)
        w = 1.0 / len(ATTRIBUTES)
        for attr in ATTRIBUTES:
            rates, _ = self.attribute_rates(users, attr)
            total += w * (_logit(rates) - base)
        return (1.0 / (1.0 + np.exp(-total))).astype(np.float32)

    def save(self, path: Path) -> None:
        arrays = {"global_rate": self.global_rate}
        for attr in ATTRIBUTES:
            arrays[f"rates_{attr}"] = self.rates[attr]
            arrays[f"counts_{attr}"] = self.counts[attr]
        write_artifact(
            path,
            self.name,
            {
                "features": self.space.features,
                "values": self.values,
                "min_prior": self.min_prior,
                "max_prior": self.max_prior,
            },
            arrays,
        )

    @classmethod
    def load(cls, path: Path) -> Self:
        meta, arrays = read_artifact(path, cls.name)
        obj = cls(min_prior=meta["min_prior"], max_prior=meta["max_prior"])
        obj.space = ItemSpace(meta["features"])
        obj.global_rate = arrays["global_rate"]
        obj.values = {k: list(v) for k, v in meta["values"].items()}
        for attr in ATTRIBUTES:
            obj.rates[attr] = arrays[f"rates_{attr}"]
            obj.counts[attr] = arrays[f"counts_{attr}"]
        return obj
