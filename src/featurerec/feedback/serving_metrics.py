"""Serving metrics for monitoring: p99 latency and error rate of recommendation requests.

The serving process never opens the warehouse, so these come from what the server writes.
``settings.monitoring.serving_metrics`` names the source:

* ``auto`` (default): the request log below when it exists, else the server's ``/metrics``
  at ``[serving] host:port`` (SERVE's Prometheus endpoint), else no data;
* a JSON-lines request log (e.g. ``serving/requests.jsonl`` in the data dir), one object per
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
    """Serving stats from the configured source; ``auto`` (the default) reads the request log
    when it exists, else the running server's ``/metrics`` (host/port from ``[serving]``),
    else reports no data."""
    src = settings.monitoring.serving_metrics
    timeout = settings.monitoring.webhook_timeout_seconds
    if src.startswith(("http://", "https://")):
        return _from_prometheus(src, timeout)
    if src == "auto":
        log_path = settings.data_path / "serving" / "requests.jsonl"
        if log_path.exists():
            return read_request_log(log_path, start=start, end=end)
        url = f"http://{settings.serving.host}:{settings.serving.port}/metrics"
        try:
            return _from_prometheus(url, min(timeout, 2.0))
        except DataError:
            return ServingStats(0, None, None, f"{url} (not reachable)")
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


#: The recommendation endpoint's label in the server's histogram (SERVE's app.py).
RECOMMEND_ENDPOINT = "/api/v1/recommendations"


def parse_prometheus(text: str, source: str = "metrics") -> ServingStats:
    """p99 and error rate from Prometheus text.

    Latency: a histogram named ``*latency_seconds`` / ``*latency_ms``; when it has an
    ``endpoint`` label only the recommendation endpoint counts. Errors: a counter
    ``*request_errors_total`` (status >= 500 counts; 4xx are the caller's errors) or a
    ``*requests_total`` counter with a ``status`` / ``code`` label. Requests: the histogram's
    observations plus 5xx errors, or the ``*requests_total`` counter when present.
    """
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    scale = 1000.0
    total = 0.0
    errors = 0.0
    for fam in text_string_to_metric_families(text):
        base = fam.name.removesuffix("_total")
        if fam.type == "histogram" and fam.name.endswith(("latency_seconds", "latency_ms")):
            scale = 1000.0 if fam.name.endswith("seconds") else 1.0
            for smp in fam.samples:
                ep = smp.labels.get("endpoint")
                if smp.name.endswith("_bucket") and ep in (None, RECOMMEND_ENDPOINT):
                    le = float(smp.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + smp.value
        elif fam.type in ("counter", "unknown") and base.endswith("request_errors"):
            for smp in fam.samples:
                ep = smp.labels.get("endpoint")
                code = str(smp.labels.get("status", smp.labels.get("code", "500")))
                server_error = code.startswith("5") or code == "error"
                if (
                    smp.name.endswith("_total")
                    and ep in (None, RECOMMEND_ENDPOINT)
                    and server_error
                ):
                    errors += smp.value
        elif fam.type in ("counter", "unknown") and base.endswith("requests"):
            for smp in fam.samples:
                if not smp.name.endswith("_total"):
                    continue
                total += smp.value
                code = str(smp.labels.get("status", smp.labels.get("code", "200")))
                if code.startswith("5") or code == "error":
                    errors += smp.value
    bounds = sorted(buckets)
    p99 = histogram_quantile(0.99, bounds, [buckets[b] for b in bounds])
    if not total:
        total = buckets.get(math.inf, 0.0) + errors
    return ServingStats(
        int(total),
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
