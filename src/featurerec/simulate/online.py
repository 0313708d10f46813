"""Simulated online experiments: CloudFlow users meet the real serving code for N weeks.

``featurerec simulate experiment SPEC`` runs, in one process and against a fresh data folder:

1. **World**: SIM's generator writes a CloudFlow world (``history_days`` of behaviour);
   INGEST's :class:`~featurerec.events.ingest.Ingestor` loads it into a new warehouse; PIPE's
   runner runs the daily pipeline (MODELS' trainers, SERVE's state export) and SERVE's loader
   builds the production model and the online state.
2. **Warm-up** (``warmup_days``): every active user is served by the production default
   strategy with the deployment's exploration (logged propensities). At its end, the OPE
   estimate of each variant's CTR and 7-day adoption is made from that log
   (:mod:`featurerec.experiments.ope`), before any user sees the variants.
3. **Experiment** (``weeks`` x 7 days): each day SIM's world continues (``ChunkSim.step_day``);
   every active user asks SERVE's :class:`RecommendationService` (in-process, with the
   experiment spec, so assignment is :func:`featurerec.experiments.assignment.assign`) for
   recommendations in their variant's placement, at the time they are in the product; the
   response model samples impressions, clicks, dismissals and adoptions within 7 days;
   adoptions become first uses in the world's following days (``Forced``), the day's events
   are ingested with the Ingestor and applied to the online state, the recommendation log and
   feedback go to ``ml.recommendation_log`` / ``ml.recommendation_events``; every
   ``retrain_every_days`` attribution runs and the pipeline retrains (the bandit learns from
   ``ml.recommendation_feedback``), and serving swaps to the new model and state.
   A ``holdout_share`` of users (hashed, outside the experiment) is served the ``random``
   strategy: the baseline of the cold-start comparison.
4. **Results**: the experiment report (:mod:`featurerec.experiments.report`) on the
   warehouse, the spec's results tables, cold start vs random, and OPE vs online.

Placements: ``sidebar_panel`` asks when the user starts their first session of the day;
``in_context_tooltip`` when they first use a feature that day (the request carries that
feature as context); ``onboarding_wizard`` only in a user's first 7 days; ``email_digest``
once a week for every signed-up user, active or not.

The response model comes from :mod:`featurerec.simulate.response` (SIM) when that module
exists; until then :class:`ProvisionalResponse` below stands in, with a priori parameters
(documented there, never tuned to a result), and the output says which one ran.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import pyarrow as pa
import typer

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.experiments.spec import ExperimentSpec

DAY_US = 86_400_000_000
PLACEMENT_CODES = ("sidebar_panel", "in_context_tooltip", "onboarding_wizard", "email_digest")
HOLDOUT_EXPERIMENT = "random-holdout"
#: Cold start: fewer feature_used events than this when the recommendation is made.
ONBOARDING_DAYS = 7


# -- response model -------------------------------------------------------------------------
class Response(Protocol):
    """Probabilities for shown recommendations (vectorised over rows)."""

    @property
    def name(self) -> str: ...

    def probabilities(
        self, utility: np.ndarray, keep_p: np.ndarray, placement: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(p_click, p_dismiss_if_not_clicked, p_adopt7_if_clicked, p_adopt7_if_not)."""
        ...


