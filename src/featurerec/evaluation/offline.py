"""Offline evaluation of strategies on a held-out test set.

A :class:`TestSet` is the users to evaluate (their :class:`UserState` as of the cut), the
features each adopted after the cut (``targets``) and what must never be recommended
(``exclude``: everything the user used before the cut). Every strategy recommends with
exploration off (the greedy policy, what the ranker believes is best); metrics follow
:mod:`featurerec.evaluation.metrics`, overall and per segment (cold < 5 events,
warm 5-49, active 50+). ``extra`` rankers (the oracle from a simulated world's ground
truth) are full score matrices ranked the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurerec.evaluation.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    ndcg_at_k,
    novelty,
    precision_at_k,
    recall_at_k,
)
from featurerec.models.base import UserState, top_k
from featurerec.models.common import segment_of
from featurerec.models.strategies import STRATEGIES, ModelBundle

SEGMENTS = ("cold", "warm", "active")
#: Slate size shown to users (spec output_k) for coverage / novelty / diversity.
SERVED_K = 3
#: k for precision / recall.
PR_K = 5


@dataclass
class TestSet:
    users: list[UserState]
    targets: np.ndarray  # (n, n_items) bool
    exclude: np.ndarray  # (n, n_items) bool
    features: list[str]
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # already-adopted features are never targets
        self.targets = self.targets & ~self.exclude
        keep = self.targets.any(axis=1)
        if not keep.all():
            idx = np.nonzero(keep)[0]
            self.users = [self.users[i] for i in idx]
            self.targets = self.targets[idx]
            self.exclude = self.exclude[idx]

    def __len__(self) -> int:
        return len(self.users)


def metric_row(
    rec: np.ndarray,
    targets: np.ndarray,
    popularity_share: np.ndarray,
    similarity: np.ndarray,
) -> dict[str, float]:
    """All metrics for one ranking ``rec`` (n, >= 5) against ``targets``."""
    n_items = targets.shape[1]
    served = rec[:, :SERVED_K]
    ild = intra_list_diversity(served, similarity)
    return {
        "ndcg@5": float(ndcg_at_k(rec, targets, 5).mean()),
        "hit_rate@3": float(hit_rate_at_k(rec, targets, 3).mean()),
        f"precision@{PR_K}": float(precision_at_k(rec, targets, PR_K).mean()),
        f"recall@{PR_K}": float(recall_at_k(rec, targets, PR_K).mean()),
        "coverage": catalog_coverage(served, n_items),
        "novelty": novelty(served, popularity_share),
        "diversity_score": float(np.nanmean(ild)) if np.isfinite(ild).any() else 0.0,
    }


def evaluate(
    bundle: ModelBundle,
    test: TestSet,
    strategies: Sequence[str] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
    similarity: np.ndarray | None = None,
    seed: int = 0,
    per_user: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{strategy: {metric: value, ..., "users": n, "segments": {seg: {...}}}}``.

    ``per_user``, when given, is filled with each strategy's per-user ndcg@5 and
    hit_rate@3 (test-user order), for pooling several evaluations."""
    if list(bundle.features) != list(test.features):
        raise ValueError("evaluate: the bundle and the test set use different feature lists")
    names = [s for s in (strategies or STRATEGIES) if s in bundle.available()]
    pop = bundle.popularity.share
    sim = similarity if similarity is not None else np.eye(len(test.features))
    cold_cut = bundle.config.cold_start_max_events
    seg = np.array([segment_of(u.event_count, cold_cut) for u in test.users])
    k = max(5, SERVED_K, PR_K)
    rankings: dict[str, np.ndarray] = {}
    for name in names:
        ranked = bundle.strategy(name).recommend(
            test.users, k=k, exclude=test.exclude, rng=np.random.default_rng(seed), explore=False
        )
        rankings[name] = ranked.ids
    for name, scores in (extra or {}).items():
        ids, _ = top_k(scores, k, test.exclude)
        rankings[name] = ids
    out: dict[str, dict[str, Any]] = {}
    for name, rec in rankings.items():
        row: dict[str, Any] = metric_row(rec, test.targets, pop, sim)
        row["users"] = len(test)
        segs = {}
        for s in SEGMENTS:
            m = seg == s
            if m.any():
                segs[s] = {**metric_row(rec[m], test.targets[m], pop, sim), "users": int(m.sum())}
        row["segments"] = segs
        out[name] = row
        if per_user is not None:
            per_user[name] = {
                "ndcg@5": ndcg_at_k(rec, test.targets, 5).tolist(),
                "hit_rate@3": hit_rate_at_k(rec, test.targets, 3).astype(float).tolist(),
            }
    if "popularity" in rankings:
        base = rankings["popularity"]
        for name, rec in rankings.items():
            out[name]["vs_popularity"] = paired_bootstrap(rec, base, test.targets, seed=seed)
    add_gap_closed(out)
    return out


def paired_bootstrap(
    rec: np.ndarray,
    base: np.ndarray,
    targets: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Mean per-user difference ``rec - base`` in ndcg@5 and hit_rate@3 with a 95%
    percentile interval from a paired bootstrap over users: ``{metric: [mean, lo, hi]}``.
    Test windows are small; an interval that contains 0 means "no measurable difference"."""
    rng = np.random.default_rng(seed)
    n = targets.shape[0]
    out: dict[str, list[float]] = {}
    if n == 0:
        return out
    idx = rng.integers(0, n, size=(n_boot, n))
    for metric, fn, k in (("ndcg@5", ndcg_at_k, 5), ("hit_rate@3", hit_rate_at_k, 3)):
        d = fn(rec, targets, k) - fn(base, targets, k)
        boots = d[idx].mean(axis=1)
        lo, hi = np.percentile(boots, [2.5, 97.5])
        out[metric] = [float(d.mean()), float(lo), float(hi)]
    return out


def add_gap_closed(rows: dict[str, dict[str, Any]], ceiling: str = "oracle") -> None:
    """Add the share of the gap above popularity each row closes:

    - ``gap_closed[m]``: popularity-to-oracle (needs an oracle row; NaN when the oracle
      does not beat popularity, i.e. true utility is not the ceiling of next-window
      adoption in that data);
    - ``gap_to_perfect_closed[m]``: popularity-to-perfect (1.0, ranking exactly the
      features adopted in the test window first), always defined.
    """
    if "popularity" not in rows:
        return
    for metric in ("ndcg@5", "hit_rate@3"):
        lo = rows["popularity"][metric]
        hi = rows[ceiling][metric] if ceiling in rows else None
        for row in rows.values():
            if hi is not None:
                row[f"gap_closed[{metric}]"] = (
                    (row[metric] - lo) / (hi - lo) if hi - lo > 1e-12 else float("nan")
                )
            row[f"gap_to_perfect_closed[{metric}]"] = (
                (row[metric] - lo) / (1.0 - lo) if 1.0 - lo > 1e-12 else float("nan")
            )
