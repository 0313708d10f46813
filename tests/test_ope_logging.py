"""The warm-up's logging policy designed for OPE (simulate.online): a mixture of the
variants' strategies and uniform random serving, whose propensities are the mixture's, and
the slate probabilities every propensity and target distribution is built from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from featurerec.errors import DataError
from featurerec.experiments.ope import ips, snips
from featurerec.models.ranking import epsilon_slates
from featurerec.models.ranking import slate_distribution as _slate_dist
from featurerec.simulate.online import OnlineConfig, OnlineExperiment


def _reference(
    upstream: np.ndarray, rank: np.ndarray, exclude: np.ndarray, k: int, top_k: int, eps: float
) -> np.ndarray:
    """One user at a time, as SERVE's BundleModel.recommend picks candidates."""
    n, m = upstream.shape
    out = np.zeros((n, m, k))
    for i in range(n):
        valid = ~exclude[i] & np.isfinite(upstream[i])
        cand = np.flatnonzero(valid)
        if len(cand) == 0:
            continue
        if len(cand) > top_k:
            cand = cand[np.argsort(-upstream[i][cand], kind="stable")[:top_k]]
        cand = cand[np.argsort(rank[i][cand], kind="stable")]
        for p in range(min(k, len(cand))):
            out[i, cand, p] = eps / len(cand)
            out[i, cand[p], p] += 1 - eps
    return out


def _inputs(seed: int, n: int = 300, m: int = 12):
    rng = np.random.default_rng(seed)
    upstream = rng.normal(size=(n, m)).astype(np.float32)
    upstream[rng.random((n, m)) < 0.15] = -np.inf  # not a candidate of this strategy
    upstream[:, 3] = upstream[:, 4]  # ties in the upstream score
    rank = np.argsort(rng.random((n, m)), axis=1).astype(np.int32)
    rank[rng.random((n, m)) < 0.1] = m  # unranked items tie at m
    exclude = rng.random((n, m)) < 0.3
    exclude[:5] = True  # nothing eligible
    exclude[5:10, 2:] = True  # fewer eligible items than slots
    return upstream, rank, exclude


@pytest.mark.parametrize("top_k", [4, 20])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_slate_dist_matches_the_per_user_candidate_logic(top_k: int, eps: float) -> None:
    upstream, rank, exclude = _inputs(top_k)
    got = _slate_dist(upstream, rank, exclude, 3, top_k, eps)
    assert got == pytest.approx(_reference(upstream, rank, exclude, 3, top_k, eps))
    # a distribution over items at every position the slate fills, nothing elsewhere
    n_cand = np.minimum((~exclude & np.isfinite(upstream)).sum(axis=1), top_k)
    for p in range(3):
        assert got[:, :, p].sum(axis=1) == pytest.approx((p < n_cand).astype(float))


def test_slate_dist_is_the_sampled_slate_policy() -> None:
    """The marginals equal the frequencies of SERVE's epsilon-greedy slate sampler."""
    rng = np.random.default_rng(0)
    order_score = -np.arange(6, dtype=np.float64)[None, :]
    valid = np.ones((1, 6), dtype=bool)
    counts = np.zeros((6, 3))
    draws = 20_000
    for _ in range(draws):
        cols, _, _ = epsilon_slates(order_score, valid, 3, 0.3, rng, explore=True)
        counts[cols[0], np.arange(3)] += 1
    want = _slate_dist(
        np.zeros((1, 6)), np.arange(6)[None, :], np.zeros((1, 6), dtype=bool), 3, 20, 0.3
    )[0]
    assert counts / draws == pytest.approx(want, abs=0.012)


def _stub(strategies: list[str | None], policy: str = "mixture", share: float = 0.5):
    model = SimpleNamespace(strategy_name=lambda s: {"sequence_aware": "hybrid"}.get(s, s))
    return SimpleNamespace(
        model=model,
        settings=SimpleNamespace(serving=SimpleNamespace(default_strategy="sequence_aware")),
        spec=SimpleNamespace(variants=[SimpleNamespace(resolved_strategy=s) for s in strategies]),
        cfg=OnlineConfig(logging_policy=policy, logging_uniform_share=share),
    )


