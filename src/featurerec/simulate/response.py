"""How simulated CloudFlow users respond to a shown recommendation.

For a shown recommendation of feature ``j`` to user ``u`` in a placement at time ``t``, with
relevance ``r = sigmoid(U[u, j] - relevance_offset)`` from the hidden utility:

Users not present at ``t`` (not signed up yet, or their workspace churned) respond with
nothing.

* **click**: ``click_scale[placement] * r ** 3 * timing``. Steep in relevance: people click
  what they need, and a random feature rarely is. ``timing`` is 1 except
  ``onboarding_wizard`` after the user's first 14 days (0.4: the wizard is for new users) and
  ``in_context_tooltip`` away from related work (0.75 unless the user already uses a feature
  that leads to ``j``: the spec's "tooltips near related features"). Features the user already
  uses get 0.3x (nothing new to see), features not on their plan or rollout 0.5x.
* **dismiss** (only if not clicked): ``dismiss_scale[placement] * (0.6 + 0.8 * (1 - r))``:
  sidebars are dismissed most, emails cannot be dismissed.
* **adopt within 7 days** (first use *caused* by the recommendation, on top of organic
  adoption, which the world simulates anyway): if clicked ``adopt_after_click[placement] *
  (0.35 + 0.65 r)``, else ``adopt_without_click[placement] * r`` (an email read without a
  click still plants the idea). Zero if already used or not available to the user.

Scales are set so that, on the default world, uniformly random recommendations of features a
user has not used yet get about the spec's random-baseline CTR of 0.03 in the
``sidebar_panel`` (the default placement), and placements rank as a product team would expect
(spec Experiment 2): tooltip > onboarding > sidebar > email for clicks and adoption. Good
targeting (high ``r``) lifts CTR several-fold. The scales are world description, never tuned
to make any model look good.

Sampling (:meth:`ResponseModel.sample`) is seeded: the same inputs and seed give the same
outcomes, with delays (click seconds to hours after showing; adoption minutes after the click
or days later, always within 7 days).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from featurerec.errors import DataError
from featurerec.simulate.catalog import PLACEMENTS
from featurerec.simulate.params import WorldParams
from featurerec.simulate.truth import GroundTruth

DAY_S = 86_400.0


def _by_placement(values: dict[str, float]) -> np.ndarray:
    return np.array([values[p] for p in PLACEMENTS], dtype=np.float64)


@dataclass(frozen=True)
class ResponseConfig:
    """Scales of the response model (see the module docstring)."""

    relevance_offset: float = 1.5
    #: click probability grows with relevance ** click_power
    click_power: float = 3.0
    click_scale: dict[str, float] = field(
        default_factory=lambda: {
            "onboarding_wizard": 0.50,
            "sidebar_panel": 0.25,
            "in_context_tooltip": 0.75,
            "email_digest": 0.08,
        }
    )
    dismiss_scale: dict[str, float] = field(
        default_factory=lambda: {
            "onboarding_wizard": 0.08,
            "sidebar_panel": 0.32,
            "in_context_tooltip": 0.11,
            "email_digest": 0.0,
        }
    )
    adopt_after_click: dict[str, float] = field(
        default_factory=lambda: {
            "onboarding_wizard": 0.70,
            "sidebar_panel": 0.72,
            "in_context_tooltip": 0.85,
            "email_digest": 0.75,
        }
    )
    adopt_without_click: dict[str, float] = field(
        default_factory=lambda: {
            "onboarding_wizard": 0.02,
            "sidebar_panel": 0.01,
            "in_context_tooltip": 0.02,
            "email_digest": 0.04,
        }
    )
    onboarding_days: float = 14.0
    #: in_context_tooltip shown away from related work
    tooltip_unrelated_factor: float = 0.75
    already_used_click_factor: float = 0.3
    unavailable_click_factor: float = 0.5


@dataclass
class ResponseProbabilities:
    click: np.ndarray
    dismiss: np.ndarray  # unconditional: P(not clicked and dismissed)
    adopt_7d: np.ndarray  # recommendation-induced first use within 7 days
    relevance: np.ndarray


@dataclass
class ResponseOutcome:
    clicked: np.ndarray
    dismissed: np.ndarray
    adopted: np.ndarray
    #: seconds after showing (NaN when the event did not happen)
    click_delay_s: np.ndarray
    dismiss_delay_s: np.ndarray
    adopt_delay_s: np.ndarray


class ResponseModel:
    """Click / dismiss / 7-day adoption of shown recommendations, from the ground truth."""

    def __init__(
        self,
        truth: GroundTruth,
        config: ResponseConfig | None = None,
        params: WorldParams | None = None,
    ) -> None:
        self.truth = truth
        self.config = config or ResponseConfig()
        p = params or WorldParams()
        self._related = (p.boost_matrix() > 0) | (p.transition_matrix() > p.transition_default)
        np.fill_diagonal(self._related, False)

    def _placement_codes(self, placement: str | np.ndarray, n: int) -> np.ndarray:
        names = np.broadcast_to(np.asarray(placement, dtype=object), (n,))
        index = {p: i for i, p in enumerate(PLACEMENTS)}
        try:
            return np.array([index[str(x)] for x in names], dtype=np.int64)
        except KeyError as exc:
            raise DataError(
                f"unknown placement {exc.args[0]!r}; expected one of {', '.join(PLACEMENTS)}"
            ) from None

    def probabilities(
        self,
        users: np.ndarray,
        features: np.ndarray,
        placement: str | np.ndarray,
        day: float | np.ndarray | None = None,
    ) -> ResponseProbabilities:
        """Probabilities for each shown (user row, feature index, placement, day).

        ``day`` is the fractional day index since the world's start (default: the last
        simulated day); it decides what the user already uses and their account age.
        """
        cfg = self.config
        t = self.truth
        u = np.asarray(users, dtype=np.int64)
        j = np.asarray(features, dtype=np.int64)
        if u.shape != j.shape:
            raise DataError(f"users and features differ in length ({len(u)} vs {len(j)})")
        n = len(u)
        d = np.broadcast_to(np.asarray(t.days - 1 if day is None else day, dtype=np.float64), (n,))
        pl = self._placement_codes(placement, n)
        util = t.utility[u, j].astype(np.float64)
        # nobody sees anything before signing up or after their workspace churned
        present = t.signup_day[u] <= np.floor(d)
        if t.churn_day is not None:
            present &= t.churn_day[u] >= np.floor(d)
        r = 1.0 / (1.0 + np.exp(-(util - cfg.relevance_offset)))
        used = t.adopt_day[u, j] <= np.floor(d)
        avail = t.eligible[u, j]
        timing = np.ones(n)
        age = d - t.signup_day[u]
        onb = pl == PLACEMENTS.index("onboarding_wizard")
        timing[onb & (age > cfg.onboarding_days)] = 0.4
        tip = pl == PLACEMENTS.index("in_context_tooltip")
        if tip.any():
            grp = t.groups
            # areas the user uses at time d (any item of the area adopted)
            ut = u[tip]
            adopted_rows = t.adopt_day[ut] <= np.floor(d[tip])[:, None]
            areas = np.zeros((len(ut), self._related.shape[0]), dtype=bool)
            np.logical_or.at(areas.T, grp, adopted_rows.T)
            near = (areas & self._related[:, grp[j[tip]]].T).any(axis=1)
            timing[tip] = np.where(near, 1.0, cfg.tooltip_unrelated_factor)
        click = _by_placement(cfg.click_scale)[pl] * r**cfg.click_power * timing
        click *= np.where(used, cfg.already_used_click_factor, 1.0)
        click *= np.where(avail, 1.0, cfg.unavailable_click_factor)
        click = np.where(present, np.clip(click, 0.0, 0.95), 0.0)
        dismiss = (
            present
            * (1 - click)
            * np.clip(_by_placement(cfg.dismiss_scale)[pl] * (0.6 + 0.8 * (1 - r)), 0.0, 1.0)
        )
        can_adopt = ~used & avail & present
        a_click = _by_placement(cfg.adopt_after_click)[pl] * (0.35 + 0.65 * r)
        a_view = _by_placement(cfg.adopt_without_click)[pl] * r
        adopt = np.where(can_adopt, click * a_click + (1 - click) * a_view, 0.0)
        return ResponseProbabilities(click=click, dismiss=dismiss, adopt_7d=adopt, relevance=r)

    def sample(
        self,
        users: np.ndarray,
        features: np.ndarray,
        placement: str | np.ndarray,
        day: float | np.ndarray | None = None,
        *,
        seed: int = 0,
    ) -> ResponseOutcome:
        """Draw outcomes (seeded) consistent with :meth:`probabilities`."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 99])))
        n = len(np.asarray(users))
        pr = self.probabilities(users, features, placement, day)
        pl = self._placement_codes(placement, n)
        email = pl == PLACEMENTS.index("email_digest")
        r1 = rng.random(n)
        clicked = r1 < pr.click
        dismissed = ~clicked & (r1 < pr.click + pr.dismiss)
        cfg = self.config
        used = pr.adopt_7d == 0  # already used, unavailable or not present
        a_click = _by_placement(cfg.adopt_after_click)[pl] * (0.35 + 0.65 * pr.relevance)
        a_view = _by_placement(cfg.adopt_without_click)[pl] * pr.relevance
        adopted = ~used & (rng.random(n) < np.where(clicked, a_click, a_view))
        click_delay = np.where(
            email, rng.exponential(6 * 3600.0, n), rng.exponential(20.0, n) + 1.0
        )
        click_delay = np.minimum(click_delay, 7 * DAY_S - 3600)
        soon = rng.random(n) < 0.6
        after = np.where(soon, rng.exponential(300.0, n) + 5.0, rng.exponential(1.5 * DAY_S, n))
        adopt_delay = np.where(clicked, click_delay + after, rng.random(n) * 7 * DAY_S)
        adopt_delay = np.minimum(adopt_delay, 7 * DAY_S - 1.0)
        dismiss_delay = rng.exponential(8.0, n) + 1.0
        nan = np.full(n, np.nan)
        return ResponseOutcome(
            clicked=clicked,
            dismissed=dismissed,
            adopted=adopted,
            click_delay_s=np.where(clicked, click_delay, nan),
            dismiss_delay_s=np.where(dismissed, dismiss_delay, nan),
            adopt_delay_s=np.where(adopted, adopt_delay, nan),
        )
