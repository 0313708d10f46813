"""Continue a written world for more days, with the effect of shown recommendations.

This is the API simulated online experiments build on (``simulate/online.py``)::

    state = WorldState.load("world")                 # the state at the end of the window
    result = state.advance(1, exposures)             # one more day
    result.events      # pa.Table, EVENT_ARROW_SCHEMA: the day's events (ingest them)
    result.responses   # pa.Table: what each shown recommendation led to
    state.day          # next day index to simulate (grows by `days`)

``exposures`` is a ``pa.Table`` (or anything ``pa.table`` accepts) with columns
``recommendation_id`` (str), ``user_id`` (str), ``feature`` (str), ``placement``
(onboarding_wizard / sidebar_panel / in_context_tooltip / email_digest) and ``shown_at``
(timestamp, normally inside the days being advanced). For each exposure the
:class:`~featurerec.simulate.response.ResponseModel` draws click, dismissal and
recommendation-induced adoption (seeded by ``seed`` and the exposure's position), and:

* ``responses`` has one row per exposure: ``recommendation_id, user_id, feature, placement,
  shown_at, clicked, click_at, dismissed, dismiss_at, adopted, adopted_at`` (``adopted_at`` is
  when the induced first use happens; it may lie beyond the advanced days: it is kept pending
  and happens when the world gets there). Post clicks and dismissals to the serving feedback
  endpoints; adoption shows up by itself as ``feature_used`` with ``is_first_use = true``.
* clicks emit a ``feature_discovered`` event; induced first uses are simulated as a short
  session with the first use, after which the user keeps using the feature (or drops it) by
  the same rules as organic adopters, and it boosts discovery of related features.

Organic behaviour (sessions, discovery, churn) goes on exactly as in generation; with no
exposures, ``advance`` continues the world as if it had been generated with more days'
dynamics. The ground truth (``state.truth``) is updated as the world moves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from featurerec.errors import DataError
from featurerec.simulate.dynamics import DAY_US, S_US, ChunkSim, DayEvents, Forced
from featurerec.simulate.emit import chunk_strings
from featurerec.simulate.response import ResponseConfig, ResponseModel
from featurerec.simulate.truth import GroundTruth
from featurerec.simulate.world import World, load_config

RESPONSE_SCHEMA = pa.schema(
    [
        ("recommendation_id", pa.string()),
        ("user_id", pa.string()),
        ("feature", pa.string()),
        ("placement", pa.string()),
        ("shown_at", pa.timestamp("us")),
        ("clicked", pa.bool_()),
        ("click_at", pa.timestamp("us")),
        ("dismissed", pa.bool_()),
        ("dismiss_at", pa.timestamp("us")),
        ("adopted", pa.bool_()),
        ("adopted_at", pa.timestamp("us")),
    ]
)


@dataclass
class AdvanceResult:
    events: pa.Table
    responses: pa.Table
    days: tuple[int, ...]


class WorldState:
    """All chunks of a world in memory, ready to step further (see module docstring)."""

    def __init__(self, world: World, sims: list[ChunkSim], truth: GroundTruth, day: int) -> None:
        self.world = world
        self.sims = sims
        self.truth = truth
        self.day = day
        self.response = ResponseModel(truth, ResponseConfig(), world.config.params)
        self._strings: dict[int, tuple[pa.Array, pa.Array, pa.Array]] = {}
        # pending induced first uses: global user, item, us since world start
        self._pending = np.empty((0, 3), dtype=np.int64)
        # clicks not yet emitted as feature_discovered: global user, item, us since start
        self._clicks = np.empty((0, 3), dtype=np.int64)
        self._n_advances = 0

    @classmethod
    def load(cls, world_dir: Path | str) -> WorldState:
        world_dir = Path(world_dir)
        manifest = world_dir / "manifest.json"
        if not manifest.exists():
            raise DataError(f"{world_dir} is not a simulated world (no manifest.json)")
        cfg = load_config(json.loads(manifest.read_text())["config"])
        world = World(cfg)
        sims = []
        for c in range(len(world.chunks)):
            sim = world.chunk_sim(c)
            sim.load_state(world_dir / "ground_truth" / f"state-{c:05d}.npz")
            sims.append(sim)
        truth = GroundTruth.load(world_dir)
        return cls(world, sims, truth, cfg.days)

    @property
    def features(self) -> tuple[str, ...]:
        return self.world.features

    def _chunk_of(self, users: np.ndarray) -> np.ndarray:
        starts = np.array([b[0] for b in self.world.chunks])
        return np.searchsorted(starts, users, side="right") - 1

    def _responses(self, exposures: Any, seed: int) -> pa.Table:
        t = exposures if isinstance(exposures, pa.Table) else pa.table(exposures)
        need = {"recommendation_id", "user_id", "feature", "placement", "shown_at"}
        missing = need - set(t.column_names)
        if missing:
            raise DataError(f"exposures lack columns: {', '.join(sorted(missing))}")
        users = self.truth.user_index(t.column("user_id").combine_chunks())
        items = self.truth.feature_index(t.column("feature").to_pylist())
        placement = np.array(t.column("placement").to_pylist(), dtype=object)
        shown = t.column("shown_at").cast(pa.timestamp("us")).to_numpy().astype("datetime64[us]")
        day = self.truth.day_of(shown)
        out = self.response.sample(users, items, placement, day, seed=seed)
        shown_us = (day * DAY_US).astype(np.int64)

        def at(delay: np.ndarray) -> pa.Array:
            ok = ~np.isnan(delay)
            us = shown_us + np.where(ok, delay, 0) * S_US
            t0 = np.datetime64(self.truth.day_datetime(0), "us")
            return pa.array(t0 + us.astype("timedelta64[us]"), pa.timestamp("us"), mask=~ok)

        adopted_at_us = shown_us + np.nan_to_num(out.adopt_delay_s) * S_US
        pend = np.stack([users, items, adopted_at_us.astype(np.int64)], axis=1)[out.adopted]
        self._pending = np.concatenate([self._pending, pend])
        # clicks show the feature: a feature_discovered event at click time
        clicks = np.stack(
            [users, items, (shown_us + np.nan_to_num(out.click_delay_s) * S_US).astype(np.int64)],
            axis=1,
        )[out.clicked]
        self._clicks = np.concatenate([self._clicks, clicks])
        return pa.table(
            {
                "recommendation_id": t.column("recommendation_id").cast(pa.string()),
                "user_id": t.column("user_id").cast(pa.string()),
                "feature": t.column("feature").cast(pa.string()),
                "placement": t.column("placement").cast(pa.string()),
                "shown_at": t.column("shown_at").cast(pa.timestamp("us")),
                "clicked": pa.array(out.clicked),
                "click_at": at(out.click_delay_s),
                "dismissed": pa.array(out.dismissed),
                "dismiss_at": at(out.dismiss_delay_s),
                "adopted": pa.array(out.adopted),
                "adopted_at": at(out.adopt_delay_s),
            },
            schema=RESPONSE_SCHEMA,
        )

    def advance(self, days: int = 1, exposures: Any = None, *, seed: int = 0) -> AdvanceResult:
        """Simulate ``days`` more days; see the module docstring for ``exposures``."""
        if days < 1:
            raise DataError(f"days must be >= 1 (got {days})")
        if exposures is not None and len(exposures) > 0:
            responses = self._responses(exposures, seed * 1_000_003 + self._n_advances)
        else:
            responses = RESPONSE_SCHEMA.empty_table()
        self._n_advances += 1
        tables: list[pa.Table] = []
        day_list = tuple(range(self.day, self.day + days))
        for day in day_list:
            lo, hi = day * DAY_US, (day + 1) * DAY_US
            # induced first uses due today (late ones from the past happen at the day's start)
            due = self._pending[:, 2] < hi
            today = self._pending[due]
            self._pending = self._pending[~due]
            today[:, 2] = np.maximum(today[:, 2], lo)
            chunk_of = self._chunk_of(today[:, 0]) if len(today) else np.empty(0, int)
            due_c = self._clicks[:, 2] < hi
            clicks = self._clicks[due_c]
            self._clicks = self._clicks[~due_c]
            clicks[:, 2] = np.maximum(clicks[:, 2], lo)
            click_chunk = self._chunk_of(clicks[:, 0]) if len(clicks) else np.empty(0, int)
            for c, sim in enumerate(self.sims):
                sel = today[chunk_of == c]
                forced = Forced(user=sel[:, 0] - sim.u0, item=sel[:, 1], ts=sel[:, 2])
                ev = sim.step_day(day, forced)
                cl = clicks[click_chunk == c]
                if len(cl):
                    ev = _with_discovered(ev, sim, cl[:, 0] - sim.u0, cl[:, 1], cl[:, 2] - lo)
                tables.append(self._emit(c, sim, ev))
                u0, u1 = sim.u0, sim.u1
                self.truth.adopt_day[u0:u1] = sim.adopt_day
                self.truth.kept[u0:u1] = sim.kept
                if self.truth.churn_day is not None:
                    self.truth.churn_day[u0:u1] = sim.ws_churn[sim.user_ws]
        self.day += days
        self.truth.days = self.day
        from featurerec.events.schema import EVENT_ARROW_SCHEMA

        events = pa.concat_tables(tables) if tables else EVENT_ARROW_SCHEMA.empty_table()
        return AdvanceResult(events=events, responses=responses, days=day_list)

    def _emit(self, c: int, sim: ChunkSim, ev: DayEvents) -> pa.Table:
        if c not in self._strings:
            users, wss = chunk_strings(self.world.population, sim.u0, sim.u1)
            traits = self.world.emitter.user_traits(sim.u0, sim.u1)
            self._strings[c] = (users, wss, traits)
        users, wss, traits = self._strings[c]
        return self.world.emitter.table(ev, c, users, wss, traits)


def _with_discovered(
    ev: DayEvents, sim: ChunkSim, users: np.ndarray, items: np.ndarray, ts_in_day: np.ndarray
) -> DayEvents:
    """Add ``feature_discovered`` events (clicked recommendations) to a day's events."""
    code = sim.codes.type_index["feature_discovered"]
    n = len(users)
    day_us = np.int64(ev.day) * DAY_US
    cols = {
        "user": np.concatenate([ev.user, users.astype(np.int32)]),
        "etype": np.concatenate([ev.etype, np.full(n, code, np.int16)]),
        "ts": np.concatenate([ev.ts, np.clip(ts_in_day, 0, DAY_US - 1) + day_us]),
        "item": np.concatenate([ev.item, items.astype(np.int32)]),
        "action": np.concatenate([ev.action, np.full(n, -1, np.int32)]),
        "context": np.concatenate([ev.context, np.full(n, -1, np.int32)]),
        "session": np.concatenate([ev.session, np.full(n, -1, np.int32)]),
        "seq": np.concatenate([ev.seq, np.zeros(n, np.int32)]),
        "top": np.concatenate([ev.top, np.full(n, np.nan)]),
        "first": np.concatenate([ev.first, np.full(n, -1, np.int8)]),
        "prop": np.concatenate([ev.prop, np.full(n, -1, np.int32)]),
        "traits": np.concatenate([ev.traits, np.ones(n, bool)]),
    }
    o = np.argsort(cols["ts"], kind="stable")
    return DayEvents(
        day=ev.day,
        n_sessions=ev.n_sessions,
        adoptions=ev.adoptions,
        **{k: v[o] for k, v in cols.items()},
    )
