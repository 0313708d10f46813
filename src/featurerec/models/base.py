"""The small protocols every model obeys, and the typed objects passed between stages.

Training reads warehouse tables into a :class:`TrainingData`; every scorer fits on it and
scores a batch of :class:`UserState` against the item space (vectorised, one matrix per
batch). Serving builds ``UserState`` from its online state, never from SQL.

Item ids are integer indexes into ``TrainingData.features`` (the item space comes from the
data; any number of features).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import numpy as np
import scipy.sparse as sp

TEAM_SIZE_BUCKETS = ("small", "medium", "large", "enterprise")


def team_size_bucket(seat_count: int | None) -> str:
    """Spec Stage 3: small ≤ 5, medium ≤ 20, large ≤ 100, else enterprise."""
    if seat_count is None:
        return "small"
    if seat_count <= 5:
        return "small"
    if seat_count <= 20:
        return "medium"
    if seat_count <= 100:
        return "large"
    return "enterprise"


@dataclass(frozen=True)
class UserContext:
    """One row of ``ml.user_context_vectors`` (plus industry, used by the context model)."""

    role: str | None = None
    plan: str | None = None
    seat_count: int | None = None
    team_size_bucket: str = "small"
    industry: str | None = None
    account_age_days: int = 0
    features_used_count: int = 0
    total_events_7d: int = 0
    open_feature_tickets: int = 0


@dataclass(frozen=True)
class UserState:
    """Everything a strategy may know about one user at request or evaluation time."""

    user_id: str
    context: UserContext = field(default_factory=UserContext)
    #: feature name -> interaction strength (spec formula), for features the user has used.
    interactions: dict[str, float] = field(default_factory=dict)
    #: the user's most recent distinct features, most recent last (for the sequence model).
    recent_features: tuple[str, ...] = ()
    #: events of any feature_used kind ever seen for the user (cold start: < 5).
    event_count: int = 0

    @property
    def adopted(self) -> frozenset[str]:
        return frozenset(self.interactions)


@dataclass(frozen=True)
class CutFeatures:
    """Inputs of the sequence signal as of an earlier time: transition probabilities of
    the window ending at ``cut_day`` (epoch days) and each user's recent features then."""

    cut_day: float
    transitions: dict[tuple[str, str], float]
    recent: dict[str, tuple[str, ...]]


@dataclass
class TrainingData:
    """What the SQL transforms produced, as arrays.

    ``matrix`` is users x items (CSR, float32 interaction strength); ``users`` and
    ``features`` name its rows and columns.
    """

    users: list[str]
    features: list[str]
    matrix: sp.csr_matrix
    #: user_id -> context, for every user with a context row.
    contexts: dict[str, UserContext]
    #: (from_feature, to_feature) -> probability, from ml.feature_transition_probs.
    transitions: dict[tuple[str, str], float]
    #: user_id -> recent distinct features (most recent last).
    recent: dict[str, tuple[str, ...]]
    #: user_id -> feature_used event count.
    event_counts: dict[str, int]
    as_of: str = ""
    #: Optional, same sparsity as ``matrix``: first use of each (user, feature) in the
    #: window, as epoch days (float). Lets training cut a validation window without SQL.
    first_used: sp.csr_matrix | None = None
    #: Optional, a subset of ``matrix``'s sparsity: epoch days of the event flagged
    #: ``is_first_use`` (the user's true first use) where one lies in the window. Pairs
    #: without it were adopted before the window (or the source does not flag first uses).
    adopted_at: sp.csr_matrix | None = None
    #: Optional: where the data ends (epoch days); validation cuts are measured back from
    #: it (default: the latest first use). A validation split's "pre" side ends at its cut.
    end_day: float | None = None
    #: Optional: transitions and recent features recomputed as of earlier cuts (the
    #: validation cut, and the one a split of the "pre" side makes), so a validation split
    #: cut there sees nothing from after its cut.
    at_cuts: tuple[CutFeatures, ...] = ()

    def user_states(self, user_ids: Sequence[str] | None = None) -> list[UserState]:
        ids = self.users if user_ids is None else list(user_ids)
        index = {u: i for i, u in enumerate(self.users)}
        out = []
        for u in ids:
            row = index.get(u)
            inter: dict[str, float] = {}
            if row is not None:
                start, end = self.matrix.indptr[row], self.matrix.indptr[row + 1]
                for j, v in zip(
                    self.matrix.indices[start:end], self.matrix.data[start:end], strict=True
                ):
                    inter[self.features[j]] = float(v)
            out.append(
                UserState(
                    user_id=u,
                    context=self.contexts.get(u, UserContext()),
                    interactions=inter,
                    recent_features=self.recent.get(u, ()),
                    event_count=self.event_counts.get(u, 0),
                )
            )
        return out


@runtime_checkable
class Scorer(Protocol):
    """A model that scores items for a batch of users (implicit's ``recommend`` shape)."""

    name: str

    def fit(self, data: TrainingData) -> Self: ...

    def score(self, users: Sequence[UserState]) -> np.ndarray:
        """(len(users), n_items) float32 scores, higher is better; NaN never."""
        ...

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Self: ...


def top_k(
    scores: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top ``k`` of a score matrix, sorted descending; ``exclude`` is a bool mask.

    Excluded cells never appear; rows with fewer than ``k`` eligible items are padded with
    id -1 and score -inf.
    """
    s = np.asarray(scores, dtype=np.float64).copy()
    if exclude is not None:
        s[exclude] = -np.inf
    n_items = s.shape[1]
    k_eff = min(k, n_items)
    if k_eff == 0:
        return np.full((s.shape[0], k), -1), np.full((s.shape[0], k), -np.inf)
    part = np.argpartition(-s, k_eff - 1, axis=1)[:, :k_eff]
    part_scores = np.take_along_axis(s, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(part_scores, order, axis=1)
    ids = np.where(np.isneginf(vals), -1, ids)
    if k_eff < k:
        pad = k - k_eff
        ids = np.hstack([ids, np.full((s.shape[0], pad), -1)])
        vals = np.hstack([vals, np.full((s.shape[0], pad), -np.inf)])
    return ids, vals
