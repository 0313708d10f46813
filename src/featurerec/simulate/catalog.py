"""CloudFlow's product as the simulator knows it: features, flags, plans, people, event types.

Everything here is *world description*, fixed by hand from the spec (Stage 1 and 2 figures and
the business context). The numeric world parameters that were fitted to the spec's figures
(discoverability, transition affinities) live in :mod:`featurerec.simulate.params`.

Feature order matters: index ``j`` of every per-feature array in the simulator is the position
in :data:`CORE_FEATURES` (for ``--features N`` the generated sub-features follow the core ones;
see :func:`build_catalog`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PLANS: tuple[str, ...] = ("free", "pro", "business", "enterprise")
ROLES: tuple[str, ...] = (
    "project_manager",
    "team_member",
    "developer",
    "designer",
    "marketing_manager",
    "executive",
    "operations",
    "admin",
)
#: Share of users per role (a workspace is mostly team members and a few managers).
ROLE_WEIGHTS: tuple[float, ...] = (0.16, 0.30, 0.14, 0.08, 0.09, 0.05, 0.10, 0.08)
INDUSTRIES: tuple[str, ...] = (
    "software",
    "marketing_agency",
    "construction",
    "finance",
    "healthcare",
    "education",
    "retail",
    "consulting",
    "nonprofit",
    "manufacturing",
)
INDUSTRY_WEIGHTS: tuple[float, ...] = (0.24, 0.12, 0.07, 0.09, 0.07, 0.08, 0.08, 0.12, 0.05, 0.08)
#: Spec Stage 3 buckets: small <= 5, medium <= 20, large <= 100, enterprise.
SIZE_BUCKETS: tuple[str, ...] = ("small", "medium", "large", "enterprise")
PLACEMENTS: tuple[str, ...] = (
    "onboarding_wizard",
    "sidebar_panel",
    "in_context_tooltip",
    "email_digest",
)


@dataclass(frozen=True)
class CoreFeature:
    """One of CloudFlow's feature areas (an item of the recommender)."""

    name: str
    #: Plans the feature is available on (the feature flag's ``plans``).
    plans: tuple[str, ...]
    #: Flag rollout; users are bucketed by a hash of (flag, user).
    rollout_percentage: float
    target_segments: tuple[str, ...]
    #: ``feature_name`` values (the concrete action) of feature_used events.
    actions: tuple[str, ...]
    #: ``context`` values (where in the UI the feature was used).
    contexts: tuple[str, ...]
    #: Product events that accompany use of the feature (task_created, ...).
    action_events: tuple[str, ...]
    #: Support ticket subjects users who struggle with the feature write.
    ticket_subjects: tuple[str, ...]
    #: Mean seconds on page per use.
    mean_seconds: float
    #: URL path used in page_viewed events.
    path: str


ALL_PLANS = PLANS
PAID = ("pro", "business", "enterprise")
UPPER = ("business", "enterprise")

