"""RecommendationService: the request path, shared by the HTTP app and ``featurerec recommend``.

One request::

    user state (online state; cold start from the request context when unknown)
      -> strategy (configured default, or the user's experiment variant)
      -> eligibility exclude mask (never violated, see eligibility.py)
      -> candidates (top_k from the strategy) -> bandit ranking with exploration -> top k
      -> reasons, CTAs -> remember what was served -> log records

The model is held behind one reference (:class:`ModelHolder`) that hot reload replaces in a
single assignment; a request takes the reference once at its start, so a swap never changes
a model under a request that is running. When no model bundle can be loaded (missing or
corrupt: the registry raises :class:`ModelError`), the service serves context / popularity
fallbacks computed from the snapshot and marks the response ``fallback: true``.

No SQL, no pandas here: array lookups and numpy on at most a few dozen items.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import orjson

from featurerec.catalog import Catalog
from featurerec.config import Settings
from featurerec.experiments.spec import ExperimentSpec
from featurerec.models.base import TEAM_SIZE_BUCKETS, UserContext, UserState, team_size_bucket
from featurerec.models.ranking import Ranked, epsilon_slates
from featurerec.serving.deployment import DeploymentSpec
from featurerec.serving.eligibility import EligibilityPolicy, EligibilityRules, UserAttributes
from featurerec.serving.reasons import ReasonBuilder
from featurerec.serving.snapshot import OnlineSnapshot
from featurerec.serving.state import OnlineState, epoch_seconds

log = logging.getLogger(__name__)

PLACEMENTS = ("onboarding_wizard", "sidebar_panel", "in_context_tooltip", "email_digest")


def utcnow() -> datetime:
    """UTC, timezone-naive (the project's timestamp convention)."""
    return datetime.now(UTC).replace(tzinfo=None)


class ServingModel(Protocol):
    """What the service needs from a loaded model bundle (or the fallback).

    ``recommend`` gets one user, the exclude mask over ``self.features`` (True = never) and
    returns a :class:`Ranked` with one row: ids into ``self.features`` (-1 padding),
    scores in 0..1 and the propensity of each shown item under the exploring policy.
    """

    version: str
    features: list[str]
    is_fallback: bool

    def strategy_name(self, requested: str) -> str:
        """The strategy actually served for ``requested`` (bundles may lack some)."""
        ...

    def recommend(
        self,
        strategy: str,
        user: UserState,
        exclude: np.ndarray,
        k: int,
        top_k: int,
        exploration_rate: float,
        rng: np.random.Generator,
    ) -> Ranked: ...


class SnapshotFallback:
    """Context / popularity fallback from the snapshot's facts, used when no bundle loads.

    Score of a feature: its adoption share in the user's (role, team-size) segment when that
    segment has at least ``min_support`` users, else its share among all users. Ranked with
    the same epsilon-greedy slate policy (exact propensities) as the real strategies.
    """

    is_fallback = True

    def __init__(self, snapshot: OnlineSnapshot, min_support: int = 20) -> None:
        self.features = list(snapshot.features)
        self.version = f"fallback:context-popularity@{snapshot.as_of.isoformat()}"
        n = max(snapshot.n_users, 1)
        self.overall = (snapshot.adopters / n).astype(np.float64)
        self._segment: dict[tuple[str, str], np.ndarray] = {}
        self.min_support = min_support
        for s, (rc, bc) in enumerate(
            zip(snapshot.segment_roles.tolist(), snapshot.segment_buckets.tolist(), strict=True)
        ):
            users = int(snapshot.segment_users[s])
            if users >= min_support:
                self._segment[(snapshot.roles[rc], TEAM_SIZE_BUCKETS[bc])] = (
                    snapshot.segment_adopters[s] / users
                )

    def strategy_name(self, requested: str) -> str:
        return "fallback"

    def scores(self, user: UserState) -> np.ndarray:
        ctx = user.context
        seg = self._segment.get((ctx.role or "", ctx.team_size_bucket))
        return seg if seg is not None else self.overall

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
        s = self.scores(user)[None, :]
        valid = ~exclude[None, :]
        cols, prop, explored = epsilon_slates(s, valid, k, exploration_rate, rng, explore=True)
        sc = np.where(cols >= 0, s[0, np.maximum(cols, 0)], 0.0).astype(np.float32)
        return Ranked(ids=cols, scores=sc, propensities=prop, explored=explored)


@dataclass(frozen=True)
class _StateContext:
    """An online state and the objects built from its snapshot (swapped as one)."""

    state: OnlineState
    policy: EligibilityPolicy
    reasons: ReasonBuilder
    fallback: SnapshotFallback


class ModelHolder:
    """One reference to the current model; replaced atomically by hot reload."""

    def __init__(self, model: ServingModel, error: str | None = None) -> None:
        self.model = model
        #: Why the real bundle is not serving (None when it is).
        self.error = error
        self.loaded_at = time.time()
        self.swaps = 0
        self._lock = threading.Lock()

    def swap(self, model: ServingModel, error: str | None = None) -> ServingModel:
        with self._lock:
            old = self.model
            self.model = model
            self.error = error
            self.loaded_at = time.time()
            self.swaps += 1
            return old


@dataclass(frozen=True)
class RequestContext:
    """Optional request context: where the user is and who they are (cold start)."""

    page: str | None = None
    feature: str | None = None
    role: str | None = None
    plan: str | None = None
    team_size: int | None = None
    industry: str | None = None


@dataclass(frozen=True)
class RecommendationRequest:
    user_id: str
    placement: str = "sidebar_panel"
    k: int | None = None
    context: RequestContext = field(default_factory=RequestContext)
    request_id: str | None = None


@dataclass(frozen=True)
class ServedItem:
    recommendation_id: str
    feature: str
    score: float
    reason: str
    cta_text: str
    cta_url: str
    position: int
    propensity: float


@dataclass
class RecommendationResult:
    user_id: str
    recommendations: list[ServedItem]
    model_version: str
    generated_at: datetime
    latency_ms: float
    request_id: str
    placement: str
    strategy: str
    fallback: bool
    cold_start: bool
    experiment: str | None = None
    variant: str | None = None
    #: ml.recommendation_log rows for this response (written by the caller, durably).
    log_records: list[dict[str, Any]] = field(default_factory=list)
    #: The ml.recommendation_context row of this request (what the policy decided on), when
    #: something was served (see :func:`decision_context`).
    context_record: dict[str, Any] | None = None

    def log_lines(self) -> list[dict[str, Any]]:
        """The reclog lines of this response: its recommendations, then its context."""
        if self.context_record is None:
            return self.log_records
        return [*self.log_records, self.context_record]

    def to_response(self) -> dict[str, Any]:
        """The spec's response (plus ids for feedback, fallback and assignment)."""
        return {
            "user_id": self.user_id,
            "recommendations": [
                {
                    "feature": r.feature,
                    "score": r.score,
                    "reason": r.reason,
                    "cta_text": r.cta_text,
                    "cta_url": r.cta_url,
                    "position": r.position,
                    "recommendation_id": r.recommendation_id,
                }
                for r in self.recommendations
            ],
            "model_version": self.model_version,
            "generated_at": self.generated_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "latency_ms": self.latency_ms,
            "request_id": self.request_id,
            "placement": self.placement,
            "strategy": self.strategy,
            "experiment": self.experiment,
            "variant": self.variant,
            "fallback": self.fallback,
        }


class RecommendationService:
    """The two-stage recommendation path over an :class:`OnlineState` and a model."""

    def __init__(
        self,
        settings: Settings,
        deployment: DeploymentSpec,
        state: OnlineState,
        model: ServingModel | None = None,
        *,
        model_error: str | None = None,
        experiment: ExperimentSpec | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.deployment = deployment
        self.catalog = Catalog(settings.catalog)
        self.clock = clock
        self.experiment = experiment
        self.rules = EligibilityRules.from_settings(settings.serving)
        self._rng = np.random.default_rng(settings.serving.seed)
        self._rng_lock = threading.Lock()
        self._ctx = self._derive(state)
        if model is None:
            model = self.fallback
            model_error = model_error or "no model bundle loaded"
        self.holder = ModelHolder(model, model_error)

    # -- state / model management --------------------------------------------------------
    def _derive(self, state: OnlineState) -> _StateContext:
        snap = state.snapshot
        support = self.settings.serving.reason_min_support
        return _StateContext(
            state=state,
            policy=EligibilityPolicy(state.features, snap.flags, snap.feature_plans, self.rules),
            reasons=ReasonBuilder(snap, self.catalog, min_support=support),
            fallback=SnapshotFallback(snap, min_support=support),
        )

    # The state and what is derived from it are swapped together in one assignment, so a
    # request never mixes an old state with a new policy (their item spaces may differ).
    @property
    def state(self) -> OnlineState:
        return self._ctx.state

    @property
    def policy(self) -> EligibilityPolicy:
        return self._ctx.policy

    @property
    def reasons(self) -> ReasonBuilder:
        return self._ctx.reasons

    @property
    def fallback(self) -> SnapshotFallback:
        return self._ctx.fallback

    def swap_state(self, state: OnlineState) -> OnlineState:
        """Serve from a new online state (after a new snapshot); returns the old one."""
        old = self.state
        self._ctx = self._derive(state)
        if self.holder.model.is_fallback:
            self.holder.swap(self.fallback, self.holder.error)
        return old

    def swap_model(self, model: ServingModel) -> ServingModel:
        """Serve from ``model`` from the next request on; in-flight requests finish on theirs."""
        return self.holder.swap(model, None)

    def use_fallback(self, error: str) -> None:
        self.holder.swap(self.fallback, error)

    @property
    def model(self) -> ServingModel:
        return self.holder.model

    # -- the request path ----------------------------------------------------------------
    def strategy_for(self, user_id: str) -> tuple[str, str | None, str | None, str | None]:
        """(strategy, experiment, variant, placement override) for ``user_id``."""
        default = self.settings.serving.default_strategy
        if self.experiment is None:
            return default, None, None, None
        from featurerec.experiments.assignment import assign

        v = assign(self.experiment, user_id)
        return (
            v.resolved_strategy or default,
            self.experiment.name,
            v.name,
            v.resolved_placement,
        )

    def _user(
        self, state: OnlineState, req: RecommendationRequest
    ) -> tuple[int | None, UserState, UserAttributes, np.ndarray]:
        row = state.row_of(req.user_id)
        c = req.context
        if row is None:
            bucket = team_size_bucket(c.team_size)
            ctx = UserContext(
                role=c.role,
                plan=c.plan,
                seat_count=c.team_size,
                team_size_bucket=bucket,
                industry=c.industry,
            )
            recent = (c.feature,) if c.feature in state.findex else ()
            user = UserState(req.user_id, context=ctx, recent_features=recent)
            attrs = UserAttributes(req.user_id, c.role, c.plan, bucket, c.industry)
            return None, user, attrs, np.zeros(len(state.features), dtype=bool)
        user = state.user_state(row)
        if c.feature and c.feature in state.findex and c.feature not in user.recent_features:
            # The feature the user is working with right now is their most recent one.
            user = UserState(
                user.user_id,
                user.context,
                user.interactions,
                (*user.recent_features, c.feature),
                user.event_count,
            )
        return row, user, state.attributes(row), state.adopted_row(row)

    def recommend(self, req: RecommendationRequest) -> RecommendationResult:
        t0 = time.perf_counter()
        ctx = self._ctx
        state, policy, reasons = ctx.state, ctx.policy, ctx.reasons
        model = self.holder.model
        now_dt = self.clock()
        now = epoch_seconds(now_dt)
        dep = self.deployment.models
        k = req.k if req.k is not None else dep.ranker.output_k
        request_id = req.request_id or uuid.uuid4().hex
        strategy, experiment, variant, placement_override = self.strategy_for(req.user_id)
        placement = req.placement
        row, user, attrs, adopted = self._user(state, req)

        items: list[ServedItem] = []
        fallback = model.is_fallback
        exclude = base = None
        if placement_override is None or placement_override == placement:
            base = policy.base_exclude(attrs, adopted)
            exclude, n = policy.apply_exposure(base, state.exposure(row, now), now, k)
            if n > 0:
                ranked, model = self._rank(model, ctx.fallback, strategy, user, exclude, state, n)
                fallback = model.is_fallback
                items = self._items(
                    ranked, model, exclude, state, adopted, attrs, reasons, request_id
                )
        if items:
            ids = [state.findex[i.feature] for i in items]
            state.record_served(req.user_id, ids, now)
            if row is None:
                new_row = state.ensure_row(req.user_id)
                state.apply_traits(
                    new_row,
                    {
                        "role": req.context.role,
                        "plan": req.context.plan,
                        "team_size": req.context.team_size,
                        "industry": req.context.industry,
                    },
                )
        result = RecommendationResult(
            user_id=req.user_id,
            recommendations=items,
            model_version=model.version,
            generated_at=now_dt,
            latency_ms=0.0,
            request_id=request_id,
            placement=placement,
            strategy=model.strategy_name(strategy),
            fallback=fallback,
            cold_start=row is None
            or user.event_count < self.settings.windows.cold_start_max_events,
            experiment=experiment,
            variant=variant,
        )
        result.log_records = [
            {
                "recommendation_id": it.recommendation_id,
                "request_id": request_id,
                "user_id": req.user_id,
                "recommended_feature": it.feature,
                "score": it.score,
                "position": it.position,
                "placement": placement,
                "strategy": result.strategy,
                "experiment": experiment,
                "variant": variant,
                "model_version": model.version,
                "propensity": it.propensity,
                "fallback": fallback,
                "generated_at": now_dt,
            }
            for it in items
        ]
        if (
            items
            and exclude is not None
            and base is not None
            and self.settings.serving.log_decision_context
        ):
            result.context_record = decision_context(
                request_id, req.user_id, now_dt, placement, len(items), user, exclude,
                exclude & ~base, state.features, dep.candidate_generator.top_k,
                dep.ranker.exploration_rate,
            )  # fmt: skip
        result.latency_ms = round((time.perf_counter() - t0) * 1000.0, 3)
        return result

    def _rank(
        self,
        model: ServingModel,
        fallback: ServingModel,
        strategy: str,
        user: UserState,
        exclude: np.ndarray,
        state: OnlineState,
        n: int,
    ) -> tuple[Ranked, ServingModel]:
        """Candidates + exploring ranking on the model's item space; falls back on error."""
        dep = self.deployment.models
        eps = dep.ranker.exploration_rate
        for m in (model, fallback):
            m_exclude = _to_model_space(exclude, state.features, m.features)
            try:
                with self._rng_lock:
                    ranked = m.recommend(
                        strategy, user, m_exclude, n, dep.candidate_generator.top_k, eps, self._rng
                    )
                return ranked, m
            except Exception as exc:  # any model failure: this request falls back
                if m is fallback:
                    raise
                self.holder.error = f"request-time model error: {type(exc).__name__}: {exc}"
                log.warning("serving: model failed for %s, serving fallback: %s", user.user_id, exc)
        raise AssertionError("unreachable")

    def _items(
        self,
        ranked: Ranked,
        model: ServingModel,
        exclude: np.ndarray,
        state: OnlineState,
        adopted: np.ndarray,
        attrs: UserAttributes,
        reasons: ReasonBuilder,
        request_id: str,
    ) -> list[ServedItem]:
        # Facts about "features you use" only from accepted events (the online state), never
        # from the request's unverified context.
        used = np.flatnonzero(adopted).tolist()
        out: list[ServedItem] = []
        seen: set[int] = set()
        for pos in range(ranked.ids.shape[1]):
            mid = int(ranked.ids[0, pos])
            if mid < 0:
                continue
            feature = model.features[mid]
            j = state.findex.get(feature)
            # Defence in depth: whatever the model returns, eligibility holds.
            if j is None or exclude[j] or j in seen:
                continue
            seen.add(j)
            entry = self.catalog.entry(feature)
            reason = reasons.reason(
                feature,
                role=attrs.role,
                bucket=attrs.team_size_bucket,
                used=used,
                plan=attrs.plan,
            )
            position = len(out) + 1
            out.append(
                ServedItem(
                    recommendation_id=f"{request_id}-{position}",
                    feature=feature,
                    score=round(float(ranked.scores[0, pos]), 4),
                    reason=reason.text,
                    cta_text=entry.cta_text,
                    cta_url=entry.cta_url,
                    position=position,
                    propensity=float(ranked.propensities[0, pos]),
                )
            )
        return out


def decision_context(
    request_id: str,
    user_id: str,
    generated_at: datetime,
    placement: str,
    slate_size: int,
    user: UserState,
    exclude: np.ndarray,
    exposure_excluded: np.ndarray,
    features: list[str],
    top_k: int,
    exploration_rate: float,
) -> dict[str, Any]:
    """One request's ml.recommendation_context row: the user state the model scored, the
    features the eligibility rules left (``eligible``, or ``excluded`` when that list is the
    shorter one; the other is None), the features only the exposure rules (dismissal
    cooldown, weekly cap, weekly diversity) excluded (``exposure_excluded``: a candidate
    replayed with its own exposure history gets them back) and the slate policy's settings,
    so off-policy evaluation can replay any candidate model on the same decision
    (:mod:`featurerec.experiments.offline`). JSON-encoded fields are VARCHARs."""
    idx = np.flatnonzero(exclude)
    listed_excluded = 2 * idx.size < len(features)
    names = (
        [features[j] for j in idx.tolist()]
        if listed_excluded
        else [features[j] for j in np.flatnonzero(~exclude).tolist()]
    )
    return {
        "record": "context",
        "request_id": request_id,
        "user_id": user_id,
        "generated_at": generated_at,
        "placement": placement,
        "slate_size": slate_size,
        "candidate_top_k": top_k,
        "exploration_rate": exploration_rate,
        "user_context": orjson.dumps(user.context).decode(),  # a dataclass: orjson's own
        "interactions": orjson.dumps(user.interactions).decode(),
        "recent_features": orjson.dumps(list(user.recent_features)).decode(),
        "event_count": int(user.event_count),
        "eligible": None if listed_excluded else orjson.dumps(names).decode(),
        "excluded": orjson.dumps(names).decode() if listed_excluded else None,
        "exposure_excluded": orjson.dumps(
            [features[j] for j in np.flatnonzero(exposure_excluded).tolist()]
        ).decode(),
    }


def _to_model_space(
    exclude: np.ndarray, state_features: list[str], model_features: list[str]
) -> np.ndarray:
    """The state's exclude mask over the model's item order; features the state does not
    know are excluded (their eligibility cannot be checked)."""
    if model_features is state_features or model_features == state_features:
        return exclude
    index = {f: j for j, f in enumerate(state_features)}
    return np.array(
        [bool(exclude[index[f]]) if f in index else True for f in model_features], dtype=bool
    )
