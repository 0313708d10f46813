"""Small helpers shared by attribution, monitoring, analysis and experiment reports."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from featurerec.errors import DataError
from featurerec.warehouse.engine import load_sql

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def named_statements(text: str) -> dict[str, str]:
    """Split a ``.sql`` file into the statements marked ``-- name: X`` (text before the first
    marker is a header comment and is dropped)."""
    parts = _NAME.split(text)
    out = {parts[i]: parts[i + 1].strip().rstrip(";") for i in range(1, len(parts) - 1, 2)}
    if not out:
        raise DataError("SQL file has no '-- name: X' statements")
    return out


def load_named_sql(name: str, package: str) -> dict[str, str]:
    return named_statements(load_sql(name, package))


def latest_timestamp(engine: Any) -> datetime | None:
    """The latest thing the warehouse knows about: a product event, a served recommendation
    or a feedback event. Windows default to end here, never at the wall clock."""
    row = engine.query_rows(
        """
        SELECT GREATEST(
            (SELECT MAX(timestamp) FROM events),
            (SELECT MAX(generated_at) FROM ml.recommendation_log),
            (SELECT MAX(timestamp) FROM ml.recommendation_events)
        ) AS ts
        """
    )[0]["ts"]
    return row if isinstance(row, datetime) else None


def resolve_as_of(engine: Any, as_of: datetime | None) -> datetime:
    """``as_of`` or the warehouse's latest timestamp; an empty warehouse is an error."""
    if as_of is not None:
        return as_of.replace(tzinfo=None)
    ts = latest_timestamp(engine)
    if ts is None:
        raise DataError(
            "the warehouse has no events and no recommendations yet: ingest events "
            "(`featurerec ingest`) or serve recommendations first, or pass --as-of"
        )
    return ts


_PARAM = re.compile(r"\$([A-Za-z_]\w*)")


def bind(sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` that ``sql`` references (DuckDB rejects extra parameters)."""
    code = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    used = set(_PARAM.findall(code))
    missing = used - set(params)
    if missing:
        raise DataError(f"SQL parameter(s) not supplied: {sorted(missing)}")
    return {k: v for k, v in params.items() if k in used}