CORE_FEATURES: tuple[CoreFeature, ...] = (
    CoreFeature(
        "kanban_boards",
        ALL_PLANS,
        100,
        ("all",),
        ("open_board", "move_card", "create_card", "add_column", "filter_board"),
        ("board_view", "project_home", "sidebar"),
        ("board_created", "card_moved", "card_created"),
        ("Cards disappear after moving between columns", "How do I archive a board?"),
        35,
        "/boards",
    ),
    CoreFeature(
        "task_management",
        ALL_PLANS,
        100,
        ("all",),
        ("create_task", "assign_task", "complete_task", "set_due_date", "add_subtask"),
        ("task_list", "project_home", "my_work"),
        ("task_created", "task_completed", "task_assigned", "comment_added"),
        ("Recurring tasks are not repeating", "Can't reassign a task to a guest"),
        30,
        "/tasks",
    ),
    CoreFeature(
        "file_sharing",
        ALL_PLANS,
        100,
        ("all",),
        ("upload_file", "share_link", "preview_file", "attach_to_task"),
        ("files_tab", "task_detail", "project_home"),
        ("file_uploaded", "file_shared", "file_downloaded"),
        ("Upload fails for large files", "Shared link asks external users to log in"),
        25,
        "/files",
    ),
    CoreFeature(
        "automations",
        PAID,
        100,
        ("all",),
        ("create_automation_rule", "edit_trigger", "test_automation", "enable_rule"),
        ("project_settings", "board_view", "automation_center"),
        ("automation_created", "automation_triggered"),
        ("Automation rule did not trigger", "How do I chain two automations?"),
        55,
        "/automations",
    ),
    CoreFeature(
        "gantt_charts",
        PAID,
        100,
        ("all",),
        ("open_gantt", "drag_dependency", "set_milestone", "export_gantt"),
        ("gantt_view", "project_home"),
        ("gantt_viewed", "dependency_created", "milestone_created"),
        ("Dependencies are not shifting dates", "Gantt export cuts off long projects"),
        50,
        "/gantt",
    ),
    CoreFeature(
        "custom_dashboards",
        PAID,
        80,
        ("all",),
        ("create_dashboard", "add_widget", "share_dashboard", "filter_dashboard"),
        ("dashboards", "project_home"),
        ("dashboard_created", "widget_added"),
        ("Dashboard widgets show stale numbers", "How do I share a dashboard read-only?"),
        45,
        "/dashboards",
    ),
    CoreFeature(
        "api_access",
        UPPER,
        100,
        ("all",),
        ("generate_api_key", "view_api_docs", "create_webhook", "rotate_key"),
        ("developer_settings", "workspace_settings"),
        ("api_key_generated", "webhook_created", "api_request_made"),
        ("API returns 429 rate limit", "Webhook payload missing custom fields"),
        40,
        "/settings/api",
    ),
    CoreFeature(
        "forms",
        ALL_PLANS,
        100,
        ("all",),
        ("create_form", "add_form_field", "publish_form", "view_submissions"),
        ("forms", "project_settings"),
        ("form_created", "form_submitted"),
        ("Form submissions not creating tasks", "Custom branding on forms"),
        40,
        "/forms",
    ),
    CoreFeature(
        "advanced_reports",
        UPPER,
        60,
        ("business", "enterprise"),
        ("build_report", "schedule_report", "export_report", "add_report_filter"),
        ("reports", "dashboards"),
        ("report_generated", "report_scheduled"),
        ("Report totals don't match dashboard", "Scheduled report email never arrives"),
        60,
        "/reports",
    ),
    CoreFeature(
        "timelines",
        PAID,
        100,
        ("all",),
        ("create_timeline", "add_timeline_item", "zoom_timeline", "share_timeline"),
        ("timeline_view", "project_home"),
        ("timeline_created", "timeline_item_added"),
        ("Timeline items overlap", "How do timelines differ from Gantt?"),
        40,
        "/timelines",
    ),
    CoreFeature(
        "integrations",
        ALL_PLANS,
        100,
        ("all",),
        ("connect_slack", "connect_github", "connect_google_drive", "configure_integration"),
        ("workspace_settings", "integrations_directory"),
        ("integration_connected", "integration_synced"),
        ("Slack notifications stopped", "GitHub integration duplicates tasks"),
        35,
        "/settings/integrations",
    ),
    CoreFeature(
        "team_management",
        ALL_PLANS,
        100,
        ("all",),
        ("invite_member", "change_role", "create_team", "remove_member"),
        ("workspace_settings", "members_page"),
        ("member_invited", "team_created", "role_changed"),
        ("Invited user never got the email", "How do I transfer workspace ownership?"),
        30,
        "/settings/team",
    ),
)

CORE_NAMES: tuple[str, ...] = tuple(f.name for f in CORE_FEATURES)
N_GROUPS = len(CORE_FEATURES)
GROUP_INDEX = {name: i for i, name in enumerate(CORE_NAMES)}

#: A flag that exists in the product but is switched off (never produces events).
DISABLED_FLAGS: tuple[tuple[str, str], ...] = (("ff_ai_assistant", "ai_assistant"),)

#: Event types the spec names or the simulator gives meaning to (besides action events).
NAMED_EVENT_TYPES: tuple[str, ...] = (
    "feature_used",
    "feature_discovered",
    "page_viewed",
    "heartbeat",
    "session_keepalive",
    "workspace_churned",
    "user_signed_up",
)
NOISE_EVENT_TYPES: tuple[str, ...] = ("heartbeat", "session_keepalive")
#: The spec's count of distinct event types (Stage 2: "347 distinct event types").
N_EVENT_TYPES = 347

