"""Training of a whole :class:`ModelBundle` from one :class:`TrainingData`.

Steps (all seeded, all from the same data, no SQL):

1. Validation split: interactions first used in the last ``validation_days`` before the
   as-of time are held out (their first use is the label), the rest is the "pre" data.
2. ALS hyperparameter search on that split (a handful of settings of factors /
   regularization / alpha), picked by ndcg@5 of the collaborative ranking, because no fixed
   setting is best for every product. Skipped when ``als_params`` is given.
3. The blend weights of hybrid / sequence_aware (next-adoption model, ALS percentile,
   context lift, transitions) are fitted on the same split as a conditional logit of the
   held-out adoptions (:func:`featurerec.models.adoption.fit_blend`), with the upstream
   models fitted on the pre data.
4. Bandit warm start: the upstream models are fitted on the pre data, and each bandit
   (hybrid, sequence_aware) learns from the organic adoptions of the validation window
   (reward 1 if the candidate was adopted, propensity 1: no logging policy involved).
   Logged recommendation feedback, when it exists, replaces this warm start: the bandit then
   learns the recommendation reward (default: click) from the logged rows with clipped IPW
   (:func:`featurerec.models.training.apply_feedback`), because organic next adoption is
   driven by visibility and misses features users respond to when shown.
5. Every upstream model is refitted on the full data; the bandits keep what they learned
   (their inputs are percentiles, so they transfer between the two fits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from featurerec.errors import ModelError
from featurerec.evaluation.metrics import ndcg_at_k
from featurerec.models.adoption import AdoptionModel, BlendFit, cv_blend
from featurerec.models.als import ALSParams, ALSScorer
from featurerec.models.bandit import BanditParams, ContextualBandit
from featurerec.models.base import TrainingData, UserState, top_k
from featurerec.models.baselines import PopularityScorer, RandomScorer
from featurerec.models.common import Calibrator, ItemSpace
from featurerec.models.context import ContextScorer
from featurerec.models.sequence import SequenceScorer
from featurerec.models.strategies import (
    BANDIT_STRATEGIES,
    BLEND_SIGNALS,
    BundleConfig,
    ModelBundle,
    ScoreCache,
    Strategy,
)

log = logging.getLogger(__name__)

DEFAULT_ALS_GRID: tuple[ALSParams, ...] = (
    ALSParams(64, 0.01, 15, 40.0),  # spec default
    ALSParams(64, 0.1, 15, 10.0),
    ALSParams(32, 0.05, 15, 40.0),
    ALSParams(32, 1.0, 15, 10.0),
    ALSParams(16, 0.1, 15, 5.0),
    ALSParams(16, 5.0, 15, 40.0),
    # low rank, strongly regularised: with a catalog of ~10 features a rank >= the number
    # of features reproduces each user's row and says nothing about the others
    ALSParams(8, 10.0, 15, 10.0),
    ALSParams(3, 1.0, 15, 10.0),
)

Progress = Callable[[float, float, str], None]


@dataclass(frozen=True)
class TrainConfig:
    """What :func:`train_bundle` does; every field has a sensible default."""

    als_params: ALSParams | None = None
    als_grid: tuple[ALSParams, ...] = DEFAULT_ALS_GRID
    bandit: BanditParams = field(default_factory=BanditParams)
    validation_days: float = 7.0
    cold_start_max_events: int = 5
    n_candidates: int = 20
    sequence_decay: float = 0.5
    #: Cap on users used for the search and the warm start (sampled, seeded).
    max_validation_users: int = 50_000
    #: Cap on users each ALS search candidate is fitted on (see :func:`search_als`).
    search_fit_users: int | None = 20_000
    seed: int = 0


@dataclass
class ValidationSplit:
    """``pre``: the data before the cut; ``targets`` (users x items) adopted after it."""

    pre: TrainingData
    targets: np.ndarray
    cut_day: float

    @property
    def eval_rows(self) -> np.ndarray:
        return np.nonzero(self.targets.any(axis=1))[0]


@dataclass
class TrainReport:
    als_params: dict[str, Any]
    search: list[dict[str, Any]] = field(default_factory=list)
    #: strategy -> {signal: weight}
    blend_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    #: strategy -> cross-validated NLL per choice of each L2 penalty tried
    blend_cv: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    #: sequence_aware's transition signal: out-of-fold ndcg@5 gain over hybrid, its
    #: standard error, and whether it was kept (gain > one standard error)
    transition_gate: dict[str, float] = field(default_factory=dict)
    #: strategy -> validation ndcg@5 of the fitted blend and of each signal alone
    blend_validation: dict[str, dict[str, float]] = field(default_factory=dict)
    arm_precision: dict[str, float] = field(default_factory=dict)
    arm_precision_search: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    warm_start_rows: int = 0
    validation_users: int = 0


def _aligned(data: TrainingData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(rows, cols, strength, first_used) of every nonzero of ``data.matrix``."""
    fu = data.first_used
    if fu is None or fu.nnz == 0:
        return None
    fu = sp.csr_matrix(fu)
    m = sp.csr_matrix(data.matrix)
    if fu.shape != m.shape:
        return None
    coo = m.tocoo()
    rows, cols, vals = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    fu_at = np.asarray(fu[rows, cols]).ravel()
    return rows, cols, vals, fu_at


