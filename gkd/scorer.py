"""Scorer: teacher (and student) logits aligned to completion positions (GKD Algorithm 1, line 8).

Position ``t`` of the returned ``(B, L, V)`` logits is the next-token distribution that predicts
completion token ``t``, i.e. the model's output at input position ``P − 1 + t``. Only those
``L`` positions are computed (``logits_to_keep``), and the vocabulary axis is sliced to the
tokenizer's length so that a teacher with a padded embedding (e.g. 152064 rows for a 151936-token
tokenizer) lines up with the student (DESIGN §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gkd.config import InputError
from gkd.rollout import Rollout, position_ids_from_mask

__all__ = ["ScoredRollout", "check_tokenizers_match", "completion_logits", "output_vocab_size", "score"]


@dataclass
class ScoredRollout:
    """A rollout with the teacher's view of it; what the loss consumes."""

    rollout: Rollout
    teacher_logits: torch.Tensor | None  # (B, L, V) teacher logits at completion positions, V = len(tokenizer)


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output head (may exceed the tokenizer's length)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2 and head.weight.numel():
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def completion_logits(model: torch.nn.Module, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
    """Logits ``(B, L, V)`` predicting each completion token, ``V = vocab_size`` (slice) if given.

    Gradient flows if the caller has it enabled (student); wrap in ``torch.no_grad`` for the teacher.
    """
    input_ids = rollout.input_ids
    attention = rollout.attention_mask
    length = rollout.completion_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids_from_mask(attention),
        logits_to_keep=length + 1,
        use_cache=False,
    )
    logits = out.logits[:, -(length + 1) : -1]
    return logits if vocab_size is None else logits[..., :vocab_size]


@torch.no_grad()
def score(teacher: torch.nn.Module | None, rollout: Rollout, vocab_size: int | None = None) -> ScoredRollout:
    """Teacher logits on the rollout, teacher in eval mode with no gradient."""
    if teacher is None:
        return ScoredRollout(rollout=rollout, teacher_logits=None)
    teacher.eval()
    return ScoredRollout(rollout=rollout, teacher_logits=completion_logits(teacher, rollout, vocab_size))


def check_tokenizers_match(student_tokenizer, teacher_tokenizer) -> None:
    """Distillation compares distributions token by token, so both models must share one tokenizer.

    Raises ``ValueError`` naming the first difference. Different embedding sizes are fine (sliced).
    """
    if student_tokenizer is teacher_tokenizer:
        return
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab.items()) - set(t_vocab.items()))[:3]
        only_t = sorted(set(t_vocab.items()) - set(s_vocab.items()))[:3]
        raise InputError(
            "student and teacher tokenizers differ "
            f"(sizes {len(s_vocab)} vs {len(t_vocab)}; e.g. student-only {only_s}, teacher-only {only_t}). "
            "Token-level distillation needs the same tokenizer: pick a teacher and student of one model family."
        )
    if student_tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
        raise InputError(
            "student and teacher tokenizers have different eos_token_id: "
            f"{student_tokenizer.eos_token_id} vs {teacher_tokenizer.eos_token_id}"
        )
