"""Scorer: alignment of logits to completion tokens, vocabulary slicing, tokenizer checks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from gkd.data import Example, collate
from gkd.rollout import Rollout
from gkd.scorer import check_tokenizers_match, completion_logits, output_vocab_size, score


def _rollout(tokenizer, prompts, completions) -> Rollout:
    batch = collate(
        [Example(tokenizer(p, add_special_tokens=False).input_ids,
                 tokenizer(c, add_special_tokens=False).input_ids, {}) for p, c in zip(prompts, completions, strict=True)],
        tokenizer.pad_token_id,
    )
    return Rollout(batch["prompt_ids"], batch["prompt_mask"], batch["reference_ids"], batch["reference_mask"])


def test_completion_logits_predict_each_completion_token(tokenizer):
    """Position t of the result equals an unpadded forward's logits just before completion token t."""
    model = tiny_model(tokenizer, hidden=64, seed=1)
    prompts, completions = ["<bos>12+3=", "<bos>4567+8="], ["5010<eos>", "5111716050<eos>"]
    r = _rollout(tokenizer, prompts, completions)
    with torch.no_grad():
        got = completion_logits(model, r)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        p_ids = tokenizer(p, add_special_tokens=False).input_ids
        c_ids = tokenizer(c, add_special_tokens=False).input_ids
        with torch.no_grad():
            full = model(torch.tensor([p_ids + c_ids])).logits[0]
        want = full[len(p_ids) - 1 : len(p_ids) - 1 + len(c_ids)]
        torch.testing.assert_close(got[row, : len(c_ids)], want, rtol=1e-4, atol=1e-4)


def test_teacher_with_padded_vocabulary_is_sliced(tokenizer):
    """Same tokenizer, bigger embedding (like 152064 vs 151936): sliced to the tokenizer's length."""
    teacher = tiny_model(tokenizer, hidden=32, seed=2, vocab=len(tokenizer) + 17)
    assert output_vocab_size(teacher) == len(tokenizer) + 17
    r = _rollout(tokenizer, ["<bos>1+2="], ["30<eos>"])
    scored = score(teacher, r, vocab_size=len(tokenizer))
    assert scored.teacher_logits.shape == (1, 3, len(tokenizer))
    assert not teacher.training


def test_score_has_no_gradient(tokenizer):
    teacher = tiny_model(tokenizer, hidden=32, seed=3)
    r = _rollout(tokenizer, ["<bos>1+2="], ["30<eos>"])
    assert not score(teacher, r).teacher_logits.requires_grad


def test_different_tokenizers_are_a_clear_error(tokenizer):
    from transformers import PreTrainedTokenizerFast

    from gkd.task import build_tokenizer

    same = build_tokenizer()
    check_tokenizers_match(tokenizer, same)  # equal vocabularies pass
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    assert isinstance(other, PreTrainedTokenizerFast)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_tokenizers_match(tokenizer, other)
