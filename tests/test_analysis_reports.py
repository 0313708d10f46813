"""Stage 5 reports and the impact report pinned on hand-built warehouses."""

from __future__ import annotations

import numpy as np
import pytest

from featurerec.analysis.reports import cold_start, diversity, impact, popularity_bias
from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.feedback.attribution import attribute
from featurerec.warehouse.engine import DuckDBEngine
from test_feedback_fixtures import add_event, add_feedback, add_rec, d

AS_OF = d(30)


def test_popularity_bias_pinned(settings: Settings) -> None:
    with DuckDBEngine(":memory:") as db:
        # usage: kanban 3 users, automations 1 user (forms never used)
        for u in ("u1", "u2", "u3"):
            add_event(db, u, "kanban_boards", d(20))
        add_event(db, "u1", "automations", d(21))
        # recs last 7 days: automations x3, forms x1; an old rec (d 10) is outside the window
        for i, f in enumerate(["automations", "automations", "automations", "forms"]):
            add_rec(db, f"r{i}", f"u{i}", f, d(27))
        add_rec(db, "old", "u1", "kanban_boards", d(10))
        rep = popularity_bias(db, settings, as_of=AS_OF)
    rows = {r.feature: r for r in rep.rows}
    assert set(rows) == {"automations", "forms", "kanban_boards"}
    assert rows["automations"].rec_share == pytest.approx(0.75)
    assert rows["automations"].usage_share == pytest.approx(0.25)
    assert rows["automations"].popularity_bias == pytest.approx(0.5)
    assert rows["kanban_boards"].rec_share == 0 and rows[
        "kanban_boards"
    ].popularity_bias == pytest.approx(-0.75)
    assert rows["kanban_boards"].assessment == "never recommended"
    assert rows["forms"].assessment == "recommended, not used yet"
    assert rep.rows[0].feature == "automations"  # sorted by bias


def test_cold_start_segments_and_random_baseline(settings: Settings) -> None:
    with DuckDBEngine(":memory:") as db:
        # cold user c (2 events before its recs), warm user w (10 events), active a (60)
        for i in range(2):
            add_event(db, "c", "kanban_boards", d(1 + i * 0.01))
        for i in range(10):
            add_event(db, "w", "kanban_boards", d(1 + i * 0.01))
        for i in range(60):
            add_event(db, "a", "kanban_boards", d(1 + i * 0.001))
        n = 0
        for user in ("c", "w", "a"):
            for strategy, clicks in (("hybrid", 2), ("random", 1)):
                for k in range(4):
                    n += 1
                    add_rec(db, f"r{n}", user, "forms", d(5), strategy=strategy)
                    if k < clicks:
                        add_feedback(db, f"r{n}", "click", d(5.1))
        # events AFTER the recs must not move c out of the cold segment
        for i in range(10):
            add_event(db, "c", "kanban_boards", d(6 + i * 0.01))
        attribute(db, as_of=AS_OF)
        rep = cold_start(db, settings, as_of=AS_OF)
    rows = {r.segment: r for r in rep.rows}
    assert list(rows) == ["cold", "warm", "active"]
    for seg in rows.values():
        assert seg.recommendations == 4 and seg.random_recommendations == 4
        assert seg.click_through_rate == pytest.approx(0.5)
        assert seg.random_click_through_rate == pytest.approx(0.25)
        assert seg.ctr_vs_random == pytest.approx(2.0)
    assert rep.note == ""