@dataclass(frozen=True)
class ProvisionalResponse:
    """Stand-in until SIM's response model lands; parameters fixed a priori.

    relevance ``q = sigmoid(2 (U - 1.5))`` of the hidden utility (about the top quarter of
    a user's unused features is clearly relevant); ``p_click = c[placement] * q``, with the
    placement factors ordered as in the spec's placement experiment (tooltip > onboarding >
    sidebar > email); not clicked -> dismissed with ``d[placement] * (1 - q)``; adoption
    within 7 days: ``0.5 * keep_p`` after a click (keep_p = the world's own probability of
    keeping a tried feature), ``0.05 * q`` view-through otherwise.
    """

    name: str = "provisional (simulate/online.py; SIM's response model not in this build)"
    click: tuple[float, ...] = (0.25, 0.6, 0.45, 0.10)  # in PLACEMENT_CODES order
    dismiss: tuple[float, ...] = (0.35, 0.15, 0.08, 0.0)
    adopt_after_click: float = 0.5
    adopt_view_through: float = 0.05

    def probabilities(
        self, utility: np.ndarray, keep_p: np.ndarray, placement: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        q = 1.0 / (1.0 + np.exp(-2.0 * (utility - 1.5)))
        c = np.asarray(self.click)[placement]
        d = np.asarray(self.dismiss)[placement]
        return (
            np.clip(c * q, 0, 1),
            np.clip(d * (1 - q), 0, 1),
            np.clip(self.adopt_after_click * keep_p, 0, 1),
            np.clip(self.adopt_view_through * q, 0, 1),
        )


def response_model() -> Response:
    """SIM's response model when present, else the provisional one."""
    try:
        from featurerec.simulate import response as sim_response  # type: ignore[attr-defined]
    except ImportError:
        return ProvisionalResponse()
    factory = getattr(sim_response, "online_response", None)
    if factory is None:
        return ProvisionalResponse()
    model: Response = factory()
    return model


# -- config and results -----------------------------------------------------------------------
@dataclass(frozen=True)
class OnlineConfig:
    """How big and how long; every random draw derives from ``seed``."""

    users: int = 26_000
    history_days: int = 30
    warmup_days: int = 10
    #: None = the spec's duration_weeks.
    weeks: float | None = None
    retrain_every_days: int = 1
    #: Placement for variants that do not choose one (strategy experiments).
    default_placement: str = "sidebar_panel"
    holdout_share: float = 0.05
    seed: int = 0
    pipeline_spec: str = "builtin:pipeline.demo.json"
    ope: bool = True

    def __post_init__(self) -> None:
        if self.default_placement not in PLACEMENT_CODES:
            raise DataError(
                f"default placement must be one of {PLACEMENT_CODES} (got {self.default_placement!r})"
            )
        if not 0 <= self.holdout_share < 0.5:
            raise DataError(f"holdout_share must be in [0, 0.5) (got {self.holdout_share})")
        if self.retrain_every_days < 1:
            raise DataError(f"retrain_every_days must be >= 1 (got {self.retrain_every_days})")


@dataclass(frozen=True)
class OPEResult:
    variant: str
    strategy: str | None
    metric: str
    estimator: str
    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    online: float | None
    online_ci_low: float | None
    online_ci_high: float | None
    inside_online_ci: bool | None
    n_logged: int
    note: str = ""


@dataclass
class OnlineResult:
    experiment: str
    config: OnlineConfig
    response_model: str
    report: Any
    cold_start: Any
    ope: list[OPEResult]
    timings: dict[str, float]
    counts: dict[str, int]
    data_dir: str
    notes: list[str] = field(default_factory=list)

    @property
    def ope_inside_share(self) -> float | None:
        checked = [o for o in self.ope if o.inside_online_ci is not None]
        return sum(bool(o.inside_online_ci) for o in checked) / len(checked) if checked else None


# -- the run ------------------------------------------------------------------------------------
@dataclass
class _Served:
    """One day's served items, as parallel lists (filled per request)."""

    user: list[int] = field(default_factory=list)
    item: list[int] = field(default_factory=list)
    placement: list[int] = field(default_factory=list)
    ts_us: list[int] = field(default_factory=list)
    rec_id: list[str] = field(default_factory=list)


@dataclass
class _LoggedContext:
    """What the warm-up logging policy saw for one request (for OPE)."""

    user: Any
    exclude: np.ndarray
    rec_ids: list[str]
    features: list[int]
    positions: list[int]
    propensities: list[float]


class OnlineExperiment:
    """One simulated online experiment (see the module docstring)."""

    def __init__(
        self,
        spec: ExperimentSpec,
        config: OnlineConfig,
        work_dir: Path,
        base_settings: Settings,
        *,
        progress: Callable[[str, float, float], None] | None = None,
    ) -> None:
        self.spec = spec
        self.cfg = config
        self.work = Path(work_dir)
        self.settings = base_settings.with_data_dir(self.work / "data")
        self.progress = progress or (lambda msg, done, total: None)
        self.response = response_model()
        self.timings: dict[str, float] = {}
        self.counts: dict[str, int] = {
            "requests": 0, "recommendations": 0, "clicks": 0, "dismissals": 0,
            "forced_adoptions": 0, "retrains": 0, "events_ingested": 0,
        }  # fmt: skip
        self.latencies: dict[str, list[float]] = {}
        self.notes: list[str] = []
        self.now = datetime(1970, 1, 1)
        self._buffer: list[pa.Table] = []
        self._log_buffer: list[dict[str, Any]] = []
        self._fb_buffer: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------------
    def _time(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def setup(self) -> None:
        from featurerec.events.ingest import Ingestor
        from featurerec.simulate.emit import chunk_strings
        from featurerec.simulate.world import WorldConfig, generate_world
        from featurerec.warehouse.engine import open_warehouse

        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        t0 = time.perf_counter()
        self.progress("generating the world", 0, 1)
        world = generate_world(
            WorldConfig(users=self.cfg.users, days=self.cfg.history_days, seed=self.cfg.seed)
        )
        self.world_dir = self.work / "world"
        world.write(self.world_dir)
        self.world = world
        self._time("world", t0)
        t0 = time.perf_counter()
        self.progress("ingesting the world", 0, 1)
        self.engine = open_warehouse(self.settings)
        self.ingestor = Ingestor(self.engine, self.settings)
        self.ingestor.ingest_world(self.world_dir)
        self._time("ingest", t0)

        gt = self.world_dir / "ground_truth"
        self.sims = []
        user_ids: list[str] = []
        self.chunk_of: list[int] = []
        self.local_of: list[int] = []
        self.chunk_strings = []
        for c, (u0, u1, _w0, _w1) in enumerate(world.chunks):
            sim = world.chunk_sim(c)
            sim.load_state(gt / f"state-{c:05d}.npz")
            self.sims.append(sim)
            users, wss = chunk_strings(world.population, u0, u1)
            traits = world.emitter.user_traits(u0, u1)
            self.chunk_strings.append((users, wss, traits))
            user_ids.extend(users.to_pylist())
            self.chunk_of.extend([c] * (u1 - u0))
            self.local_of.extend(range(u1 - u0))
        self.user_ids = user_ids
        self.uindex = {u: i for i, u in enumerate(user_ids)}
        self.chunk_of_a = np.asarray(self.chunk_of)
        self.local_of_a = np.asarray(self.local_of)
        self.features = list(world.features)
        self.findex = {f: j for j, f in enumerate(self.features)}
        self.fu_code = world.codes.type_index["feature_used"]
        self.start_us = world.emitter.start_us
        self.day = self.cfg.history_days
        self.pending: dict[int, list[tuple[int, int, int]]] = {}  # day -> (global user, item, ts)
        from featurerec.experiments.assignment import bucket

        self.holdout = np.array(
            [bucket(HOLDOUT_EXPERIMENT, u) < self.cfg.holdout_share for u in user_ids]
        )
        self._retrain()

    def _dt(self, us_since_start: int) -> datetime:
        return datetime(1970, 1, 1) + timedelta(microseconds=int(us_since_start) + self.start_us)

    def _retrain(self) -> None:
        """Attribution, the daily pipeline, then serving swaps to the new model and state."""
        from featurerec.feedback.attribution import attribute
        from featurerec.pipeline.history import RunHistory
        from featurerec.pipeline.runner import PipelineRunner
        from featurerec.pipeline.spec import load_spec
        from featurerec.registry import registry_for
        from featurerec.serving.deployment import deployment_for
        from featurerec.serving.loader import load_model, load_online_state
        from featurerec.serving.service import RecommendationService
        from featurerec.serving.state import epoch_seconds

        self.flush()
        t0 = time.perf_counter()
        as_of = self._dt(self.day * DAY_US - 1)
        if self.engine.scalar("SELECT COUNT(*) FROM ml.recommendation_log"):
            attribute(self.engine, as_of=as_of)
        spec = load_spec(self.cfg.pipeline_spec, self.settings)
        reg = registry_for(self.settings)
        runner = PipelineRunner(
            spec, self.settings, self.engine, reg, RunHistory.for_settings(self.settings)
        )
        record = runner.run(as_of)
        if record.status != "passed":
            failed = [n for n, s in record.stages.items() if s.status != "passed"]
            self.notes.append(f"day {self.day}: pipeline {record.status} (stages {failed})")
        self._time("pipeline", t0)
        t0 = time.perf_counter()
        dep = deployment_for(self.settings)
        state, _ = load_online_state(self.settings, reg, dep, now=epoch_seconds(as_of))
        old = getattr(self, "state", None)
        if old is not None:
            state.adopt_history(old)
        model = load_model(reg, dep, state)
        self.state, self.model, self.deployment = state, model, dep
        clock = lambda: self.now  # noqa: E731
        self.now = as_of
        random_settings = self.settings.model_copy(
            update={
                "serving": self.settings.serving.model_copy(update={"default_strategy": "random"})
            }
        )
        self.services = {
            "default": RecommendationService(self.settings, dep, state, model, clock=clock),
            "experiment": RecommendationService(
                self.settings, dep, state, model, experiment=self.spec, clock=clock
            ),
            "random": RecommendationService(random_settings, dep, state, model, clock=clock),
        }
        self.counts["retrains"] += 1
        self._time("reload", t0)

    # ---------------------------------------------------------------------------------------
    def _requests(self, c: int, ev: Any, day: int) -> list[tuple[int, int, int, int]]:
        """(ts_us, global user, placement code, context item) requests of one chunk-day for
        each placement; the caller picks the one that matches the user's variant."""
        sim = self.sims[c]
        base = int(np.searchsorted(self.chunk_of_a, c))
        out: list[tuple[int, int, int, int]] = []
        if len(ev):
            order = np.argsort(ev.ts, kind="stable")
            u, ts, et, it = ev.user[order], ev.ts[order], ev.etype[order], ev.item[order]
            first_u, first_i = np.unique(u, return_index=True)
            for lu, i in zip(first_u.tolist(), first_i.tolist(), strict=True):
                out.append((int(ts[i]), base + lu, 0, -1))  # sidebar at session start
                if day - int(sim.signup[lu]) < ONBOARDING_DAYS:
                    out.append((int(ts[i]), base + lu, 2, -1))
            fu = et == self.fu_code
            fu_u, fu_i = np.unique(u[fu], return_index=True)
            fts, fit = ts[fu], it[fu]
            for lu, i in zip(fu_u.tolist(), fu_i.tolist(), strict=True):
                out.append((int(fts[i]), base + lu, 1, int(fit[i])))
        if (day - self.cfg.history_days) % 7 == 0:
            alive = (sim.signup <= day) & (sim.ws_churn[sim.user_ws] >= day)
            t8 = day * DAY_US + 8 * 3600 * 1_000_000
            out.extend((t8, base + int(lu), 3, -1) for lu in np.flatnonzero(alive))
        return out

    def _placement_for(self, g: int, phase: str) -> tuple[str, int]:
        """(service key, placement code) for user ``g`` in this phase."""
        if phase == "warmup":
            return "default", PLACEMENT_CODES.index(self.cfg.default_placement)
        if self.holdout[g]:
            return "random", PLACEMENT_CODES.index(self.cfg.default_placement)
        from featurerec.experiments.assignment import assign

        v = assign(self.spec, self.user_ids[g])
        pl = v.resolved_placement or self.cfg.default_placement
        return "experiment", PLACEMENT_CODES.index(pl)

    def step_day(self, phase: str) -> None:
        """Simulate one day: world behaviour, requests, responses, ingestion (module doc)."""
        from featurerec.serving.service import RecommendationRequest, RequestContext
        from featurerec.serving.state import epoch_seconds
        from featurerec.simulate.dynamics import Forced

        day = self.day
        rng = np.random.default_rng([self.cfg.seed, 77, day])
        t0 = time.perf_counter()
        forced_rows = self.pending.pop(day, [])
        tables = []
        requests: list[tuple[int, int, int, int]] = []
        for c, sim in enumerate(self.sims):
            mine = [
                (self.local_of[g], it, ts) for g, it, ts in forced_rows if self.chunk_of[g] == c
            ]
            forced = None
            if mine:
                arr = np.asarray(mine, dtype=np.int64)
                forced = Forced(user=arr[:, 0], item=arr[:, 1], ts=arr[:, 2])
            ev = sim.step_day(day, forced)
            users, wss, traits = self.chunk_strings[c]
            tables.append(self.world.emitter.table(ev, c, users, wss, traits))
            requests.extend(self._requests(c, ev, day))
        self._time("world_step", t0)

        # Serve in time order; each user gets the request of their variant's placement.
        t0 = time.perf_counter()
        requests.sort()
        served = _Served()
        log_rows: list[dict[str, Any]] = []
        contexts: list[_LoggedContext] = []
        for ts_us, g, pcode, ctx_item in requests:
            key, want = self._placement_for(g, phase)
            if pcode != want:
                continue
            svc = self.services[key]
            self.now = self._dt(ts_us)
            ctx = RequestContext(feature=self.features[ctx_item] if ctx_item >= 0 else None)
            req = RecommendationRequest(
                self.user_ids[g], placement=PLACEMENT_CODES[pcode], context=ctx
            )
            if phase == "warmup" and self.cfg.ope:
                user_state, exclude = self._logging_context(svc, req)
            res = svc.recommend(req)
            self.counts["requests"] += 1
            if not res.recommendations:
                continue
            variant = res.variant or ("random-holdout" if key == "random" else "warmup")
            self.latencies.setdefault(variant, []).append(res.latency_ms)
            log_rows.extend(res.log_records)
            for item in res.recommendations:
                served.user.append(g)
                served.item.append(self.findex.get(item.feature, -1))
                served.placement.append(pcode)
                served.ts_us.append(ts_us)
                served.rec_id.append(item.recommendation_id)
            if phase == "warmup" and self.cfg.ope:
                mf = {f: j for j, f in enumerate(self.model.features)}
                contexts.append(
                    _LoggedContext(
                        user_state,
                        exclude,
                        [it.recommendation_id for it in res.recommendations],
                        [mf[it.feature] for it in res.recommendations],
                        [it.position - 1 for it in res.recommendations],
                        [it.propensity for it in res.recommendations],
                    )
                )
        self._time("serving", t0)
        if phase == "warmup":
            self.logged_contexts.extend(contexts)

        t0 = time.perf_counter()
        feedback = self._respond(served, rng)
        self._time("responses", t0)

        # The day's events reach the online state now (as landed events reach the server);
        # the warehouse gets them, the log and the feedback before the next retrain.
        t0 = time.perf_counter()
        events = pa.concat_tables(tables) if tables else None
        if events is not None and events.num_rows:
            self._buffer.append(events)
            used = events.filter(pa.compute.equal(events.column("event_type"), "feature_used"))
            known = np.array([self.state.row_of(u) is not None for u in
                              pa.compute.unique(used.column("user_id")).to_pylist()])  # fmt: skip
            if known.all():  # traits only matter for users the state has not seen yet
                used = used.set_column(
                    used.schema.get_field_index("user_traits"), "user_traits",
                    pa.nulls(used.num_rows, pa.string()),
                )  # fmt: skip
            self.state.apply_events(used)
        for f in feedback:
            if f["kind"] == "dismiss":
                self.state.record_dismissal(
                    f["user_id"], f["feature"], epoch_seconds(f["timestamp"])
                )
        self._log_buffer.extend(log_rows)
        self._fb_buffer.extend(feedback)
        self._time("state_apply", t0)
        self.day += 1

    def flush(self) -> None:
        """Ingest buffered product events (INGEST's Ingestor, one batch) and write the
        buffered recommendation log and feedback to the warehouse."""
        from featurerec.events.validate import normalize_table

        t0 = time.perf_counter()
        if self._buffer:
            events = pa.concat_tables(self._buffer)
            self._buffer = []
            now = self._dt(self.day * DAY_US)
            batch = normalize_table(events, settings=self.settings, source="simulate", now=now)
            rep = self.ingestor.append(batch, batch_id=f"online-{self.cfg.seed}-{self.day}")
            self.counts["events_ingested"] += int(rep.accepted)
        self._insert_log(self._log_buffer, self._fb_buffer)
        self._log_buffer, self._fb_buffer = [], []
        self._time("ingest_daily", t0)

    def _logging_context(self, svc: Any, req: Any) -> tuple[Any, np.ndarray]:
        """The user state and the eligibility mask the logging policy sees (for OPE)."""
        from featurerec.serving.state import epoch_seconds

        state = svc.state
        row = state.row_of(req.user_id)
        user, attrs, adopted = svc._user(state, req)[1:]
        k = svc.deployment.models.ranker.output_k
        exclude, _ = svc.policy.exclude_mask(
            attrs,
            adopted,
            state.exposure(row, epoch_seconds(svc.clock())),
            epoch_seconds(svc.clock()),
            k,
        )
        mf = self.model.features
        if mf != state.features:
            index = {f: j for j, f in enumerate(state.features)}
            exclude = np.array([bool(exclude[index[f]]) if f in index else True for f in mf])
        return user, exclude

    def _respond(self, served: _Served, rng: np.random.Generator) -> list[dict[str, Any]]:
        """Sample impressions, clicks, dismissals and adoptions for the day's served items."""
        n = len(served.user)
        if n == 0:
            return []
        g = np.asarray(served.user)
        item = np.asarray(served.item)
        pl = np.asarray(served.placement)
        ts = np.asarray(served.ts_us, dtype=np.int64)
        util = np.zeros(n)
        keep = np.zeros(n)
        ok = item >= 0
        for c, sim in enumerate(self.sims):
            m = ok & (self.chunk_of_a[g] == c)
            lu = self.local_of_a[g[m]]
            util[m] = sim.utility[lu, item[m]]
            keep[m] = sim.keep_p[lu, item[m]]
        p_click, p_dismiss, p_ad_click, p_ad_view = self.response.probabilities(util, keep, pl)
        clicked = ok & (rng.random(n) < p_click)
        dismissed = ok & ~clicked & (rng.random(n) < p_dismiss)
        adopt = ok & ~dismissed & (rng.random(n) < np.where(clicked, p_ad_click, p_ad_view))
        click_delay = rng.exponential(120e6, n).astype(np.int64)  # ~2 minutes
        adopt_delay = np.where(
            clicked,
            np.minimum(rng.exponential(0.5 * DAY_US, n), 7 * DAY_US - 1),
            rng.random(n) * (7 * DAY_US - 1),
        ).astype(np.int64)
        out: list[dict[str, Any]] = []
        for i in range(n):
            rid, uid = served.rec_id[i], self.user_ids[int(g[i])]
            t = self._dt(int(ts[i]))
            out.append(
                {"feedback_id": f"{rid}:impression", "recommendation_id": rid, "user_id": uid,
                 "kind": "impression", "timestamp": t, "feature": None}
            )  # fmt: skip
            if clicked[i]:
                out.append(
                    {"feedback_id": f"{rid}:click", "recommendation_id": rid, "user_id": uid,
                     "kind": "click", "timestamp": self._dt(int(ts[i] + click_delay[i])),
                     "feature": None}
                )  # fmt: skip
            if dismissed[i]:
                out.append(
                    {"feedback_id": f"{rid}:dismiss", "recommendation_id": rid, "user_id": uid,
                     "kind": "dismiss", "timestamp": self._dt(int(ts[i] + click_delay[i])),
                     "feature": self.features[int(item[i])]}
                )  # fmt: skip
            if adopt[i]:
                when = int(ts[i] + (click_delay[i] if clicked[i] else 0) + adopt_delay[i])
                self.pending.setdefault(when // DAY_US, []).append((int(g[i]), int(item[i]), when))
        self.counts["recommendations"] += n
        self.counts["clicks"] += int(clicked.sum())
        self.counts["dismissals"] += int(dismissed.sum())
        self.counts["forced_adoptions"] += int(adopt.sum())
        return out

    def _insert_log(self, log_rows: list[dict[str, Any]], feedback: list[dict[str, Any]]) -> None:
        from featurerec.serving.reclog import FEEDBACK_COLUMNS, RECLOG_COLUMNS, records_table

        rec_t = records_table(log_rows, RECLOG_COLUMNS)
        fb_t = records_table(feedback, FEEDBACK_COLUMNS)
        with self.engine.transaction():
            for name, table, target, cols in (
                ("_online_log", rec_t, "ml.recommendation_log", RECLOG_COLUMNS),
                ("_online_fb", fb_t, "ml.recommendation_events", FEEDBACK_COLUMNS),
            ):
                self.engine.register_arrow(name, table)
                try:
                    self.engine.execute(
                        f"INSERT OR IGNORE INTO {target} ({', '.join(cols)}) "
                        f"SELECT {', '.join(cols)} FROM {name}"
                    )
                finally:
                    self.engine.unregister(name)

    # ---------------------------------------------------------------------------------------
    def run(self) -> OnlineResult:
        t_all = time.perf_counter()
        self.logged_contexts: list[_LoggedContext] = []
        self.setup()
        weeks = self.cfg.weeks if self.cfg.weeks is not None else self.spec.duration_weeks
        exp_days = round(weeks * 7)
        total = self.cfg.warmup_days + exp_days
        done = 0
        for _ in range(self.cfg.warmup_days):
            self.progress("warm-up (production policy, logged propensities)", done, total)
            self.step_day("warmup")
            done += 1
        if self.cfg.warmup_days:
            self._retrain()  # the experiment starts on a model that saw the warm-up feedback
        self.experiment_start = self._dt(self.day * DAY_US)
        ope_before = self._ope_estimates() if self.cfg.ope else []
        warm_lat = self.latencies.pop("warmup", [])
        self.counts["warmup_requests"] = len(warm_lat)
        for i in range(exp_days):
            self.progress(f"experiment day {i + 1}/{exp_days}", done, total)
            self.step_day("experiment")
            done += 1
            if (i + 1) % self.cfg.retrain_every_days == 0 and i + 1 < exp_days:
                self._retrain()
        self.progress("reporting", total, total)
        return self._results(ope_before, t_all)

    # ---------------------------------------------------------------------------------------
    def _ope_estimates(self) -> list[dict[str, Any]]:
        """Each variant's CTR and 7-day adoption estimated from the warm-up log, now."""
        from featurerec.experiments.ope import estimate_policy_value, tabular_reward_model
        from featurerec.feedback.attribution import attribute

        self.flush()
        t0 = time.perf_counter()
        as_of = self.experiment_start
        attribute(self.engine, as_of=as_of)
        rows = self.engine.query_rows(
            "SELECT recommendation_id, clicked, adopted_7d, generated_at "
            "FROM ml.recommendation_feedback WHERE experiment IS NULL AND strategy <> 'random'"
        )
        outcome = {r["recommendation_id"]: r for r in rows}
        complete_before = as_of - timedelta(days=7)
        eps = self.deployment.models.ranker.exploration_rate
        k = self.deployment.models.ranker.output_k
        top_k = self.deployment.models.candidate_generator.top_k
        n_items = len(self.model.features)
        out: list[dict[str, Any]] = []
        # logged rounds
        a, p, pos, ctx_id, click, adopt, complete, users = [], [], [], [], [], [], [], []
        for ci, lc in enumerate(self.logged_contexts):
            for rid, f, ps, pr in zip(
                lc.rec_ids, lc.features, lc.positions, lc.propensities, strict=True
            ):
                o = outcome.get(rid)
                if o is None:
                    continue
                a.append(f)
                p.append(pr)
                pos.append(ps)
                ctx_id.append(ci)
                click.append(float(o["clicked"]))
                adopt.append(float(o["adopted_7d"]))
                complete.append(o["generated_at"] <= complete_before)
                users.append(lc.user.user_id)
        if not a:
            self.notes.append("OPE: no logged warm-up recommendations to evaluate from")
            return out
        action, pscore = np.asarray(a), np.asarray(p)
        position, cidx = np.asarray(pos), np.asarray(ctx_id)
        groups = np.asarray(users)
        ctx_bucket = np.array(
            [min(self.logged_contexts[i].user.event_count, 60) // 5 for i in cidx.tolist()]
        )
        n_ctx = int(ctx_bucket.max()) + 1
        done_rows = np.asarray(complete)
        for v in self.spec.variants:
            strategy = v.resolved_strategy
            if v.resolved_placement not in (None, self.cfg.default_placement):
                out.append({"variant": v.name, "strategy": strategy, "skip":
                            "placement differs from the logged placement: no support"})  # fmt: skip
                continue
            name = self.model.strategy_name(strategy or self.settings.serving.default_strategy)
            dist = _target_slate_dist(
                self.model, name, self.logged_contexts, k, top_k,
                1.0 if name == "random" else eps,
            )  # fmt: skip
            # rows with no target mass at a position cannot sum to 1: give the rest to "none"
            d = dist[cidx]
            for metric, reward, mask in (
                ("click_through_rate", np.asarray(click), np.ones(len(a), bool)),
                ("feature_adoption_7d", np.asarray(adopt), done_rows),
            ):
                if mask.sum() < 50:
                    out.append({"variant": v.name, "strategy": strategy, "metric": metric,
                                "skip": f"only {int(mask.sum())} logged rows with complete "
                                        "windows before the run (increase --warmup-days)"})  # fmt: skip
                    continue
                dm = _per_round_dist(d[mask], position[mask], n_items)
                q_table = tabular_reward_model(
                    ctx_bucket[mask], action[mask], reward[mask], n_contexts=n_ctx,
                    n_actions=n_items,
                )  # fmt: skip
                qhat = q_table[ctx_bucket[mask]]
                qhat = np.hstack([qhat, np.zeros((qhat.shape[0], 1))])  # "shows nothing"
                est = estimate_policy_value(
                    action[mask], reward[mask], pscore[mask], dm, qhat, groups=groups[mask]
                )
                out.append({"variant": v.name, "strategy": strategy, "metric": metric,
                            "estimates": est, "n": int(mask.sum())})  # fmt: skip
        self._time("ope", t0)
        return out

    def _results(self, ope_before: list[dict[str, Any]], t_all: float) -> OnlineResult:
        from featurerec.analysis.reports import cold_start
        from featurerec.experiments.report import experiment_report
        from featurerec.feedback.attribution import attribute

        self.flush()
        t0 = time.perf_counter()
        end = self._dt(self.day * DAY_US - 1)
        attribute(self.engine, as_of=end)
        lat = {v: np.asarray(x) for v, x in self.latencies.items()}
        report = experiment_report(
            self.engine, self.spec, as_of=end, latencies=lat, seed=self.cfg.seed
        )
        days = math.ceil((end - self.experiment_start).total_seconds() / 86400)
        cs = cold_start(self.engine, self.settings, as_of=end, days=days)
        by_variant = {s.name: s for s in report.variants}
        ope: list[OPEResult] = []
        for o in ope_before:
            if "skip" in o:
                ope.append(
                    OPEResult(o["variant"], o.get("strategy"), o.get("metric", "all"), "-",
                              None, None, None, None, None, None, None, 0, o["skip"])
                )  # fmt: skip
                continue
            online = by_variant[o["variant"]].metrics[o["metric"]]
            for name, e in o["estimates"].items():
                inside = (
                    None
                    if online.ci_low is None
                    else bool(online.ci_low <= e.value <= online.ci_high)
                )
                ope.append(
                    OPEResult(o["variant"], o["strategy"], o["metric"], name, e.value, e.ci_low,
                              e.ci_high, online.value, online.ci_low, online.ci_high, inside,
                              o["n"])
                )  # fmt: skip
        self._time("report", t0)
        self.timings["total"] = time.perf_counter() - t_all
        self.engine.close()
        return OnlineResult(
            experiment=self.spec.name,
            config=self.cfg,
            response_model=self.response.name,
            report=report,
            cold_start=cs,
            ope=ope,
            timings={k: round(v, 2) for k, v in self.timings.items()},
            counts=self.counts,
            data_dir=str(self.settings.data_path),
            notes=self.notes,
        )


def _target_slate_dist(
    model: Any, name: str, contexts: list[_LoggedContext], k: int, top_k: int, eps: float
) -> np.ndarray:
    """(contexts, n_items, k): probability that strategy ``name`` under the epsilon-greedy
    slate policy shows item i at position p, for each logged context (its user state and
    eligibility mask). Same candidate logic as SERVE's ``BundleModel.recommend`` (top_k
    eligible by upstream score, then the strategy's greedy order), computed for all contexts
    in batches with the public ``full_results``; the exact formula is
    :func:`featurerec.models.ranking.slate_propensities`."""
    n_items = len(model.features)
    out = np.zeros((len(contexts), n_items, k))
    batch = 4096
    for s0 in range(0, len(contexts), batch):
        part = contexts[s0 : s0 + batch]
        upstream, rank, _ = model.full_results(name, [c.user for c in part])
        for i, c in enumerate(part):
            valid = ~c.exclude & np.isfinite(upstream[i])
            cand = np.flatnonzero(valid)
            if len(cand) == 0:
                continue
            if len(cand) > top_k:
                cand = cand[np.argsort(-upstream[i][cand], kind="stable")[:top_k]]
            cand = cand[np.argsort(rank[i][cand], kind="stable")]
            for p in range(min(k, len(cand))):
                out[s0 + i, cand, p] = eps / len(cand)
                out[s0 + i, cand[p], p] += 1 - eps
    return out


def _per_round_dist(d: np.ndarray, position: np.ndarray, n_items: int) -> np.ndarray:
    """Target probabilities at each logged round's position, (n, n_items + 1): the last
    column is "shows nothing at this position", so every row sums to 1 as OPE requires."""
    rows = np.arange(d.shape[0])
    at = d[rows, :, position]
    rest = np.clip(1.0 - at.sum(axis=1), 0.0, 1.0)
    return np.hstack([at, rest[:, None]])


# -- output ---------------------------------------------------------------------------------------
def result_tables(result: OnlineResult) -> dict[str, list[dict[str, Any]]]:
    """The spec's results tables (strategy, placement), cold start vs random, OPE vs online."""
    rep = result.report
    tables: dict[str, list[dict[str, Any]]] = {}

    def val(v: Any, m: str) -> float | None:
        return v.metrics[m].value

    if True:  # both of the spec's tables, whichever kind of experiment ran
        tables["strategy"] = [
            {
                "variant": v.name,
                "users": v.users,
                "CTR": val(v, "click_through_rate"),
                "7d adoption": val(v, "feature_adoption_7d"),
                "diversity": val(v, "diversity_score"),
                "p99 latency ms": val(v, "p99_latency"),
            }
            for v in rep.variants
        ]
        tables["placement"] = [
            {
                "variant": v.name,
                "users": v.users,
                "30d adoption": val(v, "feature_adoption_30d"),
                "CTR": val(v, "click_through_rate"),
                "dismissal rate": val(v, "dismissal_rate"),
            }
            for v in rep.variants
        ]
    tables["cold_start_vs_random"] = [
        {
            "segment": r.label,
            "recs": r.recommendations,
            "CTR": r.click_through_rate,
            "random CTR": r.random_click_through_rate,
            "CTR x random": r.ctr_vs_random,
            "7d adoption": r.adoption_rate_7d,
            "random 7d adoption": r.random_adoption_rate_7d,
            "adoption x random": r.adoption_vs_random,
        }
        for r in result.cold_start.rows
    ]
    tables["ope_vs_online"] = [
        {
            "variant": o.variant,
            "metric": o.metric,
            "estimator": o.estimator,
            "OPE before": o.estimate,
            "OPE 95% CI": "" if o.ci_low is None else f"[{o.ci_low:.3f}, {o.ci_high:.3f}]",
            "online": o.online,
            "online 95% CI": ""
            if o.online_ci_low is None
            else f"[{o.online_ci_low:.3f}, {o.online_ci_high:.3f}]",
            "inside": "" if o.inside_online_ci is None else ("yes" if o.inside_online_ci else "no"),
            "note": o.note,
        }
        for o in result.ope
    ]
    return tables


def simulate_experiment_cmd(
    ctx: typer.Context,
    spec_ref: Annotated[str, typer.Argument(metavar="SPEC", help="Experiment name or JSON path.")],
    users: Annotated[int, typer.Option(help="Users in the simulated world.")] = 26_000,
    weeks: Annotated[float | None, typer.Option(help="Default: the spec's duration.")] = None,
    history_days: Annotated[int, typer.Option(help="Behaviour before the run.")] = 30,
    warmup_days: Annotated[int, typer.Option(help="Production policy days (OPE log).")] = 10,
    retrain_every: Annotated[int, typer.Option(help="Retrain every N days.")] = 1,
    placement: Annotated[
        str, typer.Option(help="Placement for variants that do not choose one.")
    ] = "sidebar_panel",
    holdout: Annotated[float, typer.Option(help="Share served the random baseline.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the world and every draw.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Work folder (default: <data dir>/online/<spec>).")
    ] = None,
    no_ope: Annotated[bool, typer.Option("--no-ope", help="Skip off-policy estimates.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Run a simulated online experiment through the real serving, ingestion and pipeline
    code, and print the spec's results tables, cold start vs random and OPE vs online."""
    from featurerec.cli_common import console, print_json, print_table, progress, settings_from
    from featurerec.experiments.cli import print_report
    from featurerec.experiments.spec import find_experiment

    settings = settings_from(ctx)
    spec = find_experiment(settings, spec_ref)
    cfg = OnlineConfig(
        users=users, history_days=history_days, warmup_days=warmup_days, weeks=weeks,
        retrain_every_days=retrain_every, default_placement=placement, holdout_share=holdout,
        seed=seed, ope=not no_ope,
    )  # fmt: skip
    work = out or settings.data_path / "online" / spec.name
    with progress() as bar:
        task = bar.add_task("simulating", total=1)

        def on_progress(msg: str, done: float, total: float) -> None:
            bar.update(task, description=msg, completed=done, total=total)

        result = OnlineExperiment(spec, cfg, work, settings, progress=on_progress).run()
    tables = result_tables(result)
    if json_out:
        print_json(
            {"result": result, "tables": tables, "ope_inside_share": result.ope_inside_share}
        )
        return
    console.print(f"response model: {result.response_model}")
    for name, rows in tables.items():
        print_table(rows, title=name.replace("_", " "))
    share = result.ope_inside_share
    if share is not None:
        console.print(f"OPE estimates inside the online 95% interval: {share:.0%}")
    print_report(result.report)
    console.print(f"timings (s): {result.timings}")
    console.print(f"counts: {result.counts}")
    for n in result.notes:
        console.print(f"[yellow]{n}[/yellow]")
