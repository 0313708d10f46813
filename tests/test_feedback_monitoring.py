"""Monitoring metrics pinned on a hand-built warehouse; alert once + recovery through a real
local webhook server; the shipped monitoring JSON validates."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import orjson
import pytest

from featurerec.config import Settings
from featurerec.errors import SpecError
from featurerec.feedback.alerts import AlertManager
from featurerec.feedback.attribution import attribute
from featurerec.feedback.monitoring import (
    compute_metrics,
    load_monitoring_spec,
    parse_monitoring,
    parse_threshold,
    parse_window,
)
from featurerec.feedback.serving_metrics import histogram_quantile, parse_prometheus
from featurerec.warehouse.engine import DuckDBEngine
from test_feedback_fixtures import add_event, add_feedback, add_rec, d, h

AS_OF = d(20)


def _world(db: DuckDBEngine) -> None:
    # Usage in the 30 days before AS_OF: 4 active users; kanban used by all, forms by 1.
    for u in ("u1", "u2", "u3", "u4"):
        add_event(db, u, "kanban_boards", d(15))
    add_event(db, "u1", "forms", d(16))
    # Last hour: 4 recommendations, 1 clicked -> CTR 0.25.
    for i, (u, f) in enumerate(
        [("u1", "automations"), ("u1", "forms"), ("u2", "forms"), ("u3", "kanban_boards")]
    ):
        add_rec(db, f"h{i}", u, f, AS_OF - timedelta(minutes=10 + i))
    add_feedback(db, "h0", "click", AS_OF - timedelta(minutes=5))
    # Adoption cohort (shown 7..14 days before AS_OF): users a, b, c; a adopts in 2 days,
    # b adopts after 9 days (too late for 7d), c never -> 1/3.
    add_rec(db, "c1", "a", "automations", d(8))
    add_rec(db, "c2", "a", "forms", d(8))
    add_rec(db, "c3", "b", "gantt_charts", d(9))
    add_rec(db, "c4", "c", "api_access", d(10))
    add_event(db, "a", "automations", d(10), first_use=True)
    add_event(db, "b", "gantt_charts", d(18), first_use=True)


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Request-log source pinned (``auto`` would also try a server on localhost)."""
    return Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "monitoring": {"serving_metrics": "serving/requests.jsonl"},
        }
    )


@pytest.fixture
def db():
    with DuckDBEngine(":memory:") as engine:
        _world(engine)
        attribute(engine, as_of=AS_OF)
        yield engine


def test_metrics_pinned(db: DuckDBEngine, settings: Settings) -> None:
    spec = load_monitoring_spec(settings)
    snap = compute_metrics(db, settings, spec, as_of=AS_OF)
    v = {m.name: m for m in snap.metrics}
    assert v["click_through_rate"].value == pytest.approx(0.25)
    assert v["click_through_rate"].sample_size == 4
    assert v["click_through_rate"].status == "ok"  # 0.25 is not < 0.08
    assert v["feature_adoption_after_rec"].value == pytest.approx(1 / 3)
    # time to first use: a's 48 h (c1) and b's 216 h (c3) -> median 132 h
    assert v["time_to_first_use"].value == pytest.approx((48 + 216) / 2)
    assert v["time_to_first_use"].status == "breach"  # > 48 * 1.5
    # diversity over the last 7 days: u1 2/2, u2 1/1, u3 1/1 -> 1.0
    assert v["recommendation_diversity"].value == pytest.approx(1.0)
    # novelty: 6 active users in 30 days (u1-u4, a, b); shares kanban 4/6, forms 1/6,
    # automations 1/6 (a) -> last week's recs (automations, forms, forms, kanban)
    assert v["novelty_score"].value == pytest.approx((5 / 6 + 5 / 6 + 5 / 6 + 2 / 6) / 4)
    # coverage: 3 features recommended last week (all >= 1%); item space = kanban, forms,
    # automations, gantt_charts, api_access
    assert v["coverage"].value == pytest.approx(3 / 5)
    assert v["p99_latency"].status == "no data" and v["error_rate"].status == "no data"


