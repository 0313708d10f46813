"""The HTTP API (FastAPI on uvicorn): recommendations, feedback, events, health, metrics.

Routes (all documented in the OpenAPI schema at ``/docs``):

* ``GET|POST /api/v1/recommendations``: the spec's response (user_id, recommendations
  [{feature, score, reason, cta_text, cta_url, position}], model_version, generated_at,
  latency_ms) plus ``recommendation_id`` per item, ``request_id``, ``fallback``, strategy
  and experiment assignment. The response is sent only after its log lines are on disk.
* ``POST /api/v1/feedback``: impression / click / dismiss, idempotent by ``feedback_id``
  (default ``<recommendation_id>:<kind>``); a dismiss starts the cooldown at once.
* ``POST /api/v1/events``: product events, validated and deduplicated by INGEST's
  ``normalize_records`` (the same code as ``featurerec ingest``), landed durably in INGEST's
  ``Landing`` before the response, and applied to the online state synchronously, so the
  next recommendation already sees them.
* ``/healthz`` (process up), ``/readyz`` (state and model loaded; says whether on fallback),
  ``/metrics`` (Prometheus), ``/noop`` (an empty endpoint on the same server, for the
  benchmark's baseline).

Bad input gets 422 with ``detail`` (FastAPI's list) and ``error``: one line naming each field
and the reason. Hot reload: a thread polls the registry's pointers every
``models.online_state.reload_poll_seconds`` and swaps the model (or the online state) in one
assignment; requests in flight finish on the objects they started with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from featurerec.config import Settings
from featurerec.errors import FeaturerecError, ModelError
from featurerec.serving.deployment import DeploymentSpec, deployment_for
from featurerec.serving.reclog import FEEDBACK_PREFIX, RECLOG_PREFIX, DurableLog, reclog_dir
from featurerec.serving.service import (
    RecommendationRequest,
    RecommendationService,
    RequestContext,
    utcnow,
)
from featurerec.serving.state import epoch_seconds

log = logging.getLogger(__name__)

Placement = Literal["onboarding_wizard", "sidebar_panel", "in_context_tooltip", "email_digest"]
_MAX_REMEMBERED = 500_000


# -- API models (documentation and validation) -------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendationQuery(_Model):
    """Body of ``POST /api/v1/recommendations`` (the GET takes the same as query params)."""

    user_id: str = Field(min_length=1, max_length=256, description="The user to recommend for.")
    placement: Placement = Field(
        "sidebar_panel", description="Where the recommendations will be shown."
    )
    k: int | None = Field(
        None, ge=1, le=20, description="How many recommendations (default: ranker output_k, 3)."
    )
    page: str | None = Field(None, max_length=256, description="Page the user is on (context).")
    feature: str | None = Field(
        None, max_length=128, description="Feature the user is working with right now (context)."
    )
    role: str | None = Field(None, max_length=64, description="Role, for users we do not know.")
    plan: str | None = Field(None, max_length=64, description="Plan, for users we do not know.")
    team_size: int | None = Field(
        None, ge=1, le=1_000_000, description="Seats in the workspace, for users we do not know."
    )
    industry: str | None = Field(None, max_length=64, description="Industry, for unknown users.")


class RecommendationItem(_Model):
    feature: str = Field(description="Feature to recommend.")
    score: float = Field(description="Ranker score in 0..1.")
    reason: str = Field(description="One true sentence about this user and feature.")
    cta_text: str = Field(description="Call-to-action text (catalog config).")
    cta_url: str = Field(description="Call-to-action URL (catalog config).")
    position: int = Field(description="1-based position in the list.")
    recommendation_id: str = Field(description="Send this id back with feedback.")


class RecommendationResponse(_Model):
    user_id: str
    recommendations: list[RecommendationItem]
    model_version: str = Field(description="Model bundle (or fallback) that ranked this.")
    generated_at: str = Field(description="UTC time, ISO 8601.")
    latency_ms: float = Field(description="Time spent in the recommendation path.")
    request_id: str
    placement: str
    strategy: str = Field(description="Strategy that served (or 'fallback').")
    experiment: str | None = None
    variant: str | None = None
    fallback: bool = Field(description="True when no model bundle could be used.")


class FeedbackIn(_Model):
    """One feedback event about a served recommendation."""

    recommendation_id: str = Field(min_length=1, max_length=256)
    kind: Literal["impression", "click", "dismiss"]
    feedback_id: str | None = Field(
        None, max_length=256, description="Idempotency key (default: recommendation_id:kind)."
    )
    user_id: str | None = Field(None, max_length=256)
    feature: str | None = Field(None, max_length=128)
    timestamp: datetime | None = Field(None, description="When it happened (default: now, UTC).")


class FeedbackBatch(_Model):
    feedback: list[FeedbackIn] = Field(min_length=1, max_length=10_000)


class FeedbackResult(_Model):
    accepted: int
    duplicates: int
    applied: int = Field(description="Dismissals applied to the online state.")


class EventsResult(_Model):
    accepted: int
    duplicates: int
    filtered: int
    quarantined: int
    applied: int = Field(description="Events that changed the online state.")
    receipt: str | None = None


# -- runtime -----------------------------------------------------------------------------


class ServingRuntime:
    """Everything one server process holds: service, logs, landing, metrics, reloader."""

    def __init__(
        self,
        settings: Settings,
        service: RecommendationService,
        *,
        deployment: DeploymentSpec,
        registry: Any = None,
        served: dict[str, tuple[str, str]] | None = None,
        log_dir: Path | None = None,
        landing: Any = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.deployment = deployment
        self.registry = registry
        self.log_dir = log_dir or reclog_dir(settings)
        fsync = settings.serving.durable_log
        self.reclog = DurableLog(self.log_dir, RECLOG_PREFIX, fsync=fsync)
        self.feedback_log = DurableLog(self.log_dir, FEEDBACK_PREFIX, fsync=fsync)
        self.landing = landing
        self._served: OrderedDict[str, tuple[str, str]] = OrderedDict(served or {})
        self._feedback_seen: OrderedDict[str, None] = OrderedDict()
        self._stop = threading.Event()
        self._reloader: threading.Thread | None = None
        self._pointers: dict[str, int | None] = {}
        self.metrics = _Metrics()
        self.started_at = time.time()
        from featurerec.serving.loader import StateSync, landing_dir

        self.sync = StateSync(
            lambda: self.service.state, landing_dir(settings), self.log_dir, self._served
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ServingRuntime:
        """Load deployment, registry, online state and model (fallback if the model fails)."""
        from featurerec.registry import registry_for
        from featurerec.serving.loader import load_model, load_online_state, pointers

        deployment = deployment_for(settings)
        registry = registry_for(settings)
        state, served = load_online_state(settings, registry, deployment)
        experiment = None
        if settings.serving.experiment:
            from featurerec.experiments.spec import find_experiment

            experiment = find_experiment(settings, settings.serving.experiment)
        model: Any = None
        error = None
        try:
            model = load_model(registry, deployment, state, warm=_warm(settings, experiment))
        except ModelError as exc:
            error = str(exc)
            log.warning("serving: model bundle unusable, serving fallbacks: %s", exc)
        service = RecommendationService(
            settings, deployment, state, model, model_error=error, experiment=experiment
        )
        rt = cls(
            settings,
            service,
            deployment=deployment,
            registry=registry,
            served=served,
            landing=_open_landing(settings),
        )
        rt._pointers = pointers(registry, deployment)
        return rt

    # -- lifecycle -----------------------------------------------------------------------
    def start_reloader(self) -> None:
        """Start the background thread: state sync every ``sync_interval_seconds``, registry
        poll every ``reload_poll_seconds``."""
        if self._reloader is not None:
            return
        self._reloader = threading.Thread(target=self._reload_loop, name="reloader", daemon=True)
        self._reloader.start()

    def close(self) -> None:
        self._stop.set()
        if self._reloader is not None:
            self._reloader.join(timeout=10)
        self.reclog.close()
        self.feedback_log.close()

    def _reload_loop(self) -> None:
        poll = self.deployment.models.online_state.reload_poll_seconds
        tick = min(self.settings.serving.sync_interval_seconds, poll)
        next_poll = time.monotonic() + poll
        while not self._stop.wait(tick):
            try:
                self.sync.run_once()
                if self.registry is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + poll
                    self.check_reload()
            except Exception:  # never let the background thread die
                log.exception("serving: sync / reload check failed")

    def check_reload(self) -> str | None:
        """Swap in a newly promoted model or snapshot; returns what changed (or None)."""
        from featurerec.serving.loader import load_model, load_online_state, pointers

        now = pointers(self.registry, self.deployment)
        if now == self._pointers and not self.service.holder.error:
            return None
        changed: list[str] = []
        state_uri = self.deployment.models.online_state.uri
        if now.get(state_uri) != self._pointers.get(state_uri) and now.get(state_uri):
            try:
                state, _ = load_online_state(
                    self.settings, self.registry, self.deployment, log_dir=self.log_dir
                )
            except ModelError as exc:
                log.error("serving: new online state unusable, keeping current: %s", exc)
            else:
                # Exposure and dismissals move over before the swap, so caps hold throughout.
                state.adopt_history(self.service.state)
                self.service.swap_state(state)
                from featurerec.serving.loader import landing_dir, replay_landing

                # Events applied to the old state between the load and the swap.
                replay_landing(state, landing_dir(self.settings), since=time.time() - 3600)
                changed.append("state")
        model_uris = {k: v for k, v in now.items() if k != state_uri}
        old_models = {k: v for k, v in self._pointers.items() if k != state_uri}
        if model_uris != old_models or (self.service.holder.error and any(model_uris.values())):
            try:
                model = load_model(
                    self.registry,
                    self.deployment,
                    self.service.state,
                    warm=_warm(self.settings, self.service.experiment),
                )
            except ModelError as exc:
                if not self.service.model.is_fallback:
                    log.error("serving: new model unusable, keeping current: %s", exc)
                else:
                    self.service.holder.error = str(exc)
            else:
                self.service.swap_model(model)
                changed.append("model")
        self._pointers = now
        return "+".join(changed) or None

    # -- bookkeeping ---------------------------------------------------------------------
    def remember_served(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self._served[r["recommendation_id"]] = (r["user_id"], r["recommended_feature"])
        while len(self._served) > _MAX_REMEMBERED:
            self._served.popitem(last=False)

    def feedback_target(self, rec_id: str) -> tuple[str, str] | None:
        return self._served.get(rec_id)

    def feedback_is_new(self, feedback_id: str) -> bool:
        if feedback_id in self._feedback_seen:
            return False
        self._feedback_seen[feedback_id] = None
        while len(self._feedback_seen) > _MAX_REMEMBERED:
            self._feedback_seen.popitem(last=False)
        return True


def _warm(settings: Settings, experiment: Any) -> list[str]:
    """Strategies to score for every known user at model load (default + experiment arms)."""
    names = [settings.serving.default_strategy]
    if experiment is not None:
        names += [v.resolved_strategy for v in experiment.variants if v.resolved_strategy]
    return list(dict.fromkeys(names))


def _open_landing(settings: Settings) -> Any:
    """INGEST's Landing for this data dir (None when that module is not available)."""
    try:
        from featurerec.events.landing import Landing
    except ImportError:
        return None
    from featurerec.serving.loader import landing_dir

    return Landing(landing_dir(settings))


