"""Segment message → featurerec event mapping (shared by the HTTP intake and Kafka).

Segment's tracking spec (``track``, ``page``, ``screen``, ``identify``, ``group``, ``alias``)
maps to the spec's nested event shape as follows; the result goes through
``normalize_records`` like every other source.

=====================  =====================================================================
featurerec field       from the Segment message
=====================  =====================================================================
``event_id``           ``messageId`` (Segment's dedupe key). Missing → a SHA-1 of the
                       message's canonical JSON, so a retried identical call dedupes too.
``user_id``            ``userId``; if absent ``"anon:" + anonymousId``.
``workspace_id``       ``properties.workspace_id``, else ``context.groupId``, else
                       ``context.traits.workspace_id``.
``event_type``         track: the event name in snake_case (:func:`snake_case`:
                       ``"Feature Used"`` → ``feature_used``, ``"featureUsed"`` →
                       ``feature_used``, ``"feature_used"`` unchanged), or the configured
                       ``event_map`` entry; page → ``page_viewed``; screen →
                       ``screen_viewed``.
``properties``         track / page ``properties`` as sent (promoted keys such as
                       ``feature_category`` become columns); page / screen ``name`` and
                       ``category`` go to ``page_name`` / ``page_category``; when the track
                       name was rewritten the original is kept as ``segment_event``.
``user_traits``        ``context.traits`` (track / page / screen).
``timestamp``          ``timestamp`` (else ``originalTimestamp``, else ``receivedAt``)
                       corrected for client clock skew as Segment does:
                       ``timestamp + (receivedAt − sentAt)`` when ``sentAt`` is known
                       (message ``sentAt``, else the batch's).
=====================  =====================================================================

``identify`` calls produce no event: their ``traits`` become a :class:`TraitsUpdate` for the
``users`` table (``role``, ``workspace_id``, ``signup_cohort``, ``signup_date`` promoted, all
traits kept as JSON). ``group`` and ``alias`` are accepted and counted but not stored.
A message that cannot be mapped (no user id, track without ``event``, unreadable timestamp,
not an object) is quarantined with the reason; the rest of the batch is accepted.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from featurerec.errors import DataError
from featurerec.events.sources.common import (
    QuarantinedRecord,
    TraitsUpdate,
    format_timestamp,
    parse_timestamp,
    raw_text,
)

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_WORD = re.compile(r"[^0-9a-zA-Z]+")

MESSAGE_TYPES = ("track", "page", "screen", "identify", "group", "alias")


def snake_case(name: str) -> str:
    """``"Feature Used"`` / ``"featureUsed"`` / ``"feature-used"`` → ``"feature_used"``."""
    text = _CAMEL.sub("_", name.strip())
    return _NON_WORD.sub("_", text).strip("_").lower()


@dataclass
class MappedMessages:
    """Segment messages split into spec-shaped event records, trait changes and rejects."""

    records: list[dict[str, Any]] = field(default_factory=list)
    #: Location of each record (same order as ``records``).
    locations: list[str] = field(default_factory=list)
    traits: list[tuple[str, dict[str, Any], datetime]] = field(default_factory=list)
    quarantined: list[QuarantinedRecord] = field(default_factory=list)
    ignored: int = 0

    def traits_update(self, source: str) -> TraitsUpdate | None:
        return TraitsUpdate.from_traits(self.traits, source) if self.traits else None


def is_segment_message(obj: Any) -> bool:
    """Whether ``obj`` looks like a Segment message rather than a spec-shaped event."""
    return (
        isinstance(obj, dict)
        and obj.get("type") in MESSAGE_TYPES
        and "event_type" not in obj
        and ("messageId" in obj or "userId" in obj or "anonymousId" in obj)
    )


def map_messages(
    messages: list[Any],
    *,
    received_at: datetime,
    source: str,
    location: str,
    batch_sent_at: Any = None,
    batch_context: dict[str, Any] | None = None,
    default_type: str | None = None,
    event_map: dict[str, str] | None = None,
) -> MappedMessages:
    """Map Segment ``messages`` (see the module doc). ``location`` prefixes each record's
    location (``"{location}[i]"``) for quarantine rows."""
    out = MappedMessages()
    for i, msg in enumerate(messages):
        where = f"{location}[{i}]"
        try:
            _map_one(
                msg,
                out,
                where=where,
                received_at=received_at,
                batch_sent_at=batch_sent_at,
                batch_context=batch_context,
                default_type=default_type,
                event_map=event_map or {},
            )
        except DataError as exc:
            out.quarantined.append(QuarantinedRecord(source, where, str(exc), raw_text(msg)))
    return out


def _map_one(
    msg: Any,
    out: MappedMessages,
    *,
    where: str,
    received_at: datetime,
    batch_sent_at: Any,
    batch_context: dict[str, Any] | None,
    default_type: str | None,
    event_map: dict[str, str],
) -> None:
    if not isinstance(msg, dict):
        raise DataError(f"message is not a JSON object (got {type(msg).__name__})")
    kind = msg.get("type") or default_type
    if kind not in MESSAGE_TYPES:
        raise DataError(f"unknown message type {kind!r}; expected one of {MESSAGE_TYPES}")
    if kind in ("group", "alias"):
        out.ignored += 1
        return
    context = {**(batch_context or {}), **_obj(msg.get("context"), "context")}
    user_id = msg.get("userId")
    if user_id in (None, ""):
        anon = msg.get("anonymousId")
        if anon in (None, ""):
            raise DataError("message has neither userId nor anonymousId")
        user_id = f"anon:{anon}"
    user_id = str(user_id)
    ts = corrected_timestamp(msg, received_at=received_at, batch_sent_at=batch_sent_at)
    if kind == "identify":
        traits = {
            **_obj(context.get("traits"), "context.traits"),
            **_obj(msg.get("traits"), "traits"),
        }
        if traits:
            out.traits.append((user_id, traits, ts))
        else:
            out.ignored += 1
        return
    props = dict(_obj(msg.get("properties"), "properties"))
    if kind == "track":
        name = msg.get("event")
        if not isinstance(name, str) or not name.strip():
            raise DataError("track message without an event name")
        event_type = event_map.get(name) or snake_case(name)
        if event_type != name:
            props.setdefault("segment_event", name)
    else:
        event_type = "page_viewed" if kind == "page" else "screen_viewed"
        for key in ("name", "category"):
            if msg.get(key) is not None:
                props.setdefault(f"page_{key}", msg[key])
    traits = _obj(context.get("traits"), "context.traits")
    workspace = props.get("workspace_id") or context.get("groupId") or traits.get("workspace_id")
    record: dict[str, Any] = {
        "event_id": str(msg.get("messageId") or _content_id(msg)),
        "user_id": user_id,
        "workspace_id": None if workspace is None else str(workspace),
        "event_type": event_type,
        "properties": props,
        "timestamp": format_timestamp(ts),
    }
    if traits:
        record["user_traits"] = traits
    out.records.append(record)
    out.locations.append(where)


def corrected_timestamp(
    msg: dict[str, Any], *, received_at: datetime, batch_sent_at: Any = None
) -> datetime:
    """Segment's clock-skew correction: ``timestamp + (receivedAt − sentAt)``."""
    raw = msg.get("timestamp") or msg.get("originalTimestamp")
    if raw is None:
        return received_at
    ts = parse_timestamp(raw, what="timestamp")
    sent_raw = msg.get("sentAt") or batch_sent_at
    if sent_raw is None:
        return ts
    sent = parse_timestamp(sent_raw, what="sentAt")
    return ts + (received_at - sent)


def _obj(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{what} must be an object (got {type(value).__name__})")
    return value


def _content_id(msg: dict[str, Any]) -> str:
    canon = orjson.dumps(msg, option=orjson.OPT_SORT_KEYS, default=str)
    return "seg_" + hashlib.sha1(canon).hexdigest()
