"""The LOOP commands end to end on a small warehouse file: feedback attribute, monitor,
report bias|cold-start|diversity|impact, experiment report|assign (all with --json)."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from featurerec.cli import app
from featurerec.experiments.assignment import assign
from featurerec.experiments.spec import find_experiment
from featurerec.warehouse.engine import DuckDBEngine
from test_feedback_fixtures import add_event, add_feedback, add_rec, d


@pytest.fixture
def data_dir(tmp_path, settings):
    path = tmp_path / "data"
    spec = find_experiment(settings, "rec-personalization-strategy")
    with DuckDBEngine(path / "warehouse.duckdb") as db:
        n = 0
        for i in range(40):
            u = f"usr_{i:07d}"
            add_event(db, u, "kanban_boards", d(0), first_use=True)
            for j, f in enumerate(["automations", "forms", "gantt_charts"]):
                n += 1
                add_rec(db, f"r{n}", u, f, d(1 + i * 0.01), position=j + 1,
                        experiment=spec.name, variant=assign(spec, u).name,
                        strategy="random" if i % 5 == 0 else "hybrid")  # fmt: skip
                if (i + j) % 4 == 0:
                    add_feedback(db, f"r{n}", "click", d(1.01 + i * 0.01))
            if i % 3 == 0:
                add_event(db, u, "automations", d(2), first_use=True)
    return path


def _run(data_dir, *args: str) -> dict | list:
    res = CliRunner().invoke(app, ["--data-dir", str(data_dir), *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return orjson.loads(res.stdout)


def test_loop_commands(data_dir, settings) -> None:
    spec = find_experiment(settings, "rec-personalization-strategy")
    att = _run(data_dir, "feedback", "attribute", "--json")
    assert att["total_rows"] == 120 and att["added"] == 120
    assert _run(data_dir, "feedback", "attribute", "--json")["added"] == 0
    mon = _run(data_dir, "monitor", "--json", "--no-alerts")
    names = [m["name"] for m in mon["snapshot"]["metrics"]]
    assert names[:3] == ["click_through_rate", "feature_adoption_after_rec", "time_to_first_use"]
    bias = _run(data_dir, "report", "bias", "--json", "--days", "30")
    assert {r["feature"] for r in bias["rows"]} >= {"automations", "kanban_boards"}
    cs = _run(data_dir, "report", "cold-start", "--json")
    assert cs["rows"] and cs["rows"][0]["random_recommendations"] > 0
    div = _run(data_dir, "report", "diversity", "--json")
    assert div["users"] == 40
    imp = _run(data_dir, "report", "impact", "--json", "--experiment",
               "rec-personalization-strategy")  # fmt: skip
    assert imp["mode"] == "experiment" and imp["groups"][0] == "hybrid"
    rep = _run(data_dir, "experiment", "report", "rec-personalization-strategy", "--json")
    assert rep["enough_data"] is False and rep["message"].startswith("not enough data yet")
    assert sum(v["users"] for v in rep["variants"]) == 40
    who = _run(data_dir, "experiment", "assign", "rec-personalization-strategy", "usr_0000001",
               "--json")  # fmt: skip
    assert who[0]["variant"] == assign(spec, "usr_0000001").name