def test_logging_mixture_shares() -> None:
    mix = OnlineExperiment._logging_mixture
    got = mix(_stub(["collaborative_only", "content_based", "hybrid", "sequence_aware"]))
    # sequence_aware is served as hybrid by this model: one strategy, counted once
    assert got == pytest.approx(
        {"collaborative_only": 1 / 6, "content_based": 1 / 6, "hybrid": 1 / 6, "random": 0.5}
    )
    assert sum(got.values()) == pytest.approx(1.0)
    # a variant that serves random adds to the uniform share; None = the default strategy
    assert mix(_stub(["random", None], share=0.2)) == pytest.approx({"hybrid": 0.4, "random": 0.6})
    assert mix(_stub(["random"])) == {"random": 1.0}
    assert mix(_stub(["content_based"], share=0.0)) == {"content_based": 1.0}
    assert mix(_stub(["content_based"], policy="production")) == {"hybrid": 1.0}
    with pytest.raises(DataError, match="logging_uniform_share"):
        OnlineConfig(logging_uniform_share=1.5)
    with pytest.raises(DataError, match="logging_policy"):
        OnlineConfig(logging_policy="bts")


def test_mixture_propensities_unbiased_and_tighter_than_each_strategys_own() -> None:
    """Two strategies and uniform random serve by turns; the target is a third policy.
    IPS with the mixture's propensity covers the true value with a much smaller standard
    error than IPS with the propensity of the strategy that served each round (also
    unbiased: the multiple-loggers result, Agarwal et al. 2017). Leaving out the rounds
    the uniform share served, while keeping the mixture's propensities, biases it: the log
    must be read whole (``load_rounds(..., include_random=True)``)."""
    rng = np.random.default_rng(7)
    n_ctx, n_act, n = 8, 6, 400_000
    theta = rng.uniform(0.01, 0.2, (n_ctx, n_act))
    greedy = rng.integers(0, n_act, (2, n_ctx))
    eps = 0.1
    policies = np.full((3, n_ctx, n_act), eps / n_act)
    for s in range(2):
        policies[s, np.arange(n_ctx), greedy[s]] += 1 - eps
    policies[2] = 1 / n_act  # uniform
    share = np.array([0.25, 0.25, 0.5])
    mixture = np.tensordot(share, policies, axes=1)
    target = np.full((n_ctx, n_act), 0.1 / n_act)
    target[np.arange(n_ctx), rng.integers(0, n_act, n_ctx)] += 0.9
    truth = float(np.mean(np.sum(target * theta, axis=1)))

    ctx = rng.integers(0, n_ctx, n)
    served_by = rng.choice(3, n, p=share)
    u = rng.random(n)[:, None]
    action = (u > np.cumsum(policies[served_by, ctx], axis=1)).sum(axis=1)
    reward = (rng.random(n) < theta[ctx, action]).astype(float)
    dist = target[ctx]
    mixed = ips(action, reward, mixture[ctx, action], dist)
    assert mixed.ci_low <= truth <= mixed.ci_high
    assert snips(action, reward, mixture[ctx, action], dist).value == pytest.approx(
        truth, abs=4 * mixed.se
    )
    assert mixed.max_weight <= 0.9 / (0.5 / n_act) + 1e-9  # the uniform share bounds weights
    own = ips(action, reward, policies[served_by, ctx, action], dist)
    assert own.ci_low <= truth <= own.ci_high
    assert mixed.se < 0.6 * own.se
    assert mixed.effective_sample_size > 2 * own.effective_sample_size
    kept = served_by != 2
    selected = ips(action[kept], reward[kept], mixture[ctx, action][kept], dist[kept])
    assert abs(selected.value - truth) > 5 * selected.se
