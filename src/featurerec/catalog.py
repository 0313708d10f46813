"""The feature catalog: display text, CTA and plan availability for each feature.

The item space comes from the data (every ``feature_category`` seen in events). The config
only adds presentation and plan availability; a feature the config does not describe still
gets a readable name and a CTA from the templates in ``[catalog]``::

    >>> from featurerec.config import Settings
    >>> cat = Catalog(Settings().catalog)
    >>> cat.entry("custom_dashboards").cta_text
    'Try Custom Dashboards'
    >>> cat.entry("custom_dashboards").cta_url
    '/features/custom_dashboards/getting-started'
"""

from __future__ import annotations

from dataclasses import dataclass

from featurerec.config import CatalogConfig

_ACRONYMS = {"api": "API", "sso": "SSO", "ai": "AI", "csv": "CSV", "crm": "CRM"}


def display_name(feature: str) -> str:
    """``api_access`` -> ``API Access``."""
    words = feature.replace("-", "_").split("_")
    return " ".join(_ACRONYMS.get(w.lower(), w.capitalize()) for w in words if w)


@dataclass(frozen=True)
class CatalogEntry:
    feature: str
    display_name: str
    cta_text: str
    cta_url: str
    #: None = available on every plan.
    plans: frozenset[str] | None
    description: str | None = None

    def available_on(self, plan: str | None) -> bool:
        return self.plans is None or (plan is not None and plan in self.plans)


class Catalog:
    """Presentation and plan availability for any feature name."""

    def __init__(self, config: CatalogConfig) -> None:
        self.config = config
        self._cache: dict[str, CatalogEntry] = {}

    def entry(self, feature: str) -> CatalogEntry:
        cached = self._cache.get(feature)
        if cached is not None:
            return cached
        cfg = self.config.features.get(feature)
        name = (cfg.display_name if cfg else None) or display_name(feature)
        fmt = {"feature": feature, "display_name": name}
        entry = CatalogEntry(
            feature=feature,
            display_name=name,
            cta_text=(cfg.cta_text if cfg else None) or self.config.default_cta_text.format(**fmt),
            cta_url=(cfg.cta_url if cfg else None) or self.config.default_cta_url.format(**fmt),
            plans=frozenset(cfg.plans) if cfg and cfg.plans is not None else None,
            description=cfg.description if cfg else None,
        )
        self._cache[feature] = entry
        return entry
