"""Attribution pinned on a hand-built log: clicks, dismissals, adoption windows, idempotency,
late events."""

from __future__ import annotations

import pytest

from featurerec.errors import DataError
from featurerec.feedback.attribution import attribute
from featurerec.warehouse.engine import DuckDBEngine
from test_feedback_fixtures import add_event, add_feedback, add_rec, d, feedback_rows, h


@pytest.fixture
def db():
    with DuckDBEngine(":memory:") as engine:
        # r1: clicked after 1h, adopted after 3 days -> adopted_7d and adopted_30d
        add_rec(engine, "r1", "u1", "automations", d(0))
        add_feedback(engine, "r1", "impression", d(0), "u1")
        add_feedback(engine, "r1", "click", h(1), "u1")
        add_feedback(engine, "r1", "click", h(2), "u1")  # second click: first one counts
        add_event(engine, "u1", "automations", d(3), first_use=True)
        # r2: dismissed, adopted after 10 days -> adopted_30d only
        add_rec(engine, "r2", "u2", "gantt_charts", d(0))
        add_feedback(engine, "r2", "dismiss", h(5), "u2")
        add_event(engine, "u2", "gantt_charts", d(10), first_use=True)
        # r3: user had already adopted the feature before the rec -> not credited
        add_rec(engine, "r3", "u3", "forms", d(1))
        add_event(engine, "u3", "forms", d(0.5), first_use=True)
        # r4: first use of ANOTHER feature, and a non-first use of the recommended one
        add_rec(engine, "r4", "u4", "api_access", d(1))
        add_event(engine, "u4", "forms", d(2), first_use=True)
        add_event(engine, "u4", "api_access", d(2), first_use=False)
        # r5: generated after the as-of used below -> not attributed yet
        add_rec(engine, "r5", "u5", "timelines", d(20))
        yield engine


def test_attribution_pinned(db: DuckDBEngine) -> None:
    rep = attribute(db, as_of=d(15))
    rows = feedback_rows(db)
    assert set(rows) == {"r1", "r2", "r3", "r4"}
    pinned = {
        k: (r["clicked"], r["dismissed"], r["adopted_7d"], r["adopted_30d"])
        for k, r in rows.items()
    }
    assert pinned == {
        "r1": (1, 0, 1, 1),
        "r2": (0, 1, 0, 1),
        "r3": (0, 0, 0, 0),
        "r4": (0, 0, 0, 0),
    }
    assert rows["r1"]["click_timestamp"] == h(1)
    assert rows["r1"]["first_use_timestamp"] == d(3)
    assert rows["r2"]["first_use_timestamp"] == d(10)
    assert rows["r3"]["first_use_timestamp"] is None
    assert rows["r1"]["strategy"] == "hybrid" and rows["r1"]["propensity"] == 0.5
    assert (rep.added, rep.clicked, rep.dismissed, rep.adopted_7d, rep.adopted_30d) == (
        4,
        1,
        1,
        1,
        2,
    )


def test_as_of_hides_later_feedback(db: DuckDBEngine) -> None:
    attribute(db, as_of=d(2))
    rows = feedback_rows(db)
    assert rows["r1"]["clicked"] == 1 and rows["r1"]["adopted_7d"] == 0  # first use is at d(3)
    assert rows["r2"]["adopted_30d"] == 0


def test_rerun_adds_nothing(db: DuckDBEngine) -> None:
    attribute(db, as_of=d(15))
    first = feedback_rows(db)
    rep = attribute(db, as_of=d(15))
    assert rep.added == 0
    assert feedback_rows(db) == first


def test_late_events_are_picked_up_while_the_window_is_open(db: DuckDBEngine) -> None:
    attribute(db, as_of=d(15))
    # A click and a first use that arrive late (ingested after the first run).
    add_feedback(db, "r4", "click", d(1.5), "u4")
    add_event(db, "u4", "api_access", d(5), first_use=True)
    rep = attribute(db, as_of=d(15))
    r4 = feedback_rows(db)["r4"]
    assert (r4["clicked"], r4["adopted_7d"], r4["adopted_30d"]) == (1, 1, 1)
    assert rep.added == 0 and rep.recomputed == 4


def test_closed_windows_are_frozen_and_new_recs_added(db: DuckDBEngine) -> None:
    attribute(db, as_of=d(15))
    # 40 days on, r1..r4 have closed windows; r5 is new; an adoption for r3's user now
    # cannot change r3 (its 30-day window closed long ago).
    add_event(db, "u5", "timelines", d(22), first_use=True)
    rep = attribute(db, as_of=d(45))
    rows = feedback_rows(db)
    assert rep.added == 1
    assert rows["r5"]["adopted_7d"] == 1
    assert rows["r2"]["adopted_30d"] == 1  # kept from the first run


def test_default_as_of_is_latest_warehouse_timestamp(db: DuckDBEngine) -> None:
    rep = attribute(db)
    assert rep.as_of == d(20)  # r5's generated_at is the latest thing known
    assert "r5" in feedback_rows(db)


def test_empty_warehouse_is_a_clear_error() -> None:
    with (
        DuckDBEngine(":memory:") as db,
        pytest.raises(DataError, match="no events and no recommendations"),
    ):
        attribute(db)
