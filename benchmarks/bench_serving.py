"""Serving benchmark: a real load generator (wrk) on loopback against one server worker.

    .venv/bin/python benchmarks/bench_serving.py [--data-dir DIR] [--users 72000]

Without ``--data-dir`` it builds a fixture world of ``--users`` users (serving's own seeded
fixture generator, not the simulator), exports the online-state snapshot, trains and promotes
a bundle, then starts ``featurerec serve --workers 1`` (recommendation log on, fsync per
group commit) and measures with wrk (``apt-get install -y wrk``):

* 200 QPS and 1,000 QPS paced runs (wrk's ``delay()`` per connection): p50 / p99 / achieved
  QPS, for ``GET /api/v1/recommendations`` and for the no-op endpoint ``/noop`` on the same
  server in the same run;
* unpaced runs with growing connection counts: the highest throughput whose p99 ≤ 100 ms,
  for both endpoints (their ratio shows the cost of our path);
* the serving process's RSS after the runs.

Writes ``benchmarks/results/serving.json`` with machine facts and the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving.json"

LUA = """
math.randomseed(%(seed)s)
local ids = {%(ids)s}
local delay_ms = %(delay)s
local prefix = "%(prefix)s"
local counter = 0
request = function()
  counter = counter + 1
  local u = ids[math.random(1, #ids)]
  return wrk.format("GET", prefix .. u)
end
delay = function()
  return delay_ms
end
"""


def build_fixture_world(data: Path, n_users: int) -> None:
    from featurerec.config import Settings
    from featurerec.models.als import ALSParams
    from featurerec.models.fit import TrainConfig, train_bundle
    from featurerec.registry import registry_for
    from featurerec.serving.snapshot import build_snapshot
    from featurerec.serving.testing import (
        FIXTURE_AS_OF,
        fill_fixture_warehouse,
        publish_bundle,
        training_data_from_snapshot,
    )
    from featurerec.warehouse.engine import DuckDBEngine

    settings = Settings.model_validate({"data_dir": str(data)})
    t0 = time.time()
    with DuckDBEngine(":memory:") as engine:
        fill_fixture_warehouse(engine, n_users=n_users, seed=11)
        snap = build_snapshot(engine, settings, FIXTURE_AS_OF)
    snap.save(data / "tmp_snapshot")
    reg = registry_for(settings)
    reg.register("feature-recommender-online", data / "tmp_snapshot", kind="state")
    shutil.rmtree(data / "tmp_snapshot")
    print(f"world: {snap.n_users} users in {time.time() - t0:.1f}s", flush=True)
    t0 = time.time()
    params = ALSParams(factors=64, iterations=15)
    bundle, _ = train_bundle(
        training_data_from_snapshot(snap),
        TrainConfig(als_params=params, als_grid=(params,), seed=0),
    )
    publish_bundle(reg, bundle, data / "tmp_bundle")
    shutil.rmtree(data / "tmp_bundle")
    print(f"bundle trained and promoted in {time.time() - t0:.1f}s", flush=True)


def fsync_latency(directory: Path, n: int = 200) -> dict[str, float]:
    """p50 / p99 of append + fsync of a 1 KB line on the data disk (the rec log's floor)."""
    path = directory / "fsync_probe.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 1023 + b"\n")
            t = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def user_ids(data: Path, n: int | None = None) -> list[str]:
    """Request user ids: every user of the snapshot (shuffled) by default, so the runs do not
    exhaust a few users' weekly caps and end up timing empty responses."""
    from featurerec.config import Settings
    from featurerec.registry import registry_for
    from featurerec.serving.snapshot import OnlineSnapshot

    settings = Settings.model_validate({"data_dir": str(data)})
    mv = registry_for(settings).resolve("state:/feature-recommender-online/latest")
    ids = OnlineSnapshot.load(mv.path).user_ids
    rng = np.random.default_rng(0)
    size = len(ids) if n is None else min(n, len(ids))
    return [str(x) for x in rng.choice(ids, size=size, replace=False)]


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict[str, Any]:
    """One wrk run (or the Python generator when wrk is not installed)."""
    if shutil.which("wrk") is None:
        return pyload(url, script, connections, seconds)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    res: dict[str, float] = {"connections": connections}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["qps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["errors"] = float(m.group(1)) if m else 0.0
    return res


_BUCKET = re.compile(
    r'^featurerec_request_latency_seconds_bucket\{endpoint="([^"]+)",le="([^"]+)"\} ([\d.e+]+)',
    re.M,
)


def server_histogram(url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the server's own latency histogram, per endpoint."""
    out: dict[str, dict[float, float]] = {}
    for ep, le, count in _BUCKET.findall(httpx.get(f"{url}/metrics").text):
        out.setdefault(ep, {})[float("inf") if le == "+Inf" else float(le)] = float(count)
    return out


def served_items(url: str) -> tuple[float, float]:
    """(recommendations served, recommendation requests) so far, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    items = sum(
        float(v)
        for v in re.findall(r"^featurerec_recommendations_total\{[^}]*\} (\S+)", text, re.M)
    )
    m = re.search(
        r'^featurerec_request_latency_seconds_count\{endpoint="/api/v1/recommendations"\} (\S+)',
        text,
        re.M,
    )
    return items, float(m.group(1)) if m else 0.0


def _with_items(url: str, before: tuple[float, float], r: dict) -> dict:
    items, reqs = served_items(url)
    n = reqs - before[1]
    r["items_per_response"] = round((items - before[0]) / n, 3) if n else None
    return r


def server_quantiles(before: dict, after: dict, endpoint: str) -> dict[str, float]:
    """p50 / p99 (ms, bucket-interpolated) of server-side latency between two scrapes."""
    b, a = before.get(endpoint, {}), after.get(endpoint, {})
    les = sorted(a)
    cum = [a[le] - b.get(le, 0.0) for le in les]
    total = cum[-1] if cum else 0.0
    res: dict[str, float] = {"count": total}
    for q in (0.5, 0.99):
        target, prev_le, prev_c = q * total, 0.0, 0.0
        val = float("nan")
        for le, c in zip(les, cum, strict=True):
            if c >= target and total > 0:
                if le == float("inf"):
                    val = prev_le
                else:
                    frac = (target - prev_c) / max(c - prev_c, 1e-9)
                    val = prev_le + frac * (le - prev_le)
                break
            prev_le, prev_c = le, c
        res[f"p{int(q * 100)}_ms"] = round(val * 1000, 3)
    return res


def pyload(url: str, script: Path, connections: int, seconds: int) -> dict[str, Any]:
    """Fallback load generator with wrk's semantics (``connections`` keep-alive connections,
    each: request, wait for the response, sleep ``delay``), driven by asyncio + httpx.
    It needs far more CPU per request than wrk, so its ceilings are lower."""
    import asyncio
    import random

    text = script.read_text()
    ids = json.loads("[" + re.search(r"local ids = \{(.*)\}", text).group(1) + "]")  # type: ignore[union-attr]
    delay = float(re.search(r"local delay_ms = ([\d.]+)", text).group(1)) / 1000  # type: ignore[union-attr]
    prefix = re.search(r'local prefix = "(.*)"', text).group(1)  # type: ignore[union-attr]
    lat: list[float] = []
    errors = 0

    async def worker(client: httpx.AsyncClient, stop: float) -> None:
        nonlocal errors
        rnd = random.Random(len(lat))
        while time.perf_counter() < stop:
            t = time.perf_counter()
            r = await client.get(prefix + rnd.choice(ids))
            lat.append(time.perf_counter() - t)
            errors += r.status_code >= 300
            if delay:
                await asyncio.sleep(delay)

    async def main() -> float:
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(base_url=url, limits=limits) as client:
            t0 = time.perf_counter()
            stop = t0 + seconds
            await asyncio.gather(*(worker(client, stop) for _ in range(connections)))
            return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    arr = np.array(lat) * 1000
    return {
        "connections": connections,
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "qps": len(lat) / elapsed,
        "errors": float(errors),
        "generator": "python-httpx (wrk not installed)",
    }


_RUN = 0


def script(tmp: Path, name: str, prefix: str, ids: list[str], delay_ms: float) -> Path:
    p = tmp / f"{name}.lua"
    global _RUN
    _RUN += 1  # every run draws a different sequence of users (Lua's default seed is fixed)
    p.write_text(
        LUA
        % {
            "ids": ",".join(json.dumps(i) for i in ids),
            "delay": delay_ms,
            "prefix": prefix,
            "seed": 1000 + _RUN,
        }
    )
    return p


def paced(url: str, tmp: Path, ids: list[str], qps: int, seconds: int) -> dict[str, dict]:
    # Many connections with a long delay each, so response time barely slows the rate.
    conns = max(8, qps // 20)
    delay = conns * 1000.0 / qps
    out = {}
    for name, prefix in (("recommendations", "/api/v1/recommendations?user_id="),
                         ("noop", "/noop?u=")):  # fmt: skip
        before = server_histogram(url)
        counts = served_items(url)
        r: dict = wrk(url, script(tmp, f"{name}_{qps}", prefix, ids, delay), conns, seconds)
        if name == "recommendations":
            _with_items(url, counts, r)
        r["target_qps"] = qps
        if name == "recommendations":
            r["server_side"] = server_quantiles(
                before, server_histogram(url), "/api/v1/recommendations"
            )
        out[name] = r
        print(f"  {qps} QPS {name}: {r}", flush=True)
    return out


def max_qps(url: str, tmp: Path, ids: list[str], seconds: int) -> dict[str, dict]:
    out = {}
    for name, prefix in (("recommendations", "/api/v1/recommendations?user_id="),
                         ("noop", "/noop?u=")):  # fmt: skip
        runs = []
        for c in (1, 2, 4, 8, 16, 32, 64):
            counts = served_items(url)
            r = wrk(url, script(tmp, f"{name}_max", prefix, ids, 0), c, seconds)
            if name == "recommendations":
                _with_items(url, counts, r)
            runs.append(r)
            print(f"  unpaced {name} c={c}: {r}", flush=True)
            if r["p99_ms"] > 100:
                break
        ok = [r for r in runs if r["p99_ms"] <= 100 and r["errors"] == 0]
        best = max(ok, key=lambda r: r["qps"]) if ok else None
        out[name] = {"best": best, "runs": runs}
    return out


class Server:
    """``featurerec serve --workers 1`` in a subprocess on a free loopback port."""

    def __init__(self, data: Path, tmp: Path, config: Path | None = None) -> None:
        self.data, self.tmp, self.config = data, tmp, config
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_s = 0.0

    def start(self) -> dict:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "featurerec.cli", "--data-dir", str(self.data)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        cmd += ["serve", "--port", str(self.port), "--workers", "1"]
        t0 = time.time()
        self.log = open(self.tmp / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        while True:
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=1)
                if ready.status_code == 200:
                    self.startup_s = time.time() - t0
                    return dict(ready.json())
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() - t0 > 600:
                sys.exit(f"server did not start; see {self.log.name}")
            time.sleep(0.5)

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def reclog_line_sizes(log_dir: Path) -> dict[str, float]:
    """Lines and mean bytes per line in the first pass's recommendation log, by kind: a
    served item, or a request's decision context (``[serving] log_decision_context``)."""
    counts = {"recommendation": 0, "context": 0}
    sizes = {"recommendation": 0, "context": 0}
    for path in sorted(log_dir.glob("reclog-*.jsonl")):
        with path.open("rb") as fh:
            for line in fh:
                kind = "context" if b'"record":"context"' in line else "recommendation"
                counts[kind] += 1
                sizes[kind] += len(line)
    out: dict[str, float] = {}
    for kind, n in counts.items():
        out[f"{kind}_lines"] = n
        out[f"{kind}_bytes_per_line"] = round(sizes[kind] / n, 1) if n else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, help="serve an existing data dir (demo world)")
    ap.add_argument("--users", type=int, default=72_000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--config", type=Path, help="featurerec.toml of the given data dir")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install -y wrk): using the slower Python generator")
    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    data = tmp / "data"
    world = "given data dir"
    if args.data_dir is not None:
        # Serve a copy: the run writes recommendation logs, which would use up weekly caps
        # in the next run (and change the user's data).
        def runtime_logs(folder: str, names: list[str]) -> list[str]:
            return [n for n in names if Path(folder).name == "serving" and n.startswith("log")]

        shutil.copytree(args.data_dir, data, ignore=runtime_logs)
        world = f"copy of {args.data_dir}"
    else:
        build_fixture_world(data, args.users)
        world = f"serving fixture world ({args.users} users, seeded; not the simulator)"
    ids = user_ids(data)
    server = Server(data, tmp, config=args.config)
    try:
        readyz = server.start()
        startup_s = server.startup_s
        url = server.url
        print(f"server ready in {startup_s:.1f}s: {readyz}", flush=True)
        rss_start = server.rss()
        fsync_before = fsync_latency(data)
        # warm-up
        wrk(url, script(tmp, "warm", "/api/v1/recommendations?user_id=", ids, 5), 4, 3)
        results = {
            "qps_200": paced(url, tmp, ids, 200, args.seconds),
            "qps_1000": paced(url, tmp, ids, 1000, args.seconds),
            "max_qps_p99_le_100ms": max_qps(url, tmp, ids, max(5, args.seconds // 2)),
        }
        rss_end = server.rss()
        fsync_after = fsync_latency(data)
        sample = httpx.get(f"{url}/api/v1/recommendations", params={"user_id": ids[0]}).json()
    finally:
        server.stop()
    # Same runs with the rec log written but not fsync-ed: how much of the latency is the
    # disk's fsync (the log still survives a process kill, not a power loss). The first
    # pass's log is moved aside, so this server starts with nobody's weekly caps used up.
    log_dir = data / "serving" / "log"
    log_size = reclog_line_sizes(log_dir)
    if log_dir.exists():
        log_dir.rename(log_dir.with_name("log.fsync-pass"))
    cfg = tmp / "nofsync.toml"
    base = args.config.read_text() if args.config else ""
    cfg.write_text(base.replace("[serving]", "[serving]\ndurable_log = false", 1)
                   if "[serving]" in base else base + "\n[serving]\ndurable_log = false\n")  # fmt: skip
    server = Server(data, tmp, config=cfg)
    try:
        server.start()
        wrk(server.url, script(tmp, "warm", "/api/v1/recommendations?user_id=", ids, 5), 4, 3)
        results["no_fsync"] = {
            "qps_200": paced(server.url, tmp, ids, 200, args.seconds),
            "qps_1000": paced(server.url, tmp, ids, 1000, args.seconds),
        }
    finally:
        server.stop()
    best_r = results["max_qps_p99_le_100ms"]["recommendations"]["best"]
    best_n = results["max_qps_p99_le_100ms"]["noop"]["best"]
    summary = {
        "200qps_p50_ms": results["qps_200"]["recommendations"]["p50_ms"],
        "200qps_p99_ms": results["qps_200"]["recommendations"]["p99_ms"],
        "200qps_server_side": results["qps_200"]["recommendations"].get("server_side"),
        "1000qps_server_side": results["qps_1000"]["recommendations"].get("server_side"),
        "1000qps_p99_ms": results["qps_1000"]["recommendations"]["p99_ms"],
        "1000qps_achieved": results["qps_1000"]["recommendations"]["qps"],
        "no_fsync_200qps_p50_ms": results["no_fsync"]["qps_200"]["recommendations"]["p50_ms"],
        "no_fsync_200qps_p99_ms": results["no_fsync"]["qps_200"]["recommendations"]["p99_ms"],
        "no_fsync_1000qps_p99_ms": results["no_fsync"]["qps_1000"]["recommendations"]["p99_ms"],
        "max_qps_p99_le_100ms": best_r["qps"] if best_r else None,
        "noop_max_qps_p99_le_100ms": best_n["qps"] if best_n else None,
        "max_qps_ratio_recs_to_noop": (best_r["qps"] / best_n["qps"])
        if best_r and best_n
        else None,
        "rss_mib": round(rss_end / 2**20, 1),
        "reclog_line_bytes": log_size,
        "users": readyz["users"],
        "targets": {"200qps_p50_ms": 3, "200qps_p99_ms": 10, "1000qps_p99_ms": 20},
    }
    out = {
        "benchmark": "serving",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "world": world,
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg(),
            "fsync_ms_before_runs": fsync_before,
            "fsync_ms_after_runs": fsync_after,
        },
        "setup": {
            "load_generator": ("wrk 1 thread" if shutil.which("wrk") else "python httpx (no wrk)")
            + ", loopback; paced runs use a delay per connection between requests",
            "server": "featurerec serve --workers 1 (uvicorn, uvloop, httptools), rec log fsync",
            "startup_s": round(startup_s, 1),
            "rss_mib_after_start": round(rss_start / 2**20, 1),
            "model_version": readyz.get("model_version"),
            "fallback": readyz.get("fallback"),
        },
        "summary": summary,
        "runs": results,
        "sample_response": sample,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(summary, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
