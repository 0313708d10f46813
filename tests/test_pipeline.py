"""Pipeline runner, spec validation, quality gates, promotion, history, resume, schedule, CLI.

Training/evaluation stages are fakes registered here (the real ones belong to MODELS/SERVE),
so these tests pin the runner's behaviour, not the models'.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from featurerec.config import Settings
from featurerec.errors import ModelError, SpecError
from featurerec.events.schema import EVENT_ARROW_SCHEMA
from featurerec.pipeline import contracts
from featurerec.pipeline.contracts import StageContext, StageResult
from featurerec.pipeline.history import RunHistory
from featurerec.pipeline.runner import PipelineRunner, load_stage_function
from featurerec.pipeline.schedule import next_fire, run_schedule
from featurerec.pipeline.spec import load_spec, parse_spec
from featurerec.pipeline.tree import fmt_duration, render_tree
from featurerec.registry import Registry
from featurerec.warehouse.engine import DuckDBEngine

FEATURES = [f"feat_{i}" for i in range(8)]


# -- a tiny world ---------------------------------------------------------------------------
def tiny_world(db: DuckDBEngine, n_users: int = 60, seed: int = 3) -> datetime:
    """Random sessions of feature_used events over 20 days; returns the last timestamp."""
    rng = np.random.default_rng(seed)
    start = datetime(2026, 2, 10)
    rows: dict[str, list[Any]] = {n: [] for n in EVENT_ARROW_SCHEMA.names}
    eid = 0
    for u in range(n_users):
        for s in range(3):
            t = start + timedelta(days=int(rng.integers(0, 20)), minutes=int(rng.integers(0, 600)))
            for k in range(int(rng.integers(2, 7))):
                eid += 1
                rec = dict.fromkeys(EVENT_ARROW_SCHEMA.names)
                rec.update(
                    event_id=f"e{eid}",
                    user_id=f"u{u}",
                    workspace_id=f"w{u % 5}",
                    event_type="feature_used",
                    timestamp=t + timedelta(minutes=k),
                    feature_category=FEATURES[int(rng.integers(0, len(FEATURES)))],
                    session_id=f"u{u}s{s}",
                    session_sequence=k,
                )
                for n in EVENT_ARROW_SCHEMA.names:
                    rows[n].append(rec[n])
    db.register_arrow("_ev", pa.Table.from_pydict(rows, schema=EVENT_ARROW_SCHEMA))
    db.execute("INSERT INTO events BY NAME SELECT * FROM _ev")
    db.unregister("_ev")
    for u in range(n_users):
        db.execute(
            "INSERT INTO users (user_id, workspace_id, role, signup_date) VALUES ($u, $w, 'pm', DATE '2026-01-01')",
            {"u": f"u{u}", "w": f"w{u % 5}"},
        )
    for w in range(5):
        db.execute(
            "INSERT INTO workspaces (workspace_id, plan, seat_count) VALUES ($w, 'pro', $s)",
            {"w": f"w{w}", "s": 3 + 10 * w},
        )
    return max(rows["timestamp"])


# -- fake stage functions -------------------------------------------------------------------
class Fakes:
    """Stage functions registered for one test, with call logs and knobs."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.eval_metrics: dict[str, float] = {
            "ndcg@5": 0.41,
            "hit_rate@3": 0.47,
            "diversity_score": 0.72,
        }
        self.fail_times: dict[str, int] = {}
        self.sleep: dict[str, float] = {}
        self.contexts: dict[str, StageContext] = {}
        self.lock = threading.Lock()

    def make(self, name: str, *, artifact: bool = True):
        def fn(ctx: StageContext) -> StageResult:
            with self.lock:
                self.calls.append(name)
                self.contexts[name] = ctx
                left = self.fail_times.get(name, 0)
                if left:
                    self.fail_times[name] = left - 1
            if left:
                raise RuntimeError(f"{name} exploded")
            if name in self.sleep:
                time.sleep(self.sleep[name])
            ctx.progress(1, 2, "half way")
            if name == "fake_eval":
                return StageResult(metrics=dict(self.eval_metrics))
            if not artifact:
                return StageResult(rows=7, summary="7 things")
            (ctx.work_dir / "weights.bin").write_bytes(json.dumps(ctx.params).encode())
            n = ctx.engine.query_rows("SELECT COUNT(*) AS n FROM ml.user_feature_interactions")[0][
                "n"
            ]
            return StageResult(artifact_dir=ctx.work_dir, metrics={"train_rows": float(n)}, rows=n)

        return fn


