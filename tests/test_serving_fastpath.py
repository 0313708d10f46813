"""The serving fast path ranks exactly like MODELS' strategies; logs survive a kill."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from featurerec.config import Settings
from featurerec.models.ranking import slate_propensities
from featurerec.registry import registry_for
from featurerec.serving.fastpath import accelerate
from featurerec.serving.loader import BundleModel
from featurerec.serving.reclog import RECLOG_PREFIX, iter_recommendations, iter_records
from featurerec.serving.snapshot import OnlineSnapshot, build_snapshot
from featurerec.serving.state import OnlineState
from featurerec.serving.testing import (
    FIXTURE_AS_OF,
    fill_fixture_warehouse,
    publish_bundle,
    train_fixture_bundle,
)
from featurerec.warehouse.engine import DuckDBEngine


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    engine = DuckDBEngine(":memory:")
    fill_fixture_warehouse(engine, n_users=200, seed=5)
    snap = build_snapshot(engine, Settings(), FIXTURE_AS_OF)
    engine.close()
    return snap, train_fixture_bundle(snap)


@pytest.mark.parametrize(
    "name", ["sequence_aware", "hybrid", "content_based", "collaborative_only", "popularity"]
)
def test_fast_path_equals_strategy_recommend(fixture, name: str) -> None:
    snap, bundle = fixture
    state = OnlineState(snap)
    users = state.all_user_states()
    fast = BundleModel(accelerate(bundle, users), "v", users, warm=[name])
    strat = bundle.strategy(name)
    rng = np.random.default_rng(0)
    m = len(bundle.features)
    assert fast.features == bundle.features == state.features
    for i, user in enumerate(users[:25]):
        exclude = rng.random(m) < 0.3
        exclude |= state.adopted[i]
        k = int(rng.integers(1, 4))
        want = strat.recommend([user], k, exclude[None, :], explore=False)
        got = fast.recommend(name, user, exclude, k, 20, 0.0, np.random.default_rng(1))
        np.testing.assert_array_equal(got.ids, want.ids, err_msg=f"{name} user {i}")
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
        assert not exclude[got.ids[got.ids >= 0]].any()


def test_fast_path_recomputes_changed_users_and_propensities_are_exact(fixture) -> None:
    snap, bundle = fixture
    state = OnlineState(snap)
    users = state.all_user_states()
    fast = BundleModel(accelerate(bundle, users), "v", users, warm=["hybrid"])
    strat = bundle.strategy("hybrid")
    # a user whose interactions changed after the snapshot: same as the strategy on the
    # new state, not the stale precomputed row
    row = 3
    j = int(np.flatnonzero(~state.adopted[row])[0])
    state._use(row, j)
    user = state.user_state(row)
    exclude = state.adopted[row].copy()
    want = strat.recommend([user], 3, exclude[None, :], explore=False)
    got = fast.recommend("hybrid", user, exclude, 3, 20, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(got.ids, want.ids)
    # with exploration, logged propensities match the policy's exact marginals
    eps = 0.25
    ranked = fast.recommend("hybrid", user, exclude, 3, 20, eps, np.random.default_rng(9))
    valid = ~exclude
    order = want.ids  # greedy slate
    n_valid = int(valid.sum())
    for pos, item in enumerate(ranked.ids[0]):
        if item < 0:
            continue
        expect = (1 - eps) * (item == order[0, pos]) + eps / n_valid
        assert ranked.propensities[0, pos] == pytest.approx(expect)
    full = slate_propensities(
        np.arange(n_valid, 0, -1)[None, :] * 1.0, np.ones((1, n_valid), bool), 3, eps
    )
    assert np.allclose(full.sum(axis=1), 1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_acknowledged_recommendations_survive_kill(tmp_path: Path, fixture) -> None:
    """Serve from a subprocess, kill -9 it right after the responses: every acknowledged
    recommendation id is in the log."""
    logging.getLogger("featurerec.registry.store").setLevel(logging.ERROR)
    snap, bundle = fixture
    data = tmp_path / "data"
    settings = Settings.model_validate({"data_dir": str(data)})
    reg = registry_for(settings)
    snap.save(tmp_path / "snap")
    reg.register("feature-recommender-online", tmp_path / "snap", kind="state")
    publish_bundle(reg, bundle, tmp_path / "bundle")
    port = _free_port()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurerec.cli", "--data-dir", str(data), "serve",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    acknowledged: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        with httpx.Client(base_url=url) as c:
            for i in range(60):
                r = c.get("/api/v1/recommendations", params={"user_id": f"usr_{i:06d}"})
                assert r.status_code == 200
                acknowledged += [x["recommendation_id"] for x in r.json()["recommendations"]]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert len(acknowledged) > 60
    logged = {r["recommendation_id"] for r in iter_recommendations(data / "serving" / "log")}
    assert set(acknowledged) <= logged


def test_snapshot_round_trip(fixture, tmp_path: Path) -> None:
    snap, _ = fixture
    snap.save(tmp_path / "s")
    back = OnlineSnapshot.load(tmp_path / "s")
    assert back.features == snap.features and back.n_users == snap.n_users
    np.testing.assert_array_equal(back.adopted, snap.adopted)
    np.testing.assert_array_equal(back.recent, snap.recent)
    assert back.transitions == snap.transitions and back.flags == snap.flags
    (tmp_path / "s" / "users.npz").write_bytes(b"garbage")
    with pytest.raises(Exception, match="missing or corrupt"):
        OnlineSnapshot.load(tmp_path / "s")


def test_group_commit_writes_every_line_once_with_fewer_syncs(tmp_path: Path) -> None:
    import asyncio

    from featurerec.serving.reclog import DurableLog

    log = DurableLog(tmp_path, RECLOG_PREFIX, fsync=True, inline_below_ms=0.0)  # threaded path

    async def main() -> None:
        await asyncio.gather(
            *(log.append_async([{"recommendation_id": f"r{i}", "n": i}]) for i in range(500))
        )

    asyncio.run(main())
    log.close()
    ids = [r["recommendation_id"] for r in iter_records(tmp_path, RECLOG_PREFIX)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(500))
    assert log.records_written == 500 and log.commits < 500


def test_snapshot_reads_the_pipeline_transforms_tables() -> None:
    """The snapshot built from PIPE's real Stage 3 tables (not the fixture's stand-ins)."""
    from featurerec.warehouse.transforms import build_features

    settings = Settings.model_validate({"windows": {"min_transition_count": 3}})
    with DuckDBEngine(":memory:") as engine:
        fill_fixture_warehouse(engine, n_users=120, seed=8)
        for t in ("ml.user_feature_interactions", "ml.feature_transition_probs"):
            engine.execute(f"DROP TABLE {t}")
        build_features(engine, settings, FIXTURE_AS_OF)
        snap = build_snapshot(engine, settings, FIXTURE_AS_OF)
        probs = engine.query_rows(
            "SELECT from_feature, to_feature, transition_count, from_total "
            "FROM ml.feature_transition_probs"
        )
    assert snap.n_users == 120 and snap.transitions
    got = {(t.from_feature, t.to_feature): (t.count, t.from_total) for t in snap.transitions}
    assert got == {
        (r["from_feature"], r["to_feature"]): (r["transition_count"], r["from_total"])
        for r in probs
    }
    assert 0 < snap.strength.max() <= 1 and (snap.strength[~snap.adopted] == 0).all()
