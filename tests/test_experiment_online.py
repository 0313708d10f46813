"""The simulated online experiment end to end on a tiny world: real ingestion, pipeline,
serving (with the experiment's assignment), responses, attribution, report and OPE."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.experiments.assignment import assign
from featurerec.experiments.rounds import SHOWINGS
from featurerec.experiments.spec import find_experiment
from featurerec.simulate.online import OnlineConfig, OnlineExperiment, result_tables
from featurerec.warehouse.engine import DuckDBEngine


@pytest.mark.slow
def test_online_experiment_runs_through_the_real_stack(tmp_path) -> None:
    settings = Settings.model_validate({"data_dir": str(tmp_path / "base")})
    spec = find_experiment(settings, "rec-personalization-strategy")
    cfg = OnlineConfig(
        users=2500, history_days=20, warmup_days=3, weeks=2 / 7, retrain_every_days=7, seed=3,
        ope_burn_in_days=1,
    )  # fmt: skip
    exp = OnlineExperiment(spec, cfg, tmp_path / "run", settings)
    result = exp.run()
    # OPE evaluated the models retrained when its log started (after the 1-day burn-in),
    # not the ones served from the warm-up's end, which learned from that log
    assert result.counts["retrains"] == 3  # setup, the OPE log's start, the warm-up's end
    assert exp.ope_model is not None and exp.ope_model.version != exp.model.version

    assert result.counts["requests"] > 100
    assert result.counts["recommendations"] >= result.counts["clicks"] > 0
    assert {v.name for v in result.report.variants} == set(spec.variant_names)
    assert sum(v.users for v in result.report.variants) > 100
    assert not result.report.enough_data  # 2,500 users: far below 5,000 per variant

    with DuckDBEngine(tmp_path / "run" / "data" / "warehouse.duckdb", read_only=True) as db:
        rows = db.query_rows(
            "SELECT user_id, variant, strategy, propensity, placement FROM ml.recommendation_log "
            "WHERE experiment = $e",
            {"e": spec.name},
        )
        assert rows
        for r in rows[:300]:  # serving used the published deterministic assignment
            assert r["variant"] == assign(spec, r["user_id"]).name
            assert 0 < r["propensity"] <= 1
            assert r["placement"] == "sidebar_panel"
        # the warm-up (the OPE log) was served by the mixture logging policy: the variants'
        # strategies and uniform random, each request logged with the mixture's propensity
        # (the service's own propensity of the strategy that served was checked against
        # the reconstruction on every served item)
        warm = db.query_rows(
            "SELECT strategy, propensity, request_id, generated_at FROM ml.recommendation_log "
            "WHERE experiment IS NULL AND generated_at < $s",
            {"s": exp.experiment_start},
        )
        assert {r["strategy"] for r in warm} >= {"random", "content_based", "collaborative_only"}
        assert all(0 < r["propensity"] <= 1 for r in warm)
        assert result.counts["logging_propensity_mismatch"] == 0
        assert all(r["request_id"].startswith(f"sim{cfg.seed}-d") for r in warm)  # no uuid4
        # OPE reads the warm-up log after the burn-in, the rounds uniform random served
        # included (all but the last warm-up day's, whose responses come the next day)
        first_day = exp.warmup_start + timedelta(days=1)
        last_day = exp.experiment_start - timedelta(days=1)
        window = [r for r in warm if first_day <= r["generated_at"] < last_day]
        n_ope = len(window)
        assert n_ope > sum(r["strategy"] != "random" for r in window) > 0
        ctr_rows = [o for o in result.ope if o.metric == "click_through_rate"]
        assert ctr_rows and all(o.n_logged == n_ope for o in ctr_rows)
        clicks = db.scalar("SELECT COUNT(*) FROM ml.recommendation_events WHERE kind = 'click'")
        assert clicks == result.counts["clicks"]
        fb = db.scalar("SELECT COUNT(*) FROM ml.recommendation_feedback")
        assert fb == db.scalar("SELECT COUNT(*) FROM ml.recommendation_log")
        # churn during the run reached the workspaces table (as a CDC feed would)
        history_end_us = cfg.history_days * 86_400_000_000
        expected = sum(int((sim.ws_churn_ts >= history_end_us).sum()) for sim in exp.ws.sims)
        got = db.scalar(
            "SELECT COUNT(*) FROM workspaces WHERE churned_at >= $t",
            {"t": exp._dt(history_end_us)},
        )
        assert got == expected
        # the day's simulated events went through the Ingestor
        assert db.scalar("SELECT COUNT(*) FROM ingest_batches WHERE source = 'simulate'") >= 1

    tables = result_tables(result)
    assert [r["variant"] for r in tables["strategy"]] == spec.variant_names
    ctr = {r["variant"]: r["metric"] for r in tables["ope_vs_online"]}
    assert set(ctr) == set(spec.variant_names)
    est = [o for o in result.ope if o.metric == "click_through_rate" and o.estimate is not None]
    # IPS and SNIPS stay in [0, 1] by construction; DR's correction term can leave it
    # (380 logged rounds here), so only finiteness is asserted for DR
    assert est and all(0 <= o.estimate <= 1 for o in est if o.estimator != "dr")
    assert all(math.isfinite(o.estimate) for o in est if o.estimator == "dr")
    # each estimate twice: replayed with the variant's own exposure (the headline) and
    # one-step on the log's eligibility; on the same rounds
    assert {o.exposure for o in est} == {"own", "logged"}
    assert len({(o.exposure, o.variant, o.estimator) for o in est}) == len(est)
    assert all(o.unsupported_mass == 0 for o in est if o.exposure == "logged")
    # no retrain during this 2-day run: the frozen policy's window is the whole run
    for o in est:
        assert o.frozen_online == pytest.approx(o.online)
        assert o.inside_frozen_ci == o.inside_online_ci
        assert o.consistent_frozen == o.consistent_online
    # 7-day adoption: no window closes in a 3-day warm-up, so OPE says so instead of
    # estimating from open windows
    adoption = [o for o in result.ope if o.metric == "rec_adoption_7d"]
    assert adoption and all(o.estimate is None and "complete" in o.note for o in adoption)
    # OPE by exposure: per variant, the first / second / third+ showing strata, whose shares
    # add up on both sides; the online strata recombine exactly to the whole-run rate (a
    # ratio of sums), and the remixed OPE, where every stratum the run has is in the log,
    # is the strata's estimates at the online shares
    by = {(o.variant, o.stratum): o for o in result.ope_by_exposure
          if o.metric == "click_through_rate"}  # fmt: skip
    assert {v for v, _ in by} == set(spec.variant_names)
    whole = {o.variant: o.online for o in est}
    for v in spec.variant_names:
        rows = [by[(v, s)] for s in SHOWINGS]
        assert sum(o.log_share for o in rows) == pytest.approx(1.0)
        assert sum(o.online_share for o in rows) == pytest.approx(1.0)
        assert rows[0].estimate is not None and 0 < rows[0].online_share < 1
        on = sum(o.online_share * o.online for o in rows if o.online is not None)
        assert on == pytest.approx(whole[v])
        mixed = by.get((v, "remixed"))
        if mixed is not None:
            assert mixed.online == pytest.approx(whole[v])
            want = sum(o.online_share * o.estimate for o in rows if o.online_share > 0)
            assert mixed.estimate == pytest.approx(want)
        else:  # a stratum the run has got no support in the short log
            assert any(o.estimate is None and o.online_share > 0 for o in rows)
    assert {r["showing"] for r in tables["ope_by_exposure"]} >= set(SHOWINGS)


def test_config_errors_are_named() -> None:
    with pytest.raises(DataError, match="ope_burn_in_days"):
        OnlineConfig(ope_burn_in_days=-1)
    with pytest.raises(DataError, match="default placement must be one of"):
        OnlineConfig(default_placement="billboard")
    with pytest.raises(DataError, match="holdout_share"):
        OnlineConfig(holdout_share=0.9)


@pytest.mark.slow
def test_simulate_experiment_cli_prints_the_tables_and_shares(tmp_path) -> None:
    """`featurerec simulate experiment` on a tiny world: the spec's tables, OPE vs online
    (whole run and by exposure) and the shares of OPE estimates inside the online interval;
    `--json` gives the same shares to scripts."""
    from typer.testing import CliRunner

    from featurerec.cli import app

    args = ["--data-dir", str(tmp_path), "simulate", "experiment", "rec-personalization-strategy",
            "--users", "2500", "--history-days", "20", "--warmup-days", "3", "--burn-in", "0",
            "--weeks", "0.3", "--seed", "3"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for title in ("strategy", "placement", "ope vs online", "ope by exposure"):
        assert title in res.output
    assert "OPE estimates inside the online 95% interval (whole run):" in res.output
    assert "one-step OPE on the log's exposure" in res.output
    assert "OPE estimates inside the online 95% interval, first showings:" in res.output
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert 0 <= out["ope_inside_share"] <= 1
    assert {r["showing"] for r in out["tables"]["ope_by_exposure"]} >= set(SHOWINGS)
