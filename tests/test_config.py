from __future__ import annotations

import pytest

from featurerec.config import BUILTIN_CONFIGS, ConfigError, Settings, load_settings


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"ingest": {"batch_size": 0}}, r"ingest\.batch_size: .*greater than 0 \(got 0\)"),
        ({"nope": 1}, r"nope: unknown key \(got 1\)"),
        ({"windows": {"interaction_days": "x"}}, r"windows\.interaction_days: .*\(got 'x'\)"),
        ({"serving": {"port": 70000}}, r"serving\.port"),
        ({"catalog": {"features": {"a": {"cta": "x"}}}}, r"catalog\.features\.a\.cta: unknown key"),
    ],
)
def test_bad_values_name_key_and_value(raw, match):
    with pytest.raises(ConfigError, match=match):
        Settings.model_validate(raw)


def test_toml_file_and_overrides(tmp_path):
    cfg = tmp_path / "featurerec.toml"
    cfg.write_text('data_dir = "from-file"\n[windows]\ninteraction_days = 30\n')
    s = load_settings(cfg, environ={})
    assert s.data_dir == "from-file"
    assert s.windows.interaction_days == 30
    assert s.config_dir == str(tmp_path.resolve())
    assert load_settings(cfg, environ={"FEATUREREC_DATA_DIR": "env"}).data_dir == "env"
    assert (
        load_settings(cfg, data_dir="flag", environ={"FEATUREREC_DATA_DIR": "env"}).data_dir
        == "flag"
    )


def test_unknown_key_in_file_names_path(tmp_path):
    cfg = tmp_path / "featurerec.toml"
    cfg.write_text("[ingest]\ninclude = ['a']\n")
    with pytest.raises(ConfigError, match=r"ingest\.include: unknown key"):
        load_settings(cfg, environ={})


def test_default_data_dir_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    assert s.data_dir == ".featurerec"
    assert s.warehouse_path.as_posix() == ".featurerec/warehouse.duckdb"


def test_builtin_paths_resolve():
    s = Settings()
    assert s.resolve("builtin:pipeline.cloudflow.json").parent == BUILTIN_CONFIGS
