"""Train/test splits for offline evaluation.

Global time split (default): pick a cut ``T`` (default: the latest event minus
``holdout_days``). The events up to ``T`` and the dimension tables are copied into an
in-memory DuckDB, where :func:`featurerec.warehouse.transforms.build_features` builds the
Stage 3 tables exactly as the pipeline would at ``as_of = T``; models train on those. The
test set is every (user, feature) whose first ``feature_used`` ever falls in
``(T, T + holdout_days]``; features the user used at any time before ``T`` are excluded from
the ranking and from the targets. Users are those known at ``T`` (a context row or history).

Leave-last-k (``--split last-k``): for data without a natural cut, each user with more than
``k`` features holds out the ``k`` most recently first-used ones; the model trains on the
rest (from the current ml.* tables).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from featurerec.errors import DataError
from featurerec.evaluation.offline import TestSet
from featurerec.models.base import TrainingData
from featurerec.models.common import ItemSpace
from featurerec.models.data import load_training_data
from featurerec.models.fit import last_k_split
from featurerec.warehouse.engine import DuckDBEngine

#: Raw tables copied into the in-memory warehouse (events are cut at T).
DIMENSION_TABLES = ("users", "workspaces", "feature_flags", "ab_assignments", "support_tickets")


@dataclass
class Split:
    train: TrainingData
    test: TestSet
    info: dict[str, Any]


def time_split(
    settings: Any,
    holdout_days: int = 7,
    cut: datetime | None = None,
    *,
    engine: Any = None,
) -> Split:
    """The global time split described in the module docstring.

    Without ``engine`` the warehouse file (``settings.warehouse_path``) is attached
    read-only to the in-memory database and copied with SQL (no detour through Python);
    with an open ``engine`` (tests, or a caller that holds the warehouse) tables are
    copied as Arrow.
    """
    from featurerec.warehouse.transforms import build_features

    if holdout_days <= 0:
        raise DataError(f"holdout_days must be > 0 (got {holdout_days})")
    # one thread: parallel float sums (recency scores) would make the features, and so
    # every seeded model, differ in the last bits from run to run
    mem = DuckDBEngine(":memory:", threads=1)
    try:
        if engine is None:
            path = Path(settings.warehouse_path)
            if not path.exists():
                raise DataError(f"warehouse {path} does not exist: run `featurerec ingest` first")
            quoted = str(path).replace("'", "''")
            mem.execute(f"ATTACH '{quoted}' AS wh (READ_ONLY)")
            src = mem
            prefix = "wh.main."
        else:
            src = engine
            prefix = ""
        if not src.query_rows(
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'events'"
            + (" AND table_catalog = 'wh'" if prefix else "")
        ):
            raise DataError("the warehouse has no events table: run `featurerec ingest` first")
        latest = _one(src, f"SELECT MAX(timestamp) AS v FROM {prefix}events")
        if latest is None:
            raise DataError("the warehouse has no events: run `featurerec ingest` first")
        t = cut or latest - timedelta(days=holdout_days)
        end = t + timedelta(days=holdout_days)
        n_before = _one(
            src,
            f"SELECT COUNT(*) AS v FROM {prefix}events "
            "WHERE event_type = 'feature_used' AND timestamp <= $t",
            {"t": t},
        )
        if not n_before:
            raise DataError(
                f"no feature_used events on or before the cut {t:%Y-%m-%d %H:%M}: "
                f"the warehouse spans too little time for a {holdout_days}-day holdout"
            )
        firsts = src.query_arrow(
            f"""
            SELECT user_id, feature_category AS feature, MIN(timestamp) AS first_use,
                   MIN(CASE WHEN is_first_use THEN timestamp END) AS flagged_first_use
            FROM {prefix}events
            WHERE event_type = 'feature_used' AND feature_category IS NOT NULL
              AND timestamp <= $end
            GROUP BY user_id, feature_category
            """,
            {"end": end},
        ).to_pylist()
        tables = [t_ for t_ in DIMENSION_TABLES if _has_table(src, t_, prefix)]
        if prefix:
            mem.execute(
                f"INSERT INTO events BY NAME SELECT * FROM {prefix}events WHERE timestamp <= $t",
                {"t": t},
            )
            for table in tables:
                mem.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {prefix}{table}")
            mem.execute("DETACH wh")
        else:
            events = engine.query_arrow("SELECT * FROM events WHERE timestamp <= $t", {"t": t})
            _copy_arrow(mem, "events", events)
            for table in tables:
                _copy_arrow(mem, table, engine.query_arrow(f"SELECT * FROM {table}"))
        build_features(mem, settings, t)
        train = load_training_data(mem, settings, t)
    finally:
        mem.close()
    space = ItemSpace(train.features)
    known = set(train.users) | set(train.contexts)
    # Sources that flag true first uses (is_first_use) define adoption by the flag: a
    # feature adopted before the data starts is not a new adoption when it shows up.
    flagged = any(r["flagged_first_use"] is not None for r in firsts)
    before: dict[str, set[int]] = {}
    after: dict[str, set[int]] = {}
    for r in firsts:
        j = space.index.get(r["feature"])
        u = r["user_id"]
        if j is None or u not in known:
            continue
        if r["first_use"] <= t:
            before.setdefault(u, set()).add(j)
        elif not flagged or (r["flagged_first_use"] is not None and r["flagged_first_use"] > t):
            after.setdefault(u, set()).add(j)
    user_ids = sorted(after)
    n, m = len(user_ids), len(space)
    targets = np.zeros((n, m), dtype=bool)
    exclude = np.zeros((n, m), dtype=bool)
    for i, u in enumerate(user_ids):
        targets[i, list(after[u])] = True
        if u in before:
            exclude[i, list(before[u])] = True
    states = train.user_states(user_ids)
    # the training window's features are excluded too (they are in the user's state)
    for i, s in enumerate(states):
        for f in s.interactions:
            j = space.index.get(f)
            if j is not None:
                exclude[i, j] = True
    test = TestSet(states, targets, exclude, train.features)
    info = {
        "split": "time",
        "cut": t.isoformat(),
        "holdout_days": holdout_days,
        "test_end": end.isoformat(),
        "train_users": len(train.users),
        "features": len(train.features),
        "test_users": len(test),
        "test_adoptions": int(test.targets.sum()),
        "adoption_label": "is_first_use" if flagged else "first event",
    }
    return Split(train, test, info)


def _one(src: Any, sql: str, params: dict[str, Any] | None = None) -> Any:
    """First column of the first row (query_rows fetches everything, so the connection is
    left with no pending result)."""
    rows = src.query_rows(sql, params)
    return next(iter(rows[0].values())) if rows else None


def _has_table(src: Any, table: str, prefix: str) -> bool:
    sql = "SELECT 1 FROM information_schema.tables WHERE table_schema = 'main' AND table_name = $t"
    if prefix:
        sql += " AND table_catalog = 'wh'"
    return bool(src.query_rows(sql, {"t": table}))


def _copy_arrow(mem: DuckDBEngine, table: str, data: Any) -> None:
    mem.register_arrow("_copy", data)
    try:
        mem.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _copy")
    finally:
        mem.unregister("_copy")


def last_k(engine: Any, settings: Any, k: int = 1) -> Split:
    """The leave-last-k split on the current ml.* tables."""
    data = load_training_data(engine, settings)
    sp_ = last_k_split(data, k)
    if sp_ is None:
        raise DataError(
            f"leave-last-{k}: no user has more than {k} features (or first_used is missing)"
        )
    rows = sp_.eval_rows
    user_ids = [data.users[i] for i in rows]
    states = sp_.pre.user_states(user_ids)
    exclude = np.asarray(sp_.pre.matrix[rows].toarray() > 0)
    test = TestSet(states, sp_.targets[rows], exclude, data.features)
    info = {
        "split": "last-k",
        "k": k,
        "train_users": len(data.users),
        "features": len(data.features),
        "test_users": len(test),
        "test_adoptions": int(test.targets.sum()),
    }
    return Split(sp_.pre, test, info)
