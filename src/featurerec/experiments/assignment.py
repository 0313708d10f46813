"""Deterministic experiment assignment: the same user always lands in the same variant.

The bucket of a user is ``sha256("<experiment name>:<user id>")`` read as a uniform number
in [0, 1) (first 8 bytes, big-endian, divided by 2**64); the variants own consecutive slices
of [0, 1) in the order the spec lists them, each as wide as its allocation. Nothing depends
on process, seed, time or replica, so serving replicas, restarts, the report and the
simulator all agree without sharing state. Hashing the experiment name too makes the
assignments of two experiments independent of each other.

Example::

    >>> from featurerec.experiments.spec import ExperimentSpec
    >>> spec = ExperimentSpec.model_validate({"name": "demo", "variants": [
    ...     {"name": "a", "allocation": 0.5}, {"name": "b", "allocation": 0.5}]})
    >>> assign(spec, "usr_1").name == assign(spec, "usr_1").name
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import accumulate

import numpy as np

from featurerec.experiments.spec import ExperimentSpec, Variant

_TWO_64 = float(2**64)


def bucket(experiment: str, user_id: str) -> float:
    """The user's uniform position in [0, 1) for ``experiment``."""
    digest = hashlib.sha256(f"{experiment}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _TWO_64


def _edges(spec: ExperimentSpec) -> np.ndarray:
    edges = np.array(list(accumulate(v.allocation for v in spec.variants)), dtype=np.float64)
    edges[-1] = 1.0  # float rounding must never leave a gap at the top
    return edges


def assign_index(spec: ExperimentSpec, user_id: str) -> int:
    """Index into ``spec.variants`` of the user's variant."""
    u = bucket(spec.name, user_id)
    return int(np.searchsorted(_edges(spec), u, side="right"))


def assign(spec: ExperimentSpec, user_id: str) -> Variant:
    """The variant ``user_id`` sees in experiment ``spec`` (deterministic; see module doc)."""
    return spec.variants[assign_index(spec, user_id)]


def assign_many(spec: ExperimentSpec, user_ids: Sequence[str]) -> np.ndarray:
    """Variant indexes for many users at once (same result as :func:`assign` per user)."""
    u = np.fromiter(
        (bucket(spec.name, uid) for uid in user_ids), dtype=np.float64, count=len(user_ids)
    )
    return np.searchsorted(_edges(spec), u, side="right").astype(np.int64)
