"""Read the Stage 3 tables (written by :func:`featurerec.warehouse.transforms.build_features`)
into one :class:`TrainingData`.

Tables read: ``ml.user_feature_interactions`` (the matrix and first-use times),
``ml.user_context_vectors``, ``ml.feature_transition_probs``, ``ml.user_recent_features``
and the ``events`` table (feature_used event count per user up to the as-of time, for the
cold / warm / active segments). Columns are pulled as Arrow and converted with dictionary
encoding, so 4M interaction rows load without a Python loop per row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from featurerec.errors import DataError
from featurerec.models.base import CutFeatures, TrainingData, UserContext, team_size_bucket

INTERACTIONS = "ml.user_feature_interactions"
CONTEXTS = "ml.user_context_vectors"
TRANSITIONS = "ml.feature_transition_probs"
RECENT = "ml.user_recent_features"

_EPOCH = np.datetime64("1970-01-01T00:00:00", "us")


def epoch_days(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps -> float days since 1970-01-01 (NaN for nulls)."""
    arr = pc.cast(col, pa.timestamp("us")).to_numpy(zero_copy_only=False)
    out = (arr - _EPOCH).astype("timedelta64[us]").astype(np.float64) / 86_400e6
    return np.where(np.isnat(arr), np.nan, out)


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    enc = pc.dictionary_encode(col).combine_chunks()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), [
        str(x) for x in enc.dictionary.to_pylist()
    ]


def _exists(engine: Any, table: str) -> bool:
    return bool(engine.table_exists(table))


def load_training_data(
    engine: Any,
    settings: Any = None,
    as_of: datetime | None = None,
    *,
    validation_days: float | None = 7.0,
    validation_cuts: int = 1,
) -> TrainingData:
    """Build :class:`TrainingData` from the ml.* tables.

    ``as_of`` bounds the event counts (default: no bound; the tables themselves were built
    for one as-of time). With ``validation_days``, transition probabilities (PIPE's
    ``feature_transitions.sql``, read-only) and recent features are also computed as of
    the validation cut that :func:`featurerec.models.fit.validation_split` will use
    (``validation_days`` before the end of the data), and with ``validation_cuts=2`` also
    as of the cut one more ``validation_days`` back (where a validation split of the
    "pre" side cuts: the pipeline's evaluation trains on the pre side, validation
    included), so validation never sees sessions from after its cut.
    Raises :class:`DataError` naming a missing or empty table.
    """
    if not _exists(engine, INTERACTIONS):
        raise DataError(
            f"missing table {INTERACTIONS}: run the feature transforms first "
            "(`featurerec pipeline run`, or warehouse.transforms.build_features)"
        )
    inter = engine.query_arrow(
        f"SELECT user_id, feature, interaction_strength, first_used FROM {INTERACTIONS} "
        "WHERE feature IS NOT NULL AND user_id IS NOT NULL "
        # a stable row order makes the user order, and so every seeded fit, reproducible
        "ORDER BY user_id, feature"
    )
    if inter.num_rows == 0:
        raise DataError(f"{INTERACTIONS} is empty: no feature_used events in the window")
    u_codes, u_names = _codes(inter["user_id"])
    f_codes, f_names = _codes(inter["feature"])
    # sort features by name so the item space is stable across runs
    f_order = np.argsort(np.asarray(f_names, dtype=object))
    f_rank = np.empty_like(f_order)
    f_rank[f_order] = np.arange(len(f_order))
    features = [f_names[i] for i in f_order]
    cols = f_rank[f_codes]
    strength = inter["interaction_strength"].to_numpy(zero_copy_only=False).astype(np.float32)
    strength = np.nan_to_num(strength, nan=0.0)
    # strength 0 would vanish from a sparse matrix; keep a floor so "used" stays visible
    strength = np.maximum(strength, 1e-3)
    shape = (len(u_names), len(features))
    matrix = sp.csr_matrix((strength, (u_codes, cols)), shape=shape)
    first = epoch_days(inter["first_used"])
    first = np.where(np.isnan(first), 0.0, first)
    first_used = sp.csr_matrix((first, (u_codes, cols)), shape=shape)
    users = list(u_names)

    contexts: dict[str, UserContext] = {}
    if _exists(engine, CONTEXTS):
        ctx = engine.query_arrow(f"SELECT * FROM {CONTEXTS}").to_pylist()
        for r in ctx:
            seats = r.get("seat_count")
            contexts[str(r["user_id"])] = UserContext(
                role=r.get("role"),
                plan=r.get("plan"),
                seat_count=seats,
                team_size_bucket=r.get("team_size_bucket") or team_size_bucket(seats),
                industry=r.get("industry"),
                account_age_days=int(r.get("account_age_days") or 0),
                features_used_count=int(r.get("features_used_count") or 0),
                total_events_7d=int(r.get("total_events_7d") or 0),
                open_feature_tickets=int(r.get("open_feature_tickets") or 0),
            )

    transitions: dict[tuple[str, str], float] = {}
    if _exists(engine, TRANSITIONS):
        t = engine.query_arrow(
            f"SELECT from_feature, to_feature, transition_prob FROM {TRANSITIONS}"
        ).to_pylist()
        transitions = {
            (str(r["from_feature"]), str(r["to_feature"])): float(r["transition_prob"] or 0.0)
            for r in t
        }

    recent: dict[str, tuple[str, ...]] = {}
    if _exists(engine, RECENT):
        rows = engine.query_rows(
            f"SELECT user_id, feature FROM {RECENT} ORDER BY user_id, recency_rank DESC"
        )
        acc: dict[str, list[str]] = {}
        for r in rows:
            acc.setdefault(str(r["user_id"]), []).append(str(r["feature"]))
        recent = {u: tuple(v) for u, v in acc.items()}

    counts: dict[str, int] = {}
    if _exists(engine, "events"):
        sql = "SELECT user_id, COUNT(*) AS n FROM events WHERE event_type = 'feature_used'"
        params: dict[str, Any] = {}
        if as_of is not None:
            sql += " AND timestamp <= $as_of"
            params["as_of"] = as_of
        tbl = engine.query_arrow(sql + " GROUP BY user_id", params or None)
        counts = dict(
            zip(
                tbl["user_id"].to_pylist(),
                (int(x) for x in tbl["n"].to_pylist()),
                strict=True,
            )
        )
    adopted_at = None
    end_day = float(first_used.data.max()) if first_used.nnz else None
    at_cuts: list[CutFeatures] = []
    if _exists(engine, "events"):
        adopted_at = _flagged_first_uses(engine, settings, as_of, users, features)
        if validation_days is not None and end_day is not None:
            for k in range(1, max(validation_cuts, 0) + 1):
                cut = end_day - k * float(validation_days)
                at_cuts.append(
                    CutFeatures(
                        cut_day=cut,
                        transitions=_transitions_at(engine, settings, cut),
                        recent=_recent_at(engine, settings, cut),
                    )
                )
    return TrainingData(
        users=users,
        features=features,
        matrix=matrix,
        contexts=contexts,
        transitions=transitions,
        recent=recent,
        event_counts=counts,
        as_of="" if as_of is None else as_of.isoformat(),
        first_used=first_used,
        adopted_at=adopted_at,
        end_day=end_day,
        at_cuts=tuple(at_cuts),
    )