_TAIL_OBJECTS = (
    "comment",
    "notification",
    "search",
    "profile",
    "avatar",
    "label",
    "tag",
    "checklist",
    "reminder",
    "calendar",
    "invoice",
    "billing",
    "plan",
    "template",
    "project",
    "workspace",
    "filter",
    "view",
    "emoji_reaction",
    "mention",
    "attachment",
    "guest",
    "export",
    "import",
    "theme",
    "shortcut",
    "mobile_app",
    "desktop_app",
    "password",
    "two_factor",
    "sso",
    "session",
    "tour",
    "help_center",
    "changelog",
    "survey",
    "portfolio",
    "goal",
    "time_entry",
    "sprint",
    "backlog",
    "epic",
    "document",
    "wiki_page",
    "whiteboard",
    "chat_message",
    "status_update",
    "approval",
    "custom_field",
    "recurring_task",
)
_TAIL_VERBS = ("created", "updated", "deleted", "viewed", "opened", "closed", "shared", "toggled")


def event_type_catalog() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(named, tail)``: the named types, and a long tail filling up to 347 distinct types.

    Tail types are ``object_verb`` names (``comment_created``, ``sso_toggled``, ...), emitted
    with Zipf-like frequencies: a handful are common, most are rare, as in a real product.
    """
    named = list(NAMED_EVENT_TYPES)
    for f in CORE_FEATURES:
        for e in f.action_events:
            if e not in named:
                named.append(e)
    tail: list[str] = []
    for verb in _TAIL_VERBS:
        for obj in _TAIL_OBJECTS:
            name = f"{obj}_{verb}"
            if name not in named and name not in tail:
                tail.append(name)
    tail = tail[: N_EVENT_TYPES - len(named)]
    return tuple(named), tuple(tail)


# --- context effects on utility (utility units; 1.0 is a strong effect) -------------------
# Rows: role / plan / size bucket / industry; columns: CORE_FEATURES order.
#                 kan   task  file  auto  gantt dash  api   forms rep   time  integ team
ROLE_EFFECT = np.array(
    [
        [0.3, 0.5, 0.0, 0.5, 1.0, 0.5, -0.8, 0.0, 0.6, 0.8, 0.0, 0.4],  # project_manager
        [0.4, 0.4, 0.3, -0.2, -0.4, -0.6, -0.8, 0.0, -0.6, -0.3, -0.2, -0.6],  # team_member
        [0.4, 0.0, -0.1, 0.9, -0.3, -0.2, 1.6, -0.4, -0.3, -0.4, 1.0, -0.3],  # developer
        [0.5, -0.1, 0.8, -0.2, -0.5, -0.3, -0.8, 0.4, -0.6, 0.2, 0.0, -0.5],  # designer
        [0.2, 0.0, 0.3, 0.4, -0.2, 0.8, -0.6, 1.2, 0.3, 0.4, 0.3, -0.3],  # marketing_manager
        [-0.4, -0.3, 0.0, 0.0, 0.2, 1.3, -0.6, -0.3, 1.3, 0.3, -0.2, 0.5],  # executive
        [0.0, 0.3, 0.4, 0.8, 0.3, 0.3, -0.2, 0.7, 0.3, 0.0, 0.4, 0.2],  # operations
        [-0.2, -0.2, 0.2, 0.4, -0.3, 0.2, 0.6, 0.0, 0.2, -0.3, 1.0, 1.4],  # admin
    ],
    dtype=np.float64,
)
PLAN_EFFECT = np.array(
    [
        [0.2, 0.2, 0.1, -0.4, -0.3, -0.3, -0.6, 0.0, -0.6, -0.2, -0.3, -0.4],  # free
        [0.0, 0.0, 0.0, 0.2, 0.1, 0.1, -0.2, 0.1, -0.1, 0.1, 0.1, 0.0],  # pro
        [-0.1, 0.0, 0.0, 0.4, 0.3, 0.3, 0.3, 0.1, 0.4, 0.2, 0.3, 0.3],  # business
        [-0.2, -0.1, 0.0, 0.5, 0.4, 0.5, 0.6, 0.0, 0.7, 0.3, 0.5, 0.6],  # enterprise
    ],
    dtype=np.float64,
)
SIZE_EFFECT = np.array(
    [
        [0.3, 0.1, 0.1, -0.4, -0.5, -0.4, -0.2, 0.0, -0.5, -0.3, -0.2, -0.8],  # small
        [0.1, 0.1, 0.0, 0.1, 0.1, 0.0, 0.0, 0.1, 0.0, 0.1, 0.0, 0.0],  # medium
        [-0.1, 0.0, 0.0, 0.4, 0.4, 0.3, 0.2, 0.1, 0.4, 0.2, 0.3, 0.6],  # large
        [-0.3, -0.1, 0.1, 0.6, 0.5, 0.5, 0.5, 0.0, 0.7, 0.3, 0.5, 1.0],  # enterprise
    ],
    dtype=np.float64,
)
INDUSTRY_EFFECT = np.array(
    [
        [0.5, 0.1, -0.1, 0.4, -0.2, 0.0, 0.8, -0.3, -0.1, -0.2, 0.6, 0.0],  # software
        [0.3, 0.0, 0.6, 0.2, -0.1, 0.4, -0.4, 0.9, 0.1, 0.3, 0.1, -0.1],  # marketing_agency
        [-0.3, 0.3, 0.3, -0.1, 1.2, -0.1, -0.5, 0.3, 0.0, 0.8, -0.3, 0.0],  # construction
        [-0.2, 0.1, 0.1, 0.2, 0.0, 0.8, 0.1, 0.0, 1.0, -0.2, 0.1, 0.2],  # finance
        [-0.1, 0.4, 0.2, 0.0, 0.1, 0.1, -0.3, 0.8, 0.2, 0.0, -0.1, 0.1],  # healthcare
        [0.1, 0.2, 0.6, -0.2, -0.1, -0.1, -0.5, 0.8, -0.2, 0.3, -0.1, 0.0],  # education
        [0.0, 0.2, 0.2, 0.3, -0.1, 0.4, 0.0, 0.4, 0.3, 0.0, 0.3, 0.0],  # retail
        [0.1, 0.2, 0.3, 0.1, 0.5, 0.3, -0.2, 0.2, 0.4, 0.4, 0.0, 0.1],  # consulting
        [0.1, 0.1, 0.4, -0.3, -0.1, -0.1, -0.6, 0.6, -0.2, 0.1, -0.2, 0.0],  # nonprofit
        [-0.2, 0.3, 0.1, 0.3, 0.9, 0.2, 0.0, 0.0, 0.3, 0.4, 0.1, 0.1],  # manufacturing
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class Catalog:
    """The item space of one simulated world: the 12 core features plus generated sub-features.

    ``group[j]`` is the core feature (0..11) item ``j`` belongs to; core items are their own
    group. Sub-features (``--features N`` with N > 12) are named ``<core>__<word>_<k>`` and
    behave like their parent with their own utility offsets and latent factors.
    """

    names: tuple[str, ...]
    group: np.ndarray
    is_core: np.ndarray
    plans_mask: np.ndarray  # (K, n_plans) bool
    rollout: np.ndarray  # (K,) percentage
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.names)


_SUB_WORDS = (
    "templates",
    "bulk_edit",
    "filters",
    "export",
    "sharing",
    "history",
    "permissions",
    "views",
    "alerts",
    "comments",
    "labels",
    "search",
    "sync",
    "widgets",
    "schedules",
    "approvals",
)


def build_catalog(n_features: int) -> Catalog:
    """The first 12 items are the core features; the rest are sub-features spread over the
    core groups in proportion to a fixed weight (popular areas get more sub-features)."""
    if n_features < N_GROUPS:
        raise ValueError(
            f"--features must be at least {N_GROUPS} (the core CloudFlow features), got {n_features}"
        )
    names = list(CORE_NAMES)
    group = list(range(N_GROUPS))
    n_sub = n_features - N_GROUPS
    weights = np.array([4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 3, 1], dtype=np.float64)
    counts = np.floor(weights / weights.sum() * n_sub).astype(int)
    rest = n_sub - counts.sum()
    counts[np.argsort(-weights, kind="stable")[:rest]] += 1
    for g, c in enumerate(counts):
        for k in range(int(c)):
            word = _SUB_WORDS[k % len(_SUB_WORDS)]
            names.append(f"{CORE_NAMES[g]}__{word}_{k // len(_SUB_WORDS) + 1}")
            group.append(g)
    garr = np.array(group, dtype=np.int32)
    plan_idx = {p: i for i, p in enumerate(PLANS)}
    core_mask = np.zeros((N_GROUPS, len(PLANS)), dtype=bool)
    for g, f in enumerate(CORE_FEATURES):
        for p in f.plans:
            core_mask[g, plan_idx[p]] = True
    rollout = np.array([CORE_FEATURES[g].rollout_percentage for g in garr], dtype=np.float64)
    return Catalog(
        names=tuple(names),
        group=garr,
        is_core=np.arange(len(names)) < N_GROUPS,
        plans_mask=core_mask[garr],
        rollout=rollout,
    )
