"""Benchmark: a 4-week, 4-variant simulated online experiment (spec Stage 8's strategy
experiment) with >= 5,000 users per variant, through the real serving / ingestion / pipeline
code. Target: <= 10 minutes on this machine. Writes benchmarks/results/online.json with the
figures, the results tables, the share of variants whose pre-run OPE estimate falls inside
the online 95% interval, and machine facts (cores, load average, date).

    .venv/bin/python benchmarks/bench_online.py [--users N] [--retrain-every D] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from featurerec.cli_common import to_json
from featurerec.config import Settings
from featurerec.experiments.spec import find_experiment
from featurerec.simulate.online import OnlineConfig, OnlineExperiment, result_tables

TARGET_SECONDS = 600


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=36_000)
    ap.add_argument("--history-days", type=int, default=14)
    ap.add_argument("--warmup-days", type=int, default=10)
    ap.add_argument("--weeks", type=float, default=4)
    ap.add_argument("--retrain-every", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spec", default="rec-personalization-strategy")
    ap.add_argument("--work", default="/tmp/featurerec-bench-online")
    ap.add_argument("--quick", action="store_true", help="Small smoke run (not the target).")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "online.json"))
    args = ap.parse_args()
    if args.quick:
        args.users, args.weeks, args.warmup_days = 3000, 1, 8
    settings = Settings.model_validate({"data_dir": args.work})
    spec = find_experiment(settings, args.spec)
    cfg = OnlineConfig(
        users=args.users,
        history_days=args.history_days,
        warmup_days=args.warmup_days,
        weeks=args.weeks,
        retrain_every_days=args.retrain_every,
        seed=args.seed,
    )
    load_before = os.getloadavg()
    t0 = time.perf_counter()

    def progress(msg: str, done: float, total: float) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg} ({done:.0f}/{total:.0f})", flush=True)

    result = OnlineExperiment(spec, cfg, Path(args.work) / "run", settings, progress=progress).run()
    seconds = time.perf_counter() - t0
    tables = result_tables(result)
    users = {v.name: v.users for v in result.report.variants}
    checked = [o for o in result.ope if o.inside_online_ci is not None]
    by_variant: dict[str, list[bool]] = {}
    by_estimator: dict[str, list[bool]] = {}
    by_metric_dr: dict[str, list[bool]] = {}
    for o in checked:
        by_estimator.setdefault(o.estimator, []).append(bool(o.inside_online_ci))
        if o.estimator == "dr":
            by_variant.setdefault(o.variant, []).append(bool(o.inside_online_ci))
            by_metric_dr.setdefault(o.metric, []).append(bool(o.inside_online_ci))
    out = {
        "benchmark": "online",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "config": vars(args),
        "seconds": round(seconds, 1),
        "target_seconds": TARGET_SECONDS,
        "within_target": seconds <= TARGET_SECONDS,
        "users_per_variant": users,
        "min_users_per_variant": min(users.values()),
        "response_model": result.response_model,
        "ope_inside_online_ci_share": result.ope_inside_share,
        # like with like: the same frozen policy online (experiment days before 1st retrain)
        "ope_inside_frozen_online_ci_share": result.ope_inside_frozen_share,
        "ope_dr_inside_frozen_by_metric": {
            m: sum(
                bool(o.inside_frozen_ci)
                for o in result.ope
                if o.estimator == "dr" and o.metric == m and o.inside_frozen_ci is not None
            )
            / max(
                1,
                sum(
                    1
                    for o in result.ope
                    if o.estimator == "dr" and o.metric == m and o.inside_frozen_ci is not None
                ),
            )
            for m in by_metric_dr
        },
        "ope_inside_by_estimator": {k: sum(x) / len(x) for k, x in by_estimator.items()},
        "ope_dr_inside_by_variant": {v: sum(x) / len(x) for v, x in by_variant.items()},
        "ope_dr_inside_by_metric": {m: sum(x) / len(x) for m, x in by_metric_dr.items()},
        "online_inside_ope_ci_dr_by_metric": {
            m: sum(
                bool(o.online_inside_ope_ci)
                for o in checked
                if o.estimator == "dr" and o.metric == m
            )
            / max(1, sum(1 for o in checked if o.estimator == "dr" and o.metric == m))
            for m in by_metric_dr
        },
        "timings": result.timings,
        "counts": result.counts,
        "tables": tables,
        "srm": result.report.srm,
        "message": result.report.message,
        "notes": result.notes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(to_json(out))
    print(
        to_json(
            {
                k: out[k]
                for k in (
                    "seconds",
                    "min_users_per_variant",
                    "ope_inside_online_ci_share",
                    "ope_inside_frozen_online_ci_share",
                    "timings",
                )
            }
        )
    )
    for name, rows in tables.items():
        print(name)
        for r in rows:
            print("  ", r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
