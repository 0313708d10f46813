"""The serving process's online state: the snapshot in memory, kept current by events.

Built from an :class:`~featurerec.serving.snapshot.OnlineSnapshot` (the warehouse as of the
last pipeline run), then updated in place by

* product events accepted at ``POST /api/v1/events`` (and replayed from the landing folder
  at start, so "not already adopted as of the latest accepted event" survives restarts):
  a ``feature_used`` event marks the feature adopted, moves it to the end of the user's
  recent features and counts the event; ``user_traits`` update the user's context; a user
  the snapshot does not know gets a row;
* served recommendations (frequency cap, weekly diversity) and feedback (dismissals),
  rebuilt at start from the recommendation log.

Reads on the request path are plain array lookups (no SQL, no pandas). Writers take a lock;
readers copy the few values they need, so a request sees each user's state either before or
after an update, never half of one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from featurerec.models.base import TEAM_SIZE_BUCKETS, UserContext, UserState, team_size_bucket
from featurerec.serving.eligibility import WEEK_SECONDS, Exposure, UserAttributes
from featurerec.serving.snapshot import RECENT_FEATURES, OnlineSnapshot

#: Interaction strength given to a feature first used after the snapshot: the spec's formula
#: (Stage 3) for one use on one active day, today: 0.4*1/100 + 0.3*1/30 + 0.3*1/10.
FIRST_USE_STRENGTH = 0.4 * (1 / 100) + 0.3 * (1 / 30) + 0.3 * (1 / 1) / 10
#: Event ids remembered for replay dedupe.
_MAX_SEEN_EVENTS = 1_000_000


def epoch_seconds(ts: datetime) -> float:
    """UTC-naive datetime -> epoch seconds (the unit the exposure history uses)."""
    return (ts - _EPOCH).total_seconds()


_EPOCH = datetime(1970, 1, 1)


class _Vocab:
    """A growable string <-> code mapping for a categorical column."""

    def __init__(self, values: list[str]) -> None:
        self.values = list(values)
        self.index = {v: i for i, v in enumerate(self.values)}

    def code(self, value: str | None) -> int:
        if value is None or value == "":
            return -1
        c = self.index.get(value)
        if c is None:
            c = len(self.values)
            self.values.append(value)
            self.index[value] = c
        return c

    def name(self, code: int) -> str | None:
        return self.values[code] if code >= 0 else None


class OnlineState:
    """Per-user context, adoption, recent features, exposure and dismissals, in memory."""

    _ROW_ARRAYS = (
        "role_codes",
        "plan_codes",
        "industry_codes",
        "bucket_codes",
        "seat_count",
        "account_age_days",
        "event_count",
        "total_events_7d",
        "features_used_7d",
        "open_feature_tickets",
        "strength",
        "adopted",
        "recent",
    )

    def __init__(self, snapshot: OnlineSnapshot) -> None:
        self.snapshot = snapshot
        self.features: list[str] = list(snapshot.features)
        self.findex = {f: j for j, f in enumerate(self.features)}
        self.as_of = snapshot.as_of
        self._n = snapshot.n_users
        self._user_ids: list[str] = snapshot.user_ids.tolist()
        self._uindex: dict[str, int] = dict(zip(self._user_ids, range(self._n), strict=True))
        self._workspace: list[str] = snapshot.workspace_ids.tolist()
        self.roles = _Vocab(snapshot.roles)
        self.plans = _Vocab(snapshot.plans)
        self.industries = _Vocab(snapshot.industries)
        # Own copies: the snapshot stays what was loaded.
        self.role_codes = snapshot.role_codes.copy()
        self.plan_codes = snapshot.plan_codes.copy()
        self.industry_codes = snapshot.industry_codes.copy()
        self.bucket_codes = snapshot.bucket_codes.copy()
        self.seat_count = snapshot.seat_count.copy()
        self.account_age_days = snapshot.account_age_days.copy()
        self.event_count = snapshot.event_count.copy()
        self.total_events_7d = snapshot.total_events_7d.copy()
        self.features_used_7d = snapshot.features_used_7d.copy()
        self.open_feature_tickets = snapshot.open_feature_tickets.copy()
        self.strength = snapshot.strength.copy()
        self.adopted = snapshot.adopted.copy()
        self.recent = snapshot.recent.copy()
        self._shown: dict[int, list[tuple[float, int]]] = {}
        self._dismissed: dict[int, dict[int, float]] = {}
        self._seen_events: dict[str, None] = {}
        self._lock = threading.RLock()
        #: Timestamp of the latest accepted event (the snapshot's as-of until one arrives).
        self.latest_event_at: datetime = snapshot.as_of
        self.events_applied = 0

    # -- lookups -------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return self._n

    def row_of(self, user_id: str) -> int | None:
        return self._uindex.get(user_id)

    def attributes(self, row: int) -> UserAttributes:
        return UserAttributes(
            user_id=self._user_ids[row],
            role=self.roles.name(int(self.role_codes[row])),
            plan=self.plans.name(int(self.plan_codes[row])),
            team_size_bucket=TEAM_SIZE_BUCKETS[int(self.bucket_codes[row])],
            industry=self.industries.name(int(self.industry_codes[row])),
            workspace_id=self._workspace[row] or None,
        )

    def context(self, row: int) -> UserContext:
        seats = int(self.seat_count[row])
        return UserContext(
            role=self.roles.name(int(self.role_codes[row])),
            plan=self.plans.name(int(self.plan_codes[row])),
            seat_count=None if seats < 0 else seats,
            team_size_bucket=TEAM_SIZE_BUCKETS[int(self.bucket_codes[row])],
            industry=self.industries.name(int(self.industry_codes[row])),
            account_age_days=int(self.account_age_days[row]),
            features_used_count=int(self.features_used_7d[row]),
            total_events_7d=int(self.total_events_7d[row]),
            open_feature_tickets=int(self.open_feature_tickets[row]),
        )

    def user_state(self, row: int) -> UserState:
        """The :class:`UserState` a strategy scores (built from arrays, ≤ a few dozen items)."""
        with self._lock:
            strength = self.strength[row]
            adopted = self.adopted[row]
            cols = np.flatnonzero(adopted | (strength > 0))
            interactions = {
                self.features[j]: float(max(strength[j], FIRST_USE_STRENGTH if adopted[j] else 0))
                for j in cols.tolist()
            }
            recent = tuple(self.features[j] for j in self.recent[row].tolist() if j >= 0)
            return UserState(
                user_id=self._user_ids[row],
                context=self.context(row),
                interactions=interactions,
                recent_features=recent,
                event_count=int(self.event_count[row]),
            )

    def all_user_states(self) -> list[UserState]:
        """Every user's state (model warm-up at load time, not the request path)."""
        return [self.user_state(r) for r in range(self._n)]

    def adopted_row(self, row: int) -> np.ndarray:
        with self._lock:
            return self.adopted[row].copy()

    def recent_features(self, row: int) -> list[int]:
        return [j for j in self.recent[row].tolist() if j >= 0]

    def exposure(self, row: int | None, now: float) -> Exposure:
        """What ``row`` was shown in the 7 days before ``now`` and when it last dismissed
        each feature."""
        m = len(self.features)
        if row is None:
            return Exposure.empty(m)
        with self._lock:
            shown = self._shown.get(row)
            counts = np.zeros(m, dtype=np.int32)
            if shown:
                cutoff = now - WEEK_SECONDS
                if shown[0][0] <= cutoff:
                    shown[:] = [s for s in shown if s[0] > cutoff]
                for ts, j in shown:
                    if ts <= now:
                        counts[j] += 1
            dismissed = np.full(m, -np.inf)
            for j, ts in self._dismissed.get(row, {}).items():
                dismissed[j] = ts
        return Exposure(counts, dismissed)

    # -- updates -------------------------------------------------------------------------
    def _grow(self) -> None:
        cap = self.role_codes.shape[0]
        if self._n < cap:
            return
        extra = max(1024, cap // 2)
        for name in self._ROW_ARRAYS:
            arr = getattr(self, name)
            fill = -1 if name in ("role_codes", "plan_codes", "industry_codes", "recent") else 0
            if name == "seat_count":
                fill = -1
            pad = np.full((extra, *arr.shape[1:]), fill, dtype=arr.dtype)
            setattr(self, name, np.concatenate([arr, pad]))

    def ensure_row(self, user_id: str) -> int:
        """The user's row, created (cold, unknown context) when the snapshot lacks it."""
        with self._lock:
            row = self._uindex.get(user_id)
            if row is not None:
                return row
            self._grow()
            row = self._n
            self._n += 1
            self._user_ids.append(user_id)
            self._workspace.append("")
            self._uindex[user_id] = row
            return row

    def apply_traits(self, row: int, traits: dict[str, Any]) -> None:
        """Update context from an event's ``user_traits`` (role, plan, team_size, industry)."""
        with self._lock:
            if traits.get("role"):
                self.role_codes[row] = self.roles.code(str(traits["role"]))
            if traits.get("plan"):
                self.plan_codes[row] = self.plans.code(str(traits["plan"]))
            if traits.get("industry"):
                self.industry_codes[row] = self.industries.code(str(traits["industry"]))
            size = traits.get("team_size", traits.get("seat_count"))
            if isinstance(size, int | float) and not isinstance(size, bool):
                self.seat_count[row] = int(size)
                self.bucket_codes[row] = TEAM_SIZE_BUCKETS.index(team_size_bucket(int(size)))

    def apply_events(self, table: pa.Table) -> int:
        """Apply accepted events (``EVENT_ARROW_SCHEMA`` columns); returns how many were new.

        Idempotent by ``event_id``: replaying a landed file twice changes nothing.
        """
        if table.num_rows == 0:
            return 0
        cols = table.select(
            [
                "event_id",
                "user_id",
                "workspace_id",
                "event_type",
                "timestamp",
                "feature_category",
                "user_traits",
            ]
        ).to_pydict()
        applied = 0
        with self._lock:
            for eid, uid, ws, etype, ts, feat, traits in zip(
                cols["event_id"],
                cols["user_id"],
                cols["workspace_id"],
                cols["event_type"],
                cols["timestamp"],
                cols["feature_category"],
                cols["user_traits"],
                strict=True,
            ):
                if eid in self._seen_events:
                    continue
                self._seen_events[eid] = None
                if len(self._seen_events) > _MAX_SEEN_EVENTS:
                    self._seen_events.pop(next(iter(self._seen_events)))
                row = self.ensure_row(uid)
                if ws and not self._workspace[row]:
                    self._workspace[row] = ws
                if traits:
                    try:
                        parsed = orjson.loads(traits)
                    except orjson.JSONDecodeError:
                        parsed = None
                    if isinstance(parsed, dict):
                        self.apply_traits(row, parsed)
                if etype == "feature_used":
                    self.event_count[row] += 1
                    j = self.findex.get(feat) if feat else None
                    if j is not None:
                        self._use(row, j)
                if ts is not None and ts > self.latest_event_at:
                    self.latest_event_at = ts
                applied += 1
            self.events_applied += applied
        return applied

    def _use(self, row: int, j: int) -> None:
        self.adopted[row, j] = True
        if self.strength[row, j] <= 0:
            self.strength[row, j] = FIRST_USE_STRENGTH
        rec = [x for x in self.recent[row].tolist() if x >= 0 and x != j]
        rec.append(j)
        rec = rec[-RECENT_FEATURES:]
        self.recent[row, :] = -1
        self.recent[row, RECENT_FEATURES - len(rec) :] = rec

    def record_served(self, user_id: str, feature_ids: Iterable[int], ts: float) -> None:
        """Remember what was served to ``user_id`` at epoch ``ts`` (frequency cap, diversity)."""
        ids = list(feature_ids)
        if not ids:
            return
        with self._lock:
            row = self.ensure_row(user_id)
            hist = self._shown.setdefault(row, [])
            hist.extend((ts, j) for j in ids)
            first_new = len(hist) - len(ids)
            if first_new > 0 and hist[first_new][0] < hist[first_new - 1][0]:
                hist.sort()

    def record_dismissal(self, user_id: str, feature: str, ts: float) -> None:
        j = self.findex.get(feature)
        if j is None:
            return
        with self._lock:
            row = self.ensure_row(user_id)
            d = self._dismissed.setdefault(row, {})
            d[j] = max(ts, d.get(j, -np.inf))

    def adopt_history(self, old: OnlineState) -> None:
        """Carry exposure and dismissals over from the state this one replaces."""
        with old._lock:
            shown = {old._user_ids[r]: list(h) for r, h in old._shown.items()}
            dismissed = {old._user_ids[r]: dict(d) for r, d in old._dismissed.items()}
            old_features = old.features
        remap = {j: self.findex.get(f) for j, f in enumerate(old_features)}
        for uid, hist in shown.items():
            moved = [(ts, remap[j]) for ts, j in hist if remap.get(j) is not None]
            if moved:
                with self._lock:
                    row = self.ensure_row(uid)
                    self._shown[row] = sorted(moved)  # type: ignore[arg-type]
        for uid, d in dismissed.items():
            for j, ts in d.items():
                if remap.get(j) is not None:
                    self.record_dismissal(uid, old_features[j], ts)
