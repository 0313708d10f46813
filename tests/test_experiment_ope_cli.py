"""`featurerec experiment ope` on a deployment's own log: serve through the real service,
load the log, attribute, then estimate a candidate from the logged propensities and the
logged decision contexts (the user state and eligibility of each request)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from featurerec.cli import app
from featurerec.config import Settings
from featurerec.experiments.offline import (
    evaluate,
    load_exposure_history,
    load_logged_decisions,
    target_slate_dist,
)
from featurerec.feedback.attribution import attribute
from featurerec.registry import registry_for
from featurerec.serving.app import ServingRuntime
from featurerec.serving.deployment import deployment_for
from featurerec.serving.eligibility import EligibilityRules, Exposure, exposure_exclude
from featurerec.serving.loader import load_model
from featurerec.serving.reclog import load_reclog, reclog_dir
from featurerec.serving.service import RecommendationRequest
from featurerec.serving.testing import (
    FIXTURE_FEATURES,
    fill_fixture_warehouse,
    publish_fixture_world,
)
from featurerec.warehouse.engine import open_warehouse

#: Each feature's click probability when shown (the "true" response model of this log).
CLICK_P = dict(zip(FIXTURE_FEATURES, np.linspace(0.02, 0.3, len(FIXTURE_FEATURES)), strict=True))
EXPLORATION = 0.5


@pytest.fixture(scope="module")
def logged_world(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Settings, Path, datetime, int]:
    """A data dir whose served log (decision contexts, clicks) is waiting to be loaded;
    returns the settings, the config file, an as-of time 8 days after the last request and
    how many requests served something."""
    root = tmp_path_factory.mktemp("ope_world")
    dep = json.loads(
        (Path(__file__).parents[1] / "src/featurerec/configs/deployment.json").read_text()
    )
    dep["deployment"]["models"]["ranker"]["exploration_rate"] = EXPLORATION
    (root / "deployment.json").write_text(json.dumps(dep))
    config = root / "featurerec.toml"
    config.write_text(
        f'data_dir = "{root / "data"}"\n\n[serving]\ndeployment = "{root / "deployment.json"}"\n'
        "durable_log = false\n"
    )
    settings = Settings.model_validate(
        {
            "data_dir": str(root / "data"),
            "serving": {"deployment": str(root / "deployment.json"), "durable_log": False},
        }
    )
    with open_warehouse(settings) as engine:
        fill_fixture_warehouse(engine, n_users=300, seed=5)
        publish_fixture_world(engine, settings, root / "work")

    # serve every user three times, with clicks drawn from CLICK_P
    rng = np.random.default_rng(11)
    rt = ServingRuntime.from_settings(settings)
    last = datetime(2000, 1, 1)
    served = 0
    try:
        users = [f"usr_{i:06d}" for i in range(300)]
        for r in range(3):
            for u in users:
                res = rt.service.recommend(RecommendationRequest(u, request_id=f"{u}-{r}"))
                rt.reclog.append(res.log_lines())
                last = max(last, res.generated_at)
                served += bool(res.recommendations)
                clicks = [
                    {
                        "feedback_id": f"{it.recommendation_id}:click",
                        "recommendation_id": it.recommendation_id,
                        "user_id": u,
                        "kind": "click",
                        "timestamp": res.generated_at + timedelta(seconds=30),
                    }
                    for it in res.recommendations
                    if rng.random() < CLICK_P[it.feature]
                ]
                rt.feedback_log.append(clicks)
    finally:
        rt.close()
    return settings, config, last.replace(tzinfo=None) + timedelta(days=8), served


def _decisions(logged_world, *feature_lists: list[str]) -> tuple[Any, Any, list[Any]]:
    """The settings, the logging model and the logged decisions (in the model's item order,
    then in each of ``feature_lists``), after loading the log (idempotent: whichever test
    runs first) and attribution."""
    settings, _config, as_of, _ = logged_world
    model = load_model(registry_for(settings), deployment_for(settings))
    with open_warehouse(settings) as engine:
        load_reclog(engine, reclog_dir(settings))
        attribute(engine, as_of=as_of)
        out = [
            load_logged_decisions(engine, f, as_of=as_of) for f in (model.features, *feature_lists)
        ]
    return settings, model, out


def _cli(config: Path, *args: str) -> str:
    res = CliRunner().invoke(app, ["--config", str(config), *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_logging_policy_replayed_on_its_own_log_gives_the_logged_rate(logged_world) -> None:
    """Through the README's commands. The candidate is the logging policy itself, so if the
    logged contexts replay its decisions exactly every importance weight is 1 and IPS equals
    the logged CTR; a context that was logged wrong (state or eligibility) would change some
    weights."""
    _, config, as_of, served = logged_world
    out = json.loads(_cli(config, "reclog", "load", "--json"))
    assert out["recommendations_read"] > 1500 and out["contexts_read"] == served > 600
    _cli(config, "feedback", "attribute", "--as-of", f"{as_of:%Y-%m-%dT%H:%M:%S}")
    ope = ["experiment", "ope", "--as-of", f"{as_of:%Y-%m-%dT%H:%M:%S}", "--since", "2026-01-01",
           "--exposure", "logged"]  # fmt: skip
    got = json.loads(_cli(config, *ope, "--json"))
    assert got["exposure"] == "logged"
    assert got["requests"] == served and got["missing_context"] == 0
    ctr = got["results"]["click_through_rate"]
    logged = ctr["logged"]["value"]
    for name in ("ips", "snips"):
        assert ctr["estimates"][name]["value"] == pytest.approx(logged, abs=1e-9), name
    # DR adds the reward model's E_pi[q] - q(logged item), zero only in expectation
    dr = ctr["estimates"]["dr"]
    assert dr["ci_low"] <= logged <= dr["ci_high"]
    assert ctr["estimates"]["ips"]["max_weight"] == pytest.approx(1.0)
    assert ctr["estimates"]["ips"]["effective_sample_size"] == pytest.approx(ctr["n"])
    # the table form says the same
    text = _cli(config, *ope)
    for column in ("logged policy", "snips", "ESS", "max weight", "showing"):
        assert column in text
    assert "one-step" in text
    # the default replays the candidate with its own exposure: its slates are drawn, not the
    # logged ones, so the weights are no longer all 1, but for the logging policy itself the
    # draws follow the log's own distribution and the estimate still covers the logged rate
    own = json.loads(_cli(config, *ope[:-2], "--json"))
    assert own["exposure"] == "own" and own["no_exposure_log"] == 0
    est = own["results"]["click_through_rate"]["estimates"]
    assert est["ips"]["max_weight"] > 1
    for name in ("snips", "dr"):
        assert est[name]["ci_low"] <= logged <= est[name]["ci_high"], name
    assert "replayed with its own exposure" in _cli(config, *ope[:-2])


def test_another_strategy_is_estimated_near_its_true_ctr(logged_world) -> None:
    """Replay the random strategy on the log: its true CTR on these decisions is known
    (CLICK_P averaged over its slate distribution), and SNIPS must cover it."""
    _, model, (d,) = _decisions(logged_world)
    assert d.n > 1500 and d.missing_context == 0
    requests = np.arange(len(d.users))
    dist = target_slate_dist(model, "random", d.users, d.exclude_rows(requests), 3, 20, 1.0)
    p = np.array([CLICK_P[f] for f in model.features])
    # the random strategy's expected CTR at each logged slot, averaged over the rounds
    truth = float((dist[d.request, :, d.position] @ p).mean())
    res = evaluate(d, lambda req, _exclude: dist[req])["click_through_rate"]
    assert not isinstance(res, str)
    snips = res.estimates["snips"]
    assert snips.ci_low <= truth <= snips.ci_high
    # and it is not the logging policy's rate: the estimate moved with the target
    assert abs(truth - res.logged.value) > 0.01


def test_items_the_candidate_does_not_know_count_with_weight_zero(logged_world) -> None:
    """A candidate without one of the logged items never shows it: those rounds stay in the
    log with importance weight 0 (dropping them would inflate IPS)."""
    settings = logged_world[0]
    kept = load_model(registry_for(settings), deployment_for(settings)).features[1:]
    _, model, (full, less) = _decisions(logged_world, kept)
    shown_gone = int((full.action == 0).sum())
    assert shown_gone > 0 and less.unknown_action == shown_gone and less.n == full.n
    assert (less.action == len(kept)).sum() == shown_gone
    # the logging policy's own distribution without the removed item's column
    requests = np.arange(len(full.users))
    dist = target_slate_dist(model, "sequence_aware", full.users, full.exclude_rows(requests),
                             3, 20, EXPLORATION)[:, 1:, :]  # fmt: skip
    res = evaluate(less, lambda req, _exclude: dist[req])["click_through_rate"]
    assert not isinstance(res, str)
    # every other round has weight 1; the candidate's rate is per recommendation it shows,
    # and the slots where the log showed the removed item it would show it with its mass
    clicked = full.rounds.clicked.astype(float)
    shown = dist[less.request, :, less.position].sum(axis=1)
    want = float(clicked[full.action != 0].sum() / shown.sum())
    assert res.estimates["ips"].value == pytest.approx(want)
    # dropping those rounds would have left their mass out of the denominator
    kept_rounds = full.action != 0
    assert want != pytest.approx(clicked[kept_rounds].sum() / shown[kept_rounds].sum())


def test_contexts_record_the_eligibility_serving_applied(logged_world) -> None:
    """No logged item is outside the eligible set its context recorded."""
    settings, _config, _as_of, served = logged_world
    with open_warehouse(settings) as engine:
        load_reclog(engine, reclog_dir(settings))
        assert engine.scalar("SELECT COUNT(*) FROM ml.recommendation_context") == served
        rows = engine.query_rows(
            "SELECT c.eligible, c.excluded, l.recommended_feature "
            "FROM ml.recommendation_log l JOIN ml.recommendation_context c USING (request_id)"
        )
    assert rows
    for r in rows:
        if r["eligible"] is not None:
            assert r["recommended_feature"] in orjson.loads(r["eligible"])
        else:
            assert r["recommended_feature"] not in orjson.loads(r["excluded"])


def test_ope_errors_name_what_was_wrong(tmp_path, logged_world) -> None:
    """A bad date names the option; a log with nothing to evaluate says what to run.
    (``featurerec.cli.main`` prints these errors as one line and exits 2.)"""
    from featurerec.errors import FeaturerecError

    _, config, as_of, _ = logged_world
    res = CliRunner().invoke(
        app, ["--config", str(config), "experiment", "ope", "--since", "nonsense"]
    )
    assert isinstance(res.exception, FeaturerecError)
    assert "--since" in str(res.exception) and "nonsense" in str(res.exception)
    res = CliRunner().invoke(
        app,
        [
            "--config",
            str(config),
            "experiment",
            "ope",
            "--as-of",
            f"{as_of:%Y-%m-%d}",
            "--since",
            "2020-01-01",
            "--until",
            "2020-02-01",
        ],
    )
    assert isinstance(res.exception, FeaturerecError)
    assert "no logged recommendations" in str(res.exception)
    assert "featurerec reclog load" in str(res.exception)


def test_evaluation_does_not_depend_on_the_chunking(logged_world, monkeypatch) -> None:
    """Chunks of 7 requests give the same estimates as one chunk: only per-round terms are
    kept between chunks."""
    from featurerec.experiments import offline

    _, model, (d,) = _decisions(logged_world)
    requests = np.arange(len(d.users))
    dist = target_slate_dist(model, "collaborative_only", d.users, d.exclude_rows(requests),
                             3, 20, EXPLORATION)  # fmt: skip
    calls: list[int] = []

    def dist_fn(req: np.ndarray, _exclude: np.ndarray) -> np.ndarray:
        calls.append(len(req))
        return dist[req]

    whole = evaluate(d, dist_fn)
    assert calls == [len(d.users)]
    monkeypatch.setattr(offline, "CHUNK_CELLS", 7 * len(d.features) * 3)
    calls.clear()
    chunked = evaluate(d, dist_fn)
    assert max(calls) == 7 and sum(calls) == len(d.users)
    for metric, res in whole.items():
        other = chunked[metric]
        assert not isinstance(res, str) and not isinstance(other, str)
        for name, est in res.estimates.items():
            assert other.estimates[name] == pytest.approx(est), (metric, name)
        assert other.empty_mass == pytest.approx(res.empty_mass)


def test_rounds_served_inside_experiments_are_used_unless_excluded(logged_world, tmp_path):
    """A deployment that always runs an experiment still has a log to judge candidates on:
    the variants' rounds carry their own propensities. --no-experiments leaves them out."""
    import shutil

    settings, _config, as_of, _ = logged_world
    data = tmp_path / "data"
    shutil.copytree(settings.data_path, data)
    copy = Settings.model_validate(
        {"data_dir": str(data), "serving": settings.serving.model_dump()}
    )
    with open_warehouse(copy) as engine:
        load_reclog(engine, reclog_dir(copy))
        engine.execute(
            "UPDATE ml.recommendation_log SET experiment = 'exp', variant = 'a' "
            "WHERE hash(user_id) % 2 = 0"
        )
        attribute(engine, as_of=as_of)
        n_exp = engine.scalar(
            "SELECT COUNT(*) FROM ml.recommendation_feedback WHERE experiment = 'exp'"
        )
    config = tmp_path / "featurerec.toml"
    config.write_text(
        f'data_dir = "{data}"\n\n[serving]\ndeployment = "{copy.serving.deployment}"\n'
    )
    ope = ["experiment", "ope", "--as-of", f"{as_of:%Y-%m-%dT%H:%M:%S}", "--since", "2026-01-01",
           "--exposure", "logged"]  # fmt: skip
    every = json.loads(_cli(config, *ope, "--json"))
    outside = json.loads(_cli(config, *ope, "--no-experiments", "--json"))
    assert n_exp > 0 and every["rounds"] == outside["rounds"] + n_exp
    # the same logging policy served both halves: every weight is still 1
    assert every["results"]["click_through_rate"]["estimates"]["ips"]["max_weight"] == 1.0