def split_by_mask(
    data: TrainingData,
    rows: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    fu_at: np.ndarray,
    post_mask: np.ndarray,
    cut_day: float = float("nan"),
) -> ValidationSplit | None:
    """Hold out the interactions where ``post_mask`` is True (they become targets)."""
    pre_mask = ~post_mask
    if not post_mask.any() or not pre_mask.any():
        return None
    shape = data.matrix.shape
    pre_m = sp.csr_matrix((vals[pre_mask], (rows[pre_mask], cols[pre_mask])), shape=shape)
    pre_fu = sp.csr_matrix((fu_at[pre_mask], (rows[pre_mask], cols[pre_mask])), shape=shape)
    targets = np.zeros(shape, dtype=bool)
    targets[rows[post_mask], cols[post_mask]] = True
    pre_sets: list[set[str]] = [set() for _ in range(shape[0])]
    for r, c in zip(rows[pre_mask], cols[pre_mask], strict=True):
        pre_sets[r].add(data.features[c])
    recent = {}
    counts = {}
    for i, u in enumerate(data.users):
        recent[u] = tuple(f for f in data.recent.get(u, ()) if f in pre_sets[i])
        # approximation: a user keeps the event count unless nothing is left before the cut
        counts[u] = data.event_counts.get(u, 0) if pre_sets[i] else 0
    pre = replace(
        data,
        matrix=pre_m,
        recent=recent,
        event_counts=counts,
        first_used=pre_fu,
        adopted_at=None
        if data.adopted_at is None
        else sp.csr_matrix(
            (
                np.asarray(sp.csr_matrix(data.adopted_at)[rows[pre_mask], cols[pre_mask]]).ravel(),
                (rows[pre_mask], cols[pre_mask]),
            ),
            shape=shape,
        ),
        # transitions: validation_split swaps in ones computed at the cut when available
    )
    return ValidationSplit(pre=pre, targets=targets, cut_day=cut_day)


def validation_split(data: TrainingData, days: float) -> ValidationSplit | None:
    """Cut ``data`` at ``days`` before its end (``data.end_day``, default the latest first
    use): interactions first used after the cut are the targets. When the data flags true
    first uses (``adopted_at``), only those count as adoptions after the cut: a feature
    adopted before the window whose first in-window use happens to fall after the cut is
    history, not a new adoption. The "pre" side ends at the cut (so a split of it cuts
    ``days`` further back), and takes the transitions and recent features computed as of
    the cut when ``data.at_cuts`` has them.
    None without ``first_used`` or without interactions on both sides."""
    al = _aligned(data)
    if al is None:
        return None
    rows, cols, vals, fu_at = al
    end = float(fu_at.max()) if data.end_day is None else float(data.end_day)
    cut = end - days
    post = fu_at >= cut
    if data.adopted_at is not None and data.adopted_at.nnz:
        flagged = np.asarray(sp.csr_matrix(data.adopted_at)[rows, cols]).ravel()
        post = flagged >= cut  # 0 (no flag) is never after the cut
    out = split_by_mask(data, rows, cols, vals, fu_at, post, cut)
    if out is None:
        return None
    out.pre = replace(out.pre, end_day=cut)
    at = next((c for c in data.at_cuts if abs(c.cut_day - cut) < 1e-6), None)
    if at is None:
        if data.at_cuts:
            log.warning(
                "validation split at epoch day %.3f: no transitions computed as of that cut "
                "(have %s); using the parent window's",
                cut,
                ", ".join(f"{c.cut_day:.3f}" for c in data.at_cuts),
            )
    else:
        out.pre = replace(
            out.pre, transitions=at.transitions, recent=_recent_in_matrix(out.pre, at.recent)
        )
    return out


