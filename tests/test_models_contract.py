"""One contract suite run against every Scorer implementation (shapes, no NaN, seeding,
save/load, unseen users, error messages), plus model-specific pinned behaviour."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from featurerec.errors import ModelError
from featurerec.models.als import ALSParams, ALSScorer
from featurerec.models.bandit import ContextualBandit
from featurerec.models.base import Scorer, TrainingData, UserContext, UserState
from featurerec.models.baselines import PopularityScorer, RandomScorer
from featurerec.models.context import ContextScorer
from featurerec.models.sequence import SequenceScorer
from featurerec.models.toy import toy_training_data

FACTORIES: dict[str, Callable[[int], Any]] = {
    "als": lambda seed: ALSScorer(ALSParams(8, 0.1, 5, 10.0), seed=seed),
    "context": lambda seed: ContextScorer(),
    "sequence": lambda seed: SequenceScorer(decay=0.5),
    "popularity": lambda seed: PopularityScorer(),
    "random": lambda seed: RandomScorer(seed=seed),
    "bandit": lambda seed: ContextualBandit(seed=seed),
}


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return toy_training_data(n_users=300, n_features=10, seed=3)


@pytest.fixture(params=sorted(FACTORIES))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _users(data: TrainingData) -> list[UserState]:
    states = data.user_states(data.users[:40])
    # an unseen user with history and a fully unknown one
    states.append(
        UserState(
            "new-user",
            UserContext(role="engineer", plan="pro", industry="unknown-industry"),
            interactions={"feature_01": 0.5, "feature_03": 0.2, "not-a-feature": 1.0},
            recent_features=("feature_03", "feature_01"),
            event_count=12,
        )
    )
    states.append(UserState("nobody"))
    return states


def test_scorer_contract(name: str, data: TrainingData, tmp_path: Path) -> None:
    model = FACTORIES[name](7).fit(data)
    assert isinstance(model, Scorer)
    users = _users(data)
    s = model.score(users)
    assert s.shape == (len(users), len(data.features))
    assert s.dtype == np.float32
    assert np.isfinite(s).all()
    # same seed, same data -> same scores
    again = FACTORIES[name](7).fit(data).score(users)
    np.testing.assert_allclose(s, again, rtol=1e-5, atol=1e-6)
    # save / load round trip
    model.save(tmp_path / name)
    loaded = type(model).load(tmp_path / name)
    np.testing.assert_allclose(loaded.score(users), s, rtol=1e-5, atol=1e-6)
    # an empty batch
    assert model.score([]).shape == (0, len(data.features))


def test_scorer_load_errors_name_the_problem(name: str, data: TrainingData, tmp_path: Path) -> None:
    cls = type(FACTORIES[name](0))
    with pytest.raises(ModelError, match="artifact missing"):
        cls.load(tmp_path / "nothing-here")
    PopularityScorer().fit(data).save(tmp_path / "pop")
    if name != "popularity":
        with pytest.raises(ModelError, match="expected '"):
            cls.load(tmp_path / "pop")
    (tmp_path / "pop" / "meta.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        cls.load(tmp_path / "pop")


def test_scorers_reject_empty_item_space(name: str) -> None:
    empty = TrainingData([], [], sp.csr_matrix((0, 0)), {}, {}, {}, {})
    if name == "random":
        pytest.skip("the random baseline needs no data")
    with pytest.raises(ModelError, match=r"no features|empty"):
        FACTORIES[name](0).fit(empty)


def test_als_scores_follow_online_interactions(data: TrainingData) -> None:
    als = ALSScorer(ALSParams(8, 0.1, 5, 10.0)).fit(data)
    u = data.user_states([data.users[0]])[0]
    twin = UserState("someone-else", interactions=dict(u.interactions))
    np.testing.assert_allclose(als.score([u]), als.score([twin]), rtol=1e-5)
    unused = next(f for f in data.features if f not in u.interactions)
    more = UserState("x", interactions={**u.interactions, unused: 1.0})
    assert not np.allclose(als.score([u]), als.score([more]))
    assert not als.score([UserState("empty")]).any()


def test_als_param_validation() -> None:
    with pytest.raises(ModelError, match="factors must be > 0"):
        ALSParams(factors=0)
    with pytest.raises(ModelError, match="regularization must be >= 0"):
        ALSParams(regularization=-1)


def test_als_rejects_empty_matrix() -> None:
    d = TrainingData(["u"], ["a", "b"], sp.csr_matrix((1, 2), dtype=np.float32), {}, {}, {}, {})
    with pytest.raises(ModelError, match="interaction matrix is empty"):
        ALSScorer().fit(d)


def test_sequence_scores_pinned() -> None:
    d = TrainingData(
        ["u"],
        ["A", "B", "C"],
        sp.csr_matrix(np.ones((1, 3), np.float32)),
        {},
        {("A", "B"): 0.6, ("A", "C"): 0.4, ("B", "C"): 1.0},
        {},
        {},
    )
    m = SequenceScorer(decay=0.5).fit(d)
    s = m.score([UserState("u", recent_features=("A", "B"))])
    # B is most recent (weight 1), A before it (weight 0.5)
    np.testing.assert_allclose(s[0], [0.0, 0.5 * 0.6, 0.5 * 0.4 + 1.0], rtol=1e-6)
    src = m.strongest_source([UserState("u", recent_features=("A", "B"))], np.array([[2, 1, 0]]))
    assert src.tolist() == [[1, 0, -1]]
    with pytest.raises(ModelError, match="decay must be in"):
        SequenceScorer(decay=0)


@pytest.mark.parametrize("n_features", [10, 60])
def test_strongest_source_is_the_dense_argmax(n_features: int) -> None:
    """The sparse strongest_source (a user's recent features only) equals the definition
    argmax_f w[u, f] P(c | f) over all features, lowest id on ties, -1 where nothing
    contributes."""
    from featurerec.models.common import recency_matrix

    data = toy_training_data(n_users=300, n_features=n_features, seed=1)
    m = SequenceScorer().fit(data)
    users = data.user_states()
    ids = np.random.default_rng(0).integers(-1, n_features, (len(users), min(n_features, 20)))
    w = recency_matrix(users, m.space, m.decay).toarray()
    t = m.transitions.toarray()
    contrib = w[:, None, :] * t.T[np.maximum(ids, 0)]
    want = np.where((contrib.max(axis=2) > 0) & (ids >= 0), contrib.argmax(axis=2), -1)
    got = m.strongest_source(users, ids)
    assert (got >= 0).sum() > ids.size // 10  # the check is not vacuous
    np.testing.assert_array_equal(got, want)


def test_context_model_shrinks_small_groups_toward_global_rate() -> None:
    # 200 engineers: 50% use A; 2 designers: both use A; global rate ~ 0.5
    users = [f"e{i}" for i in range(200)] + ["d0", "d1"]
    rows = [i for i in range(100)] + [200, 201]
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, [0] * len(rows))), shape=(202, 2))
    ctx = {u: UserContext(role="engineer") for u in users[:200]}
    ctx.update({u: UserContext(role="designer") for u in users[200:]})
    model = ContextScorer().fit(TrainingData(users, ["A", "B"], m, ctx, {}, {}, {}))
    rates, sizes = model.attribute_rates(
        [
            UserState("x", UserContext(role="designer")),
            UserState("y", UserContext(role="engineer")),
        ],
        "role",
    )
    g = model.global_rate[0]
    assert sizes.tolist() == [2.0, 200.0]
    # raw designer rate is 1.0; the shrunk one is pulled well toward the global rate
    assert g < rates[0, 0] < 0.9
    assert abs(rates[1, 0] - 0.5) < 0.02
    # unseen value -> the global rate
    r, s = model.attribute_rates([UserState("z", UserContext(role="pilot"))], "role")
    assert s[0] == 0 and r[0, 0] == pytest.approx(g)


def test_popularity_and_random_baselines(data: TrainingData) -> None:
    pop = PopularityScorer().fit(data)
    users = data.user_states(data.users[:5])
    s = pop.score(users)
    expected = np.bincount(data.matrix.indices, minlength=len(data.features)) / len(data.users)
    np.testing.assert_allclose(s[0], expected, rtol=1e-6)
    assert (s == s[0]).all()
    r1, r2 = RandomScorer(seed=1).fit(data), RandomScorer(seed=2).fit(data)
    assert not np.allclose(r1.score(users), r2.score(users))
    s1 = r1.score(users)
    assert ((s1 >= 0) & (s1 < 1)).all()
    # a user's random order does not depend on the batch it comes in
    np.testing.assert_allclose(r1.score(users[2:3])[0], s1[2])
