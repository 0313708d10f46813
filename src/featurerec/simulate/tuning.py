"""Fit the world's free rates to the spec's product figures (a developer tool, not runtime).

``python -m featurerec.simulate.tuning [--users 4000] [--iterations 8] [--seeds 1 2]``

Fixed-point iteration on small worlds: each round generates worlds with the current
parameters, measures them with :func:`featurerec.simulate.calibration.calibrate` (the same
report users see), and moves

* each spec feature's ``discover`` rate by ``(spec / simulated) ** 0.8``,
* each spec transition's affinity by ``(spec / simulated)``,
* ``active_base`` (how often people come back) against the cold-start share
  (team size and shared taste, which set features per workspace, are hand-set),

then prints the parameters to paste into :mod:`featurerec.simulate.params`. It only ever
looks at product figures measured from the written events, never at any model's quality.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from featurerec.simulate.calibration import CalibrationReport, calibrate
from featurerec.simulate.catalog import CORE_NAMES
from featurerec.simulate.params import (
    SPEC_ADOPTION_30D,
    SPEC_COLD_START_SHARE,
    SPEC_TRANSITIONS,
    WorldParams,
)
from featurerec.simulate.world import WorldConfig, generate_world


def _one(params: WorldParams, users: int, days: int, seed: int) -> CalibrationReport:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w"
        generate_world(WorldConfig(users=users, days=days, seed=seed, params=params)).write(out)
        return calibrate(out)


def measure(params: WorldParams, users: int, days: int, seeds: list[int]) -> dict[str, float]:
    """Average calibration figures over ``seeds`` (two worlds at a time)."""
    from concurrent.futures import ProcessPoolExecutor

    acc: dict[str, list[float]] = {}
    with ProcessPoolExecutor(max_workers=2) as pool:
        reports = list(
            pool.map(_one, *zip(*[(params, users, days, s) for s in seeds], strict=True))
        )
    for rep in reports:
        for r in rep.rows:
            acc.setdefault(f"{r.metric}:{r.key}", []).append(r.simulated)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def step(params: WorldParams, fig: dict[str, float]) -> WorldParams:
    """One fixed-point update (see module docstring)."""
    disc = list(params.discover)
    for feat, spec in SPEC_ADOPTION_30D.items():
        sim = max(fig[f"adoption_30d:{feat}"], 1e-4)
        j = CORE_NAMES.index(feat)
        disc[j] *= float(np.clip((spec / sim) ** 0.6, 0.33, 3.0))
    trans = []
    for a, b, w in params.transition:
        spec_t = SPEC_TRANSITIONS.get((a, b))
        if spec_t is not None:
            sim = max(fig[f"transition:{a}->{b}"], 1e-4)
            w *= float(np.clip((spec_t / sim) ** 0.7, 0.33, 3.0))
        trans.append((a, b, round(w, 4)))
    cold = fig["cold_start_share:"]
    active = params.active_base * float(np.clip((cold / SPEC_COLD_START_SHARE) ** 1.0, 0.7, 1.4))
    return replace(
        params,
        discover=tuple(round(x, 6) for x in disc),
        transition=tuple(trans),
        active_base=round(active, 5),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    args = ap.parse_args()
    params = WorldParams()
    for it in range(args.iterations):
        fig = measure(params, args.users, args.days, args.seeds)
        worst = max(
            [abs(fig[f"adoption_30d:{f}"] / s - 1) for f, s in SPEC_ADOPTION_30D.items()]
            + [abs(fig[f"transition:{a}->{b}"] / s - 1) for (a, b), s in SPEC_TRANSITIONS.items()]
        )
        print(
            f"iter {it}: worst relative error {worst:.3f} cold {fig['cold_start_share:']:.3f} "
            f"fpw {fig['features_per_workspace:']:.2f}",
            flush=True,
        )
        params = step(params, fig)
    print("discover =", params.discover)
    print("transition =", params.transition)
    print("active_base =", params.active_base)


if __name__ == "__main__":
    main()
