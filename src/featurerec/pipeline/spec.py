"""The pipeline spec: the spec's Stage 4 JSON, validated into typed objects.

The file is ``{"pipeline": {"name", "schedule", "description", "stages": [...]}}`` exactly as
in the walkthrough, plus a few optional knobs (``retries``, ``retry_delay_seconds``,
``max_parallel``, per-stage ``retries`` and ``params``, per-check ``unit`` and ``max_value``).
Every problem is a :class:`SpecError` naming the stage (and field) at fault: an unknown stage
type, a missing required field, an unknown dependency, a cycle, an unparseable promotion
criterion, a bad registry URI or cron expression.

Stage types and what they need:

* ``sql_transform``: ``query_ref`` (a shipped ``warehouse/sql`` file, or a ``.sql`` file next
  to the spec), ``output_table``; optional ``params`` overriding the bound parameters.
* ``data_quality``: ``checks`` (``query`` returning one number, ``min_value`` / ``max_value``,
  ``severity`` critical | warning).
* ``model_training``: ``model_type`` (a registered stage function), ``hyperparameters``,
  ``output`` (``models:/NAME/staging``).
* ``custom``: ``command`` (a registered stage function), ``config``; optional ``output``.
* ``model_evaluation``: ``metrics``, ``promotion_criteria`` (``{"ndcg@5": "> 0.35"}``),
  ``promote_to``; optional ``command`` (default ``model_evaluation``).

The evaluation stage implicitly waits for every training stage and every custom stage with an
``output`` that is not downstream of it, so a run promotes all of its artifacts together or
none of them (an index is never promoted without the model it was built from).
"""

from __future__ import annotations

import graphlib
import json
from pathlib import Path
from typing import Any, Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from featurerec.errors import ModelError, SpecError
from featurerec.registry.criteria import parse_criteria
from featurerec.registry.store import parse_uri
from featurerec.warehouse.engine import WarehouseError, load_sql

STAGE_TYPES: tuple[str, ...] = (
    "sql_transform",
    "data_quality",
    "model_training",
    "custom",
    "model_evaluation",
)
StageType = Literal["sql_transform", "data_quality", "model_training", "custom", "model_evaluation"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckSpec(_Model):
    """One data-quality check: ``query`` returns a single number compared to the bounds."""

    name: str
    type: Literal["custom_sql"] = "custom_sql"
    query: str
    min_value: float | None = None
    max_value: float | None = None
    severity: Literal["critical", "warning"] = "critical"
    #: Shown after the value in the execution tree ("72,400 users").
    unit: str | None = None
    description: str | None = None


class StageSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    type: StageType
    description: str | None = None
    depends_on: list[str] = Field(default_factory=list)
    timeout_minutes: float | None = Field(default=None, gt=0)
    #: Extra attempts after a failure (None: the pipeline's ``retries``).
    retries: int | None = Field(default=None, ge=0)
    # sql_transform
    query_ref: str | None = None
    output_table: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"
    )
    params: dict[str, Any] = Field(default_factory=dict)
    # data_quality
    checks: list[CheckSpec] = Field(default_factory=list)
    # model_training
    model_type: str | None = None
    input_table: str | None = None
    input_tables: list[str] = Field(default_factory=list)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    output: str | None = None
    # custom
    command: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    # model_evaluation
    metrics: list[str] = Field(default_factory=list)
    promotion_criteria: dict[str, str] = Field(default_factory=dict)
    promote_to: Literal["production", "staging"] | None = None

    @property
    def function_name(self) -> str | None:
        """The STAGE_FUNCTIONS key this stage runs (None for SQL and quality stages)."""
        if self.type == "model_training":
            return self.model_type
        if self.type == "custom":
            return self.command
        if self.type == "model_evaluation":
            return self.command or "model_evaluation"
        return None

    @property
    def output_kind(self) -> tuple[str, str] | None:
        """(kind, name) of the registry entry this stage's artifact is registered under."""
        if not self.output:
            return None
        kind, name, _ = parse_uri(self.output)
        return kind, name


