"""The exploring slate policy shared by every strategy, with exact propensities.

Policy (epsilon-greedy over whole slates): with probability ``1 - eps`` show the greedy
slate (candidates sorted by the ranker's score); with probability ``eps`` show the first
``k`` of a uniformly random permutation of the user's valid candidates. The marginal
probability that feature ``i`` is shown at position ``p`` is then, exactly::

    propensity(i, p) = (1 - eps) * [greedy[p] == i] + eps / n_valid     (p < n_valid)

For a fixed position the propensities over all candidates sum to 1, which
:func:`slate_propensities` exposes for tests and for off-policy estimators. With
``explore=False`` the policy is deterministic and every shown item has propensity 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Ranked:
    """A ranked slate per user.

    ``ids``: (n, k) int64 item ids, -1 where fewer than ``k`` valid candidates exist;
    ``scores``: (n, k) float32 in 0..1 (0 at padding); ``propensities``: (n, k) probability
    the exploring policy shows that item at that position (1 when not exploring, 0 at
    padding); ``explored``: (n,) bool, True where this slate came from the random branch;
    ``components``: name -> (n, k) per-item signals for reasons (e.g. "collaborative",
    "context", "transition", "popularity", "bandit"; NaN where not computed);
    ``transition_from``: (n, k) id of the recent feature that most supports the item via
    transitions, -1 if none (sequence-aware only).
    """

    ids: np.ndarray
    scores: np.ndarray
    propensities: np.ndarray
    explored: np.ndarray
    components: dict[str, np.ndarray] = field(default_factory=dict)
    transition_from: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def greedy_order(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Column order (n, c) of candidates by descending score; invalid ones last.
    Ties keep the candidate order (stable), so results are deterministic."""
    s = np.where(valid, scores, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")


def epsilon_slates(
    scores: np.ndarray,
    valid: np.ndarray,
    k: int,
    eps: float,
    rng: np.random.Generator,
    explore: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick ``k`` candidate columns per row with the epsilon-greedy slate policy.

    Returns (columns (n, k) with -1 padding, propensities (n, k), explored (n,)).
    """
    n, c = scores.shape
    greedy = greedy_order(scores, valid)
    n_valid = valid.sum(axis=1)
    kk = min(k, c)
    if explore and eps > 0:
        explored: np.ndarray = np.asarray(rng.random(n) < eps)
        keys = np.where(valid, rng.random((n, c)), np.inf)
        random_order = np.argsort(keys, axis=1, kind="stable")
        order = np.where(explored[:, None], random_order, greedy)
    else:
        explored = np.zeros(n, dtype=bool)
        order = greedy
    cols = order[:, :kk]
    pos = np.arange(kk)[None, :]
    in_range = pos < n_valid[:, None]
    if explore and eps > 0:
        is_greedy = cols == greedy[:, :kk]
        prop = (1 - eps) * is_greedy + eps / np.maximum(n_valid, 1)[:, None]
    else:
        prop = np.ones((n, kk))
    cols = np.where(in_range, cols, -1)
    prop = np.where(in_range, prop, 0.0)
    if kk < k:
        cols = np.hstack([cols, np.full((n, k - kk), -1)])
        prop = np.hstack([prop, np.zeros((n, k - kk))])
    return cols.astype(np.int64), prop.astype(np.float64), explored


def slate_propensities(scores: np.ndarray, valid: np.ndarray, k: int, eps: float) -> np.ndarray:
    """(n, c, k) probability that candidate column ``j`` is shown at position ``p``."""
    n, c = scores.shape
    greedy = greedy_order(scores, valid)[:, :k]
    n_valid = valid.sum(axis=1)
    out = np.zeros((n, c, k))
    for p in range(min(k, c)):
        active = p < n_valid
        out[:, :, p] = np.where(valid & active[:, None], eps / np.maximum(n_valid, 1)[:, None], 0.0)
        rows = np.nonzero(active)[0]
        out[rows, greedy[rows, p], p] += 1 - eps
    return out


def slate_distribution(
    upstream: np.ndarray, rank: np.ndarray, exclude: np.ndarray, k: int, top_k: int, eps: float
) -> np.ndarray:
    """(n, n_items, k): probability that the epsilon-greedy slate policy shows item i at
    position p, for n users' unexcluded strategy results (``upstream`` candidate score,
    ``rank`` greedy position, as SERVE's ``BundleModel.full_results``) and eligibility masks
    ``exclude``. Same candidate logic as ``BundleModel.recommend`` (the ``top_k`` eligible
    items by upstream score when there are more eligible, then the strategy's greedy order),
    vectorised over users; the formula is
    :func:`featurerec.models.ranking.slate_propensities`: (1 - eps) [greedy item at p] +
    eps / n_candidates for every candidate while p < n_candidates."""
    n, m = upstream.shape
    out = np.zeros((n, m, k))
    if n == 0:
        return out
    valid = ~exclude & np.isfinite(upstream)
    n_valid = valid.sum(axis=1)
    n_cand = np.minimum(n_valid, top_k)
    t = min(top_k, m)
    # stage 1 (as SERVE): with more than top_k eligible, the top_k by upstream score;
    # otherwise all of them in item order (which breaks the greedy order's ties)
    primary = np.where(n_valid[:, None] > top_k, -upstream.astype(np.float64), 0.0)
    by_up = np.argsort(np.where(valid, primary, np.inf), axis=1, kind="stable")[:, :t]
    rows = np.arange(n)[:, None]
    in_cand = np.arange(t)[None, :] < n_cand[:, None]
    key = np.where(in_cand, rank[rows, by_up].astype(np.int64), np.iinfo(np.int64).max)
    cand = np.take_along_axis(by_up, np.argsort(key, axis=1, kind="stable"), axis=1)
    member = np.zeros((n, m), dtype=bool)
    member[rows, cand] = in_cand  # in_cand is a prefix, so it marks cand's first n_cand
    share = eps / np.maximum(n_cand, 1)
    for p in range(min(k, t)):
        active = p < n_cand
        out[:, :, p] = np.where(member & active[:, None], share[:, None], 0.0)
        r = np.flatnonzero(active)
        out[r, cand[r, p], p] += 1 - eps
    return out


def sample_slates(dist: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """(n, k) item ids (-1 where a slot stays empty) drawn from the epsilon-greedy slate
    policy whose marginals are ``dist`` (:func:`slate_distribution`'s (n, n_items, k)):
    with probability ``eps`` the first slots of a uniformly random order of the candidates
    (the items with mass at slot 0), otherwise the greedy slate (each slot's item with the
    most mass, which is the greedy one whenever ``eps < 1``)."""
    n, m, k = dist.shape
    active = dist.sum(axis=1) > 0  # (n, k): slots the policy fills
    out = dist.argmax(axis=1)
    if eps > 0 and n:
        rows = np.flatnonzero(rng.random(n) < eps)  # the exploring slates
        member = dist[rows, :, 0] > 0
        keys = np.where(member, rng.random((rows.size, m)), np.inf)
        order = np.argsort(keys, axis=1, kind="stable")[:, :k]
        if order.shape[1] < k:  # fewer items than slots (those slots are never active)
            pad = np.zeros((rows.size, k - order.shape[1]), dtype=order.dtype)
            order = np.hstack([order, pad])
        out[rows] = order
    return np.where(active, out, -1).astype(np.int64)
