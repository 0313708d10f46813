"""Off-policy estimators on synthetic logs whose true target-policy value is known."""

from __future__ import annotations

import numpy as np
import pytest

from featurerec.errors import DataError
from featurerec.experiments.ope import (
    dr,
    estimate_from_weights,
    estimate_policy_value,
    ips,
    remix,
    snips,
    snips_by_stratum,
    stratified_snips,
    tabular_reward_model,
)

N_CTX, N_ACT = 6, 5


def _world(seed: int = 0):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.02, 0.4, (N_CTX, N_ACT))  # true click probability per (context, action)
    p_ctx = np.full(N_CTX, 1 / N_CTX)
    logging = rng.dirichlet(np.full(N_ACT, 2.0), N_CTX) * 0.9 + 0.1 / N_ACT  # covers all actions
    target = rng.dirichlet(np.full(N_ACT, 0.5), N_CTX)
    truth = float(np.sum(p_ctx[:, None] * target * theta))
    return theta, logging, target, truth


def _log(theta, logging, target, n: int, rng: np.random.Generator):
    ctx = rng.integers(0, N_CTX, n)
    u = rng.random(n)[:, None]
    action = (u > np.cumsum(logging[ctx], axis=1)).sum(axis=1)
    reward = (rng.random(n) < theta[ctx, action]).astype(float)
    pscore = logging[ctx, action]
    return ctx, action, reward, pscore, target[ctx]


def test_intervals_cover_the_truth() -> None:
    theta, logging, target, truth = _world(0)
    rng = np.random.default_rng(1)
    ctx, a, r, p, dist = _log(theta, logging, target, 50_000, rng)
    q = tabular_reward_model(ctx, a, r, n_contexts=N_CTX, n_actions=N_ACT)[ctx]
    est = estimate_policy_value(a, r, p, dist, q)
    for e in est.values():
        assert e.ci_low <= truth <= e.ci_high, (e, truth)
        assert abs(e.value - truth) < 0.02


def test_ips_unbiased_snips_and_dr_lower_variance() -> None:
    theta, logging, target, truth = _world(3)
    vals: dict[str, list[float]] = {"ips": [], "snips": [], "dr": []}
    covered = 0
    for seed in range(200):
        rng = np.random.default_rng(100 + seed)
        ctx, a, r, p, dist = _log(theta, logging, target, 800, rng)
        q = tabular_reward_model(ctx, a, r, n_contexts=N_CTX, n_actions=N_ACT)[ctx]
        est = estimate_policy_value(a, r, p, dist, q)
        for k in vals:
            vals[k].append(est[k].value)
        covered += est["ips"].ci_low <= truth <= est["ips"].ci_high
    ips_vals = np.array(vals["ips"])
    # unbiased: the mean over 200 seeds is within 3 standard errors of the truth
    assert abs(ips_vals.mean() - truth) < 3 * ips_vals.std(ddof=1) / np.sqrt(len(ips_vals))
    assert np.var(vals["snips"]) < np.var(ips_vals)
    assert np.var(vals["dr"]) < np.var(ips_vals)
    assert 0.88 <= covered / 200 <= 0.99


def test_on_policy_ips_equals_the_sample_mean() -> None:
    theta, logging, _, _ = _world(4)
    rng = np.random.default_rng(5)
    ctx, a, r, p, _ = _log(theta, logging, logging, 2000, rng)
    e = ips(a, r, p, logging[ctx])
    assert e.value == pytest.approx(r.mean())
    assert snips(a, r, p, logging[ctx]).value == pytest.approx(r.mean())
    assert e.effective_sample_size == pytest.approx(2000)


def test_dr_with_perfect_model_is_exact_in_expectation() -> None:
    theta, logging, target, truth = _world(6)
    rng = np.random.default_rng(7)
    ctx, a, r, p, dist = _log(theta, logging, target, 20_000, rng)
    e = dr(a, r, p, dist, theta[ctx])
    e_ips = ips(a, r, p, dist)
    assert e.ci_low <= truth <= e.ci_high
    assert e.se < e_ips.se


