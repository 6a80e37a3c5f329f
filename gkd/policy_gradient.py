"""Policy-gradient math of the reward-driven objectives: MiniLLM's reverse KL by policy gradient (Gu et al.
2024: per-token rewards, eq. 6 length-normalised returns, whitening, the PPO-clipped loss of eqs. 5 and 7,
importance weights) and the REINFORCE term of GKD eq. 5 (the reward term weighted by α). All take
per-token tensors ``(B, T)`` and no model; the divergences and MiniLLM's single-step term are
:mod:`gkd.losses`."""

from __future__ import annotations

import torch

__all__ = ["importance_weights", "masked_moments", "minillm_returns", "minillm_rewards", "policy_gradient_loss", "ppo_clipped_loss", "ppo_clipped_share", "whiten"]


def minillm_rewards(
    teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Per-token reward ``r_t = scale·(log p(y_t) − log q_old(y_t))`` ``(B, T)``, 0 where masked."""
    r = (teacher_logprobs.float() - old_logprobs.float()) * scale
    return torch.where(mask.bool(), r, torch.zeros_like(r))


def minillm_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    include_current: bool = False,
    length_normalized: bool = True,
) -> torch.Tensor:
    """Long-term return per position ``(B, T)``, MiniLLM eq. 6.

    Paper form (``include_current=False``, ``gamma=1``): ``R^Norm_{t+1} = (1/(L−t))·Σ_{t'=t+1..L} r_t'``,
    the mean reward of the tokens *after* ``t`` (0 at the last token). With ``gamma`` the sum is
    discounted by distance, ``Σ γ^{t'−t−1} r_t'``, still divided by the number of terms (as the
    original code does). ``include_current=True`` is the original code's variant
    ``Σ_{t'≥t} γ^{t'−t} r_t' / (L−t+1)``. ``length_normalized=False`` drops the division (plain
    return; the ablation the paper reports as collapsing to short answers). Positions are relative
    to each sequence's own tokens (mask), never absolute positions.
    """
    mask = mask.bool()
    r = torch.where(mask, rewards.float(), torch.zeros((), device=rewards.device))
    steps = r.shape[1]
    acc = torch.zeros_like(r[:, 0])
    future = torch.zeros_like(r)  # Σ_{t'>t} γ^{t'−t−1} r_t'
    for t in reversed(range(steps)):
        future[:, t] = acc
        acc = r[:, t] + gamma * acc
    m = mask.float()
    later = m.flip(-1).cumsum(-1).flip(-1) - m  # number of real tokens after t
    if include_current:
        ret, count = r + gamma * future, later + 1.0
    else:
        ret, count = future, later
    if length_normalized:
        ret = ret / count.clamp(min=1.0)
    return torch.where(mask, ret, torch.zeros_like(ret))


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[Σx, Σx², n]`` over unmasked entries (all-reduce these for global whitening)."""
    mask = mask.bool()
    x = torch.where(mask, values.float(), torch.zeros((), device=values.device))
    return torch.stack([x.sum(), (x * x).sum(), mask.sum().float()])


def whiten(values: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``(x − mean)/std`` over unmasked entries; ``moments`` from :func:`masked_moments` summed over
    the global batch (default: this batch). Masked entries are 0."""
    s, ss, n = (moments if moments is not None else masked_moments(values, mask)).unbind()
    n = n.clamp(min=1.0)
    mean = s / n
    var = (ss / n - mean * mean).clamp(min=0.0)
    out = (values.float() - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def ppo_clipped_loss(
    logprobs: torch.Tensor, mixed_logprobs: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> torch.Tensor:
    """Per-token PPO loss on ``ρ_t = q_θ(y_t)/p̃(y_t)``: ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` (MiniLLM eq. 5, 7).

    ``ρ = (q_θ/q_old)·w_t`` with the importance weight ``w_t = q_old/p̃`` of teacher-mixed sampling.
    """
    ratio = torch.exp(logprobs.float() - mixed_logprobs.float())
    adv = advantages.float()
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))


def ppo_clipped_share(
    logprobs: torch.Tensor, mixed_logprobs: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> torch.Tensor:
    """Per token 1.0 where :func:`ppo_clipped_loss` takes its clipped branch (no gradient flows), else 0:
    the mean over tokens is PPO's clip fraction."""
    ratio = torch.exp(logprobs.detach().float() - mixed_logprobs.float())
    adv = advantages.float()
    return (-adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) > -adv * ratio).float()


def importance_weights(old_logprobs: torch.Tensor, mixed_logprobs: torch.Tensor) -> torch.Tensor:
    """``w_t = q_old(y_t)/p̃(y_t)`` (MiniLLM eq. 5, single-step approximation)."""
    return torch.exp(old_logprobs.float() - mixed_logprobs.float())


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline, per token: ``−A_i·log q_θ(y_t)`` (GKD eq. 5 reward term).
    ``advantages`` is per sequence ``(B,)`` (reward minus baseline) or per token ``(B, T)``."""
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv[:, None]
    return -adv.detach() * logprobs.float()
