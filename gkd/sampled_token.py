"""The sampled-token objective: on-policy distillation as tinker-cookbook runs it (Thinking Machines,
"On-Policy Distillation", 2025), a policy gradient whose per-token advantage is the sampled token's
reverse-KL estimate.

On a completion the student sampled, at every position ``t``::

    A_t  = −(log q_old(y_t) − log p(y_t))          detached, no discount, no baseline
    loss = −A_t · ρ_t,   ρ_t = q_θ(y_t) / q_old(y_t)    (= 1: one update per rollout)

``q_old`` is the student that sampled; with one update per rollout it is ``q_θ`` itself at the
moment of the update, so ``log q_old(y_t)`` is taken as ``sg(log q_θ(y_t))`` (the trainer's own
numbers, not a sampler's: no mismatch with a vLLM sampler or a cached-vs-uncached forward). Then
``ρ_t = exp(log q_θ − sg(log q_θ)) = 1`` and the gradient is ``−A_t·∇log q_θ(y_t)``, the gradient of
the design's ``−A_t·ρ_t·log q_θ(y_t)`` at ``ρ = 1``; the *value* is ``−A_t = log q(y_t) − log p(y_t)``,
the single-sample estimate of the per-token reverse KL, so the logged loss reads as a KL.

**Why it is the reverse KL.** For one position with the prefix held fixed (as every on-policy loss
here: no gradient through sampling), ``E_{y~q}[(log q(y) − log p(y))·∇log q(y)] = Σ_y (log q − log p)·∇q
= ∇KL(q‖p) − Σ_y ∇q = ∇KL(q‖p)``: the expected gradient is exactly that of the per-token reverse KL
(``divergence: reverse_kl``), from the teacher's log-prob of one token instead of its whole
distribution (tested: per-sample gradient against a float64 hand loop, expectation by exact
enumeration). It is unbiased when ``y_t`` is the student's own sample at the temperature ``log q`` is
taken at, without top-k / top-p; on other tokens (dataset references, SKD replacements, a truncated
sampler) it is a weighted log-likelihood, no longer the reverse KL's gradient.

**Temperatures.** As MiniLLM's reward (:func:`gkd.policy_gradient.minillm_rewards`): ``log q_θ`` at the sampling
``temperature``, ``log p`` of the teacher's unprocessed distribution (temperature 1), so a served
teacher — ``gkd serve-teacher`` or vLLM's raw prompt log-probs — can supply it. ``loss_temperature``
does not apply.

**What the teacher must send.** Only ``log p(y_t)``, the cheapest thing a teacher can give: from the
rollout when sampling already computed it (SKD, teacher-mixed sampling), else from a served teacher
asked for k = 1 (no top-k transfer when no other objective needs one), else gathered from a local
teacher's logits or top-k chunks (:func:`teacher_token_logprobs`).
"""

from __future__ import annotations

import torch

__all__ = ["SAMPLED_OBJECTIVES", "sampled_reverse_kl_per_token", "teacher_token_logprobs"]

#: objectives that need only the teacher's log-prob of each completion token
SAMPLED_OBJECTIVES: tuple[str, ...] = ("sampled_reverse_kl",)


def sampled_reverse_kl_per_token(student_logits: torch.Tensor, teacher_token_logprobs: torch.Tensor,
                                 token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per token ``−A_t·ρ_t`` with ``A_t = sg(log p(y_t) − log q_θ(y_t))`` and ``ρ_t = q_θ/sg(q_θ) = 1``.

    ``student_logits`` ``(…, V)``; ``teacher_token_logprobs`` and ``token_ids`` ``(…)``; ``log q_θ`` of
    ``softmax(logits/temperature)``, fp32 (fp64 kept). Value: ``log q(y_t) − log p(y_t)``; gradient:
    ``(log q(y_t) − log p(y_t))·∇log q_θ(y_t)``."""
    z = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    log_q = torch.log_softmax(z / temperature, dim=-1).gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    advantage = (teacher_token_logprobs.to(log_q.dtype) - log_q).detach()
    ratio = torch.exp(log_q - log_q.detach())  # exactly 1; carries ∇log q_θ
    return -advantage * ratio


def teacher_token_logprobs(rollout_teacher_logprobs: torch.Tensor | None,
                           scored_token_logprobs: torch.Tensor | None) -> torch.Tensor:
    """``log p(y_t)`` ``(B, L)`` of the teacher's unprocessed distribution, from the cheapest source at
    hand: stored by the sampler (SKD / teacher-mixed sampling computed it while verifying), else the
    scorer's (a served teacher sends it; a local one gathers it from its logits or top-k chunks)."""
    if rollout_teacher_logprobs is not None:
        return rollout_teacher_logprobs
    if scored_token_logprobs is not None:
        return scored_token_logprobs
    raise ValueError("sampled_reverse_kl needs the teacher's log-prob of each completion token (score(..., "
                     "with_token_logprobs=True), or stored by SKD / teacher-mixed sampling)")