class _Metrics:
    """Prometheus metrics on a private registry (one per app, so tests do not collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "featurerec_request_latency_seconds",
            "Server-side latency of API requests.",
            ["endpoint"],
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.errors = Counter(
            "featurerec_request_errors_total",
            "Requests that failed (4xx/5xx) by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.recommendations = Counter(
            "featurerec_recommendations_total",
            "Recommendations served by strategy and placement.",
            ["strategy", "placement"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "featurerec_fallback_responses_total",
            "Responses served from the snapshot fallback.",
            registry=self.registry,
        )
        self.events = Counter(
            "featurerec_events_total", "Events received by outcome.", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.feedback = Counter(
            "featurerec_feedback_total", "Feedback received by kind.", ["kind"],
            registry=self.registry,
        )  # fmt: skip
        self.users = Gauge(
            "featurerec_online_users", "Users in the online state.", registry=self.registry
        )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query")]
        field = ".".join(loc) or "body"
        got = err.get("input")
        got_txt = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        parts.append(f"{field}: {err.get('msg')}{got_txt}")
    return "; ".join(parts)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


# -- app ---------------------------------------------------------------------------------


def create_app(runtime: ServingRuntime | None = None, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app over ``runtime`` (or one built from ``settings`` at startup)."""
    holder: dict[str, ServingRuntime] = {}
    if runtime is not None:
        holder["rt"] = runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if "rt" not in holder:
            if settings is None:
                raise FeaturerecError("create_app needs a runtime or settings")
            holder["rt"] = await run_in_threadpool(ServingRuntime.from_settings, settings)
        rt = holder["rt"]
        rt.start_reloader()
        _mount_sources(app, rt)
        try:
            yield
        finally:
            rt.close()

    def rt() -> ServingRuntime:
        return holder["rt"]

    app = FastAPI(
        title="featurerec serving",
        version="1",
        description="Feature recommendations with true reasons, feedback and event intake.",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def _on_422(request: Request, exc: RequestValidationError) -> JSONResponse:
        if "rt" in holder:
            holder["rt"].metrics.errors.labels(request.url.path, "422").inc()
        return JSONResponse(
            {"detail": jsonable_errors(exc), "error": _validation_message(exc)}, status_code=422
        )

    async def _serve(q: RecommendationQuery) -> Response:
        runtime = rt()
        t0 = time.perf_counter()
        req = RecommendationRequest(
            user_id=q.user_id,
            placement=q.placement,
            k=q.k,
            context=RequestContext(
                page=q.page,
                feature=q.feature,
                role=q.role,
                plan=q.plan,
                team_size=q.team_size,
                industry=q.industry,
            ),
        )
        try:
            result = runtime.service.recommend(req)
            if result.log_records:
                await runtime.reclog.append_async(result.log_lines())
                runtime.remember_served(result.log_records)
        except Exception:
            runtime.metrics.errors.labels("/api/v1/recommendations", "500").inc()
            raise
        m = runtime.metrics
        if result.recommendations:
            m.recommendations.labels(result.strategy, result.placement).inc(
                len(result.recommendations)
            )
        if result.fallback:
            m.fallbacks.inc()
        body = result.to_response()
        body["latency_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
        m.latency.labels("/api/v1/recommendations").observe(time.perf_counter() - t0)
        return _json(body)

    query_params = _openapi_query_params(RecommendationQuery)

    @app.get(
        "/api/v1/recommendations",
        response_model=RecommendationResponse,
        summary="Recommend features for a user",
        openapi_extra={"parameters": query_params},
    )
    async def get_recommendations(request: Request) -> Response:
        # Validated with the same pydantic model as the POST body, without FastAPI's
        # per-parameter dependency machinery (this is the hot path).
        try:
            q = RecommendationQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]
            ) from None
        return await _serve(q)

    @app.post(
        "/api/v1/recommendations",
        response_model=RecommendationResponse,
        summary="Recommend features for a user (JSON body)",
    )
    async def post_recommendations(q: RecommendationQuery) -> Response:
        return await _serve(q)

    feedback_schema = FeedbackIn.model_json_schema()

    @app.post(
        "/api/v1/feedback",
        response_model=FeedbackResult,
        summary="Record feedback",
        description="One feedback object, or {'feedback': [objects]} for a batch.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": feedback_schema}},
            }
        },
    )
    async def feedback(request: Request) -> Response:
        runtime = rt()
        t0 = time.perf_counter()
        items = _parse_feedback(await request.body())
        records, dup, applied = [], 0, 0
        now = utcnow()
        state = runtime.service.state
        for f in items:
            fid = f.feedback_id or f"{f.recommendation_id}:{f.kind}"
            if not runtime.feedback_is_new(fid):
                dup += 1
                continue
            target = runtime.feedback_target(f.recommendation_id)
            user = f.user_id or (target[0] if target else None)
            feature = f.feature or (target[1] if target else None)
            ts = f.timestamp.replace(tzinfo=None) if f.timestamp else now
            records.append(
                {
                    "feedback_id": fid,
                    "recommendation_id": f.recommendation_id,
                    "user_id": user,
                    "feature": feature,
                    "kind": f.kind,
                    "timestamp": ts,
                }
            )
            runtime.metrics.feedback.labels(f.kind).inc()
            if f.kind == "dismiss" and user and feature:
                state.record_dismissal(user, feature, epoch_seconds(ts))
                applied += 1
        if records:
            await runtime.feedback_log.append_async(records)
        runtime.metrics.latency.labels("/api/v1/feedback").observe(time.perf_counter() - t0)
        return _json({"accepted": len(records), "duplicates": dup, "applied": applied})

    @app.post("/api/v1/events", response_model=EventsResult, summary="Accept product events")
    async def events(
        body: Annotated[
            list[dict[str, Any]] | dict[str, Any],
            Body(description="One event, a list of events, or {'events': [...]} (spec shape)."),
        ],
    ) -> Response:
        runtime = rt()
        t0 = time.perf_counter()
        records = body if isinstance(body, list) else body.get("events", [body])
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            return JSONResponse(
                {"error": "events: expected an event object or a list of them"}, status_code=422
            )
        result = await run_in_threadpool(accept_events, runtime, records)
        runtime.metrics.latency.labels("/api/v1/events").observe(time.perf_counter() - t0)
        return _json(result)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/noop", summary="Empty endpoint (benchmark baseline)", include_in_schema=False)
    async def noop() -> Response:
        return _json({})

    @app.get("/readyz", summary="Readiness: online state and model loaded")
    async def readyz() -> Response:
        if "rt" not in holder:
            return _json({"ready": False}, 503)
        runtime = rt()
        svc = runtime.service
        return _json(
            {
                "ready": True,
                "model_version": svc.model.version,
                "fallback": svc.model.is_fallback,
                "model_error": svc.holder.error,
                "users": svc.state.n_users,
                "snapshot_as_of": svc.state.as_of.isoformat(),
                "latest_event_at": svc.state.latest_event_at.isoformat(),
                "events_applied": svc.state.events_applied,
                "model_swaps": svc.holder.swaps,
                "sla": runtime.deployment.performance_sla.model_dump(),
            }
        )

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        runtime = rt()
        runtime.metrics.users.set(runtime.service.state.n_users)
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _parse_feedback(raw: bytes) -> list[FeedbackIn]:
    """One feedback object or ``{"feedback": [...]}``; 422 naming the field otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": f"invalid JSON: {exc}", "type": "json_invalid"}]
        ) from None
    batch = isinstance(body, dict) and "feedback" in body
    try:
        if batch:
            return FeedbackBatch.model_validate(body).feedback
        return [FeedbackIn.model_validate(body)]
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        ) from None


def _openapi_query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI ``parameters`` for a query-string version of ``model``."""
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    return [
        {
            "name": name,
            "in": "query",
            "required": name in required,
            "description": prop.get("description", ""),
            "schema": {k: v for k, v in prop.items() if k != "description"},
        }
        for name, prop in schema["properties"].items()
    ]


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        d = {k: v for k, v in e.items() if k in ("loc", "msg", "type")}
        d["loc"] = [str(x) for x in d.get("loc", ())]
        out.append(d)
    return out


