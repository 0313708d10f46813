"""Next-adoption model: which feature a user adopts next, given what they already use.

Every true first use in the training window (``TrainingData.adopted_at``, the events
flagged ``is_first_use``; without flags, the first use inside the window) is a *choice*:
the user picked feature ``j`` out of the features they did not use yet. A conditional
(multinomial) logit explains the choices with::

    s(u, j) = b_j + sum_{i in used(u)} W_ij + new(u) * c_j

- ``b_j``: how readily users pick up ``j`` on their own (visibility, onboarding flows);
- ``W_ij``: how much already using ``i`` raises or lowers the pick-up of ``j`` (features
  that lead to each other: kanban boards -> automations);
- ``c_j``: the shift for new accounts (at most ``new_account_days`` old), whose first days
  are shaped by onboarding.

The fit maximises the L2-penalised log likelihood with L-BFGS (scipy), in chunks of events
so memory stays bounded; the features already used before a choice are excluded from its
choice set. ``score`` returns ``s(u, j)`` for every item: within one user a higher score
is a more likely next adoption (the per-user normaliser does not change the order).

This is the "when do they adopt it" signal that ALS (co-usage) and the context model
(segment rates) do not carry; hybrid / sequence_aware blend it with them
(:mod:`featurerec.models.strategies`) using weights fitted on a validation window
(:func:`fit_blend`).

Size limits: the pairwise weights are dense (``n_items``^2), so they are fitted up to
``max_pair_items`` features (default 500); a larger catalog keeps ``b`` and ``c`` only.
At most about ``max_cells`` (choices x items) enter one fit: above that, whole users are
sampled (seeded) until their choices reach the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import scipy.optimize as so
import scipy.sparse as sp

from featurerec.errors import ModelError
from featurerec.models.base import TrainingData, UserState
from featurerec.models.common import ItemSpace, read_artifact, write_artifact

log = logging.getLogger(__name__)


def softmax_nll(
    scores: np.ndarray, chosen: np.ndarray, blocked: np.ndarray
) -> tuple[float, np.ndarray]:
    """Negative log likelihood of conditional-logit choices and its gradient wrt ``scores``.

    ``scores`` (n, m); ``chosen`` (n, m) bool, one or more chosen items per row (each a
    separate choice from the same set); ``blocked`` (n, m) bool, items not in the choice
    set. Rows whose choice set is empty contribute nothing."""
    s = np.where(blocked, -np.inf, scores)
    mx = s.max(axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    ex = np.exp(s - mx)
    z = ex.sum(axis=1, keepdims=True)
    ok = z[:, 0] > 0
    z = np.where(z > 0, z, 1.0)
    p = ex / z
    k = chosen.sum(axis=1).astype(np.float64)
    lse = mx[:, 0] + np.log(z[:, 0])
    picked = np.where(chosen & ~blocked, s, 0.0).sum(axis=1)
    nll = float(-(picked - k * lse)[ok].sum())
    grad = -(chosen.astype(np.float64) - k[:, None] * p)
    grad[~ok] = 0.0
    return nll, grad


def fit_blend(
    signals: np.ndarray, chosen: np.ndarray, blocked: np.ndarray, l2: float = 1.0
) -> np.ndarray:
    """Weights ``w`` of a linear blend ``signals @ w`` (signals: (n, m, d)) fitted as a
    conditional logit of the ``chosen`` items (n, m) against the other unblocked items of
    the same row: the weights that best order each user's items, whatever the scale of
    each signal. Rows without a choice are ignored."""
    rows = chosen.any(axis=1)
    x, y, b = signals[rows], chosen[rows], blocked[rows]
    d = signals.shape[2]
    if not len(x):
        return np.zeros(d)
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        nll, g = softmax_nll(x @ w, y, b)
        return nll + l2 * float(w @ w), np.einsum("nm,nmd->d", g, x) + 2 * l2 * w

    res = so.minimize(f, np.zeros(d), jac=True, method="L-BFGS-B")
    return np.asarray(res.x, dtype=np.float64)


#: L2 penalties tried by :func:`cv_blend`.
BLEND_L2_GRID = (0.1, 1.0, 10.0, 100.0)


def blend_nll(signals: np.ndarray, chosen: np.ndarray, blocked: np.ndarray, w: np.ndarray) -> float:
    """Mean negative log likelihood per choice of the blend ``signals @ w``."""
    rows = chosen.any(axis=1)
    n_choices = int(chosen[rows].sum())
    if not n_choices:
        return float("nan")
    x = np.nan_to_num(signals[rows], nan=0.0, posinf=0.0, neginf=0.0)
    nll, _ = softmax_nll(x @ w, chosen[rows], blocked[rows])
    return nll / n_choices


def _ndcg_rows(scores: np.ndarray, chosen: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """Per row, ndcg@5 of ``scores`` (blocked items never ranked)."""
    from featurerec.evaluation.metrics import ndcg_at_k

    s = np.where(blocked, -np.inf, np.nan_to_num(scores, nan=-np.inf))
    k = min(5, s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    top = np.where(np.take_along_axis(np.isfinite(s), top, axis=1), top, -1)
    return np.asarray(ndcg_at_k(top, chosen, 5), dtype=np.float64)


@dataclass
class BlendFit:
    """What :func:`cv_blend` returns."""

    #: weights refitted on every row with the chosen penalty
    weights: np.ndarray
    l2: float
    #: cross-validated NLL per choice at the chosen penalty
    cv_nll: float
    #: per penalty: l2, cv_nll, cv_ndcg@5
    table: list[dict[str, float]]
    #: out-of-fold ndcg@5 of each row used, at the chosen penalty (rows are a seeded
    #: function of ``chosen`` and ``seed``, so two blends of the same adopters pair up)
    oof_ndcg: np.ndarray = field(default_factory=lambda: np.zeros(0))


def cv_blend(
    signals: np.ndarray,
    chosen: np.ndarray,
    blocked: np.ndarray,
    l2_grid: Sequence[float] = BLEND_L2_GRID,
    folds: int = 5,
    seed: int = 0,
    max_rows: int = 2000,
) -> BlendFit:
    """:func:`fit_blend` with its L2 penalty chosen by ``folds``-fold cross-validation
    over rows (held-out log likelihood per choice), then refitted on every row.

    The table also has each penalty's cross-validated ndcg@5, and ``oof_ndcg`` the
    per-row out-of-fold ndcg@5 at the chosen penalty (what
    :func:`featurerec.models.fit.fit_blends` compares to decide whether an extra signal
    earns its place). Validation windows are small (a few hundred adopters), so the
    penalty matters. At most ``max_rows`` rows with a choice are
    used (a seeded sample): a handful of weights needs no more."""
    rows = np.flatnonzero(chosen.any(axis=1))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    signals, chosen, blocked = signals[rows], chosen[rows], blocked[rows]
    rows = np.arange(len(rows))
    fold = np.random.default_rng(seed).permutation(len(rows)) % max(2, folds)
    table = []
    best = (float("inf"), float(l2_grid[0]), np.zeros(len(rows)))
    for l2 in l2_grid:
        total, count = 0.0, 0
        oof = np.zeros(len(rows))
        for f in range(max(2, folds)):
            test, train = rows[fold == f], rows[fold != f]
            if not len(test) or not len(train):
                continue
            w = fit_blend(signals[train], chosen[train], blocked[train], l2=l2)
            n = int(chosen[test].sum())
            total += blend_nll(signals[test], chosen[test], blocked[test], w) * n
            count += n
            oof[test] = _ndcg_rows(signals[test] @ w, chosen[test], blocked[test])
        cv = total / count if count else float("inf")
        table.append(
            {
                "l2": float(l2),
                "cv_nll": round(cv, 5),
                "cv_ndcg@5": round(float(oof.mean()) if len(oof) else 0.0, 5),
            }
        )
        if cv < best[0] - 1e-12:
            best = (cv, float(l2), oof)
    w = fit_blend(signals, chosen, blocked, l2=best[1])
    return BlendFit(weights=w, l2=best[1], cv_nll=best[0], table=table, oof_ndcg=best[2])


class AdoptionModel:
    """Conditional logit of the next adopted feature (see the module docstring)."""

    name = "adoption"

    def __init__(
        self,
        l2_item: float = 0.1,
        l2_pair: float = 1.0,
        new_account_days: int = 7,
        max_pair_items: int = 500,
        max_cells: int = 1_000_000,
        chunk_cells: int = 4_000_000,
        seed: int = 0,
    ) -> None:
        if l2_item <= 0 or l2_pair <= 0:
            raise ModelError("adoption model: l2_item and l2_pair must be > 0")
        self.l2_item = l2_item
        self.l2_pair = l2_pair
        self.new_account_days = new_account_days
        self.max_pair_items = max_pair_items
        self.max_cells = max_cells
        self.chunk_cells = chunk_cells
        self.seed = seed
        self.space = ItemSpace([])
        self.b = np.zeros(0)
        self.W = np.zeros((0, 0))
        self.c = np.zeros(0)
        self.choices = 0

    @property
    def pairwise(self) -> bool:
        return self.W.size > 0

    # -- data ---------------------------------------------------------------------------
    def _choices(
        self, data: TrainingData, cap: int | None = None
    ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray] | None:
        """(used-before (E, n) CSR, chosen item (E,), new account (E,)) per adoption.

        With ``cap``, users are taken in a seeded random order until their adoptions reach
        ``cap`` (whole users, so each kept user's sequence stays complete)."""
        if data.first_used is None or data.first_used.nnz == 0:
            return None
        fu = sp.csr_matrix(data.first_used)
        flagged = data.adopted_at is not None and data.adopted_at.nnz > 0
        at = sp.csr_matrix(data.adopted_at) if flagged else fu
        m = sp.csr_matrix(data.matrix)
        as_of = float(fu.data.max())
        prev_rows: list[np.ndarray] = []
        prev_cols: list[np.ndarray] = []
        chosen: list[np.ndarray] = []
        new: list[np.ndarray] = []
        e = 0
        per_user = np.diff(at.indptr)
        order = np.flatnonzero(per_user)
        if cap is not None and per_user.sum() > cap:
            order = np.random.default_rng(self.seed).permutation(order)
            take = int(np.searchsorted(np.cumsum(per_user[order]), cap)) + 1
            order = np.sort(order[:take])
        for r in order:
            s, t = at.indptr[r], at.indptr[r + 1]
            items = at.indices[s:t]
            days = at.data[s:t]
            used = m.indices[m.indptr[r] : m.indptr[r + 1]]
            # used in the window but never adopted in it: used since before the window
            history = np.setdiff1d(used, items) if flagged else np.zeros(0, np.int64)
            order = np.argsort(days, kind="stable")
            items, days = items[order], days[order]
            ctx = data.contexts.get(data.users[r])
            age_now = ctx.account_age_days if ctx is not None else 10**6
            for pos in range(len(items)):
                before = np.concatenate([history, items[:pos]])
                prev_rows.append(np.full(len(before), e))
                prev_cols.append(before)
                chosen.append(items[pos : pos + 1])
                new.append(np.array([age_now - (as_of - days[pos]) <= self.new_account_days]))
                e += 1
        if e == 0:
            return None
        rows = np.concatenate(prev_rows)
        cols = np.concatenate(prev_cols)
        used_before = sp.csr_matrix(
            (np.ones(len(rows)), (rows, cols)), shape=(e, len(data.features))
        )
        return used_before, np.concatenate(chosen), np.concatenate(new).astype(np.float64)

    # -- fit ----------------------------------------------------------------------------
    def fit(self, data: TrainingData) -> Self:
        if not data.features:
            raise ModelError("adoption model: the training data has no features")
        self.space = ItemSpace(data.features)
        n = len(data.features)
        self.b, self.c = np.zeros(n), np.zeros(n)
        self.W = np.zeros((n, n)) if n <= self.max_pair_items else np.zeros((0, 0))
        self.choices = 0
        got = self._choices(data, cap=max(1000, self.max_cells // n))
        if got is None:
            log.info("adoption model: no first uses in the window; it scores every item 0")
            return self
        used, item, new = got
        self.choices = len(item)
        self._optimise(used.tocsr(), item, new)
        return self

    def _optimise(self, used: sp.csr_matrix, item: np.ndarray, new: np.ndarray) -> None:
        e, n = used.shape
        pair = self.pairwise
        n_w = n * n if pair else 0
        step = max(1, self.chunk_cells // n)
        blocks = [slice(i, min(i + step, e)) for i in range(0, e, step)]
        used_t = [used[s] for s in blocks]
        used_blocked = [u.toarray().astype(bool) for u in used_t]

        def unpack(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return w[:n], w[n : n + n_w].reshape(n, n) if pair else self.W, w[n + n_w :]

        def f(w: np.ndarray) -> tuple[float, np.ndarray]:
            b, W, c = unpack(w)
            nll = 0.0
            gb, gc = np.zeros(n), np.zeros(n)
            gW = np.zeros((n, n)) if pair else None
            for s, u, blocked in zip(blocks, used_t, used_blocked, strict=True):
                scores = b[None, :] + new[s, None] * c[None, :]
                if pair:
                    scores = scores + u @ W
                chosen = np.zeros(blocked.shape, dtype=bool)
                chosen[np.arange(len(chosen)), item[s]] = True
                part, g = softmax_nll(scores, chosen, blocked)
                nll += part
                gb += g.sum(axis=0)
                gc += new[s] @ g
                if gW is not None:
                    gW += np.asarray(u.T @ g)
            obj = nll + self.l2_item * float(b @ b) + self.l2_pair * float(c @ c)
            grads = [gb + 2 * self.l2_item * b]
            if pair:
                assert gW is not None
                obj += self.l2_pair * float((W * W).sum())
                grads.append((gW + 2 * self.l2_pair * W).ravel())
            grads.append(gc + 2 * self.l2_pair * c)
            return obj, np.concatenate(grads)

        res = so.minimize(
            f, np.zeros(2 * n + n_w), jac=True, method="L-BFGS-B", options={"maxiter": 200}
        )
        b, W, c = unpack(np.asarray(res.x))
        self.b, self.c = b.copy(), c.copy()
        if pair:
            self.W = W.copy()

    # -- score --------------------------------------------------------------------------
    def score(self, users: Sequence[UserState]) -> np.ndarray:
        n_items = len(self.space)
        out = np.repeat(self.b[None, :], len(users), axis=0)
        if not n_items:
            return out.astype(np.float32)
        new = np.array(
            [u.context.account_age_days <= self.new_account_days for u in users], dtype=bool
        )
        out[new] += self.c
        if self.pairwise:
            idx = self.space.index
            for r, u in enumerate(users):
                used = [idx[f] for f in u.interactions if f in idx]
                if used:
                    out[r] += self.W[used].sum(axis=0)
        return out.astype(np.float32)

    # -- persistence --------------------------------------------------------------------
    def save(self, path: Path) -> None:
        write_artifact(
            Path(path),
            "adoption",
            {
                "features": self.space.features,
                "new_account_days": self.new_account_days,
                "choices": self.choices,
                "l2_item": self.l2_item,
                "l2_pair": self.l2_pair,
            },
            {"b": self.b, "W": self.W, "c": self.c},
        )

    @classmethod
    def load(cls, path: Path) -> Self:
        meta, arrays = read_artifact(Path(path), "adoption")
        m = cls(
            l2_item=float(meta["l2_item"]),
            l2_pair=float(meta["l2_pair"]),
            new_account_days=int(meta["new_account_days"]),
        )
        m.space = ItemSpace(meta["features"])
        m.b, m.W, m.c = arrays["b"], arrays["W"], arrays["c"]
        m.choices = int(meta["choices"])
        n = len(m.space)
        if m.b.shape != (n,) or m.c.shape != (n,) or m.W.shape not in ((n, n), (0, 0)):
            raise ModelError(f"{path}: adoption model arrays do not match its {n} features")
        return m
