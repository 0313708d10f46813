"""The DAG runner: stages in dependency order, timeouts, retries, quality gates, promotion.

How a run goes:

* Stages start when all their dependencies passed, up to ``max_parallel`` at a time, each in
  its own thread. SQL stages share the engine's one DuckDB connection, so at most one SQL
  stage runs at a time (DuckDB already parallelises one query over the cores); training and
  custom stages (numpy / BLAS) overlap with it and with each other.
* A stage that raises is retried (``retries``, ``retry_delay_seconds``) unless the error is
  deterministic: a :class:`SpecError` (e.g. missing stage function), a :class:`DataError`
  (e.g. empty window) or a failed quality gate. A stage over ``timeout_minutes`` is marked
  failed (and retried); a SQL statement is interrupted, a Python stage function cannot be
  killed and is abandoned (its late result is ignored).
* A failed stage skips everything downstream. A ``critical`` check below its threshold fails
  the ``data_quality`` stage, so training and promotion never run on bad data; ``warning``
  checks are recorded and the run goes on.
* ``model_training`` / ``custom`` stages run the function registered under their
  ``model_type`` / ``command`` in :data:`featurerec.pipeline.contracts.STAGE_FUNCTIONS`
  (modules in ``STAGE_MODULES`` are imported lazily, when a stage first needs them). An
  artifact is registered in the registry under the stage's ``output`` URI (staging).
* ``model_evaluation`` runs the evaluation function, compares its metrics with
  ``promotion_criteria`` and promotes every model/index version staged by this run when all
  pass; otherwise it records "not promoted" with the failing metric. The registry checks the
  criteria again, so no code path promotes a model that did not pass.
* Every change is saved to the run history; ``resume`` reruns a failed run's failed and
  skipped stages with the same spec and as-of time.
"""

from __future__ import annotations

import importlib
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from featurerec.config import Settings
from featurerec.errors import DataError, FeaturerecError, SpecError
from featurerec.pipeline.contracts import (
    STAGE_FUNCTIONS,
    STAGE_MODULES,
    RunCache,
    StageContext,
    StageFunction,
    StageResult,
)
from featurerec.pipeline.history import (
    CheckRecord,
    CriterionRecord,
    PromotionRecord,
    RunHistory,
    RunRecord,
    StageRecord,
    utcnow,
)
from featurerec.pipeline.spec import PipelineSpec, StageSpec, parse_spec
from featurerec.registry.criteria import check_criteria, failing
from featurerec.registry.store import GATED_KINDS, Registry, parse_uri
from featurerec.warehouse.transforms import (
    latest_event_time,
    parse_as_of,
    run_sql_transform,
    sql_params,
)

#: Modules with PIPE's own stage functions (compute_user_neighbors, ...), always importable.
BUILTIN_STAGE_MODULES: tuple[str, ...] = ("featurerec.pipeline.builtin",)


class QualityGateFailed(FeaturerecError):
    """A critical data-quality check failed; carries the check results."""

    def __init__(self, message: str, checks: list[CheckRecord]) -> None:
        super().__init__(message)
        self.checks = checks


class StageTimeout(FeaturerecError):
    """A stage ran past its ``timeout_minutes``."""


#: Stage types that run SQL on the shared connection (started one at a time).
SQL_STAGE_TYPES: tuple[str, ...] = ("sql_transform", "data_quality")

#: Errors that a retry cannot fix.
NOT_RETRIED: tuple[type[BaseException], ...] = (SpecError, DataError, QualityGateFailed)


class ProgressSink(Protocol):
    """Where the runner reports live progress (the CLI draws rich bars on stderr)."""

    def stage_started(self, name: str, attempt: int) -> None: ...

    def stage_progress(self, name: str, done: float, total: float, message: str) -> None: ...

    def stage_finished(self, name: str, record: StageRecord) -> None: ...


class NullSink:
    def stage_started(self, name: str, attempt: int) -> None:
        return None

    def stage_progress(self, name: str, done: float, total: float, message: str) -> None:
        return None

    def stage_finished(self, name: str, record: StageRecord) -> None:
        return None


