"""Stage 3 transforms pinned on a tiny hand-built warehouse (expected numbers worked by hand).

as_of = 2026-03-01 12:00. Windows: interactions 90 days (from 2025-12-01 00:00), transitions
30 days (from 2026-01-30 00:00), context activity 7 days (from 2026-02-22 00:00).
"""

from __future__ import annotations

from datetime import date, datetime

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import sqlglot

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.schema import EVENT_ARROW_SCHEMA
from featurerec.warehouse.engine import DuckDBEngine, load_sql
from featurerec.warehouse.transforms import (
    TRANSFORMS,
    build_features,
    compute_user_neighbors,
    jaccard_top_k,
    latest_event_time,
    parse_as_of,
    run_sql_transform,
    sql_params,
)

AS_OF = datetime(2026, 3, 1, 12, 0)

# (event_id, user, workspace, type, timestamp, feature, session, seq)
EVENTS = [
    ("e1", "u1", "w1", "feature_used", "2026-03-01 10:00", "kanban", "s1", 1),
    ("e2", "u1", "w1", "feature_used", "2026-03-01 10:05", "kanban", "s1", 2),
    ("e3", "u1", "w1", "feature_used", "2026-03-01 10:10", "automations", "s1", 3),
    ("e4", "u1", "w1", "feature_used", "2026-03-01 10:15", "kanban", "s1", 4),
    ("e5", "u1", "w1", "feature_used", "2026-03-01 10:20", "forms", "s1", 5),
    ("e6", "u1", "w1", "feature_used", "2026-02-28 09:00", "kanban", "s7", 1),
    ("e7", "u1", "w1", "feature_used", "2026-03-01 13:00", "kanban", "s1", 6),  # after as_of
    ("e8", "u1", "w1", "feature_used", "2025-11-30 23:59", "kanban", "s0", 1),  # before window
    ("e9", "u1", "w1", "page_viewed", "2026-02-25 08:00", None, "s8", 1),
    ("e10", "u2", "w2", "feature_used", "2026-02-27 11:00", "kanban", "s2", 1),
    ("e11", "u2", "w2", "feature_used", "2026-02-27 11:01", "automations", "s2", 2),
    ("e12", "u2", "w2", "feature_used", "2026-02-20 09:00", "forms", "s3", 1),
    ("e13", "u2", "w2", "feature_used", "2026-02-20 09:02", "forms", "s3", 2),
    ("e14", "u2", "w2", "feature_used", "2025-12-01 00:00", "gantt", "s4", 1),  # window edge
    ("e15", "u3", "w3", "feature_used", "2026-02-27 14:00", "kanban", "s5", 1),
    ("e16", "u3", "w3", "feature_used", "2026-02-27 14:03", "forms", "s5", 2),
    ("e17", "u4", "w4", "feature_used", "2026-02-27 15:00", "kanban", "s6", 1),
    ("e18", "u4", "w4", "feature_used", "2026-02-27 15:04", "gantt", "s6", 2),
    # u5 reuses session id "s1": must not mix with u1's s1
    ("e19", "u5", "wX", "feature_used", "2026-02-27 16:00", "automations", "s1", 1),
    ("e20", "u5", "wX", "feature_used", "2026-02-27 16:01", "forms", "s1", 2),
    # u6: outside the 30-day transition window, inside the 90-day interaction window
    ("e21", "u6", "w1", "feature_used", "2026-01-15 10:00", "kanban", "s9", 1),
    ("e22", "u6", "w1", "feature_used", "2026-01-15 10:05", "automations", "s9", 2),
]