def test_serving_metrics_from_request_log(db: DuckDBEngine, settings: Settings) -> None:
    path = settings.data_path / "serving" / "requests.jsonl"
    path.parent.mkdir(parents=True)
    lines = [
        {
            "timestamp": (AS_OF - timedelta(minutes=i % 50)).isoformat() + "Z",
            "latency_ms": float(i),
            "status": 500 if i < 2 else 200,
        }
        for i in range(1, 201)
    ]
    lines.append(
        {"timestamp": (AS_OF - timedelta(hours=3)).isoformat(), "latency_ms": 9999.0, "status": 500}
    )
    path.write_text("\n".join(json.dumps(x) for x in lines))
    snap = compute_metrics(db, settings, load_monitoring_spec(settings), as_of=AS_OF)
    p99 = snap.get("p99_latency")
    assert p99.sample_size == 200
    assert p99.value == pytest.approx(float(__import__("numpy").percentile(range(1, 201), 99)))
    assert p99.status == "breach"  # > 100 ms
    assert snap.get("error_rate").value == pytest.approx(1 / 200)
    assert snap.get("error_rate").status == "breach"  # > 0.001


def test_prometheus_histogram_quantile() -> None:
    text = """# TYPE featurerec_request_latency_seconds histogram
featurerec_request_latency_seconds_bucket{le="0.01"} 50
featurerec_request_latency_seconds_bucket{le="0.05"} 90
featurerec_request_latency_seconds_bucket{le="0.1"} 100
featurerec_request_latency_seconds_bucket{le="+Inf"} 100
featurerec_request_latency_seconds_count 100
featurerec_request_latency_seconds_sum 2.0
# TYPE featurerec_requests counter
featurerec_requests_total{status="200"} 98
featurerec_requests_total{status="500"} 2
"""
    st = parse_prometheus(text)
    # rank 99 lies in (0.05, 0.1] with 10 obs: 0.05 + 0.05 * 9/10 = 0.095 s
    assert st.p99_ms == pytest.approx(95.0)
    assert st.error_rate == pytest.approx(0.02) and st.requests == 100
    assert histogram_quantile(0.5, [1.0, float("inf")], [0.0, 0.0]) is None


