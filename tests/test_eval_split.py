"""Offline evaluation end to end on a tiny hand-built warehouse (time and last-k splits)."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.evaluation.runner import run_evaluation
from featurerec.evaluation.split import last_k, time_split
from featurerec.models.als import ALSParams
from featurerec.models.fit import TrainConfig
from featurerec.warehouse.engine import DuckDBEngine

FEATURES = [f"f{i}" for i in range(12)]
ROLES = ["engineer", "manager", "designer"]
# each role walks through the features in its own fixed order
ORDER = {
    r: [FEATURES[j] for j in np.random.default_rng(i).permutation(len(FEATURES))]
    for i, r in enumerate(ROLES)
}
START = datetime(2026, 1, 1)


def build_warehouse(n_users: int = 120, days: int = 60, seed: int = 0) -> DuckDBEngine:
    """Users adopt features in their role's order, one every few days, and keep using them."""
    rng = np.random.default_rng(seed)
    db = DuckDBEngine(":memory:")
    ev: dict[str, list] = {
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
    users, workspaces = [], []
    n = 0
    for u in range(n_users):
        uid = f"u{u:04d}"
        role = ROLES[u % len(ROLES)]
        ws = f"w{u % 10}"
        signup = START + timedelta(days=int(rng.integers(0, 20)))
        users.append((uid, ws, role, signup.date()))
        t = signup
        seq = ORDER[role]
        adopted: list[str] = []
        gap = float(rng.uniform(5, 14))
        next_adopt = t
        while t < START + timedelta(days=days):
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
    for uid, ws, role, signup in users:
        db.execute(
            "INSERT INTO users (user_id, workspace_id, role, signup_date) VALUES ($u, $w, $r, $s)",
            {"u": uid, "w": ws, "r": role, "s": signup},
        )
    for wid, plan, ind, seats in workspaces:
        db.execute(
            "INSERT INTO workspaces (workspace_id, plan, industry, seat_count) VALUES ($w, $p, $i, $s)",
            {"w": wid, "p": plan, "i": ind, "s": seats},
        )
    return db


SETTINGS = Settings.model_validate({"windows": {"min_transition_count": 1}})
FAST = TrainConfig(als_grid=(ALSParams(8, 0.1, 5, 10.0), ALSParams(4, 1.0, 5, 40.0)))


@pytest.fixture(scope="module")
def warehouse() -> DuckDBEngine:
    return build_warehouse()


def test_time_split_holds_out_first_uses_after_the_cut(warehouse: DuckDBEngine) -> None:
    sp = time_split(SETTINGS, 7, engine=warehouse)
    cut = datetime.fromisoformat(sp.info["cut"])
    assert sp.info["test_users"] > 0
    # targets are never features used before the cut, and never excluded
    assert not (sp.test.targets & sp.test.exclude).any()
    space = {f: i for i, f in enumerate(sp.test.features)}
    firsts = warehouse.query_rows(
        "SELECT user_id, feature_category f, MIN(timestamp) t FROM events GROUP BY 1, 2"
    )
    first = {(r["user_id"], r["f"]): r["t"] for r in firsts}
    for i, u in enumerate(sp.test.users):
        for j in np.nonzero(sp.test.targets[i])[0]:
            t = first[(u.user_id, sp.test.features[j])]
            assert cut < t <= cut + timedelta(days=7)
        # training state never contains events after the cut
        for f in u.interactions:
            assert first[(u.user_id, f)] <= cut
            assert sp.test.exclude[i, space[f]]


def test_time_split_rejects_a_window_without_history(warehouse: DuckDBEngine) -> None:
    with pytest.raises(DataError, match="no feature_used events on or before the cut"):
        time_split(SETTINGS, 400, engine=warehouse)
    with pytest.raises(DataError, match="holdout_days must be > 0"):
        time_split(SETTINGS, 0, engine=warehouse)


def test_evaluation_end_to_end_beats_random(warehouse: DuckDBEngine) -> None:
    res = run_evaluation(SETTINGS, split="time", holdout_days=7, engine=warehouse, config=FAST)
    rows = res.rows
    assert {"hybrid", "sequence_aware", "popularity", "random"} <= set(rows)
    for row in rows.values():
        assert 0 <= row["ndcg@5"] <= 1 and 0 <= row["hit_rate@3"] <= 1
        assert row["users"] == res.info["test_users"]
    # the world is strongly sequential: the sequence-aware strategy must beat random
    for name in ("sequence_aware", "hybrid", "content_based"):
        assert rows[name]["ndcg@5"] > rows["random"]["ndcg@5"] + 0.2, name


def test_last_k_split(warehouse: DuckDBEngine) -> None:
    from featurerec.warehouse.transforms import build_features

    build_features(warehouse, SETTINGS)
    sp = last_k(warehouse, SETTINGS, 1)
    assert (sp.test.targets.sum(axis=1) == 1).all()
    assert not (sp.test.targets & sp.test.exclude).any()
    with pytest.raises(DataError, match="leave-last-50"):
        last_k(warehouse, SETTINGS, 50)
