"""Which features may be shown to a user right now. These rules are never violated.

A feature is eligible for a user when all of these hold:

1. the user has not adopted it (as of the latest accepted event, see :mod:`.state`);
2. its feature flags let this user see it: each flag is enabled, the user's deterministic
   rollout bucket (``blake2b("<flag_id>:<user_id>")`` as a number in [0, 100)) is below the
   rollout percentage, the user is in one of the flag's target segments (if any), and the
   user's plan is one of the flag's plans (if any); a feature without a flag is generally
   available;
3. it is available on the user's plan (catalog config ``plans``);
4. the user has not dismissed it in the last ``serving.dismissal_cooldown_days`` days;
5. it was shown to the user fewer than ``serving.weekly_frequency_cap`` times in the last
   7 days;
6. weekly diversity: after this response the user's unique features / recommendations shown
   in the last 7 days must stay at or above ``serving.min_weekly_diversity``. When serving
   features already shown this week could push it below the target, every feature shown
   this week is excluded, so the response only adds new features (which can only raise the
   ratio). See :func:`max_repeats`.

:meth:`EligibilityPolicy.exclude_mask` returns the boolean mask handed to a strategy's
``candidates`` (True = never recommend) and how many items may be served: rules 1-3
(:meth:`~EligibilityPolicy.base_exclude`) then the exposure rules 4-6
(:meth:`~EligibilityPolicy.apply_exposure`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from featurerec.serving.snapshot import FlagRule

if TYPE_CHECKING:
    from featurerec.config import ServingConfig

WEEK_SECONDS = 7 * 86_400.0
_TWO_64 = float(2**64)


@dataclass(frozen=True)
class EligibilityRules:
    """The configurable limits (``[serving]`` in featurerec.toml)."""

    dismissal_cooldown_days: int = 14
    weekly_frequency_cap: int = 3
    min_weekly_diversity: float = 0.60

    @classmethod
    def from_settings(cls, serving: ServingConfig) -> EligibilityRules:
        """The rules of a ``[serving]`` section."""
        return cls(
            dismissal_cooldown_days=serving.dismissal_cooldown_days,
            weekly_frequency_cap=serving.weekly_frequency_cap,
            min_weekly_diversity=serving.min_weekly_diversity,
        )


@dataclass(frozen=True)
class UserAttributes:
    """What flags and plans are matched against."""

    user_id: str
    role: str | None = None
    plan: str | None = None
    team_size_bucket: str | None = None
    industry: str | None = None
    workspace_id: str | None = None


@dataclass(frozen=True)
class Exposure:
    """What the user was shown and dismissed, as arrays over the item space.

    ``shown_7d[j]``: times feature j was served to the user in the last 7 days.
    ``last_dismissed[j]``: epoch seconds of the latest dismissal of j (-inf = never).
    """

    shown_7d: np.ndarray
    last_dismissed: np.ndarray

    @classmethod
    def empty(cls, n_items: int) -> Exposure:
        return cls(np.zeros(n_items, dtype=np.int32), np.full(n_items, -np.inf))

    @property
    def total_shown(self) -> int:
        return int(self.shown_7d.sum())

    @property
    def unique_shown(self) -> int:
        return int(np.count_nonzero(self.shown_7d))


def rollout_bucket(flag_id: str, user_id: str) -> float:
    """The user's deterministic position in [0, 100) for ``flag_id``."""
    digest = hashlib.blake2b(f"{flag_id}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64 * 100.0


def segment_matches(segment: str, user: UserAttributes) -> bool:
    """``segment`` is a bare value (role, plan, bucket or industry), ``key:value`` / ``key=value``
    with key in role, plan, team_size_bucket, industry, workspace_id, or ``*``/``all``."""
    s = segment.strip()
    if s in ("*", "all", "everyone"):
        return True
    attrs = {
        "role": user.role,
        "plan": user.plan,
        "team_size_bucket": user.team_size_bucket,
        "team_size": user.team_size_bucket,
        "industry": user.industry,
        "workspace_id": user.workspace_id,
    }
    for sep in (":", "="):
        if sep in s:
            key, _, value = s.partition(sep)
            return attrs.get(key.strip()) == value.strip()
    return s in {v for v in attrs.values() if v}


def flag_allows(flag: FlagRule, user: UserAttributes) -> bool:
    """Whether ``flag`` shows its feature to ``user`` (enabled, rollout, segments, plans)."""
    if not flag.enabled:
        return False
    if flag.rollout_percentage < 100.0 and not (
        rollout_bucket(flag.flag_id, user.user_id) < flag.rollout_percentage
    ):
        return False
    if flag.target_segments and not any(segment_matches(s, user) for s in flag.target_segments):
        return False
    return not (flag.plans is not None and user.plan not in flag.plans)


def max_repeats(unique_shown: int, total_shown: int, n_served: int, target: float) -> int:
    """How many of ``n_served`` new recommendations may be features already shown this week
    while unique / total stays ≥ ``target``:  (U + n - r) / (T + n) ≥ t  ⇔  r ≤ U + n - t(T + n).
    """
    bound = unique_shown + n_served - target * (total_shown + n_served)
    return math.floor(bound + 1e-9)


class EligibilityPolicy:
    """Builds the exclude mask over a fixed item space from flags, plans and exposure."""

    def __init__(
        self,
        features: Sequence[str],
        flags: Sequence[FlagRule],
        feature_plans: dict[str, list[str] | None],
        rules: EligibilityRules,
    ) -> None:
        self.features = list(features)
        self.rules = rules
        index = {f: j for j, f in enumerate(self.features)}
        # A visitor whose plan we do not know yet (cold start without context) may see the
        # features available on every plan the product has; plan-limited ones stay hidden.
        known = frozenset(p for f in flags for p in f.plans or ()) | frozenset(
            p for ps in feature_plans.values() for p in ps or ()
        )
        self._flags: list[tuple[int, FlagRule]] = [
            (index[f.feature], f) for f in flags if f.feature in index
        ]
        self._flags_unknown_plan: list[tuple[int, FlagRule]] = [
            (j, replace(f, plans=None) if f.plans is not None and known <= set(f.plans) else f)
            for j, f in self._flags
        ]
        self._plans: list[tuple[int, frozenset[str]]] = [
            (index[f], frozenset(p))
            for f, p in feature_plans.items()
            if p is not None and f in index
        ]
        self._plans_unknown_plan = [(j, ps) for j, ps in self._plans if not known <= ps]

    def static_exclude(self, user: UserAttributes) -> np.ndarray:
        """Features this user can never see right now (flags and plan)."""
        mask = np.zeros(len(self.features), dtype=bool)
        unknown_plan = user.plan is None
        for j, flag in self._flags_unknown_plan if unknown_plan else self._flags:
            if not mask[j] and not flag_allows(flag, user):
                mask[j] = True
        for j, plans in self._plans_unknown_plan if unknown_plan else self._plans:
            if user.plan not in plans:
                mask[j] = True
        return mask

    def exclude_mask(
        self,
        user: UserAttributes,
        adopted: np.ndarray,
        exposure: Exposure,
        now: float,
        k: int,
    ) -> tuple[np.ndarray, int]:
        """``(exclude, n_servable)``: the mask (True = ineligible) and how many items may be
        served (``min(k, eligible)``). ``now`` is epoch seconds."""
        return self.apply_exposure(self.base_exclude(user, adopted), exposure, now, k)

    def base_exclude(self, user: UserAttributes, adopted: np.ndarray) -> np.ndarray:
        """Rules 1-3, which do not depend on what the user was shown: adopted, flags, plan."""
        mask = self.static_exclude(user)
        mask |= np.asarray(adopted, dtype=bool)
        return mask

    def apply_exposure(
        self, base: np.ndarray, exposure: Exposure, now: float, k: int
    ) -> tuple[np.ndarray, int]:
        """Rules 4-6 on top of ``base`` (:meth:`base_exclude`): :func:`exposure_exclude`
        with this policy's rules."""
        return exposure_exclude(self.rules, base, exposure, now, k)


def exposure_exclude(
    rules: EligibilityRules, base: np.ndarray, exposure: Exposure, now: float, k: int
) -> tuple[np.ndarray, int]:
    """Rules 4-6 (dismissal cooldown, weekly cap, weekly diversity) on top of ``base``, the
    mask of rules 1-3: ``(exclude, n_servable)``. ``now`` is epoch seconds. Off-policy
    evaluation applies them to a candidate's own counterfactual exposure
    (:mod:`featurerec.experiments.offline`), so they live in one place."""
    r = rules
    mask = np.array(base, dtype=bool)
    if r.dismissal_cooldown_days > 0:
        mask |= exposure.last_dismissed > now - r.dismissal_cooldown_days * 86_400.0
    mask |= exposure.shown_7d >= r.weekly_frequency_cap
    n = min(k, int(np.count_nonzero(~mask)))
    shown = exposure.shown_7d > 0
    if n > 0 and shown.any():
        allowed = max_repeats(
            exposure.unique_shown, exposure.total_shown, n, r.min_weekly_diversity
        )
        if int(np.count_nonzero(shown & ~mask)) > allowed:
            mask |= shown
            n = min(k, int(np.count_nonzero(~mask)))
    return mask, n
