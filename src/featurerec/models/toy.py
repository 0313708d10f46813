"""A small synthetic :class:`TrainingData` with real structure, for tests, doctests and the
model benchmark (no warehouse needed).

Users belong to latent taste groups tied to their role; each group prefers a few features,
transitions follow the group's preferred order, and a feature's adoption time is drawn so
that a validation split has something to predict. Deterministic for a given seed.
This is not the CloudFlow simulator (``featurerec.simulate``); evaluation on simulated
worlds uses that.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from featurerec.models.base import TrainingData, UserContext, team_size_bucket
from featurerec.warehouse.engine import DuckDBEngine

ROLES = ("engineer", "project_manager", "designer", "marketer", "executive")
PLANS = ("free", "pro", "business", "enterprise")
INDUSTRIES = ("software", "agency", "finance", "education")


def toy_training_data(
    n_users: int = 300,
    n_features: int = 10,
    seed: int = 0,
    as_of_day: float = 20_000.0,
    cold_share: float = 0.2,
) -> TrainingData:
    """``n_users`` users x ``n_features`` features with group structure.

    ``first_used`` holds epoch days (the last 7 days before ``as_of_day`` contain recent
    adoptions), so :func:`featurerec.models.fit.validation_split` works on it.
    """
    rng = np.random.default_rng(seed)
    features = [f"feature_{i:02d}" for i in range(n_features)]
    users = [f"u{i:06d}" for i in range(n_users)]
    n_groups = len(ROLES)
    pref = rng.dirichlet(np.full(n_features, 0.4), size=n_groups)  # group x item
    base_pop = np.linspace(1.5, 0.2, n_features)
    role_idx = rng.integers(0, n_groups, n_users)
    # stay in the group's role most of the time
    noisy = rng.random(n_users) < 0.15
    role_idx = np.where(noisy, rng.integers(0, n_groups, n_users), role_idx)
    group = role_idx
    n_adopt = rng.integers(1, max(2, min(n_features, 6)), n_users)
    cold = rng.random(n_users) < cold_share
    n_adopt = np.where(cold, rng.integers(0, 2, n_users), n_adopt)
    rows, cols, vals, firsts = [], [], [], []
    for u in range(n_users):
        p = pref[group[u]] * base_pop
        p = p / p.sum()
        k = int(min(n_adopt[u], n_features))
        if k == 0:
            continue
        items = rng.choice(n_features, size=k, replace=False, p=p)
        days_ago = np.sort(rng.uniform(0, 90, size=k))[::-1]
        for it, d in zip(items, days_ago, strict=True):
            rows.append(u)
            cols.append(int(it))
            vals.append(round(float(rng.uniform(0.05, 1.0)), 3))
            firsts.append(as_of_day - float(d))
    matrix = sp.csr_matrix(
        (np.asarray(vals, np.float32), (rows, cols)), shape=(n_users, n_features)
    )
    first_used = sp.csr_matrix(
        (np.asarray(firsts, np.float64), (rows, cols)), shape=(n_users, n_features)
    )
    contexts = {}
    counts = {}
    recent = {}
    for u in range(n_users):
        seats = int(rng.choice([3, 12, 60, 400]))
        contexts[users[u]] = UserContext(
            role=ROLES[role_idx[u]],
            plan=PLANS[int(rng.integers(0, len(PLANS)))],
            seat_count=seats,
            team_size_bucket=team_size_bucket(seats),
            industry=INDUSTRIES[int(rng.integers(0, len(INDUSTRIES)))],
            account_age_days=int(rng.integers(0, 400)),
        )
        start, end = matrix.indptr[u], matrix.indptr[u + 1]
        order = np.argsort(first_used.data[start:end])
        recent[users[u]] = tuple(features[j] for j in matrix.indices[start:end][order])
        counts[users[u]] = int(rng.integers(0, 5)) if cold[u] else int(rng.integers(5, 120))
    transitions: dict[tuple[str, str], float] = {}
    for g in range(n_groups):
        order = np.argsort(-pref[g])
        for a, b in itertools.pairwise(order):
            key = (features[a], features[b])
            transitions[key] = transitions.get(key, 0.0) + 1.0
    out_sum: dict[str, float] = {}
    for (a, _), c in transitions.items():
        out_sum[a] = out_sum.get(a, 0.0) + c
    transitions = {(a, b): round(c / out_sum[a], 3) for (a, b), c in transitions.items()}
    return TrainingData(
        users=users,
        features=features,
        matrix=matrix,
        contexts=contexts,
        transitions=transitions,
        recent=recent,
        event_counts=counts,
        as_of=str(as_of_day),
        first_used=first_used,
    )


WH_FEATURES = [f"f{i}" for i in range(12)]
WH_ROLES = ["engineer", "manager", "designer"]
# each role walks through the features in its own fixed order
WH_ORDER = {
    r: [WH_FEATURES[j] for j in np.random.default_rng(i).permutation(len(WH_FEATURES))]
    for i, r in enumerate(WH_ROLES)
}
WH_START = datetime(2026, 1, 1)


def toy_warehouse(
    n_users: int = 120, days: int = 60, seed: int = 0, path: str = ":memory:"
) -> DuckDBEngine:
    """An in-memory warehouse whose users adopt features in their role's fixed order, one
    every 5-14 days, and keep using their last three in sessions (for evaluation tests)."""
    rng = np.random.default_rng(seed)
    db = DuckDBEngine(path)
    ev: dict[str, list[Any]] = {
        c: []
        for c in (
            "event_id",
            "user_id",
            "workspace_id",
            "event_type",
            "timestamp",
            "feature_category",
            "session_id",
            "session_sequence",
        )
    }
    users: list[tuple[str, str, str, Any]] = []
    workspaces = []
    n = 0
    for u in range(n_users):
        uid = f"u{u:04d}"
        role = WH_ROLES[u % len(WH_ROLES)]
        ws = f"w{u % 10}"
        signup = WH_START + timedelta(days=int(rng.integers(0, 20)))
        users.append((uid, ws, role, signup.date()))
        t = signup
        seq = WH_ORDER[role]
        adopted: list[str] = []
        gap = float(rng.uniform(5, 14))
        next_adopt = t
        while t < WH_START + timedelta(days=days):
            if t >= next_adopt and len(adopted) < len(seq):
                adopted.append(seq[len(adopted)])
                next_adopt = t + timedelta(days=gap)
            sess = f"s{uid}_{t:%j%H}"
            for i, f in enumerate(adopted[-3:]):
                n += 1
                ev["event_id"].append(f"e{n}")
                ev["user_id"].append(uid)
                ev["workspace_id"].append(ws)
                ev["event_type"].append("feature_used")
                ev["timestamp"].append(t + timedelta(minutes=i))
                ev["feature_category"].append(f)
                ev["session_id"].append(sess)
                ev["session_sequence"].append(i)
            t += timedelta(days=float(rng.uniform(0.5, 2.0)))
    for w in range(10):
        workspaces.append(
            (f"w{w}", ["free", "pro"][w % 2], ["software", "finance"][w % 2], [3, 40][w % 2])
        )
    tbl = pa.table(ev)
    db.register_arrow("_ev", tbl)
    db.execute("INSERT INTO events BY NAME SELECT * FROM _ev")
    db.unregister("_ev")
    for uid, ws, role, signup_day in users:
        db.execute(
            "INSERT INTO users (user_id, workspace_id, role, signup_date) VALUES ($u, $w, $r, $s)",
            {"u": uid, "w": ws, "r": role, "s": signup_day},
        )
    for wid, plan, ind, seats in workspaces:
        db.execute(
            "INSERT INTO workspaces (workspace_id, plan, industry, seat_count) VALUES ($w, $p, $i, $s)",
            {"w": wid, "p": plan, "i": ind, "s": seats},
        )
    return db
