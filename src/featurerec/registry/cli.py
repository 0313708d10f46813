"""``featurerec models list | show NAME[/VERSION] | promote NAME VERSION | rollback NAME``."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from featurerec.cli_common import console, print_json, print_table, settings_from
from featurerec.errors import ModelError

app = typer.Typer(
    help="The model registry: versions, stages, promotion, rollback.", no_args_is_help=True
)
log = logging.getLogger(__name__)

KindOpt = Annotated[
    str, typer.Option("--kind", help="models, indexes or state (registry namespace).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _registry(ctx: typer.Context) -> Any:
    from featurerec.registry import registry_for

    return registry_for(settings_from(ctx))


@app.command("list")
def list_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every registered version of every model, index and state snapshot."""
    versions = _registry(ctx).all_versions()
    rows = [
        {
            "uri": v.uri,
            "stage": v.stage,
            "created_at": v.created_at,
            "run_id": v.run_id or "",
            "as_of": v.data_window.get("as_of", ""),
            **{k: v.metrics[k] for k in ("ndcg@5", "hit_rate@3") if k in v.metrics},
        }
        for v in versions
    ]
    if as_json:
        print_json(rows)
    else:
        print_table(rows, title="registry")


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(help="NAME, NAME/VERSION, or a URI (models:/NAME/production).")
    ],
    kind: KindOpt = "models",
    as_json: JsonOpt = False,
) -> None:
    """One version in full (params, metrics, data window, code version, checksums, history);
    NAME alone lists its versions."""
    reg = _registry(ctx)
    if ":/" in target:
        mv = reg.lookup(target)
    else:
        name, _, version = target.partition("/")
        if not version:
            versions = reg.versions(name, kind)
            if not versions:
                raise ModelError(f"{kind}:/{name}: nothing registered")
            rows = [
                {"version": v.version, "stage": v.stage, "created_at": v.created_at,
                 "run_id": v.run_id or "", **v.metrics}
                for v in versions
            ]  # fmt: skip
            if as_json:
                print_json([v.to_dict() for v in versions])
            else:
                print_table(rows, title=f"{kind}:/{name}")
            return
        if not version.isdigit():
            raise ModelError(f"invalid version {version!r} in {target!r}: expected a number")
        mv = reg.get(name, int(version), kind)
    try:
        reg.verify(mv)
        integrity = "ok"
    except ModelError as exc:
        integrity = f"CORRUPT: {exc}"
    if as_json:
        print_json({**mv.to_dict(), "integrity": integrity})
        return
    console.print(f"[bold]{mv.uri}[/bold]  stage={mv.stage}  integrity={integrity}")
    for label, value in (
        ("created_at", mv.created_at),
        ("run_id", mv.run_id),
        ("data_window", mv.data_window),
        ("code_version", mv.code_version),
        ("params", mv.params),
        ("metrics", mv.metrics),
        ("path", str(mv.path)),
    ):
        console.print(f"  {label}: {value}", highlight=False)
    print_table([{"file": k, "sha256": v} for k, v in mv.checksums.items()], title="checksums")
    print_table(mv.history, title="history")


def _criteria(ctx: typer.Context) -> dict[str, str] | None:
    """promotion_criteria of the configured pipeline's evaluation stage (None if none)."""
    from featurerec.pipeline.spec import load_spec

    settings = settings_from(ctx)
    spec = load_spec(settings.pipeline.spec, settings)
    for s in spec.stages:
        if s.type == "model_evaluation" and s.promotion_criteria:
            return dict(s.promotion_criteria)
    return None


@app.command("promote")
def promote_cmd(
    ctx: typer.Context,
    name: str,
    version: int,
    kind: KindOpt = "models",
    to: Annotated[str, typer.Option("--to", help="production or staging.")] = "production",
    force: Annotated[
        bool,
        typer.Option("--force", help="Promote even if the recorded metrics fail (logged)."),
    ] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the history).")] = "",
) -> None:
    """Promote a version; its recorded metrics must pass the pipeline's promotion criteria."""
    reg = _registry(ctx)
    criteria = _criteria(ctx)
    mv = reg.promote(
        name,
        version,
        criteria=criteria,
        kind=kind,
        to=to,
        force=force,
        reason=reason or ("forced from the CLI" if force else "promoted from the CLI"),
    )
    if mv.history and mv.history[-1].get("forced"):
        log.warning("forced promotion of %s from the CLI", mv.uri)
        console.print(f"[yellow]forced[/yellow]: {mv.history[-1]['reason']}")
    console.print(f"{mv.uri} is now {mv.stage}")


@app.command("rollback")
def rollback_cmd(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Model (or index with --kind) name.")] = None,
    kind: KindOpt = "models",
    run: Annotated[
        str | None,
        typer.Option("--run", help="Roll back every model and index a pipeline run promoted."),
    ] = None,
) -> None:
    """Make the previous production version production again (one NAME, or a whole --run)."""
    reg = _registry(ctx)
    if (name is None) == (run is None):
        raise ModelError("give a NAME or --run RUN_ID (not both)")
    if run is not None:
        for mv in reg.rollback_run(run):
            console.print(f"{mv.kind}:/{mv.name}: production is now v{mv.version}")
        return
    assert name is not None
    mv = reg.rollback(name, kind=kind)
    console.print(f"{kind}:/{name}: production is now v{mv.version}")
    if kind == "models":
        console.print(
            "[dim]note: an index built from this model stays as it is; `featurerec models"
            " rollback --run RUN_ID` rolls back a run's models and index together[/dim]"
        )


def register(app_root: typer.Typer, groups: Any) -> None:
    """Add ``featurerec models ...``."""
    app_root.add_typer(app, name="models")
