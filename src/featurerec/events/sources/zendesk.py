"""Support tickets from Zendesk: incremental API import and export files.

API: Zendesk's cursor-based incremental ticket export. The first request is
``GET /api/v2/incremental/tickets/cursor.json?start_time=<unix seconds>``, each answer has
``tickets``, ``after_cursor`` / ``after_url`` and ``end_of_stream``; the next request is
``…/cursor.json?cursor=<after_cursor>``, until ``end_of_stream`` is true. The last
``after_cursor`` is stored under the data dir and the next sync continues from it, so each
sync reads only what changed. Users are side-loaded (``include=users``) to find the product
user id (the requester's ``external_id``). Rate limits (429) are waited out per
``Retry-After``; 5xx and connection errors are retried with backoff, then reported as
:class:`SourceUnavailable` with nothing stored from the failed page (the cursor stays).

Files: Zendesk's JSON export (one ticket per line), a JSON array of tickets, or an object
with a ``tickets`` list (what the API returns).

Friction signal: each ticket's topic maps to a feature through ``options.features``
(``{"automations": {"tags": ["automation_rules"], "keywords": ["automation", "trigger"]}}``):
the first feature whose tags the ticket carries, else the first whose keyword appears as a
word in the subject. The result goes to ``support_tickets.feature``, which the context
features count as open feature tickets per user. Tickets with ``status = "deleted"`` are
deleted from the warehouse. Tickets that cannot be read (no id, bad timestamp) are
quarantined with the reason.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from featurerec.config import Settings, SourceConfig
from featurerec.errors import DataError
from featurerec.events.sources.common import (
    Backoff,
    QuarantinedRecord,
    RowChanges,
    SourceState,
    SourceUnavailable,
    coerce_row,
    parse_timestamp,
    raw_text,
    utcnow,
    warehouse_schema,
)
from featurerec.events.sources.sinks import RowWriter, write_quarantine

EXPORT_PATH = "/api/v2/incremental/tickets/cursor.json"


class FeatureTopic(BaseModel):
    """Ticket topics that point at one feature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tags: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)