def test_diversity_distribution(settings: Settings) -> None:
    with DuckDBEngine(":memory:") as db:
        # u1: 4 recs, 2 unique -> 0.5 ; u2: 3 recs 3 unique -> 1.0 ; u3: 2 recs 1 unique -> 0.5
        for i, f in enumerate(["a", "a", "b", "b"]):
            add_rec(db, f"x{i}", "u1", f, d(28))
        for i, f in enumerate(["a", "b", "c"]):
            add_rec(db, f"y{i}", "u2", f, d(28))
        for i, f in enumerate(["a", "a"]):
            add_rec(db, f"z{i}", "u3", f, d(28))
        rep = diversity(db, settings, as_of=AS_OF)
    assert rep.distribution == [(0.5, 2), (1.0, 1)]
    assert rep.mean == pytest.approx(2 / 3) and rep.median == pytest.approx(0.5)
    assert rep.share_below_target == pytest.approx(2 / 3)


def _impact_world(db: DuckDBEngine, rng: np.random.Generator) -> None:
    """Before the launch (d 0-30) users adopt a new feature with p=0.2, after with p=0.5."""
    db.execute("INSERT INTO workspaces (workspace_id, churned_at) VALUES ('ws_1', NULL)")
    for period, p in ((0, 0.2), (30, 0.5)):
        for i in range(150):
            u = f"p{period}_u{i}"
            add_event(
                db, u, "kanban_boards", d(period + 1), first_use=True, workspace=f"ws_{i % 10}"
            )
            if rng.random() < p:
                add_event(
                    db, u, "automations", d(period + 3), first_use=True, workspace=f"ws_{i % 10}"
                )


def test_impact_before_after_launch(settings: Settings) -> None:
    rng = np.random.default_rng(0)
    with DuckDBEngine(":memory:") as db:
        _impact_world(db, rng)
        rep = impact(db, settings, launch=d(30), window_days=30, n_boot=300)
        rows = {r.metric: r for r in rep.rows}
        ad = rows["feature adoption rate (30d)"]
        # kanban is how users arrive (not an adoption); automations is: p 0.2 -> 0.5
        ttv = rows["time to value (new users)"]
        assert ad.before == pytest.approx(ttv.n_before / 150)
        assert ad.after == pytest.approx(ttv.n_after / 150)
        assert ad.change_ci[0] > 0
        assert ttv.before == pytest.approx(2.0) and ttv.after == pytest.approx(2.0)
        assert 0.1 < ttv.n_before / 150 < 0.35 and 0.35 < ttv.n_after / 150 < 0.65
        fpw = rows["features adopted per workspace"]
        want = db.query_rows(
            "SELECT AVG(n) AS m FROM (SELECT workspace_id, COUNT(DISTINCT feature_category) AS n"
            " FROM events WHERE timestamp < $t GROUP BY workspace_id)",
            {"t": d(30)},
        )[0]["m"]
        assert fpw.n_before == 10 and fpw.before == pytest.approx(want)
        assert 1.5 < fpw.before <= 2.0
        assert fpw.before_ci[0] <= fpw.before <= fpw.before_ci[1]
    with DuckDBEngine(":memory:") as db, pytest.raises(DataError, match="exactly one of"):
        impact(db, settings)


def test_impact_control_vs_treatment(settings: Settings) -> None:
    with DuckDBEngine(":memory:") as db:
        rng = np.random.default_rng(1)
        for i in range(300):
            u, v = f"u{i}", ("control" if i % 2 else "treat")
            db.execute("INSERT INTO ab_assignments VALUES ('exp', $u, $v, NULL)", {"u": u, "v": v})
            add_event(db, u, "kanban_boards", d(10), workspace=f"ws_{i}")
            if rng.random() < (0.6 if v == "treat" else 0.2):
                add_event(db, u, "automations", d(12), first_use=True, workspace=f"ws_{i}")
        rep = impact(db, settings, experiment="exp", control="control", as_of=d(20), n_boot=300)
    ad = {r.metric: r for r in rep.rows}["feature adoption rate (30d)"]
    assert rep.groups == ("control", "treat")
    assert 0.1 < ad.before < 0.3 and 0.5 < ad.after < 0.7
    assert ad.change_ci[0] > 0  # a clear effect: the interval excludes zero
    assert ad.n_before + ad.n_after == 300
