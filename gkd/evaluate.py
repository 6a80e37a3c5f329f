"""Held-out evaluation: task accuracy and teacher–student divergence on the student's own samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gkd.data import Example, collate
from gkd.losses import forward_kl, log_probs, masked_sum_and_count, reverse_kl
from gkd.rollout import SamplingParams, sample
from gkd.scorer import completion_logits

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    accuracy: float  # share of prompts whose greedy completion the checker accepts
    forward_kl: float | None  # token-mean KL(p‖q) on the student's greedy completions
    reverse_kl: float | None  # token-mean KL(q‖p) on the same completions
    completion_len_mean: float
    samples: list[tuple[str, str]]  # a few (prompt, completion) pairs


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    checker: Callable[[str, str], bool],
    *,
    teacher: torch.nn.Module | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 128,
    num_samples: int = 3,
) -> EvalResult:
    """Greedy-decode every prompt with ``model``, score with ``checker(prompt, completion)``; if a
    teacher is given, also the teacher–student KLs on those completions (same tokenizer)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = len(tokenizer)
    correct, tokens, fkl_sum, rkl_sum = 0, 0.0, 0.0, 0.0
    samples: list[tuple[str, str]] = []
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        examples = [Example(tokenizer(p, add_special_tokens=False).input_ids, None, {}) for p in chunk]
        batch = collate(examples, tokenizer.pad_token_id)
        rollout = sample(
            model, batch["prompt_ids"].to(device), batch["prompt_mask"].to(device), params,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab,
        )
        for i, prompt in enumerate(chunk):
            ids = rollout.completion_ids[i][rollout.completion_mask[i]].tolist()
            text = tokenizer.decode(ids)
            correct += bool(checker(prompt, text))
            if len(samples) < num_samples:
                samples.append((prompt, text))
        n = float(rollout.completion_mask.sum())
        tokens += n
        if teacher is not None:
            s = log_probs(completion_logits(model, rollout, vocab))
            t = log_probs(completion_logits(teacher, rollout, vocab))
            fkl_sum += float(masked_sum_and_count(forward_kl(s, t), rollout.completion_mask)[0])
            rkl_sum += float(masked_sum_and_count(reverse_kl(s, t), rollout.completion_mask)[0])
    if was_training:
        model.train()
    has_kl = teacher is not None and tokens > 0
    return EvalResult(
        accuracy=correct / max(len(prompts), 1),
        forward_kl=fkl_sum / tokens if has_kl else None,
        reverse_kl=rkl_sum / tokens if has_kl else None,
        completion_len_mean=tokens / max(len(prompts), 1),
        samples=samples,
    )
