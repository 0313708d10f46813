"""Pipeline stage functions on a tiny warehouse: artifacts, registry hand-off, feedback."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import featurerec.models.training  # noqa: F401  (registers the stages)
from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.models.data import load_training_data
from featurerec.models.strategies import load_bundle
from featurerec.models.toy import toy_warehouse
from featurerec.pipeline.contracts import STAGE_FUNCTIONS, StageContext
from featurerec.warehouse.engine import DuckDBEngine
from featurerec.warehouse.transforms import build_features, latest_event_time

SETTINGS = Settings.model_validate({"windows": {"min_transition_count": 1}})
FAST = {"factors": 4, "regularization": 1.0, "iterations": 3, "alpha": 10, "search": False}


@pytest.fixture(scope="module")
def warehouse() -> DuckDBEngine:
    db = toy_warehouse(n_users=90, seed=1)
    build_features(db, SETTINGS)
    return db


def _ctx(
    db: DuckDBEngine, tmp: Path, name: str, params: dict[str, Any], registry: Any = None
) -> StageContext:
    work = tmp / name
    work.mkdir()
    return StageContext(
        settings=SETTINGS,
        engine=db,
        registry=registry,
        as_of=latest_event_time(db),
        params=params,
        stage={"name": name},
        work_dir=work,
    )


def test_load_training_data(warehouse: DuckDBEngine) -> None:
    d = load_training_data(warehouse, SETTINGS)
    n = warehouse.query_rows("SELECT COUNT(*) AS n FROM ml.user_feature_interactions")[0]["n"]
    assert d.matrix.nnz == n
    assert d.features == sorted(d.features)
    assert d.first_used is not None and d.first_used.nnz == n
    u = d.users[0]
    assert d.contexts[u].role in ("engineer", "manager", "designer")
    # recent features: most recent last, and all in the user's interactions
    states = d.user_states(d.users[:10])
    for s in states:
        assert set(s.recent_features) <= set(s.interactions)
        assert s.event_count > 0
    assert d.transitions and all(0 < p <= 1 for p in d.transitions.values())


def test_load_training_data_needs_the_tables() -> None:
    with (
        DuckDBEngine(":memory:") as db,
        pytest.raises(DataError, match=r"missing table ml\.user_feature_interactions"),
    ):
        load_training_data(db, SETTINGS)


def test_stages_produce_a_loadable_bundle(warehouse: DuckDBEngine, tmp_path: Path) -> None:
    from featurerec.registry import Registry

    reg = Registry(tmp_path / "registry")
    mf = STAGE_FUNCTIONS["als_matrix_factorization"](_ctx(warehouse, tmp_path, "mf", FAST))
    assert mf.artifact_dir is not None and (mf.artifact_dir / "meta.json").exists()
    v = reg.register("feature-recommender-mf", mf.artifact_dir, mf.params, mf.metrics, {})
    idx = STAGE_FUNCTIONS["build_ann_index"](
        _ctx(
            warehouse,
            tmp_path,
            "idx",
            {
                "embedding_source": "models:/feature-recommender-mf/staging",
                "index_type": "hnsw",
                "metric": "cosine",
                "M": 16,
                "ef_construction": 200,
            },
            registry=reg,
        )
    )
    assert idx.params["index_type"] == "hnsw"
    ranker = STAGE_FUNCTIONS["contextual_bandit"](
        _ctx(
            warehouse, tmp_path, "bandit", {"exploration_rate": 0.1, "decay_factor": 0.995, **FAST}
        )
    )
    assert ranker.metrics["feedback_rows"] == 0.0
    assert ranker.metrics["epsilon[hybrid]"] == pytest.approx(0.1)  # no feedback batch yet
    bundle = load_bundle(ranker=ranker.artifact_dir, mf=v.path, index=idx.artifact_dir)
    assert "sequence_aware" in bundle.available()
    d = load_training_data(warehouse, SETTINGS)
    r = bundle.strategy("hybrid").recommend(d.user_states(d.users[:5]), k=3)
    assert (r.ids >= 0).all()
    for name in ("sequence_transitions", "context_model"):
        res = STAGE_FUNCTIONS[name](_ctx(warehouse, tmp_path, name, {}))
        assert (res.artifact_dir / "meta.json").exists()  # type: ignore[operator]


def test_bandit_stage_learns_from_logged_feedback(warehouse: DuckDBEngine, tmp_path: Path) -> None:
    d = load_training_data(warehouse, SETTINGS)
    t0 = datetime(2026, 2, 1)
    for i, u in enumerate(d.users[:40]):
        t = t0 + timedelta(days=(i // 2) % 2)  # two days of serving = two update batches
        warehouse.execute(
            """INSERT INTO ml.recommendation_feedback
               (recommendation_id, user_id, recommended_feature, score, position, strategy,
                propensity, generated_at, clicked, adopted_7d)
               VALUES ($id, $u, $f, 0.5, 1, $s, $p, $t, 1, $a)""",
            {
                "id": f"r{i}",
                "u": u,
                "f": d.features[i % 3],
                "s": ["hybrid", "sequence_aware"][i % 2],
                "p": 0.9,
                "t": t,
                "a": int(i % 3 == 0),
            },
        )
    try:
        res = STAGE_FUNCTIONS["contextual_bandit"](_ctx(warehouse, tmp_path, "bandit", {**FAST}))
    finally:
        warehouse.execute("DELETE FROM ml.recommendation_feedback")
    assert res.metrics["feedback_rows"] == 40.0
    # every bandit learns from every logged row (the logged propensity corrects for the
    # policy that showed it), not only from the rows its own strategy logged
    assert res.metrics["feedback_rows[hybrid]"] == 40.0
    assert res.metrics["feedback_rows[sequence_aware]"] == 40.0
    assert res.metrics["epsilon[hybrid]"] == pytest.approx(0.1 * 0.995**2)


def test_model_evaluation_stage_reports_promotion_metrics(
    warehouse: DuckDBEngine, tmp_path: Path
) -> None:
    res = STAGE_FUNCTIONS["model_evaluation"](
        _ctx(warehouse, tmp_path, "eval", {**FAST, "strategy": "hybrid"})
    )
    for key in ("ndcg@5", "hit_rate@3", "diversity_score", "hybrid.ndcg@5", "random.ndcg@5"):
        assert key in res.metrics
        assert np.isfinite(res.metrics[key])
    assert res.metrics["ndcg@5"] == res.metrics["hybrid.ndcg@5"]


def test_one_als_search_per_run_before_the_evaluation_holdout(
    warehouse: DuckDBEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MF, bandit and evaluation stages of one run share one search, whose validation
    window ends where the evaluation's holdout starts."""
    from featurerec.models import training
    from featurerec.pipeline.contracts import RunCache

    cuts: list[float] = []
    real = training.search_als

    def counting(split, *a, **kw):  # type: ignore[no-untyped-def]
        cuts.append(split.cut_day)
        return real(split, *a, **kw)

    monkeypatch.setattr(training, "search_als", counting)
    from featurerec.models import fit as fit_mod

    splits: list[float] = []
    real_split = fit_mod.validation_split

    def counting_split(d, days):  # type: ignore[no-untyped-def]
        out = real_split(d, days)
        splits.append(out.cut_day if out is not None else float("nan"))
        return out

    monkeypatch.setattr(training, "validation_split", counting_split)
    monkeypatch.setattr(fit_mod, "validation_split", counting_split)
    cache = RunCache()
    small = {"iterations": 2, "validation_days": 7}
    for fn, name in (
        ("als_matrix_factorization", "mf"),
        ("contextual_bandit", "bandit"),
        ("model_evaluation", "eval"),
    ):
        ctx = _ctx(warehouse, tmp_path, name, small)
        ctx.cache = cache
        res = STAGE_FUNCTIONS[fn](ctx)
        if name == "mf":
            assert res.params["search"] and "validation_ndcg@5" in res.metrics
    assert len(cuts) == 1
    # the two validation splits (outer and a week earlier) are computed once per run too
    assert len(splits) == 2 and splits[1] == pytest.approx(splits[0] - 7)
    data = cache.get(("training_data", latest_event_time(warehouse), 7.0), lambda: None)
    assert data is not None and data.end_day is not None
    assert cuts[0] == pytest.approx(data.end_day - 14)


