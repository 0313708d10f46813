"""Serving metrics for monitoring: p99 latency and error rate of recommendation requests.

The serving process never opens the warehouse, so these come from what the server writes.
``settings.monitoring.serving_metrics`` names the source:

* a JSON-lines request log (default ``<data dir>/serving/requests.jsonl``), one object per
  request with ``timestamp`` (ISO, UTC), ``latency_ms`` and either ``status`` (HTTP code;
  >= 500 is an error) or ``error`` (bool). Windows apply.
* an ``http(s)://`` URL of the server's Prometheus ``/metrics``: a histogram whose name ends
  in ``latency_seconds`` or ``latency_ms`` (p99 interpolated within buckets) and a counter
  ``*requests_total`` with a ``status`` / ``code`` label. Prometheus counters are cumulative
  since the server started, so the window does not apply there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson

from featurerec.config import Settings
from featurerec.errors import DataError


@dataclass(frozen=True)
class ServingStats:
    requests: int
    p99_ms: float | None
    error_rate: float | None
    source: str


def _path(settings: Settings) -> Path:
    p = Path(settings.monitoring.serving_metrics).expanduser()
    return p if p.is_absolute() else settings.data_path / p


def read_serving_stats(settings: Settings, *, start: datetime, end: datetime) -> ServingStats:
    src = settings.monitoring.serving_metrics
    if src.startswith(("http://", "https://")):
        return _from_prometheus(src, settings.monitoring.webhook_timeout_seconds)
    return read_request_log(_path(settings), start=start, end=end)


def read_request_log(path: Path, *, start: datetime, end: datetime) -> ServingStats:
    """p99 latency and error rate of the requests logged in ``(start, end]``."""
    if not path.exists():
        return ServingStats(0, None, None, str(path))
    lat: list[float] = []
    errors = 0
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                ts = datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00"))
            except (orjson.JSONDecodeError, KeyError, ValueError) as exc:
                raise DataError(f"{path}:{lineno}: bad request-log line ({exc})") from None
            ts = ts.replace(tzinfo=None)
            if not (start < ts <= end):
                continue
            lat.append(float(rec.get("latency_ms", math.nan)))
            status = rec.get("status")
            if rec.get("error") or (isinstance(status, int) and status >= 500):
                errors += 1
    if not lat:
        return ServingStats(0, None, None, str(path))
    arr = np.asarray(lat)
    arr = arr[~np.isnan(arr)]
    p99 = float(np.percentile(arr, 99)) if arr.size else None
    return ServingStats(len(lat), p99, errors / len(lat), str(path))


def histogram_quantile(q: float, bounds: list[float], cumulative: list[float]) -> float | None:
    """Prometheus-style quantile from cumulative bucket counts (upper bounds, +Inf last)."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, cumulative, strict=True):
        if c >= rank:
            if math.isinf(b):
                return prev_b
            if c == prev_c:
                return b
            return prev_b + (b - prev_b) * (rank - prev_c) / (c - prev_c)
        prev_b, prev_c = b, c
    return prev_b


def parse_prometheus(text: str, source: str = "metrics") -> ServingStats:
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    scale = 1000.0
    total = 0.0
    errors = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.type == "histogram" and fam.name.endswith(("latency_seconds", "latency_ms")):
            scale = 1000.0 if fam.name.endswith("seconds") else 1.0
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
        elif fam.type in ("counter", "unknown") and fam.name.removesuffix("_total").endswith(
            "requests"
        ):
            for s in fam.samples:
                if not s.name.endswith("_total"):
                    continue
                total += s.value
                code = str(s.labels.get("status", s.labels.get("code", "200")))
                if code.startswith("5") or code == "error":
                    errors += s.value
    bounds = sorted(buckets)
    p99 = histogram_quantile(0.99, bounds, [buckets[b] for b in bounds])
    n = int(total) if total else int(buckets.get(math.inf, 0))
    return ServingStats(
        n,
        None if p99 is None else p99 * scale,
        errors / total if total else None,
        source,
    )


def _from_prometheus(url: str, timeout: float) -> ServingStats:
    import httpx

    try:
        resp = httpx.get(url, timeout=timeout)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise DataError(f"cannot read serving metrics from {url}: {exc}") from None
    return parse_prometheus(resp.text, url)