def test_prometheus_in_the_servers_format() -> None:
    """SERVE's app: latency histogram per endpoint, errors counter by endpoint and status."""
    text = """# TYPE featurerec_request_latency_seconds histogram
featurerec_request_latency_seconds_bucket{endpoint="/api/v1/recommendations",le="0.01"} 90.0
featurerec_request_latency_seconds_bucket{endpoint="/api/v1/recommendations",le="0.1"} 98.0
featurerec_request_latency_seconds_bucket{endpoint="/api/v1/recommendations",le="+Inf"} 98.0
featurerec_request_latency_seconds_count{endpoint="/api/v1/recommendations"} 98.0
featurerec_request_latency_seconds_bucket{endpoint="/api/v1/events",le="0.01"} 0.0
featurerec_request_latency_seconds_bucket{endpoint="/api/v1/events",le="0.1"} 0.0
featurerec_request_latency_seconds_bucket{endpoint="/api/v1/events",le="+Inf"} 500.0
featurerec_request_latency_seconds_count{endpoint="/api/v1/events"} 500.0
# TYPE featurerec_request_errors_total counter
featurerec_request_errors_total{endpoint="/api/v1/recommendations",status="500"} 2.0
featurerec_request_errors_total{endpoint="/api/v1/recommendations",status="422"} 7.0
"""
    st = parse_prometheus(text)
    assert st.requests == 100  # 98 observed + 2 server errors; the events endpoint ignored
    assert st.error_rate == pytest.approx(0.02)
    # rank 0.99 * 98 = 97.02 in (0.01, 0.1] holding 8 obs: 0.01 + 0.09 * 7.02 / 8
    assert st.p99_ms == pytest.approx((0.01 + 0.09 * 7.02 / 8) * 1000)


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []
    fail = False

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).fail:
            self.send_response(503)
            self.end_headers()
            return
        type(self).received.append({"path": self.path, "body": orjson.loads(body)})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook_server():
    _Hook.received = []
    _Hook.fail = False
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_alert_once_then_recovery_via_real_webhook(hook_server: str, tmp_path, caplog) -> None:
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "monitoring": {
                "webhooks": {"slack://ml-alerts": f"{hook_server}/slack"},
                "default_sinks": ["log", "slack://ml-alerts"],
            },
        }
    )
    spec = parse_monitoring(
        {
            "model": "m",
            "realtime_metrics": [
                {
                    "name": "click_through_rate",
                    "window": "1h",
                    "alert_threshold": "< 0.08",
                    "target": 0.18,
                }
            ],
        }
    )
    with DuckDBEngine(":memory:") as db:
        for i in range(10):
            add_rec(db, f"r{i}", f"u{i}", "forms", h(i * 0.05))
        mgr = AlertManager.from_settings(settings)
        # CTR 0 -> breach, alerted once across three checks
        for _ in range(3):
            snap = compute_metrics(db, settings, spec, as_of=h(0.5))
            notices = mgr.process(snap)
            if _ == 0:
                assert [n.kind for n in notices] == ["breach"]
            else:
                assert notices == []
        assert len(_Hook.received) == 1
        body = _Hook.received[0]["body"]
        assert _Hook.received[0]["path"] == "/slack"
        assert body["kind"] == "breach" and body["metric"] == "click_through_rate"
        assert body["value"] == 0.0 and body["rule"] == "< 0.08" and "text" in body
        assert "breaches" in caplog.text
        # The state survives a new manager (a new process).
        assert AlertManager.from_settings(settings).process(snap) == []
        # 3 of 10 clicked -> recovered, announced once
        for i in range(3):
            add_feedback(db, f"r{i}", "click", h(0.6))
        snap = compute_metrics(db, settings, spec, as_of=h(0.7))
        assert [n.kind for n in mgr.process(snap)] == ["recovered"]
        assert mgr.process(snap) == []
        assert [r["body"]["kind"] for r in _Hook.received] == ["breach", "recovered"]


def test_failed_webhook_is_retried_next_check(hook_server: str, tmp_path) -> None:
    mgr = AlertManager(
        tmp_path / "state.json",
        webhooks={"pagerduty://ml-oncall": hook_server},
        default_sinks=["pagerduty://ml-oncall"],
    )
    spec = parse_monitoring(
        {
            "model": "m",
            "realtime_metrics": [
                {"name": "click_through_rate", "alert_threshold": "< 0.08", "target": 0.18}
            ],
        }
    )
    settings = Settings.model_validate({"data_dir": str(tmp_path / "d")})
    with DuckDBEngine(":memory:") as db:
        add_rec(db, "r0", "u0", "forms", h(0))
        snap = compute_metrics(db, settings, spec, as_of=h(0.5))
        _Hook.fail = True
        assert len(mgr.process(snap)) == 1 and _Hook.received == []
        _Hook.fail = False
        assert len(mgr.process(snap)) == 1  # retried
        assert len(_Hook.received) == 1
        assert mgr.process(snap) == []  # delivered: no more


def test_spec_validation_errors() -> None:
    with pytest.raises(SpecError, match=r"cannot read 'about 0\.1'"):
        parse_monitoring(
            {
                "model": "m",
                "realtime_metrics": [
                    {"name": "click_through_rate", "alert_threshold": "about 0.1"}
                ],
            }
        )
    with pytest.raises(SpecError, match="unknown metric"):
        parse_monitoring({"model": "m", "quality_metrics": [{"name": "vibes", "target": 1}]})
    with pytest.raises(SpecError, match="threshold_ms or threshold"):
        parse_monitoring({"model": "m", "serving_metrics": [{"name": "p99_latency"}]})
    with pytest.raises(SpecError, match="unknown key"):
        parse_monitoring({"model": "m", "bogus": 1})
    assert parse_threshold(">= 48") == (">=", 48.0)
    assert parse_window("7d_rolling") == timedelta(days=7)
