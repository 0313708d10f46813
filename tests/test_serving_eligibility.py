"""Eligibility is never violated: Hypothesis over random users, flags and exposure."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurerec.serving.eligibility import (
    EligibilityPolicy,
    EligibilityRules,
    Exposure,
    UserAttributes,
    flag_allows,
    max_repeats,
    rollout_bucket,
    segment_matches,
)
from featurerec.serving.snapshot import FlagRule

FEATURES = [f"f{i}" for i in range(8)]
ROLES = ["pm", "eng", "designer"]
PLANS = ["free", "pro", "business"]
NOW = 1_800_000_000.0

flags_st = st.lists(
    st.builds(
        FlagRule,
        flag_id=st.sampled_from(["a", "b", "c", "d", "e"]),
        feature=st.sampled_from(FEATURES),
        enabled=st.booleans(),
        rollout_percentage=st.sampled_from([0.0, 10.0, 50.0, 100.0]),
        target_segments=st.lists(st.sampled_from([*ROLES, "plan:pro", "*"]), max_size=2).map(tuple),
        plans=st.one_of(st.none(), st.lists(st.sampled_from(PLANS), max_size=2).map(tuple)),
    ),
    max_size=6,
)
user_st = st.builds(
    UserAttributes,
    user_id=st.text(alphabet="abcdef0123456789", min_size=1, max_size=8),
    role=st.one_of(st.none(), st.sampled_from(ROLES)),
    plan=st.one_of(st.none(), st.sampled_from(PLANS)),
    team_size_bucket=st.sampled_from(["small", "medium", "large", "enterprise"]),
)
vec = st.lists(st.integers(0, 4), min_size=len(FEATURES), max_size=len(FEATURES))
ages = st.lists(
    st.one_of(st.none(), st.floats(0, 30)), min_size=len(FEATURES), max_size=len(FEATURES)
)
mask = st.lists(st.booleans(), min_size=len(FEATURES), max_size=len(FEATURES))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flags=flags_st,
    user=user_st,
    adopted=mask,
    shown=vec,
    dismissed_days_ago=ages,
    plans_cfg=st.dictionaries(st.sampled_from(FEATURES), st.lists(st.sampled_from(PLANS))),
    k=st.integers(1, 5),
    cooldown=st.integers(0, 20),
    cap=st.integers(1, 4),
    target=st.sampled_from([0.0, 0.6, 0.8, 1.0]),
)
def test_exclude_mask_never_lets_an_ineligible_feature_through(
    flags, user, adopted, shown, dismissed_days_ago, plans_cfg, k, cooldown, cap, target
) -> None:
    rules = EligibilityRules(cooldown, cap, target)
    policy = EligibilityPolicy(FEATURES, flags, dict(plans_cfg), rules)
    last_dismissed = np.array(
        [-np.inf if d is None else NOW - d * 86_400 for d in dismissed_days_ago]
    )
    exposure = Exposure(np.array(shown, dtype=np.int32), last_dismissed)
    exclude, n = policy.exclude_mask(user, np.array(adopted), exposure, NOW, k)
    eligible = np.flatnonzero(~exclude)
    assert n == min(k, len(eligible))
    known = {p for fl in flags for p in fl.plans or ()} | {
        p for ps in plans_cfg.values() for p in ps
    }

    def on_plan(plans) -> bool:
        # a user's plan must be listed; an unknown plan only passes lists naming every plan
        return plans is None or (user.plan in plans if user.plan else known <= set(plans))

    for j in eligible:
        f = FEATURES[j]
        assert not adopted[j]
        for fl in (fl for fl in flags if fl.feature == f):
            assert flag_allows(replace(fl, plans=None), user) and on_plan(fl.plans)
        assert f not in plans_cfg or on_plan(plans_cfg[f])
        d = dismissed_days_ago[j]
        assert d is None or cooldown == 0 or d >= cooldown
        assert shown[j] < cap
    # Serving any n of the eligible features keeps weekly diversity at target, or adds only
    # features not shown this week (the best possible).
    t, u = sum(shown), sum(1 for s in shown if s > 0)
    # worst case: the ranker serves as many already-shown features as it can
    repeats = min(n, sum(1 for j in eligible if shown[j] > 0))
    if n and t:
        after = (u + n - repeats) / (t + n)
        assert after >= target - 1e-9 or repeats == 0


def test_unknown_plan_sees_only_features_on_every_plan() -> None:
    """A cold-start visitor without context gets the features every plan has, not nothing."""
    flags = [
        FlagRule("a", "f0", True, 100.0, plans=("free", "pro", "business")),
        FlagRule("b", "f1", True, 100.0, plans=("business",)),
    ]
    policy = EligibilityPolicy(
        FEATURES[:3], flags, {"f2": ["pro", "business"]}, EligibilityRules(0, 3, 0.0)
    )
    exposure = Exposure(np.zeros(3, dtype=np.int32), np.full(3, -np.inf))
    nobody = UserAttributes(user_id="u1", plan=None)
    exclude, n = policy.exclude_mask(nobody, np.zeros(3, dtype=bool), exposure, NOW, 3)
    assert exclude.tolist() == [False, True, True] and n == 1
    free = UserAttributes(user_id="u1", plan="free")
    exclude, _ = policy.exclude_mask(free, np.zeros(3, dtype=bool), exposure, NOW, 3)
    assert exclude.tolist() == [False, True, True]
    biz = UserAttributes(user_id="u1", plan="business")
    exclude, _ = policy.exclude_mask(biz, np.zeros(3, dtype=bool), exposure, NOW, 3)
    assert exclude.tolist() == [False, False, False]


def test_max_repeats_formula() -> None:
    # U=5, T=6, serving 3 at target .6: (5+3-r)/9 >= .6  <=>  r <= 2.6
    assert max_repeats(5, 6, 3, 0.6) == 2
    assert max_repeats(0, 0, 3, 0.6) == 1
    assert max_repeats(2, 10, 3, 0.6) < 0


def test_rollout_is_deterministic_and_roughly_uniform() -> None:
    a = [rollout_bucket("ff_x", f"u{i}") for i in range(4000)]
    assert a == [rollout_bucket("ff_x", f"u{i}") for i in range(4000)]
    share = np.mean(np.array(a) < 30.0)
    assert 0.27 < share < 0.33
    # a different flag buckets users independently
    b = np.array([rollout_bucket("ff_y", f"u{i}") for i in range(4000)])
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05


@pytest.mark.parametrize(
    ("segment", "expected"),
    [("pm", True), ("role:pm", True), ("role=eng", False), ("plan:pro", True), ("*", True),
     ("industry:retail", False), ("enterprise", False)],
)  # fmt: skip
def test_segment_matching(segment: str, expected: bool) -> None:
    user = UserAttributes("u1", role="pm", plan="pro", team_size_bucket="medium")
    assert segment_matches(segment, user) is expected


_SERVICE: dict[str, object] = {}


def _service():
    """A real service (fixture warehouse, trained bundle), built once for this module."""
    if not _SERVICE:
        from featurerec.config import Settings
        from featurerec.serving.snapshot import build_snapshot
        from featurerec.serving.testing import (
            FIXTURE_AS_OF,
            fill_fixture_warehouse,
            train_fixture_bundle,
        )
        from featurerec.warehouse.engine import DuckDBEngine

        with DuckDBEngine(":memory:") as engine:
            fill_fixture_warehouse(engine, n_users=120, seed=21)
            snap = build_snapshot(engine, Settings(), FIXTURE_AS_OF)
        bundle = train_fixture_bundle(snap)
        _SERVICE.update(snap=snap, bundle=bundle)
    return _SERVICE


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    user=st.integers(0, 119),
    history=st.lists(st.tuples(st.integers(0, 9), st.floats(0, 20), st.booleans()), max_size=25),
    k=st.integers(1, 5),
    strategy=st.sampled_from(["sequence_aware", "hybrid", "content_based", "popularity"]),
)
def test_service_never_serves_an_ineligible_feature(user, history, k, strategy) -> None:
    """Random exposure / dismissal histories: every served item passes every rule, and
    serving does not push weekly diversity below target unless only new features were added."""
    from datetime import datetime, timedelta

    from featurerec.config import Settings
    from featurerec.serving.deployment import DeploymentSpec
    from featurerec.serving.fastpath import accelerate
    from featurerec.serving.loader import BundleModel
    from featurerec.serving.service import RecommendationRequest, RecommendationService
    from featurerec.serving.state import OnlineState, epoch_seconds

    fx = _service()
    state = OnlineState(fx["snap"])  # type: ignore[arg-type]
    cfg = Settings.model_validate({"serving": {"default_strategy": strategy}})
    users = state.all_user_states()
    model = BundleModel(accelerate(fx["bundle"], users), "v", users, warm=[])
    now = datetime(2027, 1, 10)
    svc = RecommendationService(cfg, DeploymentSpec(), state, model, clock=lambda: now)
    uid = f"usr_{user:06d}"
    row = state.row_of(uid)
    for j, days_ago, dismissed in history:
        ts = epoch_seconds(now - timedelta(days=days_ago))
        if dismissed:
            state.record_dismissal(uid, state.features[j], ts)
        else:
            state.record_served(uid, [j], ts)
    t_now = epoch_seconds(now)
    before = state.exposure(row, t_now)
    res = svc.recommend(RecommendationRequest(uid, k=k))
    served = [state.findex[r.feature] for r in res.recommendations]
    assert len(served) == len(set(served)) <= k
    rules = svc.rules
    for j in served:
        assert not fx["snap"].adopted[row, j]  # type: ignore[index]
        assert before.shown_7d[j] < rules.weekly_frequency_cap
        assert before.last_dismissed[j] <= t_now - rules.dismissal_cooldown_days * 86_400
        assert not svc.policy.static_exclude(state.attributes(row))[j]
    t, u = before.total_shown, before.unique_shown
    repeats = sum(1 for j in served if before.shown_7d[j] > 0)
    if served and t:
        assert (u + len(served) - repeats) / (t + len(served)) >= 0.6 - 1e-9 or repeats == 0
