"""Alerts: one notice per breach, one when it recovers, to the log and webhooks.

State lives in a JSON file under the data directory (``settings.monitoring.state_file``), so
a breach that persists across many ``featurerec monitor`` runs alerts once. A webhook that
fails is retried on the next check (the breach stays "pending" for that sink only).

Sinks: ``log`` (the ``featurerec.alerts`` logger), ``slack://NAME`` / ``pagerduty://NAME``
(looked up in ``settings.monitoring.webhooks``), or a literal ``http(s)://`` URL. A webhook
gets an HTTP POST with a JSON body (:meth:`AlertNotice.payload`; ``text`` makes it readable
in Slack's incoming webhooks as is).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson

from featurerec.config import Settings
from featurerec.feedback.monitoring import MetricsSnapshot, MetricValue

log = logging.getLogger("featurerec.alerts")


@dataclass(frozen=True)
class AlertNotice:
    kind: Literal["breach", "recovered"]
    metric: str
    value: float | None
    target: float | None
    rule: str
    as_of: str
    model: str
    sinks: tuple[str, ...]
    message: str

    def payload(self) -> dict[str, Any]:
        body = asdict(self)
        body["sinks"] = list(self.sinks)
        body["text"] = self.message
        return body


@dataclass
class _MetricState:
    breached: bool = False
    since: str | None = None
    value: float | None = None
    #: Sinks that still owe the current notice (a failed delivery).
    pending: list[str] = field(default_factory=list)
    pending_kind: str | None = None


class AlertManager:
    """Turns metric snapshots into breach / recovery notices and delivers them."""

    def __init__(
        self,
        state_path: Path,
        *,
        webhooks: dict[str, str] | None = None,
        default_sinks: list[str] | None = None,
        timeout: float = 5.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.state_path = state_path
        self.webhooks = dict(webhooks or {})
        self.default_sinks = list(default_sinks if default_sinks is not None else ["log"])
        self.timeout = timeout
        self._client = client

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertManager:
        m = settings.monitoring
        p = Path(m.state_file).expanduser()
        return cls(
            p if p.is_absolute() else settings.data_path / p,
            webhooks=m.webhooks,
            default_sinks=m.default_sinks,
            timeout=m.webhook_timeout_seconds,
        )

    # -- state ---------------------------------------------------------------------------
    def load_state(self) -> dict[str, _MetricState]:
        if not self.state_path.exists():
            return {}
        raw = orjson.loads(self.state_path.read_bytes())
        return {k: _MetricState(**v) for k, v in raw.items()}

    def _save_state(self, state: dict[str, _MetricState]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        data = orjson.dumps({k: asdict(v) for k, v in state.items()}, option=orjson.OPT_INDENT_2)
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".alert_state.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    # -- main ----------------------------------------------------------------------------
    def process(self, snapshot: MetricsSnapshot) -> list[AlertNotice]:
        """Compare with the stored state; send and return the notices that are due."""
        state = self.load_state()
        sent: list[AlertNotice] = []
        for m in snapshot.metrics:
            st = state.setdefault(m.name, _MetricState())
            sinks = self._sinks(m)
            if m.status == "no data":
                continue
            if m.status == "breach" and not st.breached:
                notice = self._notice("breach", m, snapshot, sinks)
                st.breached, st.since, st.value = True, snapshot.as_of.isoformat(), m.value
                st.pending, st.pending_kind = self._deliver(notice, sinks), "breach"
                sent.append(notice)
            elif m.status == "ok" and st.breached:
                notice = self._notice("recovered", m, snapshot, sinks)
                st.breached, st.since, st.value = False, None, m.value
                st.pending, st.pending_kind = self._deliver(notice, sinks), "recovered"
                sent.append(notice)
            elif st.pending and st.pending_kind == ("breach" if st.breached else "recovered"):
                # A delivery failed last time: retry those sinks only.
                kind: Literal["breach", "recovered"] = "breach" if st.breached else "recovered"
                notice = self._notice(kind, m, snapshot, tuple(st.pending))
                st.pending = self._deliver(notice, tuple(st.pending))
                sent.append(notice)
        self._save_state(state)
        return sent

    def _sinks(self, m: MetricValue) -> tuple[str, ...]:
        out: list[str] = []
        for s in [*self.default_sinks, *m.sinks]:
            if s not in out:
                out.append(s)
        return tuple(out)

    @staticmethod
    def _notice(
        kind: Literal["breach", "recovered"],
        m: MetricValue,
        snap: MetricsSnapshot,
        sinks: tuple[str, ...],
    ) -> AlertNotice:
        value = "no value" if m.value is None else f"{m.value:.4g}{m.unit and ' ' + m.unit}"
        if kind == "breach":
            msg = (
                f"[{snap.model}] {m.name} = {value} breaches its alert rule ({m.alert_rule}); "
                f"target {m.target:g}, window {m.window}, n={m.sample_size}"
                if m.target is not None
                else f"[{snap.model}] {m.name} = {value} breaches {m.alert_rule}"
            )
        else:
            msg = f"[{snap.model}] {m.name} recovered: {value} (alert rule {m.alert_rule})"
        return AlertNotice(
            kind=kind,
            metric=m.name,
            value=m.value,
            target=m.target,
            rule=m.alert_rule,
            as_of=snap.as_of.isoformat(),
            model=snap.model,
            sinks=sinks,
            message=msg,
        )

    def _deliver(self, notice: AlertNotice, sinks: tuple[str, ...]) -> list[str]:
        """Send to every sink; return the sinks that failed (to retry next time)."""
        failed: list[str] = []
        for sink in sinks:
            if sink == "log":
                (log.warning if notice.kind == "breach" else log.info)(notice.message)
                continue
            url = self.webhooks.get(sink) or (
                sink if sink.startswith(("http://", "https://")) else None
            )
            if url is None:
                log.error(
                    "alert sink %r has no webhook URL: add it to [monitoring.webhooks] "
                    "in featurerec.toml; alert was: %s",
                    sink,
                    notice.message,
                )
                continue
            try:
                client = self._client or httpx
                resp = client.post(url, json=notice.payload(), timeout=self.timeout)
                resp.raise_for_status()
            except httpx.HTTPError as exc:
                log.error("alert to %s (%s) failed: %s", sink, url, exc)
                failed.append(sink)
        return failed
