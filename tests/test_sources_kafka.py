"""Kafka consumer against a real Kafka-protocol broker: librdkafka's built-in mock cluster,
started by the test (``test.mock.num.brokers``), its address from ``list_topics().brokers``."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import confluent_kafka as ck
import orjson
import pytest

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.ingest import Ingestor
from featurerec.events.sources.kafka import KafkaIngest, KafkaOptions, topic_regex
from featurerec.events.sources.kafka_mock import mock_cluster
from featurerec.events.validate import ValidatedBatch
from featurerec.warehouse.engine import DuckDBEngine

pytestmark = pytest.mark.kafka

TOPIC_A = "segment.cloudflow.events.web"
TOPIC_B = "segment.cloudflow.events.mobile"
OTHER = "billing.invoices"


#: Consumer settings matching the mock cluster in use (set by the ``broker`` fixture).
GROUP_CONF: dict[str, str] = {}


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    """A mock Kafka cluster (a real Kafka-protocol broker on loopback) for this module."""
    fast = mock_cluster()
    if fast is not None:
        bootstrap, close = fast
        # no rebalance delay: short sessions let a restarted member rejoin at once
        GROUP_CONF.update({"session.timeout.ms": "1500", "heartbeat.interval.ms": "200"})
        yield bootstrap
        close()
        return
    # the documented way: a client with test.mock.num.brokers owns the mock cluster
    owner = ck.Producer({"test.mock.num.brokers": 1, "log_level": 0})
    md = owner.list_topics(timeout=10)
    GROUP_CONF.update({"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"})
    yield ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())
    owner.flush(1)


def _event(i: int, event_type: str = "feature_used") -> bytes:
    return orjson.dumps(
        {
            "event_id": f"evt_{i}",
            "user_id": f"usr_{i % 13}",
            "workspace_id": "ws_1",
            "event_type": event_type,
            "properties": {"feature_category": "automations", "session_sequence": i},
            "timestamp": "2026-02-28T14:23:17Z",
        }
    )


def _produce(bootstrap: str, items: list[tuple[str, bytes | None]]) -> None:
    p = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for topic, value in items:
        p.produce(topic, value)
    assert p.flush(10) == 0


class DedupeWriter:
    """The real append path (Ingestor.append: dedupe on event_id against the warehouse, one
    transaction with the quarantine rows) on a fresh warehouse; counts calls."""

    def __init__(self, settings: Settings) -> None:
        self.db = DuckDBEngine(":memory:")
        self.ingestor = Ingestor(self.db, settings)
        self.calls = 0
        self.duplicates = 0

    def __call__(self, batch: Any) -> None:
        assert isinstance(batch, ValidatedBatch)
        self.calls += 1
        self.duplicates += self.ingestor.append(batch).duplicate

    def count(self, sql: str = "SELECT count(*) FROM events") -> int:
        # query_rows fetches everything (DuckDB 2 refuses new work after a partial fetch)
        return int(next(iter(self.db.query_rows(sql)[0].values())))


def _ingest(
    settings: Settings, bootstrap: str, group: str, writer: Any, **opts: Any
) -> KafkaIngest:
    options = KafkaOptions(
        bootstrap_servers=bootstrap,
        group_id=group,
        batch_timeout_seconds=0.5,
        config={"topic.metadata.refresh.interval.ms": "500", "log_level": "0", **GROUP_CONF},
        **opts,
    )
    return KafkaIngest("kafka_main", options, settings, writer)


def test_consume_filter_quarantine_and_commit(settings: Settings, broker: str) -> None:
    good = [(TOPIC_A if i % 2 else TOPIC_B, _event(i)) for i in range(200)]
    noise = [(TOPIC_A, _event(1000 + i, "heartbeat")) for i in range(20)]
    poison: list[tuple[str, bytes | None]] = [
        (TOPIC_A, b"{not json"),
        (TOPIC_A, b"\xff\xfe\x00garbage"),
        (TOPIC_B, b"[1, 2, 3]"),
        (TOPIC_B, None),
        (
            TOPIC_A,
            orjson.dumps(
                {
                    "event_id": "bad_ts",
                    "user_id": "u",
                    "event_type": "feature_used",
                    "timestamp": "when",
                }
            ),
        ),
    ]
    segment = [
        (
            TOPIC_B,
            orjson.dumps(
                {
                    "type": "track",
                    "userId": "usr_seg",
                    "event": "Task Created",
                    "messageId": f"seg_{i}",
                }
            ),
        )
        for i in range(5)
    ]
    elsewhere = [(OTHER, _event(5000 + i)) for i in range(10)]
    _produce(broker, good + noise + poison + segment + elsewhere)

    writer = DedupeWriter(settings)
    ingest = _ingest(settings, broker, "g-main", writer, batch_size=100)
    progress = ingest.run(max_messages=230, idle_timeout=10)
    assert progress.consumed == 230
    assert writer.count() == 205
    from_billing = "TRY_CAST(substr(event_id, 5) AS INTEGER) >= 5000"  # evt_5000… were billing
    assert writer.count(f"SELECT count(*) FROM events WHERE {from_billing}") == 0
    assert writer.count("SELECT count(*) FROM events WHERE event_type = 'task_created'") == 5
    assert progress.filtered == 20 and progress.quarantined == 5
    q = writer.db.query_rows("SELECT location, reason FROM ingest_quarantine ORDER BY reason")
    assert all(
        r["location"].startswith(
            ("segment.cloudflow.events.web[", "segment.cloudflow.events.mobile[")
        )
        and r["location"].split("]:")[1].isdigit()
        for r in q
    )
    reasons = " | ".join(r["reason"] for r in q)
    assert "invalid JSON" in reasons and "tombstone" in reasons
    assert "not an ISO-8601 timestamp" in reasons and "UTF-8" in reasons
    assert progress.total_lag == 0

    # offsets are committed up to the end of every partition read
    assert _committed(broker, "g-main", [TOPIC_A, TOPIC_B]) == 230


def test_replay_after_crash_adds_nothing(settings: Settings, broker: str) -> None:
    topic = "segment.cloudflow.events.replay"
    _produce(broker, [(topic, _event(i)) for i in range(300)])
    writer = DedupeWriter(settings)
    crashing = _ingest(settings, broker, "g-replay", writer, topic_pattern=f"^{topic}$")

    class Crash(Exception):
        pass

    def commit_then_die(*_: Any, **__: Any) -> None:
        raise Crash("killed after the durable write, before the offset commit")

    real_make = crashing._make_consumer

    def make() -> Any:
        consumer = real_make()
        return _CommitFails(consumer, commit_then_die)

    crashing._make_consumer = make  # type: ignore[method-assign]
    with pytest.raises(Crash):
        crashing.run(idle_timeout=10)
    stored = writer.count()
    assert 0 < stored <= 300 and writer.calls == 1  # one batch stored, its commit failed

    restarted = _ingest(settings, broker, "g-replay", writer, topic_pattern=f"^{topic}$")
    progress = restarted.run(max_messages=300, idle_timeout=10)
    assert progress.consumed == 300  # the uncommitted batch was redelivered…
    assert writer.count() == 300  # …and added nothing: every event once
    assert writer.duplicates == stored


class _CommitFails:
    """A consumer whose commit fails (a process killed between write and commit)."""

    def __init__(self, inner: ck.Consumer, fail: Any) -> None:
        self._inner, self._fail = inner, fail

    def commit(self, *a: Any, **kw: Any) -> None:
        self._fail()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_sigterm_finishes_batch_and_commits(settings: Settings, broker: str) -> None:
    topic = "segment.cloudflow.events.term"
    _produce(broker, [(topic, _event(i)) for i in range(50)])

    class TermDuringFirstWrite(DedupeWriter):
        """SIGTERM arrives while the first batch is being written (deterministically)."""

        def __call__(self, batch: Any) -> None:
            if self.calls == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            super().__call__(batch)

    writer = TermDuringFirstWrite(settings)
    # batches of at most 10, so the restart below always has work
    ingest = _ingest(settings, broker, "g-term", writer, topic_pattern=f"^{topic}$", batch_size=10)
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    ingest.install_signal_handlers()
    try:
        progress = ingest.run(idle_timeout=30)  # ends at once on SIGTERM, else reads all 50
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    # the batch in flight when SIGTERM came is written and committed, and no other is read
    first = progress.consumed
    assert writer.calls == 1 and 0 < first <= 10 and writer.count() == first
    assert _committed(broker, "g-term", [topic]) == first
    # a restart in the same group picks up exactly where the commit left off
    restarted = _ingest(settings, broker, "g-term", writer, topic_pattern=f"^{topic}$")
    rest = restarted.run(max_messages=50 - first, idle_timeout=10)
    assert rest.consumed == 50 - first
    assert writer.count() == 50 and writer.duplicates == 0
    assert _committed(broker, "g-term", [topic]) == 50


def _committed(broker: str, group: str, topics: list[str]) -> int:
    """Sum of the group's committed offsets over every partition of ``topics``."""
    c = ck.Consumer({"bootstrap.servers": broker, "group.id": group, "log_level": 0})
    md = c.list_topics(timeout=10)
    tps = [ck.TopicPartition(t, p) for t in topics for p in md.topics[t].partitions]
    committed = c.committed(tps, timeout=10)
    c.close()
    return sum(max(tp.offset, 0) for tp in committed)


