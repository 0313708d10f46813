"""Small, seeded fixture warehouses for serving tests (not the simulator).

:func:`fill_fixture_warehouse` writes users, workspaces, feature flags, ``feature_used``
events and the two ``ml`` tables serving reads (interactions, transitions) into a DuckDB
engine, with plain random draws. It exists so the serving tests do not depend on the
simulator or the pipeline; behaviour realism is the simulator's job.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from featurerec.events.schema import EVENT_ARROW_SCHEMA

FIXTURE_FEATURES = (
    "kanban_boards",
    "task_management",
    "file_sharing",
    "automations",
    "gantt_charts",
    "custom_dashboards",
    "api_access",
    "forms",
    "advanced_reports",
    "timelines",
)
FIXTURE_ROLES = ("project_manager", "engineer", "designer", "executive")
FIXTURE_PLANS = ("free", "pro", "business", "enterprise")
FIXTURE_AS_OF = datetime(2026, 2, 28, 12, 0, 0)


def fill_fixture_warehouse(
    engine: Any,
    *,
    n_users: int = 300,
    seed: int = 0,
    as_of: datetime = FIXTURE_AS_OF,
    flags: list[dict[str, Any]] | None = None,
) -> dict[str, int]:
    """Populate ``engine`` (schema already created); returns row counts."""
    rng = np.random.default_rng(seed)
    n_ws = max(n_users // 10, 1)
    ws_ids = [f"ws_{i:05d}" for i in range(n_ws)]
    seats = rng.choice([3, 12, 60, 400], size=n_ws, p=[0.4, 0.35, 0.2, 0.05])
    plans = rng.choice(FIXTURE_PLANS, size=n_ws)
    engine.register_arrow(
        "_ws",
        pa.table(
            {
                "workspace_id": ws_ids,
                "plan": plans.tolist(),
                "industry": rng.choice(["tech", "retail", "health"], size=n_ws).tolist(),
                "seat_count": seats.astype(np.int32),
            }
        ),
    )
    engine.execute(
        "INSERT INTO workspaces (workspace_id, plan, industry, seat_count) "
        "SELECT workspace_id, plan, industry, seat_count FROM _ws"
    )
    user_ids = [f"usr_{i:06d}" for i in range(n_users)]
    user_ws = rng.integers(0, n_ws, size=n_users)
    roles = rng.choice(FIXTURE_ROLES, size=n_users, p=[0.4, 0.3, 0.2, 0.1])
    signup = [as_of.date() - timedelta(days=int(d)) for d in rng.integers(1, 400, size=n_users)]
    engine.register_arrow(
        "_users",
        pa.table(
            {
                "user_id": user_ids,
                "workspace_id": [ws_ids[i] for i in user_ws],
                "role": roles.tolist(),
                "signup_date": signup,
            }
        ),
    )
    engine.execute(
        "INSERT INTO users (user_id, workspace_id, role, signup_date) "
        "SELECT user_id, workspace_id, role, signup_date FROM _users"
    )
    # Feature popularity falls off like the spec's table; each user uses a few features.
    pop = np.array([0.52, 0.48, 0.31, 0.08, 0.06, 0.05, 0.03, 0.03, 0.04, 0.02])
    rows: dict[str, list[Any]] = {name: [] for name in EVENT_ARROW_SCHEMA.names}
    eid = 0
    for u in range(n_users):
        n_events = int(rng.integers(0, 40))
        if n_events == 0:
            continue
        used = np.flatnonzero(rng.random(len(pop)) < np.clip(pop * 2, 0, 0.95))
        if len(used) == 0:
            used = np.array([int(rng.integers(0, len(pop)))])
        session = 0
        for e in range(n_events):
            if e % 5 == 0:
                session += 1
            f = FIXTURE_FEATURES[int(rng.choice(used))]
            ts = as_of - timedelta(minutes=int(rng.integers(1, 60 * 24 * 60)))
            eid += 1
            rows["event_id"].append(f"evt_{eid:08d}")
            rows["user_id"].append(user_ids[u])
            rows["workspace_id"].append(ws_ids[user_ws[u]])
            rows["event_type"].append("feature_used")
            rows["timestamp"].append(ts)
            rows["feature_category"].append(f)
            rows["feature_name"].append(None)
            rows["context"].append(None)
            rows["session_id"].append(f"sess_{u}_{session}")
            rows["session_sequence"].append(e)
            rows["time_on_page_seconds"].append(None)
            rows["is_first_use"].append(None)
            rows["properties"].append(None)
            rows["user_traits"].append(None)
    events = pa.table(rows, schema=EVENT_ARROW_SCHEMA)
    engine.register_arrow("_events", events)
    engine.execute(
        f"INSERT INTO events ({', '.join(EVENT_ARROW_SCHEMA.names)}) "
        f"SELECT {', '.join(EVENT_ARROW_SCHEMA.names)} FROM _events"
    )
    engine.execute(
        """
        CREATE OR REPLACE TABLE ml.user_feature_interactions AS
        SELECT user_id, feature_category AS feature, COUNT(*) AS use_count,
               ROUND(LEAST(COUNT(*) / 20.0, 1.0), 3) AS interaction_strength
        FROM events WHERE event_type = 'feature_used' AND timestamp <= $as_of
        GROUP BY 1, 2
        """,
        {"as_of": as_of},
    )
    engine.execute(
        """
        CREATE OR REPLACE TABLE ml.feature_transition_probs AS
        WITH seq AS (
            SELECT user_id, feature_category AS feature,
                   LEAD(feature_category) OVER (
                       PARTITION BY user_id, session_id ORDER BY timestamp, event_id) AS nxt
            FROM events WHERE event_type = 'feature_used'),
        pairs AS (
            SELECT feature AS from_feature, nxt AS to_feature, COUNT(*) AS transition_count,
                   COUNT(DISTINCT user_id) AS unique_users
            FROM seq WHERE nxt IS NOT NULL AND nxt <> feature GROUP BY 1, 2)
        SELECT *, SUM(transition_count) OVER (PARTITION BY from_feature) AS from_total,
               ROUND(transition_count * 1.0
                     / SUM(transition_count) OVER (PARTITION BY from_feature), 3)
                   AS transition_prob
        FROM pairs WHERE transition_count >= 3
        """
    )
    for flag in flags or [
        {"flag_id": "ff_dash", "name": "custom_dashboards", "enabled": True,
         "rollout_percentage": 80.0, "target_segments": None, "plans": None},
        {"flag_id": "ff_reports", "name": "advanced_reports", "enabled": True,
         "rollout_percentage": 60.0, "target_segments": None,
         "plans": '["business", "enterprise"]'},
        {"flag_id": "ff_timelines", "name": "timelines", "enabled": True,
         "rollout_percentage": 100.0, "target_segments": '["project_manager", "executive"]',
         "plans": None},
    ]:  # fmt: skip
        engine.execute(
            "INSERT INTO feature_flags (flag_id, name, enabled, rollout_percentage, "
            "target_segments, plans) VALUES ($flag_id, $name, $enabled, $rollout_percentage, "
            "$target_segments, $plans)",
            flag,
        )
    for t in ("_ws", "_users", "_events"):
        engine.unregister(t)
    return {"users": n_users, "workspaces": n_ws, "events": events.num_rows}


def training_data_from_snapshot(snap: Any) -> Any:
    """A :class:`TrainingData` from a snapshot's arrays (for tests and the benchmark fixture;
    the pipeline trains from the ml.* tables instead)."""
    import scipy.sparse as sp

    from featurerec.models.base import TEAM_SIZE_BUCKETS, TrainingData, UserContext

    users = snap.user_ids.tolist()
    matrix = sp.csr_matrix(np.where(snap.adopted, np.maximum(snap.strength, 0.01), 0.0))
    matrix = matrix.astype(np.float32)
    contexts = {}
    for i, u in enumerate(users):
        rc, pc, ic = int(snap.role_codes[i]), int(snap.plan_codes[i]), int(snap.industry_codes[i])
        seats = int(snap.seat_count[i])
        contexts[u] = UserContext(
            role=snap.roles[rc] if rc >= 0 else None,
            plan=snap.plans[pc] if pc >= 0 else None,
            seat_count=None if seats < 0 else seats,
            team_size_bucket=TEAM_SIZE_BUCKETS[int(snap.bucket_codes[i])],
            industry=snap.industries[ic] if ic >= 0 else None,
            account_age_days=int(snap.account_age_days[i]),
        )
    recent = {
        u: tuple(snap.features[j] for j in snap.recent[i].tolist() if j >= 0)
        for i, u in enumerate(users)
    }
    return TrainingData(
        users=users,
        features=list(snap.features),
        matrix=matrix,
        contexts=contexts,
        transitions={(t.from_feature, t.to_feature): t.probability for t in snap.transitions},
        recent=recent,
        event_counts={u: int(c) for u, c in zip(users, snap.event_count.tolist(), strict=True)},
        as_of=snap.as_of.isoformat(),
    )


def train_fixture_bundle(snap: Any, seed: int = 0) -> Any:
    """A small real bundle (ALS with few factors, every strategy) trained on ``snap``."""
    from featurerec.models.als import ALSParams
    from featurerec.models.fit import TrainConfig, train_bundle

    params = ALSParams(factors=8, iterations=5)
    bundle, _ = train_bundle(
        training_data_from_snapshot(snap),
        TrainConfig(als_params=params, als_grid=(params,), seed=seed),
    )
    return bundle


def publish_bundle(registry: Any, bundle: Any, root: Any) -> dict[str, str]:
    """Save ``bundle`` under ``root`` and register + promote its three artifacts under the
    default deployment's names; returns name -> uri."""
    from pathlib import Path

    root = Path(root)
    bundle.save(root)
    out = {}
    for name, sub, kind in (
        ("feature-recommender-mf", "mf", "models"),
        ("feature-recommender-hnsw", "index", "indexes"),
        ("feature-recommender-bandit", "ranker", "models"),
    ):
        if not (root / sub).exists():
            continue
        mv = registry.register(name, root / sub, kind=kind)
        registry.promote(name, mv.version, criteria=None, force=True, kind=kind, reason="test")
        out[name] = mv.uri
    return out