def test_logged_exposure_exclusions_and_the_log_reproduce_the_logged_eligibility(
    logged_world,
) -> None:
    """What a self-exposure replay relies on: at every logged request, the logged eligibility
    without its logged ``exposure_excluded`` items, plus serving's exposure rules applied to
    what the log had shown that user before, is exactly the logged eligibility."""
    settings, model, (d,) = _decisions(logged_world)
    with open_warehouse(settings) as engine:
        history = load_exposure_history(engine, model.features, before=logged_world[2], days=30)
    rules = EligibilityRules.from_settings(settings.serving)
    given_back = 0
    for q, user in enumerate(d.users):
        listed = d.exposure_listed[q]
        assert listed is not None
        logged = d.exclude_rows(np.array([q]))[0]
        assert logged[listed].all()  # only excluded items are listed
        base = logged.copy()
        base[listed] = False
        now = float(d.times[q])
        exposure = Exposure.empty(len(model.features))
        for ts, j in history.shows.get(user.user_id, []):
            if now - 7 * 86_400 < ts < now:
                exposure.shown_7d[j] += 1
        got, _ = exposure_exclude(rules, base, exposure, now, 3)
        assert (got == logged).all(), q
        given_back += listed.size
    assert given_back > 100  # the exposure rules did exclude items in this log
