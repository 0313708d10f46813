from __future__ import annotations

from featurerec.catalog import Catalog, display_name
from featurerec.config import Settings


def test_display_name_handles_acronyms():
    assert display_name("api_access") == "API Access"
    assert display_name("kanban_boards") == "Kanban Boards"


def test_config_overrides_templates_and_plans():
    s = Settings.model_validate(
        {
            "catalog": {
                "features": {
                    "automations": {
                        "display_name": "Automations",
                        "cta_text": "Automate your workflow",
                        "cta_url": "/features/automations/getting-started",
                        "plans": ["business", "enterprise"],
                    }
                }
            }
        }
    )
    cat = Catalog(s.catalog)
    e = cat.entry("automations")
    assert e.cta_text == "Automate your workflow"
    assert e.available_on("business") and not e.available_on("free")
    assert not e.available_on(None)
    other = cat.entry("forms")
    assert other.cta_text == "Try Forms" and other.available_on("free")
