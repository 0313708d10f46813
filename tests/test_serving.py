"""Serving: API contract, 422s, cold start, events, feedback, fallback, hot reload, reasons."""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from featurerec.config import Settings
from featurerec.registry import Registry, registry_for
from featurerec.serving.app import ServingRuntime, create_app
from featurerec.serving.reclog import load_reclog
from featurerec.serving.service import RecommendationRequest
from featurerec.serving.snapshot import OnlineSnapshot
from featurerec.serving.testing import (
    FIXTURE_AS_OF,
    fill_fixture_warehouse,
    publish_bundle,
    publish_fixture_world,
    train_fixture_bundle,
)
from featurerec.warehouse.engine import DuckDBEngine

SPEC_ITEM_KEYS = {"feature", "score", "reason", "cta_text", "cta_url", "position"}
SPEC_KEYS = {"user_id", "recommendations", "model_version", "generated_at", "latency_ms"}


@pytest.fixture(scope="module")
def base_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with a registered snapshot and a promoted bundle (300 users)."""
    logging.getLogger("featurerec.registry.store").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("serving_world")
    data = root / "data"
    settings = Settings.model_validate({"data_dir": str(data)})
    engine = DuckDBEngine(":memory:")
    fill_fixture_warehouse(engine, n_users=300, seed=3)
    snap = publish_fixture_world(engine, settings, root / "work")
    assert snap.n_users == 300
    engine.close()
    return data


@pytest.fixture
def world(base_world: Path, tmp_path: Path) -> Settings:
    data = tmp_path / "data"
    shutil.copytree(base_world, data)
    return Settings.model_validate({"data_dir": str(data), "serving": {"durable_log": False}})


@pytest.fixture
def client(world: Settings):
    rt = ServingRuntime.from_settings(world)
    with TestClient(create_app(rt)) as c:
        c.rt = rt  # type: ignore[attr-defined]
        yield c


def _pct(x: float) -> int:
    return math.floor(100 * float(x) + 0.5)


def _snapshot(settings: Settings) -> OnlineSnapshot:
    mv = registry_for(settings).resolve("state:/feature-recommender-online/latest")
    return OnlineSnapshot.load(mv.path)


def test_recommendations_contract_get_and_post(client: TestClient, world: Settings) -> None:
    r = client.get("/api/v1/recommendations", params={"user_id": "usr_000007"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= SPEC_KEYS
    assert body["fallback"] is False and "feature-recommender-mf@1" in body["model_version"]
    assert 1 <= len(body["recommendations"]) <= 3
    assert [x["position"] for x in body["recommendations"]] == list(
        range(1, len(body["recommendations"]) + 1)
    )
    for item in body["recommendations"]:
        assert SPEC_ITEM_KEYS | {"recommendation_id"} == set(item)
        assert 0.0 <= item["score"] <= 1.0
        assert item["cta_url"] == f"/features/{item['feature']}/getting-started"
        assert item["recommendation_id"].startswith(body["request_id"])
    r2 = client.post(
        "/api/v1/recommendations",
        json={"user_id": "usr_000008", "placement": "in_context_tooltip", "k": 2},
    )
    assert r2.status_code == 200 and len(r2.json()["recommendations"]) <= 2
    assert r2.json()["placement"] == "in_context_tooltip"
    # never an already adopted feature
    snap = _snapshot(world)
    row = int(np.flatnonzero(snap.user_ids == "usr_000007")[0])
    adopted = {snap.features[j] for j in np.flatnonzero(snap.adopted[row])}
    assert not adopted & {x["feature"] for x in body["recommendations"]}
    metrics = client.get("/metrics").text
    assert "featurerec_recommendations_total" in metrics and "sequence_aware" in metrics
    assert client.get("/readyz").json()["fallback"] is False
    assert "/api/v1/recommendations" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("params", "field", "why"),
    [
        ({"user_id": "u1", "placement": "banner"}, "placement", "Input should be"),
        ({"user_id": "u1", "k": 0}, "k", "greater than or equal to 1"),
        ({"user_id": "u1", "k": "three"}, "k", "valid integer"),
        ({"placement": "sidebar_panel"}, "user_id", "Field required"),
        ({"user_id": "u1", "team_size": -4}, "team_size", "greater than or equal to 1"),
    ],
)
def test_bad_input_is_422_naming_field(client: TestClient, params, field, why) -> None:
    r = client.get("/api/v1/recommendations", params=params)
    assert r.status_code == 422
    err = r.json()["error"]
    assert re.search(rf"\b{field}\b: .*{why}", err), err


def test_unknown_user_gets_cold_start(client: TestClient) -> None:
    r = client.get(
        "/api/v1/recommendations",
        params={"user_id": "brand_new_user", "role": "engineer", "team_size": 12, "plan": "pro"},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["recommendations"], body
    # advanced_reports is flagged to business/enterprise plans only
    assert "advanced_reports" not in {x["feature"] for x in body["recommendations"]}
    r2 = client.get("/api/v1/recommendations", params={"user_id": "someone_else"})
    assert r2.status_code == 200


def test_events_update_eligibility_immediately(client: TestClient) -> None:
    user = "usr_000011"
    first = client.get("/api/v1/recommendations", params={"user_id": user}).json()
    feature = first["recommendations"][0]["feature"]
    event = {
        "event_id": "evt_live_1",
        "user_id": user,
        "event_type": "feature_used",
        "properties": {"feature_category": feature},
        "timestamp": (FIXTURE_AS_OF + timedelta(hours=1)).isoformat() + "Z",
    }
    r = client.post("/api/v1/events", json=[event, event])
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1 and r.json()["applied"] == 1
    rt = client.rt  # type: ignore[attr-defined]
    row = rt.service.state.row_of(user)
    assert rt.service.state.adopted[row, rt.service.state.findex[feature]]
    for _ in range(3):
        again = client.get("/api/v1/recommendations", params={"user_id": user}).json()
        assert feature not in {x["feature"] for x in again["recommendations"]}
    # the same event again is a duplicate and changes nothing
    assert client.post("/api/v1/events", json=event).json()["applied"] == 0
    bad = client.post("/api/v1/events", json=[{"event_id": "x"}])
    assert bad.status_code == 200 and bad.json()["quarantined"] == 1


def test_feedback_dismiss_is_idempotent_and_blocks_feature(client: TestClient) -> None:
    user = "usr_000021"
    body = client.get("/api/v1/recommendations", params={"user_id": user}).json()
    rec = body["recommendations"][0]
    fb = {"recommendation_id": rec["recommendation_id"], "kind": "dismiss"}
    first = client.post("/api/v1/feedback", json=fb).json()
    assert first == {"accepted": 1, "duplicates": 0, "applied": 1}
    assert client.post("/api/v1/feedback", json=fb).json()["duplicates"] == 1
    bad = client.post("/api/v1/feedback", json={**fb, "kind": "wave"})
    assert bad.status_code == 422 and bad.json()["error"].startswith("kind: Input should be")
    batch = {"feedback": [{"recommendation_id": "r1", "kind": "click"}, {"kind": "click"}]}
    bad = client.post("/api/v1/feedback", json=batch)
    assert bad.status_code == 422 and "feedback.1.recommendation_id: Field required" in bad.text
    for _ in range(3):
        again = client.get("/api/v1/recommendations", params={"user_id": user}).json()
        assert rec["feature"] not in {x["feature"] for x in again["recommendations"]}


def test_weekly_caps_and_diversity_hold_over_many_requests(client: TestClient) -> None:
    user = "usr_000031"
    shown: list[str] = []
    for _ in range(15):
        recs = client.get("/api/v1/recommendations", params={"user_id": user}).json()
        new = [x["feature"] for x in recs["recommendations"]]
        assert len(new) == len(set(new))
        shown += new
        if shown:
            assert len(set(shown)) / len(shown) >= 0.6 or not new
        assert max(shown.count(f) for f in set(shown)) <= 3


def test_reclog_loads_idempotently(client: TestClient, world: Settings) -> None:
    ids = []
    for i in range(5):
        body = client.get("/api/v1/recommendations", params={"user_id": f"usr_{i:06d}"}).json()
        ids += [x["recommendation_id"] for x in body["recommendations"]]
    client.post("/api/v1/feedback", json={"recommendation_id": ids[0], "kind": "click"})
    rt = client.rt  # type: ignore[attr-defined]
    with DuckDBEngine(":memory:") as engine:
        rep1 = load_reclog(engine, rt.log_dir)
        rep2 = load_reclog(engine, rt.log_dir)
        assert rep1.recommendations_new == len(ids) and rep1.feedback_new == 1
        assert rep2.recommendations_new == 0 and rep2.feedback_new == 0
        got = engine.query_rows(
            "SELECT recommendation_id, propensity, strategy FROM ml.recommendation_log"
        )
        assert {r["recommendation_id"] for r in got} == set(ids)
        assert all(0 < r["propensity"] <= 1 and r["strategy"] for r in got)


def _corrupt_ranker(settings: Settings) -> None:
    mv = registry_for(settings).lookup("models:/feature-recommender-bandit/production")
    victim = next(p for p in sorted(mv.path.rglob("*.npz")))
    victim.write_bytes(b"not an npz")


def test_corrupt_bundle_serves_fallback_then_hot_reloads(world: Settings, tmp_path) -> None:
    _corrupt_ranker(world)
    rt = ServingRuntime.from_settings(world)
    with TestClient(create_app(rt)) as c:
        body = c.get("/api/v1/recommendations", params={"user_id": "usr_000005"}).json()
        assert body["fallback"] is True and body["recommendations"]
        assert body["model_version"].startswith("fallback:")
        assert "checksum" in c.get("/readyz").json()["model_error"]
        # a fixed bundle is promoted: the reloader swaps it in
        snap = _snapshot(world)
        publish_bundle(registry_for(world), train_fixture_bundle(snap, seed=1), tmp_path / "b2")
        assert rt.check_reload() == "model"
        body = c.get("/api/v1/recommendations", params={"user_id": "usr_000006"}).json()
        assert body["fallback"] is False and "bandit@2" in body["model_version"]


def test_hot_reload_swaps_model_and_state(world: Settings, tmp_path) -> None:
    rt = ServingRuntime.from_settings(world)
    old_model = rt.service.model
    assert rt.check_reload() is None
    snap = _snapshot(world)
    publish_bundle(registry_for(world), train_fixture_bundle(snap, seed=2), tmp_path / "b3")
    # a new snapshot too: user usr_000001 now uses every feature
    snap.adopted[np.flatnonzero(snap.user_ids == "usr_000001")[0], :] = True
    snap.save(tmp_path / "snap2")
    Registry(world.data_path / "registry").register(
        "feature-recommender-online", tmp_path / "snap2", kind="state"
    )
    service = rt.service
    shown = rt.service.recommend(RecommendationRequest("usr_000002")).recommendations
    assert shown
    changed = rt.check_reload()
    assert changed == "state+model"
    st = rt.service.state
    exposure = st.exposure(st.row_of("usr_000002"), time.time())
    assert {st.features[j] for j in np.flatnonzero(exposure.shown_7d)} == {
        r.feature for r in shown
    }  # exposure carried over to the new state
    assert rt.service is service and rt.service.model is not old_model
    res = rt.service.recommend(RecommendationRequest("usr_000001"))
    assert res.recommendations == []
    rt.close()


def test_landed_events_are_replayed_on_start(world: Settings) -> None:
    """Events accepted (landed) after the snapshot survive a restart."""
    from featurerec.events.landing import Landing
    from featurerec.events.validate import normalize_records

    user, feature = "usr_000040", "api_access"
    when = FIXTURE_AS_OF + timedelta(days=1)
    batch = normalize_records(
        [
            {
                "event_id": "evt_landed",
                "user_id": user,
                "event_type": "feature_used",
                "properties": {"feature_category": feature},
                "timestamp": when.isoformat() + "Z",
            }
        ],
        settings=world,
        source="test",
    )
    Landing.for_settings(world).write(batch)
    rt = ServingRuntime.from_settings(world)
    st = rt.service.state
    assert st.adopted[st.row_of(user), st.findex[feature]]
    assert st.latest_event_at == when
    rt.close()


def test_reasons_are_true_facts_of_the_snapshot(client: TestClient, world: Settings) -> None:
    snap = _snapshot(world)
    rt = client.rt  # type: ignore[attr-defined]
    checked = 0
    for i in range(0, 300, 7):
        uid = f"usr_{i:06d}"
        body = client.get("/api/v1/recommendations", params={"user_id": uid}).json()
        row = int(np.flatnonzero(snap.user_ids == uid)[0])
        for item in body["recommendations"]:
            j = snap.features.index(item["feature"])
            numbers = [int(n) for n in re.findall(r"(\d+)%", item["reason"])]
            text = item["reason"]
            if " of all users use " in text:
                expect = _pct(snap.adopters[j] / snap.n_users)
            elif "% of transitions" in text:
                src = next(
                    t
                    for t in snap.transitions
                    if t.to_feature == item["feature"]
                    and rt.service.catalog.entry(t.from_feature).display_name in text
                )
                assert snap.adopted[row, snap.features.index(src.from_feature)]
                expect = _pct(src.count / src.from_total)
            elif " on teams of " in text:
                role = snap.role_codes[row]
                peers = (snap.role_codes == role) & (snap.bucket_codes == snap.bucket_codes[row])
                expect = _pct(snap.adopted[peers, j].mean())
                assert snap.roles[role].replace("_", " ") in text
            else:
                assert not numbers, text
                continue
            assert numbers == [expect], (text, expect)
            checked += 1
    assert checked > 20


def test_workers_share_events_and_dismissals_through_sync(world: Settings) -> None:
    """Two server processes on one data dir: what one accepts, the other applies."""
    a = ServingRuntime.from_settings(world)
    b = ServingRuntime.from_settings(world)
    st = b.service.state
    user = "usr_000050"
    feature = st.features[int(np.flatnonzero(~st.adopted[st.row_of(user)])[0])]
    with TestClient(create_app(a)) as ca:
        event = {
            "event_id": "evt_sync_1",
            "user_id": user,
            "event_type": "feature_used",
            "properties": {"feature_category": feature},
            "timestamp": (FIXTURE_AS_OF + timedelta(hours=2)).isoformat() + "Z",
        }
        assert ca.post("/api/v1/events", json=event).json()["applied"] == 1
        assert "/v1/batch" in ca.get("/openapi.json").json()["paths"]  # Segment intake
    assert not st.adopted[st.row_of(user), st.findex[feature]]
    assert b.sync.run_once() >= 1
    assert st.adopted[st.row_of(user), st.findex[feature]]
    # a dismissal logged by another worker (other pid in the segment name) reaches b
    log = b.log_dir / "feedback-20270101-999999-0001.jsonl"
    log.write_text(
        '{"feedback_id":"x:dismiss","recommendation_id":"x","user_id":"usr_000051",'
        '"feature":"api_access","kind":"dismiss","timestamp":"2030-01-01T00:00:00"}\n'
    )
    b.sync.run_once()
    exp = st.exposure(st.row_of("usr_000051"), 0.0)
    assert exp.last_dismissed[st.findex["api_access"]] > 0
    a.close()
    b.close()


def test_cli_recommend_and_reclog_load(world: Settings) -> None:
    import orjson
    from typer.testing import CliRunner

    from featurerec.cli import app

    runner = CliRunner()
    base = ["--data-dir", str(world.data_path)]
    r = runner.invoke(app, [*base, "recommend", "usr_000060", "--json", "--k", "2"])
    assert r.exit_code == 0, r.output
    body = orjson.loads(r.stdout)
    assert body["user_id"] == "usr_000060" and 1 <= len(body["recommendations"]) <= 2
    r = runner.invoke(app, [*base, "recommend", "usr_000060", "--placement", "popup"])
    assert r.exit_code != 0 and "placement" in str(r.exception or r.output)
    for _ in range(2):
        r = runner.invoke(app, [*base, "reclog", "load", "--json"])
        assert r.exit_code == 0, r.output
    report = orjson.loads(r.stdout)
    assert report["recommendations_read"] == len(body["recommendations"])
    assert report["recommendations_new"] == 0  # second load adds nothing


def test_experiment_variant_sets_strategy_and_placement(world: Settings) -> None:
    from featurerec.experiments.assignment import assign
    from featurerec.experiments.spec import find_experiment

    strat_cfg = world.model_copy(
        update={
            "serving": world.serving.model_copy(
                update={"experiment": "rec-personalization-strategy"}
            )
        }
    )
    rt = ServingRuntime.from_settings(strat_cfg)
    spec = find_experiment(strat_cfg, "rec-personalization-strategy")
    seen = set()
    for i in range(40):
        uid = f"usr_{i:06d}"
        res = rt.service.recommend(RecommendationRequest(uid))
        variant = assign(spec, uid)
        assert res.experiment == spec.name and res.variant == variant.name
        assert res.strategy == variant.resolved_strategy
        assert all(r["variant"] == variant.name for r in res.log_records)
        seen.add(res.variant)
    assert len(seen) >= 3
    rt.close()
    place_cfg = world.model_copy(
        update={"serving": world.serving.model_copy(update={"experiment": "rec-placement-test"})}
    )
    rt = ServingRuntime.from_settings(place_cfg)
    spec = find_experiment(place_cfg, "rec-placement-test")
    for i in range(40):
        uid = f"usr_{i:06d}"
        arm = assign(spec, uid).resolved_placement
        res = rt.service.recommend(RecommendationRequest(uid, placement="sidebar_panel"))
        if arm == "sidebar_panel":
            assert res.recommendations, uid
        else:  # this user's arm shows recommendations elsewhere, never in the sidebar
            assert res.recommendations == [] and res.variant == arm
    rt.close()


def test_cli_export_state_registers_snapshot(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from featurerec.cli import app

    settings = Settings.model_validate({"data_dir": str(tmp_path / "d")})
    with DuckDBEngine(settings.warehouse_path) as engine:
        fill_fixture_warehouse(engine, n_users=50, seed=9)
    r = CliRunner().invoke(app, ["--data-dir", str(settings.data_path), "serving", "export-state"])
    assert r.exit_code == 0, r.output
    mv = registry_for(settings).resolve("state:/feature-recommender-online/latest")
    snap = OnlineSnapshot.load(mv.path)
    assert snap.n_users == 50 and snap.as_of <= FIXTURE_AS_OF


def test_request_time_model_failure_falls_back(client: TestClient) -> None:
    class Broken:
        version, is_fallback = "broken@1", False
        features = client.rt.service.state.features  # type: ignore[attr-defined]

        def strategy_name(self, requested: str) -> str:
            return requested

        def recommend(self, *args, **kwargs):
            raise ValueError("boom")

    client.rt.service.swap_model(Broken())  # type: ignore[attr-defined]
    body = client.get("/api/v1/recommendations", params={"user_id": "usr_000070"}).json()
    assert body["fallback"] is True and body["recommendations"]
    assert "boom" in client.get("/readyz").json()["model_error"]


def test_restart_rebuilds_exposure_from_a_log_with_context_lines(
    client: TestClient, world: Settings
) -> None:
    """The reclog segments hold each request's decision context next to its
    recommendations; a restarted server re-reads the recommendations (caps hold across
    restarts) and skips the context lines."""
    from featurerec.serving.reclog import iter_records

    user = "usr_000050"
    shown = []
    for _ in range(2):
        body = client.get("/api/v1/recommendations", params={"user_id": user}).json()
        shown += [x["feature"] for x in body["recommendations"]]
    assert shown
    rt = client.rt  # type: ignore[attr-defined]
    kinds = [r.get("record", "recommendation") for r in iter_records(rt.log_dir, "reclog")]
    assert kinds.count("context") == 2
    again = ServingRuntime.from_settings(world)
    try:
        st = again.service.state
        exposure = st.exposure(st.row_of(user), time.time())
        for f in set(shown):
            assert exposure.shown_7d[st.findex[f]] == shown.count(f)
    finally:
        again.close()


def test_decision_context_logging_follows_the_setting(world: Settings) -> None:
    for enabled in (True, False):
        serving = world.serving.model_copy(update={"log_decision_context": enabled})
        rt = ServingRuntime.from_settings(world.model_copy(update={"serving": serving}))
        try:
            res = rt.service.recommend(RecommendationRequest("usr_000011"))
        finally:
            rt.close()
        assert res.recommendations
        if enabled:
            assert res.context_record is not None
            assert res.context_record["request_id"] == res.request_id
            assert res.log_lines() == [*res.log_records, res.context_record]
        else:
            assert res.context_record is None and res.log_lines() == res.log_records


def test_a_warehouse_from_before_exposure_excluded_gets_the_column(tmp_path: Path) -> None:
    """ml.recommendation_context gained ``exposure_excluded`` after its first release: opening
    a warehouse created before adds it, and context lines with it load there."""
    import duckdb

    from featurerec.serving.reclog import insert_logs

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE SCHEMA ml")
        conn.execute(
            "CREATE TABLE ml.recommendation_context (request_id VARCHAR PRIMARY KEY, "
            "user_id VARCHAR NOT NULL, generated_at TIMESTAMP NOT NULL, placement VARCHAR, "
            "slate_size INTEGER, candidate_top_k INTEGER, exploration_rate DOUBLE, "
            "user_context VARCHAR, interactions VARCHAR, recent_features VARCHAR, "
            "event_count INTEGER, eligible VARCHAR, excluded VARCHAR)"
        )
        conn.execute(
            "INSERT INTO ml.recommendation_context (request_id, user_id, generated_at) "
            "VALUES ('old', 'u1', TIMESTAMP '2026-03-01 09:00:00')"
        )
    with DuckDBEngine(path) as db:
        row = {"request_id": "new", "user_id": "u1", "generated_at": "2026-03-02T09:00:00",
               "exposure_excluded": '["a"]'}  # fmt: skip
        insert_logs(db, [], [], [row])
        got = db.query_rows(
            "SELECT request_id, exposure_excluded FROM ml.recommendation_context ORDER BY 1"
        )
    assert got == [
        {"request_id": "new", "exposure_excluded": '["a"]'},
        {"request_id": "old", "exposure_excluded": None},
    ]
