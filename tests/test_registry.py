"""Registry: versions, stages, gated promotion, rollback, checksums, atomic registration."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from featurerec.errors import ModelError, SpecError
from featurerec.registry import Registry, check_criteria, failing, parse_uri
from featurerec.registry.criteria import parse_criterion

CRIT = {"ndcg@5": "> 0.35", "hit_rate@3": "> 0.40"}
GOOD = {"ndcg@5": 0.41, "hit_rate@3": 0.47}


def artifact(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"art-{tag}"
    (d / "sub").mkdir(parents=True)
    (d / "model.npz").write_bytes(f"weights-{tag}".encode())
    (d / "sub" / "meta.json").write_text(f'{{"tag": "{tag}"}}')
    return d


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def test_register_records_everything(reg, tmp_path):
    v = reg.register(
        "feature-recommender-mf",
        artifact(tmp_path, "a"),
        params={"factors": 64},
        metrics={"train_loss": 0.5},
        data_window={"as_of": "2026-03-01T12:00:00", "days": 90},
        run_id="run-1",
    )
    assert (v.version, v.stage, v.kind) == (1, "staging", "models")
    assert v.params == {"factors": 64} and v.metrics == {"train_loss": 0.5}
    assert v.data_window["days"] == 90 and v.run_id == "run-1"
    assert v.code_version["package"]
    assert set(v.checksums) == {"model.npz", "sub/meta.json"}
    assert all(len(h) == 64 for h in v.checksums.values())
    got = reg.resolve("models:/feature-recommender-mf/staging")
    assert got.version == 1 and (got.path / "model.npz").read_bytes() == b"weights-a"
    # the copy is independent of the source folder
    shutil.rmtree(tmp_path / "art-a")
    assert reg.resolve("models:/feature-recommender-mf/1").version == 1


def test_new_staging_archives_previous(reg, tmp_path):
    reg.register("m", artifact(tmp_path, "a"))
    reg.register("m", artifact(tmp_path, "b"))
    assert [(v.version, v.stage) for v in reg.versions("m")] == [(1, "archived"), (2, "staging")]
    assert reg.resolve("models:/m/staging").version == 2


def test_promotion_is_gated_by_criteria(reg, tmp_path):
    v = reg.register("m", artifact(tmp_path, "a"))
    with pytest.raises(
        ModelError, match=r"refusing to promote models:/m/1.*ndcg@5 0.3 is not > 0.35"
    ):
        reg.promote("m", 1, criteria=CRIT, metrics={"ndcg@5": 0.30, "hit_rate@3": 0.5})
    with pytest.raises(ModelError, match="hit_rate@3 missing"):
        reg.promote("m", 1, criteria=CRIT, metrics={"ndcg@5": 0.5})
    with pytest.raises(ModelError, match="no promotion criteria configured"):
        reg.promote("m", 1, criteria=None, metrics=GOOD)
    # recorded metrics are used when none are passed
    with pytest.raises(ModelError, match="ndcg@5 missing"):
        reg.promote("m", 1, criteria=CRIT)
    assert reg.get("m", 1).stage == "staging"
    with pytest.raises(ModelError, match="no production version"):
        reg.resolve("models:/m/production")
    reg.update_metrics("m", v.version, GOOD)
    p = reg.promote("m", 1, criteria=CRIT)
    assert p.stage == "production"
    assert reg.resolve("models:/m/production").version == 1
    assert reg.resolve("models:/m/latest").version == 1
    assert p.history[-1]["to"] == "production" and not p.history[-1]["forced"]


def test_forced_promotion_is_logged(reg, tmp_path, caplog):
    reg.register("m", artifact(tmp_path, "a"))
    with caplog.at_level("WARNING"):
        p = reg.promote("m", 1, criteria=CRIT, metrics={"ndcg@5": 0.1}, force=True)
    assert p.stage == "production" and p.history[-1]["forced"]
    assert "forced promotion" in caplog.text
    audit = [orjson.loads(line) for line in (reg.root / "audit.log").read_bytes().splitlines()]
    assert audit[-1]["op"] == "promote" and audit[-1]["forced"] is True


def test_promote_archives_previous_and_rollback(reg, tmp_path):
    for tag in "abc":
        v = reg.register("m", artifact(tmp_path, tag))
        reg.promote("m", v.version, criteria=CRIT, metrics=GOOD)
    assert [(v.version, v.stage) for v in reg.versions("m")] == [
        (1, "archived"),
        (2, "archived"),
        (3, "production"),
    ]
    back = reg.rollback("m")
    assert back.version == 2 and reg.resolve("models:/m/production").version == 2
    assert reg.get("m", 3).stage == "archived"
    assert reg.rollback("m").version == 1
    with pytest.raises(ModelError, match="only version ever in production"):
        reg.rollback("m")


def test_rollback_without_production(reg, tmp_path):
    reg.register("m", artifact(tmp_path, "a"))
    with pytest.raises(ModelError, match="no production version to roll back"):
        reg.rollback("m")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "model.npz").write_bytes(b"tampered"), "checksum mismatch in model.npz"),
        (lambda p: (p / "sub" / "meta.json").unlink(), "partial, missing sub/meta.json"),
        (lambda p: (p / "stray.bin").write_bytes(b"x"), "unexpected file.*stray.bin"),
        (lambda p: shutil.rmtree(p), "artifact folder .* is missing"),
    ],
)
def test_corrupt_artifacts_are_refused_and_production_stays(reg, tmp_path, damage, message):
    reg.register("m", artifact(tmp_path, "a"))
    reg.promote("m", 1, criteria=CRIT, metrics=GOOD)
    v2 = reg.register("m", artifact(tmp_path, "b"))
    damage(v2.path)
    with pytest.raises(ModelError, match=message):
        reg.resolve("models:/m/staging")
    with pytest.raises(ModelError, match=message):
        reg.promote("m", 2, criteria=CRIT, metrics=GOOD)
    assert reg.resolve("models:/m/production").version == 1


def test_registration_is_atomic(reg, tmp_path, monkeypatch):
    src = artifact(tmp_path, "a")

    def broken_copy(a, b, *args, **kwargs):
        Path(b).mkdir(parents=True)
        (Path(b) / "model.npz").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        reg.register("m", src)
    monkeypatch.undo()
    assert reg.versions("m") == []
    assert not any(
        p.name.startswith(".tmp") for p in (reg.root / "models" / "m" / "versions").iterdir()
    )
    assert reg.register("m", src).version == 1


def test_indexes_namespace(reg, tmp_path):
    reg.register("feature-recommender-hnsw", artifact(tmp_path, "i"), kind="indexes")
    with pytest.raises(ModelError, match="no production version"):
        reg.resolve("indexes:/feature-recommender-hnsw/latest")
    reg.promote("feature-recommender-hnsw", 1, criteria=CRIT, metrics=GOOD, kind="indexes")
    assert reg.resolve("indexes:/feature-recommender-hnsw/latest").kind == "indexes"
    assert reg.names("indexes") == ["feature-recommender-hnsw"] and reg.names("models") == []


def test_bad_uris_and_registration(reg, tmp_path):
    for bad in ["models:/", "model:/m/production", "models:/m", "http://x"]:
        with pytest.raises(ModelError, match="invalid registry URI"):
            parse_uri(bad)
    with pytest.raises(ModelError, match="unknown selector 'best'"):
        reg.resolve("models:/m/best")
    with pytest.raises(ModelError, match="does not exist"):
        reg.register("m", tmp_path / "nope")
    with pytest.raises(ModelError, match="directly into 'production'"):
        reg.register("m", artifact(tmp_path, "a"), stage="production")
    with pytest.raises(ModelError, match=r"models:/m/7 is not registered"):
        reg.get("m", 7)


def test_criteria_parsing():
    assert str(parse_criterion("x", ">= 1e-2")) == "x >= 0.01"
    for bad in ["0.35", "> abc", "=> 1", ""]:
        with pytest.raises(SpecError, match="cannot parse"):
            parse_criterion("ndcg@5", bad)
    res = check_criteria(
        {"a": "> 0.5", "b": "<= 2", "c": "> 0"}, {"a": 0.5, "b": 2, "c": float("nan")}
    )
    assert [r.passed for r in res] == [False, True, False]
    assert failing(res)[0] == "a 0.5 is not > 0.5"


def test_state_kind_latest_is_newest(reg, tmp_path):
    reg.register("feature-recommender-online", artifact(tmp_path, "s1"), kind="state")
    reg.register("feature-recommender-online", artifact(tmp_path, "s2"), kind="state")
    assert reg.resolve("state:/feature-recommender-online/latest").version == 2


def test_rollback_a_whole_run(reg, tmp_path):
    for run in ("r1", "r2"):
        for kind, name in (("models", "mf"), ("models", "bandit"), ("indexes", "hnsw")):
            v = reg.register(name, artifact(tmp_path, f"{run}{name}"), kind=kind, run_id=run)
            reg.promote(name, v.version, criteria=CRIT, metrics=GOOD, kind=kind)
    with pytest.raises(ModelError, match="no production model or index comes from run 'r1'"):
        reg.rollback_run("r1")
    back = reg.rollback_run("r2")
    assert sorted((v.kind, v.name, v.version) for v in back) == [
        ("indexes", "hnsw", 1),
        ("models", "bandit", 1),
        ("models", "mf", 1),
    ]
    assert reg.resolve("indexes:/hnsw/latest").run_id == "r1"
    with pytest.raises(ModelError, match="has no earlier production version"):
        reg.rollback_run("r1")
    assert reg.resolve("models:/mf/production").run_id == "r1"  # nothing changed