class PipelineSpec(_Model):
    name: str
    schedule: str | None = None
    description: str | None = None
    stages: list[StageSpec]
    #: Default extra attempts per stage after a failure (timeouts included).
    retries: int = Field(default=0, ge=0)
    retry_delay_seconds: float = Field(default=5.0, ge=0)
    #: Stages that may run at the same time (SQL stages still share one connection).
    max_parallel: int = Field(default=2, ge=1)
    _spec_dir: Path | None = PrivateAttr(default=None)
    _deps: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)

    @property
    def spec_dir(self) -> Path | None:
        return self._spec_dir

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise SpecError(f"pipeline {self.name!r} has no stage {name!r}")

    def deps(self, name: str) -> tuple[str, ...]:
        """Declared plus implicit dependencies (see the module docstring)."""
        return self._deps[name]

    def order(self) -> list[str]:
        """Stage names in a dependency order (file order among independent stages)."""
        ts = graphlib.TopologicalSorter({s.name: self._deps[s.name] for s in self.stages})
        ts.prepare()
        position = {s.name: i for i, s in enumerate(self.stages)}
        out: list[str] = []
        while ts.is_active():
            ready = sorted(ts.get_ready(), key=position.__getitem__)
            out.extend(ready)
            ts.done(*ready)
        return out

    def downstream(self, name: str) -> set[str]:
        """Every stage that (transitively) depends on ``name``."""
        children: dict[str, set[str]] = {s.name: set() for s in self.stages}
        for s in self.stages:
            for d in self._deps[s.name]:
                children[d].add(s.name)
        seen: set[str] = set()
        todo = [name]
        while todo:
            for c in children[todo.pop()]:
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        return seen

    def sql_text(self, stage: StageSpec) -> str | None:
        """SQL of a ``query_ref`` that lives next to the spec file (None: a shipped file)."""
        if stage.query_ref and self._spec_dir is not None:
            p = self._spec_dir / stage.query_ref
            if p.is_file():
                return p.read_text()
        return None

    def to_json_dict(self) -> dict[str, Any]:
        return {"pipeline": self.model_dump(mode="json", exclude_none=True)}


