"""Assignment is deterministic, independent of process, and honours the allocations."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from featurerec.errors import SpecError
from featurerec.experiments.assignment import assign, assign_many, bucket
from featurerec.experiments.spec import (
    ExperimentSpec,
    find_experiment,
    load_experiment,
    parse_experiment,
)


def _spec(allocs: list[float], name: str = "exp") -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": name,
            "variants": [{"name": f"v{i}", "allocation": a} for i, a in enumerate(allocs)],
        }
    )


def test_assignment_is_deterministic_and_matches_batch() -> None:
    spec = _spec([0.25, 0.25, 0.25, 0.25])
    ids = [f"usr_{i}" for i in range(2000)]
    one = [assign(spec, u).name for u in ids]
    again = [assign(spec, u).name for u in ids]
    batch = [spec.variants[i].name for i in assign_many(spec, ids)]
    assert one == again == batch


def test_assignment_is_stable_across_processes() -> None:
    """A fresh interpreter (another replica, another PYTHONHASHSEED) gives the same variants."""
    spec = _spec([0.1, 0.3, 0.6])
    ids = [f"usr_{i}" for i in range(50)]
    code = (
        "from featurerec.experiments.spec import ExperimentSpec;"
        "from featurerec.experiments.assignment import assign;"
        "s=ExperimentSpec.model_validate({'name':'exp','variants':["
        "{'name':'v0','allocation':0.1},{'name':'v1','allocation':0.3},{'name':'v2','allocation':0.6}]});"
        "print(','.join(assign(s,f'usr_{i}').name for i in range(50)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.strip()
    assert out.split(",") == [assign(spec, u).name for u in ids]


def test_bucket_is_the_documented_sha256_formula() -> None:
    import hashlib

    d = hashlib.sha256(b"exp:usr_7").digest()
    assert bucket("exp", "usr_7") == int.from_bytes(d[:8], "big") / 2**64


@pytest.mark.parametrize("allocs", [[0.25] * 4, [0.1, 0.2, 0.7], [0.5, 0.5]])
def test_allocation_proportions_chi_square(allocs: list[float]) -> None:
    spec = _spec(allocs)
    n = 100_000
    idx = assign_many(spec, [f"u{i}" for i in range(n)])
    observed = np.bincount(idx, minlength=len(allocs))
    p = stats.chisquare(observed, f_exp=np.array(allocs) * n).pvalue
    assert p > 0.001, (observed, p)


def test_experiments_are_independent() -> None:
    a, b = _spec([0.5, 0.5], "exp_a"), _spec([0.5, 0.5], "exp_b")
    ids = [f"u{i}" for i in range(20_000)]
    xa, xb = assign_many(a, ids), assign_many(b, ids)
    table = np.array([[np.sum((xa == i) & (xb == j)) for j in (0, 1)] for i in (0, 1)])
    assert stats.chi2_contingency(table).pvalue > 0.001


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            {
                "name": "x",
                "variants": [{"name": "a", "allocation": 0.5}, {"name": "b", "allocation": 0.4}],
            },
            "sum to 1",
        ),
        (
            {
                "name": "x",
                "variants": [{"name": "a", "allocation": 0.5}, {"name": "a", "allocation": 0.5}],
            },
            "unique",
        ),
        ({"name": "x", "variants": [{"name": "a", "allocation": 1.0}]}, "variants"),
        (
            {
                "name": "x",
                "control": "z",
                "variants": [{"name": "a", "allocation": 0.5}, {"name": "b", "allocation": 0.5}],
            },
            "control 'z'",
        ),
        (
            {
                "name": "x",
                "bogus": 1,
                "variants": [{"name": "a", "allocation": 0.5}, {"name": "b", "allocation": 0.5}],
            },
            "bogus: unknown key",
        ),
    ],
)
def test_invalid_specs_name_the_problem(raw: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_experiment(raw)


def test_shipped_specs_load_and_map_to_serving(settings) -> None:
    strat = find_experiment(settings, "rec-personalization-strategy")
    assert [v.resolved_strategy for v in strat.variants] == [
        "collaborative_only",
        "content_based",
        "hybrid",
        "sequence_aware",
    ]
    assert strat.control_variant == "hybrid"
    assert strat.min_sample_per_variant == 5000
    place = find_experiment(settings, "builtin:experiment.placement.json")
    assert [v.resolved_placement for v in place.variants][2] == "in_context_tooltip"
    assert all(v.resolved_strategy is None for v in place.variants)
    with pytest.raises(SpecError, match="unknown experiment 'nope'"):
        find_experiment(settings, "nope")


def test_explicit_strategy_field_wins(tmp_path) -> None:
    p = tmp_path / "e.json"
    p.write_text(
        '{"experiment": {"name": "e", "variants": ['
        '{"name": "control", "allocation": 0.5, "strategy": "hybrid"},'
        '{"name": "treat", "allocation": 0.5, "strategy": "sequence_aware", "placement": "in_context_tooltip"}]}}'
    )
    spec = load_experiment(p)
    assert spec.variant("treat").resolved_strategy == "sequence_aware"
    assert spec.variant("treat").resolved_placement == "in_context_tooltip"
    assert spec.variant("control").resolved_strategy == "hybrid"