@pytest.fixture
def fakes(monkeypatch) -> Fakes:
    f = Fakes()
    for name in ("fake_mf", "fake_bandit", "fake_index", "fake_eval", "fake_export"):
        monkeypatch.setitem(contracts.STAGE_FUNCTIONS, name, f.make(name))
    monkeypatch.setitem(
        contracts.STAGE_FUNCTIONS, "fake_noart", f.make("fake_noart", artifact=False)
    )
    return f


def spec_dict(users: int = 50, features: int = 8) -> dict[str, Any]:
    """The spec's pipeline shape with fake trainers and tiny thresholds."""
    return {
        "pipeline": {
            "name": "test-pipeline",
            "schedule": "0 4 * * *",
            "retry_delay_seconds": 0,
            "stages": [
                {"name": "build_interaction_matrix", "type": "sql_transform",
                 "query_ref": "interaction_matrix_v2.sql",
                 "output_table": "ml.user_feature_interactions", "timeout_minutes": 5},
                {"name": "compute_transition_probs", "type": "sql_transform",
                 "depends_on": ["build_interaction_matrix"], "query_ref": "feature_transitions.sql",
                 "output_table": "ml.feature_transition_probs", "params": {"min_count": 1}},
                {"name": "build_context_vectors", "type": "sql_transform",
                 "depends_on": ["build_interaction_matrix"], "query_ref": "user_context_vectors.sql",
                 "output_table": "ml.user_context_vectors"},
                {"name": "compute_user_neighbors", "type": "custom",
                 "depends_on": ["build_interaction_matrix"], "command": "compute_user_neighbors"},
                {"name": "quality_gate", "type": "data_quality",
                 "depends_on": ["compute_transition_probs", "build_context_vectors",
                                "compute_user_neighbors"],
                 "checks": [
                     {"name": "interaction_matrix_coverage", "type": "custom_sql",
                      "query": "SELECT COUNT(DISTINCT user_id) FROM ml.user_feature_interactions",
                      "min_value": users, "severity": "critical", "unit": "users"},
                     {"name": "feature_coverage", "type": "custom_sql",
                      "query": "SELECT COUNT(DISTINCT feature) FROM ml.user_feature_interactions",
                      "min_value": features, "severity": "critical", "unit": "features"},
                     {"name": "lots_of_users", "type": "custom_sql",
                      "query": "SELECT COUNT(*) FROM ml.user_context_vectors",
                      "min_value": 1000000, "severity": "warning"},
                 ]},
                {"name": "train_matrix_factorization", "type": "model_training",
                 "depends_on": ["quality_gate"], "model_type": "fake_mf",
                 "hyperparameters": {"factors": 64}, "output": "models:/feature-recommender-mf/staging"},
                {"name": "train_contextual_bandit", "type": "model_training",
                 "depends_on": ["quality_gate"], "model_type": "fake_bandit",
                 "hyperparameters": {"exploration_rate": 0.1},
                 "output": "models:/feature-recommender-bandit/staging"},
                {"name": "rebuild_ann_index", "type": "custom",
                 "depends_on": ["train_matrix_factorization"], "command": "fake_index",
                 "config": {"M": 16}, "output": "indexes:/feature-recommender-hnsw/staging"},
                {"name": "evaluate_and_promote", "type": "model_evaluation",
                 "depends_on": ["train_matrix_factorization", "train_contextual_bandit"],
                 "command": "fake_eval", "metrics": ["ndcg@5", "hit_rate@3", "diversity_score"],
                 "promotion_criteria": {"ndcg@5": "> 0.35", "hit_rate@3": "> 0.40"},
                 "promote_to": "production"},
                {"name": "export_serving_state", "type": "custom",
                 "depends_on": ["evaluate_and_promote"], "command": "fake_export",
                 "output": "state:/feature-recommender-online/latest"},
            ],
        }
    }  # fmt: skip


@pytest.fixture
def env(tmp_path):
    settings = Settings.model_validate({"data_dir": str(tmp_path / "data")})
    db = DuckDBEngine(":memory:")
    last = tiny_world(db)
    reg = Registry(tmp_path / "data" / "registry")
    hist = RunHistory(tmp_path / "data" / "pipeline" / "runs")
    yield settings, db, reg, hist, last
    db.close()


def runner_for(env, raw: dict[str, Any]) -> PipelineRunner:
    settings, db, reg, hist, _ = env
    return PipelineRunner(parse_spec(raw), settings, db, reg, hist)


