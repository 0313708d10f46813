"""Simulator throughput: events written to Parquet per second.

Two runs:

* ``demo``: the default world of ``make demo`` (5,000 users x 60 days), one process.
* ``spec_volume``: the spec's daily volume (Stage 2: ~100k active users, ~12M feature_used
  events per day): 150,000 users with ``activity_scale`` raised until one simulated day holds
  ~12M feature_used events (~34M events in all), written with 2 worker processes.

Writes ``benchmarks/results/simulator.json`` with the figures and machine facts (cores, load
average: the machine is shared). Run: ``.venv/bin/python benchmarks/bench_simulator.py``
(``--quick`` for a 10x smaller spec-volume run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from featurerec.simulate.params import WorldParams
from featurerec.simulate.world import WorldConfig, generate_world

TARGET_EVENTS_PER_S = 500_000
SPEC_FEATURE_USED_PER_DAY = 12_000_000


def run(name: str, config: WorldConfig, workers: int, tmp: Path) -> dict[str, object]:
    out = tmp / name
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    world = generate_world(config)
    manifest = world.write(out, workers=workers)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (out / "events").glob("*"))
    shutil.rmtree(out)
    row = {
        "users": config.users,
        "days": config.days,
        "activity_scale": config.params.activity_scale,
        "workers": workers,
        "events": manifest.events,
        "feature_used_events": manifest.feature_used_events,
        "feature_used_per_day": round(manifest.feature_used_events / config.days),
        "seconds": round(seconds, 2),
        "events_per_second": round(manifest.events / seconds),
        "parquet_mb": round(size / 2**20, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps({name: row}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller spec-volume run")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "simulator.json"
    )
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        demo = run("demo", WorldConfig(users=5000, days=60, seed=0), 1, tmp)
        users = 150_000 // scale
        # pick the activity scale that gives ~12M feature_used per day at 150k users
        act = 300.0
        for _ in range(2):
            probe = generate_world(
                WorldConfig(users=15000, days=1, seed=0, params=WorldParams(activity_scale=act))
            ).write(tmp / "probe")
            per_user = probe.feature_used_events / 15000
            act *= SPEC_FEATURE_USED_PER_DAY / (per_user * 150_000)
            shutil.rmtree(tmp / "probe")
        spec = run(
            "spec_volume",
            WorldConfig(
                users=users,
                days=1,
                seed=0,
                chunk_users=15_000,
                params=WorldParams(activity_scale=round(act, 1)),
            ),
            2,
            tmp,
        )
    result = {
        "benchmark": "simulator",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "peak_rss_mb_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_mb_workers": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            ),
        },
        "target_events_per_second": TARGET_EVENTS_PER_S,
        "quick": args.quick,
        "runs": {"demo": demo, "spec_volume": spec},
        "meets_target": spec["events_per_second"] >= TARGET_EVENTS_PER_S,  # type: ignore[operator]
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