class ZendeskOptions(BaseModel):
    """``[sources.NAME.options]`` of a ``zendesk`` source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``https://<subdomain>.zendesk.com`` (or a test server); or give ``subdomain``.
    base_url: str | None = None
    subdomain: str | None = None
    #: API token auth: ``{email}/token:{api_token}``. Or an OAuth ``bearer_token``.
    email: str | None = None
    api_token: str | None = None
    bearer_token: str | None = None
    #: First sync starts here (ISO-8601 or unix seconds); later syncs use the stored cursor.
    start_time: str | int = 0
    #: feature → topics.
    features: dict[str, FeatureTopic] = Field(default_factory=dict)
    #: Where the product user id comes from: the requester's ``external_id`` (side-loaded),
    #: ``requester_id`` (prefixed ``zd:``) or ``custom_field:<id>``.
    user_id_from: str = "requester_external_id"
    #: Optional ``custom_field:<id>`` holding the workspace id.
    workspace_from: str | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    #: Longest wait for one 429 ``Retry-After``.
    max_retry_after_seconds: float = Field(default=120.0, ge=0)

    @model_validator(mode="after")
    def _where(self) -> ZendeskOptions:
        for what in (self.user_id_from, self.workspace_from):
            if (
                what
                and what not in ("requester_external_id", "requester_id")
                and not (what.startswith("custom_field:") and what.split(":", 1)[1].isdigit())
            ):
                raise ValueError(f"unknown id source {what!r}")
        return self

    @property
    def url(self) -> str:
        """The API root; file imports need none, API syncs need base_url or subdomain."""
        if not self.base_url and not self.subdomain:
            raise DataError("zendesk: give options.base_url or options.subdomain for API syncs")
        return (self.base_url or f"https://{self.subdomain}.zendesk.com").rstrip("/")

    @classmethod
    def from_source(cls, name: str, source: SourceConfig) -> ZendeskOptions:
        try:
            return cls.model_validate(source.options)
        except ValidationError as exc:
            errs = "; ".join(
                f"sources.{name}.options{'.' if e['loc'] else ''}"
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors()
            )
            raise DataError(errs) from None


class FeatureMatcher:
    """Ticket tags / subject → feature (see the module doc for the order)."""

    def __init__(self, features: dict[str, FeatureTopic]) -> None:
        self.by_tag: dict[str, str] = {}
        self.keywords: list[tuple[re.Pattern[str], str]] = []
        for feature, topic in features.items():
            for tag in topic.tags:
                self.by_tag.setdefault(tag.lower(), feature)
            for kw in topic.keywords:
                self.keywords.append((re.compile(rf"\b{re.escape(kw.lower())}\w*\b"), feature))

    def match(self, tags: Iterable[str], subject: str | None) -> str | None:
        for tag in tags:
            hit = self.by_tag.get(str(tag).lower())
            if hit:
                return hit
        text = (subject or "").lower()
        for pattern, feature in self.keywords:
            if pattern.search(text):
                return feature
        return None


@dataclass
class TicketReport:
    source: str
    pages: int = 0
    upserts: int = 0
    deletes: int = 0
    quarantined: int = 0
    feature_tickets: int = 0
    cursor: str | None = None
    rate_limited: int = 0


@dataclass
class TicketMapper:
    """Zendesk ticket JSON → ``support_tickets`` rows."""

    source: str
    options: ZendeskOptions
    matcher: FeatureMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.matcher = FeatureMatcher(self.options.features)

    def map(
        self, tickets: list[Any], users: dict[int, dict[str, Any]], location: str
    ) -> tuple[RowChanges, list[QuarantinedRecord], int]:
        """(changes, quarantined, feature-related count) for one page or file."""
        upserts: list[dict[str, Any]] = []
        deletes: list[dict[str, Any]] = []
        bad: list[QuarantinedRecord] = []
        schema = warehouse_schema("support_tickets")
        featured = 0
        seen: dict[str, int] = {}
        for i, t in enumerate(tickets):
            where = f"{location}[{i}]"
            try:
                if not isinstance(t, dict):
                    raise DataError(f"ticket is not a JSON object (got {type(t).__name__})")
                if t.get("id") in (None, ""):
                    raise DataError("ticket without an id")
                tid = str(t["id"])
                if t.get("status") == "deleted":
                    deletes.append({"ticket_id": tid})
                    continue
                tags = t.get("tags") or []
                if not isinstance(tags, list):
                    raise DataError(f"tags must be a list (got {type(tags).__name__})")
                feature = self.matcher.match(tags, t.get("subject"))
                row = {
                    "ticket_id": tid,
                    "user_id": self._id(t, users, self.options.user_id_from),
                    "workspace_id": self._id(t, users, self.options.workspace_from),
                    "created_at": parse_timestamp(t.get("created_at"), what="created_at"),
                    "updated_at": parse_timestamp(
                        t.get("updated_at") or t.get("created_at"), what="updated_at"
                    ),
                    "subject": t.get("subject"),
                    "tags": orjson.dumps([str(x) for x in tags]).decode(),
                    "status": t.get("status"),
                    "feature": feature,
                }
                row = coerce_row(row, schema, where="ticket")
            except DataError as exc:
                bad.append(QuarantinedRecord(self.source, where, str(exc), raw_text(t)))
                continue
            featured += feature is not None
            if tid in seen:  # the export may list a ticket twice: keep the last version
                upserts[seen[tid]] = row
            else:
                seen[tid] = len(upserts)
                upserts.append(row)
        deleted = {d["ticket_id"] for d in deletes}
        upserts = [r for r in upserts if r["ticket_id"] not in deleted]
        return RowChanges.from_rows("support_tickets", upserts, deletes), bad, featured

    @staticmethod
    def _id(t: dict[str, Any], users: dict[int, dict[str, Any]], how: str | None) -> str | None:
        if how is None:
            return None
        if how == "requester_id":
            rid = t.get("requester_id")
            return None if rid is None else f"zd:{rid}"
        if how == "requester_external_id":
            user = users.get(t.get("requester_id"))  # type: ignore[arg-type]
            ext = (user or {}).get("external_id")
            return None if ext in (None, "") else str(ext)
        field_id = int(how.split(":", 1)[1])
        for cf in t.get("custom_fields") or []:
            if (
                isinstance(cf, dict)
                and cf.get("id") == field_id
                and cf.get("value")
                not in (
                    None,
                    "",
                )
            ):
                return str(cf["value"])
        return None


class ZendeskTickets:
    """One ``zendesk`` source: API sync (:meth:`sync_once`) and file import."""

    def __init__(
        self,
        name: str,
        options: ZendeskOptions,
        settings: Settings,
        writer: RowWriter,
        engine: Any,
        *,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.options = options
        self.settings = settings
        self.writer = writer
        self.engine = engine
        self.mapper = TicketMapper(name, options)
        self.client = client or httpx.Client(timeout=options.timeout_seconds)
        self.sleep = sleep

    @classmethod
    def from_config(
        cls, name: str, source: SourceConfig, settings: Settings, writer: RowWriter, engine: Any
    ) -> ZendeskTickets:
        return cls(name, ZendeskOptions.from_source(name, source), settings, writer, engine)

    # -- API ------------------------------------------------------------------------------
    def sync_once(self) -> TicketReport:
        """Read every page since the stored cursor (or ``start_time``) and apply it."""
        report = TicketReport(source=self.name)
        state = SourceState.load(self.settings, self.name, "zendesk")
        state.last_sync_started = utcnow().isoformat()
        cursor = state.position.get("after_cursor")
        while True:
            params: dict[str, Any] = {"include": "users"}
            if cursor:
                params["cursor"] = cursor
            else:
                params["start_time"] = _unix(self.options.start_time)
            page = self._get(params, report)
            tickets = page.get("tickets")
            if not isinstance(tickets, list):
                raise DataError(
                    f"{self.name}: answer without a tickets list: {raw_text(page, 300)}"
                )
            users = {
                u["id"]: u for u in page.get("users") or [] if isinstance(u, dict) and "id" in u
            }
            location = f"zendesk:{EXPORT_PATH}?{'cursor=' + cursor if cursor else 'start_time'}"
            self._apply(tickets, users, location, report)
            report.pages += 1
            next_cursor = page.get("after_cursor")
            if next_cursor:
                cursor = str(next_cursor)
                state.position["after_cursor"] = cursor
                state.save(self.settings)  # after the page's warehouse commit
            if page.get("end_of_stream", True) or not next_cursor:
                break
        report.cursor = cursor
        state.add_counts(
            upserts=report.upserts, deletes=report.deletes, quarantined=report.quarantined
        )
        state.last_sync_finished = utcnow().isoformat()
        state.save(self.settings)
        return report

    def _get(self, params: dict[str, Any], report: TicketReport) -> dict[str, Any]:
        opts = self.options
        headers = {"Accept": "application/json"}
        if opts.bearer_token:
            headers["Authorization"] = f"Bearer {opts.bearer_token}"
        elif opts.email and opts.api_token:
            cred = base64.b64encode(f"{opts.email}/token:{opts.api_token}".encode()).decode()
            headers["Authorization"] = f"Basic {cred}"
        backoff = Backoff(base=1.0, cap=60.0, seed=0)
        url = opts.url + EXPORT_PATH
        last = ""
        for _attempt in range(opts.max_retries + 1):
            try:
                resp = self.client.get(url, params=params, headers=headers)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
                self.sleep(backoff.next_delay())
                continue
            if resp.status_code == 429:
                report.rate_limited += 1
                wait = _retry_after(resp.headers.get("Retry-After"), backoff.next_delay())
                self.sleep(min(wait, opts.max_retry_after_seconds))
                last = "429 rate limited"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}"
                self.sleep(backoff.next_delay())
                continue
            if resp.status_code in (401, 403):
                raise DataError(
                    f"{self.name}: Zendesk refused the credentials (HTTP {resp.status_code})"
                )
            if resp.status_code != 200:
                raise DataError(f"{self.name}: HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                data = orjson.loads(resp.content)
            except orjson.JSONDecodeError as exc:
                raise DataError(f"{self.name}: answer is not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise DataError(f"{self.name}: answer is not a JSON object")
            return data
        raise SourceUnavailable(f"{self.name}: Zendesk unreachable at {url}: {last}")

    # -- files ----------------------------------------------------------------------------
    def import_files(self, paths: Iterable[str | Path]) -> TicketReport:
        """Import Zendesk JSON exports (NDJSON, a JSON array, or ``{"tickets": [...]}``)."""
        report = TicketReport(source=self.name)
        for path in paths:
            p = Path(path)
            try:
                text = p.read_bytes()
            except OSError as exc:
                raise DataError(f"{p}: cannot read: {exc}") from None
            tickets, users, bad = _parse_export(text, self.name, str(p))
            report.quarantined += write_quarantine(self.engine, bad, self.writer)
            self._apply(tickets, users, str(p), report)
            report.pages += 1
        state = SourceState.load(self.settings, self.name, "zendesk")
        state.add_counts(
            upserts=report.upserts, deletes=report.deletes, quarantined=report.quarantined
        )
        state.last_sync_finished = utcnow().isoformat()
        state.save(self.settings)
        return report

    def _apply(
        self,
        tickets: list[Any],
        users: dict[int, dict[str, Any]],
        location: str,
        report: TicketReport,
    ) -> None:
        changes, bad, featured = self.mapper.map(tickets, users, location)
        if changes.deletes.num_rows:
            self.writer.delete_rows("support_tickets", changes.deletes)
        if changes.upserts.num_rows:
            self.writer.upsert_rows("support_tickets", changes.upserts)
        report.upserts += changes.upserts.num_rows
        report.deletes += changes.deletes.num_rows
        report.feature_tickets += featured
        report.quarantined += write_quarantine(self.engine, bad, self.writer)


def _parse_export(
    text: bytes, source: str, location: str
) -> tuple[list[Any], dict[int, dict[str, Any]], list[QuarantinedRecord]]:
    bad: list[QuarantinedRecord] = []
    stripped = text.lstrip()
    if stripped.startswith((b"[", b"{")):
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            data = None  # maybe NDJSON starting with an object
        if isinstance(data, list):
            return data, {}, bad
        if isinstance(data, dict) and isinstance(data.get("tickets"), list):
            users = {
                u["id"]: u for u in data.get("users") or [] if isinstance(u, dict) and "id" in u
            }
            return data["tickets"], users, bad
        if isinstance(data, dict) and "id" in data:
            return [data], {}, bad
    tickets: list[Any] = []
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tickets.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            bad.append(
                QuarantinedRecord(
                    source, f"{location}:{no}", f"invalid JSON: {exc}", raw_text(line)
                )
            )
    return tickets, {}, bad


def _unix(value: str | int) -> int:
    if isinstance(value, int):
        return value
    if value.strip().isdigit():
        return int(value)
    dt = parse_timestamp(value, what="start_time")
    return int((dt - parse_timestamp(0)).total_seconds())


def _retry_after(header: str | None, default: float) -> float:
    if header is None:
        return default
    try:
        return max(0.0, float(header))
    except ValueError:
        return default
