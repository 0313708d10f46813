"""The daily training pipeline (spec Stage 4): the spec's pipeline JSON as config, a DAG
runner with timeouts, retries, quality gates and gated promotion, run history, the execution
tree, resume and a cron schedule.

Typical use (what ``featurerec pipeline run`` does)::

    spec = load_spec("builtin:pipeline.cloudflow.json", settings)
    runner = PipelineRunner(spec, settings, open_warehouse(settings), registry_for(settings),
                            RunHistory.for_settings(settings))
    record = runner.run()            # as of the latest event
    print("\\n".join(render_tree(record)))
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module; imported on first use so ``featurerec --help`` stays fast.
_EXPORTS = {
    "PipelineRunner": "featurerec.pipeline.runner",
    "QualityGateFailed": "featurerec.pipeline.runner",
    "load_stage_function": "featurerec.pipeline.runner",
    "RunHistory": "featurerec.pipeline.history",
    "RunRecord": "featurerec.pipeline.history",
    "StageRecord": "featurerec.pipeline.history",
    "PipelineSpec": "featurerec.pipeline.spec",
    "StageSpec": "featurerec.pipeline.spec",
    "load_spec": "featurerec.pipeline.spec",
    "parse_spec": "featurerec.pipeline.spec",
    "render_tree": "featurerec.pipeline.tree",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'featurerec.pipeline' has no attribute {name!r}")
