"""Token-level distillation losses (GKD paper eq. 1, DistiLLM, Hinton KD, DKD,
logit MSE, hidden-state and attention distillation).

Every function here is a pure tensor function: it takes logits ``(B, T, V)`` in any dtype,
computes log-softmax in fp32, and returns per-token values ``(B, T)`` or a scalar.
Conventions: *teacher* is ``P``/``p``, *student* is ``Q``/``q``.

Reduction has one path, :func:`masked_sum_and_count` + :func:`reduce_loss`: the trainer sums a
micro-batch's per-token losses and divides by the **global** number of completion tokens of the
optimizer step (all micro-batches, all ranks), which is what makes gradient accumulation and
multi-process training give the same gradient as one big batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "TOPK_OBJECTIVES",
    "TeacherTopK",
    "Temperature",
    "bucket_log_probs",
    "DivergenceFn",
    "LOGIT_OBJECTIVES",
    "attention_kl_per_token",
    "dkd_per_token",
    "hidden_cosine_per_token",
    "hidden_mse_per_token",
    "logit_mse_per_token",
    "distillation_loss_per_token",
    "forward_kl",
    "generalized_jsd",
    "generalized_jsd_per_token",
    "get_divergence",
    "kd_per_token",
    "log_probs",
    "masked_sum_and_count",
    "reduce_loss",
    "reverse_kl",
    "single_step_reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_logprobs",
    "total_variation",
]

REDUCTIONS = ("token_mean", "sequence_mean")


@dataclass
class TeacherTopK:
    """The teacher's distribution compressed to its ``k`` most likely tokens plus a tail bucket.

    ``indices``/``logprobs`` ``(..., k)``: token ids and their log-probs; ``log_tail`` ``(...)``: the
    log-probability of all other tokens together (``LOG_ZERO`` when it is 0). Divergences are then
    taken between the two distributions coarsened to these ``k + 1`` buckets
    (:func:`bucket_log_probs`), exact when ``k`` equals the vocabulary size.

    An entry with index ``EMPTY`` (-1; log-prob ``LOG_ZERO``) is an empty bucket: probability exactly 0
    for both models, so it adds exactly 0 to every divergence and its gradient. It pads a narrower view to
    a wider one (:meth:`widen`: teachers of different k in one batch, ``teachers:``); it never comes first.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor
    LOG_ZERO = -1.0e4  # exp() underflows to exactly 0 in fp32, and stays finite in gradients
    EMPTY = -1  # the index of an empty bucket (padding to a wider k)

    def rows(self, rows: slice | torch.Tensor) -> TeacherTopK:
        return TeacherTopK(self.indices[rows], self.logprobs[rows], self.log_tail[rows])

    __getitem__ = rows  # index like a logits tensor: ``teacher[rows]``

    def flatten_positions(self) -> TeacherTopK:
        """``(B, L, k)`` → ``(B·L, k)``, like ``logits.reshape(-1, V)``."""
        return self.reshape(self.log_tail.numel())

    def reshape(self, *shape: int) -> TeacherTopK:
        k = self.indices.shape[-1]
        return TeacherTopK(self.indices.reshape(*shape, k), self.logprobs.reshape(*shape, k),
                           self.log_tail.reshape(*shape))

    @property
    def shape(self) -> torch.Size:
        return self.log_tail.shape

    @property
    def width(self) -> int:
        """``k``: entries per position (empty ones included)."""
        return int(self.indices.shape[-1])

    def widen(self, k: int) -> TeacherTopK:
        """The view with ``k`` entries per position: its own, then empty buckets (:attr:`EMPTY`)."""
        extra = k - self.width
        if extra <= 0:
            return self
        shape = (*self.indices.shape[:-1], extra)
        return TeacherTopK(
            torch.cat([self.indices, torch.full(shape, self.EMPTY, dtype=self.indices.dtype, device=self.indices.device)],
                      -1),
            torch.cat([self.logprobs, torch.full(shape, self.LOG_ZERO, dtype=self.logprobs.dtype,
                                                 device=self.logprobs.device)], -1),
            self.log_tail)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, temperature: float = 1.0) -> TeacherTopK:
        """Full teacher logits ``(..., V)`` as the exact view with ``k = V`` (every token, empty tail), its
        log-probs at ``temperature``: what a full-vocabulary teacher's rows become beside top-k teachers'."""
        v = logits.shape[-1]
        indices = torch.arange(v, device=logits.device).expand(*logits.shape[:-1], v)
        return cls(indices, log_probs(logits, temperature),
                   torch.full(logits.shape[:-1], cls.LOG_ZERO, dtype=torch.float32, device=logits.device))


