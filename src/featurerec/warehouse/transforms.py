"""Spec Stage 3: the SQL transforms that turn raw events into the ``ml.*`` training tables.

Each transform is a ``.sql`` file in ``warehouse/sql`` (DuckDB dialect, bound ``$params``,
portable through sqlglot) plus a small :class:`Transform` record saying which table it writes,
which tables it reads and which settings feed its parameters. Every window ends at an
``as_of`` time (default: the latest event in the warehouse), never the wall clock.

=============================  ===============================  ==============================
SQL file                       output table                     window / params
=============================  ===============================  ==============================
interaction_matrix_v2.sql      ml.user_feature_interactions     interaction_days (spec 90)
feature_transitions.sql        ml.feature_transition_probs      transition_days (30), min count
user_context_vectors.sql       ml.user_context_vectors          context_activity_days (7)
user_recent_features.sql       ml.user_recent_features          recent_features (5)
user_strong_features.sql       (input of the Jaccard top-k)     jaccard_min_strength (0.2)
=============================  ===============================  ==============================

The collaborative signal (spec: user-user Jaccard over features with strength >= 0.2 and at
least 3 shared) is :func:`compute_user_neighbors`: sparse products one block of users at a
time, keeping each user's top-k neighbours in ``ml.user_neighbors``, so all user pairs are
never materialised.

Example::

    >>> from featurerec.warehouse.engine import DuckDBEngine
    >>> from featurerec.config import Settings
    >>> db = DuckDBEngine(":memory:")
    >>> build_features(db, Settings())  # doctest: +SKIP
    {'ml.user_feature_interactions': 4200000, ...}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.warehouse.engine import SQLEngine, load_sql

#: ``progress(done, total, message)``, as in :class:`featurerec.pipeline.contracts.StageContext`.
ProgressFn = Callable[[float, float, str], None]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_COMMENT = re.compile(r"--[^\n]*")


def _no_progress(done: float, total: float, msg: str) -> None:
    return None


@dataclass(frozen=True)
class Transform:
    """One Stage 3 SQL transform: ``CREATE OR REPLACE TABLE output AS <sql file>``."""

    #: SQL file name in ``warehouse/sql`` (the spec's ``query_ref``).
    sql_file: str
    output_table: str
    #: Tables the query reads; a missing one is a :class:`DataError` naming it.
    inputs: tuple[str, ...]
    #: Parameters other than ``as_of``, from the settings.
    params: Callable[[Settings], dict[str, Any]]
    #: If set, the window must hold feature_used events (else DataError): its length in days.
    require_window_days: Callable[[Settings], int] | None = None
    description: str = ""


TRANSFORMS: dict[str, Transform] = {
    t.sql_file: t
    for t in (
        Transform(
            "interaction_matrix_v2.sql",
            "ml.user_feature_interactions",
            ("events",),
            lambda s: {"days": s.windows.interaction_days},
            require_window_days=lambda s: s.windows.interaction_days,
            description="user x feature use_count, active_days, recency, interaction_strength",
        ),
        Transform(
            "feature_transitions.sql",
            "ml.feature_transition_probs",
            ("events",),
            lambda s: {
                "days": s.windows.transition_days,
                "min_count": s.windows.min_transition_count,
            },
            description="consecutive distinct features within sessions",
        ),
        Transform(
            "user_context_vectors.sql",
            "ml.user_context_vectors",
            ("events", "users", "workspaces", "support_tickets"),
            lambda s: {"days": s.windows.context_activity_days},
            description="role, plan, team size, account age, recent activity, open tickets",
        ),
        Transform(
            "user_recent_features.sql",
            "ml.user_recent_features",
            ("ml.user_feature_interactions",),
            lambda s: {"n": s.windows.recent_features},
            description="each user's last few distinct features",
        ),
    )
}

#: Output table of :func:`compute_user_neighbors`.
NEIGHBORS_TABLE = "ml.user_neighbors"


# -- helpers ---------------------------------------------------------------------------------
def sql_params(sql: str) -> set[str]:
    """Names of the ``$params`` a SQL text uses (comments ignored)."""
    return set(_PARAM.findall(_COMMENT.sub("", sql)))


def check_identifier(name: str, what: str = "table") -> str:
    """``name`` if it is a plain (optionally schema-qualified) identifier, else DataError.

    Table names come from pipeline specs, not users' data, but they are still spliced into
    DDL, so they are checked rather than trusted.
    """
    if not _IDENT.match(name):
        raise DataError(f"invalid {what} name {name!r}: expected [schema.]identifier")
    return name


def window_start(as_of: datetime, days: int) -> datetime:
    """Midnight of ``as_of``'s date minus ``days`` (the spec's ``CURRENT_DATE - INTERVAL``)."""
    return datetime.combine(as_of.date(), time()) - timedelta(days=days)


def _as_datetime(value: datetime | date | str) -> datetime:
    if isinstance(value, datetime):
        return _to_naive_utc(value) if value.tzinfo else value
    if isinstance(value, date):
        return datetime.combine(value, time())
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"invalid as-of time {value!r}: expected ISO 8601") from None
    return _to_naive_utc(parsed) if parsed.tzinfo else parsed


def _to_naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


def parse_as_of(value: datetime | date | str) -> datetime:
    """An as-of time as a UTC, timezone-naive datetime (ISO strings, dates, aware datetimes)."""
    return _as_datetime(value)


def require_tables(engine: SQLEngine, tables: tuple[str, ...] | list[str], *, for_: str) -> None:
    """DataError naming every missing input table."""
    missing = [t for t in tables if not engine.table_exists(t)]
    if missing:
        raise DataError(
            f"{for_}: missing table(s) {', '.join(missing)}"
            " (run `featurerec ingest` and the earlier pipeline stages first)"
        )


def _scalar(engine: SQLEngine, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    rows = engine.query_rows(sql, params)
    return next(iter(rows[0].values())) if rows else None


def latest_event_time(engine: SQLEngine) -> datetime:
    """The default as-of time: the latest event timestamp in the warehouse.

    Raises DataError when the events table is missing or empty.
    """
    require_tables(engine, ("events",), for_="latest event time")
    ts = _scalar(engine, "SELECT MAX(timestamp) FROM events")
    if ts is None:
        raise DataError("the warehouse has no events: run `featurerec ingest` first")
    return _as_datetime(ts)


def count_rows(engine: SQLEngine, table: str) -> int:
    return int(_scalar(engine, f"SELECT COUNT(*) FROM {check_identifier(table)}") or 0)


# -- SQL transforms --------------------------------------------------------------------------
def run_sql_transform(
    engine: SQLEngine,
    sql_file: str,
    settings: Settings,
    as_of: datetime,
    *,
    output_table: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    sql_text: str | None = None,
) -> int:
    """Run one transform into its output table; returns the output's row count.

    ``sql_file`` names a known :data:`TRANSFORMS` entry or any file in ``warehouse/sql``
    (then ``output_table`` is required). ``overrides`` replaces parameters (a pipeline stage's
    ``params``). ``sql_text`` runs a user's own SELECT instead of a shipped file.
    Only the parameters the SQL actually uses are bound.
    """
    transform = TRANSFORMS.get(sql_file)
    table = output_table or (transform.output_table if transform else None)
    if table is None:
        raise DataError(f"{sql_file}: no output_table given and not a built-in transform")
    check_identifier(table)
    sql = sql_text if sql_text is not None else load_sql(sql_file)
    params: dict[str, Any] = {"as_of": as_of}
    if transform is not None:
        require_tables(engine, transform.inputs, for_=f"{sql_file} -> {table}")
        params.update(transform.params(settings))
    params.update(overrides or {})
    if transform is not None and transform.require_window_days is not None:
        days = int(params.get("days", transform.require_window_days(settings)))
        _require_window_events(engine, as_of, days, table)
    used = sql_params(sql)
    missing = used - params.keys()
    if missing:
        raise DataError(f"{sql_file}: no value for parameter(s) {', '.join(sorted(missing))}")
    bound = {k: v for k, v in params.items() if k in used}
    schema = table.rpartition(".")[0]
    if schema:
        engine.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    engine.execute(f"CREATE OR REPLACE TABLE {table} AS\n{sql}", bound)
    return count_rows(engine, table)


def _require_window_events(engine: SQLEngine, as_of: datetime, days: int, table: str) -> None:
    start = window_start(as_of, days)
    n = _scalar(
        engine,
        "SELECT COUNT(*) FROM events WHERE event_type = 'feature_used'"
        " AND feature_category IS NOT NULL AND timestamp >= $start AND timestamp <= $as_of",
        {"start": start, "as_of": as_of},
    )
    if not n:
        raise DataError(
            f"no feature_used events with a feature_category between {start:%Y-%m-%d %H:%M} and "
            f"{as_of:%Y-%m-%d %H:%M} ({days}-day window ending at the as-of time): nothing to "
            f"build {table} from (check --as-of, or ingest events)"
        )


# -- collaborative signal: Jaccard top-k neighbours --------------------------------------------
@dataclass
class Neighbors:
    """Each user's top-k Jaccard neighbours, as parallel arrays (one row per (user, neighbour))."""

    user: np.ndarray  # int index into ``users``
    neighbor: np.ndarray
    shared: np.ndarray
    jaccard: np.ndarray
    rank: np.ndarray  # 1 = most similar
    users: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.user.shape[0])