def _recent_in_matrix(
    data: TrainingData, recent: dict[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """``recent`` limited to the features each user has in ``data.matrix``."""
    m = sp.csr_matrix(data.matrix)
    out = {}
    for i, u in enumerate(data.users):
        have = {data.features[j] for j in m.indices[m.indptr[i] : m.indptr[i + 1]]}
        out[u] = tuple(f for f in recent.get(u, ()) if f in have)
    return out


def last_k_split(data: TrainingData, k: int) -> ValidationSplit | None:
    """Per user, hold out the ``k`` most recently first-used features (users with more
    than ``k`` features only, so everyone keeps some history)."""
    if k <= 0:
        raise ModelError(f"last-k split: k must be > 0 (got {k})")
    al = _aligned(data)
    if al is None:
        return None
    rows, cols, vals, fu_at = al
    order = np.lexsort((cols, -fu_at, rows))  # per user, newest first
    r_sorted = rows[order]
    starts = np.flatnonzero(np.r_[True, r_sorted[1:] != r_sorted[:-1]])
    counts = np.diff(np.r_[starts, len(r_sorted)])
    rank = np.arange(len(r_sorted)) - np.repeat(starts, counts)
    n_user = np.repeat(counts, counts)
    post_sorted = (rank < k) & (n_user > k)
    post = np.zeros(len(rows), dtype=bool)
    post[order] = post_sorted
    out = split_by_mask(data, rows, cols, vals, fu_at, post)
    if out is not None:  # no common cut: the pre side ends at its own latest first use
        out.pre = replace(out.pre, end_day=None, at_cuts=())
    return out


def _sample_rows(rows: np.ndarray, cap: int, seed: int) -> np.ndarray:
    if len(rows) <= cap:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, cap, replace=False))


def _ndcg(scores: np.ndarray, exclude: np.ndarray, targets: np.ndarray, k: int = 5) -> float:
    ids, _ = top_k(scores, k, exclude)
    return float(ndcg_at_k(ids, targets, k).mean()) if len(ids) else 0.0


