"""The bandit learns the recommendation response from logged feedback (synthetic logs with
known rewards): the greedy ranking moves toward the better-rewarded feature, per context."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest

from featurerec.errors import ModelError
from featurerec.models.als import ALSParams
from featurerec.models.base import TrainingData
from featurerec.models.common import adopted_mask
from featurerec.models.fit import TrainConfig, train_bundle
from featurerec.models.strategies import ModelBundle
from featurerec.models.toy import toy_training_data
from featurerec.models.training import apply_feedback

FAST = TrainConfig(als_grid=(ALSParams(8, 0.1, 5, 10.0),))


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return toy_training_data(n_users=400, n_features=12, seed=5)


def _bundle(data: TrainingData) -> ModelBundle:
    return train_bundle(data, FAST)[0]


def _top1(bundle: ModelBundle, data: TrainingData, name: str = "hybrid") -> np.ndarray:
    states = data.user_states(data.users)
    ranked = bundle.strategy(name).recommend(states, k=3, explore=False)
    return np.asarray(ranked.ids[:, 0])


def _log(
    bundle: ModelBundle,
    data: TrainingData,
    click_prob: Any,
    n: int = 6000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A uniformly random logging policy over each user's unused features (propensity
    1 / n_unused) and clicks drawn from ``click_prob(user_row, feature_id)``."""
    rng = np.random.default_rng(seed)
    states = data.user_states(data.users)
    unused = ~adopted_mask(states, bundle.space)
    t0 = datetime(2026, 1, 1)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        u = int(rng.integers(len(data.users)))
        cand = np.nonzero(unused[u])[0]
        if not len(cand):
            continue
        f = int(rng.choice(cand))
        clicked = int(rng.random() < click_prob(u, f))
        rows.append(
            {
                "user_id": data.users[u],
                "recommended_feature": bundle.space.features[f],
                "score": 0.5,
                "propensity": 1.0 / len(cand),
                "strategy": "random",
                "variant": None,
                "clicked": clicked,
                "adopted_7d": clicked,
                "generated_at": t0 + timedelta(days=i % 5),
            }
        )
    return rows


def test_bandit_ranking_moves_to_the_better_rewarded_feature(data: TrainingData) -> None:
    bundle = _bundle(data)
    before = _top1(bundle, data)
    # the feature the upstream ranking puts first least often (among those some users lack)
    counts = np.bincount(before[before >= 0], minlength=len(bundle.space))
    unused = ~adopted_mask(data.user_states(data.users), bundle.space)
    lacking = unused.sum(axis=0) >= 50
    good = int(np.argmin(np.where(lacking, counts, 10**9)))
    assert (before == good).mean() < 0.2
    rows = _log(bundle, data, lambda u, f: 0.4 if f == good else 0.02)
    fed = apply_feedback(bundle, data, rows, "clicked")
    assert fed == {"hybrid": len(rows), "sequence_aware": len(rows)}
    for name in ("hybrid", "sequence_aware"):
        after = _top1(bundle, data, name)
        can = unused[:, good]
        # every user who can still adopt the good feature now gets it first
        assert (after[can] == good).mean() > 0.9
        assert bundle.bandits[name].epsilon == pytest.approx(0.1 * 0.995**5)


def test_bandit_learns_a_context_dependent_response(data: TrainingData) -> None:
    bundle = _bundle(data)
    roles = np.array([str(data.contexts[u].role) for u in data.users])
    role = sorted(set(roles))[0]
    states = data.user_states(data.users)
    unused = ~adopted_mask(states, bundle.space)
    # feature A pays off only for `role`, feature B only for everybody else
    a, b = (int(i) for i in np.argsort(-unused.sum(axis=0))[:2])
    mine = roles == role

    def prob(u: int, f: int) -> float:
        if f == a:
            return 0.4 if mine[u] else 0.01
        if f == b:
            return 0.01 if mine[u] else 0.4
        return 0.02

    apply_feedback(bundle, data, _log(bundle, data, prob, n=8000, seed=1), "clicked")
    top = _top1(bundle, data)
    both = unused[:, a] & unused[:, b]
    assert both[mine].sum() >= 10 and both[~mine].sum() >= 10
    assert (top[both & mine] == a).mean() > 0.8
    assert (top[both & ~mine] == b).mean() > 0.8


def test_apply_feedback_rejects_an_unknown_reward(data: TrainingData) -> None:
    bundle = _bundle(data)
    with pytest.raises(ModelError, match="bandit reward must be one of"):
        apply_feedback(bundle, data, [], "revenue")


def test_apply_feedback_without_rows_keeps_the_warm_start(data: TrainingData) -> None:
    bundle = _bundle(data)
    theta = bundle.bandits["hybrid"].theta.copy()
    assert apply_feedback(bundle, data, [], "clicked") == {}
    np.testing.assert_array_equal(bundle.bandits["hybrid"].theta, theta)


def test_feedback_is_learned_in_the_segment_the_user_was_in_when_served(
    data: TrainingData,
) -> None:
    """Users warm by now but cold when served: their rows teach the cold segment."""
    bundle = _bundle(data)
    states = data.user_states(data.users)
    unused = ~adopted_mask(states, bundle.space)
    a, b = (int(i) for i in np.argsort(-unused.sum(axis=0))[:2])
    served_cold = np.random.default_rng(3).random(len(data.users)) < 0.5

    def prob(u: int, f: int) -> float:
        if f == a:
            return 0.4 if served_cold[u] else 0.01
        if f == b:
            return 0.01 if served_cold[u] else 0.4
        return 0.02

    rows = _log(bundle, data, prob, n=8000, seed=2)
    index = {u: i for i, u in enumerate(data.users)}
    for r in rows:
        r["events_before"] = 0 if served_cold[index[r["user_id"]]] else 60
    apply_feedback(bundle, data, rows, "clicked")
    both = unused[:, a] & unused[:, b]
    rows_ = np.nonzero(both)[0]
    assert len(rows_) >= 20
    picked = [data.users[i] for i in rows_]
    cold_now = [replace(s, event_count=0) for s in data.user_states(picked)]
    active_now = [replace(s, event_count=60) for s in data.user_states(picked)]
    strat = bundle.strategy("hybrid")
    top_cold = strat.recommend(cold_now, k=3, explore=False).ids[:, 0]
    top_active = strat.recommend(active_now, k=3, explore=False).ids[:, 0]
    assert (top_cold == a).mean() > 0.8
    assert (top_active == b).mean() > 0.8