def _bitsets(X: sp.csr_matrix) -> np.ndarray:
    """Each row's column set as a bitset (n x ceil(F/64) uint64), for exact overlap counts."""
    n, n_feat = X.shape
    words = max(1, (n_feat + 63) // 64)
    bits = np.zeros((n, words), dtype=np.uint64)
    rows = np.repeat(np.arange(n), np.diff(X.indptr))
    cols = X.indices.astype(np.int64)
    np.bitwise_or.at(
        bits, (rows, cols // 64), np.left_shift(np.uint64(1), (cols % 64).astype(np.uint64))
    )
    return bits


def jaccard_top_k(
    features: sp.csr_matrix,
    *,
    min_shared: int,
    k: int,
    block_budget: int = 4_000_000,
    progress: ProgressFn = _no_progress,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` Jaccard neighbours of every row of a binary users x features matrix, exactly.

    Only pairs sharing at least ``min_shared`` features count; ties in similarity go to the
    lower row index. All user pairs are never materialised:

    1. Users with identical feature sets are one *pattern* (with few features, e.g. 10, there
       are at most a few hundred patterns however many users there are).
    2. Candidate pattern pairs come from *prefix filtering* (Chaudhuri et al., 2006): with
       features ordered rarest first, two sets sharing >= o features share a feature among
       the first ``|set| - o + 1`` of each. Popular features mostly fall outside the prefixes,
       so the sparse product ``prefix @ prefix.T`` (computed one block of patterns at a time,
       at most about ``block_budget`` non-zeros each) is small.
    3. Exact overlaps of the candidates come from bitset popcounts; each pattern keeps the best
       candidates until they hold ``k`` users (plus ties), which are then expanded to users.

    Returns ``(user, neighbor, shared, jaccard, rank)`` arrays sorted by user then rank.
    """
    X = sp.csr_matrix(features, dtype=np.int32)
    X.sum_duplicates()
    X.data[:] = 1
    X.eliminate_zeros()
    deg = np.diff(X.indptr).astype(np.int64)
    empty = np.zeros(0, dtype=np.int64)
    nothing = (empty, empty, empty.astype(np.int32), empty.astype(np.float64), empty)
    # only users with >= min_shared features can share that many with anyone
    elig = np.flatnonzero(deg >= min_shared)
    if elig.size < 2:
        return nothing
    Xe = X[elig]
    bits_e = _bitsets(Xe)
    patterns, first, inverse, counts = np.unique(
        bits_e, axis=0, return_index=True, return_inverse=True, return_counts=True
    )
    inverse = inverse.ravel()
    n_pat = patterns.shape[0]
    pdeg = deg[elig][first]
    Xp = Xe[first]
    # rarest feature first (by how many eligible users have it)
    freq = np.bincount(Xe.indices, minlength=X.shape[1])
    rank = np.empty(X.shape[1], dtype=np.int64)
    rank[np.argsort(freq, kind="stable")] = np.arange(X.shape[1])
    Xr = sp.csr_matrix((Xp.data, rank[Xp.indices], Xp.indptr), shape=Xp.shape)
    Xr.sort_indices()
    pos = np.arange(Xr.nnz) - np.repeat(Xr.indptr[:-1], np.diff(Xr.indptr))
    keep = pos < np.repeat(pdeg - min_shared + 1, np.diff(Xr.indptr))
    prow = np.repeat(np.arange(n_pat), np.diff(Xr.indptr))[keep]
    prefix = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.int32), (prow, Xr.indices[keep])), shape=Xr.shape
    )
    prefix_t = prefix.T.tocsr()
    row_cost = np.asarray(prefix @ np.diff(prefix_t.indptr)).ravel()
    cum = np.cumsum(row_cost)
    bounds = [0]
    while bounds[-1] < n_pat:
        start = bounds[-1]
        base = cum[start - 1] if start else 0
        end = int(np.searchsorted(cum, base + block_budget, side="right"))
        bounds.append(max(end, start + 1))
    n_blocks = len(bounds) - 1
    kept_r, kept_c, kept_s, kept_j = [], [], [], []
    for b in range(n_blocks):
        lo, hi = bounds[b], bounds[b + 1]
        cand = (prefix[lo:hi] @ prefix_t).tocoo()
        r = cand.row.astype(np.int32) + np.int32(lo)
        c = cand.col.astype(np.int32)
        del cand
        shared = np.bitwise_count(patterns[r, 0] & patterns[c, 0]).astype(np.int32)
        for w in range(1, patterns.shape[1]):
            shared += np.bitwise_count(patterns[r, w] & patterns[c, w])
        ok = shared >= min_shared
        r, c, shared = r[ok], c[ok], shared[ok]
        jac = shared / (pdeg[r] + pdeg[c] - shared)
        # by pattern, then similarity descending (ties are all kept below, order is free)
        order = np.argsort(r * 4.0 - jac)
        r, c, shared, jac = r[order], c[order], shared[order], jac[order]
        if r.size:
            # keep candidates until they hold k other users, plus ties with the last one
            eff = counts[c] - (c == r)
            csum = np.cumsum(eff)
            starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            before = (
                csum - eff - np.repeat(csum[starts] - eff[starts], np.diff(np.r_[starts, r.size]))
            )
            need = before < k
            cut = np.full(n_pat, np.inf)
            np.minimum.at(cut, r[need], jac[need])
            sel = need | (jac >= cut[r])
            kept_r.append(r[sel])
            kept_c.append(c[sel])
            kept_s.append(shared[sel])
            kept_j.append(jac[sel])
        progress(b + 1, n_blocks, f"jaccard block {b + 1}/{n_blocks}")
    if not kept_r:
        return nothing
    er, ec = np.concatenate(kept_r), np.concatenate(kept_c)
    es, ej = np.concatenate(kept_s), np.concatenate(kept_j)
    # members of each pattern, lowest user index first; only the first k + 2 can matter
    members = np.argsort(inverse, kind="stable")
    mstart = np.r_[0, np.cumsum(counts)[:-1]]
    take = np.minimum(counts[ec], k + 2)
    rep = np.repeat(np.arange(er.size), take)
    offs = np.arange(rep.size) - np.repeat(np.r_[0, np.cumsum(take)[:-1]], take)
    lp, lj, ls = er[rep], ej[rep], es[rep]
    lu = members[mstart[ec[rep]] + offs]
    order = np.lexsort((lu, -lj, lp))
    lp, lj, ls, lu = lp[order], lj[order], ls[order], lu[order]
    pstart = np.flatnonzero(np.r_[True, lp[1:] != lp[:-1]])
    prank = np.arange(lp.size) - np.repeat(pstart, np.diff(np.r_[pstart, lp.size]))
    top = prank < k + 1
    lp, lj, ls, lu = lp[top], lj[top], ls[top], lu[top]
    # each user gets its pattern's list without itself, first k
    lstart = np.searchsorted(lp, np.arange(n_pat))
    llen = np.searchsorted(lp, np.arange(n_pat), side="right") - lstart
    users = np.arange(elig.size)
    n_list = llen[inverse]
    urep = np.repeat(users, n_list)
    uoff = np.arange(urep.size) - np.repeat(np.r_[0, np.cumsum(n_list)[:-1]], n_list)
    li = lstart[inverse[urep]] + uoff
    nb = lu[li]
    mask = nb != urep
    urep, li, nb = urep[mask], li[mask], nb[mask]
    if urep.size == 0:
        return nothing
    ustart = np.flatnonzero(np.r_[True, urep[1:] != urep[:-1]])
    urank = np.arange(urep.size) - np.repeat(ustart, np.diff(np.r_[ustart, urep.size])) + 1
    fin = urank <= k
    return (
        elig[urep[fin]],
        elig[nb[fin]],
        ls[li[fin]].astype(np.int32),
        lj[li[fin]],
        urank[fin],
    )


def compute_user_neighbors(
    engine: SQLEngine,
    settings: Settings,
    *,
    output_table: str = NEIGHBORS_TABLE,
    progress: ProgressFn = _no_progress,
) -> int:
    """Write each user's top-k Jaccard neighbours to ``ml.user_neighbors``; returns row count.

    Spec Stage 3 "Collaborative Filtering Signals": features with interaction_strength >=
    ``jaccard_min_strength`` (0.2), pairs sharing >= ``jaccard_min_shared`` (3) of them,
    ``jaccard_similarity`` rounded to 3 places as in the spec; ``jaccard_top_k`` neighbours per
    user (both directions: every user gets its own list). Reads ml.user_feature_interactions.
    """
    check_identifier(output_table)
    require_tables(engine, ("ml.user_feature_interactions",), for_=f"Jaccard -> {output_table}")
    w = settings.windows
    strong = engine.query_arrow(
        load_sql("user_strong_features.sql"), {"min_strength": w.jaccard_min_strength}
    )
    if strong.num_rows:
        user_codes = pc.dictionary_encode(strong["user_id"]).combine_chunks()
        feat_codes = pc.dictionary_encode(strong["feature"]).combine_chunks()
        # index users in name order, so similarity ties go to the lower user_id
        names_unsorted = np.asarray(user_codes.dictionary.to_pylist(), dtype=object)
        by_name = np.argsort(names_unsorted, kind="stable")
        position = np.empty(by_name.size, dtype=np.int64)
        position[by_name] = np.arange(by_name.size)
        users = names_unsorted[by_name].tolist()
        rows = position[user_codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)]
        cols = feat_codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        X = sp.csr_matrix(
            (np.ones(rows.size, dtype=np.int32), (rows, cols)),
            shape=(len(users), len(feat_codes.dictionary)),
        )
        u, v, s, j, r = jaccard_top_k(
            X, min_shared=w.jaccard_min_shared, k=w.jaccard_top_k, progress=progress
        )
    else:
        users = []
        u = v = r = np.zeros(0, dtype=np.int64)
        s = np.zeros(0, dtype=np.int32)
        j = np.zeros(0, dtype=np.float64)
    names = pa.array(users, type=pa.string())
    table = pa.table(
        {
            "user_id": names.take(pa.array(u)),
            "neighbor_id": names.take(pa.array(v)),
            "shared_features": pa.array(s, type=pa.int32()),
            "jaccard_similarity": pa.array(np.round(j, 3), type=pa.float64()),
            "neighbor_rank": pa.array(r, type=pa.int32()),
        }
    )
    _write_arrow(engine, output_table, table)
    return table.num_rows


def _write_arrow(engine: SQLEngine, table_name: str, data: pa.Table) -> None:
    register = getattr(engine, "register_arrow", None)
    if register is None:
        raise DataError(f"engine {type(engine).__name__} cannot load Arrow data into {table_name}")
    schema = table_name.rpartition(".")[0]
    if schema:
        engine.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    view = "_featurerec_arrow_load"
    register(view, data)
    try:
        engine.execute(f"CREATE OR REPLACE TABLE {table_name} AS SELECT * FROM {view}")
    finally:
        engine.unregister(view)  # type: ignore[attr-defined]


# -- all of Stage 3 --------------------------------------------------------------------------
def build_features(
    engine: SQLEngine,
    settings: Settings,
    as_of: datetime | date | str | None = None,
    *,
    progress: ProgressFn = _no_progress,
) -> dict[str, int]:
    """Build every Stage 3 table for windows ending at ``as_of``; returns rows per table.

    ``as_of`` defaults to :func:`latest_event_time`. Raises DataError for missing input
    tables or a window with no feature_used events.
    """
    t = latest_event_time(engine) if as_of is None else parse_as_of(as_of)
    counts: dict[str, int] = {}
    steps = len(TRANSFORMS) + 1
    for i, (name, tr) in enumerate(TRANSFORMS.items()):
        progress(i, steps, name)
        counts[tr.output_table] = run_sql_transform(engine, name, settings, t)
    progress(steps - 1, steps, NEIGHBORS_TABLE)
    counts[NEIGHBORS_TABLE] = compute_user_neighbors(engine, settings)
    progress(steps, steps, "done")
    return counts
