"""The two-teacher demonstration's data (``recipes/data/make_arithmetic.py``): the answer checker, the
committed files are what the generator writes from its seed, the sets are disjoint and every distillation
row names its teacher; ``benchmarks/two_teachers.py`` fills only its own section of a results file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def arith():
    return _module(DATA / "make_arithmetic.py", "make_arithmetic")


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line]


@pytest.mark.parametrize("completion, answer, exact, appears", [
    ("737 + 361 = 1098.", 1098, True, True),
    ("To add 737 and 361, you simply add them together: 737 + 361 = 1507.", 1098, False, False),
    ("69 * 9 = 69 * 9 = 621.", 621, True, True),             # the "= N" that starts no other expression
    ("The sum of 737 and 361 is 1,098.", 1098, True, True),  # thousands separators
    ("129 + 960 = 1290  This is a simple addition of 129 and 96", 1089, False, False),
    ("I think 12, or maybe 15", 15, True, True),              # no "=" or "is": the last number
    ("The answer is 40 and not 4", 4, False, True),           # "is N" first; 4 appears as a whole number
    ("7 times 3 is 213", 21, False, False),                   # 213 is not 21
    ("no number here", 5, False, False),
])
def test_final_answer_and_appears(arith, completion, answer, exact, appears):
    assert arith.answer_hits(completion, answer) == (exact, appears)


def test_exact_match_reward_takes_the_answer_column(arith):
    assert arith.exact_match_reward(["p", "p", "p"], ["2 + 2 = 4.", "2 + 2 = 5.", "4"], answer=[4, 4, None]) == [1.0, 0.0, 0.0]


def test_committed_files_are_the_generator_output(arith):
    rows = arith.make(seed=0)
    for name, made in rows.items():
        assert _jsonl(f"{name}.jsonl") == made, f"run: python recipes/data/make_arithmetic.py ({name}.jsonl)"
    assert arith.make(seed=1)["arithmetic_eval"] != rows["arithmetic_eval"]


def test_sets_are_disjoint_and_answers_right(arith):
    train, held, mixed = _jsonl("arithmetic_train.jsonl"), _jsonl("arithmetic_eval.jsonl"), _jsonl("two_teachers.jsonl")
    problems = arith.make_problems()  # (kind, a, b) of the train, distill and eval sets: no pair in two of them
    assert sum(len(p) for p in problems.values()) == len(set().union(*map(set, problems.values())))
    for row in train + held:
        assert arith.answer_hits(row["messages"][-1]["content"], row["answer"]) == (True, True)
    assert {r["kind"] for r in held} == set(arith.KINDS) and all(r["teacher"] == "arith" for r in held)
    # the distillation rows: prompt-only, each names its teacher; no held-out chat row is among them
    assert all(r["messages"][-1]["role"] == "user" for r in mixed)
    assert sorted({r["teacher"] for r in mixed}) == ["arith", "general"]
    chat_train, chat_held = arith.instruction_split(_jsonl("instructions.jsonl"))
    assert len(chat_held) == 64 and sum(r["teacher"] == "general" for r in mixed) == len(chat_train)
    held_prompts = {r["messages"][0]["content"] for r in chat_held}
    assert not held_prompts & {r["messages"][0]["content"] for r in mixed if r["teacher"] == "general"}


def test_write_section_replaces_only_between_the_markers(tmp_path):
    bench = _module(ROOT / "benchmarks" / "two_teachers.py", "two_teachers")
    doc = tmp_path / "results.md"
    doc.write_text(f"# head\n\nkeep\n{bench.START}\nold\n{bench.END}\ntail\n")
    bench.write_section(doc, "new table")
    assert doc.read_text() == f"# head\n\nkeep\n{bench.START}\nnew table\n{bench.END}\ntail\n"
    bench.write_section(doc, "again")
    assert doc.read_text().count(bench.START) == 1 and "new table" not in doc.read_text()
    assert bench.START in (ROOT / "docs" / "results.md").read_text()
