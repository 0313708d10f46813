"""``featurerec evaluate`` end to end: split, train every model on the training side with
the pipeline's own training procedure (:func:`featurerec.models.fit.train_bundle`), rank
for the test users, score, and add the oracle when a simulated world is given."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurerec.evaluation.metrics import item_similarity
from featurerec.evaluation.offline import evaluate
from featurerec.evaluation.oracle import oracle_scores
from featurerec.evaluation.split import Split, last_k, time_split
from featurerec.models.fit import TrainConfig, train_bundle


@dataclass
class EvaluationResult:
    rows: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    #: strategy -> metric -> one value per test user (same order for every strategy)
    per_user: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def run_evaluation(
    settings: Any,
    *,
    split: str = "time",
    holdout_days: int = 7,
    k: int = 1,
    world: Path | None = None,
    engine: Any = None,
    config: TrainConfig | None = None,
    progress: Any = None,
) -> EvaluationResult:
    """Evaluate every strategy (plus the oracle when ``world`` is given)."""
    t0 = time.perf_counter()
    config = config or TrainConfig(
        cold_start_max_events=settings.windows.cold_start_max_events, seed=settings.seed
    )
    if split == "time":
        sp: Split = time_split(settings, holdout_days, engine=engine)
    elif split in ("last-k", "last_k"):
        if engine is None:
            from featurerec.warehouse.engine import open_warehouse

            with open_warehouse(settings, read_only=True) as eng:
                sp = last_k(eng, settings, k)
        else:
            sp = last_k(engine, settings, k)
    else:
        from featurerec.errors import DataError

        raise DataError(f"unknown split {split!r}: use time or last-k")
    t_split = time.perf_counter() - t0
    bundle, report = train_bundle(sp.train, config, progress)
    t_train = time.perf_counter() - t0 - t_split
    extra = {}
    if world is not None:
        from datetime import datetime

        cut = datetime.fromisoformat(sp.info["cut"]) if "cut" in sp.info else None
        extra.update(
            oracle_scores(
                world,
                [u.user_id for u in sp.test.users],
                sp.test.features,
                as_of=cut,
                horizon_days=float(sp.info.get("holdout_days", 7)),
            )
        )
    per_user: dict[str, dict[str, list[float]]] = {}
    rows = evaluate(
        bundle,
        sp.test,
        extra=extra,
        similarity=item_similarity(sp.train.matrix),
        seed=settings.seed,
        per_user=per_user,
    )
    info = {
        **sp.info,
        "als_params": report.als_params,
        "als_search": report.search,
        "blend_weights": report.blend_weights,
        "blend_validation": report.blend_validation,
        "blend_cv": report.blend_cv,
        "transition_gate": report.transition_gate,
        "bandit_shrinkage": report.arm_precision,
        "bandit_shrinkage_search": report.arm_precision_search,
        "warm_start_rows": report.warm_start_rows,
        "seconds": {
            "split_and_features": round(t_split, 2),
            "training": round(t_train, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
    return EvaluationResult(rows, info, per_user)
