"""Segment-compatible HTTP intake: ``POST /v1/batch``, ``/v1/track``, ``/v1/identify``,
``/v1/page`` (and ``/v1/screen``), as Segment's tracking API accepts them, so an app that
already uses a Segment library only changes its host.

* **Auth**: HTTP Basic with the write key as user name and an empty password (what the
  libraries send); a ``writeKey`` in the body is accepted too. Keys come from the
  ``segment_http`` sources in the config (``options.write_keys``). Wrong or missing key → 401.
* **Bodies**: JSON, optionally ``Content-Encoding: gzip``.
* **Limits** (Segment's): a body over 500 KB (after decompression) → 413, a message over
  32 KB → 400, each with the reason. Segment answers 400 for both; 413 is the HTTP status
  for "body too large" and the Segment client treats both as final (no retry).
  Malformed JSON → 400.
* **Mapping**: :mod:`featurerec.events.sources.segment` (``messageId`` → ``event_id``, which
  the append path dedupes; ``sentAt`` clock-skew correction; ``track`` names → snake_case
  event types; ``page`` → ``page_viewed``; ``identify`` → a :class:`TraitsUpdate`).
  Messages that cannot be mapped or validated are quarantined with the reason and the rest of
  the batch is accepted, as Segment does (it answers 200 and drops them).
* **Durability**: ``{"success": true}`` is sent only after ``on_batch`` returned for the
  event batch and for the trait update, i.e. after ``Landing.write`` made them durable. If
  that fails the answer is 503, and the Segment client retries the batch.

``on_batch`` receives a :class:`featurerec.events.validate.ValidatedBatch` (events plus
quarantine); it defaults to :func:`landing_writer` (``Landing(settings.data_path /
"landing").write``). ``on_traits`` receives the :class:`TraitsUpdate` of the request's
``identify`` calls; it defaults to
:meth:`featurerec.events.sources.traits.TraitsLanding.write`, drained into the ``users``
table by ``featurerec sources sync``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from featurerec.config import Settings
from featurerec.errors import DataError
from featurerec.events.sources.common import TraitsUpdate, utcnow
from featurerec.events.sources.segment import map_messages

OnBatch = Callable[[Any], object]

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 32 * 1024
BATCH_LIMIT = 500 * 1024


class SegmentOptions(BaseModel):
    """``[sources.NAME.options]`` of a ``segment_http`` source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    write_keys: list[str] = Field(default_factory=list)
    #: Segment event name → event_type, beating the snake_case rule.
    event_map: dict[str, str] = Field(default_factory=dict)
    max_message_bytes: int = Field(default=MESSAGE_LIMIT, gt=0)
    max_batch_bytes: int = Field(default=BATCH_LIMIT, gt=0)


@dataclass(frozen=True)
class IntakeConfig:
    """Everything the router needs, merged from every ``segment_http`` source."""

    write_keys: dict[str, str]  # key → source name
    event_map: dict[str, str]
    max_message_bytes: int
    max_batch_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> IntakeConfig:
        keys: dict[str, str] = {}
        event_map: dict[str, str] = {}
        msg_limit, batch_limit = MESSAGE_LIMIT, BATCH_LIMIT
        for name, src in settings.sources.items():
            if src.kind != "segment_http" or not src.enabled:
                continue
            try:
                opts = SegmentOptions.model_validate(src.options)
            except ValidationError as exc:
                errs = "; ".join(
                    f"sources.{name}.options.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                    for e in exc.errors()
                )
                raise DataError(errs) from None
            keys.update(dict.fromkeys(opts.write_keys, name))
            event_map.update(opts.event_map)
            msg_limit, batch_limit = opts.max_message_bytes, opts.max_batch_bytes
        return cls(keys, event_map, msg_limit, batch_limit)


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def landing_writer(settings: Settings) -> OnBatch:
    """The default ``on_batch``: ``Landing(<data_dir>/landing).write`` (durable on return)."""
    from featurerec.events.landing import Landing

    return Landing.for_settings(settings).write


