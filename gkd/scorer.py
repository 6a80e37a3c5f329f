"""Scorer: teacher (and student) logits aligned to completion positions (GKD Algorithm 1, line 8).

Position ``t`` of the returned ``(B, L, V)`` logits is the next-token distribution that predicts
completion token ``t``, i.e. the model's output at input position ``P − 1 + t``. Only those
``L`` positions are computed (``logits_to_keep``), and the vocabulary axis is sliced to the
tokenizer's length so that a teacher with a padded embedding (e.g. 152064 rows for a 151936-token
tokenizer) lines up with the student (docs/design.md, Numerics).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gkd.chunked import teacher_topk_and_targets
from gkd.errors import InputError
from gkd.losses import TeacherTopK
from gkd.rollout import Rollout, position_ids_from_mask
from gkd.serving.client import RemoteTeacher

__all__ = [
    "CompletionOutputs",
    "ScoredRollout",
    "check_tokenizers_match",
    "completion_logits",
    "completion_outputs",
    "lm_head",
    "output_vocab_size",
    "score",
]


@dataclass
class ScoredRollout:
    """A rollout with the teacher's view of it; what the loss consumes."""

    rollout: Rollout
    teacher_logits: torch.Tensor | TeacherTopK | None  # (B, L, V) teacher logits at completion positions (V =
    # len(tokenizer)), or their top-k compression (teacher_topk)
    teacher_hidden: dict[int, torch.Tensor] | None = None  # layer → (B, L, H_T) hidden states (hidden objectives)
    teacher_attentions: dict[int, torch.Tensor] | None = None  # block → (B, heads, L, S) attention probabilities
    token_logprobs: torch.Tensor | None = None  # (B, L) log p(y_t) of the unprocessed teacher (served; local on request)


@dataclass
class CompletionOutputs:
    """A model's view of the completion positions: logits and, on request, hidden states / attentions."""

    logits: torch.Tensor | None  # (B, L, V); None when final_hidden is asked for instead
    hidden: dict[int, torch.Tensor] | None = None  # hidden_states index → (B, L, H); 0 = embeddings
    final_hidden: torch.Tensor | None = None  # (B, L, H) input of the LM head (fused / top-k paths)
    attentions: dict[int, torch.Tensor] | None = None  # block index (1-based) → (B, heads, L, S)


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output head (may exceed the tokenizer's length)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2 and head.weight.numel():
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def completion_outputs(
    model: torch.nn.Module,
    rollout: Rollout,
    vocab_size: int | None = None,
    *,
    hidden_layers: tuple[int, ...] = (),
    attention_layers: tuple[int, ...] = (),
    final_hidden: bool = False,
) -> CompletionOutputs:
    """Logits ``(B, L, V)`` predicting each completion token (``V = vocab_size`` slice if given) and,
    if asked, the hidden states / attention rows at those same positions for the given layers.

    ``final_hidden=True`` returns the LM head's input ``(B, L, H)`` instead of the logits (only the
    last position's logits are computed, and used to check that the logits really are
    ``head(final hidden)``: models with logit soft-capping or scaling fail with a clear error).
    Gradient flows if the caller has it enabled (student); wrap in ``torch.no_grad`` for the teacher.
    Attention maps need eager attention (``model.set_attn_implementation("eager")``).
    """
    input_ids = rollout.input_ids
    attention = rollout.attention_mask
    length = rollout.completion_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids_from_mask(attention),
        logits_to_keep=1 if final_hidden else length + 1,
        use_cache=False,
        output_hidden_states=bool(hidden_layers) or final_hidden,
        output_attentions=bool(attention_layers),
    )
    rows = slice(-(length + 1), -1)  # the positions whose output predicts completion tokens
    if final_hidden:
        last = out.hidden_states[-1]
        _check_head_input(model, last[:, -1], out.logits[:, -1])
        result = CompletionOutputs(None, final_hidden=last[:, rows])
    else:
        logits = out.logits[:, rows]
        result = CompletionOutputs(logits if vocab_size is None else logits[..., :vocab_size])
    if hidden_layers:
        result.hidden = {i: out.hidden_states[i][:, rows] for i in hidden_layers}
    if attention_layers:
        if out.attentions is None or any(a is None for a in out.attentions):
            raise InputError("the model returned no attention maps; attention_kl needs eager attention")
        result.attentions = {i: out.attentions[i - 1][:, :, rows] for i in attention_layers}
    return result


def lm_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's output head as a plain bias-free ``nn.Linear`` (what the fused / top-k paths multiply
    by); anything else (a LoRA-wrapped or biased head) is a clear error."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engines
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise InputError(
            f"fused_lm_head / teacher_topk need a plain bias-free nn.Linear output head, got {type(head).__name__}"
            f"{' with a bias' if getattr(head, 'bias', None) is not None else ''}; set fused_lm_head: false / "
            "teacher_topk: 0 (or keep LoRA off the head)"
        )
    return head


