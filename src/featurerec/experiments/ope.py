"""Off-policy evaluation: judge a candidate strategy from logged recommendations before any
user sees it.

Inputs follow Open Bandit Pipeline's names and shapes so obp users feel at home (obp itself
is not a dependency: its pins clash with our numpy/scipy, and the estimators are formulas):

* ``action`` (n,) int: the logged action (feature index) of each round (one served slot);
* ``reward`` (n,) float: its observed reward (click, or adoption within 7 days);
* ``pscore`` (n,) float: the logging policy's probability of that action (``propensity`` in
  ``ml.recommendation_log``);
* ``action_dist`` (n, n_actions) or (n, n_actions, len_list): the target policy's action
  probabilities for each logged context (and slot ``position``);
* ``estimated_rewards`` (same shape as ``action_dist``): a reward model's predictions, for DR;
* ``position`` (n,) int, optional: slot of each round when ``action_dist`` is 3-d;
* ``groups`` (n,), optional: cluster ids (users). Intervals then treat the user as the unit
  (rounds of one user are correlated), as the A/B report does.

Estimators, with w_i = pi(a_i | x_i) / pscore_i:

* IPS: mean(w r), unbiased when the logging policy covers the target's actions;
* SNIPS: sum(w r) / sum(w), a little biased, much lower variance with heavy weights;
* DR: mean( sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) ), unbiased if either the
  propensities or the reward model are right, and lower variance when q is good.

Intervals are normal approximations (delta method for SNIPS); with ``groups`` the per-round
terms are summed per cluster first. :func:`estimate_from_weights` and
:func:`stratified_snips` take the per-round terms instead of ``action_dist`` (for large item
spaces, where the caller computes them chunk by chunk).

Example::

    >>> import numpy as np
    >>> r = np.array([1.0, 0.0, 1.0, 0.0]); p = np.full(4, 0.5)
    >>> a = np.array([0, 1, 0, 1]); dist = np.tile([1.0, 0.0], (4, 1))
    >>> round(ips(a, r, p, dist).value, 3)   # always play action 0: 2 clicks / 4 * 2
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from featurerec.errors import DataError

Z95 = float(stats.norm.ppf(0.975))


@dataclass(frozen=True)
class OPEEstimate:
    """One estimator's estimate of the target policy's mean reward per round."""

    estimator: str
    value: float
    ci_low: float
    ci_high: float
    se: float
    n: int
    #: Effective sample size of the importance weights, (sum w)^2 / sum w^2.
    effective_sample_size: float
    max_weight: float


def _target_prob(
    action: np.ndarray, action_dist: np.ndarray, position: np.ndarray | None
) -> np.ndarray:
    n = action.shape[0]
    rows = np.arange(n)
    if action_dist.ndim == 2:
        return action_dist[rows, action]
    if action_dist.ndim == 3:
        pos = np.zeros(n, dtype=np.int64) if position is None else position
        return action_dist[rows, action, pos]
    raise DataError(f"action_dist must be 2-d or 3-d (got shape {action_dist.shape})")


def _expected_q(
    action_dist: np.ndarray, estimated_rewards: np.ndarray, position: np.ndarray | None
) -> np.ndarray:
    if action_dist.ndim == 2:
        return np.sum(action_dist * estimated_rewards, axis=1)
    rows = np.arange(action_dist.shape[0])
    pos = np.zeros(action_dist.shape[0], dtype=np.int64) if position is None else position
    return np.sum(action_dist[rows, :, pos] * estimated_rewards[rows, :, pos], axis=1)


def _q_terms(
    action: np.ndarray,
    action_dist: np.ndarray,
    estimated_rewards: np.ndarray,
    position: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """DR's reward-model terms per round: q(x_i, a_i) and sum_a pi(a | x_i) q(x_i, a)."""
    q = np.asarray(estimated_rewards, dtype=np.float64)
    if q.shape != action_dist.shape:
        raise DataError(
            "estimated_rewards must have the shape of action_dist "
            f"{action_dist.shape} (got {q.shape})"
        )
    return _target_prob(action, q, position), _expected_q(action_dist, q, position)