def load_stage_function(name: str, modules: tuple[str, ...] = STAGE_MODULES) -> StageFunction:
    """The function registered under ``name``, importing the stage modules lazily.

    SpecError naming the function and every module that failed to import otherwise.
    """
    if name in STAGE_FUNCTIONS:
        return STAGE_FUNCTIONS[name]
    problems: list[str] = []
    for mod in (*BUILTIN_STAGE_MODULES, *modules):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # a broken module must fail the stage, not the runner
            problems.append(f"{mod}: {type(exc).__name__}: {exc}")
        if name in STAGE_FUNCTIONS:
            return STAGE_FUNCTIONS[name]
    known = ", ".join(sorted(STAGE_FUNCTIONS)) or "none"
    detail = f"; import problems: {'; '.join(problems)}" if problems else ""
    raise SpecError(
        f"no stage function registered as {name!r} (registered: {known}; searched"
        f" {', '.join((*BUILTIN_STAGE_MODULES, *modules))}){detail}"
    )


def human_count(n: int | float) -> str:
    """4213000 -> '4.2M', 72400 -> '72,400'."""
    if abs(n) >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    return f"{int(n):,}"


@dataclass
class _Outcome:
    """What a stage attempt produced; applied to the record by the main thread."""

    rows: int | None = None
    summary: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    checks: list[CheckRecord] = field(default_factory=list)
    criteria: list[CriterionRecord] = field(default_factory=list)
    promotion: PromotionRecord | None = None
    registered: list[str] = field(default_factory=list)
    artifact_dir: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Attempt:
    number: int
    started: float
    deadline: float | None
    thread: threading.Thread


