"""What the pipeline runner hands to a training or custom stage, and what it gets back.

Stage implementations live with the code they run (models, index, serving snapshot); they
register under the spec's ``model_type`` / ``command`` names in :data:`STAGE_FUNCTIONS` via
:func:`stage_function`, and the runner looks them up there. No stage reaches into another
stage's internals: inputs are warehouse tables and registry artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from featurerec.config import Settings


@dataclass
class StageContext:
    """Inputs of one stage run."""

    settings: Settings
    #: An open :class:`featurerec.warehouse.engine.DuckDBEngine` (read-write).
    engine: Any
    #: The registry (:class:`featurerec.registry.Registry`).
    registry: Any
    #: Windows end here; never the wall clock.
    as_of: datetime
    #: The stage's ``hyperparameters`` (training) or ``config`` (custom) object from the spec.
    params: dict[str, Any]
    #: The whole stage object from the spec (name, output, input_tables, ...).
    stage: dict[str, Any]
    #: Fresh empty folder for this stage's artifacts.
    work_dir: Path
    #: ``progress(done, total, message)``; safe to call often.
    progress: Callable[[float, float, str], None] = lambda done, total, msg: None
    seed: int = 0


@dataclass
class StageResult:
    """Outputs of one stage run, persisted in the run history."""

    #: Folder with the artifact to register (None for stages that only write tables).
    artifact_dir: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    rows: int | None = None
    #: Free text shown in the execution tree, e.g. "4.2M rows".
    summary: str = ""


StageFunction = Callable[[StageContext], StageResult]

#: ``model_type`` / ``command`` name -> implementation.
STAGE_FUNCTIONS: dict[str, StageFunction] = {}

#: Modules imported before a run so that their ``@stage_function`` registrations exist.
STAGE_MODULES: tuple[str, ...] = (
    "featurerec.models.training",
    "featurerec.serving.snapshot",
)


def stage_function(name: str) -> Callable[[StageFunction], StageFunction]:
    """Register ``fn`` as the implementation of stage type/command ``name``."""

    def deco(fn: StageFunction) -> StageFunction:
        STAGE_FUNCTIONS[name] = fn
        return fn

    return deco
