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
