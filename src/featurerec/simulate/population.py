"""Who lives in the CloudFlow world: workspaces, users, their context and latent taste.

Drawn once per world from the world seed (all vectorised):

* **Workspaces**: seat counts from a log-normal (median ~5, heavy tail to thousands, capped
  relative to the world size); plan depends on size (big teams buy bigger plans); industry from
  fixed shares; a few are created inside the simulated window, the rest earlier.
* **Users**: the seats of each workspace; role from fixed shares; signup before the window
  (tenure up to years) or inside it (new workspaces, invitations); an engagement level
  (log-normal) that sets how often they come back and how long they stay.
* **Latent taste**: ``z_u = sqrt(s) z_workspace + sqrt(1-s) z_individual`` (rank ``d``), so
  teammates share part of their taste, and item factors ``v_j`` (sub-features scatter around
  their parent). The utility a user gets from a feature is built in :mod:`.dynamics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import numpy as np

from featurerec.errors import FeaturerecError
from featurerec.simulate.catalog import (
    INDUSTRIES,
    INDUSTRY_WEIGHTS,
    N_GROUPS,
    PLANS,
    ROLE_WEIGHTS,
    ROLES,
    Catalog,
    build_catalog,
)
from featurerec.simulate.params import WorldParams

#: Plan probabilities per team-size bucket (small, medium, large, enterprise).
PLAN_BY_SIZE = np.array(
    [
        [0.55, 0.33, 0.10, 0.02],
        [0.30, 0.40, 0.24, 0.06],
        [0.12, 0.30, 0.38, 0.20],
        [0.03, 0.12, 0.35, 0.50],
    ]
)


class SimulationConfigError(FeaturerecError, ValueError):
    """A simulator setting is out of range; the message names the setting and the value."""


@dataclass(frozen=True)
class WorldConfig:
    """What to generate. Same config (seed included) -> the same world, byte for byte.

    ``chunk_users`` bounds memory: workspaces are grouped into chunks of about this many users
    (fewer when the catalog is large) that are simulated independently, each writing its own
    Parquet part. It is part of the world's identity: change it and the draws change.
    """

    users: int = 5000
    days: int = 60
    seed: int = 0
    features: int = 12
    end_date: date = date(2026, 3, 1)
    chunk_users: int = 25_000
    params: WorldParams = field(default_factory=WorldParams)

    def __post_init__(self) -> None:
        if self.users < 10:
            raise SimulationConfigError(f"users must be at least 10 (got {self.users})")
        if not 1 <= self.days <= 3650:
            raise SimulationConfigError(f"days must be between 1 and 3650 (got {self.days})")
        if not N_GROUPS <= self.features <= 100_000:
            raise SimulationConfigError(
                f"features must be between {N_GROUPS} and 100000 (got {self.features})"
            )
        if self.seed < 0:
            raise SimulationConfigError(f"seed must be >= 0 (got {self.seed})")
        if self.chunk_users < 100:
            raise SimulationConfigError(f"chunk_users must be >= 100 (got {self.chunk_users})")

    @property
    def effective_chunk_users(self) -> int:
        """Users per chunk, reduced so one chunk's users x features arrays stay ~<= 40M cells."""
        return int(max(200, min(self.chunk_users, 40_000_000 // max(self.features, 1))))


@dataclass
class Population:
    """Static attributes of every workspace and user (global arrays, index = id number)."""

    # workspaces
    ws_seats: np.ndarray
    ws_plan: np.ndarray
    ws_industry: np.ndarray
    ws_size: np.ndarray
    ws_created_day: np.ndarray
    ws_first_user: np.ndarray
    ws_n_users: np.ndarray
    # users
    user_ws: np.ndarray
    user_role: np.ndarray
    user_signup_day: np.ndarray
    user_engagement: np.ndarray
    user_checklist: np.ndarray  # A/B: onboarding checklist variant (new users only)
    user_sidebar_test: np.ndarray  # A/B with no effect (-1 = not in the test)
    # latent taste
    user_z: np.ndarray  # (n_users, d)
    item_v: np.ndarray  # (K, d)
    # per-item utility structure (K,) and (levels, K)
    item_base: np.ndarray
    item_role: np.ndarray
    item_plan: np.ndarray
    item_size: np.ndarray
    item_industry: np.ndarray
    item_discover: np.ndarray
    catalog: Catalog

    @property
    def n_users(self) -> int:
        return len(self.user_ws)

    @property
    def n_workspaces(self) -> int:
        return len(self.ws_seats)

    def user_plan(self) -> np.ndarray:
        return self.ws_plan[self.user_ws]


def size_bucket(seats: np.ndarray) -> np.ndarray:
    """Spec Stage 3 team-size bucket index: small <= 5, medium <= 20, large <= 100, else 3."""
    return np.searchsorted(np.array([5, 20, 100]), seats, side="left").astype(np.int8)


def build_population(config: WorldConfig) -> Population:
    """Draw every workspace and user of the world (see the module docstring)."""
    from featurerec.simulate.catalog import (
        INDUSTRY_EFFECT,
        PLAN_EFFECT,
        ROLE_EFFECT,
        SIZE_EFFECT,
    )

    p = config.params
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, 0])))
    n = config.users
    days = config.days

    # --- workspaces: seats until every user has one -------------------------------------
    # no single customer is more than ~1% of the world (heavy tail, but no giant that
    # decides the plan mix of a small world on its own)
    seat_cap = int(min(p.seat_max, max(20, n // 100)))
    mean_seats = min(np.exp(np.log(p.seat_median) + p.seat_sigma**2 / 2), seat_cap)
    draws = int(n / max(mean_seats, 1) * 1.5) + 16
    seats = np.empty(0, dtype=np.int64)
    while seats.sum() < n:
        more = np.clip(
            np.round(rng.lognormal(np.log(p.seat_median), p.seat_sigma, draws)), 1, seat_cap
        ).astype(np.int64)
        seats = np.concatenate([seats, more])
    cum = np.cumsum(seats)
    n_ws = int(np.searchsorted(cum, n) + 1)
    seats = seats[:n_ws]
    users_per_ws = seats.copy()
    users_per_ws[-1] = n - (cum[n_ws - 2] if n_ws > 1 else 0)
    size = size_bucket(seats)
    u = rng.random(n_ws)
    plan = (u[:, None] > np.cumsum(PLAN_BY_SIZE[size], axis=1)).sum(axis=1).astype(np.int8)
    plan = np.minimum(plan, len(PLANS) - 1)
    industry = rng.choice(len(INDUSTRIES), size=n_ws, p=np.array(INDUSTRY_WEIGHTS) / 1.0)
    new_ws = rng.random(n_ws) < min(0.5, p.new_workspace_rate * days)
    created = np.where(
        new_ws,
        rng.integers(0, days, n_ws),
        -1 - np.floor(rng.exponential(p.prior_tenure_days, n_ws)).astype(np.int64),
    ).astype(np.int32)

    # --- users ----------------------------------------------------------------------------
    user_ws = np.repeat(np.arange(n_ws), users_per_ws).astype(np.int32)
    first_user = np.concatenate([[0], np.cumsum(users_per_ws)[:-1]]).astype(np.int64)
    is_owner = np.zeros(n, dtype=bool)
    is_owner[first_user] = True
    role = rng.choice(len(ROLES), size=n, p=np.array(ROLE_WEIGHTS) / sum(ROLE_WEIGHTS))
    cday = created[user_ws].astype(np.int64)
    ws_is_new = new_ws[user_ws]
    # new workspace: teammates join over the first days; existing: some invited in-window
    join_new = np.minimum(cday + np.floor(rng.exponential(3.0, n)).astype(np.int64), days - 1)
    invited = rng.random(n) < min(0.5, p.invite_rate * days)
    before = cday + np.floor(rng.random(n) * (-cday)).astype(np.int64)
    signup = np.where(
        ws_is_new, join_new, np.where(invited, rng.integers(0, days, n), np.minimum(before, -1))
    )
    signup = np.where(is_owner, cday, signup).astype(np.int32)
    engagement = rng.lognormal(0.0, p.engagement_sigma, n)
    checklist = (rng.random(n) < 0.5) & (signup >= 0)
    sidebar = np.where(rng.random(n) < 0.3, rng.integers(0, 2, n), -1).astype(np.int8)

    # --- items and latent taste ------------------------------------------------------------
    cat = build_catalog(config.features)
    k = cat.n
    d = p.latent_dim
    g = cat.group
    v_core = rng.normal(0.0, 1.0, (N_GROUPS, d))
    v = v_core[g] + np.where(cat.is_core[:, None], 0.0, rng.normal(0.0, 0.6, (k, d)))
    v /= np.sqrt(d)
    z_ws = rng.normal(0.0, 1.0, (n_ws, d))
    z_ind = rng.normal(0.0, 1.0, (n, d))
    s = p.workspace_taste_share
    z = (np.sqrt(s) * z_ws[user_ws] + np.sqrt(1 - s) * z_ind) * p.latent_scale

    sub = ~cat.is_core
    base = np.array(p.base_utility)[g] + np.where(
        sub, p.sub_utility_offset + rng.normal(0.0, 0.4, k), 0.0
    )

    def effect(table: np.ndarray) -> np.ndarray:
        e = table[:, g] * p.context_scale
        return e + np.where(sub[None, :], rng.normal(0.0, 0.3, (table.shape[0], k)), 0.0)

    discover = np.array(p.discover)[g] * np.where(sub, p.sub_discover_share, 1.0)
    return Population(
        ws_seats=seats.astype(np.int32),
        ws_plan=plan,
        ws_industry=industry.astype(np.int8),
        ws_size=size,
        ws_created_day=created,
        ws_first_user=first_user,
        ws_n_users=users_per_ws.astype(np.int32),
        user_ws=user_ws,
        user_role=role.astype(np.int8),
        user_signup_day=signup,
        user_engagement=engagement,
        user_checklist=checklist,
        user_sidebar_test=sidebar,
        user_z=z.astype(np.float32),
        item_v=v.astype(np.float32),
        item_base=base,
        item_role=effect(ROLE_EFFECT),
        item_plan=effect(PLAN_EFFECT),
        item_size=effect(SIZE_EFFECT),
        item_industry=effect(INDUSTRY_EFFECT),
        item_discover=discover,
        catalog=cat,
    )


def chunk_bounds(pop: Population, chunk_users: int) -> list[tuple[int, int, int, int]]:
    """``[(user_start, user_end, ws_start, ws_end)]``: whole workspaces, ~chunk_users each."""
    out = []
    starts = pop.ws_first_user
    ends = starts + pop.ws_n_users
    w = 0
    n_ws = pop.n_workspaces
    while w < n_ws:
        u0 = int(starts[w])
        # last workspace whose end is within u0 + chunk_users (at least one workspace)
        w_end = int(np.searchsorted(ends, u0 + chunk_users, side="right"))
        w_end = max(w_end, w + 1)
        out.append((u0, int(ends[w_end - 1]), w, w_end))
        w = w_end
    return out


def signup_cohort(signup: date) -> str:
    """``2025-Q4`` style cohort label (spec user_traits.signup_cohort)."""
    return f"{signup.year}-Q{(signup.month - 1) // 3 + 1}"
