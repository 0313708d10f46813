"""`featurerec ingest` and `featurerec sql` from the command line."""

from __future__ import annotations

import json

import orjson
import pytest
from typer.testing import CliRunner

from featurerec.cli import app
from featurerec.errors import DataError
from featurerec.warehouse.cli import check_read_only

runner = CliRunner()


def ev(i: int) -> dict:
    return {
        "event_id": f"e{i}",
        "user_id": "u1",
        "event_type": "feature_used",
        "properties": {"feature_category": "forms"},
        "timestamp": "2026-02-20T10:00:00Z",
    }


def invoke(data_dir, *args: str):
    return runner.invoke(app, ["--data-dir", str(data_dir), *args], catch_exceptions=True)


def test_ingest_json_report_then_sql(tmp_path):
    f = tmp_path / "a.ndjson"
    f.write_text("\n".join(orjson.dumps(ev(i)).decode() for i in range(3)) + "\n{oops\n")
    data = tmp_path / "data"
    res = invoke(data, "ingest", str(f), "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert (rep["accepted"], rep["quarantined"]) == (3, 1)
    assert rep["files"][0]["path"] == str(f)
    res = invoke(data, "sql", "SELECT count(*) AS n FROM events", "--json")
    assert json.loads(res.stdout) == [{"n": 3}]
    res = invoke(data, "sql", "SELECT location FROM ingest_quarantine")
    assert f"{f}:4" in res.stdout
    again = json.loads(invoke(data, "ingest", str(f), "--json").stdout)
    assert again["accepted"] == 0 and again["duplicate"] == 3


def test_ingest_with_map_option(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("id,uid,event_type,ts\na,u,feature_used,2026-02-01T00:00:00Z\n")
    res = invoke(
        tmp_path / "d",
        "ingest",
        str(f),
        "--map",
        "event_id=id",
        "--map",
        "user_id=uid",
        "--map",
        "timestamp=ts",
        "--json",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accepted"] == 1
    bad = invoke(tmp_path / "d", "ingest", str(f), "--map", "user_id")
    assert isinstance(bad.exception, DataError)
    assert "--map expects FIELD=COLUMN" in str(bad.exception)


def test_ingest_missing_path_is_a_clear_error(tmp_path):
    res = invoke(tmp_path / "d", "ingest", str(tmp_path / "nope.ndjson"))
    assert isinstance(res.exception, DataError)
    assert "path not found" in str(res.exception)


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE events",
        "INSERT INTO events (event_id) VALUES ('x')",
        "DELETE FROM users",
        "CREATE TABLE t (a INT)",
        "COPY events TO 'x.csv'",
        "ATTACH 'other.db'",
        "SET threads = 1",
        "SELECT 1; DROP TABLE events",
    ],
)
def test_sql_refuses_anything_but_reads(sql):
    with pytest.raises(DataError, match=r"read-only|exactly one statement"):
        check_read_only(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "WITH a AS (SELECT 1) SELECT * FROM a",
        "SHOW TABLES",
        "DESCRIBE events",
        "FROM events",
        "EXPLAIN SELECT 1",
    ],
)
def test_sql_allows_reads(sql):
    assert check_read_only(sql)


def test_sql_command_refuses_writes_and_leaves_data(tmp_path):
    f = tmp_path / "a.ndjson"
    f.write_text(orjson.dumps(ev(1)).decode() + "\n")
    data = tmp_path / "data"
    invoke(data, "ingest", str(f))
    res = invoke(data, "sql", "DELETE FROM events")
    assert isinstance(res.exception, DataError)
    assert "read-only: DELETE statements are refused" in str(res.exception)
    assert json.loads(invoke(data, "sql", "SELECT count(*) AS n FROM events", "--json").stdout) == [
        {"n": 1}
    ]


def test_ingest_landing_command(tmp_path, settings):
    from featurerec.events.landing import Landing
    from featurerec.events.validate import normalize_records

    data = tmp_path / "data"
    s = settings.with_data_dir(data)
    Landing.for_settings(s).write(normalize_records([ev(1), ev(2)], settings=s, source="http"))
    res = invoke(data, "ingest", "landing", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accepted"] == 2
    assert json.loads(invoke(data, "ingest", "landing", "--json").stdout)["accepted"] == 0
