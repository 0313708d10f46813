"""Off-policy evaluation benchmark: a candidate replayed on a logged deployment at 10,000
features, through :func:`featurerec.experiments.offline.evaluate` (what
``featurerec experiment ope`` runs after loading the log).

Data: :func:`featurerec.models.toy.toy_training_data` (``--users`` x ``--features``), a bundle
trained on it, and a synthetic log of ``--requests`` requests: each request's user, an
eligibility list (the user's adopted features plus a random fifth of the catalog excluded),
three slots each drawn from the logging strategy's per-slot slate distribution with
exploration 0.1 (propensity = that probability), clicks from a per-feature rate. The
candidate is a different strategy. Measures the wall time of ``evaluate`` and the peak
memory it allocates (tracemalloc, which numpy reports to), next to the size the dense
(requests x items x slots) distribution would take, on the log's eligibility (one-step) and
replayed with the candidate's own exposure (requests spread over 14 days, 30% of the
logged items dismissed). Writes ``benchmarks/results/ope.json``.

Run: ``.venv/bin/python benchmarks/bench_ope.py [--features N] [--requests N]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from _machine import machine_facts  # benchmarks/_machine.py
from featurerec.experiments.offline import (
    CandidateEstimate,
    LoggedDecisions,
    SelfExposure,
    evaluate,
    target_slate_dist,
)
from featurerec.experiments.rounds import Rounds
from featurerec.models.als import ALSParams
from featurerec.models.fit import TrainConfig, train_bundle
from featurerec.models.toy import toy_training_data
from featurerec.serving.eligibility import EligibilityRules
from featurerec.serving.loader import BundleModel
from featurerec.serving.state import epoch_seconds

OUT = Path(__file__).parent / "results" / "ope.json"
K, TOP_K, EPS = 3, 20, 0.1


def synthetic_log(model: BundleModel, states: list, n_requests: int, seed: int) -> LoggedDecisions:
    """Requests served by ``sequence_aware`` with exploration (see the module doc)."""
    rng = np.random.default_rng(seed)
    n_items = len(model.features)
    findex = {f: j for j, f in enumerate(model.features)}
    users = [states[i] for i in rng.integers(0, len(states), n_requests).tolist()]
    listed = []
    for u in users:
        out = {findex[f] for f in u.interactions if f in findex}
        out |= set(rng.choice(n_items, n_items // 5, replace=False).tolist())
        listed.append(np.array(sorted(out), dtype=np.int64))
    listed_eligible = np.zeros(n_requests, dtype=bool)
    click_p = rng.uniform(0.01, 0.1, n_items)
    request, action, position, pscore = [], [], [], []
    step = 512
    for r0 in range(0, n_requests, step):
        req = np.arange(r0, min(r0 + step, n_requests))
        exclude = np.zeros((req.size, n_items), dtype=bool)
        for row, q in enumerate(req.tolist()):
            exclude[row, listed[q]] = True
        dist = target_slate_dist(
            model, "sequence_aware", [users[q] for q in req.tolist()], exclude, K, TOP_K, EPS
        )
        for row, q in enumerate(req.tolist()):
            for p in range(K):
                probs = dist[row, :, p]
                total = probs.sum()
                if total <= 0:
                    continue
                j = int(rng.choice(n_items, p=probs / total))
                request.append(q)
                action.append(j)
                position.append(p)
                pscore.append(float(probs[j]))
    n = len(action)
    a = np.asarray(action, dtype=np.int64)
    t0 = datetime(2026, 3, 1)
    # requests spread over 14 days, in time order (the own-exposure replay walks them)
    offsets = np.sort(rng.uniform(0, 14 * 86_400, n_requests))
    req = np.asarray(request, dtype=np.int64)
    rounds = Rounds(
        recommendation_id=np.array([f"r{i}" for i in range(n)], dtype=object),
        user_id=np.array([users[q].user_id for q in request], dtype=object),
        variant=np.array([""] * n, dtype=object),
        generated_at=np.datetime64(t0, "us") + (offsets[req] * 1e6).astype("timedelta64[us]"),
        clicked=(rng.random(n) < click_p[a]).astype(np.int64),
        adopted_7d=(rng.random(n) < click_p[a] / 2).astype(np.int64),
        as_of=t0 + timedelta(days=22),
        showing=np.ones(n, dtype=np.int64),
        dismissed=(rng.random(n) < 0.3).astype(np.int64),
    )
    return LoggedDecisions(
        rounds,
        np.asarray(request, dtype=np.int64),
        a,
        np.asarray(position, dtype=np.int64),
        np.asarray(pscore),
        users,
        listed,
        listed_eligible,
        list(model.features),
        times=epoch_seconds(t0) + offsets,
        exposure_listed=[np.zeros(0, dtype=np.int64) for _ in range(n_requests)],
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=3_000)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--candidate", default="collaborative_only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    load_before = os.getloadavg()

    t = time.perf_counter()
    data = toy_training_data(n_users=args.users, n_features=args.features, seed=args.seed)
    params = ALSParams(factors=16, iterations=5)
    bundle, _ = train_bundle(data, TrainConfig(als_params=params, als_grid=(params,), seed=0))
    model = BundleModel(bundle, "bench")
    train_s = time.perf_counter() - t
    print(f"trained on {args.users} users x {args.features} features in {train_s:.1f}s", flush=True)

    t = time.perf_counter()
    log = synthetic_log(model, data.user_states(), args.requests, args.seed)
    log_s = time.perf_counter() - t
    print(f"logged {log.n} rounds in {args.requests} requests in {log_s:.1f}s", flush=True)

    def dist_fn(req: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        users = [log.users[q] for q in req.tolist()]
        return target_slate_dist(model, args.candidate, users, exclude, K, TOP_K, EPS)

    def timed(replay: SelfExposure | None) -> tuple[CandidateEstimate, float, int]:
        tracemalloc.start()
        t = time.perf_counter()
        res = evaluate(log, dist_fn, k=K, self_exposure=replay)
        seconds = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        ctr = res["click_through_rate"]
        assert not isinstance(ctr, str)
        print(f"evaluated ({'own' if replay else 'logged'} exposure) in {seconds:.1f}s",
              flush=True)  # fmt: skip
        return ctr, seconds, peak

    ctr, eval_s, peak = timed(None)
    own, own_s, own_peak = timed(SelfExposure(EligibilityRules(), EPS))
    dense_bytes = args.requests * args.features * K * 8
    out = {
        "benchmark": "ope",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(load_before),
        "config": vars(args),
        "rounds": log.n,
        "train_seconds": round(train_s, 1),
        "log_seconds": round(log_s, 1),
        "evaluate_seconds": round(eval_s, 2),
        "rounds_per_second": round(log.n / eval_s),
        "evaluate_peak_mib": round(peak / 2**20, 1),
        "dense_distribution_mib": round(dense_bytes / 2**20, 1),
        "ctr": {
            "logged": ctr.logged.value,
            **{name: [e.value, e.ci_low, e.ci_high] for name, e in ctr.estimates.items()},
            "effective_sample_size": ctr.estimates["snips"].effective_sample_size,
        },
        # the same candidate replayed with its own exposure (featurerec experiment ope's
        # default): each user's requests in time order, serving's exposure rules on the
        # candidate's drawn slates
        "own_exposure": {
            "evaluate_seconds": round(own_s, 2),
            "rounds_per_second": round(log.n / own_s),
            "evaluate_peak_mib": round(own_peak / 2**20, 1),
            "unsupported_mass": own.unsupported_mass,
            "ctr": {name: [e.value, e.ci_low, e.ci_high] for name, e in own.estimates.items()},
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
