"""The spec's experiment JSON (Stage 8) as a typed, validated config.

The file is the spec's shape, ``{"experiment": {...}}`` (the bare inner object is accepted
too). Two additive, optional fields go beyond the spec:

* ``control``: the variant lifts are measured against (default: the first variant);
* per variant ``strategy`` / ``placement``: what serving does for that variant. When absent,
  a variant named after a known strategy (``hybrid``, ``sequence_aware`` ...) selects that
  strategy and one named after a known placement (``in_context_tooltip`` ...) selects that
  placement, so the spec's two experiments work unchanged.

Example::

    >>> spec = ExperimentSpec.model_validate({
    ...     "name": "demo", "variants": [
    ...         {"name": "hybrid", "allocation": 0.5},
    ...         {"name": "sequence_aware", "allocation": 0.5}]})
    >>> spec.variant("hybrid").resolved_strategy, spec.control_variant
    ('hybrid', 'hybrid')
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from featurerec.config import BUILTIN_CONFIGS, Settings
from featurerec.errors import SpecError

#: Strategy names the serving layer knows (MODELS' strategies.py).
KNOWN_STRATEGIES: frozenset[str] = frozenset(
    {"collaborative_only", "content_based", "hybrid", "sequence_aware", "popularity", "random"}
)
#: Placements of the spec's placement experiment.
KNOWN_PLACEMENTS: frozenset[str] = frozenset(
    {"onboarding_wizard", "sidebar_panel", "in_context_tooltip", "email_digest"}
)
_ALLOCATION_TOLERANCE = 1e-6


class Variant(BaseModel):
    """One arm of an experiment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    allocation: float = Field(gt=0, le=1)
    #: Serving strategy for this arm; None = derive from the name (or serving's default).
    strategy: str | None = None
    #: Placement for this arm; None = derive from the name (or the request's placement).
    placement: str | None = None

    @property
    def resolved_strategy(self) -> str | None:
        """The strategy serving should use, or None to keep its default."""
        if self.strategy is not None:
            return self.strategy
        return self.name if self.name in KNOWN_STRATEGIES else None

    @property
    def resolved_placement(self) -> str | None:
        """The placement serving should use, or None to keep the request's."""
        if self.placement is not None:
            return self.placement
        return self.name if self.name in KNOWN_PLACEMENTS else None


class ExperimentSpec(BaseModel):
    """The spec's ``experiment`` object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    hypothesis: str = ""
    variants: list[Variant] = Field(min_length=2)
    primary_metric: str = "feature_adoption_7d"
    secondary_metrics: list[str] = Field(default_factory=list)
    duration_weeks: float = Field(default=4, gt=0)
    #: Below this many users in any variant the report says "not enough data yet".
    min_sample_per_variant: int = Field(default=1000, ge=1)
    #: Lifts are measured against this variant (default: the first one).
    control: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ExperimentSpec:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique (repeated: {', '.join(dupes)})")
        total = math.fsum(v.allocation for v in self.variants)
        if abs(total - 1.0) > _ALLOCATION_TOLERANCE:
            raise ValueError(f"variant allocations must sum to 1 (got {total:g})")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control {self.control!r} is not a variant (variants: {names})")
        return self

    @property
    def control_variant(self) -> str:
        return self.control if self.control is not None else self.variants[0].name

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise SpecError(
            f"experiment {self.name!r}: no variant {name!r} (have {self.variant_names})"
        )


def parse_experiment(raw: Any, *, source: str = "<experiment>") -> ExperimentSpec:
    """Validate the spec's JSON object (wrapped in ``experiment`` or bare)."""
    if isinstance(raw, dict) and set(raw) == {"experiment"}:
        raw = raw["experiment"]
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{loc}: {msg}" if loc else msg)
        raise SpecError(f"{source}: invalid experiment spec: {'; '.join(parts)}") from None


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Read and validate an experiment JSON file."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"experiment spec not found: {p}")
    try:
        raw = orjson.loads(p.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SpecError(f"{p}: invalid JSON: {exc}") from None
    return parse_experiment(raw, source=str(p))


def builtin_experiment_paths() -> list[Path]:
    return sorted(BUILTIN_CONFIGS.glob("experiment.*.json"))


def known_experiments(settings: Settings) -> dict[str, ExperimentSpec]:
    """Every experiment the settings name plus the shipped ones, by experiment name.

    Configured specs win over shipped ones with the same name.
    """
    out: dict[str, ExperimentSpec] = {}
    for p in builtin_experiment_paths():
        spec = load_experiment(p)
        out[spec.name] = spec
    for rel in settings.experiments.specs:
        spec = load_experiment(settings.resolve(rel))
        out[spec.name] = spec
    return out


def find_experiment(settings: Settings, name_or_path: str) -> ExperimentSpec:
    """An experiment by name (configured or shipped) or by the path of its JSON file."""
    p = Path(name_or_path)
    if name_or_path.endswith(".json") or p.exists():
        return load_experiment(settings.resolve(name_or_path) if not p.exists() else p)
    if name_or_path.startswith("builtin:"):
        return load_experiment(settings.resolve(name_or_path))
    specs = known_experiments(settings)
    if name_or_path not in specs:
        raise SpecError(
            f"unknown experiment {name_or_path!r}: known are {sorted(specs)} "
            "(add its JSON to [experiments] specs in featurerec.toml, or pass a path)"
        )
    return specs[name_or_path]
