"""GKD: generalized knowledge distillation (Agarwal et al. 2024, Algorithm 1), with the reward term of
eq. 5.

One optimizer step::

    on_policy = coin(λ)                 # once per step, on rank 0, broadcast (ranks never disagree)
    rollouts  = student samples | teacher samples (seq_kd) | dataset references
    rewards   = user reward functions → advantages (on-policy steps with α < 1)
    optimize(rollouts)                  # per token: α·Σ_i w_i·D_i(p_t‖q_t) + (1−α)·(−A·log q_θ(y_t))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gkd import distributed
from gkd.adaptive_lmbda import AdaptiveLambda, validation_loss, validation_rollouts
from gkd.algorithms.base import Algorithm, RunParts
from gkd.algorithms.common import (
    flat_positions,
    logit_terms_fn,
    loss_output,
    row_temperatures,
    run_per_token,
    structure_terms,
    view_settings,
    view_temperature,
    views,
)
from gkd.data import reference_rollout, require_references
from gkd.fidelity import fidelity_terms
from gkd.losses import token_logprobs
from gkd.objectives import temperature_at
from gkd.policy_gradient import policy_gradient_loss
from gkd.rewards import score_rollouts
from gkd.rollout import Rollout
from gkd.rollout_skd import skd_metrics
from gkd.sampling import repeat_batch
from gkd.update import LossOutput

__all__ = ["GKD", "batch_baseline_advantages", "group_baseline_advantages", "lmbda_at"]

ADAPTIVE_FILE = "adaptive_lmbda"  # per-rank checkpoint file of lmbda_schedule: adaptive (λ, best loss, checks)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def lmbda_at(step: int, max_steps: int, lmbda: float, lmbda_end: float | None = None, schedule: str = "constant",
             warmup_steps: int = 0) -> float:
    """λ of optimizer step ``step`` (0-based): 0 during ``warmup_steps`` off-policy steps, then constant,
    or linear / cosine from ``lmbda`` to ``lmbda_end`` over the remaining steps."""
    if step < warmup_steps:
        return 0.0
    return temperature_at(step - warmup_steps, max_steps - warmup_steps, lmbda, lmbda_end, schedule)


def group_baseline_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """``A_i = r_i − mean of the rewarded samples of i's prompt`` (``group_size`` consecutive samples
    per prompt, ``num_generations``); 0 where ``mask`` is False (a reward function returned None)."""
    rew = rewards.view(-1, group_size)
    m = mask.view(-1, group_size).float()
    base = (rew * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return ((rew - base) * m).view(-1)


def batch_baseline_advantages(rewards: list[torch.Tensor], masks: list[torch.Tensor],
                              all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity) -> list[torch.Tensor]:
    """``A_i = r_i − mean of every rewarded sample of the step`` (all micro-batches; all ranks when
    ``all_reduce_sum`` sums over them); 0 where the mask is False."""
    total = all_reduce_sum(torch.stack([
        sum((r * m).sum() for r, m in zip(rewards, masks, strict=True)),  # type: ignore[misc]
        sum(m.sum() for m in masks),  # type: ignore[misc]
    ]).float().cpu())
    base = float(total[0] / total[1].clamp(min=1.0))
    return [(r - base) * m for r, m in zip(rewards, masks, strict=True)]


class GKD(Algorithm):
    """On-policy share ``lmbda``, divergence ``divergence`` / ``beta`` (or weighted ``objectives``),
    SeqKD (``seq_kd``), and the α-weighted reward term (``reward_funcs``, ``alpha``)."""

    name = "gkd"
    title = "GKD (Agarwal et al. 2024)"

    def __init__(self, parts: RunParts) -> None:
        super().__init__(parts)
        self.coin = distributed.OnPolicyScheduler(self.config.lmbda, self.config.seed)
        cfg = self.config
        self.adaptive = AdaptiveLambda(cfg.lmbda, cfg.lmbda_step, cfg.lmbda_end if cfg.lmbda_end is not None else 1.0,
                                       cfg.lmbda_tolerance) if cfg.lmbda_schedule == "adaptive" else None
        self.validation: list[Rollout] | None = None  # adaptive λ: the held-out completions, built at the first check
        # ZeRO-3 sampling without whole-weight gathers: ranks gather layer by layer, so every rank must make the
        # same forward calls; SKD's adaptive draft length (chosen per rank) is then fixed at skd_draft_tokens
        self.layer_lockstep = distributed.zero_stage(parts.accelerator) == 3 and not cfg.zero3_gather_for_generation

    state_files = (ADAPTIVE_FILE,)

    def state_dict(self) -> dict[str, Any]:
        return {ADAPTIVE_FILE: self.adaptive.state_dict()} if self.adaptive is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adaptive is not None and ADAPTIVE_FILE in state:
            self.adaptive.load_state_dict(state[ADAPTIVE_FILE])

    @classmethod
    def check_rows(cls, config: Any, rows: list[dict[str, Any]]) -> None:
        off_policy = config.lmbda < 1.0 or config.off_policy_warmup_steps > 0 or (
            config.lmbda_schedule != "constant" and (config.lmbda_end or 0.0) < 1.0)
        if off_policy and not config.seq_kd:
            why = (f"lmbda={config.lmbda} < 1 makes off-policy steps" if config.lmbda < 1.0 else
                   "off_policy_warmup_steps / lmbda_schedule make off-policy steps")
            require_references(rows, f"{why}, which train on the dataset's reference completions",
                               "set lmbda: 1 (every step on-policy) or seq_kd: true (the teacher writes them)")

    def settings(self) -> str:
        cfg = self.config
        return f"lmbda={cfg.lmbda}, divergence={cfg.divergence}, beta={cfg.beta}"

    def generators(self) -> dict[str, torch.Generator]:
        return {"coin": self.coin.generator}

    def steps(self) -> Iterator[dict[str, float]]:
        while True:
            yield self.train_step()

    def train_step(self) -> dict[str, float]:
        """One optimizer step: rollout → (rewards) → score → loss → backward → step."""
        cfg, parts = self.config, self.parts
        scheduled = cfg.lmbda_schedule != "constant" or cfg.off_policy_warmup_steps > 0
        adaptive_metrics = self.adaptive_check() if self.adaptive is not None else {}
        if self.adaptive is not None:
            lmbda: float | None = 0.0 if self.step < cfg.off_policy_warmup_steps else self.adaptive.lmbda
        else:
            lmbda = lmbda_at(self.step, cfg.max_steps, cfg.lmbda, cfg.lmbda_end, cfg.lmbda_schedule,
                             cfg.off_policy_warmup_steps) if scheduled else None
        on_policy = self.coin.draw(lmbda)
        batches = [next(parts.batches) for _ in range(cfg.gradient_accumulation_steps)]
        with parts.timers("rollout"):
            rollouts = [self.rollout(b, on_policy) for b in batches]
        reward_metrics = {}
        if parts.rewards and on_policy:
            with parts.timers("reward"):
                reward_metrics = score_rollouts(parts.rewards, parts.tokenizer, rollouts)
                self.set_advantages(rollouts)
        metrics = self.optimize(rollouts)
        metrics.update(reward_metrics, **adaptive_metrics, on_policy=int(on_policy))
        if lmbda is not None:
            metrics["lmbda"] = lmbda
        if on_policy:
            metrics.update(self.sample_stats(rollouts))
            metrics.update(skd_metrics(rollouts, distributed.all_reduce_sum))
        self.maybe_log_samples(rollouts[0])
        if distributed.is_distributed():  # how many ranks took this step on-policy: 0 or all, never a mix
            metrics["on_policy_ranks"] = int(distributed.all_reduce_sum(torch.tensor(float(on_policy))).item())
        return metrics

    def skd_keep(self) -> tuple[int, float] | None:
        """With ``teacher_topk``, SKD keeps the teacher's top-k view (at this step's loss temperature) from
        its verification passes, and the loss reuses it instead of scoring the teacher again. Not when
        ``teachers:`` differ in ``topk`` or set their own ``temperature`` (the loss scores each teacher's
        rows at its own settings then)."""
        obj = self.parts.objectives
        topk, tau = view_settings(self.parts, self.loss_temperature)
        if isinstance(topk, dict):
            topk = next(iter(topk.values())) if len(set(topk.values())) == 1 else 0
        if topk and not isinstance(tau, dict) and obj.needs_teacher_distribution and not obj.structural:
            return topk, tau
        return None

    def adaptive_check(self) -> dict[str, float]:
        """``lmbda_schedule: adaptive`` (:mod:`gkd.adaptive_lmbda`): every ``lmbda_check_steps`` steps (and
        before the first), the held-out validation loss, and λ raised by ``lmbda_step`` when it did not
        improve; rank 0's λ is broadcast. Logged on check steps: ``lmbda_val_loss``, ``lmbda_val_best``,
        ``time_lmbda_val`` (seconds, inside ``time_step``)."""
        cfg, parts = self.config, self.parts
        assert self.adaptive is not None
        if self.step % (cfg.lmbda_check_steps or cfg.eval_steps):
            return {}
        start = time.perf_counter()
        if self.validation is None:
            self.validation = validation_rollouts(
                parts.validation_rows or [], parts.tokenizer, parts.teacher, batch_size=cfg.per_device_batch_size,
                max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
                device=parts.accelerator.device, gather_for_generation=cfg.zero3_gather_for_generation)
        loss = validation_loss(parts.student, parts.teacher, self.validation, parts.vocab_size,
                               topk=view_settings(parts, 1.0)[0], chunk_size=cfg.loss_chunk_size,
                               all_reduce_sum=distributed.all_reduce_sum)
        lmbda = self.adaptive.update(loss)
        self.adaptive.lmbda = float(distributed.broadcast_from_main(torch.tensor([lmbda], dtype=torch.float64))[0])
        return {"lmbda_val_loss": loss, "lmbda_val_best": self.adaptive.best,
                "time_lmbda_val": time.perf_counter() - start}

    def rollout(self, batch: dict[str, Any], on_policy: bool) -> Rollout:
        """Student samples (on-policy), teacher samples (``seq_kd``) or the dataset's references."""
        cfg, sampler = self.config, self.parts.sampler
        if not on_policy and not cfg.seq_kd:
            rollout = reference_rollout(batch)
        elif on_policy:
            if cfg.num_generations > 1:
                batch = repeat_batch(batch, cfg.num_generations)
            if cfg.rollout == "skd":  # speculative KD: the teacher replaces proposals outside its top-K
                rollout = sampler.sample(batch, self.parts.unwrapped, teacher=self.parts.teacher,
                                         skd_top_k=cfg.skd_top_k, draft_tokens=cfg.skd_draft_tokens,
                                         adaptive_draft=not self.layer_lockstep, keep_teacher_topk=self.skd_keep())
            else:
                rollout = sampler.sample(batch, self.parts.unwrapped)
        else:
            rollout = sampler.sample(batch, self.parts.teacher)  # type: ignore[arg-type]
            rollout.on_policy = False
        rollout.rows = batch["rows"]
        return rollout

    def set_advantages(self, rollouts: list[Rollout]) -> None:
        """``rollout.advantages`` from its rewards: per-prompt group or whole-step baseline."""
        cfg = self.config
        if cfg.reward_baseline == "group":
            for r in rollouts:
                r.advantages = group_baseline_advantages(r.rewards, r.reward_mask, cfg.num_generations)  # type: ignore[arg-type]
            return
        advantages = batch_baseline_advantages([r.rewards for r in rollouts], [r.reward_mask for r in rollouts],  # type: ignore[misc]
                                               distributed.all_reduce_sum)
        for r, a in zip(rollouts, advantages, strict=True):
            r.advantages = a

    def term_weights(self, rollout: Rollout) -> dict[str, float]:
        """``divergence`` (α·Σ_i w_i·D_i) and, with the reward term, ``reward_pg`` ((1−α)·pg)."""
        cfg = self.config
        if cfg.alpha < 1.0 and rollout.on_policy and rollout.advantages is not None:
            return {"divergence": cfg.alpha, "reward_pg": 1.0 - cfg.alpha}
        return {"divergence": 1.0}

    def fidelity_fn(self, rollout: Rollout, scored: Any) -> Callable[[torch.Tensor, Any], dict[str, torch.Tensor]]:
        """Per-token on-policy fidelity metrics (:mod:`gkd.fidelity`) of a chunk of student logits; none
        off-policy. Metrics only: no gradient, not in the loss."""
        if not rollout.on_policy:
            return lambda z, rows: {}
        cfg = self.config
        ids = rollout.completion_ids.reshape(-1)
        teacher = flat_positions(scored.teacher_logits)
        tokens = scored.token_logprobs.reshape(-1) if scored.token_logprobs is not None else None

        def fn(z: torch.Tensor, rows: Any) -> dict[str, torch.Tensor]:
            return fidelity_terms(z, ids[rows], teacher[rows] if teacher is not None else None,
                                  tokens[rows] if tokens is not None else None, topk=cfg.fidelity_topk,
                                  teacher_temperature=view_temperature(self.parts, self.loss_temperature))
        return fn

    def loss(self, rollout: Rollout) -> LossOutput:
        """Per token ``α·Σ_i w_i·D_i + (1−α)·(−A·log q_θ(y_t))`` (Algorithm 1, eq. 5)."""
        cfg, parts = self.config, self.parts
        tau = self.loss_temperature
        student, scored = views(parts, rollout, tau)
        with parts.timers("update"):
            b, length = rollout.completion_ids.shape
            ids = rollout.completion_ids.reshape(-1)
            with_reward = cfg.alpha < 1.0 and rollout.on_policy and rollout.advantages is not None
            adv = rollout.advantages[:, None].expand(b, length).reshape(-1) if with_reward else None  # type: ignore[index]
            logit_terms = logit_terms_fn(parts, rollout, scored.teacher_logits, row_temperatures(parts, rollout, tau),
                                         scored.token_logprobs)
            structure, structure_parts = structure_terms(parts, rollout, student, scored, tau)
            alpha = cfg.alpha if with_reward else 1.0
            fidelity = self.fidelity_fn(rollout, scored)

            def fn(z: torch.Tensor, rows: Any) -> dict[str, torch.Tensor]:
                div, terms = logit_terms(z, rows)
                out = {"divergence": div, **fidelity(z, rows)}
                if cfg.objectives:  # each part of the weighted sum logged on its own
                    out.update({f"loss_{label}": value for label, value in terms.items()})
                if adv is None:
                    out["loss"] = div
                    return out
                logq = token_logprobs(z, ids[rows], cfg.temperature)
                pg = policy_gradient_loss(logq[:, None], adv[rows][:, None]).squeeze(-1)
                out.update(loss=alpha * div + (1.0 - alpha) * pg, reward_pg=pg)
                return out

            out = run_per_token(parts, rollout, student, fn, alpha * structure if structure is not None else None)
            if structure is not None:
                out["divergence"] = out["divergence"] + structure.detach()
                out.update({f"loss_{label}": value.detach() for label, value in structure_parts.items()})
            return loss_output(out, student, scored)