_HEAD_CHECKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _check_head_input(model: torch.nn.Module, last_hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """Once per model: its logits must be ``head(last hidden state)`` for the fused / top-k paths."""
    if model in _HEAD_CHECKED:
        return
    head = lm_head(model)
    with torch.no_grad():
        expect = head(last_hidden.to(head.weight.dtype)).float()
    got = logits.detach().float()
    tol = (1e-3 if got.dtype == torch.float32 and head.weight.dtype == torch.float32 else 2e-2) * max(
        1.0, float(got.abs().max()))
    if expect.shape != got.shape or float((expect - got).abs().max()) > tol:
        raise InputError(
            f"{type(getattr(model, 'module', model)).__name__}'s logits are not lm_head(last hidden state) (logit "
            "soft-capping or scaling?); set fused_lm_head: false and teacher_topk: 0 for this model"
        )
    _HEAD_CHECKED.add(model)


def completion_logits(model: torch.nn.Module, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
    """Logits ``(B, L, V)`` predicting each completion token, ``V = vocab_size`` (slice) if given.

    Gradient flows if the caller has it enabled (student); wrap in ``torch.no_grad`` for the teacher.
    """
    logits = completion_outputs(model, rollout, vocab_size).logits
    assert logits is not None
    return logits


@torch.no_grad()
def score(
    teacher: torch.nn.Module | RemoteTeacher | None,
    rollout: Rollout,
    vocab_size: int | None = None,
    *,
    hidden_layers: tuple[int, ...] = (),
    attention_layers: tuple[int, ...] = (),
    topk: int | Mapping[str, int] = 0,
    temperature: float | Mapping[str, float] = 1.0,
    chunk_size: int = 1024,
    with_token_logprobs: bool = False,
) -> ScoredRollout:
    """Teacher logits (and requested hidden states / attentions) on the rollout, eval mode, no gradient.

    With ``topk > 0`` the teacher's distribution at ``temperature`` is kept as top-k log-probs plus a
    tail bucket (:class:`gkd.losses.TeacherTopK`), formed from its final hidden states a chunk of
    ``chunk_size`` positions at a time, so full teacher logits are never materialised.

    A served teacher (:class:`gkd.serving.client.RemoteTeacher`) always answers with top-k (k = 1
    when ``topk`` is 0: only ``token_logprobs`` is wanted then) and the completion tokens' log-probs.
    A local teacher fills ``token_logprobs`` (log p(y_t), unprocessed: temperature 1) on request
    (``with_token_logprobs``: the sampled-token objective), from the same logits / chunks. Several teachers
    (:class:`gkd.teachers.TeacherRouter`) score each row with the teacher its ``rollout.rows`` names; for
    them ``topk`` / ``temperature`` may map each teacher name to its own value."""
    if teacher is None:
        return ScoredRollout(rollout=rollout, teacher_logits=None)
    if getattr(teacher, "routes_rows", False):  # teachers: each row scored by its own (gkd.teachers.TeacherRouter)
        return teacher.score(rollout, vocab_size, hidden_layers=hidden_layers, attention_layers=attention_layers,
                             topk=topk, temperature=temperature, chunk_size=chunk_size,
                             with_token_logprobs=with_token_logprobs)
    if isinstance(topk, Mapping) or isinstance(temperature, Mapping):
        raise TypeError("per-teacher topk / temperature (a mapping) need several teachers (a TeacherRouter)")
    if isinstance(teacher, RemoteTeacher):
        if hidden_layers or attention_layers:
            raise InputError("a served teacher sends log-probs only; hidden-state / attention objectives need a "
                             "local teacher")
        view, tokens = teacher.score(rollout, topk if topk > 0 else 1, temperature)
        return ScoredRollout(rollout=rollout, teacher_logits=view if topk > 0 else None, token_logprobs=tokens)
    teacher.eval()
    out = completion_outputs(teacher, rollout, vocab_size, hidden_layers=hidden_layers,
                             attention_layers=attention_layers, final_hidden=topk > 0)
    teacher_view: torch.Tensor | TeacherTopK | None = out.logits
    tokens = None
    ids = rollout.completion_ids
    if topk > 0:
        assert out.final_hidden is not None
        b, length, h = out.final_hidden.shape
        teacher_view, picked = teacher_topk_and_targets(
            out.final_hidden.reshape(b * length, h), topk, ids.reshape(-1) if with_token_logprobs else None,
            head=lm_head(teacher), vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size or b * length)
        teacher_view = teacher_view.reshape(b, length)
        tokens = picked.reshape(b, length) if picked is not None else None
    elif with_token_logprobs:
        assert out.logits is not None
        tokens = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, ids.long()[..., None])[..., 0]
    return ScoredRollout(rollout=rollout, teacher_logits=teacher_view, teacher_hidden=out.hidden,
                         teacher_attentions=out.attentions, token_logprobs=tokens)


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