def test_slate_positions_and_user_clusters() -> None:
    """3-d action_dist (obp's len_list) and user-clustered intervals."""
    theta, logging, target, truth = _world(8)
    rng = np.random.default_rng(9)
    n = 30_000
    _ctx, a, r, p, dist2 = _log(theta, logging, target, n, rng)
    pos = rng.integers(0, 3, n)
    dist3 = np.repeat(dist2[:, :, None], 3, axis=2)
    e3 = ips(a, r, p, dist3, position=pos)
    assert e3.value == pytest.approx(ips(a, r, p, dist2).value)
    users = rng.integers(0, 3000, n)
    ec = ips(a, r, p, dist2, groups=users)
    assert ec.value == pytest.approx(e3.value)
    assert ec.ci_low <= truth <= ec.ci_high


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pscore": np.array([0.5, 0.0])}, r"pscore must be in \(0, 1\] \(round 1"),
        ({"reward": np.array([1.0])}, r"reward must have shape \(2,\)"),
        ({"action": np.array([0, 7])}, r"action ids must be in \[0, 2\)"),
        ({"action_dist": np.array([[0.5, 0.4], [1.0, 0.0]])}, "sum to 1"),
    ],
)
def test_bad_inputs_are_named(kwargs: dict, match: str) -> None:
    base = {
        "action": np.array([0, 1]),
        "reward": np.array([1.0, 0.0]),
        "pscore": np.array([0.5, 0.5]),
        "action_dist": np.array([[0.5, 0.5], [1.0, 0.0]]),
    }
    base.update(kwargs)
    with pytest.raises(DataError, match=match):
        ips(**base)


def test_no_overlap_is_an_error_for_snips() -> None:
    with pytest.raises(DataError, match="no overlap"):
        snips(
            np.array([0, 0]),
            np.array([1.0, 0.0]),
            np.array([0.5, 0.5]),
            np.array([[0.0, 1.0], [0.0, 1.0]]),
        )


def test_user_clustered_intervals_cover_where_iid_ones_do_not() -> None:
    """Rounds of one user share the user's click propensity (a random effect), as in a
    real log: treating rounds as iid understates the standard error; clustering by user
    restores the 95% coverage of the true target-policy value."""
    theta, logging, target, truth = _world(12)
    users, per_user = 300, 25
    covered = {"iid": 0, "clustered": 0}
    reps = 200
    for seed in range(reps):
        rng = np.random.default_rng(1000 + seed)
        # mean 1 (E[click] stays theta, theta * 2 <= 0.8), but users click all or nothing
        mult = 2.0 * (rng.random(users) < 0.5)
        user = np.repeat(np.arange(users), per_user)
        ctx = np.repeat(rng.integers(0, N_CTX, users), per_user)
        u = rng.random(user.size)[:, None]
        a = (u > np.cumsum(logging[ctx], axis=1)).sum(axis=1)
        r = (rng.random(user.size) < theta[ctx, a] * mult[user]).astype(float)
        p = logging[ctx, a]
        for name, groups in (("iid", None), ("clustered", user)):
            e = ips(a, r, p, target[ctx], groups=groups)
            covered[name] += e.ci_low <= truth <= e.ci_high
    assert covered["clustered"] / reps >= 0.9
    assert covered["iid"] / reps < 0.85


def test_snips_by_stratum_recovers_conditional_values_and_shares() -> None:
    """Strata are a property of the logged (context, action), as "the logged item was shown
    to this user before" is: each stratum's SNIPS estimates the target's value given the
    stratum, its weight share the target's probability of landing in it; recombined at
    the target's own shares they give the policy value, at other shares the matching mix."""
    theta, logging, target, truth = _world(0)
    stratum_of = np.where(
        (np.arange(N_CTX)[:, None] + np.arange(N_ACT)) % 2 == 0, "repeat", "first"
    )
    mass = {s: float(np.sum(target * (stratum_of == s)) / N_CTX) for s in ("first", "repeat")}
    cond = {s: float(np.sum(target * theta * (stratum_of == s)) / N_CTX) / mass[s] for s in mass}
    assert cond["first"] != pytest.approx(cond["repeat"], abs=0.01)  # the strata differ
    rng = np.random.default_rng(4)
    ctx, a, r, p, dist = _log(theta, logging, target, 80_000, rng)
    est = snips_by_stratum(a, r, p, dist, stratum_of[ctx, a], groups=ctx)
    assert set(est) == {"first", "repeat"}
    for s, e in est.items():
        assert e.estimate.ci_low <= cond[s] <= e.estimate.ci_high, (s, e, cond[s])
        assert e.target_share == pytest.approx(mass[s], abs=0.02)
    assert sum(e.target_share for e in est.values()) == pytest.approx(1.0)
    own = remix(est, {s: e.target_share for s, e in est.items()})
    assert own.value == pytest.approx(snips(a, r, p, dist).value)  # SNIPS regrouped
    assert own.ci_low <= truth <= own.ci_high
    shifted = remix(est, {"first": 0.2, "repeat": 0.8})
    want = 0.2 * cond["first"] + 0.8 * cond["repeat"]
    assert shifted.ci_low <= want <= shifted.ci_high
    assert shifted.value == pytest.approx(
        0.2 * est["first"].estimate.value + 0.8 * est["repeat"].estimate.value
    )