def _ts(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%d %H:%M")


def _events_table(rows: list[tuple]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in EVENT_ARROW_SCHEMA.names}
    for eid, user, ws, etype, ts, feat, sess, seq in rows:
        for name in EVENT_ARROW_SCHEMA.names:
            cols[name].append(None)
        cols["event_id"][-1] = eid
        cols["user_id"][-1] = user
        cols["workspace_id"][-1] = ws
        cols["event_type"][-1] = etype
        cols["timestamp"][-1] = _ts(ts)
        cols["feature_category"][-1] = feat
        cols["session_id"][-1] = sess
        cols["session_sequence"][-1] = seq
    return pa.Table.from_pydict(cols, schema=EVENT_ARROW_SCHEMA)


def load_events(db: DuckDBEngine, rows: list[tuple]) -> None:
    db.register_arrow("_ev", _events_table(rows))
    db.execute("INSERT INTO events BY NAME SELECT * FROM _ev")
    db.unregister("_ev")


def load_people(db: DuckDBEngine) -> None:
    db.execute(
        """INSERT INTO users (user_id, workspace_id, role, signup_date) VALUES
        ('u1', 'w1', 'project_manager', DATE '2026-01-01'),
        ('u2', 'w2', 'engineer', DATE '2025-12-01'),
        ('u3', 'w3', 'designer', DATE '2026-02-28'),
        ('u4', 'w4', 'admin', NULL),
        ('u5', 'wX', 'project_manager', DATE '2026-03-01'),
        ('u7', 'w1', 'engineer', DATE '2025-06-01'),
        ('u8', 'w1', 'engineer', DATE '2026-03-05')"""
    )
    db.execute(
        """INSERT INTO workspaces (workspace_id, plan, industry, seat_count) VALUES
        ('w1', 'business', 'tech', 5), ('w2', 'enterprise', 'finance', 21),
        ('w3', 'pro', 'health', 101), ('w4', 'free', 'retail', NULL)"""
    )
    db.execute(
        """INSERT INTO support_tickets (ticket_id, user_id, created_at, updated_at, status, feature)
        VALUES
        ('t1', 'u1', TIMESTAMP '2026-02-20 10:00', NULL, 'open', 'automations'),
        ('t2', 'u1', TIMESTAMP '2026-02-20 10:00', TIMESTAMP '2026-02-25 10:00', 'solved', 'forms'),
        ('t3', 'u1', TIMESTAMP '2026-02-27 10:00', TIMESTAMP '2026-03-02 10:00', 'solved', 'gantt'),
        ('t4', 'u1', TIMESTAMP '2026-02-20 10:00', NULL, 'open', NULL),
        ('t5', 'u1', TIMESTAMP '2026-03-03 10:00', NULL, 'open', 'kanban'),
        ('t6', 'u2', TIMESTAMP '2026-01-20 10:00', TIMESTAMP '2026-02-01 10:00', 'Closed', 'kanban'),
        ('t7', 'u2', TIMESTAMP '2026-02-10 10:00', NULL, 'pending', 'kanban')"""
    )


@pytest.fixture
def db():
    engine = DuckDBEngine(":memory:")
    load_events(engine, EVENTS)
    load_people(engine)
    yield engine
    engine.close()


def _settings(**windows) -> Settings:
    return Settings.model_validate({"windows": windows})


def _rows(db: DuckDBEngine, sql: str) -> list[dict]:
    return db.query_rows(sql)


# -- interactions ---------------------------------------------------------------------------
def test_interactions_match_hand_computed_values(db):
    n = run_sql_transform(db, "interaction_matrix_v2.sql", _settings(), AS_OF)
    assert n == 15  # u1 3, u2 4, u3 2, u4 2, u5 2, u6 2
    rows = {
        (r["user_id"], r["feature"]): r
        for r in _rows(db, "SELECT * FROM ml.user_feature_interactions")
    }
    k1 = rows[("u1", "kanban")]
    # e1 e2 e4 on the as-of date (weight 1 each), e6 the day before (1/2); e7 after as_of
    # and e8 before the window are out.
    assert k1["use_count"] == 4
    assert k1["active_days"] == 2
    assert k1["recency_weighted_score"] == pytest.approx(3.5)
    assert k1["first_used"] == datetime(2026, 2, 28, 9, 0)
    assert k1["last_used"] == datetime(2026, 3, 1, 10, 15)
    # 0.4*4/100 + 0.3*2/30 + 0.3*3.5/10 = 0.016 + 0.02 + 0.105
    assert k1["interaction_strength"] == pytest.approx(0.141)
    assert rows[("u1", "automations")]["interaction_strength"] == pytest.approx(0.044)
    # two events 9 days before as_of on one day: 0.008 + 0.01 + 0.3*0.2/10
    f2 = rows[("u2", "forms")]
    assert (f2["use_count"], f2["active_days"]) == (2, 1)
    assert f2["recency_weighted_score"] == pytest.approx(0.2)
    assert f2["interaction_strength"] == pytest.approx(0.024)
    # exactly at the window start (2025-12-01 00:00, 90 days before): included, weight 1/91
    g2 = rows[("u2", "gantt")]
    assert g2["recency_weighted_score"] == pytest.approx(1 / 91)
    assert g2["interaction_strength"] == pytest.approx(0.014)
    # 45 days before as_of
    assert rows[("u6", "kanban")]["recency_weighted_score"] == pytest.approx(1 / 46)
    assert ("u1", None) not in rows  # page_viewed has no feature


def test_interaction_window_length_is_configurable(db):
    # 30-day window starts 2026-01-30: u6 (Jan 15) and u2's gantt (Dec 1) drop out
    n = run_sql_transform(db, "interaction_matrix_v2.sql", _settings(interaction_days=30), AS_OF)
    assert n == 12
    users = {r["user_id"] for r in _rows(db, "SELECT user_id FROM ml.user_feature_interactions")}
    assert "u6" not in users


def test_as_of_in_the_past_never_sees_later_events(db):
    run_sql_transform(db, "interaction_matrix_v2.sql", _settings(), datetime(2026, 2, 27, 11, 0))
    rows = _rows(db, "SELECT user_id, feature, use_count FROM ml.user_feature_interactions")
    got = {(r["user_id"], r["feature"]): r["use_count"] for r in rows}
    # window now starts 2025-11-29, so e8 (2025-11-30) is in; of the rest only e10 (11:00
    # exactly), e12, e13, e14, e21, e22 are at or before 2026-02-27 11:00
    assert got == {
        ("u1", "kanban"): 1,
        ("u2", "kanban"): 1,
        ("u2", "forms"): 2,
        ("u2", "gantt"): 1,
        ("u6", "kanban"): 1,
        ("u6", "automations"): 1,
    }


def test_empty_window_is_a_clear_data_error(db):
    with pytest.raises(DataError, match=r"no feature_used events .* 2027-01-01 00:00"):
        run_sql_transform(
            db, "interaction_matrix_v2.sql", _settings(interaction_days=10), datetime(2027, 1, 1)
        )


def test_missing_and_empty_events_table():
    with DuckDBEngine(":memory:", init_schema=False) as bare:
        with pytest.raises(DataError, match=r"missing table.*events"):
            latest_event_time(bare)
        with pytest.raises(DataError, match=r"missing table\(s\) events"):
            run_sql_transform(bare, "interaction_matrix_v2.sql", _settings(), AS_OF)
    with DuckDBEngine(":memory:") as empty:
        with pytest.raises(DataError, match="no events"):
            latest_event_time(empty)
        with pytest.raises(DataError, match="no events"):
            build_features(empty, _settings())


def test_latest_event_time_and_as_of_parsing(db):
    assert latest_event_time(db) == datetime(2026, 3, 1, 13, 0)
    assert parse_as_of("2026-03-01T12:00:00Z") == AS_OF
    assert parse_as_of("2026-03-01T13:00:00+01:00") == AS_OF
    assert parse_as_of(date(2026, 3, 1)) == datetime(2026, 3, 1)
    with pytest.raises(DataError, match="invalid as-of time 'yesterday'"):
        parse_as_of("yesterday")


# -- transitions ----------------------------------------------------------------------------
def _transitions(db: DuckDBEngine) -> list[tuple]:
    return [
        (r["from_feature"], r["to_feature"], r["transition_count"], r["unique_users"],
         r["from_total"], r["transition_prob"])
        for r in _rows(db, "SELECT * FROM ml.feature_transition_probs")
    ]  # fmt: skip


def test_transitions_all_pairs(db):
    run_sql_transform(db, "feature_transitions.sql", _settings(min_transition_count=1), AS_OF)
    # u1 s1: k,k,a,k,f -> k>a a>k k>f ; u2 s2: k>a ; u3: k>f ; u4: k>g ; u5 "s1": a>f.
    # u6 is outside the 30-day window; e7 is after as_of. kanban leaves 5 times, automations 2.
    assert _transitions(db) == [
        ("kanban", "automations", 2, 2, 5, 0.4),
        ("kanban", "forms", 2, 2, 5, 0.4),
        ("automations", "forms", 1, 1, 2, 0.5),
        ("automations", "kanban", 1, 1, 2, 0.5),
        ("kanban", "gantt", 1, 1, 5, 0.2),
    ]


def test_transition_min_count_filters_after_probabilities(db):
    run_sql_transform(db, "feature_transitions.sql", _settings(min_transition_count=2), AS_OF)
    # probabilities stay over all 5 kanban transitions (0.4), not renormalised to 0.5
    assert _transitions(db) == [
        ("kanban", "automations", 2, 2, 5, 0.4),
        ("kanban", "forms", 2, 2, 5, 0.4),
    ]
    # spec default (50) on this tiny fixture: empty, not an error
    assert run_sql_transform(db, "feature_transitions.sql", _settings(), AS_OF) == 0


# -- context vectors ------------------------------------------------------------------------
def test_context_vectors(db):
    n = run_sql_transform(db, "user_context_vectors.sql", _settings(), AS_OF)
    assert n == 6  # u8 signs up after as_of; u6 has no users row
    rows = {r["user_id"]: r for r in _rows(db, "SELECT * FROM ml.user_context_vectors")}
    assert set(rows) == {"u1", "u2", "u3", "u4", "u5", "u7"}
    u1 = rows["u1"]
    assert (u1["role"], u1["plan"], u1["seat_count"], u1["team_size_bucket"]) == (
        "project_manager",
        "business",
        5,
        "small",
    )
    assert u1["industry"] == "tech"
    assert u1["account_age_days"] == 59  # 2026-01-01 -> 2026-03-01
    # 7 events since 2026-02-22 (e1-e6 + page_viewed e9; e7 is after as_of), 3 features
    assert (u1["total_events_7d"], u1["features_used_count"]) == (7, 3)
    # t1 open, t3 solved only after as_of; t2 solved before, t4 no feature, t5 later
    assert u1["open_feature_tickets"] == 2
    u2 = rows["u2"]
    assert (u2["team_size_bucket"], u2["account_age_days"]) == ("large", 90)
    assert (u2["total_events_7d"], u2["features_used_count"], u2["open_feature_tickets"]) == (
        2,
        2,
        1,
    )
    assert rows["u3"]["team_size_bucket"] == "enterprise"
    assert rows["u4"]["team_size_bucket"] == "small"  # NULL seat_count
    assert rows["u4"]["account_age_days"] is None
    assert (rows["u5"]["plan"], rows["u5"]["team_size_bucket"]) == (None, "small")
    # a user with no events: zeros, not missing (cold start)
    u7 = rows["u7"]
    assert (u7["total_events_7d"], u7["features_used_count"], u7["account_age_days"]) == (
        0,
        0,
        273,
    )


# -- recent features ------------------------------------------------------------------------
def test_recent_features(db):
    s = _settings(recent_features=2)
    with pytest.raises(DataError, match=r"missing table.*ml\.user_feature_interactions"):
        run_sql_transform(db, "user_recent_features.sql", s, AS_OF)
    run_sql_transform(db, "interaction_matrix_v2.sql", s, AS_OF)
    assert run_sql_transform(db, "user_recent_features.sql", s, AS_OF) == 12
    got: dict[str, list[str]] = {}
    for r in _rows(db, "SELECT * FROM ml.user_recent_features ORDER BY user_id, recency_rank"):
        got.setdefault(r["user_id"], []).append(r["feature"])
    assert got == {
        "u1": ["forms", "kanban"],
        "u2": ["automations", "kanban"],
        "u3": ["forms", "kanban"],
        "u4": ["gantt", "kanban"],
        "u5": ["forms", "automations"],
        "u6": ["automations", "kanban"],
    }


def test_recent_features_at_an_earlier_cut(db):
    from featurerec.models.data import _recent_at

    cut = datetime(2026, 2, 27, 23, 59)
    cut_day = (cut - datetime(1970, 1, 1)).total_seconds() / 86_400
    got = _recent_at(db, _settings(recent_features=2), cut_day)
    # most recent last; u1's uses on 02-28 and 03-01 are after the cut
    assert got["u1"] == ("kanban",)
    assert got["u2"] == ("kanban", "automations")
    assert got["u6"] == ("kanban", "automations")
    assert "u1" in got and all(len(v) <= 2 for v in got.values())


# -- collaborative signal -------------------------------------------------------------------
def _brute_jaccard(X: np.ndarray, min_shared: int, k: int) -> set[tuple]:
    out = set()
    n = X.shape[0]
    for i in range(n):
        cands = []
        for j in range(n):
            if i == j:
                continue
            s = int((X[i] & X[j]).sum())
            if s >= min_shared:
                cands.append((-s / int((X[i] | X[j]).sum()), j, s))
        cands.sort()
        for rank, (negj, j, s) in enumerate(cands[:k], 1):
            out.add((i, j, s, round(-negj, 9), rank))
    return out


@pytest.mark.parametrize("budget", [10, 1_000_000])
def test_jaccard_top_k_matches_brute_force(budget):
    rng = np.random.default_rng(7)
    X = (rng.random((60, 12)) < 0.4).astype(np.int32)
    u, v, s, j, r = jaccard_top_k(sp.csr_matrix(X), min_shared=3, k=4, block_budget=budget)
    got = {
        (int(a), int(b), int(c), round(float(d), 9), int(e))
        for a, b, c, d, e in zip(u, v, s, j, r, strict=True)
    }
    assert got == _brute_jaccard(X.astype(bool), 3, 4)
    assert len(got) > 100


@pytest.mark.parametrize(("n", "f", "density", "k"), [(200, 5, 0.6, 4), (150, 30, 0.15, 50)])
def test_jaccard_top_k_with_duplicate_sets_and_ties(n, f, density, k):
    # few features -> many users with identical sets and many ties (broken by index)
    rng = np.random.default_rng(11)
    X = (rng.random((n, f)) < density).astype(np.int32)
    u, v, s, j, r = jaccard_top_k(sp.csr_matrix(X), min_shared=3, k=k, block_budget=50)
    got = {
        (int(a), int(b), int(c), round(float(d), 9), int(e))
        for a, b, c, d, e in zip(u, v, s, j, r, strict=True)
    }
    assert got == _brute_jaccard(X.astype(bool), 3, k)
    assert list(u) == sorted(u)


def test_user_neighbors_hand_built(db):
    db.execute(
        "CREATE TABLE ml.user_feature_interactions (user_id VARCHAR, feature VARCHAR,"
        " interaction_strength DOUBLE)"
    )
    rows = [
        *[("e", f, 0.2) for f in ("f2", "f3", "f4")],
        *[("a", f, 0.5) for f in ("f1", "f2", "f3", "f4")],
        ("a", "f5", 0.1),
        *[("b", f, 0.5) for f in ("f1", "f2", "f3")],
        *[("c", f, 0.3) for f in ("f1", "f2", "f3", "f4", "f5")],
        ("d", "f1", 0.9),
        ("d", "f2", 0.9),
        ("d", "f3", 0.19),
    ]
    for user, feat, strength in rows:
        db.execute(
            "INSERT INTO ml.user_feature_interactions VALUES ($u, $f, $s)",
            {"u": user, "f": feat, "s": strength},
        )
    n = compute_user_neighbors(db, _settings(jaccard_top_k=2))
    got = [
        (r["user_id"], r["neighbor_id"], r["shared_features"], r["jaccard_similarity"],
         r["neighbor_rank"])
        for r in _rows(db, "SELECT * FROM ml.user_neighbors ORDER BY user_id, neighbor_rank")
    ]  # fmt: skip
    # a{1234} b{123} c{12345} e{234}; d has only 2 strong features; ties -> neighbour name
    assert got == [
        ("a", "c", 4, 0.8, 1),
        ("a", "b", 3, 0.75, 2),
        ("b", "a", 3, 0.75, 1),
        ("b", "c", 3, 0.6, 2),
        ("c", "a", 4, 0.8, 1),
        ("c", "b", 3, 0.6, 2),
        ("e", "a", 3, 0.75, 1),
        ("e", "c", 3, 0.6, 2),
    ]
    assert n == 8


# -- the whole stage ------------------------------------------------------------------------
def test_build_features_defaults_to_latest_event_and_counts_rows(db):
    counts = build_features(db, _settings(min_transition_count=1))
    # as_of = latest event (e7, 2026-03-01 13:00) so e7 now counts: u1 kanban use_count 5
    assert counts == {
        "ml.user_feature_interactions": 15,
        "ml.feature_transition_probs": 6,  # e7 (kanban after forms in u1's s1) adds forms>kanban
        "ml.user_context_vectors": 6,
        "ml.user_recent_features": 15,
        "ml.user_neighbors": 0,
    }
    use = db.query_rows(
        "SELECT use_count FROM ml.user_feature_interactions WHERE user_id='u1' AND feature='kanban'"
    )
    assert use == [{"use_count": 5}]


def test_single_feature_world():
    with DuckDBEngine(":memory:") as one:
        load_events(
            one,
            [
                ("x1", "u1", "w", "feature_used", "2026-03-01 10:00", "kanban", "s", 1),
                ("x2", "u1", "w", "feature_used", "2026-03-01 10:01", "kanban", "s", 2),
                ("x3", "u2", "w", "feature_used", "2026-03-01 10:02", "kanban", "t", 1),
            ],
        )
        counts = build_features(one, _settings(min_transition_count=1))
        assert counts["ml.user_feature_interactions"] == 2
        assert counts["ml.feature_transition_probs"] == 0
        assert counts["ml.user_neighbors"] == 0
        assert counts["ml.user_context_vectors"] == 0  # no users table rows


# -- portability ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", [*TRANSFORMS, "user_strong_features.sql", "user_recent_features_at.sql"]
)
@pytest.mark.parametrize("dialect", ["spark", "trino"])
def test_sql_transpiles(name, dialect):
    sql = load_sql(name)
    out = sqlglot.transpile(
        sql, read="duckdb", write=dialect, unsupported_level=sqlglot.ErrorLevel.RAISE
    )
    assert len(out) == 1
    # the translation parses in the target dialect and is still a query
    tree = sqlglot.parse_one(out[0], read=dialect)
    assert isinstance(tree, sqlglot.exp.Query)
    assert sql_params(sql) <= {"as_of", "days", "min_count", "n", "min_strength"}


