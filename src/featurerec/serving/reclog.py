"""The recommendation log and the feedback log: append-only, durable, loadable.

Every served recommendation is one JSON line in a ``reclog-*.jsonl`` segment, every
impression / click / dismiss one line in a ``feedback-*.jsonl`` segment, under
``<data>/serving/log``. Group commit: the lines of all requests that finish while the
previous sync runs are written together and ``fsync``-ed once before any of those requests
resumes, so a response is never sent for a recommendation that is not on disk (kill the
process at any point: every acknowledged id is in the log; at most the torn tail of an
unacknowledged line is lost, and readers skip it).

Each process writes its own segments (``<prefix>-<date>-<pid>-<n>.jsonl``, rotated daily and
by size), so several workers never interleave lines. :func:`load_reclog` loads all segments
into ``ml.recommendation_log`` and ``ml.recommendation_events``, idempotently (primary keys
``recommendation_id`` / ``feedback_id``; loading twice adds nothing).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

RECLOG_PREFIX = "reclog"
#: Syncs that may run at once (each covers every line written before it started).
_MAX_INFLIGHT_SYNCS = 2
FEEDBACK_PREFIX = "feedback"

#: Columns of ml.recommendation_log, in order (warehouse/schema.py).
RECLOG_COLUMNS: dict[str, pa.DataType] = {
    "recommendation_id": pa.string(),
    "request_id": pa.string(),
    "user_id": pa.string(),
    "recommended_feature": pa.string(),
    "score": pa.float64(),
    "position": pa.int32(),
    "placement": pa.string(),
    "strategy": pa.string(),
    "experiment": pa.string(),
    "variant": pa.string(),
    "model_version": pa.string(),
    "propensity": pa.float64(),
    "fallback": pa.bool_(),
    "generated_at": pa.timestamp("us"),
}
#: Columns of ml.recommendation_context: one line per served request in the same segments
#: as its recommendations (marked ``"record": "context"``), so both become durable together.
CONTEXT_COLUMNS: dict[str, pa.DataType] = {
    "request_id": pa.string(),
    "user_id": pa.string(),
    "generated_at": pa.timestamp("us"),
    "placement": pa.string(),
    "slate_size": pa.int32(),
    "candidate_top_k": pa.int32(),
    "exploration_rate": pa.float64(),
    "user_context": pa.string(),
    "interactions": pa.string(),
    "recent_features": pa.string(),
    "event_count": pa.int32(),
    "eligible": pa.string(),
    "excluded": pa.string(),
    "exposure_excluded": pa.string(),
}
#: The marker of a context line in a reclog segment.
CONTEXT_RECORD = "context"
#: Columns of ml.recommendation_events.
FEEDBACK_COLUMNS: dict[str, pa.DataType] = {
    "feedback_id": pa.string(),
    "recommendation_id": pa.string(),
    "user_id": pa.string(),
    "kind": pa.string(),
    "timestamp": pa.timestamp("us"),
}


class DurableLog:
    """Append-only JSONL segments with group commit (one fsync per group of requests).

    ``append_async`` (the server) queues the lines of a request; a sync thread writes and
    ``fsync``-s everything queued (the event loop keeps serving while the disk syncs) and
    releases those requests when the sync returns. Up to two syncs run at once; what queues
    up while both run goes into the next one. So a slow disk costs a request about one
    fsync of latency, never one fsync per request ahead of it. While syncs are fast
    (average under ``inline_below_ms``) and none is in flight, a request writes and syncs
    inline instead: on a quiet, fast disk that is cheaper than two thread switches. ``append`` (CLI, tests) writes and
    syncs at once. ``fsync=False`` is for tests that do not care about power loss.
    """

    def __init__(
        self,
        directory: str | Path,
        prefix: str,
        *,
        fsync: bool = True,
        rotate_bytes: int = 64 << 20,
        inline_below_ms: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        #: While recent syncs take less than this, the server writes and syncs inline on
        #: the event loop (no thread hand-off); slower disks switch to the sync thread.
        self.inline_below_ms = inline_below_ms
        self.sync_ms_ewma = 0.0
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.fsync = fsync
        self.rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day = ""
        self._size = 0
        self._seq = 0
        self.records_written = 0
        self.commits = 0
        self._closed = False
        self._pending: list[tuple[bytes, int, asyncio.Future[None]]] = []
        self._inflight = 0
        self._executor = ThreadPoolExecutor(
            _MAX_INFLIGHT_SYNCS, thread_name_prefix=f"{prefix}-fsync"
        )

    @staticmethod
    def encode(records: list[dict[str, Any]]) -> bytes:
        return b"".join(orjson.dumps(r) + b"\n" for r in records)

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write ``records`` and return once they are on disk."""
        if records:
            self._write(self.encode(records), len(records))

    async def append_async(self, records: list[dict[str, Any]]) -> None:
        """Await durability of ``records`` (group commit, see the class doc)."""
        if not records:
            return
        if self._closed:
            raise RuntimeError(f"{self.prefix} log is closed")
        if not self._inflight and not self._pending and self.sync_ms_ewma < self.inline_below_ms:
            # Fast disk (or no fsync): write and sync right here; cheaper than two thread
            # switches, and nothing else is waiting for a sync.
            self._write(self.encode(records), len(records))
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((self.encode(records), len(records), fut))
        if self._inflight < _MAX_INFLIGHT_SYNCS:
            self._start_sync(loop)
        await fut

    def _start_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand everything queued to a sync thread; when it returns, release those requests
        and start the next sync if more queued up meanwhile (the group commit)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._inflight += 1
        data = b"".join(b[0] for b in batch)
        cfut = self._executor.submit(self._write, data, sum(b[1] for b in batch))

        def done(f: Any) -> None:
            loop.call_soon_threadsafe(self._synced, loop, batch, f.exception())

        cfut.add_done_callback(done)

    def _synced(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[bytes, int, asyncio.Future[None]]],
        err: BaseException | None,
    ) -> None:
        self._inflight -= 1
        _settle_all(batch, err)
        if self._pending and self._inflight < _MAX_INFLIGHT_SYNCS:
            self._start_sync(loop)

    def _flush(self) -> None:
        """Write whatever is queued, synchronously (used at close)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        err: BaseException | None = None
        try:
            self._write(b"".join(b[0] for b in batch), sum(b[1] for b in batch))
        except OSError as exc:
            err = exc
        _settle_all(batch, err)

    def close(self) -> None:
        """Flush what is queued and close the segment."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._executor.shutdown(wait=True)
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- writing -------------------------------------------------------------------------
    def _segment(self, incoming: int) -> int:
        day = datetime.now(UTC).strftime("%Y%m%d")
        if self._fd is None or day != self._day or self._size + incoming > self.rotate_bytes:
            if self._fd is not None:
                os.close(self._fd)
            self._seq += 1
            name = f"{self.prefix}-{day}-{os.getpid()}-{self._seq:04d}.jsonl"
            self._fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if self.fsync:  # make the new file's directory entry durable too
                dfd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self._day, self._size = day, 0
        return self._fd

    def _write(self, data: bytes, n_records: int) -> None:
        """Append ``data`` (under the lock, so lines never interleave), then fsync outside
        the lock on a private descriptor, so two syncs can be in flight at once: a batch
        that queued during one sync does not wait for it to finish before its own starts."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.prefix} log is closed")
            fd = self._segment(len(data))
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            self._size += len(data)
            self.records_written += n_records
            self.commits += 1
            sync_fd = os.dup(fd) if self.fsync else -1
        if sync_fd >= 0:
            t0 = time.perf_counter()
            try:
                os.fsync(sync_fd)  # covers this batch and everything written before it
            finally:
                os.close(sync_fd)
            ms = (time.perf_counter() - t0) * 1000.0
            self.sync_ms_ewma = 0.8 * self.sync_ms_ewma + 0.2 * ms


def _settle_all(
    batch: list[tuple[bytes, int, asyncio.Future[None]]], err: BaseException | None
) -> None:
    for _, _, fut in batch:
        if fut.done() or fut.get_loop().is_closed():
            continue
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)


# -- reading -----------------------------------------------------------------------------


def segments(directory: str | Path, prefix: str, since: float | None = None) -> list[Path]:
    """Segment files of ``prefix``, oldest first; ``since`` (epoch seconds) skips files not
    modified after it."""
    d = Path(directory)
    if not d.exists():
        return []
    files = sorted(d.glob(f"{prefix}-*.jsonl"))
    if since is not None:
        files = [p for p in files if p.stat().st_mtime >= since]
    return files


def iter_records(
    directory: str | Path, prefix: str, since: float | None = None
) -> Iterator[dict[str, Any]]:
    """Every complete line of every segment (a torn final line is skipped)."""
    for path in segments(directory, prefix, since):
        with open(path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # torn write of an unacknowledged batch
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue


def iter_recommendations(
    directory: str | Path, since: float | None = None
) -> Iterator[dict[str, Any]]:
    """The recommendation lines of the reclog segments (their context lines skipped)."""
    for r in iter_records(directory, RECLOG_PREFIX, since):
        if r.get("record") != CONTEXT_RECORD:
            yield r


def _parse_ts(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).replace(tzinfo=None)


def records_table(records: list[dict[str, Any]], columns: dict[str, pa.DataType]) -> pa.Table:
    """Records -> Arrow table with exactly ``columns`` (later duplicates of a key dropped)."""
    key = next(iter(columns))
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for r in records:
        k = r.get(key)
        if k is None or k in seen:
            continue
        seen.add(k)
        rows.append(r)
    data: dict[str, list[Any]] = {}
    for name, typ in columns.items():
        vals = [r.get(name) for r in rows]
        if pa.types.is_timestamp(typ):
            vals = [_parse_ts(v) for v in vals]
        data[name] = vals
    return pa.table({n: pa.array(v, type=columns[n]) for n, v in data.items()})


@dataclass(frozen=True)
class ReclogLoadReport:
    files: int
    recommendations_read: int
    recommendations_new: int
    feedback_read: int
    feedback_new: int
    contexts_read: int = 0
    contexts_new: int = 0


def insert_logs(
    engine: Any,
    recommendations: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    contexts: Sequence[dict[str, Any]] = (),
) -> tuple[int, int, int]:
    """Insert log records into ml.recommendation_log / _events / _context, new rows only
    (``INSERT OR IGNORE`` on the primary keys), in one transaction; returns the rows read
    per table (after dropping repeated keys)."""
    tables = (
        ("_reclog_in", records_table(recommendations, RECLOG_COLUMNS),
         "ml.recommendation_log", RECLOG_COLUMNS),
        ("_feedback_in", records_table(feedback, FEEDBACK_COLUMNS),
         "ml.recommendation_events", FEEDBACK_COLUMNS),
        ("_context_in", records_table(list(contexts), CONTEXT_COLUMNS),
         "ml.recommendation_context", CONTEXT_COLUMNS),
    )  # fmt: skip
    with engine.transaction():
        for name, table, target, cols in tables:
            if not table.num_rows:
                continue
            engine.register_arrow(name, table)
            try:
                engine.execute(
                    f"INSERT OR IGNORE INTO {target} ({', '.join(cols)}) "
                    f"SELECT {', '.join(cols)} FROM {name}"
                )
            finally:
                engine.unregister(name)
    return tables[0][1].num_rows, tables[1][1].num_rows, tables[2][1].num_rows


def load_reclog(engine: Any, directory: str | Path) -> ReclogLoadReport:
    """Load every segment under ``directory`` into the warehouse; idempotent.

    New rows only: ``INSERT OR IGNORE`` on the primary keys, in one transaction.
    """
    recs: list[dict[str, Any]] = []
    contexts: list[dict[str, Any]] = []
    for r in iter_records(directory, RECLOG_PREFIX):  # both kinds of line in one pass
        (contexts if r.get("record") == CONTEXT_RECORD else recs).append(r)
    fbs = list(iter_records(directory, FEEDBACK_PREFIX))
    count = {
        t: engine.scalar(f"SELECT COUNT(*) FROM ml.{t}")
        for t in ("recommendation_log", "recommendation_events", "recommendation_context")
    }
    n_rec, n_fb, n_ctx = insert_logs(engine, recs, fbs, contexts)
    new = {t: int(engine.scalar(f"SELECT COUNT(*) FROM ml.{t}") - c) for t, c in count.items()}
    return ReclogLoadReport(
        files=len(segments(directory, RECLOG_PREFIX)) + len(segments(directory, FEEDBACK_PREFIX)),
        recommendations_read=n_rec,
        recommendations_new=new["recommendation_log"],
        feedback_read=n_fb,
        feedback_new=new["recommendation_events"],
        contexts_read=n_ctx,
        contexts_new=new["recommendation_context"],
    )


def reclog_dir(settings: Any) -> Path:
    """Where the serving process writes its logs: ``<data>/serving/log``."""
    return Path(settings.data_path) / "serving" / "log"
