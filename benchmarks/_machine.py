"""Machine facts every benchmark result records next to its figures."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def machine_facts(load_before: tuple[float, float, float]) -> dict[str, Any]:
    """Cores, the load average before and now, Python and platform."""
    return {
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