def _check(
    action: np.ndarray,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    position: np.ndarray | None,
    groups: np.ndarray | None,
) -> None:
    n = action.shape[0]
    if n == 0:
        raise DataError("off-policy evaluation needs at least one logged round (got 0)")
    for name, arr in (("reward", reward), ("pscore", pscore)):
        if arr.shape != (n,):
            raise DataError(f"{name} must have shape ({n},) like action (got {arr.shape})")
    if action_dist.shape[0] != n:
        raise DataError(f"action_dist must have {n} rows like action (got {action_dist.shape[0]})")
    if position is not None and position.shape != (n,):
        raise DataError(f"position must have shape ({n},) (got {position.shape})")
    if groups is not None and groups.shape[0] != n:
        raise DataError(f"groups must have {n} entries (got {groups.shape[0]})")
    if np.any(~np.isfinite(pscore)) or np.any(pscore <= 0) or np.any(pscore > 1):
        bad = int(np.flatnonzero(~((pscore > 0) & (pscore <= 1)))[0])
        raise DataError(
            f"pscore must be in (0, 1] (round {bad} has {pscore[bad]!r}); rows logged without "
            "a propensity cannot be used for off-policy evaluation"
        )
    if np.any(action < 0) or np.any(action >= action_dist.shape[1]):
        raise DataError(f"action ids must be in [0, {action_dist.shape[1]}) (n_actions)")
    sums = action_dist.sum(axis=1)
    if np.any(np.abs(sums - 1) > 1e-6):
        raise DataError(
            "action_dist must sum to 1 over actions for every round (first bad sum: "
            f"{float(sums[np.abs(sums - 1) > 1e-6].ravel()[0]):.4g})"
        )


def _mean_ci(terms: np.ndarray, groups: np.ndarray | None) -> tuple[float, float]:
    """Mean of per-round terms and its standard error (cluster-robust with ``groups``)."""
    n = terms.shape[0]
    value = float(np.mean(terms))
    if n < 2:
        return value, math.nan
    if groups is None:
        return value, float(np.std(terms, ddof=1) / math.sqrt(n))
    _, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=terms)
    counts = np.bincount(inv).astype(np.float64)
    return value, _ratio_se(sums, counts, value)


def _ratio_se(num: np.ndarray, den: np.ndarray, r: float) -> float:
    g = num.shape[0]
    if g < 2:
        return math.nan
    resid = num - r * den
    return float(np.std(resid, ddof=1) / (math.sqrt(g) * np.mean(den)))


def _estimate(name: str, value: float, se: float, w: np.ndarray) -> OPEEstimate:
    ess = float(w.sum() ** 2 / np.sum(w * w)) if np.any(w > 0) else 0.0
    return OPEEstimate(
        estimator=name,
        value=value,
        ci_low=value - Z95 * se,
        ci_high=value + Z95 * se,
        se=se,
        n=int(w.shape[0]),
        effective_sample_size=ess,
        max_weight=float(w.max()),
    )


