"""What the pipeline runner hands to a training or custom stage, and what it gets back.

Stage implementations live with the code they run (models, index, serving snapshot); they
register under the spec's ``model_type`` / ``command`` names in :data:`STAGE_FUNCTIONS` via
:func:`stage_function`, and the runner looks them up there. No stage reaches into another
stage's internals: inputs are warehouse tables and registry artifacts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from featurerec.config import Settings

T = TypeVar("T")


class RunCache:
    """Values computed once per pipeline run and shared by its stages, e.g. the
    :class:`~featurerec.models.base.TrainingData` that every model stage reads from the
    same ml.* tables. The first stage to ask computes a value; concurrent stages asking for
    the same key wait for it. A failed computation is not cached (the next caller retries).
    The runner makes a new cache for every run and resume, so nothing outlives the tables
    it was read from; cached values are shared, so callers must not modify them."""

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._values:
                    return self._values[key]  # type: ignore[no-any-return]
            value = make()
            with self._guard:
                self._values[key] = value
            return value


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
    #: Shared by every stage of this run (see :class:`RunCache`).
    cache: RunCache = field(default_factory=RunCache)


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
