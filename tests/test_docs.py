"""Docs that are generated from code stay current; every recipe loads."""

from pathlib import Path

import pytest

from gkd.config import load_config
from gkd.docs_gen import render

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_reference_is_current():
    assert (ROOT / "docs" / "recipes.md").read_text() == render(), "run: python -m gkd.docs_gen > docs/recipes.md"


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_is_valid_and_documents_its_launch_line(recipe):
    load_config(recipe)
    assert "launch" in recipe.read_text().split("\n\n")[0].lower()


@pytest.mark.parametrize("config", sorted((ROOT / "ds_configs").glob("accelerate_*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_point_at_existing_deepspeed_configs(config):
    import json

    import yaml

    data = yaml.safe_load(config.read_text())
    assert "launch" in config.read_text().splitlines()[0] or "accelerate launch" in config.read_text()
    ds = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if data["distributed_type"] == "DEEPSPEED":
        spec = json.loads((ROOT / ds).read_text())
        assert spec["zero_optimization"]["stage"] in (2, 3)
        assert spec["gradient_accumulation_steps"] == "auto"  # accelerate fills it from the recipe
