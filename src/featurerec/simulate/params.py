"""Numeric parameters of the CloudFlow world.

Two kinds live here:

* **Hand-set** structure (utility scale, latent rank, noise, churn hazard, session shape): chosen
  once to look like a real SaaS product and never changed to suit a model.
* **Fitted** rates, marked ``fitted``: per-feature discoverability (``discover``), the within-session
  transition affinities of the spec's five pairs (``transition``) and the engagement spread. They
  were fitted so the simulated *product figures* match the spec (30-day adoption per feature,
  transition probabilities, cold-start share, features per workspace) by
  ``python -m featurerec.simulate.tuning`` (fixed-point iteration on a 4,000-user world), and
  then written here. Calibrating world figures is legitimate; nothing here looks at any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from featurerec.simulate.catalog import CORE_NAMES, GROUP_INDEX, N_GROUPS

#: The spec's figures the world is calibrated to (Stage 2 ontology table, Stage 3 transitions).
SPEC_ADOPTION_30D: dict[str, float] = {
    "kanban_boards": 0.52,
    "task_management": 0.48,
    "file_sharing": 0.31,
    "automations": 0.082,
    "gantt_charts": 0.061,
    "custom_dashboards": 0.054,
    "api_access": 0.031,
    "forms": 0.028,
    "advanced_reports": 0.037,
    "timelines": 0.019,
}
SPEC_TRANSITIONS: dict[tuple[str, str], float] = {
    ("kanban_boards", "automations"): 0.18,
    ("task_management", "gantt_charts"): 0.14,
    ("kanban_boards", "custom_dashboards"): 0.11,
    ("file_sharing", "forms"): 0.09,
    ("automations", "advanced_reports"): 0.15,
}
SPEC_COLD_START_SHARE = 0.35
SPEC_FEATURES_PER_WORKSPACE = 3.4


def _g(name: str) -> int:
    return GROUP_INDEX[name]


def _vec(values: dict[str, float], default: float = 0.0) -> tuple[float, ...]:
    return tuple(values.get(n, default) for n in CORE_NAMES)


#: Intrinsic value of each feature area (mean utility before context and taste). Automations,
#: dashboards and reports are valuable but hard to find: the gap a recommender can close.
BASE_UTILITY = _vec(
    {
        "kanban_boards": 1.0,
        "task_management": 1.0,
        "file_sharing": 0.5,
        "automations": 0.6,
        "gantt_charts": 0.0,
        "custom_dashboards": 0.3,
        "api_access": -0.4,
        "forms": 0.0,
        "advanced_reports": 0.1,
        "timelines": -0.3,
        "integrations": 0.4,
        "team_management": 0.0,
    }
)

#: fitted: daily probability scale that an active user stumbles on a feature by themselves.
DISCOVER = _vec(
    {
        "kanban_boards": 0.0853,
        "task_management": 0.0619,
        "file_sharing": 0.0326,
        "automations": 0.001455,
        "gantt_charts": 0.002,
        "custom_dashboards": 0.00175,
        "api_access": 0.0085,
        "forms": 0.000686,
        "advanced_reports": 0.00408,
        "timelines": 0.00144,
        "integrations": 0.003,
        "team_management": 0.002,
    }
)

#: Adopting feature A multiplies the discovery hazard of B by (1 + boost): kanban users find
#: automations, automations users find reports (spec Stage 3's transitions are the visible trace).
DISCOVERY_BOOST: tuple[tuple[str, str, float], ...] = (
    ("kanban_boards", "automations", 3.0),
    ("task_management", "gantt_charts", 3.0),
    ("kanban_boards", "custom_dashboards", 2.0),
    ("file_sharing", "forms", 2.5),
    ("automations", "advanced_reports", 8.0),
    ("gantt_charts", "timelines", 3.0),
    ("custom_dashboards", "advanced_reports", 2.0),
    ("integrations", "api_access", 2.5),
    ("api_access", "integrations", 1.0),
    ("team_management", "integrations", 0.5),
    ("task_management", "automations", 1.0),
    ("timelines", "gantt_charts", 1.0),
)

#: fitted: within-session "what do I open next" affinity between feature areas (row: from).
#: The default off-diagonal affinity is 1; the diagonal is the weight of staying on a feature.
TRANSITION_DEFAULT = 1.0
TRANSITION_STAY = 2.0
TRANSITION: tuple[tuple[str, str, float], ...] = (
    ("kanban_boards", "automations", 14.6),
    ("task_management", "gantt_charts", 8.96),
    ("kanban_boards", "custom_dashboards", 42.9),
    ("file_sharing", "forms", 11.7),
    ("automations", "advanced_reports", 48.2),
    ("kanban_boards", "task_management", 1.5),
    ("task_management", "kanban_boards", 1.5),
    ("gantt_charts", "timelines", 3.0),
    ("timelines", "gantt_charts", 3.0),
    ("custom_dashboards", "advanced_reports", 3.0),
    ("integrations", "api_access", 3.0),
    ("automations", "integrations", 2.0),
)


@dataclass(frozen=True)
class WorldParams:
    """Every numeric knob of the generative model (see :mod:`featurerec.simulate.world`)."""

    base_utility: tuple[float, ...] = BASE_UTILITY
    discover: tuple[float, ...] = DISCOVER
    discovery_boost: tuple[tuple[str, str, float], ...] = DISCOVERY_BOOST
    transition: tuple[tuple[str, str, float], ...] = TRANSITION
    transition_default: float = TRANSITION_DEFAULT
    transition_stay: float = TRANSITION_STAY

    # utility = base + context + latent taste + noise
    latent_dim: int = 6
    latent_scale: float = 1.0  # sd of the taste term z_u . v_j
    workspace_taste_share: float = 0.5  # share of taste variance common to the workspace
    noise_scale: float = 0.5  # sd of the idiosyncratic (unlearnable) term
    context_scale: float = 1.0
    #: hazard uses sigmoid(utility - discover_offset)
    discover_offset: float = 0.5
    #: sub-features: utility offset vs. parent and their share of the parent's discovery rate
    sub_utility_offset: float = -0.6
    sub_discover_share: float = 0.25

    # onboarding: discovery hazard x (1 + onboarding_boost * exp(-age / onboarding_days))
    onboarding_boost: float = 4.0
    onboarding_days: float = 4.0
    #: after first use a feature is kept with prob sigmoid(keep_slope * (utility - keep_offset))
    keep_slope: float = 1.5
    keep_offset: float = -0.8
    #: within-session pick weight of an adopted feature: exp(usage_gamma * utility)
    usage_gamma: float = 0.6

    # engagement (fitted spread): p(active on a day) = clip(active_base * e, .., active_max)
    engagement_sigma: float = 1.6
    active_base: float = 0.0612
    active_max: float = 0.92
    weekend_factor: float = 0.35
    new_user_activity_boost: float = 2.0
    sessions_extra_mean: float = 0.5  # sessions per active day = 1 + Poisson(. * e^.5)
    session_features_mean: float = 3.0  # feature_used events per session ~ Poisson(. * e^el)
    session_len_elasticity: float = 0.5
    #: engagement above this no longer lengthens sessions or adds more of them
    engagement_cap: float = 4.0
    #: multiplies sessions and events per session (spec volume: ~120 feature_used/user/day)
    activity_scale: float = 1.0

    # other events per feature_used event / per session
    page_view_prob: float = 0.7
    action_event_prob: float = 0.35
    tail_events_per_session: float = 1.5
    heartbeat_every_s: float = 90.0
    keepalive_every_s: float = 300.0
    browse_discovered_prob: float = 0.03  # feature_discovered without adoption, per active day

    # population
    seat_median: float = 3.0
    seat_sigma: float = 1.5
    seat_max: int = 2000
    #: daily rates that define who signs up inside the simulated window
    new_workspace_rate: float = 0.003
    invite_rate: float = 0.002
    prior_tenure_days: float = 420.0

    # churn: daily hazard base * exp(-slope * features adopted by the workspace)
    churn_base: float = 0.004
    churn_slope: float = 0.25

    # support tickets: per adopted-but-dropped feature / per adopted feature
    ticket_dropped_prob: float = 0.15
    ticket_kept_prob: float = 0.01
    ticket_other_rate: float = 0.0005

    # A/B test in the product: onboarding checklist raises onboarding discovery by this factor
    checklist_effect: float = 1.15

    extra: dict[str, float] = field(default_factory=dict)

    def with_(self, **kw: object) -> WorldParams:
        return replace(self, **kw)  # type: ignore[arg-type]

    # -- matrices ------------------------------------------------------------------------
    def transition_matrix(self) -> np.ndarray:
        """(G, G) within-session next-feature affinity, diagonal = staying."""
        t = np.full((N_GROUPS, N_GROUPS), self.transition_default, dtype=np.float64)
        np.fill_diagonal(t, self.transition_stay)
        for a, b, w in self.transition:
            t[_g(a), _g(b)] = w
        return t

    def boost_matrix(self) -> np.ndarray:
        """(G, G) discovery boost: row adopted -> column's hazard x (1 + value)."""
        m = np.zeros((N_GROUPS, N_GROUPS), dtype=np.float64)
        for a, b, w in self.discovery_boost:
            m[_g(a), _g(b)] = w
        return m
