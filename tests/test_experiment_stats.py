"""A/B statistics pinned against scipy / hand computation, SRM detection, the report on a
tiny warehouse, and interval coverage on clustered synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from featurerec.experiments import stats as st
from featurerec.experiments.assignment import assign
from featurerec.experiments.report import UserMetrics, analyze, experiment_report
from featurerec.experiments.spec import ExperimentSpec
from featurerec.feedback.attribution import attribute
from featurerec.warehouse.engine import DuckDBEngine
from test_feedback_fixtures import add_event, add_feedback, add_rec, d


def test_wilson_matches_formula() -> None:
    k, n = 30, 200
    z = stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = st.wilson_interval(k, n)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)


def test_two_proportion_test_matches_chi_square() -> None:
    p = st.two_proportion_test(60, 500, 40, 480)
    table = np.array([[60, 440], [40, 440]])
    assert p == pytest.approx(stats.chi2_contingency(table, correction=False).pvalue)


def test_delta_method_ratio_matches_hand_computation() -> None:
    num = np.array([1.0, 0, 2, 3, 0, 1])
    den = np.array([3.0, 2, 4, 5, 1, 3])
    e = st.ratio_of_sums(num, den)
    r = num.sum() / den.sum()
    n = len(num)
    resid = num - r * den  # linearisation: Var(R) = Var(y - R x) / (n xbar^2)
    se = math.sqrt(np.var(resid, ddof=1) / (n * den.mean() ** 2))
    assert e.value == pytest.approx(r) and e.se == pytest.approx(se)
    assert e.ci_low == pytest.approx(r - stats.norm.ppf(0.975) * se)


def test_delta_method_covers_truth_on_clustered_data() -> None:
    """Users differ in their own CTR (clustering); a naive per-rec binomial interval is too
    narrow, the user-clustered delta interval covers the truth ~95% of the time."""
    true_ctr, covered, naive_covered, reps = 0.2, 0, 0, 300
    rng = np.random.default_rng(0)
    for _ in range(reps):
        n_users = 200
        recs = rng.integers(1, 20, n_users).astype(float)
        p_user = rng.beta(1.0, 4.0, n_users)  # mean 0.2, strong heterogeneity
        clicks = rng.binomial(recs.astype(int), p_user).astype(float)
        e = st.ratio_of_sums(clicks, recs)
        covered += e.ci_low <= true_ctr <= e.ci_high
        lo, hi = st.wilson_interval(int(clicks.sum()), int(recs.sum()))
        naive_covered += lo <= true_ctr <= hi
    assert 0.91 <= covered / reps <= 0.99
    assert naive_covered / reps < covered / reps


def test_holm_matches_hand_computation() -> None:
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert st.holm(p)[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(st.holm(p)[4])


def test_srm_detects_mismatch_and_passes_balanced() -> None:
    alloc = {"a": 0.5, "b": 0.5}
    ok = st.srm_check({"a": 5030, "b": 4970}, alloc)
    assert not ok.mismatch and ok.p_value == pytest.approx(stats.chisquare([5030, 4970]).pvalue)
    bad = st.srm_check({"a": 5300, "b": 4700}, alloc)
    assert bad.mismatch and bad.p_value < 1e-6


def _users(rng: np.random.Generator, n: int, p_adopt: float, ctr: float) -> UserMetrics:
    recs = rng.integers(1, 10, n).astype(float)
    return UserMetrics(
        recs=recs,
        clicks=rng.binomial(recs.astype(int), ctr).astype(float),
        dismissals=np.zeros(n),
        adopted_7d=(rng.random(n) < p_adopt).astype(float),
        adopted_30d=(rng.random(n) < p_adopt * 1.5).astype(float),
        diversity=rng.uniform(0.4, 1.0, n),
    )


SPEC = ExperimentSpec.model_validate(
    {
        "name": "t",
        "control": "control",
        "min_sample_per_variant": 1000,
        "primary_metric": "feature_adoption_7d",
        "variants": [
            {"name": "control", "allocation": 0.5},
            {"name": "treat", "allocation": 0.5},
        ],
    }
)


def test_report_finds_a_real_effect_and_pins_lift() -> None:
    rng = np.random.default_rng(1)
    users = {"control": _users(rng, 3000, 0.10, 0.15), "treat": _users(rng, 3000, 0.16, 0.15)}
    lat = {"control": rng.gamma(5, 5, 2000), "treat": rng.gamma(5, 5, 2000)}
    rep = analyze(SPEC, users, latencies=lat)
    assert rep.enough_data and not rep.srm.mismatch
    comp = {c.metric: c for c in rep.comparisons}
    a7 = comp["feature_adoption_7d"]
    t, c = users["treat"].adopted_7d.mean(), users["control"].adopted_7d.mean()
    assert a7.lift == pytest.approx(t / c - 1)
    assert a7.significant and a7.lift_ci_low < a7.lift < a7.lift_ci_high
    assert "treat" in rep.message
    assert not comp["click_through_rate"].significant  # no true CTR difference
    assert rep.variants[0].metrics["p99_latency"].value == pytest.approx(
        np.quantile(lat["control"], 0.99)
    )


def test_report_says_not_enough_data() -> None:
    rng = np.random.default_rng(2)
    users = {"control": _users(rng, 300, 0.1, 0.1), "treat": _users(rng, 280, 0.1, 0.1)}
    rep = analyze(SPEC, users)
    assert not rep.enough_data
    assert rep.message.startswith("not enough data yet")


def test_report_flags_srm() -> None:
    rng = np.random.default_rng(3)
    users = {"control": _users(rng, 3000, 0.1, 0.1), "treat": _users(rng, 2500, 0.1, 0.1)}
    rep = analyze(SPEC, users)
    assert rep.srm.mismatch and "sample ratio mismatch" in rep.message


def test_report_from_warehouse() -> None:
    spec = SPEC.model_copy(update={"min_sample_per_variant": 1})
    with DuckDBEngine(":memory:") as db:
        n = 0
        for i in range(40):
            u = f"u{i}"
            v = assign(spec, u).name
            for j in range(2):
                n += 1
                add_rec(
                    db,
                    f"r{n}",
                    u,
                    ["forms", "automations"][j],
                    d(i * 0.1),
                    experiment="t",
                    variant=v,
                )
                if (i + j) % 3 == 0:
                    add_feedback(db, f"r{n}", "click", d(i * 0.1 + 0.01))
            if i % 4 == 0:
                add_event(db, u, "forms", d(i * 0.1 + 1), first_use=True)
        attribute(db, as_of=d(10))
        rep = experiment_report(db, spec, as_of=d(10))
        rows = db.query_rows(
            "SELECT variant, COUNT(DISTINCT user_id) AS u, SUM(clicked) * 1.0 / COUNT(*) AS ctr,"
            " COUNT(DISTINCT user_id) FILTER (WHERE adopted_7d = 1) AS ad,"
            " AVG(adopted_7d) AS per_rec"
            " FROM ml.recommendation_feedback GROUP BY variant"
        )
    want = {r["variant"]: r for r in rows}
    for v in rep.variants:
        assert v.users == want[v.name]["u"]
        assert v.metrics["click_through_rate"].value == pytest.approx(want[v.name]["ctr"])
        assert v.metrics["feature_adoption_7d"].value == pytest.approx(want[v.name]["ad"] / v.users)
        assert v.metrics["diversity_score"].value == pytest.approx(1.0)
        assert v.metrics["rec_adoption_7d"].value == pytest.approx(want[v.name]["per_rec"])
    assert sum(v.users for v in rep.variants) == 40


def test_quantile_bootstrap_matches_resampling() -> None:
    """The Beta order-statistic shortcut has the distribution of brute-force resampling."""
    rng = np.random.default_rng(11)
    x = rng.gamma(3, 10, 400)
    est, reps = st.quantile_bootstrap(x, 0.9, n_boot=4000, seed=1)
    brute = np.array(
        [np.sort(rng.choice(x, x.size))[int(np.ceil(0.9 * x.size)) - 1] for _ in range(4000)]
    )
    assert est.value == pytest.approx(np.quantile(x, 0.9))
    assert stats.ks_2samp(reps, brute).pvalue > 0.001
    assert est.ci_low < est.value < est.ci_high
