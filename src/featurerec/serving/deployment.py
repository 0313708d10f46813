"""The spec's deployment JSON (Stage 6) as the typed serving config.

The file keeps the spec's shape, ``{"deployment": {...}}``. What serving reads from it:

* ``serving.endpoint`` (the recommendations route), ``serving.num_replicas`` (uvicorn worker
  processes for now; Ray Serve replicas later), ``serving.max_concurrent_queries``;
* ``models.candidate_generator`` (MF model URI, ANN index URI, ``top_k`` candidates);
* ``models.ranker`` (bandit URI, ``output_k`` default k, ``exploration_rate``);
* ``models.online_state`` (additive: registry URI of the online-state snapshot and how often
  the registry's pointers are polled for hot reload);
* ``performance_sla`` (reported by ``/readyz`` and the benchmark).

``response_format`` is documentation of the response and is accepted but not used.

Example::

    >>> spec = load_deployment(BUILTIN_CONFIGS / "deployment.json")
    >>> spec.models.candidate_generator.top_k, spec.models.ranker.output_k
    (20, 3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from featurerec.config import BUILTIN_CONFIGS, Settings
from featurerec.errors import SpecError

__all__ = ["BUILTIN_CONFIGS", "DeploymentSpec", "load_deployment", "parse_deployment"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingSpec(_Spec):
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=1, ge=1)
    target_qps_per_replica: float = Field(default=200, gt=0)


class ServingSpec(_Spec):
    runtime: str = "uvicorn"
    endpoint: str = "/api/v1/recommendations"
    #: Worker processes (uvicorn ``--workers``) until Ray Serve replicas exist.
    num_replicas: int = Field(default=1, ge=1)
    max_concurrent_queries: int = Field(default=100, ge=1)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)


class CandidateGeneratorSpec(_Spec):
    model_uri: str = "models:/feature-recommender-mf/production"
    ann_index: str | None = "indexes:/feature-recommender-hnsw/latest"
    top_k: int = Field(default=20, ge=1)


class RankerSpec(_Spec):
    model_uri: str = "models:/feature-recommender-bandit/production"
    output_k: int = Field(default=3, ge=1)
    exploration_rate: float = Field(default=0.1, ge=0, le=1)


class OnlineStateSpec(_Spec):
    uri: str = "state:/feature-recommender-online/latest"
    #: Seconds between polls of the registry's production pointers (hot reload).
    reload_poll_seconds: float = Field(default=5.0, gt=0)


class ModelsSpec(_Spec):
    candidate_generator: CandidateGeneratorSpec = Field(default_factory=CandidateGeneratorSpec)
    ranker: RankerSpec = Field(default_factory=RankerSpec)
    online_state: OnlineStateSpec = Field(default_factory=OnlineStateSpec)


class PerformanceSLA(_Spec):
    p50_latency_ms: float = Field(default=35, gt=0)
    p99_latency_ms: float = Field(default=100, gt=0)
    availability: float = Field(default=0.999, gt=0, le=1)


class DeploymentSpec(_Spec):
    """The spec's ``deployment`` object."""

    name: str = "feature-recommender-v2"
    serving: ServingSpec = Field(default_factory=ServingSpec)
    models: ModelsSpec = Field(default_factory=ModelsSpec)
    performance_sla: PerformanceSLA = Field(default_factory=PerformanceSLA)
    response_format: dict[str, Any] | None = None


def parse_deployment(raw: Any, *, source: str = "<deployment>") -> DeploymentSpec:
    """Validate the spec's JSON object (wrapped in ``deployment`` or bare)."""
    if isinstance(raw, dict) and set(raw) == {"deployment"}:
        raw = raw["deployment"]
    try:
        return DeploymentSpec.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{loc}: {msg} (got {err.get('input')!r})")
        raise SpecError(f"{source}: invalid deployment spec: {'; '.join(parts)}") from None


def load_deployment(path: str | Path) -> DeploymentSpec:
    """Read and validate a deployment JSON file."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"deployment spec not found: {p}")
    try:
        raw = orjson.loads(p.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SpecError(f"{p}: invalid JSON: {exc}") from None
    return parse_deployment(raw, source=str(p))


def deployment_for(settings: Settings) -> DeploymentSpec:
    """The deployment spec ``[serving] deployment`` names."""
    return load_deployment(settings.resolve(settings.serving.deployment))
