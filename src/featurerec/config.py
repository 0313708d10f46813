"""One typed settings object, loaded from ``featurerec.toml``.

Every component reads its settings from :class:`Settings`; nothing deep in the code reads the
environment. Unknown keys and bad values are rejected with the key path and the value named::

    >>> from featurerec.config import Settings
    >>> Settings.model_validate({"ingest": {"batch_size": 0}})
    Traceback (most recent call last):
    ...
    featurerec.config.ConfigError: ingest.batch_size: Input should be greater than 0 (got 0)

Overrides, lowest to highest precedence: defaults, the TOML file, ``FEATUREREC_DATA_DIR``,
the ``--data-dir`` flag.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_FILE = "featurerec.toml"
DEFAULT_DATA_DIR = ".featurerec"
BUILTIN_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key path and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WarehouseConfig(_Section):
    """Where the events and derived tables live."""

    engine: Literal["duckdb"] = "duckdb"
    #: DuckDB file, relative to the data directory unless absolute.
    path: str = "warehouse.duckdb"
    #: DuckDB memory limit, e.g. "8GB"; None lets DuckDB decide.
    memory_limit: str | None = None
    threads: int | None = Field(default=None, gt=0)


class IngestConfig(_Section):
    """Spec Stage 1 event filter plus ingestion knobs."""

    include_types: list[str] = Field(
        default_factory=lambda: [
            "feature_used",
            "feature_discovered",
            "page_viewed",
            "task_created",
            "task_completed",
            "board_created",
            "automation_created",
            "integration_connected",
            "report_generated",
            "dashboard_created",
            "form_created",
            "gantt_viewed",
            "timeline_created",
            "api_key_generated",
        ]
    )
    exclude_types: list[str] = Field(default_factory=lambda: ["heartbeat", "session_keepalive"])
    #: An empty include list means "everything not excluded".
    batch_size: int = Field(default=200_000, gt=0)
    #: Events older/newer than this many days relative to ingestion time are quarantined.
    max_future_skew_seconds: int = Field(default=300, ge=0)
    #: Column mapping for event files whose shape is not the spec's: canonical field ->
    #: column / key in the files, e.g. {user_id = "uid", timestamp = "ts"} (`--map` wins).
    column_map: dict[str, str] = Field(default_factory=dict)
    #: Dedupe on event_id looks at stored events whose timestamp lies within this many hours
    #: of the batch's time range (a re-sent event keeps its timestamp, give or take clock
    #: correction), so DuckDB skips the other row groups; None checks the whole table.
    dedupe_margin_hours: int | None = Field(default=24, ge=0)


class WindowsConfig(_Section):
    """Window lengths for the SQL transforms (relative to an as-of time, never the wall clock)."""

    interaction_days: int = Field(default=90, gt=0)
    transition_days: int = Field(default=30, gt=0)
    context_activity_days: int = Field(default=7, gt=0)
    ontology_days: int = Field(default=30, gt=0)
    cold_start_signup_days: int = Field(default=14, gt=0)
    discovery_weeks: int = Field(default=12, gt=0)
    min_transition_count: int = Field(default=50, ge=1)
    #: Users with fewer events than this are cold-start (spec: < 5 interactions).
    cold_start_max_events: int = Field(default=5, ge=1)
    jaccard_min_strength: float = Field(default=0.2, ge=0)
    jaccard_min_shared: int = Field(default=3, ge=1)
    jaccard_top_k: int = Field(default=20, gt=0)
    #: How many of each user's most recent distinct features ml.user_recent_features keeps.
    recent_features: int = Field(default=5, gt=0)


class FeatureEntry(_Section):
    """Display metadata for one feature. The item space itself comes from the data."""

    display_name: str | None = None
    cta_text: str | None = None
    cta_url: str | None = None
    #: Plans on which the feature is available; None = every plan.
    plans: list[str] | None = None
    description: str | None = None


class CatalogConfig(_Section):
    features: dict[str, FeatureEntry] = Field(default_factory=dict)
    #: Templates used for features the config does not describe.
    default_cta_text: str = "Try {display_name}"
    default_cta_url: str = "/features/{feature}/getting-started"


class PipelineConfig(_Section):
    #: Pipeline spec (the spec's JSON), relative to the config file's folder unless absolute.
    spec: str = "builtin:pipeline.cloudflow.json"


class ServingConfig(_Section):
    #: Deployment spec (the spec's JSON), relative to the config file's folder unless absolute.
    deployment: str = "builtin:deployment.json"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    default_strategy: str = "sequence_aware"
    dismissal_cooldown_days: int = Field(default=14, ge=0)
    weekly_frequency_cap: int = Field(default=3, ge=1)
    min_weekly_diversity: float = Field(default=0.60, ge=0, le=1)
    seed: int = 0
    #: Experiment serving assigns users to (name of a configured/shipped experiment, or a
    #: path to its JSON); None = everybody gets ``default_strategy``.
    experiment: str | None = None
    #: Reason facts need at least this many users (segment) or transitions behind them.
    reason_min_support: int = Field(default=20, ge=1)
    #: fsync the recommendation log before acknowledging (turn off only in tests).
    durable_log: bool = True
    #: Log each served request's decision context (the user state scored and the eligible
    #: features) for off-policy evaluation (``featurerec experiment ope``): one reclog line
    #: of about 760 bytes per served request (``benchmarks/bench_serving.py``).
    log_decision_context: bool = True
    #: Seconds between checks of the landing folder for events other workers accepted.
    sync_interval_seconds: float = Field(default=0.5, gt=0)


class MonitoringConfig(_Section):
    spec: str = "builtin:monitoring.json"
    #: Maps alert names such as "slack://ml-alerts" to webhook URLs.
    webhooks: dict[str, str] = Field(default_factory=dict)
    #: Sinks every alert goes to besides a metric's own ``alert`` ("log" or a webhook name/URL).
    default_sinks: list[str] = Field(default_factory=lambda: ["log"])
    #: Metrics without an explicit alert threshold alert when this much worse than target
    #: (relative: 0.5 = below half the target, or above 1.5x it for lower-is-better metrics).
    alert_margin: float = Field(default=0.5, gt=0)
    #: Alert state (one alert per breach), relative to the data directory unless absolute.
    state_file: str = "monitoring/alert_state.json"
    #: Serving metrics source: "auto" (request log if present, else the server's /metrics),
    #: a JSONL request log (relative to the data directory unless absolute) or an http(s) URL
    #: of the server's Prometheus /metrics.
    serving_metrics: str = "auto"
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)


class ExperimentsConfig(_Section):
    #: Experiment specs (the spec's JSON), relative to the config file's folder unless absolute.
    specs: list[str] = Field(default_factory=list)


class SourceConfig(_Section):
    """One external source (Kafka, PostgreSQL CDC, Zendesk, Segment HTTP)."""

    kind: Literal["segment_http", "kafka", "postgres_cdc", "postgres_cursor", "zendesk"]
    enabled: bool = True
    #: Sync frequency in seconds; 0 means continuous / real-time.
    every_seconds: int = Field(default=900, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)


class Settings(_Section):
    """The whole configuration. Build it with :func:`load_settings`."""

    data_dir: str = DEFAULT_DATA_DIR
    seed: int = 0
    warehouse: WarehouseConfig = Field(default_factory=WarehouseConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    windows: WindowsConfig = Field(default_factory=WindowsConfig)
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    experiments: ExperimentsConfig = Field(default_factory=ExperimentsConfig)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    #: Folder the config file was read from; relative spec paths resolve against it.
    config_dir: str = "."

    @field_validator("data_dir")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Settings:  # type: ignore[override]
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc)) from None

    # -- derived paths -------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def warehouse_path(self) -> Path:
        p = Path(self.warehouse.path)
        return p if p.is_absolute() else self.data_path / p

    def resolve(self, relative: str) -> Path:
        """Resolve a path from the config file against the folder the file lives in.

        ``builtin:NAME`` names a file shipped in ``featurerec/configs``.
        """
        if relative.startswith("builtin:"):
            return BUILTIN_CONFIGS / relative.removeprefix("builtin:")
        p = Path(relative).expanduser()
        return p if p.is_absolute() else Path(self.config_dir) / p

    def with_data_dir(self, data_dir: str | os.PathLike[str]) -> Settings:
        return self.model_copy(update={"data_dir": str(data_dir)})


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        lines.append(f"{path}: {msg} (got {value!r})")
    return "; ".join(lines)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Load settings from ``path`` (default ``./featurerec.toml`` if present, else defaults).

    ``data_dir`` (the ``--data-dir`` flag) beats ``FEATUREREC_DATA_DIR`` beats the file.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    cfg_path: Path | None
    if path is None:
        env_path = env.get("FEATUREREC_CONFIG")
        cfg_path = Path(env_path) if env_path else Path(DEFAULT_CONFIG_FILE)
        if not cfg_path.exists():
            cfg_path = None
            if env_path:
                raise ConfigError(f"FEATUREREC_CONFIG: file not found (got {env_path!r})")
    else:
        cfg_path = Path(path)
        if not cfg_path.exists():
            raise ConfigError(f"config file not found: {cfg_path}")
    if cfg_path is not None:
        try:
            raw = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cfg_path}: invalid TOML: {exc}") from None
        if "config_dir" in raw:
            raise ConfigError(f"{cfg_path}: config_dir: unknown key (got {raw['config_dir']!r})")
        raw["config_dir"] = str(cfg_path.resolve().parent)
    if env.get("FEATUREREC_DATA_DIR"):
        raw["data_dir"] = env["FEATUREREC_DATA_DIR"]
    if data_dir is not None:
        raw["data_dir"] = str(data_dir)
    return Settings.model_validate(raw)
