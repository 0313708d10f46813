"""Discovery SQL pinned on a tiny hand-built warehouse (every number worked out by hand)."""

from __future__ import annotations

import json
from datetime import date, datetime

import pytest
from typer.testing import CliRunner

from featurerec.analysis.discovery import (
    ColdStartRow,
    ColdStartShare,
    WeeklyVolume,
    discovery_report,
    latest_event_time,
)
from featurerec.cli import app
from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.warehouse.engine import DuckDBEngine

AS_OF = datetime(2026, 3, 4, 12, 0)  # a Wednesday

EVENTS = [
    # event_id, user, workspace, type, feature, first_use, timestamp
    ("e1", "u1", "ws1", "feature_used", "forms", None, "2026-02-17 23:59:00"),
    ("e2", "u1", "ws1", "feature_used", "forms", True, "2026-02-18 00:00:00"),
    ("e3", "u2", "ws1", "feature_used", "kanban_boards", False, "2026-02-20 10:00:00"),
    ("e4", "u2", "ws1", "feature_used", "kanban_boards", True, "2026-02-24 10:00:00"),
    ("e5", "u3", "ws2", "feature_used", "forms", None, "2026-03-02 09:00:00"),
    ("e6", "u3", "ws2", "page_viewed", None, None, "2026-03-03 09:00:00"),
    ("e7", "u1", "ws1", "feature_used", "forms", True, "2026-03-04 12:00:01"),  # after as-of
    ("e8", "u4", "ws3", "feature_used", "automations", True, "2026-03-04 11:00:00"),
    *[
        (f"u7_{i}", "u7", "ws1", "feature_used", "timelines", None, f"2026-02-1{i} 08:00:00")
        for i in range(5)
    ],
]
USERS = [
    ("u1", "ws1", "project_manager", "2026-01-01"),
    ("u2", "ws1", "developer", "2026-02-18"),
    ("u3", "ws2", "developer", "2026-03-01"),
    ("u4", "ws3", "project_manager", "2026-03-04"),  # workspace row missing
    ("u5", "ws2", "developer", "2026-03-05"),  # signs up after the as-of date
    ("u6", "ws1", "developer", "2026-02-25"),  # no events
    ("u7", "ws1", "developer", "2025-06-01"),
]
WORKSPACES = [("ws1", "pro", 12), ("ws2", "free", 3)]
FLAGS = [
    ("f_forms", "forms", True, 100.0),
    ("f_kanban", "kanban_boards", True, 80.0),
    ("f_auto", "automations", False, 100.0),
    ("f_gantt", "gantt_charts", True, 50.0),
]


def build(db: DuckDBEngine) -> None:
    for e in EVENTS:
        db.execute(
            "INSERT INTO events (event_id, user_id, workspace_id, event_type, feature_category, "
            "is_first_use, timestamp) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            dict(zip(["1", "2", "3", "4", "5", "6", "7"], e, strict=True)),
        )
    for u in USERS:
        db.execute(
            "INSERT INTO users (user_id, workspace_id, role, signup_date) VALUES ($a, $b, $c, $d)",
            dict(zip("abcd", u, strict=True)),
        )
    for w in WORKSPACES:
        db.execute(
            "INSERT INTO workspaces (workspace_id, plan, seat_count) VALUES ($a, $b, $c)",
            dict(zip("abc", w, strict=True)),
        )
    for f in FLAGS:
        db.execute(
            "INSERT INTO feature_flags (flag_id, name, enabled, rollout_percentage) "
            "VALUES ($a, $b, $c, $d)",
            dict(zip("abcd", f, strict=True)),
        )


@pytest.fixture
def db():
    with DuckDBEngine(":memory:") as engine:
        build(engine)
        yield engine


SETTINGS = Settings.model_validate({"windows": {"discovery_weeks": 2}})


def test_weekly_volume(db):
    rep = discovery_report(db, SETTINGS, AS_OF)
    assert rep.weekly_volume == [
        WeeklyVolume(date(2026, 2, 16), 2, 2, 2, 1),
        WeeklyVolume(date(2026, 2, 23), 1, 1, 1, 1),
        WeeklyVolume(date(2026, 3, 2), 2, 2, 2, 1),
    ]


def test_feature_ontology(db):
    rows = discovery_report(db, SETTINGS, AS_OF).ontology
    assert [r.feature_name for r in rows] == ["forms", "kanban_boards", "gantt_charts"]
    forms, kanban, gantt = rows
    assert (forms.users_30d, forms.workspaces_30d, forms.events_30d) == (2, 2, 3)
    assert forms.first_event == datetime(2026, 2, 17, 23, 59)
    assert forms.last_event == datetime(2026, 3, 2, 9, 0)
    assert forms.adoption_rate == pytest.approx(2 / 5)  # 5 active users: u1 u2 u3 u4 u7
    assert (kanban.users_30d, kanban.events_30d, kanban.rollout_percentage) == (1, 2, 80.0)
    assert kanban.adoption_rate == pytest.approx(1 / 5)
    assert (gantt.users_30d, gantt.workspaces_30d, gantt.events_30d) == (0, 0, 0)
    assert gantt.first_event is None and gantt.adoption_rate == 0


def test_cold_start_profile_and_share(db):
    rep = discovery_report(db, SETTINGS, AS_OF)
    assert rep.cold_start == [
        ColdStartRow("developer", "pro", "medium", 2, 1.0, 0.5),  # u2 (2 ev, 1 feat), u6 (0)
        ColdStartRow("developer", "free", "small", 1, 2.0, 1.0),  # u3: e5 + e6 (no feature)
        ColdStartRow("project_manager", None, "small", 1, 1.0, 1.0),  # u4, no workspace row
    ]
    assert rep.cold_start_share == ColdStartShare(5, 4, 0.8, 5)  # u7 has 5 feature_used


def test_as_of_defaults_to_latest_event_and_windows_move_with_it(db):
    assert latest_event_time(db) == datetime(2026, 3, 4, 12, 0, 1)
    rep = discovery_report(db, SETTINGS)
    assert rep.as_of == datetime(2026, 3, 4, 12, 0, 1)
    assert rep.weekly_volume[-1].total_events == 3  # e7 now inside
    earlier = discovery_report(db, SETTINGS, datetime(2026, 2, 21))
    # u7 (5 events, week of 02-09) and e1 (02-17) are now inside; e4 and later are not.
    assert [w.total_events for w in earlier.weekly_volume] == [5, 3]


def test_empty_warehouse_is_a_clear_error():
    with (
        DuckDBEngine(":memory:") as db,
        pytest.raises(DataError, match="no events in the warehouse"),
    ):
        discovery_report(db, SETTINGS)


def test_report_discovery_command_json(tmp_path):
    s = Settings.model_validate({"data_dir": str(tmp_path / "d")})
    with DuckDBEngine(s.warehouse_path) as db:
        build(db)
    res = CliRunner().invoke(
        app,
        [
            "--data-dir",
            str(tmp_path / "d"),
            "report",
            "discovery",
            "--as-of",
            "2026-03-04T12:00:00",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["as_of"] == "2026-03-04T12:00:00"
    assert [o["feature_name"] for o in out["ontology"]] == [
        "forms",
        "kanban_boards",
        "gantt_charts",
    ]
    assert out["cold_start_share"]["cold_start_share"] == 0.8
    table = CliRunner().invoke(app, ["--data-dir", str(tmp_path / "d"), "report", "discovery"])
    assert table.exit_code == 0 and "feature ontology" in table.stdout