def publish_fixture_world(engine: Any, settings: Any, work_dir: Any, *, seed: int = 0) -> Any:
    """From a filled fixture warehouse: export the online-state snapshot (the pipeline's
    ``export_serving_state`` stage), register it, train a small bundle on it and publish
    that as production, so ``ServingRuntime.from_settings(settings)`` serves. Returns the
    snapshot."""
    from pathlib import Path

    from featurerec.pipeline.contracts import STAGE_FUNCTIONS, StageContext
    from featurerec.registry import registry_for
    from featurerec.serving.snapshot import OnlineSnapshot

    work = Path(work_dir)
    (work / "stage").mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        settings=settings,
        engine=engine,
        registry=None,
        as_of=FIXTURE_AS_OF,
        params={},
        stage={"name": "export_serving_state"},
        work_dir=work / "stage",
    )
    result = STAGE_FUNCTIONS["export_serving_state"](ctx)
    if result.artifact_dir is None:
        raise RuntimeError("export_serving_state wrote no snapshot")
    reg = registry_for(settings)
    reg.register("feature-recommender-online", result.artifact_dir, kind="state")
    snap = OnlineSnapshot.load(result.artifact_dir)
    publish_bundle(reg, train_fixture_bundle(snap, seed=seed), work / "bundle")
    return snap
