"""The online-state snapshot: everything the serving process needs from the warehouse.

The pipeline stage ``export_serving_state`` reads the warehouse once (this is the only place
in serving where SQL runs) and writes a folder that loads in well under a second for ~72k
users, so the request path never touches SQL or pandas:

``meta.json``
    as-of, creation time, the item space (``features``), vocabularies of the categorical
    columns, the plan availability of each feature from the catalog config, and the flags.
``users.npz``
    one row per user: ids, categorical codes (role, plan, industry, team-size bucket), seat
    count, account age, event counts, last event time, and dense ``(users, features)``
    matrices: interaction strength (spec formula, from ``ml.user_feature_interactions``),
    adopted (ever used, as of the as-of time) and the most recent distinct features.
``facts.npz``
    the computed facts reasons may cite: per (role, team-size bucket) segment, the number of
    users and of adopters of each feature; per feature the number of adopters overall; and
    the feature transitions (``ml.feature_transition_probs``: probability, count, users).

Load with :meth:`OnlineSnapshot.load`; build from a warehouse with
:func:`build_snapshot`; the stage registers the folder as ``stage["output"]`` (by default
``state:/feature-recommender-online/latest``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from featurerec.config import Settings
from featurerec.errors import DataError, ModelError
from featurerec.models.base import TEAM_SIZE_BUCKETS
from featurerec.pipeline.contracts import StageContext, StageResult, stage_function

SNAPSHOT_FORMAT = 1
#: How many most-recent distinct features are kept per user (for the sequence model).
RECENT_FEATURES = 5
#: Bucket -> human text used by reasons (spec Stage 3 boundaries).
TEAM_SIZE_TEXT = {
    "small": "teams of 1–5",
    "medium": "teams of 6–20",
    "large": "teams of 21–100",
    "enterprise": "teams of over 100",
}


@dataclass(frozen=True)
class FlagRule:
    """One row of ``feature_flags``: who may see ``feature``."""

    flag_id: str
    feature: str
    enabled: bool
    #: 0-100; a user is in the rollout when their hash bucket is below it.
    rollout_percentage: float
    #: Segments the flag is limited to (role, plan, team-size bucket, industry, or
    #: ``key:value``); empty = everybody.
    target_segments: tuple[str, ...] = ()
    #: Plans the flag is limited to; None = every plan.
    plans: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Transition:
    """One row of ``ml.feature_transition_probs``."""

    from_feature: str
    to_feature: str
    probability: float
    count: int
    unique_users: int
    #: All transitions leaving ``from_feature`` in the window (the probability's denominator).
    from_total: int = 0


@dataclass
class OnlineSnapshot:
    """Columnar online state at ``as_of`` (see module doc for the files)."""

    as_of: datetime
    created_at: datetime
    features: list[str]
    user_ids: np.ndarray  # (n,) str
    workspace_ids: np.ndarray  # (n,) str ('' = unknown)
    role_codes: np.ndarray  # (n,) int16 into roles (-1 = unknown)
    plan_codes: np.ndarray  # (n,) int16 into plans
    industry_codes: np.ndarray  # (n,) int16 into industries
    bucket_codes: np.ndarray  # (n,) int8 into TEAM_SIZE_BUCKETS
    seat_count: np.ndarray  # (n,) int32 (-1 = unknown)
    account_age_days: np.ndarray  # (n,) int32, at as_of
    event_count: np.ndarray  # (n,) int32, feature_used events ever
    total_events_7d: np.ndarray  # (n,) int32
    features_used_7d: np.ndarray  # (n,) int32
    open_feature_tickets: np.ndarray  # (n,) int32
    last_event_at: np.ndarray  # (n,) datetime64[us] (NaT = none)
    strength: np.ndarray  # (n, m) float32
    adopted: np.ndarray  # (n, m) bool
    recent: np.ndarray  # (n, RECENT_FEATURES) int16, most recent last, -1 padded
    roles: list[str]
    plans: list[str]
    industries: list[str]
    flags: list[FlagRule]
    #: feature -> plans it is available on (catalog config); None = every plan.
    feature_plans: dict[str, list[str] | None]
    segment_roles: np.ndarray  # (S,) int16 role code
    segment_buckets: np.ndarray  # (S,) int8 bucket code
    segment_users: np.ndarray  # (S,) int64
    segment_adopters: np.ndarray  # (S, m) int64
    adopters: np.ndarray  # (m,) int64, users who ever used each feature
    transitions: list[Transition] = field(default_factory=list)
    path: Path | None = None

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    # -- persistence ---------------------------------------------------------------------
    def save(self, out: Path) -> Path:
        """Write the snapshot folder atomically (temp folder + rename)."""
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        np.savez(
            tmp / "users.npz",
            user_ids=self.user_ids.astype(str),
            workspace_ids=self.workspace_ids.astype(str),
            role_codes=self.role_codes,
            plan_codes=self.plan_codes,
            industry_codes=self.industry_codes,
            bucket_codes=self.bucket_codes,
            seat_count=self.seat_count,
            account_age_days=self.account_age_days,
            event_count=self.event_count,
            total_events_7d=self.total_events_7d,
            features_used_7d=self.features_used_7d,
            open_feature_tickets=self.open_feature_tickets,
            last_event_at=self.last_event_at.astype("datetime64[us]").astype(np.int64),
            strength=self.strength,
            adopted=self.adopted,
            recent=self.recent,
        )
        np.savez(
            tmp / "facts.npz",
            segment_roles=self.segment_roles,
            segment_buckets=self.segment_buckets,
            segment_users=self.segment_users,
            segment_adopters=self.segment_adopters,
            adopters=self.adopters,
        )
        meta = {
            "format": SNAPSHOT_FORMAT,
            "as_of": self.as_of.isoformat(),
            "created_at": self.created_at.isoformat(),
            "features": self.features,
            "roles": self.roles,
            "plans": self.plans,
            "industries": self.industries,
            "feature_plans": self.feature_plans,
            "flags": [f.__dict__ for f in self.flags],
            "transitions": [t.__dict__ for t in self.transitions],
            "n_users": self.n_users,
        }
        (tmp / "meta.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        self.path = out
        return out

    @classmethod
    def load(cls, path: str | Path) -> OnlineSnapshot:
        """Load a snapshot folder; raises :class:`ModelError` naming the file when broken."""
        p = Path(path)
        try:
            meta = orjson.loads((p / "meta.json").read_bytes())
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise ModelError(
                    f"online-state snapshot {p}: format {meta.get('format')!r} "
                    f"is not {SNAPSHOT_FORMAT}; re-run export_serving_state"
                )
            with np.load(p / "users.npz", allow_pickle=False) as u:
                users = {k: u[k] for k in u.files}
            with np.load(p / "facts.npz", allow_pickle=False) as f:
                facts = {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError, orjson.JSONDecodeError) as exc:
            raise ModelError(f"online-state snapshot {p} is missing or corrupt: {exc}") from None
        flags = [
            FlagRule(
                flag_id=d["flag_id"],
                feature=d["feature"],
                enabled=bool(d["enabled"]),
                rollout_percentage=float(d["rollout_percentage"]),
                target_segments=tuple(d.get("target_segments") or ()),
                plans=None if d.get("plans") is None else tuple(d["plans"]),
            )
            for d in meta["flags"]
        ]
        return cls(
            as_of=datetime.fromisoformat(meta["as_of"]),
            created_at=datetime.fromisoformat(meta["created_at"]),
            features=list(meta["features"]),
            user_ids=users["user_ids"],
            workspace_ids=users["workspace_ids"],
            role_codes=users["role_codes"],
            plan_codes=users["plan_codes"],
            industry_codes=users["industry_codes"],
            bucket_codes=users["bucket_codes"],
            seat_count=users["seat_count"],
            account_age_days=users["account_age_days"],
            event_count=users["event_count"],
            total_events_7d=users["total_events_7d"],
            features_used_7d=users["features_used_7d"],
            open_feature_tickets=users["open_feature_tickets"],
            last_event_at=users["last_event_at"].astype("datetime64[us]"),
            strength=users["strength"],
            adopted=users["adopted"],
            recent=users["recent"],
            roles=list(meta["roles"]),
            plans=list(meta["plans"]),
            industries=list(meta["industries"]),
            flags=flags,
            feature_plans=dict(meta["feature_plans"]),
            segment_roles=facts["segment_roles"],
            segment_buckets=facts["segment_buckets"],
            segment_users=facts["segment_users"],
            segment_adopters=facts["segment_adopters"],
            adopters=facts["adopters"],
            transitions=[Transition(**t) for t in meta["transitions"]],
            path=p,
        )


# -- building from the warehouse ---------------------------------------------------------

_CONTEXT_SQL = """
SELECT u.user_id, u.workspace_id, u.role, w.plan, w.industry, w.seat_count,
       DATE_DIFF('day', u.signup_date, CAST($as_of AS DATE)) AS account_age_days