def test_remix_errors_are_named() -> None:
    theta, logging, target, _ = _world(0)
    _, a, r, p, dist = _log(theta, logging, target, 2_000, np.random.default_rng(5))
    est = snips_by_stratum(a, r, p, dist, np.full(len(a), "first"))
    with pytest.raises(DataError, match="no estimate for strata"):
        remix(est, {"first": 0.5, "repeat": 0.5})
    with pytest.raises(DataError, match="sum to 1"):
        remix(est, {"first": 0.7})
    with pytest.raises(DataError, match="one entry per round"):
        snips_by_stratum(a, r, p, dist, np.full(3, "first"))


def test_estimates_from_weights_equal_the_dense_estimators() -> None:
    """The per-round-term path (what a 10,000-feature evaluation uses) gives the dense
    estimators' values, intervals and weights, user-clustered and per stratum."""
    theta, logging, target, _ = _world(3)
    rng = np.random.default_rng(4)
    ctx, action, reward, pscore, dist = _log(theta, logging, target, 3000, rng)
    groups = rng.integers(0, 400, ctx.shape[0])
    q = tabular_reward_model(ctx, action, reward, n_contexts=N_CTX, n_actions=N_ACT)[ctx]
    dense = estimate_policy_value(action, reward, pscore, dist, q, groups=groups)
    rows = np.arange(ctx.shape[0])
    got = estimate_from_weights(
        reward,
        dist[rows, action] / pscore,
        q_logged=q[rows, action],
        q_expected=(dist * q).sum(axis=1),
        groups=groups,
    )
    assert set(got) == set(dense) == {"ips", "snips", "dr"}
    for name, est in dense.items():
        assert got[name] == pytest.approx(est), name
    strata = np.where(ctx < 3, "low", "high")
    by_dense = snips_by_stratum(action, reward, pscore, dist, strata, groups=groups)
    by_w = stratified_snips(reward, dist[rows, action] / pscore, strata, groups=groups)
    assert set(by_w) == set(by_dense) == {"low", "high"}
    for s in by_dense:
        assert by_w[s].estimate == pytest.approx(by_dense[s].estimate)
        assert by_w[s].target_share == pytest.approx(by_dense[s].target_share)
    with pytest.raises(DataError, match="weight must have shape"):
        estimate_from_weights(reward, np.ones(3))


def test_estimates_per_shown_recommendation_when_the_target_leaves_slots_empty() -> None:
    """Uniform logging over two items; the target shows item 1 (true rate 0.6) in half the
    slots and nothing in the others. Online its rate is 0.6 per recommendation it shows; per
    logged slot IPS would say 0.3. With ``shown`` IPS and DR are per shown recommendation."""
    rng = np.random.default_rng(4)
    n = 40_000
    a = rng.integers(0, 2, n)
    r = (rng.random(n) < np.where(a == 1, 0.6, 0.2)).astype(float)
    w = np.where(a == 1, 0.5 / 0.5, 0.0)
    q = np.array([0.2, 0.6])
    args = {"q_logged": q[a], "q_expected": np.full(n, 0.5 * 0.6)}
    per_slot = estimate_from_weights(r, w, **args)
    per_shown = estimate_from_weights(r, w, **args, shown=np.full(n, 0.5))
    assert per_slot["ips"].value == pytest.approx(0.3, abs=0.01)
    for name in ("ips", "dr", "snips"):
        e = per_shown[name]
        assert e.ci_low <= 0.6 <= e.ci_high, name
    assert per_shown["snips"].value == per_slot["snips"].value  # normalises either way
    with pytest.raises(DataError, match="shown must have shape"):
        estimate_from_weights(r, w, shown=np.ones(3))
