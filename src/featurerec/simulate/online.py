"""Simulated online experiments: CloudFlow users meet the real serving code for N weeks.

``featurerec simulate experiment SPEC`` runs, in one process and against a fresh data folder:

1. **World**: SIM's generator writes a CloudFlow world (``history_days`` of behaviour);
   INGEST's :class:`~featurerec.events.ingest.Ingestor` loads it into a new warehouse; PIPE's
   runner runs the daily pipeline (MODELS' trainers, SERVE's state export) and SERVE's loader
   builds the production model and the online state.
2. **Warm-up** (``warmup_days``): every active user is served by the warm-up's logging
   policy, which by default (``logging_policy="mixture"``) is designed for OPE: each request
   is served uniformly at random with probability ``logging_uniform_share`` (0.5), otherwise
   by one of the experiment's variants' strategies drawn uniformly, with the deployment's
   exploration; every served item is logged with the *mixture's* propensity (the
   share-weighted sum of each mixed strategy's probability of showing that item at that
   position, from the same score lookups the service made; the service's own propensity of
   the strategy that served is checked against this reconstruction on every item).
   ``logging_policy="production"`` serves the warm-up with the production default strategy
   alone, as production would. The OPE log starts ``ope_burn_in_days`` into the warm-up
   (14: the dismissal cooldown, after which dismissed features come back, as they do all
   through the experiment), and the pipeline retrains then: the targets of the OPE are
   those models, which have not seen the log they are evaluated on (a policy evaluated on
   the log it learned from looks better than it is). They are earlier versions of the
   models the variants serve; the models retrained at the warm-up's end (and weekly during
   the run) have seen more feedback. The uniform share bounds the importance weights (by
   ~2 x the number of candidates; with the production policy alone, eps = 0.1, they reach
   ~100). At the warm-up's end, the OPE estimate of each variant's CTR and 7-day adoption
   per recommendation is made from that log (:mod:`featurerec.experiments.ope`, rewards
   from :mod:`featurerec.experiments.rounds`), before any user sees the variants: each
   variant replayed with its own exposure (its own caps, cooldowns and adoptions,
   :class:`featurerec.experiments.offline.SelfExposure`; the headline) and, for comparison,
   one-step on the log's eligibility.
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
   warehouse, the spec's results tables, cold start vs random, and OPE vs online: the same
   per-round rewards, denominators and 7-day censoring on both sides, user-clustered, for
   the whole run and for the frozen policy the OPE evaluated (the experiment's days before
   the first retrain), with "OPE inside the online interval" and a two-sided test of
   OPE = online from both standard errors; plus the same comparison split by exposure (the
   user's first, second or later showing of the feature; :class:`OPEByExposure`), which
   shows where a policy that shapes its own history leaves the log's support.

Placements: ``sidebar_panel`` asks when the user starts their first session of the day;
``in_context_tooltip`` when they first use a feature that day (the request carries that
feature as context); ``onboarding_wizard`` only in a user's first 7 days; ``email_digest``
once a week for every signed-up user, active or not.

Reproducibility: every draw here derives from ``seed``; request ids (hence recommendation
ids, which order rows downstream) are ``sim<seed>-d<day>-r<i>`` rather than uuid4, and the
daily score tables are built in sorted user order. The pipeline's interaction strengths are
summed exactly (``interaction_matrix_v2.sql``: a parallel sum of doubles varied in its last
bits with thread timing, which rounding to 3 decimals turned into different models), and
two full-scale runs (36k users) with the same seed gave identical results. Not always: of
three seed-0 runs of the 28-day warm-up on one machine, two agreed and one diverged from the
experiment's first retrain on (same warm-up, OPE estimates and first week; 211,359 against
211,123 experiment rounds at the end); the cause was not found.

The world continues through SIM's :class:`~featurerec.simulate.state.WorldState`: a day is
simulated with ``advance(1, exposures)``, where ``exposures`` are the recommendations served
on the previous day (responses are drawn by SIM's
:class:`~featurerec.simulate.response.ResponseModel` at the time they were shown, and
induced first uses land in the following days). Serving needs to know who is in the product
and when, which only the simulated day tells, hence the one-day lag between serving and
the call that draws the responses; clicks (seconds after showing) and dismissals are logged
with their own timestamps, so nothing is shifted in the log. The ``feature_discovered``
events SIM adds for clicks are lost for clicks on the day before the one being advanced
(attribution does not use them).
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

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
#: Warm-up logging policies (``OnlineConfig.logging_policy``).
LOGGING_POLICIES = ("mixture", "production")


# -- config and results -----------------------------------------------------------------------
@dataclass(frozen=True)
class OnlineConfig:
    """How big and how long; every random draw derives from ``seed``."""

    users: int = 36_000
    history_days: int = 14
    #: Logging-policy days before the experiment (the OPE log); OPE needs at least
    #: ``ope_burn_in_days`` + 7 + 1 of them for 7-day adoption (windows must close).
    warmup_days: int = 28
    #: None = the spec's duration_weeks.
    weeks: float | None = None
    #: The spec retrains daily (1); weekly keeps a 4-week, 36k-user run within 10 minutes.
    retrain_every_days: int = 7
    #: Placement for variants that do not choose one (strategy experiments).
    default_placement: str = "sidebar_panel"
    holdout_share: float = 0.05
    seed: int = 0
    pipeline_spec: str = "builtin:pipeline.demo.json"
    ope: bool = True
    #: OPE's log starts this many days into the warm-up, and the models OPE evaluates are
    #: retrained then (trained before the log they are evaluated on). Recommendations
    #: start from nothing in the simulated world: at first every slate is a first
    #: exposure, with no dismissals or caps behind it, a transient the experiment, which
    #: follows the warm-up, never sees. It lasts as long as serving's dismissal cooldown
    #: (14 days): only then do dismissed features come back. In the 4-week experiment of
    #: benchmarks/results/online.json more than half of the recommendations re-show a
    #: feature the user had dismissed, at a much lower CTR (``reshown_after_dismissal``
    #: there, next to the OPE window's share); a log starting 3 days in (the earlier
    #: default) has almost none.
    ope_burn_in_days: int = 14
    #: Who serves the warm-up, whose log OPE reads: ``"mixture"``, a logging policy
    #: designed for OPE (each request is served uniformly at random with probability
    #: ``logging_uniform_share``, otherwise by a strategy drawn uniformly from the
    #: experiment's variants' strategies, with the deployment's exploration; the propensity
    #: logged is the mixture's), or ``"production"`` (the default strategy with the
    #: deployment's exploration, as in production).
    logging_policy: str = "mixture"
    #: The uniform-random share of the ``"mixture"`` logging policy (the Open Bandit
    #: Dataset's "Random" policy); the rest is split evenly between the variants' strategies.
    logging_uniform_share: float = 0.5

    def __post_init__(self) -> None:
        if self.default_placement not in PLACEMENT_CODES:
            raise DataError(
                f"default placement must be one of {PLACEMENT_CODES} (got {self.default_placement!r})"
            )
        if not 0 <= self.holdout_share < 0.5:
            raise DataError(f"holdout_share must be in [0, 0.5) (got {self.holdout_share})")
        if self.retrain_every_days < 1:
            raise DataError(f"retrain_every_days must be >= 1 (got {self.retrain_every_days})")
        if self.ope_burn_in_days < 0:
            raise DataError(f"ope_burn_in_days must be >= 0 (got {self.ope_burn_in_days})")
        if self.logging_policy not in LOGGING_POLICIES:
            raise DataError(
                f"logging_policy must be one of {LOGGING_POLICIES} (got {self.logging_policy!r})"
            )
        if not 0 <= self.logging_uniform_share <= 1:
            raise DataError(
                f"logging_uniform_share must be in [0, 1] (got {self.logging_uniform_share})"
            )


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
    #: the looser check: the online value lies inside the OPE interval
    online_inside_ope_ci: bool | None = None
    #: Like with like: the online result of the recommendations served by the frozen
    #: policy the OPE evaluated (the experiment's first days, before the first retrain);
    #: the whole-run figures above also include later, retrained policies.
    frozen_online: float | None = None
    frozen_ci_low: float | None = None
    frozen_ci_high: float | None = None
    inside_frozen_ci: bool | None = None
    #: p-value of "OPE = online" from both standard errors (the check that accounts for the
    #: OPE's own uncertainty), and whether p >= 0.05; whole run and frozen policy
    p_online: float | None = None
    consistent_online: bool | None = None
    p_frozen: float | None = None
    consistent_frozen: bool | None = None
    #: importance weights: effective sample size (sum w)^2 / sum w^2 and the largest weight
    #: (a small ESS means a heavy-tailed, skewed estimate: usually a little low, now and
    #: then far too high)
    effective_sample_size: float | None = None
    max_weight: float | None = None
    #: "own": the target replayed with its own exposure (its own caps, cooldowns and
    #: adoptions; :class:`featurerec.experiments.offline.SelfExposure`), the headline;
    #: "logged": on the log's eligibility (one-step)
    exposure: str = "own"
    #: the target's mean probability per logged slot of an item the log could not show
    #: at that request (IPS counts it as reward 0, DR as the reward model's value)
    unsupported_mass: float = 0.0


@dataclass(frozen=True)
class OPEByExposure:
    """The pre-run OPE (SNIPS) next to the online result, split by exposure: ``stratum`` is
    the user's "first", "second" or "third+" showing of the feature in that round
    (:data:`featurerec.experiments.rounds.SHOWINGS`).

    One-step OPE values a policy on the log's histories, where ``log_share`` of the target's
    rounds fall in the stratum; a policy serving for weeks repeats its own recommendations
    (frequency caps and cooldowns limit how often, not whether), so online ``online_share``
    of its rounds do, and later showings, the survivors of earlier ones that were neither
    taken up nor dismissed, are clicked less. Per stratum the comparison is like with like.
    The "remixed" row recombines the strata at the *online* shares: a diagnostic of how much
    of the whole-run gap the exposure mix explains, not a pre-run estimate (the online mix is
    known only after the run)."""

    variant: str
    metric: str
    stratum: str
    #: None where the target puts no weight on the stratum's logged rounds (no support)
    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    online: float | None
    online_ci_low: float | None
    online_ci_high: float | None
    inside_online_ci: bool | None
    log_share: float | None
    online_share: float | None


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
    #: OPE vs online by exposure (first / second / later showings): see OPEByExposure
    ope_by_exposure: list[OPEByExposure] = field(default_factory=list)

    def exposure_inside_share(self, stratum: str) -> float | None:
        """Share of variants x metrics whose OPE of ``stratum`` ("first", "second",
        "third+", "remixed") is inside the online 95% interval of the same stratum (of the
        whole run for "remixed")."""
        checked = [
            o.inside_online_ci
            for o in self.ope_by_exposure
            if o.stratum == stratum and o.inside_online_ci is not None
        ]
        return sum(checked) / len(checked) if checked else None

    def share(
        self,
        attr: str,
        *,
        estimator: str | None = None,
        metric: str | None = None,
        exposure: str = "own",
    ) -> float | None:
        """Share of OPE rows of ``exposure`` ("own" or "logged"; optionally one estimator /
        metric) whose boolean ``attr`` (``inside_online_ci``, ``inside_frozen_ci``,
        ``consistent_online``, ...) is true."""
        checked = [
            o
            for o in self.ope
            if getattr(o, attr) is not None
            and o.exposure == exposure
            and (estimator is None or o.estimator == estimator)
            and (metric is None or o.metric == metric)
        ]
        return sum(bool(getattr(o, attr)) for o in checked) / len(checked) if checked else None

    @property
    def ope_inside_share(self) -> float | None:
        """Share of OPE estimates (own exposure, every estimator) inside the online 95%
        interval of the whole run."""
        return self.share("inside_online_ci")

    @property
    def ope_inside_frozen_share(self) -> float | None:
        """Share of OPE estimates (own exposure) inside the 95% interval of the online
        result of the same frozen policy (the experiment's days before the first retrain)."""
        return self.share("inside_frozen_ci")


# -- the run ------------------------------------------------------------------------------------
@dataclass
class _Served:
    """One day's served items, as parallel lists (filled per request)."""

    user: list[str] = field(default_factory=list)
    feature: list[str] = field(default_factory=list)
    placement: list[str] = field(default_factory=list)
    shown_at: list[datetime] = field(default_factory=list)
    rec_id: list[str] = field(default_factory=list)

    def table(self) -> pa.Table:
        return pa.table(
            {
                "recommendation_id": pa.array(self.rec_id, pa.string()),
                "user_id": pa.array(self.user, pa.string()),
                "feature": pa.array(self.feature, pa.string()),
                "placement": pa.array(self.placement, pa.string()),
                "shown_at": pa.array(self.shown_at, pa.timestamp("us")),
            }
        )


@dataclass
class _LoggedContext:
    """What the warm-up's mixture logging policy saw for one request, kept for the day so
    the mixture's propensities can be logged (:meth:`OnlineExperiment._log_mixture_propensities`):
    the user state and eligibility mask, the served slate (model item ids, 0-based positions)
    and each served item's propensity under ``strategy``, the strategy that served it. (OPE
    reads the decisions back from the warehouse, as for any deployment:
    :mod:`featurerec.experiments.offline`.)"""

    user: Any
    exclude: np.ndarray
    rec_ids: list[str]
    features: list[int]
    positions: list[int]
    propensities: list[float]
    strategy: str = ""


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
        self.timings: dict[str, float] = {}
        self.counts: dict[str, int] = {
            "requests": 0, "recommendations": 0, "clicks": 0, "dismissals": 0,
            "induced_adoptions": 0, "retrains": 0, "events_ingested": 0,
        }  # fmt: skip
        self.latencies: dict[str, list[float]] = {}
        self.notes: list[str] = []
        self.now = datetime(1970, 1, 1)
        self._buffer: list[pa.Table] = []
        self._log_buffer: list[dict[str, Any]] = []
        self._fb_buffer: list[dict[str, Any]] = []
        self._ctx_buffer: list[dict[str, Any]] = []
        #: the models OPE evaluates: those trained when the OPE log starts (None: the served)
        self.ope_model: Any = None

    # ---------------------------------------------------------------------------------------
    def _time(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def setup(self) -> None:
        from featurerec.events.ingest import Ingestor
        from featurerec.simulate.emit import chunk_strings
        from featurerec.simulate.state import WorldState
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
        self.ws = WorldState.load(self.world_dir)
        self._time("world", t0)
        t0 = time.perf_counter()
        self.progress("ingesting the world", 0, 1)
        self.engine = open_warehouse(self.settings)
        self.ingestor = Ingestor(self.engine, self.settings)
        self.ingestor.ingest_world(self.world_dir)
        self._time("ingest", t0)

        self.user_ids: list[str] = []
        for u0, u1, _w0, _w1 in self.ws.world.chunks:
            self.user_ids.extend(chunk_strings(self.ws.world.population, u0, u1)[0].to_pylist())
        self.features = list(self.ws.features)
        self.t0 = datetime(
            self.ws.truth.start.year, self.ws.truth.start.month, self.ws.truth.start.day
        )
        self.day = self.ws.day
        self.exposures: pa.Table | None = None
        from featurerec.experiments.assignment import assign, bucket

        self.holdout = {
            u for u in self.user_ids if bucket(HOLDOUT_EXPERIMENT, u) < self.cfg.holdout_share
        }
        self.variant_of = {u: assign(self.spec, u) for u in self.user_ids}
        self._retrain()

    def _dt(self, us_since_start: int) -> datetime:
        return self.t0 + timedelta(microseconds=int(us_since_start))

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
            if not hasattr(self, "model"):
                raise DataError(
                    f"the first pipeline run on the simulated world {record.status} (stages "
                    f"{failed}); nothing to serve. A bigger world (--users) or a pipeline spec "
                    f"whose quality gates fit it ({self.cfg.pipeline_spec}) is needed"
                )
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
        if not hasattr(self, "experiment_start"):  # the warm-up's logging policy
            self.logging_mixture = self._logging_mixture()
            # one service per mixed strategy ("production" serves with "default" alone)
            mixed = self.logging_mixture if self.cfg.logging_policy == "mixture" else {}
            serving = self.settings.serving
            for i, name in enumerate(mixed):
                log_settings = self.settings.model_copy(
                    update={"serving": serving.model_copy(
                        update={"default_strategy": name, "seed": serving.seed + 1 + i})}
                )  # fmt: skip
                self.services[f"log:{name}"] = RecommendationService(
                    log_settings, dep, state, model, clock=clock
                )
        self.counts["retrains"] += 1
        self._time("reload", t0)

    def _logging_mixture(self) -> dict[str, float]:
        """The warm-up logging policy: served strategy -> probability that it serves a
        request. ``"mixture"``: ``random`` (uniform over the eligible candidates) with
        ``logging_uniform_share``, the rest split evenly between the distinct strategies the
        experiment's variants serve (as the model names them), each with the deployment's
        exploration; ``"production"``: the default strategy alone.

        Why a mixture: OPE's importance weights are target / logging probabilities, so
        each target needs logging mass where it puts its own. The variants' strategies put
        it near the targets, but the targets are the models retrained at the end of the
        warm-up (the bandit then learns from its feedback), which agree with their warm-up
        versions on only part of the slots; the uniform share bounds every weight
        (in an 8,000-user run, ``bench_online.py --users 8000``, whose result file was not
        kept: expected effective sample size 0.16-0.47 of the rounds per target, against
        0.03-0.06 with the production policy; at 36k users ``online.json`` records the
        mixture's ESS per target)."""
        default = self.model.strategy_name(self.settings.serving.default_strategy)
        if self.cfg.logging_policy == "production":
            return {default: 1.0}
        names = sorted(
            {self.model.strategy_name(v.resolved_strategy or default) for v in self.spec.variants}
        )
        uniform = self.cfg.logging_uniform_share if names != ["random"] else 1.0
        mixture = {n: (1 - uniform) / len(names) for n in names}
        mixture["random"] = mixture.get("random", 0.0) + uniform
        return {n: w for n, w in sorted(mixture.items()) if w > 0}

    # ---------------------------------------------------------------------------------------
    def _requests(self, events: pa.Table, day: int) -> list[tuple[int, str, int, str | None]]:
        """(µs since world start, user id, placement code, context feature) of the day's
        possible requests, one list for every placement (the caller keeps the one matching
        each user's variant); see the module docstring for when each placement asks."""
        import pyarrow.compute as pc

        out: list[tuple[int, str, int, str | None]] = []
        t0 = np.datetime64(self.t0, "us")
        if events.num_rows:
            ev = events.sort_by([("timestamp", "ascending")])
            uid = ev.column("user_id").to_numpy(zero_copy_only=False)
            ts = (ev.column("timestamp").to_numpy() - t0).astype(np.int64)
            first_u, first_i = np.unique(uid, return_index=True)
            signup = self.ws.truth.signup_day[self.ws.truth.user_index(pa.array(first_u))]
            for u, i, sd in zip(first_u.tolist(), first_i.tolist(), signup.tolist(), strict=True):
                out.append((int(ts[i]), u, 0, None))  # sidebar at the day's first session
                if day - sd < ONBOARDING_DAYS:
                    out.append((int(ts[i]), u, 2, None))
            fu = pc.equal(ev.column("event_type"), "feature_used").to_numpy(zero_copy_only=False)
            feat = ev.column("feature_category").to_numpy(zero_copy_only=False)
            fu_u, fu_i = np.unique(uid[fu], return_index=True)
            f_ts, f_feat = ts[fu], feat[fu]
            for u, i in zip(fu_u.tolist(), fu_i.tolist(), strict=True):
                out.append((int(f_ts[i]), u, 1, f_feat[i]))  # tooltip at the first feature use
        if (day - self.cfg.history_days) % 7 == 0:  # the weekly email, to everyone present
            t = self.ws.truth
            alive = t.signup_day <= day
            if t.churn_day is not None:
                alive &= t.churn_day >= day
            t8 = day * DAY_US + 8 * 3600 * 1_000_000
            out.extend((t8, self.user_ids[int(g)], 3, None) for g in np.flatnonzero(alive))
        return out

    def _placement_for(self, user_id: str, phase: str) -> tuple[str, int]:
        """(service key, placement code) for ``user_id`` in this phase."""
        default = PLACEMENT_CODES.index(self.cfg.default_placement)
        if phase == "warmup":
            return "default", default
        if user_id in self.holdout:
            return "random", default
        pl = self.variant_of[user_id].resolved_placement
        return "experiment", PLACEMENT_CODES.index(pl) if pl else default

    def step_day(self, phase: str) -> None:
        """Simulate one day: the world moves (with responses to yesterday's recommendations),
        today's active users are served, the online state learns the day's events."""
        from featurerec.serving.service import RecommendationRequest, RequestContext
        from featurerec.serving.state import epoch_seconds

        day = self.day
        t0 = time.perf_counter()
        adv = self.ws.advance(1, self.exposures, seed=self.cfg.seed)
        self.exposures = None
        events = adv.events
        self._time("world_step", t0)
        t0 = time.perf_counter()
        self._take_responses(adv.responses)
        self._time("responses", t0)

        # Serve in time order; each user gets the request of their variant's placement.
        t0 = time.perf_counter()
        requests = [
            r for r in self._requests(events, day) if r[2] == self._placement_for(r[1], phase)[1]
        ]
        requests.sort()
        self._prewarm(sorted({r[1] for r in requests}), phase)
        served = _Served()
        log_rows: list[dict[str, Any]] = []
        context_rows: list[dict[str, Any]] = []
        contexts: list[_LoggedContext] = []
        mf = {f: j for j, f in enumerate(self.model.features)}
        mixture = phase == "warmup" and self.cfg.logging_policy == "mixture"
        # the mixture's draws: one strategy per request, from the seed and the day alone
        draw = np.random.default_rng([self.cfg.seed, 0x10_66ED, day])
        log_names = list(self.logging_mixture)
        log_p = np.array(list(self.logging_mixture.values()))
        for i, (ts_us, user_id, pcode, ctx_feature) in enumerate(requests):
            key, want = self._placement_for(user_id, phase)
            if pcode != want:
                continue
            if mixture:
                key = f"log:{log_names[int(draw.choice(len(log_names), p=log_p))]}"
            svc = self.services[key]
            self.now = self._dt(ts_us)
            req = RecommendationRequest(
                user_id,
                placement=PLACEMENT_CODES[pcode],
                context=RequestContext(feature=ctx_feature),
                # deterministic ids (uuid4 otherwise): rows are ordered by them downstream
                request_id=f"sim{self.cfg.seed}-d{day}-r{i}",
            )
            if mixture:
                user_state, exclude = self._logging_context(svc, req)
            res = svc.recommend(req)
            self.counts["requests"] += 1
            if not res.recommendations:
                continue
            variant = res.variant or ("random-holdout" if key == "random" else "warmup")
            self.latencies.setdefault(variant, []).append(res.latency_ms)
            log_rows.extend(res.log_records)
            if res.context_record is not None:
                context_rows.append(res.context_record)
            for item in res.recommendations:
                served.user.append(user_id)
                served.feature.append(item.feature)
                served.placement.append(PLACEMENT_CODES[pcode])
                served.shown_at.append(res.generated_at)
                served.rec_id.append(item.recommendation_id)
            if mixture:
                contexts.append(
                    _LoggedContext(
                        user_state,
                        exclude,
                        [it.recommendation_id for it in res.recommendations],
                        [mf[it.feature] for it in res.recommendations],
                        [it.position - 1 for it in res.recommendations],
                        [it.propensity for it in res.recommendations],
                        res.strategy,
                    )
                )
        if mixture:
            self._log_mixture_propensities(contexts, log_rows)
        self._time("serving", t0)
        # Only features the world knows can be shown to its users.
        known = set(self.features)
        keep = [i for i, f in enumerate(served.feature) if f in known]
        if len(keep) < len(served.feature):
            self.counts["unknown_features"] = self.counts.get("unknown_features", 0) + (
                len(served.feature) - len(keep)
            )
        self.exposures = served.table().take(pa.array(keep, pa.int64())) if keep else None
        self.counts["recommendations"] += len(served.rec_id)

        # The day's events reach the online state now (as landed events reach the server);
        # the warehouse gets them, the log and the feedback before the next retrain.
        t0 = time.perf_counter()
        if events.num_rows:
            self._buffer.append(events)
            used = events.filter(pa.compute.equal(events.column("event_type"), "feature_used"))
            new_users = [
                u
                for u in pa.compute.unique(used.column("user_id")).to_pylist()
                if self.state.row_of(u) is None
            ]
            if not new_users:  # traits only matter for users the state has not seen yet
                used = used.set_column(
                    used.schema.get_field_index("user_traits"),
                    "user_traits",
                    pa.nulls(used.num_rows, pa.string()),
                )
            self.state.apply_events(used)
        self._log_buffer.extend(log_rows)
        self._ctx_buffer.extend(context_rows)
        self._time("state_apply", t0)
        self.day += 1
        _ = epoch_seconds  # (dismissals reach the state in _take_responses)

    def _prewarm(self, user_ids: list[str], phase: str) -> None:
        """Serve today from a copy of the production model whose score tables hold today's
        requesting users as they are now (one batch), so a request never computes one user's
        scores alone. Same bundle, same rankings (SERVE's fast path is exact); it only keeps
        the simulation fast: SERVE's per-user refresh after a user's state changes costs tens
        of ms, so the p99 latency measured here is that of warm tables."""
        from featurerec.serving.loader import BundleModel

        t0 = time.perf_counter()
        rows = [self.state.row_of(u) for u in user_ids]
        states = [self.state.user_state(r) for r in rows if r is not None]
        names = {self.settings.serving.default_strategy}
        if phase == "warmup":
            names |= set(self.logging_mixture)
        else:
            names |= {v.resolved_strategy or self.settings.serving.default_strategy
                      for v in self.spec.variants} | {"random"}  # fmt: skip
        warm = sorted({self.model.strategy_name(n) for n in names})
        daily = BundleModel(self.model.bundle, self.model.version, states, warm)
        for svc in self.services.values():
            svc.swap_model(daily)
        self.daily_model = daily
        self._time("prewarm", t0)

    def _log_mixture_propensities(
        self, contexts: list[_LoggedContext], log_rows: list[dict[str, Any]]
    ) -> None:
        """Replace each served item's propensity (its strategy's, as the service logged it)
        by the mixture logging policy's: the sum over the mixed strategies of their share
        times the probability that each would show that item at that position, for the same
        user state and eligibility (the per-strategy results the service itself looked up
        with ``BundleModel.lookup``, so nothing is recomputed). The recommendation log, the
        bandit's IPW training and OPE then all read the true propensity. A served item whose
        own strategy's probability does not equal the one the service logged is counted
        (``counts["logging_propensity_mismatch"]``: zero unless this reconstruction and
        SERVE's slate policy disagree)."""
        from featurerec.models.ranking import slate_distribution

        if not contexts:
            return
        t0 = time.perf_counter()
        dep = self.deployment.models
        k, top_k, eps = (
            dep.ranker.output_k,
            dep.candidate_generator.top_k,
            dep.ranker.exploration_rate,
        )
        users = [c.user for c in contexts]
        exclude = np.stack([c.exclude for c in contexts])
        dists = {}
        for name in self.logging_mixture:
            looked = [self.daily_model.lookup(name, u) for u in users]
            upstream = np.stack([x[0] for x in looked])
            rank = np.stack([x[1] for x in looked])
            dists[name] = slate_distribution(upstream, rank, exclude, k, top_k,
                                      1.0 if name == "random" else eps)  # fmt: skip
        mix = np.zeros((len(contexts), len(self.model.features), k))
        for name, weight in self.logging_mixture.items():
            mix += weight * dists[name]
        new: dict[str, float] = {}
        mismatch = 0
        for i, c in enumerate(contexts):
            own = dists[c.strategy]
            for j, (rid, f, p) in enumerate(zip(c.rec_ids, c.features, c.positions, strict=True)):
                if abs(own[i, f, p] - c.propensities[j]) > 1e-9:
                    mismatch += 1
                c.propensities[j] = new[rid] = float(mix[i, f, p])
        for row in log_rows:
            row["propensity"] = new.get(row["recommendation_id"], row["propensity"])
        self.counts["logging_propensity_mismatch"] = (
            self.counts.get("logging_propensity_mismatch", 0) + mismatch
        )
        self._time("logging_propensities", t0)

    def _take_responses(self, responses: pa.Table) -> None:
        """Impressions, clicks and dismissals of yesterday's recommendations -> the feedback
        log (and dismissals -> the online state, as the feedback endpoint does)."""
        from featurerec.serving.state import epoch_seconds

        if responses.num_rows == 0:
            return
        r = responses.to_pydict()
        fb = self._fb_buffer
        for i, rid in enumerate(r["recommendation_id"]):
            uid = r["user_id"][i]
            fb.append({"feedback_id": f"{rid}:impression", "recommendation_id": rid,
                       "user_id": uid, "kind": "impression", "timestamp": r["shown_at"][i]})  # fmt: skip
            if r["clicked"][i]:
                fb.append({"feedback_id": f"{rid}:click", "recommendation_id": rid,
                           "user_id": uid, "kind": "click", "timestamp": r["click_at"][i]})  # fmt: skip
            if r["dismissed"][i]:
                fb.append({"feedback_id": f"{rid}:dismiss", "recommendation_id": rid,
                           "user_id": uid, "kind": "dismiss", "timestamp": r["dismiss_at"][i]})  # fmt: skip
                self.state.record_dismissal(uid, r["feature"][i], epoch_seconds(r["dismiss_at"][i]))
        self.counts["clicks"] += int(sum(r["clicked"]))
        self.counts["dismissals"] += int(sum(r["dismissed"]))
        self.counts["induced_adoptions"] += int(sum(r["adopted"]))

    def flush(self) -> None:
        """Ingest buffered product events (INGEST's Ingestor, one batch) and write the
        buffered recommendation log and feedback to the warehouse."""
        from featurerec.events.validate import normalize_table
        from featurerec.serving.reclog import insert_logs

        t0 = time.perf_counter()
        if self._buffer:
            events = pa.concat_tables(self._buffer)
            self._buffer = []
            now = self._dt(self.day * DAY_US)
            batch = normalize_table(events, settings=self.settings, source="simulate", now=now)
            rep = self.ingestor.append(batch, batch_id=f"online-{self.cfg.seed}-{self.day}")
            self.counts["events_ingested"] += int(rep.accepted)
        insert_logs(self.engine, self._log_buffer, self._fb_buffer, self._ctx_buffer)
        self._log_buffer, self._fb_buffer, self._ctx_buffer = [], [], []
        self._sync_churn()
        self._time("ingest_daily", t0)

    def _sync_churn(self) -> None:
        """Workspaces that churned since the last sync get ``churned_at`` in the warehouse, as
        the product database's change feed would deliver it (full rows through the
        Ingestor's ``upsert_rows``)."""
        from featurerec.simulate.ids import workspace_ids

        idx, when = [], []
        for sim in self.ws.sims:
            local = np.flatnonzero(sim.ws_churn_ts >= 0)
            idx.extend((sim.w0 + local).tolist())
            when.extend(sim.ws_churn_ts[local].tolist())
        if not idx:
            return
        ids = workspace_ids(np.asarray(idx)).to_pylist()
        churned = {w: self._dt(int(t)) for w, t in zip(ids, when, strict=True)}
        name = "_online_churn_ids"
        self.engine.register_arrow(name, pa.table({"workspace_id": pa.array(ids, pa.string())}))
        try:
            current = self.engine.query_arrow(
                f"SELECT w.* FROM workspaces w JOIN {name} c USING (workspace_id) "
                "WHERE w.churned_at IS NULL"
            )
        finally:
            self.engine.unregister(name)
        if current.num_rows == 0:
            return
        wid = current.column("workspace_id").to_pylist()
        col = current.schema.get_field_index("churned_at")
        current = current.set_column(
            col, "churned_at", pa.array([churned[w] for w in wid], pa.timestamp("us"))
        )
        upd = current.schema.get_field_index("updated_at")
        now = self._dt(self.day * DAY_US)
        current = current.set_column(
            upd, "updated_at", pa.array([now] * len(wid), pa.timestamp("us"))
        )
        self.ingestor.upsert_rows("workspaces", current)
        self.counts["workspaces_churned"] = self.counts.get("workspaces_churned", 0) + len(wid)

    def _logging_context(self, svc: Any, req: Any) -> tuple[Any, np.ndarray]:
        """The user state and the eligibility mask the logging policy sees (for OPE)."""
        from featurerec.serving.state import epoch_seconds

        state = svc.state
        row = state.row_of(req.user_id)
        user, attrs, adopted = svc._user(state, req)[1:]
        k = svc.deployment.models.ranker.output_k
        now = epoch_seconds(svc.clock())
        exclude, _ = svc.policy.exclude_mask(attrs, adopted, state.exposure(row, now), now, k)
        mf = self.model.features
        if mf != state.features:
            index = {f: j for j, f in enumerate(state.features)}
            exclude = np.array([bool(exclude[index[f]]) if f in index else True for f in mf])
        return user, exclude

    # ---------------------------------------------------------------------------------------
    def run(self) -> OnlineResult:
        t_all = time.perf_counter()
        self.setup()
        self.warmup_start = self._dt(self.day * DAY_US)
        weeks = self.cfg.weeks if self.cfg.weeks is not None else self.spec.duration_weeks
        exp_days = round(weeks * 7)
        total = self.cfg.warmup_days + exp_days
        done = 0
        for i in range(self.cfg.warmup_days):
            if self.cfg.ope and i == self.cfg.ope_burn_in_days:
                # OPE evaluates the models trained when its log starts, on that log: models
                # evaluated on a log they were trained on look better than they are
                if i:
                    self._retrain()
                self.ope_model = self.model
            self.progress(f"warm-up ({self.cfg.logging_policy} logging policy)", done, total)
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
        self.finish()
        return self._results(ope_before, t_all)

    def finish(self) -> None:
        """One more simulated day, so the last day's recommendations get their responses
        (the report's as-of time is the end of that day)."""
        t0 = time.perf_counter()
        adv = self.ws.advance(1, self.exposures, seed=self.cfg.seed)
        self.exposures = None
        self._take_responses(adv.responses)
        if adv.events.num_rows:
            self._buffer.append(adv.events)
        self.day += 1
        self._time("world_step", t0)

    # ---------------------------------------------------------------------------------------
    def _ope_estimates(self) -> list[dict[str, Any]]:
        """Each variant's CTR and 7-day adoption per recommendation estimated from the
        warm-up log (after its burn-in), now, as ``featurerec experiment ope`` estimates a
        candidate on a deployment's log (:mod:`featurerec.experiments.offline`: the logged
        decisions read back from the warehouse, each variant's strategy of the models
        trained when the log starts, ``ope_model``, replayed on them).
        Rewards, denominators and censoring are :mod:`featurerec.experiments.rounds`' (the
        online side of the comparison uses the same definitions)."""
        from featurerec.experiments.offline import (
            SelfExposure,
            evaluate,
            load_exposure_history,
            load_logged_decisions,
        )
        from featurerec.feedback.attribution import attribute
        from featurerec.serving.eligibility import EligibilityRules

        self.flush()
        t0 = time.perf_counter()
        as_of = self.experiment_start
        attribute(self.engine, as_of=as_of)
        self.ope_log_start = self.warmup_start + timedelta(days=self.cfg.ope_burn_in_days)
        # the whole warm-up log: with the mixture logging policy, rounds served by its
        # uniform-random share too (their propensities are the mixture's like the others');
        # the last warm-up day's recommendations get their responses when the next day is
        # simulated, so their clicks are not known yet: the log ends before that day
        end = self._dt((self.day - 1) * DAY_US) - timedelta(microseconds=1)
        model = self.ope_model or self.model
        decisions = load_logged_decisions(
            self.engine, model.features, as_of=as_of, start=self.ope_log_start, end=end,
            experiments=False, include_random=self.cfg.logging_policy == "mixture",
        )  # fmt: skip
        out: list[dict[str, Any]] = []
        if not decisions.n:
            self.notes.append(
                "OPE: no logged warm-up recommendations to evaluate from (after the "
                f"{self.cfg.ope_burn_in_days}-day burn-in; increase --warmup-days)"
            )
            return out
        eps = self.deployment.models.ranker.exploration_rate
        k = self.deployment.models.ranker.output_k
        top_k = self.deployment.models.candidate_generator.top_k
        rules = EligibilityRules.from_settings(self.settings.serving)
        history = load_exposure_history(
            self.engine, model.features, before=self.ope_log_start,
            days=max(7, rules.dismissal_cooldown_days),
        )  # fmt: skip
        for v in self.spec.variants:
            strategy = v.resolved_strategy
            if v.resolved_placement not in (None, self.cfg.default_placement):
                out.append({"variant": v.name, "strategy": strategy, "skip":
                            "placement differs from the logged placement: no support"})  # fmt: skip
                continue
            name = model.strategy_name(strategy or self.settings.serving.default_strategy)
            e = 1.0 if name == "random" else eps
            dist_fn = functools.partial(_target_dist, model, name, decisions, k, top_k, e)
            # the headline: the variant replayed with its own exposure (its own caps,
            # cooldowns and adoptions, as it will run); next to it the one-step estimate on
            # the log's eligibility
            modes = {
                "own": SelfExposure(rules, e, history, seed=self.cfg.seed),
                "logged": None,
            }
            for exposure, replay in modes.items():
                results = evaluate(decisions, dist_fn, k=k, self_exposure=replay)
                for metric, res in results.items():
                    if isinstance(res, str):
                        out.append({"variant": v.name, "strategy": strategy, "metric": metric,
                                    "exposure": exposure,
                                    "skip": f"{res} after the burn-in, before the run "
                                            "(increase --warmup-days)"})  # fmt: skip
                        continue
                    # "shows nothing" mass: slots the target would leave empty are not
                    # recommendations (online they are not rounds), so IPS and DR are per
                    # slot the target fills; reported so it is visible
                    out.append({"variant": v.name, "strategy": strategy, "metric": metric,
                                "exposure": exposure, "estimates": res.estimates, "n": res.n,
                                "empty_mass": res.empty_mass,
                                "unsupported_mass": res.unsupported_mass,
                                "dismissed_ratio": res.dismissed_ratio,
                                "strata": res.strata if replay is None else None})  # fmt: skip
        self._time("ope", t0)
        return out

    def _results(self, ope_before: list[dict[str, Any]], t_all: float) -> OnlineResult:
        from featurerec.analysis.reports import cold_start
        from featurerec.experiments.report import experiment_report
        from featurerec.experiments.rounds import consistent, load_rounds, online_rates
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
        # OPE vs online, like with like: per-round rewards with the OPE's definitions
        # (experiments.rounds: same reward, denominator and 7-day censoring), user-clustered,
        # for the whole run and for the frozen policy the OPE evaluated (it serves until the
        # first retrain)
        frozen_end = min(
            end,
            self.experiment_start
            + timedelta(days=self.cfg.retrain_every_days)
            - timedelta(microseconds=1),
        )
        rounds = load_rounds(self.engine, as_of=end, start=self.experiment_start,
                             experiment=self.spec.name)  # fmt: skip
        names = list(self.spec.variant_names)
        whole = online_rates(rounds, names)
        frozen = online_rates(
            rounds.subset(rounds.generated_at <= np.datetime64(frozen_end, "us")), names
        )
        ope: list[OPEResult] = []
        for o in ope_before:
            if "skip" in o:
                ope.append(
                    OPEResult(o["variant"], o.get("strategy"), o.get("metric", "all"), "-",
                              None, None, None, None, None, None, None, 0, o["skip"],
                              exposure=o.get("exposure", "own"))
                )  # fmt: skip
                continue
            online = whole[o["variant"]][o["metric"]]
            fm = frozen[o["variant"]][o["metric"]]
            for name, e in o["estimates"].items():
                inside = (
                    None
                    if online.ci_low is None or online.ci_high is None
                    else bool(online.ci_low <= e.value <= online.ci_high)
                )
                reverse = (
                    None if online.value is None else bool(e.ci_low <= online.value <= e.ci_high)
                )
                inside_frozen = (
                    None
                    if fm.ci_low is None or fm.ci_high is None
                    else bool(fm.ci_low <= e.value <= fm.ci_high)
                )
                p_on, ok_on = consistent(e, online)
                p_fr, ok_fr = consistent(e, fm)
                notes = []
                if o.get("empty_mass", 0) > 0.005:
                    notes.append(f"target leaves {o['empty_mass']:.1%} of logged slots empty")
                if o.get("unsupported_mass", 0) > 0.005:
                    notes.append(f"{o['unsupported_mass']:.1%} of the target's mass on items "
                                 "the log could not show there")  # fmt: skip
                if o.get("dismissed_ratio") is not None and name == "dr":
                    notes.append(f"DR model x {o['dismissed_ratio']:.2f} for items dismissed "
                                 "before")  # fmt: skip
                note = "; ".join(notes)
                ope.append(
                    OPEResult(o["variant"], o["strategy"], o["metric"], name, e.value, e.ci_low,
                              e.ci_high, online.value, online.ci_low, online.ci_high, inside,
                              o["n"], note, online_inside_ope_ci=reverse,
                              frozen_online=fm.value, frozen_ci_low=fm.ci_low,
                              frozen_ci_high=fm.ci_high, inside_frozen_ci=inside_frozen,
                              p_online=p_on, consistent_online=ok_on, p_frozen=p_fr,
                              consistent_frozen=ok_fr,
                              effective_sample_size=e.effective_sample_size,
                              max_weight=e.max_weight,
                              exposure=o["exposure"],
                              unsupported_mass=o.get("unsupported_mass", 0.0))
                )  # fmt: skip
        by_exposure = self._by_exposure(ope_before, rounds, names, whole)
        for v in report.variants:
            if v.users == 0:
                why = (
                    "onboarding_wizard asks only in a user's first 7 days, and the continued "
                    "world has no new signups after its history window"
                    if self.spec.variant(v.name).resolved_placement == "onboarding_wizard"
                    else "nobody in it was served"
                )
                self.notes.append(f"variant {v.name} got no exposures: {why}")
        self._time("report", t0)
        self.timings["total"] = time.perf_counter() - t_all
        self.engine.close()
        return OnlineResult(
            experiment=self.spec.name,
            config=self.cfg,
            response_model="featurerec.simulate.response.ResponseModel (SIM)",
            report=report,
            cold_start=cs,
            ope=ope,
            timings={k: round(v, 2) for k, v in self.timings.items()},
            counts=self.counts,
            data_dir=str(self.settings.data_path),
            notes=self.notes,
            ope_by_exposure=by_exposure,
        )

    @staticmethod
    def _by_exposure(
        ope_before: list[dict[str, Any]], rounds: Any, names: list[str], whole: Any
    ) -> list[OPEByExposure]:
        """Per variant and metric: the OPE of each exposure stratum next to the online rate
        of the same stratum, and the strata recombined at the online shares (see
        :class:`OPEByExposure`)."""
        from featurerec.experiments.ope import remix
        from featurerec.experiments.rounds import METRICS, SHOWINGS, online_rates, showing_stratum

        stratum = showing_stratum(rounds.showing)
        online = {s: online_rates(rounds.subset(stratum == s), names) for s in SHOWINGS}
        out: list[OPEByExposure] = []
        for o in ope_before:
            strata = o.get("strata")
            if not strata or o["metric"] not in METRICS:
                continue
            v, metric = o["variant"], o["metric"]
            _, closed = rounds.reward(metric)
            sel = (rounds.variant == v) & closed
            n_on = int(sel.sum())
            if not n_on:
                continue
            shares = {s: float((sel & (stratum == s)).sum() / n_on) for s in SHOWINGS}
            rows: list[tuple[str, Any, Any, float | None, float | None]] = [
                (
                    s,
                    strata[s].estimate if s in strata else None,
                    online[s][v][metric],
                    strata[s].target_share if s in strata else 0.0,
                    shares[s],
                )
                for s in SHOWINGS
            ]
            if all(x == 0 or s in strata for s, x in shares.items()):
                rows.append(("remixed", remix(strata, shares), whole[v][metric], None, None))
            for name, est, on, log_share, on_share in rows:
                inside = (
                    None
                    if est is None or on.ci_low is None or on.ci_high is None
                    else bool(on.ci_low <= est.value <= on.ci_high)
                )
                out.append(
                    OPEByExposure(v, metric, name, None if est is None else est.value,
                                  None if est is None else est.ci_low,
                                  None if est is None else est.ci_high, on.value, on.ci_low,
                                  on.ci_high, inside, log_share, on_share)
                )  # fmt: skip
        return out


def _target_dist(
    model: Any,
    name: str,
    decisions: Any,
    k: int,
    top_k: int,
    eps: float,
    requests: np.ndarray,
    exclude: np.ndarray,
) -> np.ndarray:
    """The slate distribution of ``requests`` under ``exclude``
    (:func:`~featurerec.experiments.offline.evaluate`'s ``dist_fn``)."""
    from featurerec.experiments.offline import target_slate_dist

    users = [decisions.users[i] for i in requests.tolist()]
    return target_slate_dist(model, name, users, exclude, k, top_k, eps)


# -- output ---------------------------------------------------------------------------------------
def _interval(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def _yes_no(flag: bool | None) -> str:
    return "" if flag is None else ("yes" if flag else "no")


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
            "exposure": o.exposure,
            "estimator": o.estimator,
            "OPE before": o.estimate,
            "OPE 95% CI": _interval(o.ci_low, o.ci_high),
            "online": o.online,
            "online 95% CI": _interval(o.online_ci_low, o.online_ci_high),
            "OPE inside online CI": _yes_no(o.inside_online_ci),
            "online inside OPE CI": _yes_no(o.online_inside_ope_ci),
            "online (frozen policy)": o.frozen_online,
            "frozen 95% CI": _interval(o.frozen_ci_low, o.frozen_ci_high),
            "OPE inside frozen CI": _yes_no(o.inside_frozen_ci),
            "p (OPE = online)": o.p_online,
            "p (OPE = frozen)": o.p_frozen,
            "ESS": None if o.effective_sample_size is None else round(o.effective_sample_size),
            "max weight": o.max_weight,
            "note": o.note,
        }
        for o in result.ope
    ]
    tables["ope_by_exposure"] = [
        {
            "variant": o.variant,
            "metric": o.metric,
            "showing": o.stratum,
            "OPE (snips)": o.estimate,
            "OPE 95% CI": _interval(o.ci_low, o.ci_high),
            "online": o.online,
            "online 95% CI": _interval(o.online_ci_low, o.online_ci_high),
            "OPE inside online CI": _yes_no(o.inside_online_ci),
            "share in log (target)": o.log_share,
            "share online": o.online_share,
        }
        for o in result.ope_by_exposure
    ]
    return tables


def simulate_experiment_cmd(
    ctx: typer.Context,
    spec_ref: Annotated[str, typer.Argument(metavar="SPEC", help="Experiment name or JSON path.")],
    users: Annotated[int, typer.Option(help="Users in the simulated world.")] = 36_000,
    weeks: Annotated[float | None, typer.Option(help="Default: the spec's duration.")] = None,
    history_days: Annotated[int, typer.Option(help="Behaviour before the run.")] = 14,
    warmup_days: Annotated[
        int, typer.Option(help="Warm-up days served by the logging policy (the OPE log).")
    ] = OnlineConfig.warmup_days,
    burn_in: Annotated[
        int,
        typer.Option(
            help="First warm-up days the OPE leaves out (start transient); the models OPE "
            "evaluates are retrained when its log starts."
        ),
    ] = OnlineConfig.ope_burn_in_days,
    retrain_every: Annotated[int, typer.Option(help="Retrain every N days.")] = 7,
    placement: Annotated[
        str, typer.Option(help="Placement for variants that do not choose one.")
    ] = "sidebar_panel",
    holdout: Annotated[float, typer.Option(help="Share served the random baseline.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the world and every draw.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Work folder (default: <data dir>/online/<spec>).")
    ] = None,
    logging_policy: Annotated[
        str,
        typer.Option(
            help="Warm-up logging policy: mixture (variants' strategies + uniform random, "
            "designed for OPE) or production (the default strategy)."
        ),
    ] = "mixture",
    uniform_share: Annotated[
        float, typer.Option(help="Uniform-random share of the mixture logging policy.")
    ] = 0.5,
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
        seed=seed, ope=not no_ope, ope_burn_in_days=burn_in, logging_policy=logging_policy,
        logging_uniform_share=uniform_share,
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
            {
                "result": result,
                "tables": tables,
                "ope_inside_share": result.ope_inside_share,
                "ope_inside_frozen_share": result.ope_inside_frozen_share,
            }
        )
        return
    console.print(f"response model: {result.response_model}")
    for name, rows in tables.items():
        print_table(rows, title=name.replace("_", " "))
    inside = "OPE estimates inside the online 95% interval"
    logged = {"exposure": "logged"}
    for share, what in (
        (result.share("inside_online_ci"), f"{inside} (whole run)"),
        (result.share("inside_frozen_ci"), f"{inside} (frozen policy)"),
        (result.share("consistent_online"), "OPE consistent with online, p >= 0.05 (whole run)"),
        (result.share("consistent_frozen"), "OPE consistent with online, p >= 0.05 (frozen)"),
        (
            result.share("inside_online_ci", **logged),
            f"{inside} (whole run), one-step OPE on the log's exposure",
        ),
        (
            result.share("inside_frozen_ci", **logged),
            f"{inside} (frozen policy), one-step OPE on the log's exposure",
        ),
        (result.exposure_inside_share("first"), f"{inside}, first showings"),
        (result.exposure_inside_share("second"), f"{inside}, second showings"),
        (result.exposure_inside_share("third+"), f"{inside}, third and later showings"),
        (result.exposure_inside_share("remixed"), f"{inside}, remixed at the online shares"),
    ):
        if share is not None:
            console.print(f"{what}: {share:.0%}")
    print_report(result.report)
    console.print(f"timings (s): {result.timings}")
    console.print(f"counts: {result.counts}")
    for n in result.notes:
        console.print(f"[yellow]{n}[/yellow]")
