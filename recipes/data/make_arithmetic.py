"""Write the data of the two-teacher demonstration (issue 23; ``recipes/smollm2-135m-two-teachers.yaml``):
generated, checkable arithmetic problems in chat-instruction form, and the mixed distillation set whose
rows name their teacher.

* ``arithmetic_train.jsonl``: 1,200 problems with their reference answers, for making the arithmetic
  specialist (plain SFT of SmolLM2-135M-Instruct, ``recipes/smollm2-135m-arith-specialist.yaml``).
* ``arithmetic_eval.jsonl``: 99 held-out problems (33 of each kind) (with references, ``teacher: arith``), for judging.
* ``two_teachers.jsonl``: the distillation rows, prompt-only (the teachers write the answers, SeqKD):
  the 416 training rows of ``instructions.jsonl`` (its 64-row held-out split, ``validation_size: 64``,
  ``split_seed: 0``, left out, exactly the rows the heal recipe holds out) with ``teacher: general``, and
  416 more arithmetic problems with ``teacher: arith``, shuffled together. The held-out chat rows are
  those 64 (``gkd eval --dataset recipes/data/instructions.jsonl --validation-size 64``); the few small
  sums among the chat rows stay with the generalist, as part of its chat set.

The four sets of problems are disjoint (no operand pair in two of them). Problems are sums and differences
of two numbers of 2–3 digits and products of a 2-digit and a 1-digit number, which SmolLM2-135M-Instruct
mostly gets wrong (it answers at length and miscalculates: 0 of 16 such problems right in a probe).
A reference answer repeats the problem then gives the result, ``"737 + 361 = 1098."`` (~13 tokens):
short, and the operands sit right before the digits the model must write. Every row carries ``answer``
(the integer) and ``kind`` (add, sub or mul); :func:`final_answer` / :func:`answer_hits` check
completions.

    python recipes/data/make_arithmetic.py   # rewrites the three files (deterministic from the seed)
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("add", "sub", "mul")
#: How a problem is asked (one picked per problem) and how the reference answers it.
QUESTIONS = {
    "add": ("What is {a} + {b}?", "Compute {a} + {b}.", "What is the sum of {a} and {b}?"),
    "sub": ("What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?"),
    "mul": ("What is {a} times {b}?", "Compute {a} * {b}.", "What is the product of {a} and {b}?"),
}
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
SIZES = {"train": 1200, "distill": 416, "eval": 99}  # products: 720 pairs in all
INSTRUCTION_VALIDATION_SIZE, INSTRUCTION_SPLIT_SEED = 64, 0  # as recipes/smollm2-135m-heal.yaml


def _operands(rng: random.Random, kind: str) -> tuple[int, int]:
    if kind == "mul":
        return rng.randint(10, 99), rng.randint(2, 9)
    a, b = (rng.randint(10, 99) if rng.random() < 0.4 else rng.randint(100, 999) for _ in range(2))
    return (max(a, b), min(a, b)) if kind == "sub" else (a, b)


def result(kind: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[kind]


def problem_row(rng: random.Random, kind: str, a: int, b: int, *, reference: bool, teacher: str | None) -> dict:
    """One chat row: the question as the user turn, the reference answer as the assistant turn (``reference``)."""
    n = result(kind, a, b)
    messages = [{"role": "user", "content": rng.choice(QUESTIONS[kind]).format(a=a, b=b)}]
    if reference:
        messages.append({"role": "assistant", "content": f"{a} {SYMBOL[kind]} {b} = {n}."})
    return {"messages": messages, "answer": n, "kind": kind, **({"teacher": teacher} if teacher else {})}


def make_problems(sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, list[tuple[str, int, int]]]:
    """Disjoint sets of (kind, a, b), kinds in turn, one set per entry of ``sizes``."""
    rng = random.Random(seed)
    seen: set[tuple[str, int, int]] = set()
    out: dict[str, list[tuple[str, int, int]]] = {}
    for name, n in (sizes or SIZES).items():
        problems: list[tuple[str, int, int]] = []
        attempts = 0
        while len(problems) < n:
            attempts += 1
            if attempts > 100 * n:
                raise ValueError(f"cannot draw {n} new problems for {name!r}: too few left")
            kind = KINDS[len(problems) % len(KINDS)]
            p = (kind, *_operands(rng, kind))
            if p not in seen:
                seen.add(p)
                problems.append(p)
        out[name] = problems
    return out


def make(seed: int = 0, instructions: list[dict] | None = None, sizes: dict[str, int] | None = None
         ) -> dict[str, list[dict]]:
    """The three files' rows: ``arithmetic_train``, ``arithmetic_eval`` and ``two_teachers``."""
    problems = make_problems(sizes, seed)
    rng = random.Random(seed + 1)  # question wording
    train = [problem_row(rng, *p, reference=True, teacher=None) for p in problems["train"]]
    held = [problem_row(rng, *p, reference=True, teacher="arith") for p in problems["eval"]]
    distill = [problem_row(rng, *p, reference=False, teacher="arith") for p in problems["distill"]]
    if instructions is None:
        instructions = [json.loads(line) for line in (HERE / "instructions.jsonl").read_text().splitlines() if line]
    chat_train, _ = instruction_split(instructions)
    mixed = [{**row, "teacher": "general"} for row in chat_train] + distill
    random.Random(seed + 2).shuffle(mixed)
    return {"arithmetic_train": train, "arithmetic_eval": held, "two_teachers": mixed}


def instruction_split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``instructions.jsonl``'s train / held-out rows as training with ``validation_size: 64`` splits them."""
    from gkd.data import split_rows

    return split_rows(rows, INSTRUCTION_VALIDATION_SIZE, INSTRUCTION_SPLIT_SEED)


# --- checking answers ------------------------------------------------------------------------------------

_NUMBER = re.compile(r"\d+")  # answers are never negative
#: "= N" where N does not start another expression ("69 * 9 = 69 * 9 = 621": the 621).
_EQUALS = re.compile(r"=\s*(\d+)(?![\d.]*\s*[-+*/×x]\s*\d)")
_IS = re.compile(r"\b(?:is|equals|answer:)\s*(\d+)", re.IGNORECASE)


def _plain(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,098 → 1098


def final_answer(completion: str) -> int | None:
    """The number a completion gives as its result: the first ``= N`` that is not the start of another
    expression, else the first ``is N`` / ``equals N``, else the last number; ``None`` without a number."""
    text = _plain(completion)
    for pattern in (_EQUALS, _IS):
        if m := pattern.search(text):
            return int(m.group(1))
    numbers = _NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def answer_hits(completion: str, answer: int) -> tuple[bool, bool]:
    """(exact, appears): the final answer is right; the right number appears anywhere as a whole number."""
    return final_answer(completion) == answer, str(answer) in _NUMBER.findall(_plain(completion))


def exact_match_reward(prompts: list[str], completions: list[str], answer: list[int], **kwargs: object) -> list[float]:
    """Reward function (TRL's signature; ``gkd eval --reward-funcs recipes/data/make_arithmetic.py:exact_match_reward``):
    1.0 where the final answer equals the row's ``answer`` (rows without one: 0.0)."""
    return [float(a is not None and answer_hits(c, int(a))[0]) for c, a in zip(completions, answer, strict=True)]


def write(out_dir: Path = HERE, seed: int = 0) -> dict[str, Path]:
    paths = {}
    for name, rows in make(seed).items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths[name] = path
    return paths


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))  # gkd from a fresh clone without installing
    for path in write().values():
        print(f"wrote {path} ({sum(1 for _ in path.open())} rows)")
