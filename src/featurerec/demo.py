"""``featurerec demo``: the whole loop on a generated CloudFlow world, one command.

Every step runs the same ``featurerec`` sub-command a user would type, so the demo shows the
real commands and doubles as an end-to-end check; a failing step stops the demo.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from featurerec.cli_common import console, fail, to_json

DEMO_USERS = 5000
DEMO_DAYS = 60
DEMO_SEED = 0
ONLINE_USERS = 3000


@dataclass
class Step:
    title: str
    args: list[str]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "featurerec", *args]


def _run(step: Step, env: dict[str, str]) -> float:
    console.rule(f"[bold]{step.title}")
    console.print(f"[dim]$ featurerec {' '.join(step.args)}[/dim]")
    t0 = time.perf_counter()
    proc = subprocess.run(_cli(*step.args), env=env, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        fail(
            f"demo step '{step.title}' failed (exit {proc.returncode}); command: "
            f"featurerec {' '.join(step.args)}"
        )
    console.print(f"[green]done[/green] in {dt:.1f}s")
    return dt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _serve_and_sample(data_flags: list[str], env: dict[str, str], once: bool) -> None:
    import httpx

    console.rule("[bold]11. Serve /api/v1/recommendations (spec Stage 6) and send feedback")
    port = _free_port()
    args = [*data_flags, "serve", "--host", "127.0.0.1", "--port", str(port)]
    console.print(f"[dim]$ featurerec {' '.join(args)}[/dim]")
    server = subprocess.Popen(_cli(*args), env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                fail(f"server exited with code {server.returncode}")
            time.sleep(0.3)
        else:
            fail("server did not become ready within 60 s")
        users = _sample_users(data_flags, env)
        first_id = None
        for query, placement in users:
            url = f"{base}/api/v1/recommendations?{query}&placement={placement}"
            console.print(f"[dim]$ curl '{url}'[/dim]")
            resp = httpx.get(url, timeout=10)
            console.print_json(resp.text)
            recs = resp.json().get("recommendations", [])
            if first_id is None and recs:
                first_id = recs[0]["recommendation_id"]
        if first_id is not None:
            body = {"recommendation_id": first_id, "kind": "click"}
            console.print(f"[dim]$ curl -X POST {base}/api/v1/feedback -d '{to_json(body)}'[/dim]")
            console.print_json(httpx.post(f"{base}/api/v1/feedback", json=body, timeout=10).text)
        if once:
            return
        console.print(
            f"\n[bold green]Serving on {base}[/bold green] "
            f"(OpenAPI docs: {base}/docs). Press Ctrl-C to stop."
        )
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def _sample_users(data_flags: list[str], env: dict[str, str]) -> list[tuple[str, str]]:
    """A warm user who uses a few features (so there is something left to recommend), and
    an unknown visitor described only by the request's context (cold start)."""
    import orjson

    proc = subprocess.run(
        _cli(
            *data_flags,
            "sql",
            "--json",
            "SELECT user_id FROM ml.user_feature_interactions GROUP BY user_id "
            "HAVING COUNT(*) BETWEEN 2 AND 4 ORDER BY SUM(use_count) DESC, user_id LIMIT 1",
        ),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    users: list[tuple[str, str]] = []
    if proc.returncode == 0:
        rows: Any = orjson.loads(proc.stdout or "[]")
        if isinstance(rows, dict):
            rows = rows.get("rows", [])
        if rows:
            users.append((f"user_id={rows[0]['user_id']}", "in_context_tooltip"))
    users.append(
        (
            "user_id=usr_new_visitor&role=project_manager&plan=business&team_size=12",
            "onboarding_wizard",
        )
    )
    return users


def demo(
    dir: Annotated[
        Path, typer.Option("--dir", help="Folder for the demo world and its data directory.")
    ] = Path(".demo"),
    users: Annotated[int, typer.Option(help="Simulated users.")] = DEMO_USERS,
    days: Annotated[int, typer.Option(help="Simulated days.")] = DEMO_DAYS,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = DEMO_SEED,
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            envvar="DEMO_ONCE",
            help="Exit after the sample request instead of serving (for scripts).",
        ),
    ] = False,
    fresh: Annotated[bool, typer.Option(help="Delete the demo folder first.")] = False,
) -> None:
    """Run the whole loop on a generated CloudFlow world: simulate, ingest, discover,
    train and promote, evaluate, run a simulated online experiment, monitor, analyse,
    then serve and send sample requests and a click."""
    if fresh and dir.exists():
        shutil.rmtree(dir)
    dir.mkdir(parents=True, exist_ok=True)
    world = dir / "world"
    data = dir / "data"
    config = Path(__file__).parent / "configs" / "featurerec.demo.toml"
    data_flags = ["--config", str(config), "--data-dir", str(data)]
    online = dir / "online"
    online_flags = ["--config", str(config), "--data-dir", str(online / "data")]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    sim = ["simulate", "--users", str(users), "--days", str(days), "--seed", str(seed)]
    steps = [
        Step("1. Simulate a CloudFlow world", [*sim, "--out", str(world)]),
        Step("2. Ingest events and product tables", [*data_flags, "ingest", str(world)]),
        Step("3. Discovery (spec Stage 2)", [*data_flags, "report", "discovery"]),
        Step(
            "4. Daily training pipeline (spec Stage 4)",
            [*data_flags, "pipeline", "run", "--spec", "builtin:pipeline.demo.json"],
        ),
        Step("5. Offline evaluation", [*data_flags, "evaluate", "--world", str(world)]),
        Step(
            "6. Simulated online experiment (spec Stage 8): 4 strategies, 1 week, "
            f"{ONLINE_USERS:,} users through the real serving, ingestion and pipeline code",
            [
                *data_flags,
                *("simulate", "experiment", "rec-personalization-strategy"),
                *("--users", str(ONLINE_USERS), "--weeks", "1", "--warmup-days", "7"),
                # a short demo: the OPE log starts 3 days into the warm-up (a full run
                # waits out the 14-day dismissal cooldown first)
                *("--burn-in", "3"),
                *("--seed", str(seed), "--out", str(online)),
            ],
        ),
        Step(
            "7. Monitoring on the experiment's recommendation log (spec Stage 7)",
            [*online_flags, "monitor", "--no-alerts"],
        ),
        Step("8. Popularity bias (spec Stage 5)", [*online_flags, "report", "bias"]),
        Step("9. Cold start vs random (spec Stage 5)", [*online_flags, "report", "cold-start"]),
        Step(
            "10. Off-policy evaluation (spec Stage 8): collaborative_only judged from the "
            "warm-up's logged propensities and decision contexts",
            [*online_flags, "experiment", "ope", "--strategy", "collaborative_only"],
        ),
    ]
    if (world / "manifest.json").exists():
        steps = steps[1:]  # the same seed would write the same world again
    if online.exists():
        shutil.rmtree(online)  # the experiment starts from its own fresh world
    t0 = time.perf_counter()
    for step in steps:
        _run(step, env)
    _serve_and_sample(data_flags, env, once)
    console.rule()
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s; data in {data}")


def register(app: typer.Typer, groups: Any) -> None:
    app.command("demo")(demo)
