"""Model registry: versions, stages (staging / production / archived), gated promotion,
rollback, checksum-verified artifacts. See :mod:`featurerec.registry.store`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featurerec.registry.criteria import Criterion, CriterionResult, check_criteria, failing
from featurerec.registry.store import ModelVersion, Registry, parse_uri

__all__ = [
    "Criterion",
    "CriterionResult",
    "ModelVersion",
    "Registry",
    "check_criteria",
    "failing",
    "parse_uri",
    "registry_for",
    "registry_root",
]


def registry_root(settings: Any) -> Path:
    """``<data_dir>/registry``."""
    return Path(settings.data_path) / "registry"


def registry_for(settings: Any) -> Registry:
    """The registry of a :class:`featurerec.config.Settings`."""
    return Registry(registry_root(settings))