def statuses(record) -> dict[str, str]:
    return {n: s.status for n, s in record.stages.items()}


# -- spec validation ------------------------------------------------------------------------
def _mutate(fn) -> dict[str, Any]:
    raw = copy.deepcopy(spec_dict())
    fn(raw["pipeline"]["stages"])
    return raw


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda st: st[1].update(type="spark_job"),
         r"stage 'compute_transition_probs': unknown type 'spark_job' \(expected one of: sql_transform"),
        (lambda st: st[0].update(depends_on=["evaluate_and_promote"]),
         r"dependency cycle between stages: .*build_interaction_matrix"),
        (lambda st: st[1].update(depends_on=["build_interaction_matrx"]),
         r"stage 'compute_transition_probs' depends on unknown stage 'build_interaction_matrx'"),
        (lambda st: st[1].pop("output_table"),
         r"stage 'compute_transition_probs': type sql_transform needs 'output_table'"),
        (lambda st: st[1].update(query_ref="nope.sql"), r"query_ref 'nope.sql' is neither"),
        (lambda st: st[8]["promotion_criteria"].update({"ndcg@5": "big"}),
         r"stage 'evaluate_and_promote': promotion criterion for 'ndcg@5': cannot parse 'big'"),
        (lambda st: st[5].update(output="models:/feature-recommender-mf/production"),
         r"stage 'train_matrix_factorization': output .* must end in /staging"),
        (lambda st: st[5].update(depend_on=["quality_gate"]),
         r"stage 'train_matrix_factorization': depend_on: unknown field"),
        (lambda st: st.append(dict(st[0])), r"duplicate stage name\(s\): build_interaction_matrix"),
        (lambda st: st[4]["checks"][0].pop("min_value"), r"check 'interaction_matrix_coverage' needs min_value"),
        (lambda st: st[1].update(output_table="ml.x; DROP TABLE events"), r"output_table: String should match"),
    ],
)  # fmt: skip
def test_spec_errors_name_the_stage(mutation, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(_mutate(mutation))


def test_spec_level_errors(tmp_path):
    raw = spec_dict()
    raw["pipeline"]["schedule"] = "every day"
    with pytest.raises(SpecError, match="'every day' is not a valid cron"):
        parse_spec(raw)
    with pytest.raises(SpecError, match="'stages' must be a non-empty list"):
        parse_spec({"pipeline": {"name": "x", "stages": []}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"pipeline": {"name": "x",, }}')
    with pytest.raises(SpecError, match=r"bad.json: invalid JSON at line 1"):
        load_spec(bad)
    with pytest.raises(SpecError, match="pipeline spec not found"):
        load_spec(tmp_path / "missing.json")


def test_evaluation_waits_for_every_artifact_stage():
    spec = parse_spec(spec_dict())
    # rebuild_ann_index is not in the spec's depends_on of evaluate_and_promote, but is implied
    assert "rebuild_ann_index" in spec.deps("evaluate_and_promote")
    assert "export_serving_state" not in spec.deps("evaluate_and_promote")  # downstream of it
    order = spec.order()
    assert order.index("rebuild_ann_index") < order.index("evaluate_and_promote")


@pytest.mark.parametrize("name", ["pipeline.cloudflow.json", "pipeline.demo.json"])
def test_shipped_specs_are_valid(name):
    spec = load_spec(f"builtin:{name}")
    gate = spec.stage("quality_gate")
    mins = {c.name: c.min_value for c in gate.checks}
    assert mins["feature_coverage"] == 8
    assert mins["interaction_matrix_coverage"] == (60000 if "cloudflow" in name else 1000)
    assert spec.stage("train_matrix_factorization").hyperparameters == {
        "factors": 64, "regularization": 0.01, "iterations": 15, "alpha": 40,
    }  # fmt: skip
    fns = {spec.stage(n).function_name for n in spec.order()} - {None}
    assert fns >= {
        "als_matrix_factorization", "contextual_bandit", "sequence_transitions", "context_model",
        "build_ann_index", "model_evaluation", "export_serving_state", "compute_user_neighbors",
    }  # fmt: skip
    assert spec.stage("evaluate_and_promote").promotion_criteria == {
        "ndcg@5": "> 0.35", "hit_rate@3": "> 0.40",
    }  # fmt: skip
    assert spec.order()[-1] == "export_serving_state"


# -- running --------------------------------------------------------------------------------
def test_full_run_registers_and_promotes(env, fakes):
    _settings, db, reg, hist, last = env
    record = runner_for(env, spec_dict()).run()
    assert record.status == "passed", render_tree(record)
    assert set(statuses(record).values()) == {"passed"}
    assert record.as_of == last
    st = record.stages
    assert (
        st["build_interaction_matrix"].rows
        == db.query_rows("SELECT COUNT(*) AS n FROM ml.user_feature_interactions")[0]["n"]
        > 0
    )
    assert [c.passed for c in st["quality_gate"].checks] == [True, True, False]
    assert st["quality_gate"].warnings == ["check lots_of_users: 60 < min 1e+06"]
    # artifacts registered under the spec's URIs, then promoted together
    assert st["train_matrix_factorization"].registered == ["models:/feature-recommender-mf/1"]
    assert st["rebuild_ann_index"].registered == ["indexes:/feature-recommender-hnsw/1"]
    assert fakes.contexts["fake_eval"].params["staged"] == [
        "models:/feature-recommender-mf/1",
        "models:/feature-recommender-bandit/1",
        "indexes:/feature-recommender-hnsw/1",
    ]
    promo = st["evaluate_and_promote"].promotion
    assert promo is not None and promo.promoted and promo.to == "production"
    mf = reg.resolve("models:/feature-recommender-mf/production")
    assert mf.version == 1 and mf.metrics["ndcg@5"] == pytest.approx(0.41)
    assert mf.params == {"factors": 64} and mf.run_id == record.run_id
    assert mf.data_window["as_of"] == last.isoformat()
    assert json.loads((mf.path / "weights.bin").read_text()) == {"factors": 64}
    assert reg.resolve("indexes:/feature-recommender-hnsw/latest").version == 1
    # the state snapshot is registered but is not a promotion candidate
    assert reg.resolve("state:/feature-recommender-online/latest").version == 1
    assert "state:/feature-recommender-online/1" not in promo.versions
    # history round-trips and the tree reads like the spec's
    again = hist.load(record.run_id)
    assert statuses(again) == statuses(record)
    tree = "\n".join(render_tree(again))
    assert "├── build_interaction_matrix " in tree and "rows)" in tree
    assert "│   ├── interaction_matrix_coverage ..." in tree and "PASSED (60 users)" in tree
    assert "│   └── lots_of_users" in tree and "WARNING (60, min 1,000,000)" in tree
    assert "ndcg@5 " in tree and "0.41 (threshold: > 0.35) PASSED" in tree
    assert "diversity_score ....." in tree and "└── promotion" in tree
    assert "Promoted to production" in tree


def test_failed_criteria_never_promote(env, fakes):
    _settings, _db, reg, _hist, _last = env
    fakes.eval_metrics = {"ndcg@5": 0.2, "hit_rate@3": 0.5}
    record = runner_for(env, spec_dict()).run()
    promo = record.stages["evaluate_and_promote"].promotion
    assert promo is not None and not promo.promoted
    assert promo.reasons == ["ndcg@5 0.2 is not > 0.35"]
    for uri in (
        "models:/feature-recommender-mf/production",
        "indexes:/feature-recommender-hnsw/latest",
    ):
        with pytest.raises(ModelError, match="no production version"):
            reg.resolve(uri)
    # the evaluation metrics are recorded on the version, so a CLI promote is refused too
    with pytest.raises(ModelError, match=r"ndcg@5 0\.2 is not > 0\.35"):
        reg.promote("feature-recommender-mf", 1, criteria={"ndcg@5": "> 0.35"})
    assert "Not promoted: ndcg@5 0.2 is not > 0.35" in "\n".join(render_tree(record))
    # a missing metric fails too
    fakes.eval_metrics = {"hit_rate@3": 0.9}
    record = runner_for(env, spec_dict()).run()
    assert "ndcg@5 missing" in record.stages["evaluate_and_promote"].promotion.reasons[0]
    assert reg.current("feature-recommender-mf", "production") is None


def test_critical_gate_stops_everything_downstream(env, fakes):
    _settings, _db, reg, _hist, _last = env
    record = runner_for(env, spec_dict(users=61)).run()  # the world has 60 users
    assert record.status == "failed"
    s = statuses(record)
    assert s["quality_gate"] == "failed"
    assert {s[n] for n in ("train_matrix_factorization", "rebuild_ann_index",
                           "evaluate_and_promote", "export_serving_state")} == {"skipped"}  # fmt: skip
    assert (
        record.stages["evaluate_and_promote"].error == "upstream train_matrix_factorization skipped"
    )
    assert fakes.calls == []
    assert reg.all_versions() == []
    gate = record.stages["quality_gate"]
    assert gate.attempts == 1  # not retried
    assert "interaction_matrix_coverage 60 < min 61" in gate.error
    tree = "\n".join(render_tree(record))
    assert "FAILED (60 users, min 61)" in tree
    assert "SKIPPED (upstream quality_gate failed)" in tree


def test_retries_and_deterministic_errors(env, fakes):
    raw = spec_dict()
    raw["pipeline"]["retries"] = 1
    fakes.fail_times["fake_bandit"] = 1
    record = runner_for(env, raw).run()
    bandit = record.stages["train_contextual_bandit"]
    assert (bandit.status, bandit.attempts) == ("passed", 2)
    assert bandit.warnings == ["attempt 1 failed: RuntimeError: fake_bandit exploded"]
    assert record.status == "passed"
    # without retries the same failure fails the stage and blocks promotion
    fakes.fail_times["fake_bandit"] = 1
    record = runner_for(env, spec_dict()).run()
    assert record.stages["train_contextual_bandit"].status == "failed"
    assert record.stages["evaluate_and_promote"].status == "skipped"
    assert record.stages["rebuild_ann_index"].status == "passed"  # independent branch ran


def test_empty_window_is_a_data_error_not_retried(env, fakes):
    raw = spec_dict()
    raw["pipeline"]["retries"] = 3
    record = runner_for(env, raw).run(as_of="2030-01-01T00:00:00")
    first = record.stages["build_interaction_matrix"]
    assert first.status == "failed" and first.attempts == 1
    assert "DataError: no feature_used events" in first.error
    assert all(s == "skipped" for n, s in statuses(record).items() if n != first.name)


def test_timeout(env, fakes):
    raw = spec_dict()
    raw["pipeline"]["stages"][6]["timeout_minutes"] = 0.002  # 0.12 s
    fakes.sleep["fake_bandit"] = 1.0
    t = time.monotonic()
    record = runner_for(env, raw).run()
    bandit = record.stages["train_contextual_bandit"]
    assert bandit.status == "failed" and "timed out after 0.002 min" in bandit.error
    assert record.stages["evaluate_and_promote"].status == "skipped"
    assert time.monotonic() - t < 5


def test_missing_stage_function_fails_that_stage(env, fakes):
    raw = spec_dict()
    raw["pipeline"]["stages"][6]["model_type"] = "no_such_trainer"
    record = runner_for(env, raw).run()
    err = record.stages["train_contextual_bandit"].error
    assert "no stage function registered as 'no_such_trainer'" in err
    assert record.stages["train_matrix_factorization"].status == "passed"
    assert record.stages["evaluate_and_promote"].status == "skipped"
    with pytest.raises(SpecError, match=r"searched featurerec\.pipeline\.builtin"):
        load_stage_function("no_such_trainer", modules=("featurerec.no_such_module",))


def test_resume_reruns_only_what_failed(env, fakes):
    _settings, _db, reg, _hist, last = env
    fakes.fail_times["fake_index"] = 1
    runner = runner_for(env, spec_dict())
    first = runner.run(as_of=last - timedelta(days=1))
    assert first.status == "failed" and first.stages["rebuild_ann_index"].status == "failed"
    assert reg.current("feature-recommender-mf", "production") is None
    calls_before = list(fakes.calls)
    resumed = runner_for(env, spec_dict()).resume(first.run_id)
    assert resumed.run_id == first.run_id and resumed.status == "passed"
    assert resumed.as_of == last - timedelta(days=1)
    rerun = fakes.calls[len(calls_before) :]
    assert sorted(rerun) == ["fake_eval", "fake_export", "fake_index"]
    assert resumed.stages["train_matrix_factorization"].attempts == 1
    # the model staged by the first attempt is promoted with the index built on resume
    assert reg.resolve("models:/feature-recommender-mf/production").version == 1
    assert reg.resolve("indexes:/feature-recommender-hnsw/latest").version == 1
    assert len(resumed.resumed_at) == 1
    with pytest.raises(SpecError, match="passed: nothing to resume"):
        runner.resume(first.run_id)
    with pytest.raises(SpecError, match="unknown pipeline run 'nope'"):
        runner.resume("nope")


def test_stages_overlap_when_independent(env, fakes):
    fakes.sleep["fake_mf"] = 0.4
    fakes.sleep["fake_bandit"] = 0.4
    record = runner_for(env, spec_dict()).run()
    a, b = record.stages["train_matrix_factorization"], record.stages["train_contextual_bandit"]
    assert a.started_at < b.finished_at and b.started_at < a.finished_at


def test_run_cache_computes_once_and_never_caches_a_failure():
    cache = contracts.RunCache()
    made: list[int] = []
    gate = threading.Event()

    def make() -> int:
        gate.wait(5)
        made.append(1)
        return 42

    out: list[int] = []
    threads = [threading.Thread(target=lambda: out.append(cache.get("k", make))) for _ in "ab"]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join()
    assert out == [42, 42] and len(made) == 1  # the second caller waited and reused it

    def boom() -> int:
        raise ValueError("read failed")

    with pytest.raises(ValueError):
        cache.get("bad", boom)
    assert cache.get("bad", lambda: 7) == 7  # the failure was not remembered


def test_stages_of_one_run_share_a_cache_and_runs_do_not(env, fakes):
    runner = runner_for(env, spec_dict())
    runner.run()
    first = {n: fakes.contexts[n].cache for n in ("fake_mf", "fake_bandit", "fake_eval")}
    assert len({id(c) for c in first.values()}) == 1
    runner.run()
    assert fakes.contexts["fake_mf"].cache is not first["fake_mf"]


def test_history_lists_runs(env, fakes):
    _settings, _db, reg, hist, _last = env
    r1 = runner_for(env, spec_dict()).run()
    fakes.eval_metrics = {"ndcg@5": 0.1, "hit_rate@3": 0.1}
    r2 = runner_for(env, spec_dict()).run()
    runs = hist.list()
    assert [r.run_id for r in runs] == [r2.run_id, r1.run_id]
    assert hist.load("latest").run_id == r2.run_id
    rows = [r.summary_row() for r in runs]
    assert [r["promoted"] for r in rows] == [False, True]
    # second run's versions are staged (v2) while v1 stays in production
    assert reg.resolve("models:/feature-recommender-mf/production").version == 1
    assert reg.resolve("models:/feature-recommender-mf/staging").version == 2


# -- schedule / formatting ------------------------------------------------------------------
def test_schedule_fires_at_cron_times():
    clock = [datetime(2026, 3, 1, 3, 58, 30)]
    fired: list[datetime] = []
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += timedelta(seconds=s)

    n = run_schedule("0 4 * * *", fired.append, max_runs=2, now=lambda: clock[0], sleep=sleep)
    assert n == 2
    assert fired == [datetime(2026, 3, 1, 4, 0), datetime(2026, 3, 2, 4, 0)]
    assert max(slept) <= 60
    assert next_fire("*/15 * * * *", datetime(2026, 3, 1, 4, 7)) == datetime(2026, 3, 1, 4, 15)
    once: list[datetime] = []
    assert run_schedule("0 4 * * *", once.append, once=True, now=lambda: clock[0]) == 1
    assert once == [clock[0]]


def test_duration_format():
    assert fmt_duration(1338) == "22m 18s"
    assert fmt_duration(4.25) == "4.2s"
    assert fmt_duration(3723) == "1h 02m 03s"


# -- CLI ------------------------------------------------------------------------------------
def test_cli_run_history_show_and_models(tmp_path, fakes, monkeypatch):
    from featurerec.cli import app

    data = tmp_path / "data"
    with DuckDBEngine(data / "warehouse.duckdb") as db:
        tiny_world(db)
    spec_file = tmp_path / "p.json"
    spec_file.write_text(json.dumps(spec_dict()))
    cli = CliRunner()
    base = ["--data-dir", str(data)]
    res = cli.invoke(app, [*base, "pipeline", "run", "--spec", str(spec_file)])
    assert res.exit_code == 0, res.output
    assert "└── export_serving_state" in res.output and "Promoted to production" in res.output
    res = cli.invoke(app, [*base, "pipeline", "history", "--json"])
    rows = json.loads(res.stdout)
    assert len(rows) == 1 and rows[0]["status"] == "passed"
    res = cli.invoke(app, [*base, "pipeline", "show", rows[0]["run_id"], "--json"])
    assert json.loads(res.stdout)["stages"]["quality_gate"]["status"] == "passed"
    res = cli.invoke(app, [*base, "models", "list", "--json"])
    uris = {r["uri"]: r["stage"] for r in json.loads(res.stdout)}
    assert uris["models:/feature-recommender-mf/1"] == "production"
    # a failing run exits 1 and can be resumed from the CLI
    fakes.fail_times["fake_bandit"] = 1
    res = cli.invoke(app, [*base, "pipeline", "run", "--spec", str(spec_file)])
    assert res.exit_code == 1 and "FAILED" in res.output
    res = cli.invoke(app, [*base, "pipeline", "run", "--resume", "latest"])
    assert res.exit_code == 0, res.output
    # models CLI: promote checks recorded metrics against the configured pipeline's criteria
    res = cli.invoke(app, [*base, "models", "show", "feature-recommender-mf/2", "--json"])
    shown = json.loads(res.stdout)
    assert shown["integrity"] == "ok" and shown["stage"] == "production"
    res = cli.invoke(app, [*base, "models", "rollback", "feature-recommender-mf"])
    assert res.exit_code == 0 and "production is now v1" in res.output
    reg = Registry(data / "registry")
    reg.register("feature-recommender-mf", Path(shown["path"]))  # v3, no metrics
    res = cli.invoke(app, [*base, "models", "promote", "feature-recommender-mf", "3"])
    assert res.exit_code != 0 and isinstance(res.exception, ModelError)
    assert "ndcg@5 missing" in str(res.exception)
    res = cli.invoke(app, [*base, "models", "promote", "feature-recommender-mf", "3", "--force"])
    assert res.exit_code == 0 and "forced" in res.output
    assert reg.resolve("models:/feature-recommender-mf/production").version == 3


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def stage_started(self, name: str, attempt: int) -> None:
        self.events.append(("start", name, attempt))

    def stage_progress(self, name: str, done: float, total: float, message: str) -> None:
        self.events.append(("progress", name, done, total, message))

    def stage_finished(self, name: str, record) -> None:
        self.events.append(("end", name, record.status))


def test_progress_reaches_the_sink(env, fakes):
    settings, db, reg, hist, _ = env
    sink = RecordingSink()
    PipelineRunner(parse_spec(spec_dict()), settings, db, reg, hist, sink=sink).run()
    assert ("progress", "train_matrix_factorization", 1, 2, "half way") in sink.events
    starts = [e[1] for e in sink.events if e[0] == "start"]
    ends = [e[1] for e in sink.events if e[0] == "end"]
    assert sorted(starts) == sorted(ends) == sorted(spec_dict_names())


def spec_dict_names() -> list[str]:
    return [s["name"] for s in spec_dict()["pipeline"]["stages"]]


def test_single_feature_world_is_stopped_by_the_gate(tmp_path, fakes):
    settings = Settings.model_validate({"data_dir": str(tmp_path / "data")})
    with DuckDBEngine(":memory:") as db:
        tiny_world(db)
        db.execute("UPDATE events SET feature_category = 'only_one'")
        record = PipelineRunner(
            parse_spec(spec_dict()),
            settings,
            db,
            Registry(tmp_path / "r"),
            RunHistory(tmp_path / "h"),
        ).run()
    gate = record.stages["quality_gate"]
    assert gate.status == "failed" and "feature_coverage 1 < min 8" in gate.error
    assert record.stages["compute_transition_probs"].rows == 0  # no distinct consecutive pairs
    assert fakes.calls == [] and Registry(tmp_path / "r").all_versions() == []


def test_sql_stages_never_overlap(env, fakes):
    record = runner_for(env, spec_dict()).run()
    sql = [s for s in record.stages.values() if s.type in ("sql_transform", "data_quality")]
    spans = sorted((s.started_at, s.finished_at) for s in sql)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_own_sql_next_to_the_spec_and_resume(env, fakes, tmp_path):
    settings, db, reg, hist, _ = env
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "my_counts.sql").write_text(
        "SELECT feature, COUNT(*) AS n FROM ml.user_feature_interactions"
        " WHERE last_used <= $as_of GROUP BY feature"
    )
    raw = spec_dict()
    raw["pipeline"]["stages"].insert(
        1,
        {"name": "my_counts", "type": "sql_transform", "depends_on": ["build_interaction_matrix"],
         "query_ref": "my_counts.sql", "output_table": "ml.my_counts"},
    )  # fmt: skip
    path = tmp_path / "specs" / "p.json"
    path.write_text(json.dumps(raw))
    fakes.fail_times["fake_eval"] = 1
    first = PipelineRunner(load_spec(path), settings, db, reg, hist).run()
    assert first.stages["my_counts"].rows == len(FEATURES)
    assert first.stages["evaluate_and_promote"].status == "failed"
    resumed = PipelineRunner(load_spec(path), settings, db, reg, hist).resume(first.run_id)
    assert resumed.status == "passed"


#: The walkthrough's Stage 4 pipeline JSON, verbatim.
SPEC_VERBATIM = r"""
{
  "pipeline": {
    "name": "recommender-training-daily",
    "schedule": "0 4 * * *",
    "description": "Daily retraining of recommendation models and ANN index refresh",
    "stages": [
      {
        "name": "build_interaction_matrix",
        "type": "sql_transform",
        "query_ref": "interaction_matrix_v2.sql",
        "output_table": "ml.user_feature_interactions",
        "timeout_minutes": 45
      },
      {
        "name": "compute_transition_probs",
        "type": "sql_transform",
        "depends_on": ["build_interaction_matrix"],
        "query_ref": "feature_transitions.sql",
        "output_table": "ml.feature_transition_probs"
      },
      {
        "name": "build_context_vectors",
        "type": "sql_transform",
        "depends_on": ["build_interaction_matrix"],
        "query_ref": "user_context_vectors.sql",
        "output_table": "ml.user_context_vectors"
      },
      {
        "name": "quality_gate",
        "type": "data_quality",
        "depends_on": ["build_interaction_matrix", "compute_transition_probs", "build_context_vectors"],
        "checks": [
          {
            "name": "interaction_matrix_coverage",
            "type": "custom_sql",
            "query": "SELECT COUNT(DISTINCT user_id) FROM ml.user_feature_interactions",
            "min_value": 60000,
            "severity": "critical"
          },
          {
            "name": "feature_coverage",
            "type": "custom_sql",
            "query": "SELECT COUNT(DISTINCT feature) FROM ml.user_feature_interactions",
            "min_value": 8,
            "severity": "critical"
          }
        ]
      },
      {
        "name": "train_matrix_factorization",
        "type": "model_training",
        "depends_on": ["quality_gate"],
        "model_type": "als_matrix_factorization",
        "input_table": "ml.user_feature_interactions",
        "hyperparameters": {
          "factors": 64,
          "regularization": 0.01,
          "iterations": 15,
          "alpha": 40
        },
        "output": "models:/feature-recommender-mf/staging"
      },
      {
        "name": "train_contextual_bandit",
        "type": "model_training",
        "depends_on": ["quality_gate"],
        "model_type": "contextual_bandit",
        "input_tables": ["ml.user_context_vectors", "ml.recommendation_feedback"],
        "hyperparameters": {
          "exploration_rate": 0.1,
          "decay_factor": 0.995
        },
        "output": "models:/feature-recommender-bandit/staging"
      },
      {
        "name": "rebuild_ann_index",
        "type": "custom",
        "depends_on": ["train_matrix_factorization"],
        "command": "build_ann_index",
        "config": {
          "embedding_source": "models:/feature-recommender-mf/staging",
          "index_type": "hnsw",
          "metric": "cosine",
          "ef_construction": 200,
          "M": 16
        }
      },
      {
        "name": "evaluate_and_promote",
        "type": "model_evaluation",
        "depends_on": ["train_matrix_factorization", "train_contextual_bandit"],
        "metrics": ["ndcg@5", "hit_rate@3", "diversity_score"],
        "promotion_criteria": {
          "ndcg@5": "> 0.35",
          "hit_rate@3": "> 0.40"
        },
        "promote_to": "production"
      }
    ]
  }
}
"""


def test_the_walkthrough_json_is_a_valid_spec():
    spec = parse_spec(json.loads(SPEC_VERBATIM))
    assert spec.name == "recommender-training-daily" and spec.schedule == "0 4 * * *"
    assert spec.order()[0] == "build_interaction_matrix"
    assert spec.stage("quality_gate").checks[0].min_value == 60000
    assert spec.stage("evaluate_and_promote").function_name == "model_evaluation"
    # the index stage has no output in the walkthrough: it runs, but registers nothing
    assert spec.stage("rebuild_ann_index").output is None


def test_interrupted_run_leaves_a_resumable_record(env, fakes):
    settings, db, reg, hist, _ = env

    class CtrlC(RecordingSink):
        def stage_started(self, name: str, attempt: int) -> None:
            if name == "train_matrix_factorization":
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C here

    runner = PipelineRunner(parse_spec(spec_dict()), settings, db, reg, hist, sink=CtrlC())
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    record = hist.load("latest")
    assert record.status == "failed"
    assert record.stages["build_interaction_matrix"].status == "passed"
    assert record.stages["train_matrix_factorization"].error == "run interrupted: KeyboardInterrupt"
    resumed = runner_for(env, spec_dict()).resume(record.run_id)
    assert resumed.status == "passed"
    assert resumed.stages["build_interaction_matrix"].attempts == 1
