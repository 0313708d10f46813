"""Run history: one JSON file per pipeline run under ``<data_dir>/pipeline/runs``.

A run record holds the spec it ran (so ``--resume`` reruns exactly that), the as-of time, and
per stage: status, attempts, duration, row count, metrics, quality-gate checks, registered
artifact versions and the promotion decision. It is rewritten atomically (temp file + rename)
after every stage change, so a crashed run still leaves a record that can be resumed.
"""

from __future__ import annotations

import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field

from featurerec.errors import SpecError

StageStatus = Literal["pending", "running", "passed", "failed", "skipped"]
RunStatus = Literal["running", "passed", "failed"]
_RUN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class CheckRecord(BaseModel):
    name: str
    severity: str
    value: float | None = None
    min_value: float | None = None
    max_value: float | None = None
    passed: bool = False
    unit: str | None = None
    error: str | None = None


class CriterionRecord(BaseModel):
    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool


class PromotionRecord(BaseModel):
    promoted: bool
    to: str | None = None
    #: Registry URIs with versions that were (or would have been) promoted.
    versions: list[str] = Field(default_factory=list)
    #: Why not, e.g. "ndcg@5 0.3 is not > 0.35".
    reasons: list[str] = Field(default_factory=list)


class StageRecord(BaseModel):
    name: str
    type: str
    status: StageStatus = "pending"
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    rows: int | None = None
    summary: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    checks: list[CheckRecord] = Field(default_factory=list)
    criteria: list[CriterionRecord] = Field(default_factory=list)
    promotion: PromotionRecord | None = None
    #: Registry URIs with versions this stage registered, e.g. models:/feature-recommender-mf/3.
    registered: list[str] = Field(default_factory=list)
    artifact_dir: str | None = None
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None


class RunRecord(BaseModel):
    run_id: str
    pipeline: str
    spec: dict[str, Any]
    spec_source: str = ""
    #: Folder of the spec file (query_ref files next to it are found again on resume).
    spec_dir: str | None = None
    as_of: datetime
    status: RunStatus = "running"
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None
    #: Times the run was resumed.
    resumed_at: list[datetime] = Field(default_factory=list)
    scheduled_for: datetime | None = None
    stages: dict[str, StageRecord] = Field(default_factory=dict)

    @property
    def failed_stages(self) -> list[str]:
        return [n for n, s in self.stages.items() if s.status == "failed"]

    @property
    def promotion(self) -> PromotionRecord | None:
        for s in self.stages.values():
            if s.promotion is not None:
                return s.promotion
        return None

    def summary_row(self) -> dict[str, Any]:
        promo = self.promotion
        return {
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "status": self.status,
            "as_of": self.as_of,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 1) if self.duration_s is not None else None,
            "stages_passed": sum(s.status == "passed" for s in self.stages.values()),
            "stages": len(self.stages),
            "failed": ",".join(self.failed_stages),
            "promoted": None if promo is None else promo.promoted,
        }


class RunHistory:
    """The folder of run records."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @classmethod
    def for_settings(cls, settings: Any) -> RunHistory:
        return cls(Path(settings.data_path) / "pipeline" / "runs")

    def new_run_id(self, now: datetime | None = None) -> str:
        t = now or utcnow()
        return f"{t:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"

    def path(self, run_id: str) -> Path:
        if not _RUN_ID.match(run_id):
            raise SpecError(f"invalid run id {run_id!r}")
        return self.root / f"{run_id}.json"

    def work_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def save(self, record: RunRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(record.run_id)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(orjson.dumps(record.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
        os.replace(tmp, target)

    def load(self, run_id: str) -> RunRecord:
        """A run by id; ``latest`` is the most recent run. SpecError if unknown."""
        if run_id == "latest":
            runs = self.list()
            if not runs:
                raise SpecError(f"no pipeline runs recorded under {self.root}")
            return runs[0]
        p = self.path(run_id)
        if not p.exists():
            recent = [r.run_id for r in self.list()[:5]]
            raise SpecError(
                f"unknown pipeline run {run_id!r}"
                + (f" (recent: {', '.join(recent)})" if recent else " (no runs recorded yet)")
            )
        return RunRecord.model_validate(orjson.loads(p.read_bytes()))

    def list(self, limit: int | None = None) -> list[RunRecord]:
        """Runs, most recent first."""
        if not self.root.exists():
            return []
        runs = [
            RunRecord.model_validate(orjson.loads(p.read_bytes()))
            for p in self.root.glob("*.json")
            if not p.name.startswith(".")
        ]
        runs.sort(key=lambda r: (r.started_at, r.run_id), reverse=True)
        return runs[:limit] if limit else runs
