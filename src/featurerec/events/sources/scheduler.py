"""Run every configured source at its frequency, keep its state, survive sources going away.

``settings.sources`` names the sources (``kind``, ``every_seconds``, ``options``). The spec
syncs the product tables and Zendesk every 15 minutes (``every_seconds = 900``, the default)
and A/B assignments in real time (``every_seconds = 0``: every loop turn, about every
``poll_seconds``, 1 s). Per source kind one sync is:

* ``postgres_cdc`` / ``postgres_cursor`` / ``zendesk``: their ``sync_once``;
* ``kafka``: consume into the warehouse until the topics are idle (bounded by
  ``max_seconds_per_sync``), committing after each durable append;
* ``segment_http``: drain what the HTTP intake landed (event batches through
  ``events.landing.Landing.drain`` when that module is installed, trait updates through
  :class:`~featurerec.events.sources.traits.TraitsLanding`). Without a ``segment_http``
  source each turn still drains pending landing files (e.g. from ``sources kafka``), reported
  as the pseudo-source ``landing``.

Sources run one after another in one process (the warehouse has one writer). A Kafka turn
can take up to ``max_seconds_per_sync``, which delays the real-time sources by as much; for a
continuous event stream run ``featurerec sources kafka`` (landing sink) as its own process
and let ``sources sync`` drain the landing.

State (last start / finish / success, counts, lag, last error, failures, next attempt) lives in
``<data_dir>/sources/<name>/state.json``. A failing source (broker or database down, bad
credentials) is recorded and retried with exponential backoff (1 s doubling to 15 min, with
seeded jitter); it never stops the others and never crashes the loop.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timedelta
from typing import Any

from featurerec.config import Settings, SourceConfig
from featurerec.events.sources.common import Backoff, SourceState, SourceUnavailable, utcnow

log = logging.getLogger(__name__)

#: Backoff after failures: 1 s, 2 s, 4 s … capped at 15 minutes.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 900.0


@dataclass
class SyncOutcome:
    """One source's result in one scheduler turn."""

    name: str
    kind: str
    ok: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    next_attempt_at: str | None = None


def run_source(
    name: str, source: SourceConfig, settings: Settings, ingestor: Any, engine: Any
) -> dict[str, Any]:
    """One sync of one source into the warehouse; returns its report as a dict."""
    kind = source.kind
    if kind == "postgres_cdc":
        from featurerec.events.sources.postgres_cdc import PostgresCDC

        return _as_dict(
            PostgresCDC.from_config(name, source, settings, ingestor, engine).sync_once()
        )
    if kind == "postgres_cursor":
        from featurerec.events.sources.postgres_cursor import PostgresCursor

        return _as_dict(
            PostgresCursor.from_config(name, source, settings, ingestor, engine).sync_once()
        )
    if kind == "zendesk":
        from featurerec.events.sources.zendesk import ZendeskTickets

        return _as_dict(
            ZendeskTickets.from_config(name, source, settings, ingestor, engine).sync_once()
        )
    if kind == "kafka":
        return _run_kafka(name, source, settings, ingestor)
    if kind == "segment_http":
        return _drain_landing(settings, ingestor)
    raise ValueError(f"unknown source kind {kind!r}")


def _run_kafka(
    name: str, source: SourceConfig, settings: Settings, ingestor: Any
) -> dict[str, Any]:
    from featurerec.events.sources.kafka import KafkaIngest, KafkaOptions

    options = KafkaOptions.from_source(name, source)
    ingest = KafkaIngest(name, options, settings, ingestor.append)
    timer = threading.Timer(options.max_seconds_per_sync, ingest.stop)
    timer.start()
    try:
        progress = ingest.run(idle_timeout=max(1.0, 2 * options.batch_timeout_seconds))
    finally:
        timer.cancel()
    if progress.consumed == 0 and ingest.assigned_at is None and progress.broker_error:
        raise SourceUnavailable(f"{name}: Kafka unreachable: {progress.broker_error}")
    state = SourceState.load(settings, name, "kafka")
    state.lag = {"messages": progress.total_lag, "partitions": progress.lag}
    state.save(settings)
    return {
        "consumed": progress.consumed,
        "accepted": progress.accepted,
        "quarantined": progress.quarantined,
        "filtered": progress.filtered,
        "lag": progress.total_lag,
        "broker_error": progress.broker_error,
    }


def _drain_landing(settings: Settings, ingestor: Any) -> dict[str, Any]:
    from featurerec.events.sources.traits import TraitsLanding

    out: dict[str, Any] = {}
    try:
        from featurerec.events.landing import Landing  # INGEST's module
    except ImportError:
        out["events"] = "events.landing not available"
    else:
        report = Landing.for_settings(settings).drain(ingestor)
        out["events"] = _as_dict(report)
    out["traits_users"] = TraitsLanding.for_settings(settings).drain(ingestor)
    return out


def _as_dict(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return {"result": obj}


def _counts(summary: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in summary.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, int) for v in value.values()):
            out[key] = sum(value.values())
    return out