def test_recency_score_is_the_same_on_every_run_with_parallel_threads() -> None:
    """A parallel SUM of doubles differs in its last bits with thread timing (the old SQL
    gave 6 different results in 8 runs of this query); ROUND(.., 3) can then flip an
    interaction strength and every seeded model downstream. The score is summed exactly."""
    import duckdb

    from featurerec.warehouse.engine import load_sql

    con = duckdb.connect(config={"threads": 2})
    con.execute(
        """CREATE TABLE events AS
           SELECT 'u' || (i % 3) AS user_id, 'f' AS feature_category,
                  'feature_used' AS event_type,
                  TIMESTAMP '2026-02-28 12:00:00' - (i % 89) * INTERVAL '1' DAY
                      - (i % 1000) * INTERVAL '1' SECOND AS timestamp
           FROM range(3000000) t(i)"""
    )
    sql = load_sql("interaction_matrix_v2.sql")
    params = {"as_of": datetime(2026, 2, 28, 23), "days": 90}
    runs = {tuple((r[0], r[6]) for r in con.execute(sql, params).fetchall()) for _ in range(8)}
    con.close()
    assert len(runs) == 1
    # and it is the sum: 1,000,000 events per user spread (almost) evenly over 89 days
    per_day = 3_000_000 / 3 / 89
    expected = sum(per_day / (1 + d) for d in range(89))
    for _, score in next(iter(runs)):
        assert score == pytest.approx(expected, rel=1e-5)
