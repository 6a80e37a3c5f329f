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


def test_fused_head_refuses_soft_capped_logits(tokenizer):
    """The fused / top-k paths multiply hidden states by the head themselves: a model whose logits are
    not head(last hidden) (Gemma-2's final soft-capping) is a one-line error, a plain model passes."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from gkd.config import InputError
    from gkd.scorer import completion_outputs

    r = _rollout(tokenizer, ["<bos>12+3="], ["15<eos>"])
    plain = completion_outputs(tiny_model(tokenizer, hidden=32, seed=3), r, final_hidden=True)
    assert plain.logits is None and plain.final_hidden.shape[:2] == r.completion_ids.shape
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, final_logit_softcapping=0.5,
                       pad_token_id=tokenizer.pad_token_id)
    capped = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(InputError, match="not lm_head.*soft-capping.*fused_lm_head: false"):
        completion_outputs(capped, r, final_hidden=True)
