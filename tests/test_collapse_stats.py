"""Collapse statistics (``sample_distinct_2``, ``sample_repeat_4``, ``sample_no_eos``) by hand: counted
over each completion's real tokens, never over padding, with a final EOS marking an ended completion
and not counted as text."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gkd.algorithms.base import Algorithm
from gkd.evaluate import sequence_stats
from gkd.rollout import Rollout

EOS = 2


def test_sequence_stats_on_completions_that_end_in_eos_by_hand():
    st = sequence_stats([[5, 5, 5, 5, 5, EOS], [5, 5, 5, 5, 5], [EOS], []], EOS)
    # row 0: body 5 5 5 5 5 (EOS dropped): bigrams 4, distinct 1 → 1/4; 4-grams 2, one repeated → 1/2; ended
    # row 1: the same body without EOS: no_eos; row 2: empty body: distinct 1 (nothing repeated), ended
    # row 3: nothing at all: counted as not ended
    assert st == {"distinct_2": pytest.approx(0.25 + 0.25 + 1.0 + 1.0), "repeat_4": pytest.approx(0.5 + 0.5),
                  "no_eos": 2.0, "n": 4.0}
    assert sequence_stats([[7, 8, 9, 10, 11, 3]], [3, 4])["no_eos"] == 0.0  # several EOS ids
    assert sequence_stats([[7, 8, 9, 10, 11, 4]], [3, 4])["no_eos"] == 0.0


def test_sample_stats_ignore_padding(tokenizer):
    assert tokenizer.eos_token_id == EOS
    width = 8
    rows = [[5, 6, 5, 6, 5, 6, EOS], [7, 8, 9, 10, 11, 12, 13, 14], [EOS]]
    for pad in (EOS, 0):  # pad = EOS (many chat models) and a pad of its own
        ids = torch.full((3, width), pad)
        mask = torch.zeros(3, width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        rollout = Rollout(torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.bool), ids, mask)
        algo = SimpleNamespace(parts=SimpleNamespace(tokenizer=tokenizer))
        got = Algorithm.sample_stats(algo, [rollout])  # type: ignore[arg-type]
        # by hand: row 0 body 5 6 5 6 5 6 → distinct 2/5, 4-grams 3 with 1 repeat; row 1 all distinct, no EOS;
        # row 2 empty body
        assert got["sample_distinct_2"] == pytest.approx((2 / 5 + 1 + 1) / 3), pad
        assert got["sample_repeat_4"] == pytest.approx((1 / 3) / 3), pad
        assert got["sample_no_eos"] == pytest.approx(1 / 3), pad
