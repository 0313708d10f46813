"""Serving commands: ``featurerec serve``, ``featurerec recommend``, ``featurerec reclog
load`` and ``featurerec serving export-state``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from featurerec.cli_common import print_json, print_table, settings_from

PLACEMENT_HELP = "onboarding_wizard | sidebar_panel | in_context_tooltip | email_digest"


def register(app: typer.Typer, groups: Any) -> None:
    """Add this package's commands to the root ``app`` / shared ``groups``."""
    reclog = typer.Typer(help="The recommendation log (served recommendations and feedback).")
    serving = typer.Typer(help="Serving utilities (online-state snapshot).")
    app.add_typer(reclog, name="reclog")
    app.add_typer(serving, name="serving")

    @app.command("serve")
    def serve(
        ctx: typer.Context,
        host: Annotated[str | None, typer.Option(help="Bind address ([serving] host).")] = None,
        port: Annotated[int | None, typer.Option(help="Port ([serving] port).")] = None,
        workers: Annotated[
            int | None,
            typer.Option(help="Worker processes (default: deployment serving.num_replicas)."),
        ] = None,
        access_log: Annotated[bool, typer.Option(help="uvicorn access log.")] = False,
    ) -> None:
        """Serve /api/v1/recommendations, /feedback, /events, /healthz, /readyz, /metrics."""
        import uvicorn

        from featurerec.serving.deployment import deployment_for

        settings = settings_from(ctx)
        dep = deployment_for(settings)
        root = ctx.find_root().obj or {}
        if root.get("config"):
            os.environ["FEATUREREC_CONFIG"] = str(Path(root["config"]).resolve())
        os.environ["FEATUREREC_DATA_DIR"] = str(settings.data_path.resolve())
        uvicorn.run(
            "featurerec.serving.app:app_factory",
            factory=True,
            host=host or settings.serving.host,
            port=port or settings.serving.port,
            workers=workers or dep.serving.num_replicas,
            access_log=access_log,
            log_level="info",
            **_fast_loop(),
        )

    @app.command("recommend")
    def recommend(
        ctx: typer.Context,
        user_id: Annotated[str, typer.Argument(help="User to recommend for.")],
        placement: Annotated[str, typer.Option(help=PLACEMENT_HELP)] = "sidebar_panel",
        k: Annotated[int | None, typer.Option(help="How many (default: output_k).")] = None,
        feature: Annotated[str | None, typer.Option(help="Context: current feature.")] = None,
        role: Annotated[str | None, typer.Option(help="Context for unknown users.")] = None,
        plan: Annotated[str | None, typer.Option(help="Context for unknown users.")] = None,
        team_size: Annotated[int | None, typer.Option(help="Context for unknown users.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the API response.")] = False,
    ) -> None:
        """Recommend for USER with the same service the server runs (logged like a request)."""
        from featurerec.errors import FeaturerecError
        from featurerec.serving.app import ServingRuntime
        from featurerec.serving.service import (
            PLACEMENTS,
            RecommendationRequest,
            RequestContext,
        )

        if placement not in PLACEMENTS:
            raise FeaturerecError(
                f"--placement: must be one of {', '.join(PLACEMENTS)} (got {placement!r})"
            )
        settings = settings_from(ctx)
        rt = ServingRuntime.from_settings(settings)
        try:
            result = rt.service.recommend(
                RecommendationRequest(
                    user_id,
                    placement,
                    k,
                    RequestContext(feature=feature, role=role, plan=plan, team_size=team_size),
                )
            )
            if result.log_records:
                rt.reclog.append(result.log_lines())
        finally:
            rt.close()
        body = result.to_response()
        if as_json:
            print_json(body)
            return
        print_table(
            [
                {
                    "#": r["position"],
                    "feature": r["feature"],
                    "score": r["score"],
                    "reason": r["reason"],
                    "cta": f"{r['cta_text']} → {r['cta_url']}",
                }
                for r in body["recommendations"]
            ],
            title=(
                f"{user_id} · {placement} · {body['strategy']} · {body['model_version']}"
                + (" · FALLBACK" if body["fallback"] else "")
            ),
        )

    @reclog.command("load")
    def reclog_load(
        ctx: typer.Context,
        directory: Annotated[
            Path | None, typer.Option(help="Log folder (default: <data>/serving/log).")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Load the recommendation and feedback logs into the warehouse (idempotent)."""
        from featurerec.serving.reclog import load_reclog, reclog_dir
        from featurerec.warehouse.engine import open_warehouse

        settings = settings_from(ctx)
        with open_warehouse(settings) as engine:
            report = load_reclog(engine, directory or reclog_dir(settings))
        if as_json:
            print_json(report)
        else:
            print_table([report.__dict__], title="reclog load")

    @serving.command("export-state")
    def export_state(
        ctx: typer.Context,
        as_of: Annotated[
            str | None, typer.Option(help="As-of time (default: latest event in the warehouse).")
        ] = None,
        register_it: Annotated[
            bool, typer.Option("--register/--no-register", help="Register in the registry.")
        ] = True,
    ) -> None:
        """Write the online-state snapshot (what the pipeline stage export_serving_state does)."""
        from datetime import datetime

        from featurerec.registry import registry_for
        from featurerec.serving.snapshot import build_snapshot
        from featurerec.warehouse.engine import open_warehouse

        settings = settings_from(ctx)
        with open_warehouse(settings, read_only=True) as engine:
            when = (
                datetime.fromisoformat(as_of)
                if as_of
                else engine.scalar("SELECT MAX(timestamp) FROM events")
            )
            if when is None:
                from featurerec.errors import DataError

                raise DataError("export-state: the warehouse has no events; ingest first")
            snap = build_snapshot(engine, settings, when)
        out = snap.save(settings.data_path / "serving" / "snapshot")
        row: dict[str, Any] = {"users": snap.n_users, "features": len(snap.features), "path": out}
        if register_it:
            from featurerec.registry.store import parse_uri
            from featurerec.serving.deployment import deployment_for

            _, name, _ = parse_uri(deployment_for(settings).models.online_state.uri)
            mv = registry_for(settings).register(
                name,
                out,
                params={"as_of": when.isoformat()},
                metrics={"users": float(snap.n_users)},
                data_window={"as_of": when.isoformat()},
                kind="state",
            )
            row["registered"] = mv.uri
        print_table([row], title="online-state snapshot")


def _fast_loop() -> dict[str, Any]:
    """uvloop + httptools when installed (they are in the dependencies), else the defaults."""
    out: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        out["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        out["http"] = "httptools"
    except ImportError:
        pass
    return out