def build_router(
    settings: Settings, on_batch: OnBatch | None = None, on_traits: OnBatch | None = None
) -> APIRouter:
    """The Segment-compatible intake routes (mount on the featurerec server)."""
    from featurerec.events.sources.traits import TraitsLanding

    config = IntakeConfig.from_settings(settings)
    writer: list[OnBatch | None] = [on_batch]
    traits_writer: OnBatch = on_traits or TraitsLanding.for_settings(settings).write
    router = APIRouter(tags=["segment"])

    def sink() -> OnBatch:
        current = writer[0]
        if current is None:
            current = writer[0] = landing_writer(settings)
        return current

    async def handle(request: Request, kind: str | None) -> JSONResponse:
        received_at = utcnow()
        try:
            body = await _read_body(request, config.max_batch_bytes)
            payload = _parse(body)
            source = _authenticate(request, payload, config)
            if kind is None:
                messages = payload.get("batch")
                if not isinstance(messages, list):
                    raise _Reject(400, "invalid_request", "batch: expected a list of messages")
                batch_sent_at = payload.get("sentAt")
                batch_context = (
                    payload.get("context") if isinstance(payload.get("context"), dict) else None
                )
            else:
                messages, batch_sent_at, batch_context = [payload], None, None
            for i, msg in enumerate(messages):
                size = len(orjson.dumps(msg))
                if size > config.max_message_bytes:
                    where = "message" if kind else f"batch[{i}]"
                    raise _Reject(
                        400,
                        "message_too_large",
                        f"{where} is {size} bytes; the limit is {config.max_message_bytes} "
                        "bytes per message",
                    )
            # Mapping and validation (CPU, DuckDB) run in a worker thread; the hand-over runs
            # on the event loop, so on_batch never sees two requests at once.
            prepared = await run_in_threadpool(
                functools.partial(
                    prepare_messages,
                    messages,
                    settings=settings,
                    source=source,
                    received_at=received_at,
                    batch_sent_at=batch_sent_at,
                    batch_context=batch_context,
                    default_type=kind,
                    event_map=config.event_map,
                    location=f"http:{request.url.path}@{received_at.isoformat()}",
                )
            )
            deliver(prepared, sink(), traits_writer)
            result = prepared.counts()
        except _Reject as rej:
            return JSONResponse(
                {"success": False, "code": rej.code, "message": rej.message},
                status_code=rej.status,
            )
        except Exception as exc:  # not durably stored: the client must retry
            log.exception("segment intake: batch not stored")
            return JSONResponse(
                {"success": False, "code": "unavailable", "message": f"not stored: {exc}"},
                status_code=503,
            )
        return JSONResponse({"success": True, **result})

    @router.post("/v1/batch")
    async def batch(request: Request) -> JSONResponse:
        return await handle(request, None)

    @router.post("/v1/track")
    async def track(request: Request) -> JSONResponse:
        return await handle(request, "track")

    @router.post("/v1/identify")
    async def identify(request: Request) -> JSONResponse:
        return await handle(request, "identify")

    @router.post("/v1/page")
    async def page(request: Request) -> JSONResponse:
        return await handle(request, "page")

    @router.post("/v1/screen")
    async def screen(request: Request) -> JSONResponse:
        return await handle(request, "screen")

    return router


@dataclass(frozen=True)
class PreparedIntake:
    """One request's messages, mapped and validated, ready to hand over."""

    batch: Any  # ValidatedBatch
    traits: TraitsUpdate | None
    ignored: int

    def counts(self) -> dict[str, int]:
        return {
            "accepted": self.batch.accepted,
            "quarantined": self.batch.quarantined,
            "filtered": self.batch.filtered,
            "duplicates": self.batch.duplicates,
            "traits": 0 if self.traits is None else len(self.traits),
            "ignored": self.ignored,
        }