#: Loss temperature τ: one float for every position, or a tensor of one τ per position, shaped like the
#: logits without their vocabulary axis (several teachers, each with its own τ).
Temperature = float | torch.Tensor


def _divide(logits: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """``logits / τ`` with a per-position τ tensor broadcast over the vocabulary axis."""
    return logits / temperature.to(logits.dtype).unsqueeze(-1) if isinstance(temperature, torch.Tensor) \
        else logits / temperature


def bucket_log_probs(student_logits: torch.Tensor, teacher: TeacherTopK, temperature: Temperature = 1.0) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the ``k + 1`` buckets (teacher's top-k tokens, then the
    rest), ``(..., k + 1)`` each, fp32. The student's tail is ``logsumexp`` over its non-top-k logits
    minus its full ``logsumexp`` (no cancellation). Empty buckets (index :attr:`TeacherTopK.EMPTY`) get
    ``LOG_ZERO`` for the student too (probability 0, no gradient) and take nothing from its tail."""
    s = _divide(student_logits.float(), temperature)
    lse = torch.logsumexp(s, -1, keepdim=True)
    empty = teacher.indices < 0
    indices = torch.where(empty, teacher.indices[..., :1], teacher.indices)  # an empty entry repeats the first
    top = torch.where(empty, TeacherTopK.LOG_ZERO, s.gather(-1, indices) - lse)
    rest = torch.logsumexp(s.scatter(-1, indices, float("-inf")), -1, keepdim=True) - lse
    s_b = torch.cat([top, rest.clamp(min=TeacherTopK.LOG_ZERO)], -1)
    t_b = torch.cat([teacher.logprobs.float(), teacher.log_tail.float().unsqueeze(-1)], -1)
    return s_b, t_b


def log_probs(logits: torch.Tensor, temperature: Temperature = 1.0) -> torch.Tensor:
    """``log_softmax(logits / τ)`` in fp32 whatever the input dtype (docs/design.md, Numerics: a bf16 teacher
    against an fp32 student must not give a negative divergence). ``τ`` may be a tensor, one per position."""
    if isinstance(temperature, torch.Tensor):
        return F.log_softmax(_divide(logits.float(), temperature), dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) summed over the last axis, from log-probs. ``p_a = 0`` terms contribute exactly 0."""
    p_a = logp_a.exp()
    return torch.where(p_a > 0, p_a * (logp_a - logp_b), torch.zeros_like(p_a)).sum(-1)


def _log_mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(w·a + (1−w)·b)`` formed in probability space via log-sum-exp (never a mix of log-probs)."""
    if weight_a <= 0.0:
        return logp_b
    if weight_a >= 1.0:
        return logp_a
    return torch.logaddexp(logp_a + math.log(weight_a), logp_b + math.log1p(-weight_a))


# --- divergences on log-probs: (student_logp, teacher_logp) -> (B, T) ---------------------------


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL ``KL(p‖q)`` per position (supervised KD's divergence; mode covering)."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Reverse KL ``KL(q‖p)`` per position (MiniLLM's objective; mode seeking)."""
    return _kl(student_logp, teacher_logp)


def generalized_jsd_per_token(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Generalized JSD, GKD paper eq. 1: ``β·KL(P‖M) + (1−β)·KL(Q‖M)``, ``M = β·P + (1−β)·Q``.

    The endpoints are exact: β=0 is forward KL ``KL(P‖Q)``, β=1 is reverse KL ``KL(Q‖P)`` (same
    convention as the GKD paper and TRL). In between the value is bounded by ``H(β)``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    log_m = _log_mix(teacher_logp, student_logp, beta)
    return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


def total_variation(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Total variation distance ``½·Σ_v |p(v) − q(v)|`` per position (DistiLLM's TVD baseline)."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def skew_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """Skew KL, DistiLLM eq. 4: ``KL(p ‖ a·p + (1−a)·q)`` per position (a = ``skew``)."""
    return _kl(teacher_logp, _log_mix(teacher_logp, student_logp, skew))


def skew_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """Skew reverse KL, DistiLLM eq. 5: ``KL(q ‖ (1−a)·p + a·q)`` per position (a = ``skew``)."""
    return _kl(student_logp, _log_mix(student_logp, teacher_logp, skew))


DivergenceFn = Callable[..., torch.Tensor]

#: Name → per-position divergence on fp32 log-probs. ``kd`` (Hinton) is handled by :func:`kd_per_token`.
DIVERGENCES: dict[str, DivergenceFn] = {
    "jsd": generalized_jsd_per_token,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "tvd": total_variation,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "kd": forward_kl,  # the soft part of classic KD; see kd_per_token
}


def get_divergence(name: str) -> DivergenceFn:
    """Look a divergence up by name; an unknown name is an error listing the valid ones."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(sorted(DIVERGENCES))}") from None


def kd_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    kd_weight: float = 0.5,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """Classic KD (Hinton et al. 2015): ``w·T²·KL(p^T‖q^T) + (1−w)·CE(y_ref, q)`` per position.

    ``T²`` keeps the soft term's gradient scale independent of ``T``. The CE part is computed at
    temperature 1 on ``labels`` (reference tokens, ``(B, T)`` ids); pass ``labels=None`` on
    student-generated batches, where there is no reference and only the soft term remains.
    ``kd_weight=0`` with labels is plain supervised fine-tuning (the teacher may then be ``None``).
    """
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    loss = torch.zeros(student_logits.shape[:-1], dtype=torch.float32, device=student_logits.device)
    if kd_weight > 0:
        if teacher_logits is None:
            raise ValueError("kd with kd_weight > 0 needs teacher logits")
        soft = forward_kl(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))
        loss = loss + kd_weight * temperature**2 * soft
    if labels is not None and kd_weight < 1:
        ce = -log_probs(student_logits).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
        loss = loss + (1.0 - kd_weight) * ce
    return loss


def dkd_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022, eq. 7) per position: ``T²·(α·TCKD + β·NCKD)``.

    ``targets`` ``(B, T)`` is the target token: the reference token on off-policy batches, the
    sampled token on on-policy ones. TCKD = ``KL(b^T‖b^S)`` over the binary split
    ``[p_y, 1 − p_y]``; NCKD = ``KL(p̂^T‖p̂^S)`` over the non-target tokens renormalised
    (``p̂_v = p_v/(1 − p_y)``). With α = 1 and β = 1 − p_y^T this is exactly ``KL(p‖q)`` (eq. 4).
    Everything is formed from log-sum-exps, so ``p_y → 1`` stays finite.
    """
    s = _divide(student_logits.float(), temperature)
    t = _divide(teacher_logits.float(), temperature)
    idx = targets.long().unsqueeze(-1)
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    neg_inf = torch.tensor(float("-inf"), device=s.device)

    def split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lse = torch.logsumexp(z, -1)
        non_target = torch.where(is_target, neg_inf, z)
        lse_nt = torch.logsumexp(non_target, -1)
        log_py = z.gather(-1, idx).squeeze(-1) - lse  # log p_y
        log_rest = lse_nt - lse  # log(1 − p_y), without cancellation
        return log_py, log_rest, non_target - lse_nt.unsqueeze(-1)  # last: log p̂ (−inf at the target)

    t_py, t_rest, t_hat = split(t)
    s_py, s_rest, s_hat = split(s)
    tckd = t_py.exp() * (t_py - s_py) + t_rest.exp() * (t_rest - s_rest)
    nckd = _kl(t_hat, s_hat)
    return temperature**2 * (alpha * tckd + beta * nckd)


def logit_mse_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Logit matching (Tang et al. 2019, eq. 2): ``(1/V)·Σ_v (z^S_v − z^T_v)²`` per position, raw logits."""
    return (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)


def hidden_mse_per_token(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Hidden-state MSE (FitNets / TinyBERT eq. 8): ``(1/H)·‖h^S W − h^T‖²`` per position.

    ``student_hidden`` is already projected to the teacher's width ``H``; inputs ``(B, T, H)``."""
    return (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)


def hidden_cosine_per_token(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Hidden-state cosine distance (DistilBERT's cosine loss): ``1 − cos(h^S W, h^T)`` per position."""
    return 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1, eps=1e-8)


def attention_kl_per_token(student_attn: torch.Tensor, teacher_attn: torch.Tensor) -> torch.Tensor:
    """Attention-map distillation (MiniLM, Wang et al. 2020, eq. 5): ``KL(A^T‖A^S)`` over the keys of
    each query, averaged over heads. Inputs ``(B, heads, T, S)`` attention probabilities (rows sum to
    1); returns ``(B, T)``. Keys the teacher gives probability 0 (padding) contribute 0."""
    t = teacher_attn.float()
    s_log = student_attn.float().clamp(min=torch.finfo(torch.float32).tiny).log()
    t_log = t.clamp(min=torch.finfo(torch.float32).tiny).log()
    kl = torch.where(t > 0, t * (t_log - s_log), torch.zeros((), device=t.device)).sum(-1)
    return kl.mean(1)


#: Objectives computed from the two models' logits alone; ``divergence`` may be any of these.
LOGIT_OBJECTIVES: tuple[str, ...] = (*sorted(DIVERGENCES), "dkd", "logit_mse")


def distillation_loss_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: Temperature = 1.0,
    kd_weight: float = 0.5,
    labels: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 1.0,
    temperature_squared: bool = False,
) -> torch.Tensor:
    """Per-token loss ``(B, T)`` of one logit objective (the GKD loss of Algorithm 1).

    ``labels`` are only used by ``kd`` (CE on reference tokens, never on student samples);
    ``targets`` (the completion tokens, reference or sampled) only by ``dkd``. ``kd`` and ``dkd``
    carry their papers' ``T²`` factor; ``temperature_squared`` adds it to the other divergences.
    """
    if divergence not in LOGIT_OBJECTIVES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(LOGIT_OBJECTIVES)}")
    if isinstance(teacher_logits, TeacherTopK):
        return _topk_loss_per_token(student_logits, teacher_logits, divergence=divergence, beta=beta, skew=skew,
                                    temperature=temperature, kd_weight=kd_weight, labels=labels,
                                    temperature_squared=temperature_squared)
    if divergence == "kd":
        return kd_per_token(student_logits, teacher_logits, labels, kd_weight=kd_weight, temperature=temperature)
    if teacher_logits is None:
        raise ValueError(f"divergence {divergence!r} needs teacher logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; slice both to the tokenizer's length first"
        )
    if divergence == "logit_mse":
        return logit_mse_per_token(student_logits, teacher_logits)
    if divergence == "dkd":
        if targets is None:
            raise ValueError("dkd needs the target tokens (targets=completion ids)")
        return dkd_per_token(student_logits, teacher_logits, targets, alpha=dkd_alpha, beta=dkd_beta,
                             temperature=temperature)
    fn = get_divergence(divergence)
    s, t = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    if divergence == "jsd":
        out = fn(s, t, beta=beta)
    elif divergence.startswith("skew_"):
        out = fn(s, t, skew=skew)
    else:
        out = fn(s, t)
    return out * temperature**2 if temperature_squared else out


#: objectives that work on a top-k teacher (the others need every teacher logit)
TOPK_OBJECTIVES = (*sorted(DIVERGENCES),)


def _topk_loss_per_token(student_logits: torch.Tensor, teacher: TeacherTopK, *, divergence: str, beta: float,
                         skew: float, temperature: Temperature, kd_weight: float, labels: torch.Tensor | None,
                         temperature_squared: bool) -> torch.Tensor:
    """A divergence between the bucketed distributions (:class:`TeacherTopK`); exact for ``k = V``."""
    if divergence not in TOPK_OBJECTIVES:
        raise ValueError(f"{divergence!r} needs the full teacher distribution; it cannot use teacher_topk "
                         f"(valid with teacher_topk: {', '.join(TOPK_OBJECTIVES)})")
    s, t = bucket_log_probs(student_logits, teacher, temperature)
    if divergence == "kd":
        loss = torch.zeros(student_logits.shape[:-1], dtype=torch.float32, device=student_logits.device)
        if kd_weight > 0:
            loss = loss + kd_weight * temperature**2 * forward_kl(s, t)
        if labels is not None and kd_weight < 1:
            loss = loss - (1.0 - kd_weight) * log_probs(student_logits).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
        return loss
    fn = get_divergence(divergence)
    out = fn(s, t, beta=beta) if divergence == "jsd" else fn(s, t, skew=skew) if divergence.startswith("skew_") \
        else fn(s, t)
    return out * temperature**2 if temperature_squared else out


# --- reduction --------------------------------------------------------------------------------


def masked_sum_and_count(
    per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str = "token_mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator of the loss for one micro-batch.

    ``token_mean``: (sum of per-token values over unmasked tokens, number of those tokens).
    ``sequence_mean``: (sum over sequences of each sequence's token mean (the paper's 1/L_y),
    number of sequences with at least one token). Masked positions never contribute, even if NaN.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device)
    mask = mask.bool()
    values = torch.where(mask, per_token.float(), torch.zeros((), device=per_token.device))
    if reduction == "token_mean":
        return values.sum(), mask.sum().to(torch.float32)
    lengths = mask.sum(-1)
    per_seq = values.sum(-1) / lengths.clamp(min=1)
    return per_seq.sum(), (lengths > 0).sum().to(torch.float32)


def reduce_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "token_mean",
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Scalar loss: masked sum divided by ``normalizer`` (default: this batch's own count).

    The trainer passes the global count of the optimizer step as ``normalizer``. An all-masked
    batch gives 0, not NaN.
    """
    total, count = masked_sum_and_count(per_token, mask, reduction)
    denom = count if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32)
    return total / denom.clamp(min=1.0)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: Temperature = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "token_mean",
) -> torch.Tensor:
    """Mean over unmasked positions of JSD(β)(teacher‖student), GKD paper eq. 1.

    ``student_logits``/``teacher_logits``: ``(B, T, V)``; ``mask``: ``(B, T)`` bool.
    β=0 is exactly forward KL, β=1 exactly reverse KL. All-masked input gives 0.
    """
    per_token = generalized_jsd_per_token(
        log_probs(student_logits, temperature), log_probs(teacher_logits, temperature), beta
    )
    return reduce_loss(per_token, mask, reduction)


# --- MiniLLM (Gu et al. 2024): the single-step term (the policy-gradient parts: gkd/policy_gradient.py)


def single_step_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    temperature: Temperature = 1.0,
) -> torch.Tensor:
    """MiniLLM eq. 3 single-step term: exact ``KL(q_θ,t‖p_t)`` over the vocabulary per position,
    gradient through ``q_θ``; optionally scaled by (detached) importance weights ``w_t`` (eq. 7)."""
    if isinstance(teacher_logits, TeacherTopK):
        kl = reverse_kl(*bucket_log_probs(student_logits, teacher_logits, temperature))
    else:
        kl = reverse_kl(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))
    return kl if weights is None else kl * weights.detach().float()


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log q(y_t)`` ``(B, T)`` of the given ids under ``softmax(logits/τ)``, fp32."""
    return log_probs(logits, temperature).gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