class PipelineRunner:
    """Runs a :class:`PipelineSpec` against one warehouse engine and registry."""

    def __init__(
        self,
        spec: PipelineSpec,
        settings: Settings,
        engine: Any,
        registry: Registry,
        history: RunHistory,
        *,
        sink: ProgressSink | None = None,
        spec_source: str = "",
        stage_modules: tuple[str, ...] = STAGE_MODULES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.history = history
        self.sink: ProgressSink = sink or NullSink()
        self.spec_source = spec_source
        self.stage_modules = stage_modules
        self.clock = clock
        self._cache = RunCache()

    # -- public ---------------------------------------------------------------------------
    def run(
        self,
        as_of: datetime | str | None = None,
        *,
        scheduled_for: datetime | None = None,
    ) -> RunRecord:
        """Run every stage; ``as_of`` defaults to the latest event in the warehouse."""
        t = latest_event_time(self.engine) if as_of is None else parse_as_of(as_of)
        now = utcnow()
        record = RunRecord(
            run_id=self.history.new_run_id(now),
            pipeline=self.spec.name,
            spec=self.spec.to_json_dict(),
            spec_source=self.spec_source,
            spec_dir=str(self.spec.spec_dir) if self.spec.spec_dir else None,
            as_of=t,
            started_at=now,
            scheduled_for=scheduled_for,
            stages={
                name: StageRecord(name=name, type=self.spec.stage(name).type)
                for name in self.spec.order()
            },
        )
        self.history.save(record)
        return self._execute(record)

    def resume(self, run_id: str) -> RunRecord:
        """Rerun the failed and skipped stages of ``run_id`` (passed stages are kept)."""
        record = self.history.load(run_id)
        if record.status == "passed":
            raise SpecError(f"run {record.run_id} passed: nothing to resume")
        self.spec = parse_spec(
            record.spec,
            spec_dir=Path(record.spec_dir) if record.spec_dir else None,
            source=f"run {record.run_id}",
        )
        for st in record.stages.values():
            if st.status != "passed":
                record.stages[st.name] = StageRecord(name=st.name, type=st.type)
        record.status = "running"
        record.finished_at = None
        record.resumed_at.append(utcnow())
        self.history.save(record)
        return self._execute(record)

    # -- the loop -------------------------------------------------------------------------
    def _execute(self, record: RunRecord) -> RunRecord:
        self._cache = RunCache()  # one per run or resume: stages share what they read
        try:
            return self._loop(record)
        except BaseException as exc:  # Ctrl-C or a runner bug: leave a resumable record
            for st in record.stages.values():
                if st.status in ("running", "pending"):
                    st.status = "failed" if st.status == "running" else "skipped"
                    st.error = f"run interrupted: {type(exc).__name__}"
            record.status = "failed"
            record.finished_at = utcnow()
            self.history.save(record)
            raise

    def _loop(self, record: RunRecord) -> RunRecord:
        spec = self.spec
        order = spec.order()
        stages = record.stages
        running: dict[str, _Attempt] = {}
        not_before: dict[str, float] = {}
        done_q: queue.Queue[tuple[str, int, _Outcome | None, BaseException | None]] = queue.Queue()
        t0 = self.clock()
        while True:
            for name in order:
                st = stages[name]
                if st.status != "pending":
                    continue
                bad = [d for d in spec.deps(name) if stages[d].status in ("failed", "skipped")]
                if bad:
                    st.status = "skipped"
                    st.error = f"upstream {bad[0]} {stages[bad[0]].status}"
                    self.sink.stage_finished(name, st)
                    self.history.save(record)
            now = self.clock()
            for name in order:
                if len(running) >= spec.max_parallel:
                    break
                st = stages[name]
                if st.status != "pending" or name in running:
                    continue
                if any(stages[d].status != "passed" for d in spec.deps(name)):
                    continue
                if not_before.get(name, 0.0) > now:
                    continue
                # SQL stages share the one connection: start them one at a time, so their
                # recorded durations are their own and not time spent waiting for the lock
                if spec.stage(name).type in SQL_STAGE_TYPES and any(
                    spec.stage(r).type in SQL_STAGE_TYPES for r in running
                ):
                    continue
                self._launch(record, name, running, done_q)
            waiting = [n for n in order if stages[n].status == "pending" and n in not_before]
            if not running:
                if waiting:
                    time.sleep(max(0.0, min(not_before[n] for n in waiting) - self.clock()))
                    continue
                break
            deadlines = [a.deadline for a in running.values() if a.deadline is not None]
            wake = [*deadlines, *(not_before[n] for n in waiting)]
            timeout = min([0.5, *(w - self.clock() for w in wake)])
            try:
                name, number, outcome, exc = done_q.get(timeout=max(timeout, 0.005))
            except queue.Empty:
                pass
            else:
                att = running.get(name)
                if att is not None and att.number == number:
                    del running[name]
                    self._finish(record, name, outcome, exc, not_before)
            for name, att in list(running.items()):
                if att.deadline is not None and self.clock() > att.deadline:
                    del running[name]
                    stage = spec.stage(name)
                    self._interrupt(stage)
                    minutes = stage.timeout_minutes
                    self._finish(
                        record,
                        name,
                        None,
                        StageTimeout(f"timed out after {minutes:g} min (attempt {att.number})"),
                        not_before,
                    )
        record.status = "passed" if all(s.status == "passed" for s in stages.values()) else "failed"
        record.finished_at = utcnow()
        record.duration_s = (record.duration_s or 0.0) + (self.clock() - t0)
        self.history.save(record)
        return record

    def _launch(
        self,
        record: RunRecord,
        name: str,
        running: dict[str, _Attempt],
        done_q: queue.Queue[tuple[str, int, _Outcome | None, BaseException | None]],
    ) -> None:
        stage = self.spec.stage(name)
        st = record.stages[name]
        st.attempts += 1
        number = st.attempts
        if st.started_at is None:
            st.started_at = utcnow()
        st.status = "running"
        self.history.save(record)
        self.sink.stage_started(name, number)
        staged = self._staged(record)
        fn: StageFunction | None = None
        error: BaseException | None = None
        if stage.function_name is not None:
            try:
                fn = load_stage_function(stage.function_name, self.stage_modules)
            except SpecError as exc:
                error = exc

        def target() -> None:
            if error is not None:
                done_q.put((name, number, None, error))
                return
            try:
                out = self._run_stage(record, stage, number, fn, staged)
            except BaseException as exc:
                done_q.put((name, number, None, exc))
            else:
                done_q.put((name, number, out, None))

        thread = threading.Thread(target=target, name=f"stage-{name}", daemon=True)
        now = self.clock()
        deadline = now + stage.timeout_minutes * 60 if stage.timeout_minutes else None
        running[name] = _Attempt(number, now, deadline, thread)
        thread.start()

    def _finish(
        self,
        record: RunRecord,
        name: str,
        outcome: _Outcome | None,
        exc: BaseException | None,
        not_before: dict[str, float],
    ) -> None:
        stage = self.spec.stage(name)
        st = record.stages[name]
        if exc is not None:
            if isinstance(exc, QualityGateFailed):
                st.checks = exc.checks
            msg = f"{type(exc).__name__}: {exc}"
            retries = self.spec.retries if stage.retries is None else stage.retries
            if not isinstance(exc, NOT_RETRIED) and st.attempts <= retries:
                st.warnings.append(f"attempt {st.attempts} failed: {msg}")
                st.status = "pending"
                not_before[name] = self.clock() + self.spec.retry_delay_seconds
                self.history.save(record)
                return
            st.status = "failed"
            st.error = msg
        else:
            assert outcome is not None
            st.status = "passed"
            st.rows = outcome.rows
            st.summary = outcome.summary
            st.params = outcome.params
            st.metrics = outcome.metrics
            st.checks = outcome.checks
            st.criteria = outcome.criteria
            st.promotion = outcome.promotion
            st.registered = outcome.registered
            st.artifact_dir = outcome.artifact_dir
            st.warnings.extend(outcome.warnings)
            st.error = None
        not_before.pop(name, None)
        st.finished_at = utcnow()
        if st.started_at is not None:
            st.duration_s = (st.finished_at - st.started_at).total_seconds()
        self.sink.stage_finished(name, st)
        self.history.save(record)

    def _interrupt(self, stage: StageSpec) -> None:
        if stage.type in ("sql_transform", "data_quality"):
            conn = getattr(self.engine, "conn", None)
            if conn is not None and hasattr(conn, "interrupt"):
                conn.interrupt()

    def _staged(self, record: RunRecord) -> list[str]:
        """Registry URIs (with versions) registered by this run's passed stages."""
        return [
            uri for st in record.stages.values() if st.status == "passed" for uri in st.registered
        ]

    # -- one stage ------------------------------------------------------------------------
    def _run_stage(
        self,
        record: RunRecord,
        stage: StageSpec,
        attempt: int,
        fn: StageFunction | None,
        staged: list[str],
    ) -> _Outcome:
        if stage.type == "sql_transform":
            return self._sql_transform(record, stage)
        if stage.type == "data_quality":
            return self._data_quality(record, stage)
        assert fn is not None
        work = self.history.work_dir(record.run_id) / stage.name / f"attempt-{attempt}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        params = dict(stage.hyperparameters if stage.type == "model_training" else stage.config)
        if stage.type == "model_evaluation":
            params = {
                **stage.config,
                "metrics": list(stage.metrics),
                "promotion_criteria": dict(stage.promotion_criteria),
                "staged": staged,
            }
        ctx = StageContext(
            settings=self.settings,
            engine=self.engine,
            registry=self.registry,
            as_of=record.as_of,
            params=params,
            stage=stage.model_dump(mode="json", exclude_none=True),
            work_dir=work,
            progress=lambda d, t, m: self.sink.stage_progress(stage.name, d, t, m),
            seed=self.settings.seed,
            cache=self._cache,
        )
        result = fn(ctx)
        if not isinstance(result, StageResult):
            raise SpecError(
                f"stage function {stage.function_name!r} returned {type(result).__name__},"
                " expected StageResult"
            )
        out = _Outcome(
            rows=result.rows,
            summary=result.summary or (f"{human_count(result.rows)} rows" if result.rows else ""),
            params=(
                {**params, **result.params}
                if stage.type != "model_evaluation"
                else {"metrics": list(stage.metrics)}
            ),
            metrics={k: float(v) for k, v in result.metrics.items()},
        )
        if stage.type == "model_evaluation":
            self._promote(record, stage, out, staged)
            return out
        if result.artifact_dir is not None:
            art = Path(result.artifact_dir)
            if stage.output:
                kind, name, _ = parse_uri(stage.output)
                mv = self.registry.register(
                    name,
                    art,
                    params={**stage.hyperparameters, **result.params},
                    metrics=out.metrics,
                    data_window=self._data_window(record),
                    stage="staging",
                    kind=kind,
                    run_id=record.run_id,
                )
                out.registered.append(mv.uri)
                if art.resolve().is_relative_to(work.resolve()):
                    shutil.rmtree(work, ignore_errors=True)
            else:
                out.artifact_dir = str(art)
        elif stage.output:
            out.warnings.append(f"stage returned no artifact: nothing registered as {stage.output}")
        return out

    def _data_window(self, record: RunRecord) -> dict[str, Any]:
        w = self.settings.windows
        return {
            "as_of": record.as_of.isoformat(),
            "interaction_days": w.interaction_days,
            "transition_days": w.transition_days,
            "context_activity_days": w.context_activity_days,
        }

    def _sql_transform(self, record: RunRecord, stage: StageSpec) -> _Outcome:
        assert stage.query_ref is not None
        rows = run_sql_transform(
            self.engine,
            stage.query_ref,
            self.settings,
            record.as_of,
            output_table=stage.output_table,
            overrides=stage.params,
            sql_text=self.spec.sql_text(stage),
        )
        return _Outcome(rows=rows, summary=f"{human_count(rows)} rows")

    def _data_quality(self, record: RunRecord, stage: StageSpec) -> _Outcome:
        checks: list[CheckRecord] = []
        for c in stage.checks:
            rec = CheckRecord(
                name=c.name,
                severity=c.severity,
                min_value=c.min_value,
                max_value=c.max_value,
                unit=c.unit,
            )
            try:
                params = {"as_of": record.as_of}
                used = sql_params(c.query)
                rows = self.engine.query_rows(c.query, {k: params[k] for k in used if k in params})
                value = next(iter(rows[0].values())) if rows else None
                rec.value = None if value is None else float(value)
            except Exception as exc:
                rec.error = f"{type(exc).__name__}: {exc}"
            rec.passed = (
                rec.error is None
                and rec.value is not None
                and (c.min_value is None or rec.value >= c.min_value)
                and (c.max_value is None or rec.value <= c.max_value)
            )
            checks.append(rec)
        critical = [c for c in checks if not c.passed and c.severity == "critical"]
        warnings = [
            f"check {c.name}: {_check_reason(c)}"
            for c in checks
            if not c.passed and c.severity == "warning"
        ]
        if critical:
            raise QualityGateFailed(
                "critical check(s) failed: "
                + "; ".join(f"{c.name} {_check_reason(c)}" for c in critical),
                checks,
            )
        return _Outcome(checks=checks, warnings=warnings)

    def _promote(
        self, record: RunRecord, stage: StageSpec, out: _Outcome, staged: list[str]
    ) -> None:
        results = check_criteria(stage.promotion_criteria, out.metrics)
        out.criteria = [
            CriterionRecord(
                metric=r.criterion.metric,
                op=r.criterion.op,
                threshold=r.criterion.threshold,
                value=r.value,
                passed=r.passed,
            )
            for r in results
        ]
        gated = [u for u in staged if parse_uri(u)[0] in GATED_KINDS]
        for uri in gated:
            kind, name, version = parse_uri(uri)
            self.registry.update_metrics(name, int(version), out.metrics, kind=kind)
        if not stage.promote_to:
            return
        reasons = failing(results)
        if not gated:
            reasons.append("no model or index was registered by this run")
        if reasons:
            out.promotion = PromotionRecord(
                promoted=False, to=stage.promote_to, versions=gated, reasons=reasons
            )
            return
        # verify every artifact before promoting any, so a corrupt one blocks them all
        versions = [(parse_uri(u), u) for u in gated]
        for (kind, name, version), _ in versions:
            self.registry.verify(self.registry.get(name, int(version), kind))
        for (kind, name, version), _ in versions:
            self.registry.promote(
                name,
                int(version),
                criteria=stage.promotion_criteria,
                metrics=out.metrics,
                to=stage.promote_to,
                kind=kind,
                reason=f"pipeline run {record.run_id}: criteria passed",
            )
        out.promotion = PromotionRecord(promoted=True, to=stage.promote_to, versions=gated)


def _check_reason(c: CheckRecord) -> str:
    if c.error:
        return f"error: {c.error}"
    if c.value is None:
        return "returned no value"
    if c.min_value is not None and c.value < c.min_value:
        return f"{c.value:g} < min {c.min_value:g}"
    if c.max_value is not None and c.value > c.max_value:
        return f"{c.value:g} > max {c.max_value:g}"
    return "ok"