def search_als(
    split: ValidationSplit,
    grid: Sequence[ALSParams],
    seed: int = 0,
    max_users: int = 50_000,
    progress: Progress | None = None,
    fit_users: int | None = None,
) -> tuple[ALSParams, list[dict[str, Any]]]:
    """Fit each setting on ``split.pre`` and rank the held-out adopters that have some
    history before the cut (ALS says nothing about users without any; the strategies fall
    back to other models for them); best ndcg@5 wins (ties: the earlier setting).

    ``fit_users`` caps the users each candidate is fitted on (the evaluated users plus a
    seeded sample of the others): the search compares settings, it does not ship a model,
    and at tens of thousands of users a sample ranks the settings as the whole would at a
    fraction of the cost. The evaluated users are then capped at half of it.
    """
    pre = split.pre
    matrix = sp.csr_matrix(pre.matrix)
    has_hist = np.diff(matrix.indptr) > 0
    rows = split.eval_rows
    eval_cap = max_users if fit_users is None else min(max_users, max(1, fit_users // 2))
    rows = _sample_rows(rows[has_hist[rows]], eval_cap, seed)
    if fit_users is not None and len(pre.users) > fit_users:
        others = np.setdiff1d(np.flatnonzero(has_hist), rows)
        extra = _sample_rows(others, max(0, fit_users - len(rows)), seed + 1)
        fit_rows = np.union1d(rows, extra)
        fit_data = replace(
            pre,
            users=[pre.users[i] for i in fit_rows],
            matrix=matrix[fit_rows],
            first_used=None,
            adopted_at=None,
        )
    else:
        fit_data = pre
    states = pre.user_states([pre.users[i] for i in rows])
    space = ItemSpace(pre.features)
    from featurerec.models.common import adopted_mask

    excl = adopted_mask(states, space)
    targets = split.targets[rows]
    table = []
    best: tuple[float, int] = (-1.0, 0)
    for i, params in enumerate(grid):
        model = ALSScorer(params, seed=seed).fit(fit_data)
        score = _ndcg(model.score(states), excl, targets)
        table.append({**asdict(params), "ndcg@5": round(score, 4)})
        if score > best[0]:
            best = (score, i)
        if progress:
            progress(i + 1, len(grid), f"ALS search {i + 1}/{len(grid)}")
    return grid[best[1]], table


def fit_upstream(data: TrainingData, als_params: ALSParams, config: TrainConfig) -> ModelBundle:
    """Fit every non-bandit component on ``data`` and calibrate their scores."""
    als = ALSScorer(als_params, seed=config.seed).fit(data)
    context = ContextScorer().fit(data)
    sequence = SequenceScorer(decay=config.sequence_decay).fit(data)
    popularity = PopularityScorer().fit(data)
    adoption = AdoptionModel(seed=config.seed).fit(data)
    rnd = RandomScorer(seed=config.seed).fit(data)
    rows = _sample_rows(np.arange(len(data.users)), 20_000, config.seed)
    states = data.user_states([data.users[i] for i in rows])
    calibrators = {
        "als": Calibrator.fit(als.score(states), seed=config.seed),
        "context": Calibrator.fit(context.score(states), seed=config.seed),
        "sequence": Calibrator.fit(sequence.score(states), seed=config.seed),
    }
    return ModelBundle(
        features=list(data.features),
        context=context,
        popularity=popularity,
        random=rnd,
        als=als,
        sequence=sequence,
        adoption=adoption,
        calibrators=calibrators,
        config=BundleConfig(
            cold_start_max_events=config.cold_start_max_events,
            n_candidates=config.n_candidates,
            exploration_rate=config.bandit.exploration_rate,
        ),
    )


def calibrate_blends(bundle: ModelBundle, data: TrainingData, seed: int = 0) -> None:
    """Fit the percentile calibrators of the hybrid / sequence_aware blends (after their
    weights are set) on a sample of ``data``'s users."""
    if bundle.als is None:
        return
    rows = _sample_rows(np.arange(len(data.users)), 5_000, seed)
    states = data.user_states([data.users[i] for i in rows])
    cache = ScoreCache(bundle, states)
    for name in BANDIT_STRATEGIES:
        raw = Strategy(name, bundle).blend_raw(states, cache)
        bundle.calibrators[name] = Calibrator.fit(raw, seed=seed)


def fit_blends(
    bundle: ModelBundle,
    states: list[UserState],
    excl: np.ndarray,
    targets: np.ndarray,
    seed: int = 0,
    report: TrainReport | None = None,
) -> None:
    """Fit the hybrid / sequence_aware blend weights on validation adopters and set them
    in ``bundle.config``.

    Each blend is a conditional logit of the features each adopter adopted against the
    ones they did not, its L2 penalty chosen by 5-fold cross-validation
    (:func:`featurerec.models.adoption.cv_blend`). sequence_aware adds the transition
    signal to hybrid's and keeps it only when it earns its place by the one-standard-error
    rule: its out-of-fold ndcg@5 must beat hybrid's by more than one standard error of the
    paired per-adopter difference (the same adopters and folds for both). Otherwise it
    uses hybrid's weights with transition weight 0 (the two then rank alike). A plain
    "higher cross-validated ndcg@5" gate picked noise: on 10 default-world seeds
    (``benchmarks/bench_quality.py``; results/quality.json as committed at 8f10b43) it
    kept the signal on 6, and on all 6 the test week's ndcg@5 was below hybrid's; a
    validation week has a few hundred adopters, and the largest of several noisy gains is
    biased upwards.
    The report gets the weights, the cross-validation tables and the validation ndcg@5 of
    each blend and of each signal alone (in-sample for the blends)."""
    chosen = targets & ~excl
    cache = ScoreCache(bundle, states)
    fitted: dict[str, tuple[BlendFit, np.ndarray]] = {}
    for name in BANDIT_STRATEGIES:
        x = Strategy(name, bundle).blend_signals(states, cache)
        fit = cv_blend(x, chosen, excl, seed=seed)
        fitted[name] = (fit, x)
        if report is not None:
            report.blend_cv[name] = fit.table
    (h_fit, h_x), (s_fit, s_x) = fitted["hybrid"], fitted["sequence_aware"]
    h_w, s_w = h_fit.weights, s_fit.weights
    gain, se = _paired_gain(s_fit.oof_ndcg, h_fit.oof_ndcg)
    if report is not None:
        report.transition_gate = {
            "cv_ndcg@5_gain": round(gain, 5),
            "standard_error": round(se, 5),
            "kept": float(gain > se),
        }
    if not gain > se:
        s_w = np.append(h_w, 0.0)
    bundle.config = replace(
        bundle.config,
        hybrid_weights=tuple(float(v) for v in h_w),
        sequence_weights=tuple(float(v) for v in s_w),
    )
    if report is None:
        return
    for name, w, x in (("hybrid", h_w, h_x), ("sequence_aware", s_w, s_x)):
        sig = BLEND_SIGNALS[name]
        report.blend_weights[name] = {s: round(float(v), 4) for s, v in zip(sig, w, strict=True)}
        val = {"blend": round(_ndcg(x @ w, excl, targets), 4)}
        for i, s in enumerate(sig):
            val[s] = round(_ndcg(x[:, :, i], excl, targets), 4)
        report.blend_validation[name] = val


def _paired_gain(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` and its standard error (0, inf when there is nothing to pair)."""
    if len(a) != len(b) or len(a) < 2:
        return 0.0, float("inf")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


#: (arm_precision, context_precision) settings tried by the warm start's cross-validation.
SHRINKAGE_GRID = ((50.0, 30.0), (500.0, 30.0), (5000.0, 30.0), (5000.0, 300.0), (50000.0, 300.0))


def _cv_shrinkage(
    bandit: ContextualBandit,
    ids: np.ndarray,
    valid: np.ndarray,
    sig: np.ndarray,
    x: np.ndarray,
    stats: list[tuple[np.ndarray, np.ndarray]],
    fold: np.ndarray,
    targets: np.ndarray,
) -> tuple[tuple[float, tuple[float, float] | None], list[dict[str, Any]]]:
    """2-fold CV over users of the warm start's shrinkage settings, against the upstream
    order (no warm start, ``None``). Returns ((score, best setting), table)."""
    has_target = targets.any(axis=1)

    def cv_ndcg(predict: Callable[[], np.ndarray], fit: Callable[[int], None]) -> float:
        score = 0.0
        for f in (0, 1):
            fit(f)
            other = (fold != (f == 0)) & has_target
            if not other.any():  # a tiny world can leave a fold without adopters
                continue
            pred = np.where(valid, predict(), -np.inf)[other]
            order = np.argsort(-pred, axis=1, kind="stable")[:, :5]
            rec = np.take_along_axis(ids[other], order, axis=1)
            score += float(ndcg_at_k(rec, targets[other], 5).mean()) / 2
        return score

    def predict() -> np.ndarray:
        return np.einsum("ncd,ncd->nc", bandit.theta[np.maximum(ids, 0)], x)

    upstream_only = cv_ndcg(lambda: sig[:, :, 0], lambda f: None)
    table: list[dict[str, Any]] = [
        {"setting": "upstream order (no warm start)", "ndcg@5": round(upstream_only, 4)}
    ]
    best: tuple[float, tuple[float, float] | None] = (upstream_only, None)
    for arm, ctx_p in SHRINKAGE_GRID:

        def fit_fold(f: int, arm: float = arm, ctx_p: float = ctx_p) -> None:
            bandit.G, bandit.h = stats[f]
            bandit.params = replace(bandit.params, context_precision=ctx_p)
            bandit.with_arm_precision(arm)

        score = cv_ndcg(predict, fit_fold)
        table.append({"arm_precision": arm, "context_precision": ctx_p, "ndcg@5": round(score, 4)})
        if score > best[0] + 1e-9:
            best = (score, (arm, ctx_p))
    return best, table


def warm_start_bandits(
    bundle: ModelBundle,
    split: ValidationSplit,
    params: BanditParams,
    seed: int = 0,
    max_users: int = 50_000,
    report: TrainReport | None = None,
) -> int:
    """Teach each bandit from organic adoptions in the validation window (see module doc).

    All users (adopters and not) contribute: each candidate is a row with reward 1 if the
    user adopted it in the window. The per-arm shrinkage (``arm_precision``) is chosen by
    2-fold cross-validation over users (ndcg@5 of the bandit's order on the other half),
    then the bandit learns from all rows. Returns the number of rows learned from."""
    rows = _sample_rows(np.arange(len(split.pre.users)), max_users, seed)
    states = split.pre.user_states([split.pre.users[i] for i in rows])
    targets = split.targets[rows]
    fold = np.random.default_rng(seed).random(len(rows)) < 0.5
    cache = ScoreCache(bundle, states)  # component scores shared by both strategies
    n_rows = 0
    for name in BANDIT_STRATEGIES:
        bandit = bundle.bandits[name]
        strat = bundle.strategy(name)
        ids, scores = strat.candidates(states, bundle.config.n_candidates, cache=cache)
        valid = ids >= 0
        sig = strat.signals(states, ids, np.where(valid, scores, 0.0), cache=cache)
        x = bandit.features(states, sig)  # (n, c, d)
        r_idx, c_idx = np.nonzero(valid)
        item = ids[r_idx, c_idx]
        reward = targets[r_idx, item].astype(np.float64)
        xr = x[r_idx, c_idx]
        stats = [
            bandit.stats(xr[fold[r_idx] == f], item[fold[r_idx] == f], reward[fold[r_idx] == f])
            for f in (True, False)
        ]
        best, table = _cv_shrinkage(bandit, ids, valid, sig, x, stats, fold, targets)
        if best[1] is None:
            # learning from the validation window did not beat the upstream order
            # out of fold: keep the prior until logged feedback arrives
            bandit.G = np.zeros_like(stats[0][0])
            bandit.h = np.zeros_like(stats[0][1])
            bandit._solve()
        else:
            bandit.G = stats[0][0] + stats[1][0]
            bandit.h = stats[0][1] + stats[1][1]
            bandit.params = replace(bandit.params, context_precision=best[1][1])
            bandit.with_arm_precision(best[1][0])
            bandit.observations += len(item)
            if len(item):
                preds = np.einsum("nd,nd->n", bandit.theta[item], xr)
                bandit.calibrator = Calibrator.fit(preds, seed=seed)
        if report is not None:
            report.arm_precision[name] = best[1][0] if best[1] is not None else float("nan")
            report.arm_precision_search[name] = table
        n_rows += len(item)
    return n_rows


def train_bundle(
    data: TrainingData,
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    *,
    split: ValidationSplit | None = None,
) -> tuple[ModelBundle, TrainReport]:
    """Search, fit, warm-start and refit every component (see the module docstring).
    ``split``: ``validation_split(data, config.validation_days)`` when the caller already
    has it (the pipeline computes it once per run); computed here otherwise."""
    config = config or TrainConfig()
    if split is None:
        split = validation_split(data, config.validation_days)
    report = TrainReport(als_params={})
    als_params = config.als_params
    if split is None:
        log.info("no validation window (no first_used or no recent adoptions): defaults")
    if als_params is None:
        if split is not None and len(config.als_grid) > 1:
            als_params, report.search = search_als(
                split,
                config.als_grid,
                config.seed,
                config.max_validation_users,
                progress,
                fit_users=config.search_fit_users,
            )
        else:
            als_params = config.als_grid[0] if config.als_grid else ALSParams()
    report.als_params = asdict(als_params)
    pre_bundle = None
    if split is not None:
        pre_bundle = fit_upstream(split.pre, als_params, config)
        for name in BANDIT_STRATEGIES:
            pre_bundle.bandits[name] = ContextualBandit(config.bandit, seed=config.seed).fit(
                split.pre
            )
        rows = _sample_rows(split.eval_rows, config.max_validation_users, config.seed)
        report.validation_users = len(rows)
        from featurerec.models.common import adopted_mask

        states = split.pre.user_states([split.pre.users[i] for i in rows])
        excl = adopted_mask(states, pre_bundle.space)
        fit_blends(pre_bundle, states, excl, split.targets[rows], config.seed, report)
        calibrate_blends(pre_bundle, split.pre, config.seed)
        report.warm_start_rows = warm_start_bandits(
            pre_bundle, split, config.bandit, config.seed, config.max_validation_users, report
        )
    bundle = fit_upstream(data, als_params, config)
    if pre_bundle is not None:
        bundle.config = replace(
            bundle.config,
            hybrid_weights=pre_bundle.config.hybrid_weights,
            sequence_weights=pre_bundle.config.sequence_weights,
        )
    calibrate_blends(bundle, data, config.seed)
    if pre_bundle is not None:
        bundle.bandits = pre_bundle.bandits
    else:
        bundle.bandits = {
            n: ContextualBandit(config.bandit, seed=config.seed).fit(data)
            for n in BANDIT_STRATEGIES
        }
    if progress:
        progress(1, 1, "bundle trained")
    return bundle, report
