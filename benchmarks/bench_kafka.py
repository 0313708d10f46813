"""Kafka → warehouse throughput: spec-shaped JSON events consumed from a librdkafka mock
cluster (a real Kafka-protocol broker on loopback) by :class:`KafkaIngest`, validated,
appended to a DuckDB warehouse through ``Ingestor.append`` (dedupe on event_id), offsets
committed after each append. Target: >= 100k events/s consumed into the warehouse.

Setup: the mock cluster is created through librdkafka's C mock API with a 32-partition topic
(the mock keeps only the newest ~13k messages per partition, so 32 partitions hold 400k+),
every event is produced *before* consuming starts (no producer competing for the cores), and
the clock runs from partition assignment (after the group join) to the last batch's append
and offset commit. Where the C mock API is not available the documented
``test.mock.num.brokers`` cluster is used with a producer process kept a window ahead.

Writes ``benchmarks/results/kafka.json`` with wall throughput, CPU throughput (consumer
thread; whole process including librdkafka's / DuckDB's threads and the in-process mock
broker), per-phase seconds and the machine's load average.

    .venv/bin/python benchmarks/bench_kafka.py [--events 400000] [--batch-size 50000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import orjson

from featurerec.config import Settings
from featurerec.events.ingest import Ingestor
from featurerec.events.sources.kafka import KafkaIngest, KafkaOptions
from featurerec.events.sources.kafka_mock import mock_cluster
from featurerec.warehouse.engine import DuckDBEngine

TOPIC = "segment.cloudflow.events.bench"
TYPES = ["feature_used", "page_viewed", "task_created", "heartbeat"]
PARTITIONS = 32


def _template() -> bytes:
    """One spec-shaped event as JSON with ``%d`` / ``%s`` holes (fast per-message fill)."""
    return (
        orjson.dumps(
            {
                "event_id": "evt_@ID@",
                "user_id": "usr_@U@",
                "workspace_id": "ws_@W@",
                "event_type": "@T@",
                "properties": {
                    "feature_category": "automations",
                    "feature_name": "create_automation_rule",
                    "session_id": "sess_@S@",
                    "session_sequence": 7,
                    "time_on_page_seconds": 45,
                    "is_first_use": False,
                },
                "user_traits": {"role": "project_manager", "plan": "business"},
                "timestamp": "2026-02-28T14:23:17Z",
            }
        )
        .replace(b"%", b"%%")
        .replace(b"@ID@", b"%d")
        .replace(b"@U@", b"%d")
        .replace(b"@W@", b"%d")
        .replace(b"@T@", b"%s")
        .replace(b"@S@", b"%d")
    )


def produce(
    bootstrap: str,
    n: int,
    partitions: int,
    consumed: Callable[[], int] | None = None,
    window: int = 0,
) -> float:
    """Produce ``n`` events round-robin over ``partitions``; with ``consumed``, stay at most
    ``window`` events ahead of the consumer."""
    p = ck.Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
            "log_level": 0,
        }
    )
    tpl = _template()
    types = [t.encode() for t in TYPES]
    t0 = time.perf_counter()
    for i in range(n):
        if i % 5000 == 0:
            p.poll(0)
            while consumed is not None and i - consumed() > window:
                time.sleep(0.005)
        value = tpl % (i, i % 5000, i % 300, types[i % 4], i // 20)
        while True:
            try:
                p.produce(TOPIC, value, partition=i % partitions)
                break
            except BufferError:
                p.poll(0.05)
    p.flush(120)
    return time.perf_counter() - t0


def _produce_process(bootstrap: str, n: int, consumed: Any, window: int, took: Any) -> None:
    took.value = produce(bootstrap, n, 4, lambda: int(consumed.value), window)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--batch-size", type=int, default=50_000)
    ap.add_argument("--window", type=int, default=40_000, help="fallback mode only")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    cluster = mock_cluster({TOPIC: PARTITIONS}, rebalance_delay_ms=None)
    proc = None
    took = None
    if cluster is not None:
        bootstrap, close = cluster
        mode = f"pre-filled {PARTITIONS}-partition topic, C mock API"
        produce_s = produce(bootstrap, args.events, PARTITIONS)
    else:
        owner = ck.Producer({"test.mock.num.brokers": 1, "log_level": 0})
        md = owner.list_topics(timeout=10)
        bootstrap = ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())
        close = lambda: None  # noqa: E731
        mode = "test.mock.num.brokers, windowed producer process"
        produce_s = float("nan")

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.model_validate({"data_dir": str(Path(tmp) / "data")})
        engine = DuckDBEngine(settings.warehouse_path)
        ingestor = Ingestor(engine, settings)
        options = KafkaOptions(
            bootstrap_servers=bootstrap,
            group_id="bench",
            format="spec",
            batch_size=args.batch_size,
            batch_timeout_seconds=1.0,
            sink="warehouse",
            config={"log_level": "0"},
        )
        consumed_v: Any = None
        on_progress = None
        if cluster is None:
            ctx = mp.get_context("spawn")
            consumed_v = ctx.Value("q", 0, lock=False)
            took = ctx.Value("d", 0.0, lock=False)

            def on_progress(p: Any) -> None:
                consumed_v.value = p.consumed

            proc = ctx.Process(
                target=_produce_process,
                args=(bootstrap, args.events, consumed_v, args.window, took),
                daemon=True,
            )
        ingest = KafkaIngest("bench", options, settings, ingestor.append, on_progress=on_progress)
        t_start = time.monotonic()
        if proc is not None:
            proc.start()
        cpu0, pcpu0 = time.thread_time(), time.process_time()
        progress = ingest.run(max_messages=args.events, idle_timeout=10)
        consumer_cpu = time.thread_time() - cpu0
        process_cpu = time.process_time() - pcpu0
        t_end = time.monotonic()
        if proc is not None:
            proc.join(timeout=30)
            produce_s = float(took.value) if took is not None else float("nan")
        assigned = ingest.assigned_at or t_start
        stored = int(engine.query_rows("SELECT count(*) AS n FROM events")[0]["n"])
        engine.close()
    close()

    consume_s = t_end - assigned
    result = {
        "benchmark": "kafka",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "events_produced": args.events,
        "events_consumed": progress.consumed,
        "events_stored": stored,
        "filtered": progress.filtered,
        "batch_size": args.batch_size,
        "batches": progress.batches,
        "produce_seconds": round(produce_s, 2),
        "group_join_seconds": round(assigned - t_start, 2),
        "consume_to_warehouse_seconds": round(consume_s, 2),
        "events_per_second": round(progress.consumed / consume_s, 1) if consume_s > 0 else None,
        "target_events_per_second": 100_000,
        "phase_seconds": {
            "fetch": round(progress.seconds_fetch, 2),
            "validate": round(progress.seconds_validate, 2),
            "write": round(progress.seconds_write, 2),
            "commit": round(progress.seconds_commit, 2),
        },
        "consumer_thread_cpu_seconds": round(consumer_cpu, 2),
        "events_per_consumer_cpu_second": round(progress.consumed / consumer_cpu, 1)
        if consumer_cpu > 0
        else None,
        "process_cpu_seconds": round(process_cpu, 2),
        "events_per_process_cpu_second": round(progress.consumed / process_cpu, 1)
        if process_cpu > 0
        else None,
        "machine": {
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "confluent_kafka": ck.version()[0],
            "librdkafka": ck.libversion()[0],
        },
        "notes": "1 in 4 events is a heartbeat dropped by the exclude filter. "
        "consumer_thread_cpu_seconds: the thread that fetches, validates, appends and commits "
        "(without librdkafka's background threads); process_cpu_seconds also counts "
        "librdkafka's and DuckDB's threads and the in-process mock broker. The machine is "
        "shared: see load_average.",
    }
    out = Path(__file__).parent / "results" / "kafka.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