def accept_events(runtime: ServingRuntime, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Validate (INGEST's normalize_records), land durably, then apply to the online state."""
    from featurerec.events.validate import normalize_records

    batch = normalize_records(records, settings=runtime.settings, source="serving_http")
    receipt = None
    if runtime.landing is not None and (batch.accepted or batch.quarantined):
        receipt = runtime.landing.write(batch)
        runtime.sync.mark_seen(receipt.path)
    applied = runtime.service.state.apply_events(batch.events)
    m = runtime.metrics.events
    m.labels("accepted").inc(batch.accepted)
    m.labels("quarantined").inc(batch.quarantined)
    m.labels("filtered").inc(batch.filtered)
    return {
        "accepted": batch.accepted,
        "duplicates": batch.duplicates + (batch.accepted - applied),
        "filtered": batch.filtered,
        "quarantined": batch.quarantined,
        "applied": applied,
        "receipt": None if receipt is None else str(getattr(receipt, "path", receipt)),
    }


def _mount_sources(app: FastAPI, runtime: ServingRuntime) -> None:
    """Mount SOURCES' Segment router when it exists; its batches update the online state."""
    try:
        from featurerec.events.sources.segment_http import build_router  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return

    def on_batch(batch: Any) -> Any:
        # Land durably first (the Segment intake acknowledges after this returns), then
        # update the online state.
        receipt = None
        if runtime.landing is not None:
            receipt = runtime.landing.write(batch)
            runtime.sync.mark_seen(receipt.path)
        runtime.service.state.apply_events(batch.events)
        return receipt

    try:
        app.include_router(build_router(runtime.settings, on_batch))
    except Exception:
        log.exception("serving: could not mount the Segment router")


def app_factory() -> FastAPI:
    """uvicorn factory (``featurerec serve``): settings from FEATUREREC_CONFIG /
    FEATUREREC_DATA_DIR, so every worker process builds the same app."""
    import sys

    from featurerec.config import load_settings

    # The log's fsync thread hands completed syncs back to the event loop; with CPython's
    # default 5 ms GIL switch interval a busy loop could hold that hand-off for up to 5 ms.
    sys.setswitchinterval(0.0005)
    return create_app(settings=load_settings())
