"""The ``featurerec`` command.

Each package owns its sub-commands in its own ``cli.py`` with a ``register(app, groups)``
function; this module only builds the root, the shared groups and the error handling.
Heavy libraries (implicit, faiss, FastAPI) are imported inside commands, so ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from featurerec import __version__
from featurerec.config import ConfigError
from featurerec.errors import FeaturerecError
from featurerec.warehouse.engine import WarehouseError

app = typer.Typer(
    name="featurerec",
    help="Recommend the right product feature to the right user at the right moment, "
    "and prove it moved adoption.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass(frozen=True)
class CLIGroups:
    """Command groups that more than one package adds commands to."""

    report: typer.Typer
    simulate: typer.Typer


groups = CLIGroups(
    report=typer.Typer(help="Analysis reports (terminal tables, or --json).", no_args_is_help=True),
    simulate=typer.Typer(
        help="The CloudFlow simulator: generate a world, or run a simulated online experiment."
    ),
)
app.add_typer(groups.report, name="report")
app.add_typer(groups.simulate, name="simulate")

#: Modules that add commands, in help order.
COMMAND_MODULES = (
    "featurerec.simulate.cli",
    "featurerec.events.cli",
    "featurerec.warehouse.cli",
    "featurerec.analysis.cli",
    "featurerec.pipeline.cli",
    "featurerec.registry.cli",
    "featurerec.evaluation.cli",
    "featurerec.serving.cli",
    "featurerec.feedback.cli",
    "featurerec.experiments.cli",
    "featurerec.events.sources.cli",
    "featurerec.demo",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"featurerec {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Config file (default: ./featurerec.toml if present)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where the warehouse, registry and logs live (default: ./.featurerec).",
            envvar="FEATUREREC_DATA_DIR",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    ctx.obj = {"config": config, "data_dir": data_dir}


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(app, groups)


_register_all()


def main() -> None:
    """Entry point: user-facing errors become one line on stderr and exit code 2."""
    try:
        app()
    except (FeaturerecError, ConfigError, WarehouseError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
