"""Kafka consumer: Segment / product events from ``segment.cloudflow.events.*`` topics into the
one append path, with at-least-once delivery and dedupe (an exactly-once effect).

* **Subscription**: a regex over topic names (librdkafka: a pattern starts with ``^``). The
  spec's ``segment.cloudflow.events.*`` is a glob: :func:`topic_regex` turns it into
  ``^segment\\.cloudflow\\.events\\..*$``; a pattern that already starts with ``^`` is kept.
  New matching topics are picked up on metadata refresh.
* **Consumer group** ``group_id`` (spec: ``matih-recommender-ingestion``), auto commit off.
* **Deserialization**: JSON. ``format = "spec"`` takes the spec's event shape through the
  vectorised ``normalize_records`` fast path; ``"segment"`` maps Segment messages
  (:mod:`~featurerec.events.sources.segment`); ``"auto"`` (default) picks per message.
  The include / exclude filter and in-batch dedupe are ``normalize_records``'.
* **Delivery**: messages are gathered into a batch (``batch_size`` messages or
  ``batch_timeout_seconds``), the batch is made durable by ``write`` (``Landing.write``, or
  ``Ingestor.append`` when this process owns the warehouse), and only then are the batch's
  offsets committed (synchronously). A crash before the commit replays the batch, and the
  append path drops the events whose ``event_id`` is already stored: a replay adds nothing.
* **Poison messages** (not UTF-8, not JSON, not an object, empty / tombstone, failing
  validation) are quarantined with ``topic[partition]:offset`` and the reason, inside the
  same durable batch; they never block the partition.
* **Shutdown**: SIGTERM / SIGINT finish the batch in hand (write, commit), then close the
  consumer, which leaves the group cleanly.
* **Brokers that go away**: librdkafka reconnects by itself; "all brokers down" is reported
  (``on_progress``) and the loop keeps waiting; fatal errors raise :class:`SourceUnavailable`.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal

import confluent_kafka as ck
import numpy as np
import orjson
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from featurerec.config import Settings, SourceConfig
from featurerec.errors import DataError
from featurerec.events.sources.common import QuarantinedRecord, SourceUnavailable, raw_text, utcnow
from featurerec.events.sources.segment import is_segment_message, map_messages

SPEC_TOPIC_PATTERN = "segment.cloudflow.events.*"
SPEC_GROUP = "matih-recommender-ingestion"


class KafkaOptions(BaseModel):
    """``[sources.NAME.options]`` of a ``kafka`` source (CLI flags override them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = "localhost:9092"
    topic_pattern: str = SPEC_TOPIC_PATTERN
    group_id: str = SPEC_GROUP
    format: Literal["auto", "spec", "segment"] = "auto"
    #: Messages per durable write (and offset commit).
    batch_size: int = Field(default=50_000, gt=0)
    #: A partial batch is written after this many seconds.
    batch_timeout_seconds: float = Field(default=1.0, gt=0)
    #: Where batches go: the landing folder (default) or straight into the warehouse.
    sink: Literal["landing", "warehouse"] = "landing"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: ``sources sync``: the longest one sync may consume before the other sources get a turn.
    max_seconds_per_sync: float = Field(default=60.0, gt=0)
    #: Extra librdkafka settings (security.protocol, sasl.*, …).
    config: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_source(cls, name: str, source: SourceConfig) -> KafkaOptions:
        try:
            return cls.model_validate(source.options)
        except ValidationError as exc:
            errs = "; ".join(
                f"sources.{name}.options.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors()
            )
            raise DataError(errs) from None


def topic_regex(pattern: str) -> str:
    """The librdkafka regex subscription for ``pattern`` (a glob unless it starts with ``^``)."""
    if pattern.startswith("^"):
        regex = pattern
    else:
        regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    try:
        re.compile(regex)
    except re.error as exc:
        raise DataError(f"topic_pattern {pattern!r} is not a valid regex: {exc}") from None
    return regex


@dataclass
class KafkaProgress:
    """Running totals, passed to ``on_progress`` after every batch and once a second."""

    consumed: int = 0
    accepted: int = 0
    quarantined: int = 0
    filtered: int = 0
    duplicates: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    lag: dict[str, int] = field(default_factory=dict)
    broker_error: str | None = None
    #: Wall seconds spent per phase (where the time goes).
    seconds_fetch: float = 0.0
    seconds_validate: float = 0.0
    seconds_write: float = 0.0
    seconds_commit: float = 0.0
    commit_failures: int = 0

    @property
    def rate(self) -> float:
        """Messages per second since start."""
        elapsed = time.monotonic() - self.started
        return self.consumed / elapsed if elapsed > 0 else 0.0

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())


Writer = Callable[[Any], object]


