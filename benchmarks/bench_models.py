"""Model benchmark: training time of each model and scoring throughput at the spec's scale.

Data: :func:`featurerec.models.toy.toy_training_data` with ~72k users (spec: 72,400) and 12
features, so the benchmark needs no warehouse. Measures fit time per model, the whole
``train_bundle`` (search + warm start + refit), batch scoring throughput per strategy over
all users, single-request latency (batch of one, what serving does), and HNSW build/search
at 2,000 items. Writes ``benchmarks/results/models.json`` with machine facts.

Run: ``.venv/bin/python benchmarks/bench_models.py [--users N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from featurerec.models.als import ALSParams, ALSScorer
from featurerec.models.baselines import PopularityScorer
from featurerec.models.context import ContextScorer
from featurerec.models.fit import TrainConfig, train_bundle
from featurerec.models.index import ExactIndex, build_index
from featurerec.models.sequence import SequenceScorer
from featurerec.models.toy import toy_training_data

OUT = Path(__file__).parent / "results" / "models.json"


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=72_400)
    ap.add_argument("--features", type=int, default=12)
    args = ap.parse_args()
    load_before = os.getloadavg()
    data, t_data = timed(lambda: toy_training_data(args.users, args.features, seed=0))
    res: dict = {
        "users": args.users,
        "features": args.features,
        "interactions": int(data.matrix.nnz),
        "data_generation_s": round(t_data, 2),
        "fit_s": {},
        "batch_scoring": {},
        "single_request_ms": {},
    }
    for name, make in (
        ("als_spec_defaults", lambda: ALSScorer(ALSParams())),
        ("context", ContextScorer),
        ("sequence", SequenceScorer),
        ("popularity", PopularityScorer),
    ):
        _, t = timed(lambda make=make: make().fit(data))
        res["fit_s"][name] = round(t, 2)
        print(f"fit {name}: {t:.2f}s", flush=True)
    (bundle, report), t = timed(lambda: train_bundle(data, TrainConfig()))
    res["fit_s"]["train_bundle_total"] = round(t, 2)
    res["train_bundle"] = {
        "als_params": report.als_params,
        "search_settings": len(report.search),
        "warm_start_rows": report.warm_start_rows,
    }
    print(f"train_bundle: {t:.2f}s", flush=True)
    states = data.user_states()
    for name in bundle.available():
        strat = bundle.strategy(name)
        rng = np.random.default_rng(0)
        # chunks of 8k users, as evaluation and batch jobs do
        t0 = time.perf_counter()
        for i in range(0, len(states), 8192):
            chunk = states[i : i + 8192]
            strat.recommend(chunk, k=3, rng=rng, explore=True)
        t = time.perf_counter() - t0
        res["batch_scoring"][name] = {
            "seconds": round(t, 2),
            "users_per_s": round(len(states) / t),
        }
        lat = []
        for u in states[:300]:
            t1 = time.perf_counter()
            strat.recommend([u], k=3, rng=rng, explore=True)
            lat.append((time.perf_counter() - t1) * 1000)
        res["single_request_ms"][name] = {
            "p50": round(float(np.percentile(lat, 50)), 3),
            "p99": round(float(np.percentile(lat, 99)), 3),
        }
        print(name, res["batch_scoring"][name], res["single_request_ms"][name], flush=True)
    rng = np.random.default_rng(0)
    items = rng.normal(size=(2000, 64)).astype(np.float32)
    names = [str(i) for i in range(2000)]
    idx, t_build = timed(lambda: build_index(items, names, kind="hnsw"))
    q = rng.normal(size=(10_000, 64)).astype(np.float32)
    (ids, _), t_h = timed(lambda: idx.search(q, 20))
    exact = ExactIndex(items, names)
    (e_ids, _), t_e = timed(lambda: exact.search(q, 20))
    recall = np.mean(
        [len(set(a) & set(b)) / 20 for a, b in zip(ids.tolist(), e_ids.tolist(), strict=True)]
    )
    res["index_2000_items_64d"] = {
        "hnsw_build_s": round(t_build, 3),
        "hnsw_search_10k_queries_s": round(t_h, 3),
        "exact_search_10k_queries_s": round(t_e, 3),
        "recall@20": round(float(recall), 4),
    }
    res["machine"] = {
        "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": "shared 2-core machine; other engineers' jobs may run concurrently",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
