"""CLI commands of this package (registered by featurerec.cli)."""

from __future__ import annotations

from typing import Any

import typer


def register(app: typer.Typer, groups: Any) -> None:
    """Add this package's commands to the root ``app`` / shared ``groups``."""
