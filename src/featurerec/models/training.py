"""Pipeline stage functions of the models area (registered with ``@stage_function``).

=========================  ================================  =====================================
stage (spec name)          artifact in ``ctx.work_dir``      notes
=========================  ================================  =====================================
als_matrix_factorization   ALS item factors + calibrator     the run's hyperparameter search
                                                             (once per run, shared with the bandit
                                                             and evaluation stages; ``search``:
                                                             false uses the given hyperparameters)
contextual_bandit          ranker: bandits + context,        warm start from organic adoptions,
                           sequence, popularity models       replaced by clicks (IPW) from
                                                             ml.recommendation_feedback
sequence_transitions       transition model                  from ml.feature_transition_probs
context_model              context model                     adoption by role / team / plan / industry
build_ann_index            HNSW or exact index               item factors from the MF artifact
                                                             (``embedding_source`` URI or ``path``)
model_evaluation           none (metrics only)               ndcg@5, hit_rate@3, diversity_score ...
                                                             on a held-out window, for promotion
=========================  ================================  =====================================

Every stage reads the ml.* tables through :func:`featurerec.models.data.load_training_data`,
once per pipeline run (the run's :class:`~featurerec.pipeline.contracts.RunCache` hands the
same read-only :class:`TrainingData` to every model stage), and never reaches into another
stage: the index stage reads the MF artifact from the registry.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from featurerec.errors import DataError, ModelError
from featurerec.models.als import ALSParams, ALSScorer
from featurerec.models.bandit import BanditParams
from featurerec.models.base import TrainingData
from featurerec.models.common import Calibrator, write_artifact
from featurerec.models.context import ContextScorer
from featurerec.models.data import load_training_data
from featurerec.models.fit import (
    DEFAULT_ALS_GRID,
    TrainConfig,
    ValidationSplit,
    search_als,
    train_bundle,
    validation_split,
)
from featurerec.models.index import build_index
from featurerec.models.sequence import SequenceScorer
from featurerec.models.strategies import BANDIT_STRATEGIES, ModelBundle
from featurerec.pipeline.contracts import StageContext, StageResult, stage_function

log = logging.getLogger(__name__)

FEEDBACK_TABLE = "ml.recommendation_feedback"


def _data(ctx: StageContext) -> TrainingData:
    """The run's training data, read once and shared by every model stage of the run
    (they run concurrently on the same ml.* tables; stages treat it as read-only)."""
    ctx.progress(0, 1, "loading ml.* tables")
    days = float(ctx.params.get("validation_days", 7))
    return ctx.cache.get(
        ("training_data", ctx.as_of, days),
        # two cuts: the training stages' validation split, and the evaluation stage's
        # split of its "pre" side
        lambda: load_training_data(
            ctx.engine, ctx.settings, ctx.as_of, validation_days=days, validation_cuts=2
        ),
    )


def _als_params(params: dict[str, Any]) -> ALSParams:
    d = ALSParams()
    try:
        return ALSParams(
            factors=int(params.get("factors", d.factors)),
            regularization=float(params.get("regularization", d.regularization)),
            iterations=int(params.get("iterations", d.iterations)),
            alpha=float(params.get("alpha", d.alpha)),
        )
    except (TypeError, ValueError) as exc:
        raise ModelError(f"als_matrix_factorization: bad hyperparameter: {exc}") from None


def _train_config(ctx: StageContext, als: ALSParams | None = None) -> TrainConfig:
    p = ctx.params
    grid = (als or _als_params(p), *[g for g in DEFAULT_ALS_GRID if g != (als or _als_params(p))])
    search = bool(p.get("search", True))
    bandit = BanditParams(
        exploration_rate=float(p.get("exploration_rate", 0.1)),
        decay_factor=float(p.get("decay_factor", 0.995)),
        cold_start_max_events=ctx.settings.windows.cold_start_max_events,
    )
    return TrainConfig(
        als_params=None if search else grid[0],
        als_grid=grid,
        bandit=bandit,
        validation_days=float(p.get("validation_days", 7)),
        cold_start_max_events=ctx.settings.windows.cold_start_max_events,
        n_candidates=int(p.get("n_candidates", 20)),
        seed=ctx.seed,
    )


def _splits(
    ctx: StageContext, data: TrainingData, days: float
) -> tuple[ValidationSplit | None, ValidationSplit | None]:
    """The run's validation split of ``data`` and the split of its "pre" side (a week
    earlier), computed once per run: the search, the bandit and the evaluation use them."""

    def make() -> tuple[ValidationSplit | None, ValidationSplit | None]:
        outer = validation_split(data, days)
        return outer, None if outer is None else validation_split(outer.pre, days)

    return ctx.cache.get(("validation_splits", ctx.as_of, days), make)


def _searched_als(
    ctx: StageContext, data: TrainingData, cfg: TrainConfig
) -> tuple[ALSParams, list[dict[str, Any]]]:
    """The run's ALS hyperparameters: searched once per run (the run cache; the first stage
    to ask runs the search, the others wait) and used by every stage that fits ALS (matrix
    factorisation, bandit, evaluation).

    The search's validation window is the one *before* the evaluation stage's holdout: it
    cuts the data ``validation_days`` before the evaluation's cut, so the metrics that gate
    promotion come from a week the hyperparameters were not picked on, and the evaluation
    measures the production procedure exactly. Without that much history the first
    setting of the grid (the stage's hyperparameters) is used."""

    def run() -> tuple[ALSParams, list[dict[str, Any]]]:
        _, split = _splits(ctx, data, cfg.validation_days)
        if split is None:
            log.info(
                "ALS search: less than two validation windows of data; using %s", cfg.als_grid[0]
            )
            return cfg.als_grid[0], []
        return search_als(
            split,
            cfg.als_grid,
            cfg.seed,
            cfg.max_validation_users,
            ctx.progress,
            fit_users=cfg.search_fit_users,
        )

    key = (
        "als_search",
        ctx.as_of,
        cfg.validation_days,
        cfg.als_grid,
        cfg.seed,
        cfg.max_validation_users,
        cfg.search_fit_users,
    )
    return ctx.cache.get(key, run)


def _with_searched_als(ctx: StageContext, data: TrainingData, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the run's searched ALS hyperparameters fixed (when searching is on)."""
    if cfg.als_params is not None:
        return cfg
    return replace(cfg, als_params=_searched_als(ctx, data, cfg)[0])


@stage_function("als_matrix_factorization")
def als_matrix_factorization(ctx: StageContext) -> StageResult:
    """ALS with the run's hyperparameter search (spec values are the first candidate)."""
    data = _data(ctx)
    cfg = _train_config(ctx)
    params = cfg.als_params
    metrics: dict[str, float] = {}
    search_table: list[dict[str, Any]] = []
    if params is None:
        params, search_table = _searched_als(ctx, data, cfg)
        if search_table:
            metrics["validation_ndcg@5"] = max(r["ndcg@5"] for r in search_table)
    ctx.progress(0, 1, "fitting ALS on the full window")
    als = ALSScorer(params, seed=ctx.seed).fit(data)
    rows = np.arange(min(len(data.users), 20_000))
    states = data.user_states([data.users[i] for i in rows])
    als.save(ctx.work_dir)
    cal = Calibrator.fit(als.score(states), seed=ctx.seed)
    write_artifact(ctx.work_dir / "calibrator", "calibrator", {}, {"q": cal.quantiles})
    return StageResult(
        artifact_dir=ctx.work_dir,
        params={**asdict(params), "search": search_table},
        metrics=metrics,
        rows=int(data.matrix.nnz),
        summary=f"{len(data.users):,} users x {len(data.features)} features, "
        f"factors {params.factors}, reg {params.regularization}, alpha {params.alpha}",
    )


#: Days after which a logged recommendation's reward is final (its window has closed).
REWARD_WINDOW_DAYS = {"adopted_7d": 7, "clicked": 1}

#: Default bandit reward. ``clicked`` is caused by the recommendation; ``adopted_7d`` from
#: attribution also counts first uses that would have happened without it (organic
#: adoption of visible features), which teaches the ranker to show what users find anyway.
DEFAULT_REWARD = "clicked"


def feedback_rows(engine: Any, as_of: datetime, reward: str) -> list[dict[str, Any]]:
    """Logged feedback whose reward window has closed by ``as_of`` (a recommendation
    shown 2 days ago has adopted_7d = 0 only because it is too early to tell): what the
    bandit stage learns from."""
    if not engine.table_exists(FEEDBACK_TABLE):
        return []
    closed = as_of - timedelta(days=REWARD_WINDOW_DAYS.get(reward, 7))
    fb = f"""SELECT recommendation_id, user_id, recommended_feature, score, propensity,
                    strategy, variant, clicked, adopted_7d, generated_at
             FROM {FEEDBACK_TABLE}
             WHERE generated_at <= $closed AND recommended_feature IS NOT NULL"""
    if not engine.table_exists("events"):
        return list(engine.query_rows(f"{fb} ORDER BY generated_at, recommendation_id",
                                          {"closed": closed}))  # fmt: skip
    # the user's feature_used events before the recommendation: the segment (cold / warm /
    # active) the ranker saw when serving it, not the one the user is in by now
    return list(
        engine.query_rows(
            f"""WITH fb AS ({fb}),
                n AS (
                    SELECT fb.recommendation_id, COUNT(e.user_id) AS events_before
                    FROM fb LEFT JOIN events e
                      ON e.user_id = fb.user_id AND e.event_type = 'feature_used'
                     AND e.timestamp < fb.generated_at
                    GROUP BY fb.recommendation_id
                )
                SELECT fb.*, n.events_before
                FROM fb JOIN n ON n.recommendation_id = fb.recommendation_id
                ORDER BY fb.generated_at, fb.recommendation_id""",
            {"closed": closed},
        )
    )


def apply_feedback(
    bundle: ModelBundle,
    data: TrainingData,
    rows: list[dict[str, Any]],
    reward: str = DEFAULT_REWARD,
) -> dict[str, int]:
    """IPW updates of the bandits from logged feedback rows.

    Every bandit learns from every logged row, whichever policy showed it: the reward of
    showing feature ``f`` to user ``u`` does not depend on the policy, and the logged
    propensity corrects for how often that policy shows ``f``. Once a bandit has feedback,
    its organic warm start (a model of *organic next adoption*, which is not the response
    to a recommendation: visible, high-utility features are adopted without help) is
    dropped and it learns the recommendation reward from the logged rows alone, with
    ``BanditParams.feedback_arm_precision`` as the per-arm shrinkage (the warm start's
    cross-validated value was chosen for the other target).

    One update batch per day of serving, in time order (exploration decays by
    ``decay_factor`` once per day of feedback, as the spec's per-batch decay intends). The
    upstream input is the bandit's own strategy's candidate-stage score of the shown
    feature, recomputed with the current models (the logged score is the ranker's output,
    a different quantity from what the ranker sees at serving time)."""
    if reward not in REWARD_WINDOW_DAYS:
        raise ModelError(
            f"bandit reward must be one of {', '.join(REWARD_WINDOW_DAYS)} (got {reward!r})"
        )
    out: dict[str, int] = {}
    if not rows:
        return out
    # one state per (user, events before the recommendation): rows carrying
    # ``events_before`` are learned in the segment the user was in when served (a user
    # cold then is usually warm by the retrain); 50+ is one segment (active)
    keys: list[tuple[str, int]] = [
        (
            str(r["user_id"]),
            -1 if r.get("events_before") is None else min(int(r["events_before"]), 50),
        )
        for r in rows
    ]
    uniq = sorted(set(keys))
    pos = {k: i for i, k in enumerate(uniq)}
    inverse = np.array([pos[k] for k in keys], dtype=np.int64)
    user_ids = sorted({u for u, _ in uniq})
    now = dict(zip(user_ids, data.user_states(user_ids), strict=True))
    states = [now[u] if e < 0 else replace(now[u], event_count=e) for u, e in uniq]
    items = bundle.space.ids([str(r["recommended_feature"]) for r in rows])
    safe = np.maximum(items, 0)
    all_items = np.broadcast_to(np.arange(bundle.n_items), (len(states), bundle.n_items))
    rew = np.array([float(r.get(reward) or 0) for r in rows])
    prop = np.array(
        [np.nan if r.get("propensity") is None else float(r["propensity"]) for r in rows]
    )
    days = np.array(
        [str(w.date()) if isinstance(w := r.get("generated_at"), datetime) else "" for r in rows],
        dtype=object,
    )
    row_states = [states[i] for i in inverse]
    for name in BANDIT_STRATEGIES:
        bandit = bundle.bandits.get(name)
        if bandit is None:
            continue
        strat = bundle.strategy(name)
        cache = strat.cache(states)
        # the bandit's inputs exactly as serving builds them, for every (user, item)
        sig = strat.signals(states, all_items, strat.full_scores(states, cache), cache=cache)
        upstream = np.where((items >= 0)[:, None], sig[inverse, safe], 0.0)
        bandit.G = np.zeros_like(bandit.G)
        bandit.h = np.zeros_like(bandit.h)
        bandit.observations = 0
        bandit.with_arm_precision(bandit.params.feedback_arm_precision)
        for day in sorted(set(days.tolist())):
            sel = np.nonzero(days == day)[0]
            bandit.update(
                [row_states[i] for i in sel], items[sel], upstream[sel], rew[sel], prop[sel]
            )
        out[name] = len(rows)
    return out


@stage_function("contextual_bandit")
def contextual_bandit(ctx: StageContext) -> StageResult:
    """Train the ranker artifact: bandits warm-started from organic adoptions, then one
    IPW update batch from ``ml.recommendation_feedback`` if it has rows."""
    data = _data(ctx)
    cfg = _with_searched_als(ctx, data, _train_config(ctx))
    split, _ = _splits(ctx, data, cfg.validation_days)
    bundle, report = train_bundle(data, cfg, ctx.progress, split=split)
    reward = str(ctx.params.get("reward", DEFAULT_REWARD))
    rows = feedback_rows(ctx.engine, ctx.as_of, reward)
    fed = apply_feedback(bundle, data, rows, reward)
    bundle.save_ranker(ctx.work_dir)
    eps = {f"epsilon[{k}]": b.epsilon for k, b in bundle.bandits.items()}
    return StageResult(
        artifact_dir=ctx.work_dir,
        params={
            **asdict(cfg.bandit),
            "als_params_for_warm_start": report.als_params,
            **{
                f"blend_weights[{k}]": ",".join(f"{s}={w:g}" for s, w in v.items())
                for k, v in report.blend_weights.items()
            },
        },
        metrics={
            "warm_start_rows": float(report.warm_start_rows),
            "feedback_rows": float(len(rows)),
            **{f"feedback_rows[{k}]": float(v) for k, v in fed.items()},
            **eps,
        },
        rows=len(rows),
        summary=f"warm start {report.warm_start_rows:,} rows, feedback {len(rows):,} rows",
    )


@stage_function("sequence_transitions")
def sequence_transitions(ctx: StageContext) -> StageResult:
    data = _data(ctx)
    model = SequenceScorer(decay=float(ctx.params.get("decay", 0.5))).fit(data)
    model.save(ctx.work_dir)
    return StageResult(
        artifact_dir=ctx.work_dir,
        params={"decay": model.decay},
        rows=int(model.transitions.nnz),
        summary=f"{model.transitions.nnz} transitions",
    )


@stage_function("context_model")
def context_model(ctx: StageContext) -> StageResult:
    data = _data(ctx)
    model = ContextScorer().fit(data)
    model.save(ctx.work_dir)
    return StageResult(
        artifact_dir=ctx.work_dir,
        rows=len(data.contexts),
        summary=f"{len(data.contexts):,} user contexts",
    )


@stage_function("build_ann_index")
def build_ann_index(ctx: StageContext) -> StageResult:
    """Build the item index from the MF artifact (``embedding_source`` registry URI, or a
    ``path``). ``index_type``: hnsw | exact | auto; ``metric``: cosine | inner_product."""
    p = ctx.params
    if p.get("path"):
        src = Path(p["path"])
    else:
        uri = p.get("embedding_source", "models:/feature-recommender-mf/staging")
        if ctx.registry is None:
            raise ModelError(f"build_ann_index: no registry to resolve {uri}")
        src = Path(ctx.registry.resolve(uri).path)
    als = ALSScorer.load(src)
    kind = str(p.get("index_type", "hnsw")).lower()
    if kind not in ("hnsw", "exact", "auto"):
        raise ModelError(f"build_ann_index: index_type must be hnsw, exact or auto (got {kind!r})")
    metric = {"ip": "inner_product", "dot": "inner_product"}.get(
        str(p.get("metric", "inner_product")), str(p.get("metric", "inner_product"))
    )
    index = build_index(
        als.item_factors,
        als.space.features,
        metric=metric,
        kind=kind,  # type: ignore[arg-type]
        M=int(p.get("M", 16)),
        ef_construction=int(p.get("ef_construction", 200)),
        ef_search=int(p.get("ef_search", 128)),
    )
    index.save(ctx.work_dir)
    return StageResult(
        artifact_dir=ctx.work_dir,
        params={"index_type": index.kind, "metric": metric, "M": int(p.get("M", 16))},
        rows=len(als.space),
        summary=f"{index.kind} index over {len(als.space)} items ({metric})",
    )


@stage_function("model_evaluation")
def model_evaluation(ctx: StageContext) -> StageResult:
    """Metrics for the promotion check, on a held-out window: the same training procedure
    on the data before the last ``validation_days`` days, evaluated on the features users
    first used in those days. Reports the serving default strategy's metrics under plain
    names (ndcg@5, hit_rate@3, diversity_score, coverage, novelty) and every strategy's as
    ``<strategy>.<metric>``."""
    from featurerec.evaluation.metrics import item_similarity
    from featurerec.evaluation.offline import TestSet, evaluate

    data = _data(ctx)
    cfg = _with_searched_als(ctx, data, _train_config(ctx))
    split, inner = _splits(ctx, data, cfg.validation_days)
    if split is None:
        raise DataError(
            "model_evaluation: no feature was first used in the last "
            f"{cfg.validation_days:g} days before the as-of time; nothing to evaluate on"
        )
    bundle, _ = train_bundle(split.pre, cfg, ctx.progress, split=inner)
    rows = split.eval_rows
    states = split.pre.user_states([split.pre.users[i] for i in rows])
    exclude = np.asarray(split.pre.matrix[rows].toarray() > 0)
    test = TestSet(states, split.targets[rows], exclude, data.features)
    result = evaluate(bundle, test, similarity=item_similarity(split.pre.matrix), seed=ctx.seed)
    main = str(ctx.params.get("strategy", ctx.settings.serving.default_strategy))
    if main not in result:
        main = "hybrid" if "hybrid" in result else next(iter(result))
    metrics: dict[str, float] = {}
    for name, row in result.items():
        for k, v in row.items():
            if isinstance(v, int | float):
                metrics[f"{name}.{k}"] = float(v)
    for k, v in result[main].items():
        if isinstance(v, int | float):
            metrics[k] = float(v)
    return StageResult(
        params={"strategy": main, "validation_days": cfg.validation_days},
        metrics=metrics,
        rows=len(test),
        summary=f"{main}: ndcg@5 {metrics.get('ndcg@5', 0):.3f}, "
        f"hit_rate@3 {metrics.get('hit_rate@3', 0):.3f} on {len(test):,} users",
    )
