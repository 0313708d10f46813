"""The response model and continuing a world with shown recommendations."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from featurerec.errors import DataError
from featurerec.events.schema import EVENT_ARROW_SCHEMA
from featurerec.simulate.catalog import PLACEMENTS
from featurerec.simulate.response import ResponseModel
from featurerec.simulate.state import RESPONSE_SCHEMA, WorldState
from featurerec.simulate.truth import GroundTruth
from featurerec.simulate.world import WorldConfig, generate_world


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resp") / "world"
    generate_world(WorldConfig(users=2500, days=20, seed=5)).write(out)
    return out


@pytest.fixture(scope="module")
def truth(world_dir: Path) -> GroundTruth:
    return GroundTruth.load(world_dir)


def _random_unused(truth: GroundTruth, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, truth.n_users, n)
    j = rng.integers(0, len(truth.features), n)
    d = truth.days - 1
    ok = (truth.adopt_day[u, j] > d) & truth.eligible[u, j] & (truth.signup_day[u] <= d)
    return u[ok], j[ok]


def test_random_recommendations_get_about_the_spec_ctr(truth: GroundTruth) -> None:
    u, j = _random_unused(truth, 60_000)
    ctr = ResponseModel(truth).probabilities(u, j, "sidebar_panel").click.mean()
    assert 0.02 <= ctr <= 0.045, ctr


def test_targeting_by_utility_beats_random(truth: GroundTruth) -> None:
    m = ResponseModel(truth)
    scores = truth.oracle_scores(np.arange(truth.n_users))
    ok = np.isfinite(scores.max(axis=1))
    users = np.arange(truth.n_users)[ok]
    best = scores[ok].argmax(axis=1)
    u, j = _random_unused(truth, 60_000)
    oracle = m.probabilities(users, best, "sidebar_panel")
    rand = m.probabilities(u, j, "sidebar_panel")
    assert oracle.click.mean() > 2.5 * rand.click.mean()
    assert oracle.adopt_7d.mean() > 2.0 * rand.adopt_7d.mean()


def test_placements_rank_as_a_product_team_expects(truth: GroundTruth) -> None:
    m = ResponseModel(truth)
    scores = truth.oracle_scores(np.arange(truth.n_users))
    d = truth.days - 1
    new = np.nonzero(np.isfinite(scores.max(axis=1)) & (d - truth.signup_day <= 14))[0]
    best = scores[new].argmax(axis=1)
    click = {p: m.probabilities(new, best, p).click.mean() for p in PLACEMENTS}
    adopt = {p: m.probabilities(new, best, p).adopt_7d.mean() for p in PLACEMENTS}
    dismiss = {p: m.probabilities(new, best, p).dismiss.mean() for p in PLACEMENTS}
    order = ["in_context_tooltip", "onboarding_wizard", "sidebar_panel", "email_digest"]
    assert [click[p] for p in order] == sorted(click.values(), reverse=True)
    assert adopt["in_context_tooltip"] > adopt["onboarding_wizard"] > adopt["sidebar_panel"]
    assert dismiss["sidebar_panel"] == max(dismiss.values()) and dismiss["email_digest"] == 0


def test_response_properties(truth: GroundTruth) -> None:
    m = ResponseModel(truth)
    u, j = _random_unused(truth, 20_000)
    p = m.probabilities(u, j, "in_context_tooltip")
    assert np.all((p.click >= 0) & (p.click + p.dismiss <= 1) & (p.adopt_7d >= 0))
    # monotone in utility: top quartile of relevance clicks and adopts more
    hi = p.relevance > np.quantile(p.relevance, 0.75)
    lo = p.relevance < np.quantile(p.relevance, 0.25)
    assert p.click[hi].mean() > 3 * p.click[lo].mean()
    assert p.adopt_7d[hi].mean() > 2 * p.adopt_7d[lo].mean()
    # features already used cannot be adopted again
    uu, jj = np.nonzero(truth.adopt_day <= truth.days - 1)
    assert np.all(m.probabilities(uu[:500], jj[:500], "sidebar_panel").adopt_7d == 0)


def test_sampling_is_seeded_and_matches_probabilities(truth: GroundTruth) -> None:
    m = ResponseModel(truth)
    u, j = _random_unused(truth, 40_000, seed=1)
    a = m.sample(u, j, "in_context_tooltip", seed=7)
    b = m.sample(u, j, "in_context_tooltip", seed=7)
    c = m.sample(u, j, "in_context_tooltip", seed=8)
    assert np.array_equal(a.clicked, b.clicked) and not np.array_equal(a.clicked, c.clicked)
    p = m.probabilities(u, j, "in_context_tooltip")
    assert abs(a.clicked.mean() - p.click.mean()) < 4 * np.sqrt(p.click.mean() / len(u))
    assert abs(a.adopted.mean() - p.adopt_7d.mean()) < 4 * np.sqrt(p.adopt_7d.mean() / len(u))
    assert not np.any(a.clicked & a.dismissed)
    assert np.all(a.adopt_delay_s[a.adopted] < 7 * 86400)


def test_unknown_placement_is_named(truth: GroundTruth) -> None:
    with pytest.raises(DataError, match="unknown placement 'banner'"):
        ResponseModel(truth).probabilities(np.array([0]), np.array([0]), "banner")


def test_advance_continues_the_world_with_exposures(world_dir: Path) -> None:
    state = WorldState.load(world_dir)
    truth = state.truth
    start_day = state.day
    # show each of 400 users their best unused feature in a tooltip at 9:00 on the next day
    scores = truth.oracle_scores(np.arange(truth.n_users))
    users = np.nonzero(np.isfinite(scores.max(axis=1)))[0][:400]
    best = scores[users].argmax(axis=1)
    shown = truth.day_datetime(start_day) + timedelta(hours=9)
    exposures = pa.table(
        {
            "recommendation_id": [f"rec_{i}" for i in range(len(users))],
            "user_id": [f"usr_{u:07d}" for u in users],
            "feature": [truth.features[j] for j in best],
            "placement": ["in_context_tooltip"] * len(users),
            "shown_at": pa.array([shown] * len(users), pa.timestamp("us")),
        }
    )
    res = state.advance(8, exposures, seed=1)
    assert state.day == start_day + 8 and res.days[0] == start_day
    assert res.events.schema.equals(EVENT_ARROW_SCHEMA)
    assert res.responses.schema.equals(RESPONSE_SCHEMA) and res.responses.num_rows == len(users)
    ev = res.events.to_pydict()
    day_start = truth.day_datetime(start_day)
    assert min(ev["timestamp"]) >= day_start
    adopted = [r for r in res.responses.to_pylist() if r["adopted"]]
    assert len(adopted) > 20
    # every induced adoption appears as the pair's first use at the sampled time
    first = {
        (u, f): t
        for u, f, t, fu in zip(
            ev["user_id"], ev["feature_category"], ev["timestamp"], ev["is_first_use"], strict=True
        )
        if fu
    }
    for r in adopted:
        assert first.get((r["user_id"], r["feature"])) is not None
        assert first[(r["user_id"], r["feature"])] <= r["adopted_at"]
    # clicks show the feature: a feature_discovered event for every clicked pair
    discovered = {
        (u, f)
        for u, f, e in zip(ev["user_id"], ev["feature_category"], ev["event_type"], strict=True)
        if e == "feature_discovered"
    }
    clicked = [r for r in res.responses.to_pylist() if r["clicked"]]
    assert clicked and all((r["user_id"], r["feature"]) in discovered for r in clicked)
    # ground truth follows the world
    idx = truth.user_index([r["user_id"] for r in adopted])
    fidx = truth.feature_index([r["feature"] for r in adopted])
    assert np.all(truth.adopt_day[idx, fidx] >= start_day)


def test_advance_without_exposures_and_bad_input(world_dir: Path) -> None:
    state = WorldState.load(world_dir)
    res = state.advance(1)
    assert res.events.num_rows > 0 and res.responses.num_rows == 0
    with pytest.raises(DataError, match="exposures lack columns"):
        state.advance(1, pa.table({"user_id": ["usr_0000001"]}))
    with pytest.raises(DataError, match="days must be >= 1"):
        state.advance(0)


def test_adoption_propensity_predicts_organic_adoption(world_dir: Path) -> None:
    """The organic-adoption ceiling ranks the features users really adopted next above the
    ones they did not, and is 0 where a feature is already used."""
    truth = GroundTruth.load(world_dir)
    asof = truth.days - 6
    users = np.arange(truth.n_users)
    prop = truth.adoption_propensity(users, asof, horizon_days=5)
    assert np.all(prop[truth.adopt_day <= asof] == 0)
    assert np.all((prop >= 0) & (prop <= 1))
    later = (truth.adopt_day > asof) & (truth.adopt_day < 2**30)
    cand = (truth.adopt_day > asof) & truth.eligible & (prop > 0)
    assert later.sum() > 50
    assert prop[later & cand].mean() > 3 * prop[cand & ~later].mean()