def prepare_messages(
    messages: list[Any],
    *,
    settings: Settings,
    source: str,
    received_at: Any,
    location: str,
    batch_sent_at: Any = None,
    batch_context: dict[str, Any] | None = None,
    default_type: str | None = None,
    event_map: dict[str, str] | None = None,
) -> PreparedIntake:
    """Map and validate Segment messages (pure: no I/O, safe in a worker thread)."""
    from featurerec.events.validate import QuarantineRecord, normalize_records, quarantine_table

    mapped = map_messages(
        messages,
        received_at=received_at,
        source=source,
        location=location,
        batch_sent_at=batch_sent_at,
        batch_context=batch_context,
        default_type=default_type,
        event_map=event_map,
    )
    batch = normalize_records(
        mapped.records, settings=settings, source=source, locations=mapped.locations
    )
    if mapped.quarantined:
        extra = quarantine_table([QuarantineRecord(**q.__dict__) for q in mapped.quarantined])
        batch = type(batch)(
            events=batch.events,
            quarantine=pa.concat_tables([extra, batch.quarantine]),
            source=batch.source,
            received=batch.received + len(mapped.quarantined),
            filtered=batch.filtered,
            duplicates=batch.duplicates,
            origin=location,
        )
    return PreparedIntake(batch, mapped.traits_update(source), mapped.ignored)


def deliver(prepared: PreparedIntake, on_batch: OnBatch, on_traits: OnBatch | None = None) -> None:
    """Hand a prepared request over; returns once ``on_batch`` / ``on_traits`` returned
    (durable)."""
    if prepared.batch.received:
        on_batch(prepared.batch)
    if prepared.traits is not None:
        (on_traits or on_batch)(prepared.traits)


def accept_messages(
    messages: list[Any],
    *,
    on_batch: OnBatch,
    on_traits: OnBatch | None = None,
    **kwargs: Any,
) -> dict[str, int]:
    """Map, validate and durably hand over Segment messages; returns the counts."""
    prepared = prepare_messages(messages, **kwargs)
    deliver(prepared, on_batch, on_traits)
    return prepared.counts()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, gunzipped if needed, refusing more than ``limit`` bytes."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip"):
        raise _Reject(400, "unsupported_encoding", f"Content-Encoding {encoding!r} not supported")
    chunks: list[bytes] = []
    raw_size = 0
    # gzip bodies: cap what we read compressed (a 500 KB JSON compresses well below that).
    async for chunk in request.stream():
        raw_size += len(chunk)
        if raw_size > limit:
            raise _too_large(limit, "at least " + str(raw_size))
        chunks.append(chunk)
    raw = b"".join(chunks)
    if encoding != "gzip":
        return raw
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(raw, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise _too_large(limit, f"more than {limit}")
        if not d.eof:
            raise _Reject(400, "invalid_gzip", "gzip body is truncated")
        return out
    except zlib.error as exc:
        raise _Reject(400, "invalid_gzip", f"body is not valid gzip: {exc}") from None


def _too_large(limit: int, size: str) -> _Reject:
    return _Reject(
        413,
        "batch_too_large",
        f"request body is {size} bytes; the limit is {limit} bytes per batch",
    )


def _parse(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Reject(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _Reject(400, "invalid_json", "body must be a JSON object")
    return payload


def _authenticate(request: Request, payload: dict[str, Any], config: IntakeConfig) -> str:
    """The source name the write key belongs to; 401 otherwise."""
    key: str | None = None
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _Reject(
                401, "unauthorized", "Authorization header is not valid Basic auth"
            ) from None
        key = decoded.split(":", 1)[0]
    elif isinstance(payload.get("writeKey"), str):
        key = payload["writeKey"]
    if not config.write_keys:
        raise _Reject(401, "unauthorized", "no write keys configured for a segment_http source")
    if not key:
        raise _Reject(401, "unauthorized", "missing write key (Basic auth user name)")
    source = config.write_keys.get(key)
    if source is None:
        raise _Reject(401, "unauthorized", "invalid write key")
    return source
