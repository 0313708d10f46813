"""Offline evaluation end to end on a tiny hand-built warehouse (time and last-k splits)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.evaluation.runner import run_evaluation
from featurerec.evaluation.split import last_k, time_split
from featurerec.models.als import ALSParams
from featurerec.models.fit import TrainConfig
from featurerec.models.toy import toy_warehouse
from featurerec.warehouse.engine import DuckDBEngine

SETTINGS = Settings.model_validate({"windows": {"min_transition_count": 1}})
FAST = TrainConfig(als_grid=(ALSParams(8, 0.1, 5, 10.0), ALSParams(4, 1.0, 5, 40.0)))


@pytest.fixture(scope="module")
def warehouse() -> DuckDBEngine:
    return toy_warehouse()


def test_time_split_holds_out_first_uses_after_the_cut(warehouse: DuckDBEngine) -> None:
    sp = time_split(SETTINGS, 7, engine=warehouse)
    cut = datetime.fromisoformat(sp.info["cut"])
    assert sp.info["test_users"] > 0
    # targets are never features used before the cut, and never excluded
    assert not (sp.test.targets & sp.test.exclude).any()
    space = {f: i for i, f in enumerate(sp.test.features)}
    firsts = warehouse.query_rows(
        "SELECT user_id, feature_category f, MIN(timestamp) t FROM events GROUP BY 1, 2"
    )
    first = {(r["user_id"], r["f"]): r["t"] for r in firsts}
    for i, u in enumerate(sp.test.users):
        for j in np.nonzero(sp.test.targets[i])[0]:
            t = first[(u.user_id, sp.test.features[j])]
            assert cut < t <= cut + timedelta(days=7)
        # training state never contains events after the cut
        for f in u.interactions:
            assert first[(u.user_id, f)] <= cut
            assert sp.test.exclude[i, space[f]]


def test_time_split_rejects_a_window_without_history(warehouse: DuckDBEngine) -> None:
    with pytest.raises(DataError, match="no feature_used events on or before the cut"):
        time_split(SETTINGS, 400, engine=warehouse)
    with pytest.raises(DataError, match="holdout_days must be > 0"):
        time_split(SETTINGS, 0, engine=warehouse)


def test_evaluation_end_to_end_beats_random(warehouse: DuckDBEngine) -> None:
    res = run_evaluation(SETTINGS, split="time", holdout_days=7, engine=warehouse, config=FAST)
    rows = res.rows
    assert {"hybrid", "sequence_aware", "popularity", "random"} <= set(rows)
    for row in rows.values():
        assert 0 <= row["ndcg@5"] <= 1 and 0 <= row["hit_rate@3"] <= 1
        assert row["users"] == res.info["test_users"]
    # the world is strongly sequential: the sequence-aware strategy must beat random
    for name in ("sequence_aware", "hybrid", "content_based"):
        assert rows[name]["ndcg@5"] > rows["random"]["ndcg@5"] + 0.2, name


def test_last_k_split(warehouse: DuckDBEngine) -> None:
    from featurerec.warehouse.transforms import build_features

    build_features(warehouse, SETTINGS)
    sp = last_k(warehouse, SETTINGS, 1)
    assert (sp.test.targets.sum(axis=1) == 1).all()
    assert not (sp.test.targets & sp.test.exclude).any()
    with pytest.raises(DataError, match="leave-last-50"):
        last_k(warehouse, SETTINGS, 50)


def test_evaluate_cli_json(tmp_path: Path) -> None:
    """`featurerec evaluate --json` on a warehouse file (the attach-read-only path)."""
    from typer.testing import CliRunner

    from featurerec.cli import app

    toy_warehouse(n_users=90, seed=2, path=str(tmp_path / "warehouse.duckdb")).close()
    cfg = tmp_path / "featurerec.toml"
    cfg.write_text("[windows]\nmin_transition_count = 1\n")
    res = CliRunner().invoke(
        app,
        [
            "--config",
            str(cfg),
            "--data-dir",
            str(tmp_path),
            "evaluate",
            "--json",
            "--holdout-days",
            "7",
            "--out",
            str(tmp_path / "eval.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("{") :])
    assert {"hybrid", "sequence_aware", "popularity", "random"} <= set(rows)
    for row in rows.values():
        assert {"ndcg@5", "hit_rate@3", "users", "coverage", "novelty"} <= set(row)
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["info"]["split"] == "time" and doc["rows"].keys() == rows.keys()
    bad = CliRunner().invoke(app, ["--data-dir", str(tmp_path / "empty"), "evaluate"])
    assert bad.exit_code != 0
