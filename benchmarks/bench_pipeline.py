"""Benchmark: the daily pipeline at the spec's scale.

The spec (Stage 3 summary) reports ~72k users, 4.2M interaction rows. With 72k users that
needs ~58 distinct features per user, far more than CloudFlow's 10, so this script generates
its own synthetic events (vectorised numpy, seeded): ``--users`` users, ``--features`` features
(default 200), ~``--events-per-user`` feature_used events each inside the 90-day window (plus
5% older events the window must skip and 10% page_viewed events), sessions of one user-day,
and users / workspaces / support tickets for the context vectors.

It loads them into a fresh DuckDB warehouse (timed separately: that is ingestion, not the
pipeline) and runs the shipped ``pipeline.cloudflow.json`` through the real runner. When the
MODELS / SERVE stage functions are importable the whole spec pipeline runs; otherwise only the
SQL part (transforms, neighbours, quality gate) and the result says so.

    .venv/bin/python benchmarks/bench_pipeline.py            # full scale (~30M events)
    .venv/bin/python benchmarks/bench_pipeline.py --users 3000 --out /tmp/bp   # quick

Writes ``benchmarks/results/pipeline.json``: per-stage seconds and rows, total pipeline
seconds, peak RSS (getrusage; DuckDB runs in-process so it is included), machine facts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurerec.config import Settings
from featurerec.errors import SpecError
from featurerec.events.schema import EVENT_ARROW_SCHEMA
from featurerec.pipeline.history import RunHistory
from featurerec.pipeline.runner import PipelineRunner, load_stage_function
from featurerec.pipeline.spec import load_spec, parse_spec
from featurerec.pipeline.tree import render_tree
from featurerec.registry import Registry
from featurerec.warehouse.engine import DuckDBEngine

AS_OF = datetime(2026, 2, 28, 23, 59, 59)
RESULTS = Path(__file__).parent / "results" / "pipeline.json"


def _str_ids(prefix: str, ints: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ints), pa.string()), "")


def generate_events(
    out: Path,
    *,
    users: int,
    features: int,
    events_per_user: int,
    seed: int,
    chunk_users: int = 4000,
) -> dict[str, int]:
    """Write events Parquet files (EVENT_ARROW_SCHEMA) under ``out/events``; returns counts."""
    rng = np.random.default_rng(seed)
    (out / "events").mkdir(parents=True, exist_ok=True)
    names = np.array([f"feature_{i:03d}" for i in range(features)])
    # global popularity (Zipf-like) decides which features users pick
    pop = 1.0 / np.arange(1, features + 1) ** 0.8
    logw = np.log(pop / pop.sum())
    total = in_window = 0
    eid = 0
    part = 0
    for lo in range(0, users, chunk_users):
        n_u = min(chunk_users, users - lo)
        # each user's feature set: Gumbel top-k over popularity, size ~ Poisson(60)
        keys = logw[None, :] + rng.gumbel(size=(n_u, features))
        order = np.argsort(-keys, axis=1)
        k = np.clip(rng.poisson(60, n_u), 3, features)
        n_ev = rng.poisson(events_per_user, n_u)
        n_old = rng.poisson(events_per_user * 0.05, n_u)
        n_all = n_ev + n_old
        user = np.repeat(np.arange(n_u), n_all)
        # skewed position inside the user's set: a few favourites, a long tail
        pos = np.floor(k[user] * rng.random(user.size) ** 2).astype(np.int64)
        feat = order[user, pos]
        old = np.concatenate(
            [np.r_[np.zeros(a, bool), np.ones(b, bool)] for a, b in zip(n_ev, n_old, strict=True)]
        )
        day_back = np.where(old, rng.integers(90, 120, user.size), rng.integers(0, 90, user.size))
        secs = rng.integers(8 * 3600, 20 * 3600, user.size)
        ts = (
            np.datetime64(AS_OF.date(), "us")
            - day_back.astype("timedelta64[D]")
            + secs.astype("timedelta64[s]")
        )
        ts = np.minimum(ts, np.datetime64(AS_OF, "us"))
        # 10% extra page_viewed events (no feature)
        n_pv = user.size // 10
        pv_user = rng.integers(0, n_u, n_pv)
        pv_ts = ts[rng.integers(0, ts.size, n_pv)]
        all_user = np.concatenate([user, pv_user]) + lo
        all_ts = np.concatenate([ts, pv_ts])
        is_fu = np.r_[np.ones(user.size, bool), np.zeros(n_pv, bool)]
        all_feat = np.concatenate([feat, np.zeros(n_pv, np.int64)])
        day_num = (all_ts.astype("datetime64[D]") - np.datetime64("2025-01-01")).astype(np.int64)
        n = all_user.size
        ids = np.arange(eid, eid + n)
        eid += n
        table = pa.table(
            {
                "event_id": _str_ids("evt_", ids),
                "user_id": _str_ids("usr_", all_user),
                "workspace_id": _str_ids("ws_", all_user // 10),
                "event_type": pa.array(np.where(is_fu, "feature_used", "page_viewed")),
                "timestamp": pa.array(all_ts.astype("datetime64[us]")),
                "feature_category": pa.array(np.where(is_fu, names[all_feat], None)),
                "feature_name": pa.nulls(n, pa.string()),
                "context": pa.nulls(n, pa.string()),
                "session_id": _str_ids("sess_", all_user * 1000 + day_num % 1000),
                "session_sequence": pa.nulls(n, pa.int32()),
                "time_on_page_seconds": pa.nulls(n, pa.float64()),
                "is_first_use": pa.nulls(n, pa.bool_()),
                "properties": pa.nulls(n, pa.string()),
                "user_traits": pa.nulls(n, pa.string()),
            }
        ).cast(EVENT_ARROW_SCHEMA)
        pq.write_table(table, out / "events" / f"part-{part:05d}.parquet", compression="zstd")
        part += 1
        total += int(user.size)
        in_window += int(n_ev.sum())
    return {"feature_used_events": total, "feature_used_in_window": in_window, "parts": part}


def load_warehouse(db: DuckDBEngine, data: Path, users: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    db.execute(
        "INSERT INTO events BY NAME SELECT * FROM read_parquet($p)",
        {"p": str(data / "events" / "*.parquet")},
    )
    uid = np.arange(users)
    roles = np.array(["project_manager", "engineer", "designer", "marketing", "executive"])
    utab = pa.table(
        {
            "user_id": _str_ids("usr_", uid),
            "workspace_id": _str_ids("ws_", uid // 10),
            "role": pa.array(roles[rng.integers(0, len(roles), users)]),
            "signup_date": pa.array(
                np.datetime64("2024-01-01") + rng.integers(0, 780, users).astype("timedelta64[D]")
            ),
        }
    )
    n_ws = (users + 9) // 10
    plans = np.array(["free", "pro", "business", "enterprise"])
    inds = np.array(["tech", "finance", "health", "retail", "education"])
    wtab = pa.table(
        {
            "workspace_id": _str_ids("ws_", np.arange(n_ws)),
            "plan": pa.array(plans[rng.integers(0, 4, n_ws)]),
            "industry": pa.array(inds[rng.integers(0, 5, n_ws)]),
            "seat_count": pa.array(rng.integers(1, 300, n_ws).astype(np.int32)),
        }
    )
    n_t = users // 20
    ttab = pa.table(
        {
            "ticket_id": _str_ids("t_", np.arange(n_t)),
            "user_id": _str_ids("usr_", rng.integers(0, users, n_t)),
            "created_at": pa.array(
                np.datetime64(AS_OF, "us")
                - rng.integers(0, 60 * 86400, n_t).astype("timedelta64[s]")
            ),
            "status": pa.array(np.array(["open", "pending", "solved"])[rng.integers(0, 3, n_t)]),
            "feature": pa.array(
                np.array([f"feature_{i:03d}" for i in range(20)])[rng.integers(0, 20, n_t)]
            ),
        }
    )
    for name, tab in (("users", utab), ("workspaces", wtab), ("support_tickets", ttab)):
        db.register_arrow("_load", tab)
        db.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _load")
        db.unregister("_load")


def transforms_only(spec_raw: dict) -> dict:
    """The spec up to (and including) the quality gate."""
    keep = {"sql_transform", "data_quality"}
    stages = [
        s
        for s in spec_raw["pipeline"]["stages"]
        if s["type"] in keep or s.get("command") == "compute_user_neighbors"
    ]
    return {"pipeline": {**spec_raw["pipeline"], "stages": stages}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=72_000)
    ap.add_argument("--features", type=int, default=200)
    ap.add_argument("--events-per-user", type=int, default=420)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="Work folder (default: a temp dir).")
    ap.add_argument("--transforms-only", action="store_true", help="Skip training stages.")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "data", ignore_errors=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    counts = generate_events(
        work / "world",
        users=args.users,
        features=args.features,
        events_per_user=args.events_per_user,
        seed=args.seed,
    )
    timings["generate_s"] = time.perf_counter() - t
    print(f"generated {counts} in {timings['generate_s']:.1f}s", file=sys.stderr)

    settings = Settings.model_validate({"data_dir": str(work / "data"), "seed": args.seed})
    db = DuckDBEngine(settings.warehouse_path)
    t = time.perf_counter()
    load_warehouse(db, work / "world", args.users, args.seed)
    timings["load_s"] = time.perf_counter() - t
    print(f"loaded warehouse in {timings['load_s']:.1f}s", file=sys.stderr)

    full = load_spec("builtin:pipeline.cloudflow.json")
    raw = full.to_json_dict()
    missing = []
    for name in {full.stage(n).function_name for n in full.order()} - {None}:
        try:
            load_stage_function(str(name))
        except SpecError as exc:
            missing.append(f"{name}: {str(exc)[:200]}")
    mode = "full spec pipeline"
    if args.transforms_only or missing:
        raw = transforms_only(raw)
        mode = "SQL transforms + neighbours + quality gate only" + (
            " (stage functions missing: " + "; ".join(sorted(missing)) + ")" if missing else ""
        )
    if args.users < 60_000:  # scaled-down runs: gate at 80% of the users
        for s in raw["pipeline"]["stages"]:
            for c in s.get("checks", []):
                if c["name"] in ("interaction_matrix_coverage", "context_coverage"):
                    c["min_value"] = int(args.users * 0.8)
    spec = parse_spec(raw)
    runner = PipelineRunner(
        spec,
        settings,
        db,
        Registry(settings.data_path / "registry"),
        RunHistory.for_settings(settings),
        spec_source="builtin:pipeline.cloudflow.json",
    )
    t = time.perf_counter()
    record = runner.run(AS_OF)
    timings["pipeline_s"] = time.perf_counter() - t
    tree = render_tree(record)
    print("\n".join(tree))
    facts = db.query_rows(
        "SELECT (SELECT COUNT(*) FROM ml.user_feature_interactions) AS interaction_rows,"
        " (SELECT COUNT(DISTINCT user_id) FROM ml.user_feature_interactions) AS users,"
        " (SELECT COUNT(DISTINCT feature) FROM ml.user_feature_interactions) AS features,"
        " (SELECT COUNT(*) FROM events WHERE event_type = 'feature_used') AS feature_used_events"
    )[0]
    db.close()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "benchmark": "pipeline",
        "mode": mode,
        "status": record.status,
        "pipeline_seconds": round(timings["pipeline_s"], 2),
        "target_seconds": 300,
        "meets_target": timings["pipeline_s"] <= 300,
        "stages": {
            n: {
                "status": s.status,
                "seconds": round(s.duration_s or 0.0, 2),
                "rows": s.rows,
                "summary": s.summary,
            }
            for n, s in record.stages.items()
        },
        "data": {
            **counts,
            **facts,
            "users_generated": args.users,
            "features_generated": args.features,
        },
        "generate_seconds": round(timings["generate_s"], 2),
        "load_seconds": round(timings["load_s"], 2),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "tree": tree,
        "machine": {
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "seed": args.seed,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("mode", "status", "pipeline_seconds", "peak_rss_mb")},
            default=str,
        )
    )
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if record.status == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