FROM users u LEFT JOIN workspaces w ON u.workspace_id = w.workspace_id
"""

_ACTIVITY_SQL = """
SELECT user_id,
       ANY_VALUE(workspace_id) AS workspace_id,
       COUNT(*) FILTER (WHERE event_type = 'feature_used') AS event_count,
       COUNT(*) FILTER (WHERE timestamp > $as_of - INTERVAL 7 DAY) AS total_events_7d,
       COUNT(DISTINCT feature_category) FILTER (WHERE timestamp > $as_of - INTERVAL 7 DAY)
           AS features_used_7d,
       MAX(timestamp) AS last_event_at
FROM events
WHERE timestamp <= $as_of
GROUP BY user_id
"""

# Everything the adopted set and the recent features need, in one pass.
_USE_SQL = """
SELECT user_id, feature_category AS feature, MAX(timestamp) AS last_used
FROM events
WHERE event_type = 'feature_used' AND feature_category IS NOT NULL AND timestamp <= $as_of
GROUP BY user_id, feature_category
"""

_STRENGTH_SQL = """
SELECT user_id, feature, interaction_strength FROM ml.user_feature_interactions
"""

_TRANSITIONS_SQL = """
SELECT * FROM ml.feature_transition_probs
"""

_CONTEXT_VECTORS_SQL = """
SELECT user_id, features_used_count, total_events_7d, open_feature_tickets
FROM ml.user_context_vectors
"""

_FLAGS_SQL = """
SELECT flag_id, name, enabled, rollout_percentage, target_segments, plans
FROM feature_flags ORDER BY flag_id
"""


def _parse_list(raw: Any) -> tuple[str, ...] | None:
    """A list column stored as JSON text (``["a","b"]``) or comma-separated; None/'' = None."""
    if raw is None:
        return None
    if isinstance(raw, list | tuple):
        return tuple(str(x) for x in raw)
    text = str(raw).strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            return tuple(str(x) for x in orjson.loads(text))
        except orjson.JSONDecodeError:
            pass
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _codes(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    vocab = sorted({str(v) for v in values if v is not None and v != ""})
    index = {v: i for i, v in enumerate(vocab)}
    codes = np.fromiter(
        (index.get(str(v), -1) if v is not None else -1 for v in values),
        dtype=np.int16,
        count=len(values),
    )
    return codes, vocab


def _positions(col: pa.ChunkedArray, values: pa.Array) -> np.ndarray:
    """Index of each element of ``col`` in ``values`` (-1 where absent or null)."""
    idx = pc.fill_null(pc.index_in(col, value_set=values), -1)
    return np.asarray(idx.to_numpy(), dtype=np.int64)


def bucket_codes_of(seat_count: np.ndarray) -> np.ndarray:
    """Vectorised :func:`featurerec.models.base.team_size_bucket` (unknown seats = small)."""
    s = seat_count
    return np.select([s <= 5, s <= 20, s <= 100], [0, 1, 2], default=3).astype(np.int8)


def build_snapshot(engine: Any, settings: Settings, as_of: datetime) -> OnlineSnapshot:
    """Read the warehouse once and build the online state at ``as_of``.

    Needs the raw tables (``users``, ``workspaces``, ``events``, ``feature_flags``);
    ``ml.user_feature_interactions`` and ``ml.feature_transition_probs`` are used when the
    pipeline's transforms have written them (strength 0 / no transitions otherwise).
    """
    params = {"as_of": as_of}
    ctx_rows = engine.query_arrow(_CONTEXT_SQL, params).to_pydict()
    act = engine.query_arrow(_ACTIVITY_SQL, params).to_pydict()
    use = engine.query_arrow(_USE_SQL, params)
    if not ctx_rows["user_id"] and not act["user_id"]:
        raise DataError("export_serving_state: no users and no events in the warehouse")

    # The user axis: everybody in `users`, plus anybody seen only in events.
    user_ids = list(ctx_rows["user_id"])
    known = set(user_ids)
    extra = [u for u in act["user_id"] if u not in known]
    user_ids.extend(extra)
    n = len(user_ids)
    uindex = {u: i for i, u in enumerate(user_ids)}
    pad = [None] * len(extra)

    roles_col = list(ctx_rows["role"]) + pad
    plans_col = list(ctx_rows["plan"]) + pad
    ind_col = list(ctx_rows["industry"]) + pad
    role_codes, roles = _codes(roles_col)
    plan_codes, plans = _codes(plans_col)
    industry_codes, industries = _codes(ind_col)
    seat = np.array(
        [(-1 if s is None else int(s)) for s in list(ctx_rows["seat_count"]) + pad],
        dtype=np.int32,
    )
    age = np.array(
        [(0 if a is None else max(int(a), 0)) for a in list(ctx_rows["account_age_days"]) + pad],
        dtype=np.int32,
    )
    ws = np.array([w or "" for w in list(ctx_rows["workspace_id"]) + pad], dtype=object)

    event_count = np.zeros(n, dtype=np.int32)
    total_7d = np.zeros(n, dtype=np.int32)
    used_7d = np.zeros(n, dtype=np.int32)
    tickets = np.zeros(n, dtype=np.int32)
    last_event = np.full(n, np.datetime64("NaT"), dtype="datetime64[us]")
    if act["user_id"]:
        rows = np.array([uindex[u] for u in act["user_id"]], dtype=np.int64)
        event_count[rows] = np.asarray(act["event_count"], dtype=np.int32)
        total_7d[rows] = np.asarray(act["total_events_7d"], dtype=np.int32)
        used_7d[rows] = np.asarray(act["features_used_7d"], dtype=np.int32)
        last_event[rows] = np.array(act["last_event_at"], dtype="datetime64[us]")
        for r, w in zip(rows.tolist(), act["workspace_id"], strict=True):
            if not ws[r] and w:
                ws[r] = w

    if engine.table_exists("ml.user_context_vectors"):
        # The transforms' context vectors win where they exist (same windows as training).
        cv = engine.query_arrow(_CONTEXT_VECTORS_SQL).to_pydict()
        for u, a, b, c in zip(
            cv["user_id"],
            cv["features_used_count"],
            cv["total_events_7d"],
            cv["open_feature_tickets"],
            strict=True,
        ):
            r = uindex.get(u)
            if r is not None:
                used_7d[r], total_7d[r], tickets[r] = a or 0, b or 0, c or 0

    features = sorted(str(f) for f in pc.unique(use["feature"]).to_pylist() if f)
    if engine.table_exists("ml.user_feature_interactions"):
        strength_rows = engine.query_arrow(_STRENGTH_SQL)
    else:
        strength_rows = pa.table(
            {
                "user_id": pa.array([], pa.string()),
                "feature": pa.array([], pa.string()),
                "interaction_strength": pa.array([], pa.float64()),
            }
        )
    features = sorted(
        set(features) | {str(f) for f in pc.unique(strength_rows["feature"]).to_pylist() if f}
    )
    for name in settings.catalog.features:
        if name not in features:
            features.append(name)
    m = len(features)
    user_set, feature_set = pa.array(user_ids, pa.string()), pa.array(features, pa.string())

    adopted = np.zeros((n, m), dtype=bool)
    recent = np.full((n, RECENT_FEATURES), -1, dtype=np.int16)
    if use.num_rows:
        urows = _positions(use["user_id"], user_set)
        fcols = _positions(use["feature"], feature_set)
        t = use["last_used"].to_numpy().astype("datetime64[us]").astype(np.int64)
        ok = (urows >= 0) & (fcols >= 0)  # all, by construction of both axes
        urows, fcols, t = urows[ok], fcols[ok], t[ok]
        adopted[urows, fcols] = True
        # Most recent distinct features per user: sort by (user, last_used), take the tail.
        order = np.lexsort((t, urows))
        u_sorted, f_sorted = urows[order], fcols[order]
        ends = np.flatnonzero(np.r_[u_sorted[1:] != u_sorted[:-1], True]) + 1
        starts = np.r_[0, ends[:-1]]
        for s0, e0 in zip(starts.tolist(), ends.tolist(), strict=True):
            tail = f_sorted[max(s0, e0 - RECENT_FEATURES) : e0]
            recent[u_sorted[s0], RECENT_FEATURES - len(tail) :] = tail

    strength = np.zeros((n, m), dtype=np.float32)
    if strength_rows.num_rows:
        r = _positions(strength_rows["user_id"], user_set)
        c = _positions(strength_rows["feature"], feature_set)
        v = pc.fill_null(pc.cast(strength_rows["interaction_strength"], pa.float64()), np.nan)
        vals = v.to_numpy()
        ok = (r >= 0) & (c >= 0) & ~np.isnan(vals)
        strength[r[ok], c[ok]] = vals[ok]

    bucket_codes = bucket_codes_of(np.where(seat < 0, 0, seat))

    # Facts for reasons: adoption share per (role, team-size bucket) segment.
    seg_key = role_codes.astype(np.int64) * 16 + bucket_codes.astype(np.int64)
    valid = role_codes >= 0
    keys, inverse = np.unique(seg_key[valid], return_inverse=True)
    seg_users = np.bincount(inverse, minlength=len(keys)).astype(np.int64)
    seg_adopters = np.zeros((len(keys), m), dtype=np.int64)
    np.add.at(seg_adopters, inverse, adopted[valid].astype(np.int64))

    flags: list[FlagRule] = []
    if engine.table_exists("feature_flags"):
        for r in engine.query_rows(_FLAGS_SQL):
            flags.append(
                FlagRule(
                    flag_id=str(r["flag_id"]),
                    feature=str(r["name"]),
                    enabled=bool(r["enabled"]),
                    rollout_percentage=100.0
                    if r["rollout_percentage"] is None
                    else float(r["rollout_percentage"]),
                    target_segments=_parse_list(r["target_segments"]) or (),
                    plans=_parse_list(r["plans"]),
                )
            )

    transitions: list[Transition] = []
    if engine.table_exists("ml.feature_transition_probs"):
        for r in engine.query_rows(_TRANSITIONS_SQL):
            transitions.append(
                Transition(
                    from_feature=str(r["from_feature"]),
                    to_feature=str(r["to_feature"]),
                    probability=float(r["transition_prob"]),
                    count=int(r["transition_count"]),
                    unique_users=int(r.get("unique_users") or 0),
                    from_total=int(
                        r.get("from_total")
                        or round(
                            int(r["transition_count"]) / max(float(r["transition_prob"]), 1e-9)
                        )
                    ),
                )
            )

    feature_plans = {
        f: (
            list(settings.catalog.features[f].plans)  # type: ignore[arg-type]
            if f in settings.catalog.features and settings.catalog.features[f].plans is not None
            else None
        )
        for f in features
    }
    return OnlineSnapshot(
        as_of=as_of,
        created_at=datetime.now(UTC).replace(tzinfo=None),
        features=features,
        user_ids=np.array(user_ids, dtype=str),
        workspace_ids=ws.astype(str),
        role_codes=role_codes,
        plan_codes=plan_codes,
        industry_codes=industry_codes,
        bucket_codes=bucket_codes,
        seat_count=seat,
        account_age_days=age,
        event_count=event_count,
        total_events_7d=total_7d,
        features_used_7d=used_7d,
        open_feature_tickets=tickets,
        last_event_at=last_event,
        strength=strength,
        adopted=adopted,
        recent=recent,
        roles=roles,
        plans=plans,
        industries=industries,
        flags=flags,
        feature_plans=feature_plans,
        segment_roles=(keys // 16).astype(np.int16),
        segment_buckets=(keys % 16).astype(np.int8),
        segment_users=seg_users,
        segment_adopters=seg_adopters,
        adopters=adopted.sum(axis=0).astype(np.int64),
        transitions=transitions,
    )


@stage_function("export_serving_state")
def export_serving_state(ctx: StageContext) -> StageResult:
    """Pipeline stage: write the online-state snapshot into ``ctx.work_dir``.

    The runner registers ``work_dir`` under the stage's ``output`` (for example
    ``state:/feature-recommender-online/latest``), which serving resolves at start and polls
    for hot reload.
    """
    ctx.progress(0, 2, "reading warehouse")
    snap = build_snapshot(ctx.engine, ctx.settings, ctx.as_of)
    ctx.progress(1, 2, "writing snapshot")
    out = snap.save(Path(ctx.work_dir) / "online_state")
    ctx.progress(2, 2, "done")
    return StageResult(
        artifact_dir=out,
        params={"as_of": ctx.as_of.isoformat(), "recent_features": RECENT_FEATURES},
        metrics={
            "users": float(snap.n_users),
            "features": float(len(snap.features)),
            "flags": float(len(snap.flags)),
            "transitions": float(len(snap.transitions)),
        },
        rows=snap.n_users,
        summary=f"{snap.n_users:,} users, {len(snap.features)} features",
    )


def team_size_bucket_name(code: int) -> str:
    return TEAM_SIZE_BUCKETS[int(code)]
