"""On-policy fidelity: how close the student is to the teacher *on the student's own samples*, logged
on every on-policy step (metrics only; no gradient).

All at temperature 1, the models' own distributions ``q_t`` (student) and ``p_t`` (teacher), per
completion token ``y_t`` of the student's sample:

* ``onpolicy_rkl``: the exact reverse KL ``KL(q_t‖p_t) = Σ_v q_t(v)(log q_t(v) − log p_t(v))`` over
  the vocabulary; needs the teacher's full logits (a local teacher with ``teacher_topk: 0``).
* ``onpolicy_rkl_sampled``: the sampled-token estimate ``log q_t(y_t) − log p_t(y_t)``, whose mean over
  tokens sampled from ``q`` is an unbiased estimate of the reverse KL (tinker-cookbook's ``teacher_kl``;
  biased when sampling at another temperature or with top-k / top-p). Needs only the teacher's log-prob
  of the sampled token: full logits, or a served teacher's ``token_logprobs``.
* ``onpolicy_rkl_buckets``: with a top-k teacher view (``teacher_topk > 0``, loss temperature 1), the
  reverse KL between both distributions coarsened to the teacher's top-k tokens plus one tail bucket: a
  lower bound of the exact reverse KL (coarsening never increases a KL).
* ``onpolicy_topk_overlap``: ``|T_k ∩ S_k| / k``, the share of the teacher's ``k`` most likely tokens that
  are also among the student's ``k`` most likely (``k = fidelity_topk``, at most the teacher view's k).
* ``onpolicy_topk_mass``: ``Σ_{v ∈ T_k ∩ S_k} p_t(v) / Σ_{v ∈ T_k} p_t(v)``, the share of the teacher's
  top-k probability mass that the student's top-k covers (verl's "teacher mass" idea).
"""

from __future__ import annotations

import torch

from gkd.losses import TeacherTopK, bucket_log_probs

__all__ = ["fidelity_terms", "reverse_kl_full", "sampled_token_reverse_kl", "topk_agreement"]


def reverse_kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(q‖p)`` per position over the vocabulary, fp32, ``(n, V) → (n,)``."""
    logq = torch.log_softmax(student_logits.float(), -1)
    logp = torch.log_softmax(teacher_logits.float(), -1)
    return (logq.exp() * (logq - logp)).sum(-1)


def sampled_token_reverse_kl(student_logits: torch.Tensor, ids: torch.Tensor,
                             teacher_token_logprobs: torch.Tensor) -> torch.Tensor:
    """``log q(y) − log p(y)`` at the sampled tokens ``ids`` ``(n,)``."""
    logq = torch.log_softmax(student_logits.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    return logq - teacher_token_logprobs.float()


def topk_agreement(student_logits: torch.Tensor, teacher: torch.Tensor | TeacherTopK, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(overlap, mass)`` per position (definitions in the module docstring). ``teacher``: full logits
    ``(n, V)`` or a top-k view (its ``k`` caps ours). ``mass`` is None for a top-k view (the caller
    knows whether its log-probs are at temperature 1). A position of a narrower teacher in a widened view
    (empty buckets, ``teachers:`` of different k) uses its own k: its real entries, the student's top-k as wide."""
    if isinstance(teacher, TeacherTopK):
        k = min(k, teacher.indices.shape[-1])
        order = teacher.logprobs.topk(k, -1).indices
        t_ids, t_logp = teacher.indices.gather(-1, order), teacher.logprobs.gather(-1, order).float()
    else:
        k = min(k, teacher.shape[-1])
        t_logp, t_ids = torch.log_softmax(teacher.float(), -1).topk(k, -1)
    s_ids = student_logits.topk(k, -1).indices
    width = (t_ids >= 0).sum(-1, keepdim=True)  # (n, 1): k, or fewer real entries (empty buckets sort last)
    in_student = (t_ids[:, :, None] == s_ids[:, None, :]) & (torch.arange(k, device=s_ids.device) < width)[:, None, :]
    shared = in_student.any(-1)  # (n, k): teacher's i-th token in the student's top-k (as wide as the teacher's)
    overlap = shared.float().sum(-1) / width[:, 0].clamp(min=1)
    p = t_logp.exp()
    mass = (p * shared).sum(-1) / p.sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
    return overlap, mass


@torch.no_grad()
def fidelity_terms(student_logits: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor | TeacherTopK | None,
                   teacher_token_logprobs: torch.Tensor | None, *, topk: int, teacher_temperature: float
                   ) -> dict[str, torch.Tensor]:
    """The per-token fidelity metrics that the teacher's view allows, by name (module docstring).
    ``student_logits`` ``(n, V)`` raw; ``ids`` ``(n,)`` sampled tokens; ``teacher``: raw full logits
    ``(n, V)`` or a top-k view at ``teacher_temperature``; ``teacher_token_logprobs`` ``(n,)`` at T = 1."""
    z = student_logits.detach()
    out: dict[str, torch.Tensor] = {}
    if isinstance(teacher, torch.Tensor):
        out["onpolicy_rkl"] = reverse_kl_full(z, teacher)
        token_lp = torch.log_softmax(teacher.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
        out["onpolicy_rkl_sampled"] = sampled_token_reverse_kl(z, ids, token_lp)
    elif teacher_token_logprobs is not None:
        out["onpolicy_rkl_sampled"] = sampled_token_reverse_kl(z, ids, teacher_token_logprobs)
    if isinstance(teacher, TeacherTopK) and teacher_temperature == 1.0:
        s_b, t_b = bucket_log_probs(z, teacher)
        out["onpolicy_rkl_buckets"] = (s_b.exp() * (s_b - t_b)).sum(-1)
    if teacher is not None and topk > 0:
        overlap, mass = topk_agreement(z, teacher, topk)
        out["onpolicy_topk_overlap"] = overlap
        if not isinstance(teacher, TeacherTopK) or teacher_temperature == 1.0:
            out["onpolicy_topk_mass"] = mass  # type: ignore[assignment]
    return out
