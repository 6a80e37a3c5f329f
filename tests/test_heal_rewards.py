"""The rewards of recipes/rewards/heal.py (used by issue 24's kd_reward arm)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _heal():
    spec = importlib.util.spec_from_file_location("heal_rewards", ROOT / "recipes" / "rewards" / "heal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_loops_is_one_minus_the_share_of_repeated_4grams():
    heal = _heal()
    # 12 tokens, 9 four-grams (1234 2341 3412 4123 1234 …), 4 distinct: 5 repeat an earlier one → 1 - 5/9
    loop = [1, 2, 3, 4] * 3
    assert heal.no_loops(["", "", ""], [loop, [5, 6, 7, 8, 9], [1, 2]]) == pytest.approx([1 - 5 / 9, 1.0, 1.0])


def test_follows_instructions_scores_constrained_rows_only():
    pytest.importorskip("if_verifiable")
    heal = _heal()
    messages = [[{"role": "user", "content": "Answer in lowercase."}]] * 2 + [[{"role": "user", "content": "Hi"}]]
    out = heal.follows_instructions(
        ["p"] * 3, ["all lowercase here", "Not Lowercase", "anything"], messages=messages,
        instruction_id_list=[["change_case:english_lowercase"]] * 2 + [None], kwargs=[[{}], [{}], None])
    assert out == [1.0, 0.0, None]