def _query_at(engine: Any, sql_file: str, cut_day: float, params: dict[str, int]) -> Any:
    """Run ``sql_file`` with ``$as_of`` = ``cut_day`` (epoch days) and ``params``."""
    from featurerec.warehouse.engine import load_sql

    cut = (_EPOCH + np.timedelta64(round(cut_day * 86_400e6), "us")).astype(datetime)
    return engine.query_arrow(load_sql(sql_file), {"as_of": cut, **params})


def _transitions_at(engine: Any, settings: Any, cut_day: float) -> dict[tuple[str, str], float]:
    """Transition probabilities for the window ending at ``cut_day`` (epoch days)."""
    w = getattr(settings, "windows", None)
    tbl = _query_at(
        engine,
        "feature_transitions.sql",
        cut_day,
        {
            "days": int(getattr(w, "transition_days", 30)),
            "min_count": int(getattr(w, "min_transition_count", 50)),
        },
    )
    if tbl.num_rows == 0:
        return {}
    return {
        (str(a), str(b)): float(p or 0.0)
        for a, b, p in zip(
            tbl["from_feature"].to_pylist(),
            tbl["to_feature"].to_pylist(),
            tbl["transition_prob"].to_pylist(),
            strict=True,
        )
    }


def _recent_at(engine: Any, settings: Any, cut_day: float) -> dict[str, tuple[str, ...]]:
    """Each user's recent distinct features (most recent last) as of ``cut_day``."""
    w = getattr(settings, "windows", None)
    tbl = _query_at(
        engine,
        "user_recent_features_at.sql",
        cut_day,
        {
            "days": int(getattr(w, "interaction_days", 90)),
            "n": int(getattr(w, "recent_features", 5)),
        },
    )
    acc: dict[str, list[str]] = {}
    for u, f in zip(tbl["user_id"].to_pylist(), tbl["feature"].to_pylist(), strict=True):
        acc.setdefault(str(u), []).append(str(f))
    return {u: tuple(v) for u, v in acc.items()}


def _flagged_first_uses(
    engine: Any, settings: Any, as_of: datetime | None, users: list[str], features: list[str]
) -> sp.csr_matrix | None:
    """Epoch days of ``is_first_use`` events in the interaction window (None when the
    source never flags first uses)."""
    days = int(getattr(getattr(settings, "windows", None), "interaction_days", 90))
    params: dict[str, Any] = {"days": days}
    bound = "(SELECT MAX(timestamp) FROM events)"
    if as_of is not None:
        bound = "CAST($as_of AS TIMESTAMP)"
        params["as_of"] = as_of
    tbl = engine.query_arrow(
        f"""SELECT user_id, feature_category AS feature, MIN(timestamp) AS t
            FROM events
            WHERE event_type = 'feature_used' AND is_first_use AND feature_category IS NOT NULL
              AND timestamp <= {bound}
              AND timestamp >= CAST({bound} AS DATE) - $days * INTERVAL '1' DAY
            GROUP BY user_id, feature_category""",
        params,
    )
    if tbl.num_rows == 0:
        return None
    u_idx = {u: i for i, u in enumerate(users)}
    f_idx = {f: j for j, f in enumerate(features)}
    r = np.array([u_idx.get(u, -1) for u in tbl["user_id"].to_pylist()], dtype=np.int64)
    c = np.array([f_idx.get(f, -1) for f in tbl["feature"].to_pylist()], dtype=np.int64)
    t = epoch_days(tbl["t"])
    ok = (r >= 0) & (c >= 0) & np.isfinite(t)
    return sp.csr_matrix((t[ok], (r[ok], c[ok])), shape=(len(users), len(features)))