class KafkaIngest:
    """Consume, validate, write durably, then commit; see the module doc."""

    def __init__(
        self,
        name: str,
        options: KafkaOptions,
        settings: Settings,
        write: Writer,
        *,
        write_traits: Writer | None = None,
        on_progress: Callable[[KafkaProgress], None] | None = None,
    ) -> None:
        from featurerec.events.sources.traits import TraitsLanding

        self.name = name
        self.options = options
        self.settings = settings
        self.write = write
        self.write_traits = write_traits or TraitsLanding.for_settings(settings).write
        self.on_progress = on_progress
        self.progress = KafkaProgress()
        self._stop = threading.Event()
        self._consumer: ck.Consumer | None = None
        self._assigned_at: float | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and close (thread/signal safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT → :meth:`stop` (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _make_consumer(self) -> ck.Consumer:
        opts = self.options
        conf: dict[str, Any] = {
            "bootstrap.servers": opts.bootstrap_servers,
            "group.id": opts.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": opts.auto_offset_reset,
            "topic.metadata.refresh.interval.ms": 5000,
            "error_cb": self._on_error,
            **opts.config,
        }
        try:
            consumer = ck.Consumer(conf)
        except ck.KafkaException as exc:
            raise DataError(f"{self.name}: bad Kafka configuration: {exc}") from None
        consumer.subscribe([topic_regex(opts.topic_pattern)], on_assign=self._on_assign)
        return consumer

    @property
    def assigned_at(self) -> float | None:
        """``time.monotonic()`` of the last partition assignment (None: never joined)."""
        return self._assigned_at

    def _on_assign(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        self._assigned_at = time.monotonic()

    def _on_error(self, err: ck.KafkaError) -> None:
        self.progress.broker_error = str(err)
        if err.fatal():
            self.stop()

    # -- main loop ------------------------------------------------------------------------
    def run(
        self,
        *,
        max_messages: int | None = None,
        idle_timeout: float | None = None,
        join_timeout: float = 15.0,
    ) -> KafkaProgress:
        """Consume until stopped, ``max_messages`` consumed, or nothing arrived for
        ``idle_timeout`` seconds after partitions were assigned (``None``: run until
        stopped). Without any assignment it gives up after ``join_timeout`` seconds when
        ``idle_timeout`` is set (broker down, no matching topic)."""
        opts = self.options
        consumer = self._consumer = self._make_consumer()
        start = time.monotonic()
        last_data: float | None = None
        last_report = 0.0
        try:
            while not self._stop.is_set():
                if max_messages is not None and self.progress.consumed >= max_messages:
                    break
                want = opts.batch_size
                if max_messages is not None:
                    want = min(want, max_messages - self.progress.consumed)
                t0 = time.perf_counter()
                msgs = self._gather(consumer, want)
                if msgs:
                    self.progress.seconds_fetch += time.perf_counter() - t0
                now = time.monotonic()
                if msgs:
                    last_data = now
                    self._process(consumer, msgs)
                elif idle_timeout is not None:
                    if last_data is None and self._assigned_at is not None:
                        last_data = self._assigned_at
                    if last_data is None:
                        if now - start >= max(join_timeout, idle_timeout):
                            break
                    elif now - last_data >= idle_timeout:
                        break
                if now - last_report >= 1.0 or msgs:
                    self._update_lag(consumer)
                    last_report = now
                    if self.on_progress:
                        self.on_progress(self.progress)
        finally:
            consumer.close()
            self._consumer = None
        if self.progress.broker_error and "fatal" in self.progress.broker_error.lower():
            raise SourceUnavailable(f"{self.name}: Kafka fatal error: {self.progress.broker_error}")
        return self.progress

    def _gather(self, consumer: ck.Consumer, want: int) -> list[ck.Message]:
        """Up to ``want`` messages, waiting at most ``batch_timeout_seconds`` in all."""
        deadline = time.monotonic() + self.options.batch_timeout_seconds
        out: list[ck.Message] = []
        while len(out) < want and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            got = consumer.consume(
                num_messages=min(want - len(out), 100_000), timeout=min(remaining, 0.5)
            )
            for m in got:
                err = m.error()
                if err is None:
                    out.append(m)
                elif err.code() == ck.KafkaError._PARTITION_EOF:
                    continue
                else:
                    self.progress.broker_error = str(err)
                    if err.fatal():
                        raise SourceUnavailable(f"{self.name}: Kafka fatal error: {err}")
        return out

    def _process(self, consumer: ck.Consumer, msgs: list[ck.Message]) -> None:
        p = self.progress
        t0 = time.perf_counter()
        batch, traits = self.build_batch(msgs)
        t1 = time.perf_counter()
        if batch is not None:
            self.write(batch)
        if traits is not None:
            self.write_traits(traits)
        t2 = time.perf_counter()
        # Durable: now the offsets may move.
        offsets: dict[tuple[str, int], int] = {}
        for m in msgs:
            key = (str(m.topic()), int(m.partition() or 0))
            off = int(m.offset() or 0)
            if off > offsets.get(key, -1):
                offsets[key] = off
        try:
            consumer.commit(
                offsets=[ck.TopicPartition(t, part, o + 1) for (t, part), o in offsets.items()],
                asynchronous=False,
            )
        except ck.KafkaException as exc:
            # e.g. a rebalance moved the partitions away meanwhile. The batch is durable; the
            # next owner re-reads it from the last committed offset and dedupe drops it.
            p.commit_failures += 1
            p.broker_error = f"offset commit failed (batch kept, will be re-read): {exc}"
        p.seconds_validate += t1 - t0
        p.seconds_write += t2 - t1
        p.seconds_commit += time.perf_counter() - t2
        p.consumed += len(msgs)
        p.batches += 1
        if batch is not None:
            p.accepted += batch.accepted
            p.quarantined += batch.quarantined
            p.filtered += batch.filtered
            p.duplicates += batch.duplicates

    def build_batch(self, msgs: list[ck.Message]) -> tuple[Any, Any]:
        """Kafka messages → (ValidatedBatch or None, TraitsUpdate or None)."""
        from featurerec.events.validate import (
            QuarantineRecord,
            ValidatedBatch,
            normalize_records,
            quarantine_table,
        )

        fmt = self.options.format
        spec_values: list[bytes] = []
        spec_locs: list[str] = []
        segment_msgs: list[Any] = []
        segment_locs: list[str] = []
        bad: list[QuarantinedRecord] = []
        for m in msgs:
            value = m.value()
            loc = f"{m.topic()}[{m.partition()}]:{m.offset()}"
            if value and (fmt == "spec" or (fmt == "auto" and b'"event_type"' in value)):
                spec_values.append(value)
                spec_locs.append(loc)
                continue
            if not value:
                bad.append(QuarantinedRecord(self.name, loc, "empty message (tombstone)", ""))
                continue
            try:
                obj = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                bad.append(
                    QuarantinedRecord(self.name, loc, f"invalid JSON: {exc}", raw_text(value))
                )
                continue
            if fmt == "segment" or is_segment_message(obj):
                segment_msgs.append(obj)
                segment_locs.append(loc)
            else:
                spec_values.append(value)
                spec_locs.append(loc)
        parts: list[Any] = []
        if spec_values:
            parts.append(self._validate_spec(spec_values, spec_locs))
        traits = None
        if segment_msgs:
            mapped = map_messages(
                segment_msgs, received_at=utcnow(), source=self.name, location="kafka"
            )
            # map_messages locates by index; put the Kafka coordinates back.
            index_loc = {f"kafka[{i}]": loc for i, loc in enumerate(segment_locs)}
            for q in mapped.quarantined:
                bad.append(
                    QuarantinedRecord(
                        q.source, index_loc.get(q.location, q.location), q.reason, q.raw
                    )
                )
            if mapped.records:
                parts.append(
                    normalize_records(
                        mapped.records,
                        settings=self.settings,
                        source=self.name,
                        locations=[index_loc[loc] for loc in mapped.locations],
                    )
                )
            traits = mapped.traits_update(self.name)
        if not parts and not bad:
            return None, traits
        if len(parts) == 1 and not bad:
            return parts[0], traits
        extra = quarantine_table([QuarantineRecord(**q.__dict__) for q in bad])
        events = ValidatedBatch.empty(self.name).events
        duplicates = sum(p.duplicates for p in parts)
        if parts:
            events = pa.concat_tables([p.events for p in parts])
            if len(parts) > 1:  # the same event_id in both formats: keep the first
                n = events.num_rows
                events = _first_per_id(events)
                duplicates += n - events.num_rows
        return (
            ValidatedBatch(
                events=events,
                quarantine=pa.concat_tables([extra, *[p.quarantine for p in parts]]),
                source=self.name,
                received=sum(p.received for p in parts) + len(bad),
                filtered=sum(p.filtered for p in parts),
                duplicates=duplicates,
                origin=f"kafka:{self.options.group_id}",
            ),
            traits,
        )

    def _validate_spec(self, values: list[bytes], locations: list[str]) -> Any:
        """Validate spec-shaped values in one vectorised ``normalize_lines`` call (one Arrow
        string array); when a value is not UTF-8 the batch goes through
        ``normalize_records``, which quarantines just that value."""
        from featurerec.events.validate import normalize_lines, normalize_records

        try:
            lines = pa.array(values, pa.binary()).cast(pa.string())
        except (pa.ArrowInvalid, UnicodeDecodeError):
            return normalize_records(
                values, settings=self.settings, source=self.name, locations=locations
            )
        return normalize_lines(lines, settings=self.settings, source=self.name, locations=locations)

    def _update_lag(self, consumer: ck.Consumer) -> None:
        """Per-partition lag = high watermark − position (cached watermarks, no round trip)."""
        try:
            assigned = consumer.assignment()
            if not assigned:
                return
            positions = consumer.position(assigned)
        except ck.KafkaException:
            return
        lag: dict[str, int] = {}
        for tp in positions:
            try:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
            except ck.KafkaException:
                continue
            if high < 0:
                continue
            pos = tp.offset if tp.offset >= 0 else 0
            lag[f"{tp.topic}[{tp.partition}]"] = max(0, high - pos)
        self.progress.lag = lag


def _first_per_id(events: pa.Table) -> pa.Table:
    """Keep the first row of each ``event_id``."""
    _, first = np.unique(
        events.column("event_id").to_numpy(zero_copy_only=False), return_index=True
    )
    return events.take(pa.array(np.sort(first)))
