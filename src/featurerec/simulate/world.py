"""The CloudFlow world: a seeded generator of a SaaS product's users, workspaces and events.

Generative model, in one place (details in :mod:`.population` and :mod:`.dynamics`):

* **Population**: workspaces with heavy-tailed seat counts, a plan that grows with team size,
  an industry; users with a role, a signup date (before or inside the window) and an
  engagement level. Teammates share part of their latent taste.
* **Hidden ground truth**: utility ``U[u, j]`` = intrinsic value of the feature + effects of
  role, plan, team size and industry (hand-set, e.g. developers value the API, construction
  values Gantt charts) + a low-rank latent taste ``z_u . v_j`` + idiosyncratic noise. Context
  alone explains part of it, collaborative filtering can learn the latent part, the noise
  cannot be learned by anyone.
* **Behaviour**: users discover features by themselves at a rate that depends on how visible
  the feature is (``discover``), how useful it would be (``sigmoid(U)``) and what they already
  use (kanban users find automations); they keep a feature with probability rising with ``U``;
  sessions walk a Markov chain over the features they use (the spec's transition affinities);
  workspaces churn less when they use more features.
* **Output** (``World.write``): ``events/part-*.parquet`` in ``EVENT_ARROW_SCHEMA`` (or NDJSON
  in the spec's nested shape), the product tables (users, workspaces, feature_flags,
  ab_assignments, support_tickets) with the warehouse's columns, ``manifest.json``, and the
  hidden ``ground_truth/`` (utility, adoption state) that only evaluation and the response
  model read.

Everything is vectorised numpy; Python loops run over chunks, days and session steps only.
Memory is bounded by one chunk (``WorldConfig.chunk_users``); each chunk writes its own part.

Example::

    >>> from featurerec.simulate.world import WorldConfig, generate_world
    >>> world = generate_world(WorldConfig(users=200, days=7, seed=1))
    >>> world.population.n_users
    200
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featurerec import __version__
from featurerec.errors import DataError
from featurerec.events.schema import EVENT_ARROW_SCHEMA
from featurerec.simulate.catalog import (
    CORE_FEATURES,
    DISABLED_FLAGS,
    INDUSTRIES,
    N_GROUPS,
    PLANS,
    ROLES,
)
from featurerec.simulate.dynamics import DAY_US, ChunkSim, EventCodes
from featurerec.simulate.emit import Emitter, chunk_strings, event_codes
from featurerec.simulate.ids import hex_ids, mix64, seed_salt, user_ids, workspace_ids
from featurerec.simulate.params import WorldParams
from featurerec.simulate.population import (
    Population,
    SimulationConfigError,
    WorldConfig,
    build_population,
    chunk_bounds,
    signup_cohort,
)

__all__ = [
    "SimulationConfigError",
    "World",
    "WorldConfig",
    "WorldManifest",
    "generate_world",
    "load_config",
]

EventFormat = Literal["parquet", "ndjson"]
GENERIC_TICKETS = (
    ("Question about my invoice", "billing"),
    ("Can't log in after password reset", "login"),
    ("How do I change my plan?", "billing"),
    ("Mobile app crashes on startup", "mobile"),
)


@dataclass
class WorldManifest:
    """``DIR/manifest.json``: what was generated, how, and how much."""

    generator: str
    version: str
    config: dict[str, Any]
    format: str
    start: str
    end: str
    users: int
    workspaces: int
    features: list[str]
    events: int
    feature_used_events: int
    event_types: int
    chunks: int
    parts: list[str]
    seconds: float
    events_per_second: float
    tables: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def config_to_dict(config: WorldConfig) -> dict[str, Any]:
    d = asdict(config)
    d["end_date"] = config.end_date.isoformat()
    d["params"] = {k: v for k, v in asdict(config.params).items()}
    return d


def load_config(d: dict[str, Any]) -> WorldConfig:
    """Inverse of :func:`config_to_dict` (used to rebuild a world from its manifest)."""
    params = dict(d.get("params", {}))
    for key in ("base_utility", "discover"):
        if key in params:
            params[key] = tuple(params[key])
    for key in ("discovery_boost", "transition"):
        if key in params:
            params[key] = tuple(tuple(x) for x in params[key])
    return WorldConfig(
        users=d["users"],
        days=d["days"],
        seed=d["seed"],
        features=d["features"],
        end_date=date.fromisoformat(d["end_date"]),
        chunk_users=d["chunk_users"],
        params=WorldParams(**params),
    )


#: Parquet writer settings: dictionaries and statistics only where they pay off.
PARQUET_OPTIONS: dict[str, Any] = {
    # random hex ids barely compress (hex alphabet only): store them plain, snappy the rest
    "compression": {
        name: ("none" if name == "event_id" else "snappy") for name in EVENT_ARROW_SCHEMA.names
    },
    "use_dictionary": [
        "user_id",
        "workspace_id",
        "event_type",
        "feature_category",
        "feature_name",
        "context",
        "properties",
        "user_traits",
    ],
    # min/max only where row groups (one per day) differ: time
    "write_statistics": ["timestamp"],
    "dictionary_pagesize_limit": 16 << 20,
    # no Arrow schema in the file: columns read back as plain strings (EVENT_ARROW_SCHEMA)
    "store_schema": False,
}


@dataclass
class ChunkResult:
    part: str
    events: int
    feature_used: int
    churn_ts: np.ndarray
    tickets: dict[str, np.ndarray]


def _chunk_worker(config: WorldConfig, chunk: int, out: str, fmt: EventFormat) -> ChunkResult:
    """Process-pool entry: rebuild the (deterministic) world and simulate one chunk."""
    return World(config)._simulate_chunk(chunk, Path(out), fmt)


class World:
    """A generated (not yet simulated) world: population, catalog and chunk layout.

    Events are produced lazily by :meth:`write` (or :meth:`chunk_sims` for in-memory use), so
    large worlds never sit in memory at once.
    """

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        self.population: Population = build_population(config)
        self.codes: EventCodes = event_codes()
        self.start: date = config.end_date - timedelta(days=config.days)
        self.chunks = chunk_bounds(self.population, config.effective_chunk_users)
        self.emitter = Emitter(self.population, self.codes, config.seed, self.start)

    @property
    def features(self) -> tuple[str, ...]:
        return self.population.catalog.names

    def chunk_sim(self, chunk: int) -> ChunkSim:
        return ChunkSim(
            self.population,
            self.config.params,
            self.config.seed,
            chunk,
            self.chunks[chunk],
            self.codes,
            weekday0=self.start.weekday(),
        )

    def day_datetime(self, day: float) -> datetime:
        return datetime(self.start.year, self.start.month, self.start.day) + timedelta(days=day)

    # ------------------------------------------------------------------------------------
    def write(
        self,
        out: Path,
        fmt: EventFormat = "parquet",
        on_progress: Callable[[int, int], None] | None = None,
        workers: int = 1,
    ) -> WorldManifest:
        """Simulate every chunk day by day and write the world directory.

        ``on_progress(done_chunk_days, total_chunk_days)`` is called as chunk-days finish.
        ``workers > 1`` simulates chunks in parallel processes; the world is the same.
        """
        if fmt not in ("parquet", "ndjson"):
            raise SimulationConfigError(f"format must be parquet or ndjson (got {fmt!r})")
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            if not (out / "manifest.json").exists():
                raise DataError(f"{out} exists and is not a simulated world; choose an empty --out")
            import shutil

            shutil.rmtree(out)
        (out / "events").mkdir(parents=True)
        (out / "ground_truth").mkdir()
        cfg = self.config
        pop = self.population
        t0 = time.perf_counter()
        parts: list[str] = []
        churn_ts = np.full(pop.n_workspaces, -1, dtype=np.int64)
        tickets: list[dict[str, np.ndarray]] = []
        total = len(self.chunks) * cfg.days
        n_events = n_feature = 0
        results: list[ChunkResult] = []
        if workers <= 1 or len(self.chunks) == 1:
            done = 0

            def tick() -> None:
                nonlocal done
                done += 1
                if on_progress is not None:
                    on_progress(done, total)

            results = [self._simulate_chunk(c, out, fmt, tick) for c in range(len(self.chunks))]
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            ctx = mp.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [
                    pool.submit(_chunk_worker, cfg, c, str(out), fmt)
                    for c in range(len(self.chunks))
                ]
                for i, f in enumerate(futures):
                    results.append(f.result())
                    if on_progress is not None:
                        on_progress((i + 1) * cfg.days, total)
        for c, r in enumerate(results):
            _, _, w0, w1 = self.chunks[c]
            n_events += r.events
            n_feature += r.feature_used
            parts.append(r.part)
            churn_ts[w0:w1] = r.churn_ts
            tickets.append(r.tickets)
        seconds = time.perf_counter() - t0

        tables = {
            "users": self._users_table(),
            "workspaces": self._workspaces_table(churn_ts),
            "feature_flags": self._flags_table(),
            "ab_assignments": self._ab_table(),
            "support_tickets": self._tickets_table(tickets),
        }
        for tname, t in tables.items():
            pq.write_table(t, out / f"{tname}.parquet")
        self._write_truth(out)
        end = self.start + timedelta(days=cfg.days)
        manifest = WorldManifest(
            generator="featurerec.simulate",
            version=__version__,
            config=config_to_dict(cfg),
            format=fmt,
            start=self.start.isoformat(),
            end=end.isoformat(),
            users=pop.n_users,
            workspaces=pop.n_workspaces,
            features=list(self.features),
            events=n_events,
            feature_used_events=n_feature,
            event_types=len(self.codes.types),
            chunks=len(self.chunks),
            parts=parts,
            seconds=round(seconds, 3),
            events_per_second=round(n_events / max(seconds, 1e-9), 1),
            tables={k: v.num_rows for k, v in tables.items()},
        )
        (out / "manifest.json").write_text(manifest.to_json())
        return manifest

    def _simulate_chunk(
        self, c: int, out: Path, fmt: EventFormat, tick: Callable[[], None] | None = None
    ) -> ChunkResult:
        """Simulate one chunk over every day, writing its event part and ground truth."""
        cfg = self.config
        pop = self.population
        u0, u1, _, _ = self.chunks[c]
        fu_code = self.codes.type_index["feature_used"]
        sim = self.chunk_sim(c)
        users, wss = chunk_strings(pop, u0, u1)
        traits = self.emitter.user_traits(u0, u1)
        writer: pq.ParquetWriter | None = None
        name = f"events/part-{c:05d}.{'parquet' if fmt == 'parquet' else 'ndjson'}"
        path = out / name
        n_events = n_feature = 0
        try:
            for day in range(cfg.days):
                ev = sim.step_day(day)
                table = self.emitter.table(ev, c, users, wss, traits, dictionary=fmt == "parquet")
                n_events += len(ev)
                n_feature += int((ev.etype == fu_code).sum())
                if fmt == "parquet":
                    if writer is None:
                        writer = pq.ParquetWriter(path, table.schema, **PARQUET_OPTIONS)
                    writer.write_table(table)
                else:
                    _append_ndjson(table, path)
                if tick is not None:
                    tick()
        finally:
            if writer is not None:
                writer.close()
        np.save(out / "ground_truth" / f"utility-{c:05d}.npy", sim.utility)
        np.save(out / "ground_truth" / f"eligible-{c:05d}.npy", sim.eligible)
        sim.save_state(out / "ground_truth" / f"state-{c:05d}.npz")
        tk = sim.tickets(cfg.days, cfg.seed)
        tk["user"] = tk["user"] + u0
        return ChunkResult(name, n_events, n_feature, sim.ws_churn_ts.copy(), tk)

    # -- product tables ------------------------------------------------------------------
    def _asof(self) -> datetime:
        return self.day_datetime(self.config.days)

    def _users_table(self) -> pa.Table:
        pop = self.population
        n = pop.n_users
        signup = [self.start + timedelta(days=int(d)) for d in pop.user_signup_day.tolist()]
        ws = pop.user_ws
        traits = [
            json.dumps(
                {
                    "role": ROLES[r],
                    "team_size": int(s),
                    "plan": PLANS[p],
                    "industry": INDUSTRIES[i],
                },
                separators=(",", ":"),
            )
            for r, s, p, i in zip(
                pop.user_role.tolist(),
                pop.ws_seats[ws].tolist(),
                pop.ws_plan[ws].tolist(),
                pop.ws_industry[ws].tolist(),
                strict=True,
            )
        ]
        return pa.table(
            {
                "user_id": user_ids(np.arange(n)),
                "workspace_id": workspace_ids(ws),
                "role": pa.array([ROLES[r] for r in pop.user_role.tolist()]),
                "signup_date": pa.array(signup, pa.date32()),
                "signup_cohort": pa.array([signup_cohort(d) for d in signup]),
                "traits": pa.array(traits),
                "updated_at": pa.array([self._asof()] * n, pa.timestamp("us")),
            }
        )

    def _workspaces_table(self, churn_ts: np.ndarray) -> pa.Table:
        pop = self.population
        nw = pop.n_workspaces
        created = [self.day_datetime(int(d)) for d in pop.ws_created_day.tolist()]
        start = self.day_datetime(0)
        churned = [
            start + timedelta(microseconds=int(t)) if t >= 0 else None for t in churn_ts.tolist()
        ]
        names = [
            f"{INDUSTRIES[i].replace('_', ' ').title()} Team {w}"
            for w, i in enumerate(pop.ws_industry.tolist())
        ]
        return pa.table(
            {
                "workspace_id": workspace_ids(np.arange(nw)),
                "name": pa.array(names),
                "plan": pa.array([PLANS[p] for p in pop.ws_plan.tolist()]),
                "industry": pa.array([INDUSTRIES[i] for i in pop.ws_industry.tolist()]),
                "seat_count": pa.array(pop.ws_seats, pa.int32()),
                "created_at": pa.array(created, pa.timestamp("us")),
                "churned_at": pa.array(churned, pa.timestamp("us")),
                "updated_at": pa.array([self._asof()] * nw, pa.timestamp("us")),
            }
        )

    def _flags_table(self) -> pa.Table:
        cat = self.population.catalog
        rows: list[dict[str, Any]] = []
        for j, name in enumerate(cat.names):
            f = CORE_FEATURES[cat.group[j]]
            rows.append(
                {
                    "flag_id": f"ff_{name}",
                    "name": name,
                    "enabled": True,
                    "rollout_percentage": float(f.rollout_percentage),
                    "target_segments": json.dumps(list(f.target_segments)),
                    "plans": json.dumps(list(f.plans)),
                }
            )
        for flag_id, name in DISABLED_FLAGS:
            rows.append(
                {
                    "flag_id": flag_id,
                    "name": name,
                    "enabled": False,
                    "rollout_percentage": 0.0,
                    "target_segments": json.dumps(["internal"]),
                    "plans": json.dumps(["enterprise"]),
                }
            )
        t = pa.Table.from_pylist(rows)
        return t.append_column(
            "updated_at", pa.array([self._asof()] * t.num_rows, pa.timestamp("us"))
        )

    def _ab_table(self) -> pa.Table:
        pop = self.population
        new = np.nonzero(pop.user_signup_day >= 0)[0]
        side = np.nonzero(pop.user_sidebar_test >= 0)[0]
        t0 = self.day_datetime(0)
        exp = ["onboarding-checklist-2026q1"] * len(new) + ["sidebar-redesign"] * len(side)
        users = np.concatenate([new, side])
        variants = [("checklist" if c else "control") for c in pop.user_checklist[new].tolist()]
        variants += [
            ("new_sidebar" if v == 1 else "control") for v in pop.user_sidebar_test[side].tolist()
        ]
        assigned = [self.day_datetime(int(d) + 8 / 24) for d in pop.user_signup_day[new].tolist()]
        assigned += [max(t0, self.day_datetime(int(d))) for d in pop.user_signup_day[side].tolist()]
        return pa.table(
            {
                "experiment": pa.array(exp, pa.string()),
                "user_id": user_ids(users),
                "variant": pa.array(variants, pa.string()),
                "assigned_at": pa.array(assigned, pa.timestamp("us")),
            }
        )

    def _tickets_table(self, parts: list[dict[str, np.ndarray]]) -> pa.Table:
        pop = self.population
        cat = pop.catalog
        user = np.concatenate([p["user"] for p in parts]) if parts else np.empty(0, np.int64)
        item = np.concatenate([p["item"] for p in parts]) if parts else np.empty(0, np.int64)
        ts = np.concatenate([p["ts"] for p in parts]) if parts else np.empty(0, np.int64)
        r = np.concatenate([p["r"] for p in parts]) if parts else np.empty(0)
        o = np.argsort(ts, kind="stable")
        user, item, ts, r = user[o], item[o], ts[o], r[o]
        n = len(user)
        start = self.day_datetime(0)
        asof_us = self.config.days * DAY_US
        subjects: list[str] = []
        tags: list[str] = []
        features: list[str | None] = []
        status: list[str] = []
        created: list[datetime] = []
        updated: list[datetime] = []
        for u_item, t, rr in zip(item.tolist(), ts.tolist(), r.tolist(), strict=True):
            age_days = (asof_us - t) / DAY_US
            if u_item >= 0:
                g = int(cat.group[u_item])
                f = CORE_FEATURES[g]
                subjects.append(f.ticket_subjects[int(rr * len(f.ticket_subjects))])
                kind = "bug" if rr < 0.5 else "how-to"
                tags.append(json.dumps([f.name, kind]))
                features.append(f.name)
            else:
                subj, tag = GENERIC_TICKETS[int(rr * len(GENERIC_TICKETS))]
                subjects.append(subj)
                tags.append(json.dumps([tag]))
                features.append(None)
            st = "open" if age_days < 2 else "pending" if age_days < 5 and rr < 0.6 else "solved"
            if st == "solved" and age_days > 14:
                st = "closed"
            status.append(st)
            c_at = start + timedelta(microseconds=t)
            created.append(c_at)
            updated.append(c_at + timedelta(hours=min(age_days * 24, 6 + rr * 48)))
        ids = hex_ids("tkt_", mix64(np.arange(n, dtype=np.uint64) ^ seed_salt(self.config.seed, 3)))
        return pa.table(
            {
                "ticket_id": ids,
                "user_id": user_ids(user),
                "workspace_id": workspace_ids(pop.user_ws[user]),
                "created_at": pa.array(created, pa.timestamp("us")),
                "updated_at": pa.array(updated, pa.timestamp("us")),
                "subject": pa.array(subjects, pa.string()),
                "tags": pa.array(tags, pa.string()),
                "status": pa.array(status, pa.string()),
                "feature": pa.array(features, pa.string()),
            }
        )

    def _write_truth(self, out: Path) -> None:
        pop = self.population
        cat = pop.catalog
        p = self.config.params
        truth = {
            "note": "Hidden ground truth of a simulated world. Only evaluation (oracle) and the "
            "simulator's response model may read it; the engine never does.",
            "features": list(cat.names),
            "groups": cat.group.tolist(),
            "chunks": [list(b) for b in self.chunks],
            "start": self.start.isoformat(),
            "days": self.config.days,
            "n_users": pop.n_users,
            "n_groups": N_GROUPS,
            # the organic adoption hazard, for GroundTruth.adoption_propensity
            "hazard": {
                "discover_offset": p.discover_offset,
                "onboarding_boost": p.onboarding_boost,
                "onboarding_days": p.onboarding_days,
                "weekend_factor": p.weekend_factor,
                "boost": p.boost_matrix().tolist(),
            },
        }
        (out / "ground_truth" / "truth.json").write_text(json.dumps(truth, indent=1))
        np.savez_compressed(
            out / "ground_truth" / "population.npz",
            user_signup_day=pop.user_signup_day,
            user_ws=pop.user_ws,
            user_role=pop.user_role,
            user_engagement=pop.user_engagement,
            ws_plan=pop.ws_plan,
            ws_seats=pop.ws_seats,
            ws_industry=pop.ws_industry,
            user_z=pop.user_z,
            item_v=pop.item_v,
            item_discover=pop.item_discover,
            user_p_active=np.minimum(
                p.active_base * pop.user_engagement * p.activity_scale ** (1 / 3), p.active_max
            ),
        )


def _append_ndjson(table: pa.Table, path: Path) -> None:
    """Append events to an NDJSON file in the spec's nested shape (DuckDB writes the JSON)."""
    import duckdb

    con = duckdb.connect()
    con.register("t", table)
    promoted = ", ".join(
        f"'{c}': {c}"
        for c in (
            "feature_category",
            "feature_name",
            "context",
            "session_id",
            "session_sequence",
            "time_on_page_seconds",
            "is_first_use",
        )
    )
    rel = con.sql(
        f"""SELECT to_json({{
                'event_id': event_id, 'user_id': user_id, 'workspace_id': workspace_id,
                'event_type': event_type,
                'properties': json_merge_patch(
                    json_merge_patch('{{}}', to_json({{{promoted}}})),
                    coalesce(properties, '{{}}')),
                'user_traits': json(user_traits),
                'timestamp': strftime(timestamp, '%Y-%m-%dT%H:%M:%S.%fZ')
            }})::VARCHAR AS line FROM t"""
    )
    lines = rel.to_arrow_table().column("line").combine_chunks()
    con.close()
    with open(path, "ab") as dst:
        dst.write(_join_lines(lines))


def _join_lines(lines: pa.Array) -> bytes:
    """Arrow strings -> one ``\\n``-terminated byte block, without Python strings."""
    n = len(lines)
    if n == 0:
        return b""
    offs = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=n + 1, offset=lines.offset * 4)
    data = np.frombuffer(lines.buffers()[2], dtype=np.uint8)[offs[0] : offs[-1]]
    rel = offs - offs[0]
    out = np.empty(len(data) + n, dtype=np.uint8)
    newline_at = rel[1:] + np.arange(n)
    keep = np.ones(len(out), dtype=bool)
    keep[newline_at] = False
    out[keep] = data
    out[newline_at] = ord("\n")
    return out.tobytes()


def generate_world(config: WorldConfig) -> World:
    """Build the world's population and layout (events are simulated by ``World.write``)."""
    return World(config)
