"""Off-policy replay with the candidate's own exposure (``experiments.offline.SelfExposure``):
serving's exposure rules applied to what the *candidate* showed, not what the log showed."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np
import pytest

from featurerec.experiments.offline import (
    ExposureHistory,
    LoggedDecisions,
    SelfExposure,
    evaluate,
)
from featurerec.experiments.rounds import Rounds
from featurerec.models.base import UserContext, UserState
from featurerec.models.ranking import sample_slates, slate_distribution
from featurerec.serving.eligibility import EligibilityRules
from featurerec.serving.state import epoch_seconds

T0 = datetime(2026, 3, 2, 9)
ITEMS = ["a", "b", "c", "d", "e"]
#: the candidate's fixed preference: a > b > c > d > e
UPSTREAM = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
RULES = EligibilityRules(dismissal_cooldown_days=14, weekly_frequency_cap=3, min_weekly_diversity=0)


def _log(
    shown: list[int],
    *,
    dismissed: list[int] | None = None,
    adopted: list[int] | None = None,
    clicked: list[int] | None = None,
    logged_excluded: list[list[int]] | None = None,
    exposure_excluded: list[list[int]] | None = None,
    hours: float = 1.0,
    others: Sequence[tuple[int, int, int]] = (),
) -> LoggedDecisions:
    """User u1: one request every ``hours``, each showing one item (slot 0); then one
    request per entry of ``others`` (item, adopted, clicked), each by its own user; then
    user u2's one request, showing "a" (the candidate's choice there, so the weights are
    not all 0)."""
    m = len(shown)
    shown = [*shown, *(o[0] for o in others), 0]
    n = len(shown)
    times = [T0 + timedelta(hours=hours * i) for i in range(m)] + [T0] * (n - m)
    users = ["u1"] * m + [f"o{i}" for i in range(len(others))] + ["u2"]
    rest = [0] * (n - m)
    dismissed = [*(dismissed or [0] * m), *rest]
    adopted = [*(adopted or [0] * m), *(o[1] for o in others), 0]
    clicked = [*(clicked or [0] * m), *(o[2] for o in others), 0]
    logged_excluded = [*(logged_excluded or [[] for _ in range(m)]), *([] for _ in rest)]
    exposure_excluded = [*(exposure_excluded or [[] for _ in range(m)]), *([] for _ in rest)]
    rounds = Rounds(
        recommendation_id=np.array([f"r{i}" for i in range(n)], dtype=object),
        user_id=np.array(users, dtype=object),
        variant=np.array([""] * n, dtype=object),
        generated_at=np.array(times, dtype="datetime64[us]"),
        clicked=np.array(clicked, dtype=np.int64),
        adopted_7d=np.array(adopted, dtype=np.int64),
        as_of=T0 + timedelta(days=30),
        showing=np.ones(n, dtype=np.int64),
        dismissed=np.array(dismissed, dtype=np.int64),
    )
    return LoggedDecisions(
        rounds,
        np.arange(n),
        np.array(shown, dtype=np.int64),
        np.zeros(n, dtype=np.int64),
        np.full(n, 0.2),
        [UserState(u, UserContext(), {}, (), 10) for u in users],
        [np.array(x, dtype=np.int64) for x in logged_excluded],
        np.zeros(n, dtype=bool),  # the lists are the excluded items
        list(ITEMS),
        times=np.array([epoch_seconds(t) for t in times]),
        exposure_listed=[np.array(x, dtype=np.int64) for x in exposure_excluded],
    )


def _candidate(requests: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """The deterministic candidate (eps = 0, one slot, preference UPSTREAM)."""
    up = np.tile(UPSTREAM, (len(requests), 1))
    rank = np.argsort(np.argsort(-up, axis=1), axis=1)
    return slate_distribution(up, rank, exclude, 1, 20, 0.0)


def _replay(d: LoggedDecisions, history: ExposureHistory | None = None) -> list[np.ndarray]:
    """The eligibility the deterministic candidate (eps = 0, one slot) was replayed on at
    each of u1's requests, in order."""
    seen: dict[int, np.ndarray] = {}

    def dist_fn(requests: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        for q, row in zip(requests.tolist(), exclude, strict=True):
            seen[q] = row.copy()
        return _candidate(requests, exclude)

    cfg = SelfExposure(RULES, 0.0, history or ExposureHistory())
    evaluate(d, dist_fn, k=1, min_rounds=1, self_exposure=cfg)
    return [seen[q] for q in range(len(d.users) - 1)]


def _excluded(mask: np.ndarray) -> list[str]:
    return [ITEMS[j] for j in np.flatnonzero(mask)]


def test_the_candidate_runs_into_its_own_weekly_cap() -> None:
    """The log showed "d" four times, so the logged eligibility never capped "a"; the
    candidate shows "a" three times and then its own cap moves it to "b"."""
    seen = _replay(_log([3, 3, 3, 3]))
    assert [_excluded(m) for m in seen] == [[], [], [], ["a"]]


def test_the_cap_counts_only_the_last_seven_days() -> None:
    seen = _replay(_log([3, 3, 3, 3], hours=24 * 3))  # requests 3 days apart
    # by the 4th request (day 9) the 1st showing (day 0) is out of the window
    assert [_excluded(m) for m in seen] == [[], [], [], []]


def test_logged_dismissals_and_adoptions_of_the_candidates_items_carry_over() -> None:
    """Where the log showed the candidate's item, its logged outcome is the candidate's."""
    d = _log([0, 1, 3], dismissed=[1, 0, 0], adopted=[0, 1, 0], clicked=[0, 1, 0])
    seen = _replay(d)
    # request 1: "a" shown and dismissed (cooldown); request 2: "b" clicked and adopted
    assert [_excluded(m) for m in seen] == [[], ["a"], ["a", "b"]]


def test_an_adoption_without_a_click_is_organic_and_does_not_exclude() -> None:
    """ "b" adopted within 7 days of the showing but never clicked: organic (the logged
    eligibility excludes it once the first use happens), so the candidate keeps it."""
    seen = _replay(_log([0, 1, 3], dismissed=[1, 0, 0], adopted=[0, 1, 0]))
    assert [_excluded(m) for m in seen] == [[], ["a"], ["a"]]


def test_caused_adoptions_are_drawn_at_the_logged_click_through_adoption_rate() -> None:
    """Where the log did not show the candidate's item, its adoption is a draw from the
    logged rate of adoptions after a click. u1's log shows "a" (dismissed: cooldown), then
    "c" twice, so the candidate shows "b" twice where the log did not; 50 other users are
    the evidence for "b": shown and adopted. Not clicked, that rate is 0 and "b" stays;
    clicked, it is ~1 and the candidate's first showing excludes "b"."""

    def replay(clicked: int) -> list[list[str]]:
        d = _log([0, 2, 2], dismissed=[1, 0, 0], others=[(1, 1, clicked)] * 50, hours=24.0)
        return [_excluded(m) for m in _replay(d)[:3]]

    assert replay(clicked=0) == [[], ["a"], ["a"]]
    assert replay(clicked=1) == [[], ["a"], ["a", "b"]]


def test_the_logging_policys_exposure_exclusions_are_given_back() -> None:
    """At request 2 the log had "a" excluded by its exposure rules (listed) and "e" by a
    rule that does not depend on exposure (plan, flag, adoption): the candidate gets "a"
    back and shows it; "e" stays out."""
    d = _log([3, 3], logged_excluded=[[], [0, 4]], exposure_excluded=[[], [0]])
    seen = _replay(d)
    assert [_excluded(m) for m in seen] == [[], ["e"]]


def test_history_before_the_window_starts_the_candidates_exposure() -> None:
    before = epoch_seconds(T0 - timedelta(days=1))
    history = ExposureHistory({"u1": [(before, 0)] * 2}, {"u1": {1: before}})
    seen = _replay(_log([3, 3]), history)
    # "a" shown twice yesterday: the first request shows it a third time, then it is capped;
    # "b" was dismissed yesterday
    assert [_excluded(m) for m in seen] == [["b"], ["a", "b"]]


def test_unsupported_mass_is_what_the_candidate_shows_where_the_log_could_not() -> None:
    """The log excluded "a" (by exposure, listed) at both requests and showed "d"; the
    candidate shows "a" both times: all its mass there is unsupported (u2's request, where
    the log showed "a", is the only supported one), so IPS sees reward 0 there."""
    d = _log([3, 3], logged_excluded=[[0], [0]], exposure_excluded=[[0], [0]], hours=24)

    cfg = SelfExposure(RULES, 0.0)
    res = evaluate(d, _candidate, k=1, min_rounds=1, self_exposure=cfg)["click_through_rate"]
    assert not isinstance(res, str)
    assert res.unsupported_mass == pytest.approx(2 / 3)
    assert res.estimates["ips"].max_weight == pytest.approx(5.0)  # 1 / 0.2, u2's round
    plain = evaluate(d, _candidate, k=1, min_rounds=1)["click_through_rate"]
    assert not isinstance(plain, str) and plain.unsupported_mass == 0


def test_sample_slates_draws_the_epsilon_greedy_policy() -> None:
    """Drawn slates match the marginals slate_distribution gives, greedy and exploring."""
    rng = np.random.default_rng(3)
    up = np.tile(UPSTREAM, (20_000, 1))
    exclude = np.zeros_like(up, dtype=bool)
    exclude[:, 2] = True
    rank = np.argsort(np.argsort(-up, axis=1), axis=1)
    dist = slate_distribution(up, rank, exclude, 2, 20, 0.3)
    slates = sample_slates(dist, 0.3, rng)
    for p in range(2):
        freq = np.bincount(slates[:, p], minlength=len(ITEMS)) / len(slates)
        np.testing.assert_allclose(freq, dist[0, :, p], atol=0.01)
    assert not (slates == 2).any() and (slates[:, 0] != slates[:, 1]).all()
    # fewer candidates than slots: the empty slot stays -1
    one = np.ones_like(exclude)
    one[:, 0] = False
    assert (
        sample_slates(slate_distribution(up, rank, one, 2, 20, 0.3), 0.3, rng)[:, 1] == -1
    ).all()


def test_dr_fills_an_item_the_user_dismissed_before_at_the_dismissers_logged_rate() -> None:
    """Known truth: users who dismissed "a" before never click it when it comes back
    (o100-o199, dismissed 20 days ago, outside the cooldown); fresh users always do
    (o0-o99). At u1's request the log's exposure rules hid "a" (given back to the
    candidate, which shows it: no logged reward there), so DR's reward model fills it in.
    If u1 had dismissed "a" before, the fill is the dismissers' rate (0), not the mean of
    all showings of "a" (~0.5)."""
    old = epoch_seconds(T0 - timedelta(days=20))
    others = [(0, 0, 1)] * 100 + [(0, 0, 0)] * 100
    d = _log([3], logged_excluded=[[0]], exposure_excluded=[[0]], others=others)
    dismissers = {f"o{i}": {0: old} for i in range(100, 200)}

    def dr(u1_dismissed: bool) -> tuple[float, float | None]:
        history = ExposureHistory({}, {**dismissers, **({"u1": {0: old}} if u1_dismissed else {})})
        res = evaluate(d, _candidate, metrics=("click_through_rate",), k=1, min_rounds=1,
                       self_exposure=SelfExposure(RULES, 0.0, history))  # fmt: skip
        est = res["click_through_rate"]
        assert not isinstance(est, str)
        assert est.unsupported_mass == pytest.approx(1 / d.n)  # u1's slot
        return est.estimates["dr"].value, est.dismissed_ratio

    fresh, ratio_fresh = dr(False)
    dismissed, ratio = dr(True)
    assert ratio == ratio_fresh == 0.0  # the dismissers' logged CTR on "a" is 0
    # u1's slot: the mean CTR of "a" (~100 clicks / 201 showings) for a fresh user, 0 for
    # a user who dismissed it before
    assert (fresh - dismissed) * d.n == pytest.approx(100 / 201, abs=0.01)
