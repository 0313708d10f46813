"""Promotion criteria: the spec's ``"ndcg@5": "> 0.35"`` strings, parsed once and checked.

Used by the registry (which refuses a promotion that fails them) and by the pipeline's
evaluation stage (which reports each metric against its threshold)::

    >>> check_criteria({"ndcg@5": "> 0.35"}, {"ndcg@5": 0.41})[0].passed
    True
    >>> failing(check_criteria({"ndcg@5": "> 0.35"}, {"ndcg@5": 0.30}))
    ['ndcg@5 0.3 is not > 0.35']
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from featurerec.errors import SpecError

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}
_CRITERION = re.compile(r"^\s*(>=|<=|==|>|<)\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Criterion:
    """One ``metric op threshold`` rule."""

    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class CriterionResult:
    criterion: Criterion
    #: None when the metric was not reported.
    value: float | None
    passed: bool

    @property
    def reason(self) -> str:
        c = self.criterion
        if self.value is None:
            return f"{c.metric} missing from the evaluation metrics (needs {c.op} {c.threshold:g})"
        if self.passed:
            return f"{c.metric} {self.value:.4g} {c.op} {c.threshold:g}"
        return f"{c.metric} {self.value:.4g} is not {c.op} {c.threshold:g}"


def parse_criterion(metric: str, text: str) -> Criterion:
    """Parse ``"> 0.35"``; SpecError naming the metric on anything else."""
    m = _CRITERION.match(str(text))
    if not m:
        raise SpecError(
            f"promotion criterion for {metric!r}: cannot parse {text!r}"
            " (expected an operator and a number, e.g. '> 0.35'; operators: > >= < <= ==)"
        )
    return Criterion(metric, m.group(1), float(m.group(2)))


def parse_criteria(criteria: Mapping[str, str]) -> list[Criterion]:
    return [parse_criterion(k, v) for k, v in criteria.items()]


def check_criteria(
    criteria: Mapping[str, str] | list[Criterion], metrics: Mapping[str, float]
) -> list[CriterionResult]:
    """Check every criterion; a missing or NaN metric fails its criterion."""
    parsed = parse_criteria(criteria) if isinstance(criteria, Mapping) else criteria
    out = []
    for c in parsed:
        raw = metrics.get(c.metric)
        value = None if raw is None else float(raw)
        ok = value is not None and not math.isnan(value) and _OPS[c.op](value, c.threshold)
        out.append(CriterionResult(c, value, ok))
    return out


def failing(results: list[CriterionResult]) -> list[str]:
    """Reasons of the failed criteria (empty when all pass)."""
    return [r.reason for r in results if not r.passed]