class Scheduler:
    """Runs due sources; see the module doc. ``runner`` is injectable for tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        only: list[str] | None = None,
        runner: Callable[[str, SourceConfig, Settings, Any, Any], dict[str, Any]] = run_source,
        now: Callable[[], datetime] = utcnow,
        poll_seconds: float = 1.0,
    ) -> None:
        self.settings = settings
        unknown = sorted(set(only or []) - set(settings.sources))
        if unknown:
            from featurerec.errors import DataError

            raise DataError(
                f"unknown source(s) {', '.join(unknown)}; configured: "
                f"{', '.join(sorted(settings.sources)) or 'none'}"
            )
        self.sources = {
            n: s for n, s in settings.sources.items() if s.enabled and (not only or n in only)
        }
        self.runner = runner
        self.now = now
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def due(self, name: str, source: SourceConfig, state: SourceState) -> bool:
        now = self.now()
        if state.next_attempt_at and now < datetime.fromisoformat(state.next_attempt_at):
            return False
        if source.every_seconds == 0 or state.last_success is None:
            return True
        return now >= datetime.fromisoformat(state.last_success) + timedelta(
            seconds=source.every_seconds
        )

    def run_once(self, ingestor: Any, engine: Any, *, force: bool = False) -> list[SyncOutcome]:
        """Run every due source (every source with ``force``) once."""
        outcomes = []
        for name, source in self.sources.items():
            state = SourceState.load(self.settings, name, source.kind)
            if not force and not self.due(name, source, state):
                continue
            outcomes.append(self._run_one(name, source, state, ingestor, engine))
        if ingestor is not None and not any(
            s.kind == "segment_http" for s in self.sources.values()
        ):
            landed = self._drain_if_pending(ingestor)
            if landed is not None:
                outcomes.append(landed)
        return outcomes

    def _drain_if_pending(self, ingestor: Any) -> SyncOutcome | None:
        """Load what ``sources kafka`` (landing sink) or the HTTP intake landed, when no
        ``segment_http`` source does it on its own schedule."""
        from featurerec.events.sources.traits import TraitsLanding

        try:
            from featurerec.events.landing import Landing
        except ImportError:
            return None
        if not (
            Landing.for_settings(self.settings).pending()
            or TraitsLanding.for_settings(self.settings).pending()
        ):
            return None
        t0 = time.monotonic()
        try:
            summary = _drain_landing(self.settings, ingestor)
        except Exception as exc:
            return SyncOutcome(
                "landing",
                "landing",
                False,
                time.monotonic() - t0,
                error=f"{type(exc).__name__}: {exc}",
            )
        return SyncOutcome("landing", "landing", True, time.monotonic() - t0, summary=summary)

    def _run_one(
        self, name: str, source: SourceConfig, state: SourceState, ingestor: Any, engine: Any
    ) -> SyncOutcome:
        t0 = time.monotonic()
        started = self.now()
        state.last_sync_started = started.isoformat()
        try:
            summary = self.runner(name, source, self.settings, ingestor, engine)
        except Exception as exc:  # any failure is recorded and retried, never fatal
            # reload: the source may have saved progress before failing
            state = SourceState.load(self.settings, name, source.kind)
            state.last_sync_started = started.isoformat()
            state.consecutive_failures += 1
            backoff = Backoff(
                base=BACKOFF_BASE,
                cap=BACKOFF_CAP,
                seed=zlib.crc32(name.encode()),
                attempt=state.consecutive_failures - 1,
            )
            delay = backoff.next_delay()
            state.last_error = f"{started.isoformat()} {type(exc).__name__}: {exc}"
            state.next_attempt_at = (self.now() + timedelta(seconds=delay)).isoformat()
            state.last_sync_finished = self.now().isoformat()
            state.save(self.settings)
            log.warning("source %s failed (%s); retry in %.1f s", name, exc, delay)
            return SyncOutcome(
                name,
                source.kind,
                False,
                time.monotonic() - t0,
                error=state.last_error,
                next_attempt_at=state.next_attempt_at,
            )
        state = SourceState.load(self.settings, name, source.kind)
        state.last_sync_started = started.isoformat()
        state.last_success = started.isoformat()
        state.last_sync_finished = self.now().isoformat()
        state.consecutive_failures = 0
        state.next_attempt_at = None
        state.last_error = None
        if source.kind in ("kafka", "segment_http"):  # the others count in their own state
            state.add_counts(**_counts(summary))
        state.save(self.settings)
        return SyncOutcome(name, source.kind, True, time.monotonic() - t0, summary=summary)

    def run_forever(
        self,
        ingestor: Any,
        engine: Any,
        on_turn: Callable[[list[SyncOutcome]], None] | None = None,
    ) -> None:
        """Loop until :meth:`stop`: run what is due, sleep until the next source is due."""
        while not self._stop.is_set():
            outcomes = self.run_once(ingestor, engine)
            if on_turn and outcomes:
                on_turn(outcomes)
            self._stop.wait(self._sleep_seconds())

    def _sleep_seconds(self) -> float:
        now = self.now()
        wait = 60.0
        for name, source in self.sources.items():
            state = SourceState.load(self.settings, name, source.kind)
            if state.next_attempt_at:
                at = datetime.fromisoformat(state.next_attempt_at)
            elif source.every_seconds == 0 or state.last_success is None:
                at = now
            else:
                at = datetime.fromisoformat(state.last_success) + timedelta(
                    seconds=source.every_seconds
                )
            wait = min(wait, (at - now).total_seconds())
        return max(self.poll_seconds, wait)


def status_rows(settings: Settings) -> list[dict[str, Any]]:
    """One row per configured source: schedule, last sync, lag, counts, errors."""
    rows = []
    for name, source in settings.sources.items():
        st = SourceState.load(settings, name, source.kind)
        rows.append(
            {
                "source": name,
                "kind": source.kind,
                "enabled": source.enabled,
                "every_seconds": source.every_seconds,
                "last_success": st.last_success,
                "last_sync_finished": st.last_sync_finished,
                "lag": st.lag,
                "counts": st.counts,
                "position": st.position,
                "consecutive_failures": st.consecutive_failures,
                "next_attempt_at": st.next_attempt_at,
                "last_error": st.last_error,
            }
        )
    return rows
