"""Strategies, ranking invariants (Hypothesis), exact propensities, the bandit and the
item index (recall against exact search, also after save/load)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurerec.errors import ModelError
from featurerec.models.als import ALSParams
from featurerec.models.bandit import BanditParams, ContextualBandit
from featurerec.models.base import CutFeatures, TrainingData, UserContext, UserState
from featurerec.models.fit import TrainConfig, train_bundle, validation_split
from featurerec.models.index import ExactIndex, HNSWIndex, build_index, load_index
from featurerec.models.ranking import epsilon_slates, slate_propensities
from featurerec.models.strategies import STRATEGIES, ModelBundle, load_bundle
from featurerec.models.toy import toy_training_data

FAST = TrainConfig(als_grid=(ALSParams(8, 0.1, 5, 10.0), ALSParams(4, 1.0, 5, 40.0)))


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return toy_training_data(n_users=400, n_features=12, seed=5)


@pytest.fixture(scope="module")
def bundle(data: TrainingData) -> ModelBundle:
    b, report = train_bundle(data, FAST)
    assert report.warm_start_rows > 0
    return b


# -- ranking invariants ------------------------------------------------------------------


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    strategy=st.sampled_from(STRATEGIES),
    k=st.integers(1, 15),
    n_cand=st.integers(1, 20),
    explore=st.booleans(),
    seed=st.integers(0, 10_000),
    density=st.floats(0.0, 1.0),
    first=st.integers(0, 350),
)
def test_ranking_invariants(
    bundle: ModelBundle,
    data: TrainingData,
    strategy: str,
    k: int,
    n_cand: int,
    explore: bool,
    seed: int,
    density: float,
    first: int,
) -> None:
    users = data.user_states(data.users[first : first + 12])
    rng = np.random.default_rng(seed)
    exclude = rng.random((len(users), bundle.n_items)) < density
    strat = bundle.strategy(strategy)
    ids, scores = strat.candidates(users, n_cand, exclude)
    assert ids.shape == (len(users), n_cand)
    for i in range(len(users)):
        row = ids[i][ids[i] >= 0]
        assert len(set(row.tolist())) == len(row)  # no duplicates
        assert not exclude[i, row].any()  # never an excluded item
        assert len(row) == min(n_cand, int((~exclude[i]).sum()))  # fills up when it can
        valid_scores = scores[i][ids[i] >= 0]
        assert (np.diff(valid_scores) <= 1e-6).all()  # sorted
        assert ((valid_scores >= 0) & (valid_scores <= 1)).all()
    ranked = strat.rank(users, ids, scores, k, np.random.default_rng(seed), explore=explore)
    assert ranked.ids.shape == (len(users), k)
    for i in range(len(users)):
        shown = ranked.ids[i][ranked.ids[i] >= 0]
        assert len(set(shown.tolist())) == len(shown)
        assert set(shown.tolist()) <= set(ids[i][ids[i] >= 0].tolist())
        assert not exclude[i, shown].any()
        assert len(shown) == min(k, int((ids[i] >= 0).sum()))
        # padding only at the end
        assert (ranked.ids[i][len(shown) :] == -1).all()
        p = ranked.propensities[i][: len(shown)]
        assert ((p > 0) & (p <= 1)).all()
        if not explore:
            assert (p == 1).all()
        if not ranked.explored[i] and strategy != "random":
            s = ranked.scores[i][: len(shown)]
            assert (np.diff(s) <= 1e-6).all()
    assert ((ranked.scores >= 0) & (ranked.scores <= 1)).all()


def test_exclude_mask_shape_is_checked(bundle: ModelBundle, data: TrainingData) -> None:
    users = data.user_states(data.users[:3])
    with pytest.raises(ModelError, match=r"exclude mask has shape \(3, 2\)"):
        bundle.strategy("hybrid").candidates(users, 5, np.zeros((3, 2), bool))
    with pytest.raises(ModelError, match="unknown strategy 'nope'"):
        bundle.strategy("nope")


def test_default_exclusion_is_the_adopted_set(bundle: ModelBundle, data: TrainingData) -> None:
    users = data.user_states(data.users[:30])
    ranked = bundle.strategy("sequence_aware").recommend(users, k=5)
    for u, row in zip(users, ranked.ids, strict=True):
        names = {bundle.features[i] for i in row if i >= 0}
        assert not names & set(u.interactions)


def test_cold_users_get_context_candidates(bundle: ModelBundle) -> None:
    from dataclasses import replace

    cold = UserState("c", UserContext(role="engineer", plan="pro"), event_count=1)
    saved = bundle.config
    try:
        bundle.config = replace(saved, n_candidates=3)
        ctx = bundle.context.score([cold])[0]
        top3 = set(np.argsort(-ctx, kind="stable")[:3].tolist())
        for name in ("hybrid", "sequence_aware"):
            ids, _ = bundle.strategy(name).candidates([cold], k=3)
            assert set(ids[0].tolist()) == top3, name
    finally:
        bundle.config = saved


def test_components_for_reasons(bundle: ModelBundle, data: TrainingData) -> None:
    users = data.user_states(data.users[:5])
    r = bundle.strategy("sequence_aware").recommend(users, k=3)
    assert {"context", "popularity", "collaborative", "transition", "bandit"} <= set(r.components)
    for v in r.components.values():
        assert v.shape == (5, 3)
    assert r.transition_from is not None and r.transition_from.shape == (5, 3)


def test_bundle_save_load_same_recommendations(
    bundle: ModelBundle, data: TrainingData, tmp_path: Path
) -> None:
    users = data.user_states(data.users[:50])
    bundle.save(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.available() == bundle.available()
    for name in bundle.available():
        a = bundle.strategy(name).recommend(users, 3, rng=np.random.default_rng(1), explore=True)
        b = loaded.strategy(name).recommend(users, 3, rng=np.random.default_rng(1), explore=True)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
        np.testing.assert_allclose(a.propensities, b.propensities)
    # the ranker alone (no MF): only the non-collaborative strategies
    alone = load_bundle(ranker=tmp_path / "b" / "ranker")
    assert alone.available() == ["content_based", "popularity", "random"]
    with pytest.raises(ModelError, match="needs components this bundle lacks"):
        alone.strategy("hybrid")


# -- propensities ------------------------------------------------------------------------


def test_slate_propensities_are_a_distribution_per_position() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((6, 8))
    valid = rng.random((6, 8)) < 0.8
    p = slate_propensities(scores, valid, 3, 0.1)
    n_valid = valid.sum(axis=1)
    for i in range(6):
        for pos in range(3):
            total = p[i, :, pos].sum()
            assert total == pytest.approx(1.0 if pos < n_valid[i] else 0.0)
        assert (p[i][~valid[i]] == 0).all()


def test_propensities_match_monte_carlo_frequencies() -> None:
    scores = np.array([[0.9, 0.1, 0.5, 0.3, 0.7]])
    valid = np.array([[True, True, True, False, True]])
    eps, k, draws = 0.3, 3, 20_000
    exact = slate_propensities(scores, valid, k, eps)[0]  # (c, k)
    counts = np.zeros_like(exact)
    rng = np.random.default_rng(42)
    big_scores = np.repeat(scores, draws, axis=0)
    big_valid = np.repeat(valid, draws, axis=0)
    cols, prop, explored = epsilon_slates(big_scores, big_valid, k, eps, rng, True)
    for pos in range(k):
        np.add.at(counts[:, pos], cols[:, pos], 1)
    freq = counts / draws
    np.testing.assert_allclose(freq, exact, atol=0.015)
    assert explored.mean() == pytest.approx(eps, abs=0.015)
    # the logged propensity of each shown item equals the exact marginal
    np.testing.assert_allclose(prop, exact[cols, np.arange(k)[None, :]])


# -- bandit ------------------------------------------------------------------------------


def _bandit(data: TrainingData, **kw: float) -> ContextualBandit:
    return ContextualBandit(BanditParams(**kw)).fit(data)  # type: ignore[arg-type]


def test_bandit_before_feedback_ranks_by_upstream(data: TrainingData) -> None:
    b = _bandit(data)
    users = data.user_states(data.users[:20])
    rng = np.random.default_rng(0)
    ids = np.tile(np.arange(8), (20, 1))
    up = rng.random((20, 8))
    pred = b.predict(users, ids, up)
    np.testing.assert_array_equal(np.argsort(-pred, axis=1), np.argsort(-up, axis=1))


def test_bandit_learns_context_specific_rewards_and_decays(data: TrainingData) -> None:
    b = _bandit(data)
    eng = UserState("e", UserContext(role="engineer"), event_count=20)
    des = UserState("d", UserContext(role="designer"), event_count=20)
    # engineers adopt feature 3, designers feature 5; upstream says the opposite order
    users = [eng] * 200 + [des] * 200
    items = np.array([3] * 100 + [5] * 100 + [3] * 100 + [5] * 100)
    rewards = np.array([1.0] * 100 + [0.0] * 100 + [0.0] * 100 + [1.0] * 100)
    upstream = np.full(400, 0.5)
    for t in range(3):
        b.update(users, items, upstream, rewards, np.full(400, 0.5))
        assert b.epsilon == pytest.approx(0.1 * 0.995 ** (t + 1))
    cand = np.array([[3, 5], [3, 5]])
    pred = b.predict([eng, des], cand, np.array([[0.4, 0.6], [0.6, 0.4]]))
    assert pred[0, 0] > pred[0, 1]  # engineer: feature 3 first despite lower upstream
    assert pred[1, 1] > pred[1, 0]
    with pytest.raises(ModelError, match="must have the same length"):
        b.update(users, items[:10], upstream, rewards)


def test_bandit_inverse_propensity_weighting_changes_the_fit(data: TrainingData) -> None:
    users = [UserState("e", UserContext(role="engineer"), event_count=20)] * 50
    items = np.full(50, 2)
    rewards = (np.arange(50) % 2).astype(float)
    props = np.where(rewards > 0, 0.05, 1.0)  # rewarded rows were rarely shown: weigh more
    a = _bandit(data).update(users, items, np.full(50, 0.5), rewards)
    w = _bandit(data).update(users, items, np.full(50, 0.5), rewards, props)
    ids = np.array([[2]])
    assert (
        w.predict(users[:1], ids, np.array([[0.5]]))[0, 0]
        > a.predict(users[:1], ids, np.array([[0.5]]))[0, 0]
    )


def test_bandit_params_are_validated() -> None:
    with pytest.raises(ModelError, match="exploration_rate must be in"):
        BanditParams(exploration_rate=1.5)
    with pytest.raises(ModelError, match="decay_factor must be in"):
        BanditParams(decay_factor=0)


# -- validation split ------------------------------------------------------------------------


def test_validation_split_holds_out_recent_first_uses(data: TrainingData) -> None:
    sp_ = validation_split(data, 7)
    assert sp_ is not None
    fu = data.first_used
    assert fu is not None
    cut = sp_.cut_day
    r, c = np.nonzero(sp_.targets)
    assert (np.asarray(fu[r, c]).ravel() >= cut).all()
    pre = sp_.pre.matrix.tocoo()
    assert (np.asarray(fu[pre.row, pre.col]).ravel() < cut).all()
    assert pre.nnz + len(r) == data.matrix.nnz


# -- index -----------------------------------------------------------------------------------


def _recall(a: np.ndarray, b: np.ndarray) -> float:
    hits = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b, strict=True))
    return hits / b.size


@pytest.mark.parametrize("metric", ["inner_product", "cosine"])
def test_hnsw_recall_against_exact_also_after_save_load(metric: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(2000, 32)).astype(np.float32) * rng.uniform(0.5, 2, (2000, 1))
    names = [f"i{i}" for i in range(2000)]
    queries = rng.normal(size=(200, 32)).astype(np.float32)
    exact = ExactIndex(items, names, metric)
    hnsw = build_index(items, names, metric=metric, kind="hnsw")
    assert isinstance(hnsw, HNSWIndex)
    e_ids, _ = exact.search(queries, 20)
    h_ids, _ = hnsw.search(queries, 20)
    assert _recall(h_ids, e_ids) >= 0.99
    hnsw.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert isinstance(loaded, HNSWIndex)
    l_ids, _ = loaded.search(queries, 20)
    assert _recall(l_ids, e_ids) >= 0.99
    # exclusions are honoured and still filled up to k
    excl = np.zeros((200, 2000), bool)
    excl[np.arange(200)[:, None], e_ids[:, :5]] = True
    x_ids, _ = loaded.search(queries, 20, excl)
    assert not np.take_along_axis(excl, x_ids, axis=1).any()
    assert _recall(x_ids, exact.search(queries, 20, excl)[0]) >= 0.99


def test_index_factory_and_errors(tmp_path: Path) -> None:
    items = np.eye(4, dtype=np.float32)
    small = build_index(items, list("abcd"))
    assert isinstance(small, ExactIndex)
    ids, scores = small.search(np.array([[0.5, 0, 2, 1]], np.float32), 3)
    assert ids.tolist() == [[2, 3, 0]] and scores[0, 0] == pytest.approx(2.0)
    with pytest.raises(ModelError, match="unknown metric 'l7'"):
        build_index(items, list("abcd"), metric="l7")
    with pytest.raises(ModelError, match="unknown kind"):
        build_index(items, list("abcd"), kind="annoy")  # type: ignore[arg-type]
    h = build_index(
        np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32),
        [str(i) for i in range(50)],
        kind="hnsw",
    )
    h.save(tmp_path / "h")
    (tmp_path / "h" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="index artifact corrupt"):
        load_index(tmp_path / "h")


def test_single_feature_catalog_and_unknown_users() -> None:
    import scipy.sparse as sp

    m = sp.csr_matrix(np.array([[0.5], [0.2], [0.0]], np.float32))
    m.eliminate_zeros()
    d = TrainingData(["a", "b", "c"], ["only"], m, {"a": UserContext(role="x")}, {}, {}, {"a": 10})
    b, _ = train_bundle(d, TrainConfig(als_grid=(ALSParams(4, 0.1, 3, 10.0),)))
    users = [UserState("never-seen"), UserState("a", interactions={"only": 0.5})]
    for name in b.available():
        r = b.strategy(name).recommend(users, k=3)
        assert r.ids.tolist() == [[0, -1, -1], [-1, -1, -1]], name


def test_blend_weights_are_fitted_and_order_the_candidates(
    bundle: ModelBundle, data: TrainingData
) -> None:
    from featurerec.models import fit

    users = data.user_states(data.users[:80])
    excl = np.zeros((80, bundle.n_items), bool)
    strat = bundle.strategy("hybrid")
    x = strat.blend_signals(users)
    # targets: each user's item with the highest context lift (signal 2)
    targets = np.zeros((80, bundle.n_items), bool)
    targets[np.arange(80), np.argmax(x[:, :, 2], axis=1)] = True
    saved = bundle.config
    try:
        report = fit.TrainReport(als_params={})
        fit.fit_blends(bundle, users, excl, targets, seed=0, report=report)
        w = bundle.config.hybrid_weights
        assert w[2] > max(abs(w[0]), abs(w[1])), w
        assert report.blend_validation["hybrid"]["blend"] >= 0.95
        assert set(report.blend_weights["hybrid"]) == {"adoption", "collaborative", "context_lift"}
        raw = strat.blend_raw(users)
        np.testing.assert_allclose(raw, x @ np.asarray(w), rtol=1e-6)
    finally:
        bundle.config = saved


def test_transition_signal_is_kept_only_when_it_beats_hybrid_by_a_standard_error(
    bundle: ModelBundle, data: TrainingData
) -> None:
    from featurerec.models import fit

    n = 120
    users = data.user_states(data.users[:n])
    excl = np.zeros((n, bundle.n_items), bool)
    x = bundle.strategy("sequence_aware").blend_signals(users)
    assert x.shape[2] == 4  # hybrid's three signals + transition
    saved = bundle.config
    try:
        for signal, kept in ((3, True), (2, False)):
            targets = np.zeros((n, bundle.n_items), bool)
            targets[np.arange(n), np.argmax(x[:, :, signal], axis=1)] = True
            report = fit.TrainReport(als_params={})
            fit.fit_blends(bundle, users, excl, targets, seed=0, report=report)
            gate = report.transition_gate
            assert bool(gate["kept"]) is kept, gate
            assert (gate["cv_ndcg@5_gain"] > gate["standard_error"]) is kept
            sw, hw = bundle.config.sequence_weights, bundle.config.hybrid_weights
            if kept:
                assert sw[3] > 0
            else:
                assert sw == (*hw, 0.0)
    finally:
        bundle.config = saved


def test_bundle_config_rejects_wrong_weights() -> None:
    from featurerec.models.strategies import BundleConfig

    with pytest.raises(ModelError, match="hybrid weights must be 3"):
        BundleConfig(hybrid_weights=(1.0, 2.0))
    with pytest.raises(ModelError, match="sequence_aware weights"):
        BundleConfig(sequence_weights=(1.0, float("nan"), 0.0, 0.0))


def test_validation_split_uses_recent_features_as_of_the_cut(data: TrainingData) -> None:
    from dataclasses import replace

    cut = float(data.first_used.data.max()) - 7.0  # type: ignore[union-attr]
    u0, u1 = data.users[0], data.users[1]
    pre_recent = {u0: ("feature_11", "feature_03"), u1: ("feature_05",)}
    d = replace(data, at_cuts=(CutFeatures(cut, {}, pre_recent),))
    split = validation_split(d, 7.0)
    assert split is not None and split.pre.end_day == pytest.approx(cut)
    row = {f for f in split.pre.user_states([u0])[0].interactions}
    # as of the cut, limited to features the user had before it
    assert split.pre.recent[u0] == tuple(f for f in pre_recent[u0] if f in row)
    assert split.pre.recent[data.users[2]] == ()
    # without a matching cut, the as-of recent features (filtered) are kept
    other = validation_split(replace(d, at_cuts=(CutFeatures(cut - 1, {}, pre_recent),)), 7.0)
    assert other is not None and other.pre.recent != split.pre.recent
