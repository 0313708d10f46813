"""Loading what serving needs from the registry, and the adapter to MODELS' strategies.

* :class:`BundleModel` wraps a :class:`featurerec.models.strategies.ModelBundle` as a
  :class:`~featurerec.serving.service.ServingModel`: stage 1 is the strategy's
  ``candidates`` (``top_k`` from the deployment, ANN index when the bundle has one; context
  candidates for cold-start users), stage 2 is the strategy's ranking (bandit for hybrid and
  sequence_aware) taken greedily, then the epsilon-greedy slate policy with the
  deployment's ``exploration_rate`` on top (exact propensities, same policy as
  :mod:`featurerec.models.ranking`).
* :func:`load_model` resolves the deployment's three URIs (ranker required; MF model and
  index optional) and raises :class:`ModelError` when the bundle is missing or corrupt.
* :func:`pointers` reads the registry's current versions without hashing anything, for the
  hot-reload poll.
* :func:`load_online_state` resolves the snapshot (``state:/...``), builds the
  :class:`OnlineState`, replays landed events newer than the snapshot and rebuilds the
  exposure / dismissal history from the recommendation log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from featurerec.errors import ModelError
from featurerec.models.base import UserState
from featurerec.models.ranking import Ranked, epsilon_slates
from featurerec.serving.deployment import DeploymentSpec
from featurerec.serving.reclog import (
    CONTEXT_RECORD,
    FEEDBACK_PREFIX,
    RECLOG_PREFIX,
    _parse_ts,
    iter_recommendations,
    iter_records,
    segments,
)
from featurerec.serving.snapshot import OnlineSnapshot
from featurerec.serving.state import OnlineState, epoch_seconds

log = logging.getLogger(__name__)

#: Tried in order when the requested strategy needs components the bundle lacks.
_STRATEGY_FALLBACKS = ("sequence_aware", "hybrid", "content_based", "popularity")
_LRU_SIZE = 100_000


def user_key(user: UserState) -> int:
    """Hash of everything a strategy reads from a :class:`UserState`."""
    return hash(
        (
            tuple(sorted(user.interactions.items())),
            user.recent_features,
            user.context,
            user.event_count,
        )
    )


class _ScoreTable:
    """Per-user, per-item results of one strategy with nothing excluded.

    ``upstream``: candidate-stage score; ``rank``: position of the item in the strategy's
    greedy (bandit) order; ``shown``: the 0..1 score the strategy reports for it.
    """

    def __init__(self, n_items: int) -> None:
        self.row: dict[str, int] = {}
        self.key = np.zeros(0, dtype=np.int64)
        self.upstream = np.zeros((0, n_items), dtype=np.float32)
        self.rank = np.zeros((0, n_items), dtype=np.int32)
        self.shown = np.zeros((0, n_items), dtype=np.float32)
        self.lru: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = (
            OrderedDict()
        )


class BundleModel:
    """A model bundle served through the strategies API (see module doc).

    A strategy's greedy ranking of an item for a user does not depend on which other items
    are eligible (the bandit scores each (user, item) on its own, and candidates are the
    ``top_k`` eligible items by upstream score). So each user's full, unexcluded result is
    computed once with the strategies API, in batches when the model loads (and again, for
    one user, when that user's state changes), and a request only filters it by the
    eligibility mask, takes the ``top_k`` candidates by upstream score, orders them by the
    strategy's greedy order and applies the exploring slate policy: numpy on ≤ a few dozen
    items. ``tests/test_serving_fastpath.py`` checks this equals calling
    ``strategy.recommend`` directly.
    """

    is_fallback = False

    def __init__(
        self,
        bundle: Any,
        version: str,
        users: Sequence[UserState] | Callable[[], Sequence[UserState]] | None = None,
        warm: Sequence[str] = (),
        batch: int = 8192,
    ) -> None:
        self.bundle = bundle
        self.version = version
        self.features: list[str] = list(bundle.features)
        self.n_items = len(self.features)
        self._strategies: dict[str, Any] = {}
        self._available = set(bundle.available())
        self._tables: dict[str, _ScoreTable] = {}
        self._lock = threading.Lock()
        #: The users whose results are precomputed per strategy: a list, or a callable that
        #: rebuilds it (so the server does not keep 72k UserState objects alive).
        self._users: Sequence[UserState] | Callable[[], Sequence[UserState]] = (
            users if callable(users) else list(users or [])
        )
        self._batch = batch
        for name in warm:
            self._table(self.strategy_name(name))

    def strategy_name(self, requested: str) -> str:
        if requested in self._available:
            return requested
        for name in _STRATEGY_FALLBACKS:
            if name in self._available:
                return name
        raise ModelError(f"bundle {self.version} serves none of {_STRATEGY_FALLBACKS}")

    def _strategy(self, name: str) -> Any:
        strat = self._strategies.get(name)
        if strat is None:
            strat = self._strategies[name] = self.bundle.strategy(name)
        return strat

    def full_results(
        self, name: str, users: Sequence[UserState]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(upstream, greedy rank, shown score), each (n, n_items), nothing excluded."""
        strat = self._strategy(name)
        n, m = len(users), self.n_items
        ids, ups = strat.candidates(users, m, np.zeros((n, m), dtype=bool))
        ranked = strat.rank(users, ids, ups, m, np.random.default_rng(0), explore=False)
        rows = np.arange(n)[:, None]
        upstream = np.full((n, m), -np.inf, dtype=np.float32)
        safe = np.maximum(ids, 0)
        upstream[rows, safe] = np.where(ids >= 0, ups, -np.inf)
        rank = np.full((n, m), m, dtype=np.int32)
        shown = np.zeros((n, m), dtype=np.float32)
        rid = ranked.ids
        pos = np.broadcast_to(np.arange(rid.shape[1], dtype=np.int32), rid.shape)
        ok = rid >= 0
        rank[np.nonzero(ok)[0], rid[ok]] = pos[ok]
        shown[np.nonzero(ok)[0], rid[ok]] = ranked.scores[ok]
        return upstream, rank, shown

    def _table(self, name: str) -> _ScoreTable:
        table = self._tables.get(name)
        if table is not None:
            return table
        with self._lock:
            table = self._tables.get(name)
            if table is not None:
                return table
            table = _ScoreTable(self.n_items)
            users = self._users() if callable(self._users) else self._users
            parts = [
                self.full_results(name, users[s : s + self._batch])
                for s in range(0, len(users), self._batch)
            ]
            if parts:
                table.upstream = np.vstack([p[0] for p in parts])
                table.rank = np.vstack([p[1] for p in parts])
                table.shown = np.vstack([p[2] for p in parts])
            table.key = np.fromiter((user_key(u) for u in users), np.int64, len(users))
            table.row = {u.user_id: i for i, u in enumerate(users)}
            self._tables[name] = table
            return table

    def lookup(self, name: str, user: UserState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``full_results`` of one user (upstream, greedy rank, shown score), from the
        precomputed table while the user's state is unchanged, else computed and cached:
        what a request filters, and what an offline policy model needs for its slate
        probabilities (the simulator's logging propensities)."""
        table = self._table(name)
        key = user_key(user)
        row = table.row.get(user.user_id)
        if row is not None and table.key[row] == key:
            return table.upstream[row], table.rank[row], table.shown[row]
        hit = table.lru.get((user.user_id, key))
        if hit is not None:
            return hit
        up, rk, sh = self.full_results(name, [user])
        res = (up[0], rk[0], sh[0])
        table.lru[(user.user_id, key)] = res
        while len(table.lru) > _LRU_SIZE:
            table.lru.popitem(last=False)
        return res

    def recommend(
        self,
        strategy: str,
        user: UserState,
        exclude: np.ndarray,
        k: int,
        top_k: int,
        exploration_rate: float,
        rng: np.random.Generator,
    ) -> Ranked:
        name = self.strategy_name(strategy)
        upstream, rank, shown = self.lookup(name, user)
        valid = ~exclude & np.isfinite(upstream)
        cand = np.flatnonzero(valid)
        if len(cand) > top_k:  # stage 1: top_k eligible by upstream score
            order = np.argsort(-upstream[cand], kind="stable")[:top_k]
            cand = cand[order]
        # stage 2: the strategy's greedy order over the candidates
        cand = cand[np.argsort(rank[cand], kind="stable")]
        c = max(len(cand), 1)
        order_score = -np.arange(c, dtype=np.float64)[None, :]
        cand_valid = np.zeros((1, c), dtype=bool)
        cand_valid[0, : len(cand)] = True
        eps = 1.0 if name == "random" else exploration_rate
        cols, prop, explored = epsilon_slates(order_score, cand_valid, k, eps, rng, explore=True)
        safe = np.minimum(np.maximum(cols, 0), max(len(cand) - 1, 0))
        picked = cand[safe] if len(cand) else np.zeros_like(safe)
        ids = np.where(cols >= 0, picked, -1)
        scores = np.where(cols >= 0, shown[np.maximum(ids, 0)], 0.0)
        return Ranked(
            ids=ids.astype(np.int64),
            scores=scores.astype(np.float32),
            propensities=prop,
            explored=explored,
        )


def _resolve_optional(registry: Any, uri: str | None) -> Any:
    if not uri:
        return None
    try:
        return registry.resolve(uri)
    except ModelError as exc:
        log.warning("serving: %s (continuing without it)", exc)
        return None


def load_model(
    registry: Any,
    deployment: DeploymentSpec,
    state: OnlineState | None = None,
    warm: Sequence[str] = (),
) -> BundleModel:
    """The production bundle named by the deployment; :class:`ModelError` if unusable.

    With ``state``, the bundle is accelerated for the request path (user factors of every
    known user precomputed, see :mod:`featurerec.serving.fastpath`).
    """
    from featurerec.models.strategies import load_bundle
    from featurerec.serving.fastpath import accelerate

    dep = deployment.models
    ranker = registry.resolve(dep.ranker.model_uri)
    mf = _resolve_optional(registry, dep.candidate_generator.model_uri)
    index = _resolve_optional(registry, dep.candidate_generator.ann_index) if mf else None
    try:
        bundle = load_bundle(
            ranker=ranker.path,
            mf=mf.path if mf is not None else None,
            index=index.path if index is not None else None,
        )
        users = state.all_user_states() if state is not None else []
        if users:
            bundle = accelerate(bundle, users)
    except Exception as exc:  # a corrupt artifact can fail in numpy / json / faiss
        raise ModelError(f"model bundle {ranker.uri} failed to load: {exc}") from None
    parts = [f"{ranker.name}@{ranker.version}"]
    if mf is not None:
        parts.insert(0, f"{mf.name}@{mf.version}")
    try:
        model = BundleModel(bundle, f"{deployment.name}:{'+'.join(parts)}", users, warm)
        if state is not None:  # later strategies rebuild the user list on demand
            model._users = state.all_user_states
        return model
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model bundle {ranker.uri} failed to score users: {exc}") from None


def pointers(registry: Any, deployment: DeploymentSpec) -> dict[str, int | None]:
    """Current version number behind each URI (no hashing; None where unresolvable)."""
    dep = deployment.models
    out: dict[str, int | None] = {}
    for uri in (
        dep.ranker.model_uri,
        dep.candidate_generator.model_uri,
        dep.candidate_generator.ann_index,
        dep.online_state.uri,
    ):
        if not uri:
            continue
        try:
            out[uri] = int(registry.lookup(uri).version)
        except (ModelError, OSError, ValueError):
            out[uri] = None
    return out


# -- online state ------------------------------------------------------------------------


def snapshot_path(settings: Any, registry: Any, deployment: DeploymentSpec) -> Path:
    """The snapshot folder: the registry's ``state:/...`` version, else the local export
    (``<data>/serving/snapshot``, written by ``featurerec serving export-state``)."""
    try:
        return Path(registry.resolve(deployment.models.online_state.uri).path)
    except ModelError as exc:
        local = Path(settings.data_path) / "serving" / "snapshot"
        if (local / "meta.json").exists():
            return local
        raise ModelError(
            f"no online-state snapshot: {exc}; run the pipeline (stage export_serving_state) "
            "or `featurerec serving export-state`"
        ) from None


def landing_dir(settings: Any) -> Path:
    """Where the HTTP server lands accepted events (INGEST's Landing folder)."""
    return Path(settings.data_path) / "landing"


def landed_tables(directory: Path, since: float | None = None) -> Iterator[pa.Table]:
    """Accepted-event tables landed under ``directory`` (modified at or after ``since``).

    Reads INGEST's landing files (Arrow IPC / Parquet with the event columns)."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    if not directory.exists():
        return
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.suffix in (".arrow", ".parquet", ".feather") and ".tmp" not in p.name
    )
    for p in files:
        if since is not None and p.stat().st_mtime < since:
            continue
        try:
            if p.suffix == ".parquet":
                yield pq.read_table(p)
            else:
                with pa.memory_map(str(p)) as src:
                    try:
                        yield ipc.open_file(src).read_all()
                    except pa.ArrowInvalid:
                        src.seek(0)
                        yield ipc.open_stream(src).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("serving: skipping unreadable landed file %s: %s", p, exc)


def replay_landing(state: OnlineState, directory: Path, since: float | None = None) -> int:
    """Apply landed events to ``state`` (idempotent by event id); returns events applied."""
    applied = 0
    for table in landed_tables(directory, since):
        if "event_id" in table.column_names:
            applied += state.apply_events(table)
    return applied


def rebuild_exposure(
    state: OnlineState, log_dir: Path, now: float, history_days: float
) -> dict[str, tuple[str, str]]:
    """Re-read the rec log / feedback log of the last ``history_days`` into ``state``.

    Returns recommendation_id -> (user_id, feature) for the recommendations read, so
    feedback for them can be applied after a restart.
    """
    since = now - history_days * 86_400.0
    served: dict[str, tuple[str, str]] = {}
    for r in iter_recommendations(log_dir, since=since):
        ts = _parse_ts(r.get("generated_at"))
        if ts is None:
            continue
        t = epoch_seconds(ts)
        feature = r.get("recommended_feature")
        j = state.findex.get(feature) if feature else None
        served[str(r["recommendation_id"])] = (str(r["user_id"]), str(feature))
        if j is not None and t > now - 7 * 86_400.0:
            state.record_served(str(r["user_id"]), [j], t)
    for f in iter_records(log_dir, FEEDBACK_PREFIX, since=since):
        if f.get("kind") != "dismiss":
            continue
        ts = _parse_ts(f.get("timestamp"))
        target = served.get(str(f.get("recommendation_id")))
        user = f.get("user_id") or (target[0] if target else None)
        feature = f.get("feature") or (target[1] if target else None)
        if ts is not None and user and feature:
            state.record_dismissal(str(user), str(feature), epoch_seconds(ts))
    return served


def load_online_state(
    settings: Any,
    registry: Any,
    deployment: DeploymentSpec,
    *,
    log_dir: Path | None = None,
    now: float | None = None,
) -> tuple[OnlineState, dict[str, tuple[str, str]]]:
    """Snapshot + landed events since it + exposure from the logs (see module doc)."""
    from featurerec.serving.reclog import reclog_dir

    t0 = time.perf_counter()
    snap = OnlineSnapshot.load(snapshot_path(settings, registry, deployment))
    state = OnlineState(snap)
    # Landed files older than the snapshot's creation were drained before it was taken;
    # a margin covers files landed while the export ran. Replays are idempotent anyway.
    since = epoch_seconds(snap.created_at) - 3600.0
    replayed = replay_landing(state, landing_dir(settings), since=since)
    now = time.time() if now is None else now
    history = max(7, settings.serving.dismissal_cooldown_days) + 1
    served = rebuild_exposure(state, log_dir or reclog_dir(settings), now, history)
    log.info(
        "serving: online state for %d users loaded in %.2fs (%d landed events replayed)",
        state.n_users,
        time.perf_counter() - t0,
        replayed,
    )
    return state, served


class StateSync:
    """Keeps one process's online state in step with what other processes accepted.

    Every ``serving.sync_interval_seconds`` (a thread of the server) it applies

    * event files landed by anyone (other workers, the Kafka consumer, the Segment intake),
      read once each (idempotent by event id anyway);
    * lines appended to other workers' recommendation and feedback logs (served features
      count toward frequency caps and diversity; dismissals start the cooldown).

    With one worker and no other producers it finds nothing to do.
    """

    def __init__(
        self, state_getter: Any, landing: Path, log_dir: Path, served: dict[str, Any]
    ) -> None:
        self._state = state_getter
        self.landing = landing
        self.log_dir = log_dir
        self.served = served
        self._seen_files: set[str] = set()
        self._offsets: dict[str, int] = {}
        self._own = f"-{os.getpid()}-"
        self.events_applied = 0
        # Everything already on disk at start was replayed by load_online_state.
        for p in self._landed_files():
            self._seen_files.add(p.name)
        for prefix in (RECLOG_PREFIX, FEEDBACK_PREFIX):
            for p in segments(log_dir, prefix):
                self._offsets[str(p)] = p.stat().st_size

    def mark_seen(self, path: str | Path) -> None:
        self._seen_files.add(Path(path).name)

    def _landed_files(self) -> list[Path]:
        out: list[Path] = []
        for sub in ("pending", "done"):
            d = self.landing / sub
            if d.is_dir():
                out.extend(p for p in d.iterdir() if p.name.endswith(".events.parquet"))
        return out

    def run_once(self) -> int:
        import pyarrow.parquet as pq

        state: OnlineState = self._state()
        changed = 0
        for p in sorted(self._landed_files(), key=lambda x: x.name):
            if p.name in self._seen_files:
                continue
            self._seen_files.add(p.name)
            try:
                table = pq.read_table(p)
            except (OSError, pa.ArrowInvalid):
                continue
            n = state.apply_events(table)
            self.events_applied += n
            changed += n
        now = time.time()
        for prefix in (RECLOG_PREFIX, FEEDBACK_PREFIX):
            for p in segments(self.log_dir, prefix):
                if self._own in p.name:
                    continue
                key = str(p)
                start = self._offsets.get(key, 0)
                size = p.stat().st_size
                if size <= start:
                    continue
                with open(p, "rb") as fh:
                    fh.seek(start)
                    chunk = fh.read(size - start)
                end = chunk.rfind(b"\n") + 1
                self._offsets[key] = start + end
                for line in chunk[:end].splitlines():
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    changed += self._apply_line(state, prefix, rec, now)
        return changed

    def _apply_line(self, state: OnlineState, prefix: str, rec: dict[str, Any], now: float) -> int:
        if prefix == RECLOG_PREFIX:
            if rec.get("record") == CONTEXT_RECORD:  # a request's decision context
                return 0
            ts = _parse_ts(rec.get("generated_at"))
            j = state.findex.get(rec.get("recommended_feature") or "")
            self.served[str(rec.get("recommendation_id"))] = (
                str(rec.get("user_id")),
                str(rec.get("recommended_feature")),
            )
            if ts is not None and j is not None:
                state.record_served(str(rec["user_id"]), [j], epoch_seconds(ts))
                return 1
            return 0
        if rec.get("kind") != "dismiss":
            return 0
        ts = _parse_ts(rec.get("timestamp"))
        target = self.served.get(str(rec.get("recommendation_id")))
        user = rec.get("user_id") or (target[0] if target else None)
        feature = rec.get("feature") or (target[1] if target else None)
        if ts is None or not user or not feature:
            return 0
        state.record_dismissal(str(user), str(feature), epoch_seconds(ts))
        return 1