def test_broker_down_is_reported_not_a_crash(settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ingest = _ingest(settings, f"127.0.0.1:{port}", "g-down", DedupeWriter(settings))
    progress = ingest.run(idle_timeout=0.5, join_timeout=1.0)
    assert progress.consumed == 0
    assert progress.broker_error is not None


def test_topic_pattern_glob_to_regex() -> None:
    assert topic_regex("segment.cloudflow.events.*") == r"^segment\.cloudflow\.events\..*$"
    assert topic_regex("a.b") == r"^a\.b$"
    assert topic_regex(r"^segment\.x\..*") == r"^segment\.x\..*"
    with pytest.raises(DataError, match="not a valid regex"):
        topic_regex("^(unclosed")


def test_cli_sources_kafka_lands_then_sync_drains(tmp_path: Any, broker: str) -> None:
    """``sources kafka`` (default landing sink: this process does not own the warehouse),
    then ``sources sync --once`` loads the landing into the warehouse."""
    from typer.testing import CliRunner

    from featurerec.cli import app

    topic = "segment.cloudflow.events.cli"
    _produce(broker, [(topic, _event(i)) for i in range(40)] + [(topic, b"oops")])
    data = tmp_path / "data"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "--data-dir",
            str(data),
            "sources",
            "kafka",
            "-b",
            broker,
            "--topic-pattern",
            topic,
            "--group",
            "g-cli",
            "--max-messages",
            "41",
            "--idle-timeout",
            "10",
            *[a for k, v in GROUP_CONF.items() for a in ("-X", f"{k}={v}")],
        ],
    )
    assert res.exit_code == 0, res.output
    out = orjson.loads(res.stdout)
    assert out["consumed"] == 41 and out["accepted"] == 40 and out["quarantined"] == 1
    settings = Settings.model_validate({"data_dir": str(data)})
    assert not settings.warehouse_path.exists()  # landed, not loaded

    cfg = tmp_path / "featurerec.toml"
    cfg.write_text(
        f'data_dir = "{data}"\n[sources.events]\nkind = "kafka"\nevery_seconds = 0\n'
        f'options = {{ bootstrap_servers = "{broker}", topic_pattern = "{topic}", '
        'group_id = "g-cli", max_seconds_per_sync = 5, config = { '
        + ", ".join(f'"{k}" = "{v}"' for k, v in GROUP_CONF.items())
        + " } }\n"
    )
    res = runner.invoke(app, ["--config", str(cfg), "sources", "sync", "--once", "--json"])
    assert res.exit_code == 0, res.output
    outcomes = {o["name"]: o for o in orjson.loads(res.stdout)}
    assert outcomes["events"]["summary"]["consumed"] == 0  # offsets were committed
    assert outcomes["landing"]["ok"]
    with DuckDBEngine(settings.warehouse_path, read_only=True) as db:
        assert db.query_rows("SELECT count(*) AS n FROM events")[0]["n"] == 40
        q = db.query_rows("SELECT location, reason FROM ingest_quarantine")
    assert len(q) == 1 and q[0]["location"].startswith(f"{topic}[")
    assert q[0]["reason"].startswith("invalid JSON")


def test_failed_commit_is_reported_not_fatal(settings: Settings, broker: str) -> None:
    """A commit refused by the broker (e.g. mid-rebalance) keeps the loop running; the
    durable batch is re-read later and dedupe drops it."""
    topic = "segment.cloudflow.events.rebalance"
    _produce(broker, [(topic, _event(i)) for i in range(30)])
    writer = DedupeWriter(settings)
    ingest = _ingest(settings, broker, "g-rebalance", writer, topic_pattern=f"^{topic}$")
    real_make = ingest._make_consumer

    def refuse() -> None:
        raise ck.KafkaException(ck.KafkaError(ck.KafkaError.REBALANCE_IN_PROGRESS))

    ingest._make_consumer = lambda: _CommitFails(real_make(), refuse)  # type: ignore[method-assign]
    progress = ingest.run(max_messages=30, idle_timeout=10)
    assert progress.consumed == 30 and progress.commit_failures >= 1
    assert "offset commit failed" in (progress.broker_error or "")
    again = _ingest(settings, broker, "g-rebalance", writer, topic_pattern=f"^{topic}$")
    assert again.run(max_messages=30, idle_timeout=10).consumed == 30  # re-read…
    assert writer.count() == 30  # …stored once
