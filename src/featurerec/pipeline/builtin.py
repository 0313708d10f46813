"""PIPE's own stage functions (``custom`` stages), registered like any other.

* ``compute_user_neighbors``: the spec's collaborative signal (user-user Jaccard over strong
  features, top-k per user) into ``ml.user_neighbors``; see
  :func:`featurerec.warehouse.transforms.compute_user_neighbors`. Optional ``config``:
  ``output_table``.
"""

from __future__ import annotations

from featurerec.pipeline.contracts import StageContext, StageResult, stage_function
from featurerec.warehouse.transforms import NEIGHBORS_TABLE, compute_user_neighbors


@stage_function("compute_user_neighbors")
def user_neighbors_stage(ctx: StageContext) -> StageResult:
    """Write each user's top-k Jaccard neighbours (no artifact; a warehouse table)."""
    table = str(ctx.params.get("output_table", NEIGHBORS_TABLE))
    rows = compute_user_neighbors(
        ctx.engine, ctx.settings, output_table=table, progress=ctx.progress
    )
    w = ctx.settings.windows
    return StageResult(
        rows=rows,
        params={
            "min_strength": w.jaccard_min_strength,
            "min_shared": w.jaccard_min_shared,
            "top_k": w.jaccard_top_k,
        },
        summary=f"{rows:,} neighbour rows",
    )
