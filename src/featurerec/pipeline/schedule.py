"""Run a pipeline on its cron ``schedule`` in the foreground (``featurerec pipeline schedule``).

Cron times are UTC. The clock and the sleep are injectable so the loop is testable without
waiting for 04:00. The warehouse is opened per run by the caller's ``run_once``, so other
writers (ingestion) can use it between runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from croniter import croniter

from featurerec.errors import SpecError
from featurerec.pipeline.history import utcnow


def next_fire(cron: str, after: datetime) -> datetime:
    """The first cron time strictly after ``after`` (UTC, naive)."""
    if not croniter.is_valid(cron):
        raise SpecError(f"schedule {cron!r} is not a valid cron expression")
    nxt: datetime = croniter(cron, after).get_next(datetime)
    return nxt


def run_schedule(
    cron: str,
    run_once: Callable[[datetime], Any],
    *,
    once: bool = False,
    max_runs: int | None = None,
    now: Callable[[], datetime] = utcnow,
    sleep: Callable[[float], None] = time.sleep,
    on_wait: Callable[[datetime], None] | None = None,
) -> int:
    """Call ``run_once(fire_time)`` at each cron time; returns the number of runs.

    ``once``: run one time right now and return. ``max_runs``: stop after that many runs
    (None: forever). A failing run does not stop the schedule (it is in the run history).
    """
    if once:
        run_once(now())
        return 1
    runs = 0
    while max_runs is None or runs < max_runs:
        fire = next_fire(cron, now())
        if on_wait is not None:
            on_wait(fire)
        while (remaining := (fire - now()).total_seconds()) > 0:
            sleep(min(remaining, 60.0))
        run_once(fire)
        runs += 1
    return runs