def test_validation_split_uses_transitions_from_before_its_cut(warehouse: DuckDBEngine) -> None:
    from featurerec.models.fit import validation_split

    d = load_training_data(warehouse, SETTINGS, validation_days=7, validation_cuts=2)
    assert [c.cut_day for c in d.at_cuts] == pytest.approx([d.end_day - 7, d.end_day - 14])
    sp_ = validation_split(d, 7)
    assert sp_ is not None and sp_.cut_day == pytest.approx(d.at_cuts[0].cut_day)
    assert sp_.pre.transitions == d.at_cuts[0].transitions
    # a split of the pre side (what the evaluation stage trains on) cuts a week earlier
    # and takes the transitions as of that cut, not the ones up to the first cut
    inner = validation_split(sp_.pre, 7)
    assert inner is not None and inner.cut_day == pytest.approx(d.at_cuts[1].cut_day)
    assert inner.pre.transitions == d.at_cuts[1].transitions
    assert inner.targets.any() and not (inner.targets & sp_.targets).any()
    # the full-window transitions count more pairs than the ones that ended at the cut
    total = warehouse.query_rows(
        "SELECT SUM(transition_count) AS n FROM ml.feature_transition_probs"
    )
    assert total[0]["n"] > 0
    # another validation length does not reuse them
    other = validation_split(d, 3)
    assert other is not None and other.pre.transitions == d.transitions


def test_als_search_fits_every_setting_on_one_seeded_user_sample(
    warehouse: DuckDBEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featurerec.models import fit as fit_mod
    from featurerec.models.als import ALSParams, ALSScorer

    d = load_training_data(warehouse, SETTINGS, validation_days=7)
    split = fit_mod.validation_split(d, 7)
    assert split is not None
    fitted: list[list[str]] = []
    original = ALSScorer.fit

    def spy(self: ALSScorer, data: Any) -> ALSScorer:
        fitted.append(list(data.users))
        return original(self, data)

    monkeypatch.setattr(ALSScorer, "fit", spy)
    grid = (ALSParams(4, 1.0, 3, 10.0), ALSParams(2, 1.0, 3, 10.0))
    best, table = fit_mod.search_als(split, grid, seed=0, fit_users=40)
    assert best in grid and len(table) == 2
    assert len(fitted) == 2 and fitted[0] == fitted[1]  # one seeded sample for every setting
    assert 0 < len(fitted[0]) <= 40 < len(split.pre.users)
    # without a cap every candidate sees every user
    fitted.clear()
    fit_mod.search_als(split, grid, seed=0, fit_users=None)
    assert fitted[0] == split.pre.users
