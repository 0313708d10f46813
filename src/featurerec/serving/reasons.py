"""One short, true sentence per recommendation, built only from computed facts.

Facts come from the online-state snapshot (computed at pipeline time from the warehouse):

* **segment share**: of the users with the same role and team-size bucket, the share who
  use the feature ("62% of project managers on teams of 6–20 use Automations");
* **transition**: only when this user already uses ``from_feature`` and the transition is in
  ``ml.feature_transition_probs`` ("People who use Kanban Boards often try Automations next
  (18% of transitions)"); the share is ``transition_count / from_total``;
* **overall share**: the share of all users who use the feature.

Each candidate fact is scored by the Wilson lower bound (95%) of its proportion, so a large
share from a small sample does not beat a solid one; the strongest is said. No fact with a
share that rounds to 0%, and none from a sample below ``min_support``. When no fact
qualifies the sentence carries no number (the catalog description, or the plain fact that
the feature is available on the user's plan). Every number said is returned with the
:class:`Fact` it came from, so a test can check it against the snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featurerec.catalog import Catalog
from featurerec.models.base import TEAM_SIZE_BUCKETS
from featurerec.serving.snapshot import TEAM_SIZE_TEXT, OnlineSnapshot

_Z = 1.96


def wilson_lower(successes: int, n: int, z: float = _Z) -> float:
    """Lower bound of the Wilson score interval of ``successes / n``."""
    if n <= 0:
        return 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / denom


def percent(successes: int, n: int) -> int:
    """The whole percent a reason states for ``successes / n``."""
    return math.floor(100.0 * successes / n + 0.5)


def plural_role(role: str) -> str:
    """``project_manager`` -> ``project managers``."""
    words = role.replace("-", "_").split("_")
    last = words[-1]
    if last.endswith("s"):
        pass
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*words[:-1], last])


@dataclass(frozen=True)
class Fact:
    """The evidence behind a reason; ``successes / n`` is the proportion stated."""

    kind: str  # "segment_share" | "transition" | "overall_share" | "none"
    feature: str
    successes: int = 0
    n: int = 0
    role: str | None = None
    team_size_bucket: str | None = None
    from_feature: str | None = None

    @property
    def percent(self) -> int | None:
        return percent(self.successes, self.n) if self.n > 0 else None

    @property
    def strength(self) -> float:
        return wilson_lower(self.successes, self.n)


@dataclass(frozen=True)
class Reason:
    text: str
    fact: Fact


class ReasonBuilder:
    """Picks and words the strongest true fact for (user, feature)."""

    def __init__(self, snapshot: OnlineSnapshot, catalog: Catalog, min_support: int = 20) -> None:
        self.catalog = catalog
        self.min_support = min_support
        self.features = list(snapshot.features)
        self.findex = {f: j for j, f in enumerate(self.features)}
        self.n_users = snapshot.n_users
        self.adopters = snapshot.adopters.astype(np.int64)
        self._segments: dict[tuple[str, str], int] = {}
        for s, (rc, bc) in enumerate(
            zip(snapshot.segment_roles.tolist(), snapshot.segment_buckets.tolist(), strict=True)
        ):
            self._segments[(snapshot.roles[rc], TEAM_SIZE_BUCKETS[bc])] = s
        self.segment_users = snapshot.segment_users
        self.segment_adopters = snapshot.segment_adopters
        #: to_feature id -> [(from_feature id, count, from_total)]
        self._into: dict[int, list[tuple[int, int, int]]] = {}
        for t in snapshot.transitions:
            a, b = self.findex.get(t.from_feature), self.findex.get(t.to_feature)
            if a is None or b is None or t.from_total <= 0:
                continue
            self._into.setdefault(b, []).append((a, t.count, t.from_total))

    def facts(
        self, feature: str, role: str | None, bucket: str | None, used: Sequence[int]
    ) -> list[Fact]:
        """Every qualifying fact for ``feature`` and this user (``used``: feature ids the
        user uses)."""
        j = self.findex.get(feature)
        if j is None:
            return []
        out: list[Fact] = []
        if role is not None and bucket is not None:
            s = self._segments.get((role, bucket))
            if s is not None:
                n = int(self.segment_users[s])
                x = int(self.segment_adopters[s, j])
                if n >= self.min_support and percent(x, n) > 0:
                    out.append(Fact("segment_share", feature, x, n, role, bucket))
        used_set = set(used)
        for a, count, total in self._into.get(j, ()):
            if a in used_set and total >= self.min_support and percent(count, total) > 0:
                out.append(Fact("transition", feature, count, total, from_feature=self.features[a]))
        x = int(self.adopters[j])
        if self.n_users >= self.min_support and percent(x, self.n_users) > 0:
            out.append(Fact("overall_share", feature, x, self.n_users))
        return out

    def reason(
        self,
        feature: str,
        *,
        role: str | None,
        bucket: str | None,
        used: Sequence[int],
        plan: str | None = None,
    ) -> Reason:
        """The sentence for the strongest fact (see module doc)."""
        facts = self.facts(feature, role, bucket, used)
        name = self.catalog.entry(feature).display_name
        if not facts:
            entry = self.catalog.entry(feature)
            if entry.description:
                return Reason(entry.description, Fact("none", feature))
            if plan:
                return Reason(f"{name} is available on your {plan} plan", Fact("none", feature))
            return Reason(f"Discover {name}", Fact("none", feature))
        best = max(facts, key=lambda f: (f.strength, f.kind == "transition"))
        return Reason(self.word(best), best)

    def word(self, fact: Fact) -> str:
        name = self.catalog.entry(fact.feature).display_name
        pct = fact.percent
        if fact.kind == "segment_share":
            assert fact.role is not None and fact.team_size_bucket is not None
            return (
                f"{pct}% of {plural_role(fact.role)} on "
                f"{TEAM_SIZE_TEXT[fact.team_size_bucket]} use {name}"
            )
        if fact.kind == "transition":
            assert fact.from_feature is not None
            src = self.catalog.entry(fact.from_feature).display_name
            often = "often try" if (pct or 0) >= 10 else "also try"
            return f"People who use {src} {often} {name} next ({pct}% of transitions)"
        return f"{pct}% of all users use {name}"