def _prep(
    action: np.ndarray,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    position: np.ndarray | None,
    groups: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    a = np.asarray(action, dtype=np.int64)
    r = np.asarray(reward, dtype=np.float64)
    p = np.asarray(pscore, dtype=np.float64)
    dist = np.asarray(action_dist, dtype=np.float64)
    pos = None if position is None else np.asarray(position, dtype=np.int64)
    _check(a, r, p, dist, pos, groups)
    w = _target_prob(a, dist, pos) / p
    return a, r, w, dist, pos


def _check_weights(reward: np.ndarray, weight: np.ndarray, groups: np.ndarray | None) -> None:
    n = reward.shape[0]
    if n == 0:
        raise DataError("off-policy evaluation needs at least one logged round (got 0)")
    if weight.shape != (n,):
        raise DataError(f"weight must have shape ({n},) like reward (got {weight.shape})")
    if groups is not None and groups.shape[0] != n:
        raise DataError(f"groups must have {n} entries (got {groups.shape[0]})")
    if np.any(~np.isfinite(weight)) or np.any(weight < 0):
        raise DataError("importance weights must be finite and >= 0")


def _per_shown(
    terms: np.ndarray, shown: np.ndarray | None, groups: np.ndarray | None
) -> tuple[float, float]:
    """mean(terms), or with ``shown`` sum(terms) / sum(shown): per recommendation the target
    shows rather than per logged slot; user-clustered standard error."""
    if shown is None:
        return _mean_ci(terms, groups)
    total = float(np.sum(shown))
    if total <= 0:
        raise DataError("the target policy shows nothing in any logged slot")
    value = float(np.sum(terms) / total)
    if groups is None:
        return value, _ratio_se(terms, shown, value)
    _, inv = np.unique(groups, return_inverse=True)
    return value, _ratio_se(np.bincount(inv, weights=terms), np.bincount(inv, weights=shown), value)


def _ips(
    r: np.ndarray, w: np.ndarray, groups: np.ndarray | None, shown: np.ndarray | None = None
) -> OPEEstimate:
    value, se = _per_shown(w * r, shown, groups)
    return _estimate("ips", value, se, w)


def _snips(r: np.ndarray, w: np.ndarray, groups: np.ndarray | None) -> OPEEstimate:
    if w.sum() <= 0:
        raise DataError(
            "the target policy puts zero probability on every logged action: no overlap "
            "with the logging policy, so nothing can be estimated"
        )
    value = float(np.sum(w * r) / np.sum(w))
    if groups is None:
        se = _ratio_se(w * r, w, value)
    else:
        _, inv = np.unique(groups, return_inverse=True)
        se = _ratio_se(np.bincount(inv, weights=w * r), np.bincount(inv, weights=w), value)
    return _estimate("snips", value, se, w)


def _dr(
    r: np.ndarray,
    w: np.ndarray,
    q_logged: np.ndarray,
    q_expected: np.ndarray,
    groups: np.ndarray | None,
    shown: np.ndarray | None = None,
) -> OPEEstimate:
    value, se = _per_shown(q_expected + w * (r - q_logged), shown, groups)
    return _estimate("dr", value, se, w)


def estimate_from_weights(
    reward: np.ndarray,
    weight: np.ndarray,
    *,
    q_logged: np.ndarray | None = None,
    q_expected: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    shown: np.ndarray | None = None,
) -> dict[str, OPEEstimate]:
    """IPS, SNIPS and (with both reward-model terms) DR from per-round terms only:
    ``weight`` w_i = pi(a_i | x_i) / pscore_i, ``q_logged`` q(x_i, a_i) and ``q_expected``
    sum_a pi(a | x_i) q(x_i, a). The same estimates as :func:`estimate_policy_value`,
    without an (n, n_actions) ``action_dist``: with 10,000 features a caller computes the
    terms chunk by chunk (:func:`featurerec.experiments.offline.evaluate`).

    ``shown`` (optional): the target's probability of showing anything in each logged slot.
    With it IPS and DR are per recommendation the target shows (sum of terms / sum of
    ``shown``), as an online rate is per shown recommendation; without it a slot the target
    leaves empty counts as reward 0. SNIPS normalises by the weights either way."""
    r = np.asarray(reward, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    _check_weights(r, w, groups)
    sh = None if shown is None else np.asarray(shown, dtype=np.float64)
    if sh is not None and sh.shape != r.shape:
        raise DataError(f"shown must have shape {r.shape} (got {sh.shape})")
    out = {"ips": _ips(r, w, groups, sh), "snips": _snips(r, w, groups)}
    if q_logged is not None and q_expected is not None:
        ql = np.asarray(q_logged, dtype=np.float64)
        qe = np.asarray(q_expected, dtype=np.float64)
        if ql.shape != r.shape or qe.shape != r.shape:
            raise DataError(f"q_logged and q_expected must have shape {r.shape}")
        out["dr"] = _dr(r, w, ql, qe, groups, sh)
    return out


def ips(
    action: np.ndarray,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    *,
    position: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> OPEEstimate:
    """Inverse propensity scoring."""
    _, r, w, _, _ = _prep(action, reward, pscore, action_dist, position, groups)
    return _ips(r, w, groups)


def snips(
    action: np.ndarray,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    *,
    position: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> OPEEstimate:
    """Self-normalised IPS, with a delta-method interval (ratio of two means)."""
    _, r, w, _, _ = _prep(action, reward, pscore, action_dist, position, groups)
    return _snips(r, w, groups)


def dr(
    action: np.ndarray,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    estimated_rewards: np.ndarray,
    *,
    position: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> OPEEstimate:
    """Doubly robust: the reward model's value plus an IPS-weighted correction."""
    a, r, w, dist, pos = _prep(action, reward, pscore, action_dist, position, groups)
    q_logged, q_expected = _q_terms(a, dist, estimated_rewards, pos)
    return _dr(r, w, q_logged, q_expected, groups)


def estimate_policy_value(
    action: np.ndarray,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    estimated_rewards: np.ndarray | None = None,
    *,
    position: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, OPEEstimate]:
    """IPS, SNIPS and (when ``estimated_rewards`` is given) DR at once: the inputs are
    checked and the weights computed once, then :func:`estimate_from_weights`."""
    a, r, w, dist, pos = _prep(action, reward, pscore, action_dist, position, groups)
    if estimated_rewards is None:
        return estimate_from_weights(r, w, groups=groups)
    q_logged, q_expected = _q_terms(a, dist, estimated_rewards, pos)
    return estimate_from_weights(r, w, q_logged=q_logged, q_expected=q_expected, groups=groups)


def tabular_reward_model(
    context: np.ndarray,
    action: np.ndarray,
    reward: np.ndarray,
    *,
    n_contexts: int,
    n_actions: int,
    prior_strength: float = 20.0,
) -> np.ndarray:
    """A simple reward model for DR: mean reward per (context bucket, action), shrunk toward
    the action's overall mean (``prior_strength`` pseudo-rounds). Returns (n_contexts,
    n_actions); index it with the logged contexts to get ``estimated_rewards``."""
    c = np.asarray(context, dtype=np.int64)
    a = np.asarray(action, dtype=np.int64)
    r = np.asarray(reward, dtype=np.float64)
    cell = c * n_actions + a
    sums = np.bincount(cell, weights=r, minlength=n_contexts * n_actions)
    counts = np.bincount(cell, minlength=n_contexts * n_actions).astype(np.float64)
    a_sums = np.bincount(a, weights=r, minlength=n_actions)
    a_counts = np.bincount(a, minlength=n_actions).astype(np.float64)
    overall = float(r.mean()) if r.size else 0.0
    prior = np.where(a_counts > 0, (a_sums + overall) / (a_counts + 1), overall)
    table = (sums + prior_strength * np.tile(prior, n_contexts)) / (counts + prior_strength)
    return table.reshape(n_contexts, n_actions)


@dataclass(frozen=True)
class StratumEstimate:
    """SNIPS of the target's mean reward within one stratum of the logged rounds, and the
    target's estimated share of rounds in that stratum (sum of the stratum's weights / sum
    of all weights)."""

    stratum: str
    estimate: OPEEstimate
    target_share: float


def snips_by_stratum(
    action: np.ndarray,
    reward: np.ndarray,
    pscore: np.ndarray,
    action_dist: np.ndarray,
    strata: np.ndarray,
    *,
    position: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, StratumEstimate]:
    """The target's value conditional on a property of the logged round, one SNIPS per
    stratum (e.g. ``strata`` = "first" / "repeat": whether the logged item had been shown to
    the user before). A stratum's SNIPS, sum(w r) / sum(w) over its rounds, estimates
    E_pi[r | stratum]; sum over the stratum of w / sum of all w estimates how often the
    target's rounds fall in it *on the logged histories*. A policy that runs for weeks
    shapes its own history (it repeats what it showed before), so its stratum shares
    online can differ from these: :func:`remix` recombines the per-stratum values at other
    shares. Strata with no target mass are left out."""
    _, r, w, _, _ = _prep(action, reward, pscore, action_dist, position, groups)
    return stratified_snips(r, w, strata, groups=groups)


def stratified_snips(
    reward: np.ndarray,
    weight: np.ndarray,
    strata: np.ndarray,
    *,
    groups: np.ndarray | None = None,
) -> dict[str, StratumEstimate]:
    """:func:`snips_by_stratum` from per-round importance weights."""
    r = np.asarray(reward, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    _check_weights(r, w, groups)
    s = np.asarray(strata).astype(str)
    if s.shape != r.shape:
        raise DataError(f"strata must have one entry per round ({r.shape[0]}), got {s.shape}")
    total = float(w.sum())
    out: dict[str, StratumEstimate] = {}
    for name in sorted(set(s.tolist())):
        m = s == name
        if float(w[m].sum()) <= 0:
            continue
        est = _snips(r[m], w[m], None if groups is None else np.asarray(groups)[m])
        out[name] = StratumEstimate(name, est, float(w[m].sum()) / total)
    return out


def remix(estimates: dict[str, StratumEstimate], shares: dict[str, float]) -> OPEEstimate:
    """sum_s shares[s] * value_s, with a normal interval from the strata's standard errors
    taken as independent (they come from disjoint rounds; a user's rounds in two strata are
    correlated, which this ignores). ``shares`` must sum to 1 over strata present here."""
    missing = [s for s, x in shares.items() if x > 0 and s not in estimates]
    if missing:
        raise DataError(f"no estimate for strata {missing} with a positive share")
    total = sum(shares.values())
    if not math.isclose(total, 1.0, abs_tol=1e-9):
        raise DataError(f"stratum shares must sum to 1 (got {total:.6f})")
    value = sum(x * estimates[s].estimate.value for s, x in shares.items() if x > 0)
    se = math.sqrt(sum((x * estimates[s].estimate.se) ** 2 for s, x in shares.items() if x > 0))
    n = sum(estimates[s].estimate.n for s, x in shares.items() if x > 0)
    ess = sum(estimates[s].estimate.effective_sample_size for s, x in shares.items() if x > 0)
    mw = max(estimates[s].estimate.max_weight for s, x in shares.items() if x > 0)
    return OPEEstimate("snips_remixed", value, value - Z95 * se, value + Z95 * se, se, n, ess, mw)