def _fmt_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_spec(
    raw: Any, *, spec_dir: Path | None = None, source: str = "pipeline spec"
) -> PipelineSpec:
    """Validate a parsed JSON object into a :class:`PipelineSpec` (SpecError on any problem)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a JSON object with a 'pipeline' key")
    body = raw.get("pipeline", raw)
    if not isinstance(body, dict):
        raise SpecError(f"{source}: 'pipeline' must be an object")
    stages_raw = body.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise SpecError(f"{source}: 'stages' must be a non-empty list")
    stages: list[StageSpec] = []
    for i, st in enumerate(stages_raw):
        if not isinstance(st, dict):
            raise SpecError(f"{source}: stage #{i + 1} is not an object")
        label = repr(st.get("name", f"#{i + 1}"))
        stype = st.get("type")
        if stype not in STAGE_TYPES:
            raise SpecError(
                f"{source}: stage {label}: unknown type {stype!r}"
                f" (expected one of: {', '.join(STAGE_TYPES)})"
            )
        try:
            stage = StageSpec.model_validate(st)
        except ValidationError as exc:
            raise SpecError(f"{source}: stage {label}: {_fmt_validation(exc)}") from None
        _check_stage(stage, source, spec_dir)
        stages.append(stage)
    try:
        spec = PipelineSpec.model_validate({**body, "stages": []})
    except ValidationError as exc:
        raise SpecError(f"{source}: {_fmt_validation(exc)}") from None
    spec = spec.model_copy(update={"stages": stages})
    spec._spec_dir = spec_dir
    if spec.schedule is not None and not croniter.is_valid(spec.schedule):
        raise SpecError(f"{source}: schedule {spec.schedule!r} is not a valid cron expression")
    _check_graph(spec, source)
    return spec


def _check_stage(stage: StageSpec, source: str, spec_dir: Path | None) -> None:
    where = f"{source}: stage {stage.name!r}"
    need: dict[str, list[str]] = {
        "sql_transform": ["query_ref", "output_table"],
        "data_quality": ["checks"],
        "model_training": ["model_type"],
        "custom": ["command"],
        "model_evaluation": [],
    }
    for f in need[stage.type]:
        if not getattr(stage, f):
            raise SpecError(f"{where}: type {stage.type} needs {f!r}")
    if stage.type == "sql_transform" and stage.query_ref:
        local = spec_dir / stage.query_ref if spec_dir else None
        if not (local and local.is_file()):
            try:
                load_sql(stage.query_ref)
            except WarehouseError:
                raise SpecError(
                    f"{where}: query_ref {stage.query_ref!r} is neither next to the spec nor a"
                    " shipped featurerec/warehouse/sql file"
                ) from None
    for c in stage.checks:
        if c.min_value is None and c.max_value is None:
            raise SpecError(f"{where}: check {c.name!r} needs min_value or max_value")
    if stage.output:
        try:
            _kind, _, sel = parse_uri(stage.output)
        except ModelError as exc:
            raise SpecError(f"{where}: output: {exc}") from None
        if sel not in ("staging", "latest"):
            raise SpecError(
                f"{where}: output {stage.output!r} must end in /staging (or /latest): production"
                " is reached only through the evaluation stage's promotion criteria"
            )
    if stage.type == "model_training" and not stage.output:
        raise SpecError(
            f"{where}: model_training needs an 'output' registry URI (models:/NAME/staging)"
        )
    if stage.type == "model_evaluation":
        parse_criteria_for(stage, where)
        if stage.promote_to and not stage.promotion_criteria:
            raise SpecError(f"{where}: promote_to needs promotion_criteria")


def parse_criteria_for(stage: StageSpec, where: str) -> None:
    try:
        parse_criteria(stage.promotion_criteria)
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _check_graph(spec: PipelineSpec, source: str) -> None:
    names = [s.name for s in spec.stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"{source}: duplicate stage name(s): {', '.join(dupes)}")
    known = set(names)
    for s in spec.stages:
        for d in s.depends_on:
            if d not in known:
                raise SpecError(f"{source}: stage {s.name!r} depends on unknown stage {d!r}")
            if d == s.name:
                raise SpecError(f"{source}: stage {s.name!r} depends on itself")
    deps = {s.name: tuple(s.depends_on) for s in spec.stages}
    _toposort_or_raise(deps, source)
    spec._deps = deps
    # implicit: evaluation waits for every artifact-producing stage not downstream of it
    for ev in [s for s in spec.stages if s.type == "model_evaluation"]:
        below = spec.downstream(ev.name)
        extra = [
            s.name
            for s in spec.stages
            if s.name != ev.name
            and s.name not in below
            and (s.type == "model_training" or (s.type == "custom" and s.output))
            and s.name not in deps[ev.name]
        ]
        if extra:
            deps[ev.name] = deps[ev.name] + tuple(extra)
    _toposort_or_raise(deps, source)
    spec._deps = deps


def _toposort_or_raise(deps: dict[str, tuple[str, ...]], source: str) -> None:
    try:
        tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise SpecError(
            f"{source}: dependency cycle between stages: {' -> '.join(reversed(cycle))}"
        ) from None


def load_spec(path: str | Path, settings: Any | None = None) -> PipelineSpec:
    """Read and validate a pipeline JSON file (``builtin:NAME`` = a shipped config)."""
    text_path = str(path)
    if settings is not None:
        p = Path(settings.resolve(text_path))
    elif text_path.startswith("builtin:"):
        from featurerec.config import BUILTIN_CONFIGS

        p = BUILTIN_CONFIGS / text_path.removeprefix("builtin:")
    else:
        p = Path(text_path)
    if not p.is_file():
        raise SpecError(f"pipeline spec not found: {p}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    return parse_spec(raw, spec_dir=p.parent, source=str(p.name))
