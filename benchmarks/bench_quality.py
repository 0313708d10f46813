"""Offline quality on the default CloudFlow world, over several seeds.

One seed of the default world (5,000 users, 60 days) holds out only ~150-180 users who
adopt a feature in the test week, so a single run's difference between two strategies is
within noise (a paired bootstrap interval of +-0.02 ndcg@5 or so). This benchmark runs the
same default world configuration with ``--seeds`` different seeds (each: ``featurerec
simulate`` -> ``featurerec ingest files`` -> ``featurerec evaluate --world --json --out``,
exactly the README commands) and reports, per strategy:

- every seed's ndcg@5 and hit_rate@3, and the per-seed difference to popularity;
- the pooled figures over all test users of all seeds, with a paired bootstrap 95%
  interval of the difference to popularity (resampling users within each seed);
- the share of the popularity-to-oracle gap each strategy closes (pooled).

Nothing is tuned per seed: every seed is trained and evaluated by the same command.

Run: ``.venv/bin/python benchmarks/bench_quality.py [--seeds 10] [--users 5000]``
(about 25 s per seed). Writes ``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

OUT = Path(__file__).parent / "results" / "quality.json"
BIN = Path(sys.executable).parent / "featurerec"
STRATEGIES = ("hybrid", "sequence_aware", "content_based", "collaborative_only", "popularity")
METRICS = ("ndcg@5", "hit_rate@3")


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def one_seed(seed: int, users: int, days: int, work: Path) -> dict:
    d = work / f"seed{seed}"
    shutil.rmtree(d, ignore_errors=True)
    world, data, out = d / "world", d / "data", d / "eval.json"
    run(
        [
            str(BIN), "simulate", "--users", str(users), "--days", str(days),
            "--seed", str(seed), "--out", str(world), "--no-calibration",
        ]
    )  # fmt: skip
    run([str(BIN), "--data-dir", str(data), "ingest", "files", str(world)])
    run(
        [
            str(BIN), "--data-dir", str(data), "evaluate", "--world", str(world),
            "--json", "--out", str(out),
        ]
    )  # fmt: skip
    doc = json.loads(out.read_text())
    shutil.rmtree(d, ignore_errors=True)
    return doc


def pooled(docs: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Pooled means over every seed's test users and paired bootstrap intervals of the
    difference to popularity (users resampled within each seed)."""
    rng = np.random.default_rng(seed)
    names = [s for s in (*STRATEGIES, "oracle") if all(s in d["per_user"] for d in docs)]
    out: dict = {}
    sizes = [len(d["per_user"]["popularity"]["ndcg@5"]) for d in docs]
    idx = [rng.integers(0, n, size=(n_boot, n)) for n in sizes]
    for name in names:
        row: dict = {}
        for m in METRICS:
            vals = [np.asarray(d["per_user"][name][m]) for d in docs]
            base = [np.asarray(d["per_user"]["popularity"][m]) for d in docs]
            diff = [v - b for v, b in zip(vals, base, strict=True)]
            total = sum(sizes)
            boots = sum(dd[i].sum(axis=1) for dd, i in zip(diff, idx, strict=True)) / total
            lo, hi = np.percentile(boots, [2.5, 97.5])
            row[m] = float(np.concatenate(vals).mean())
            row[f"{m} vs popularity"] = [float(np.concatenate(diff).mean()), float(lo), float(hi)]
        out[name] = row
    if "oracle" in out:
        for m in METRICS:
            lo, hi = out["popularity"][m], out["oracle"][m]
            for row in out.values():
                row[f"gap_closed[{m}]"] = (row[m] - lo) / (hi - lo) if hi > lo else float("nan")
    out["users"] = sum(sizes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--work", type=Path, default=Path("/tmp/featurerec-bench-quality"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    t0 = time.time()
    load_before = os.getloadavg()
    docs = []
    per_seed = []
    for s in range(args.seeds):
        doc = one_seed(s, args.users, args.days, args.work)
        docs.append(doc)
        rows = doc["rows"]
        entry = {"seed": s, "test_users": doc["info"]["test_users"]}
        for name in (*STRATEGIES, "oracle"):
            if name in rows:
                entry[name] = {m: round(rows[name][m], 4) for m in METRICS}
        entry["blend_weights"] = doc["info"].get("blend_weights")
        entry["transition_gate"] = doc["info"].get("transition_gate")
        per_seed.append(entry)
        h, p = rows["hybrid"], rows["popularity"]
        print(
            f"seed {s}: {entry['test_users']} test users; hybrid ndcg@5 {h['ndcg@5']:.3f} "
            f"hit@3 {h['hit_rate@3']:.3f} | popularity {p['ndcg@5']:.3f} "
            f"{p['hit_rate@3']:.3f} | oracle {rows['oracle']['ndcg@5']:.3f} "
            f"({time.time() - t0:.0f} s)",
            flush=True,
        )
    pool = pooled(docs)
    wins = {
        name: {
            m: sum(e[name][m] > e["popularity"][m] for e in per_seed if name in e) for m in METRICS
        }
        for name in STRATEGIES
        if name != "popularity"
    }
    res = {
        "benchmark": "quality",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "python": platform.python_version(),
        },
        "config": {"seeds": args.seeds, "users": args.users, "days": args.days},
        "seconds": round(time.time() - t0, 1),
        "pooled": pool,
        "seeds_beating_popularity": wins,
        "transition_kept_seeds": sum(
            bool((e.get("transition_gate") or {}).get("kept")) for e in per_seed
        ),
        "per_seed": per_seed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    for name in (*STRATEGIES, "oracle"):
        if name in pool:
            r = pool[name]
            print(
                f"{name:>20}: ndcg@5 {r['ndcg@5']:.4f} (vs pop {r['ndcg@5 vs popularity'][0]:+.4f} "
                f"[{r['ndcg@5 vs popularity'][1]:+.4f}, {r['ndcg@5 vs popularity'][2]:+.4f}]) "
                f"hit@3 {r['hit_rate@3']:.4f} (vs pop {r['hit_rate@3 vs popularity'][0]:+.4f} "
                f"[{r['hit_rate@3 vs popularity'][1]:+.4f}, {r['hit_rate@3 vs popularity'][2]:+.4f}])"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
