"""Rewards for healing a student that loops (the GKD paper's eq. 5 reward term, ``alpha < 1``).

Per-token distillation cannot correct a loop the teacher endorses: teacher-forced on a looping prefix,
SmolLM2-135M-Instruct itself predicts the next repetition (docs/results.md, issue 24), so the student's
loss on its own loops is near zero. These sequence-level rewards score what the loop costs. Use with
``reward_funcs: [recipes/rewards/heal.py:no_loops, recipes/rewards/heal.py:follows_instructions]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def no_loops(completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **_: Any) -> list[float]:
    """1 − the share of the completion's token 4-grams that repeat an earlier one (1.0 for < 4 tokens)."""
    out = []
    for ids in completion_ids:
        grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
        out.append(1.0 - (len(grams) - len(set(grams))) / len(grams) if grams else 1.0)
    return out


def follows_instructions(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
    """Share of a row's verifiable instructions (IFEval's checkers, strict) the completion follows;
    ``None`` (no reward) for rows without constraints."""
    from gkd.verifiable import constrained, score_rows

    n = len(completions)
    out: list[float | None] = []
    for i in range(n):
        row = {k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == n}
        if not constrained(row):
            out.append(None)
            continue
        counts = score_rows([row], [completions[i]])
        out.append(counts.instruction_strict / max(counts.instructions, 1))
    return out
