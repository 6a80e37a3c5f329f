"""MiniLLM: reverse-KL distillation by policy gradient (Gu et al. 2024).

An iteration::

    buffer = num_rollouts teacher-mixed samples  # y_t ~ p̃ = mix·p + (1−mix)·q_old; log q_old, log p, log p̃ kept
    r_t    = log p(y_t) − log q_old(y_t)         # per-token reward (+ user rewards at the final token)
    A_t    = length-normalised return (eq. 6), whitened over the global buffer
    for ppo_epochs: for each minibatch of the buffer (shuffled):
        optimize: PPO-clipped long-term term (ratio q_θ/p̃) + single-step reverse KL (eq. 5, 7)

Its progress (buffer, epoch, minibatch order, position) is a :class:`MiniLLMBuffer`, checkpointed
per rank, so a run stopped in the middle of a buffer resumes exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gkd import distributed
from gkd.algorithms.base import Algorithm, RunParts
from gkd.algorithms.common import (
    flat_positions,
    logit_terms_fn,
    loss_output,
    row_temperatures,
    run_per_token,
    structure_terms,
    view_settings,
    views,
)
from gkd.errors import ConfigError
from gkd.losses import single_step_reverse_kl, token_logprobs
from gkd.policy_gradient import (
    importance_weights,
    masked_moments,
    minillm_returns,
    minillm_rewards,
    ppo_clipped_loss,
    ppo_clipped_share,
    whiten,
)
from gkd.rewards import score_rollouts
from gkd.rollout import Rollout
from gkd.scorer import completion_logits, score
from gkd.serving.client import RemoteTeacher
from gkd.teachers import TeacherRouter
from gkd.update import LossOutput

__all__ = ["MiniLLM", "MiniLLMBuffer", "draft_metrics", "minillm_advantages"]

BUFFER_FILE = "minillm_buffer"  # per-rank checkpoint file of a buffer in progress


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class MiniLLMBuffer:
    """A rollout buffer in progress: its rollouts, the metrics shared by its steps, the PPO epoch, the
    epoch's minibatch order (``None`` before it is drawn) and the next position in that order."""

    rollouts: list[Rollout]
    shared: dict[str, float]
    epoch: int = 0
    order: list[int] | None = None
    next: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint form (unchanged since the first MiniLLM checkpoints: ``buffer`` holds the rollouts)."""
        return {"buffer": [dataclasses.asdict(r) for r in self.rollouts], "shared": self.shared, "epoch": self.epoch,
                "order": self.order, "next": self.next}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MiniLLMBuffer:
        return cls([Rollout(**r) for r in state["buffer"]], state["shared"], state["epoch"], state["order"],
                   state["next"])


def minillm_advantages(rollouts: list[Rollout], *, alpha: float, reward_scale: float, gamma: float,
                       include_current: bool, length_normalized: bool, whiten_advantages: bool,
                       all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity,
                       reward_clip: float = 0.0) -> tuple[list[torch.Tensor], float]:
    """Per-token advantages ``(B, L)`` of each rollout and the mean token reward of the buffer.

    ``r_t = reward_scale·(log p(y_t) − log q_old(y_t))`` (clipped to ``±reward_clip`` when > 0); the total per-token reward is ``α·r_t`` plus
    ``(1−α)·`` the user reward at the final token (when rewards were scored and α < 1); the advantage
    is its return (MiniLLM eq. 6: length-normalised, discount ``gamma``, ``include_current``),
    whitened over the whole buffer (all ranks when ``all_reduce_sum`` sums over them). The mean of
    ``r_t`` over sampled tokens is minus a (mixture-sampled) reverse-KL estimate."""
    token_reward_sum = torch.zeros(())
    tokens = torch.zeros(())
    advantages = []
    for r in rollouts:
        mask = r.completion_mask
        kl_reward = minillm_rewards(r.teacher_logprobs, r.sampled_logprobs, mask, reward_scale)  # type: ignore[arg-type]
        if reward_clip > 0:
            kl_reward = kl_reward.clamp(-reward_clip, reward_clip)
        token_reward_sum += kl_reward.sum().cpu()
        tokens += mask.sum().cpu()
        total = alpha * kl_reward
        if r.rewards is not None and alpha < 1.0:
            final = torch.zeros_like(total)
            final.scatter_(1, r.last_token_index[:, None], (r.rewards * r.reward_mask)[:, None].float())  # type: ignore[operator]
            total = total + (1.0 - alpha) * final * mask
        advantages.append(minillm_returns(total, mask, gamma=gamma, include_current=include_current,
                                          length_normalized=length_normalized))
    if whiten_advantages:
        moments = all_reduce_sum(sum(masked_moments(a, r.completion_mask).cpu()  # type: ignore[arg-type]
                                     for a, r in zip(advantages, rollouts, strict=True)))
        advantages = [whiten(a, r.completion_mask, moments.to(a.device))
                      for a, r in zip(advantages, rollouts, strict=True)]
    glob = all_reduce_sum(torch.stack([token_reward_sum, tokens]))
    return advantages, float(glob[0] / glob[1].clamp(min=1.0))


def draft_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """Teacher-mixed sampling over a buffer, all ranks: the share of drafts accepted, and the tokens
    a live sequence commits per teacher pass (1 to ``mix_draft_tokens``)."""
    stats = [r.draft_stats for r in rollouts if r.draft_stats is not None]
    if not stats:
        return {}
    totals = distributed.all_reduce_sum(torch.tensor(
        [sum(s[0] for s in stats), sum(s[1] for s in stats), sum(s[2] for s in stats),
         float(sum(r.completion_mask.sum() for r in rollouts))], dtype=torch.float64))
    accepted, rejected, row_rounds, tokens = totals.tolist()
    return {"mix_draft_accept": accepted / max(accepted + rejected, 1.0),
            "mix_tokens_per_teacher_pass": tokens / max(row_rounds, 1.0)}


class MiniLLM(Algorithm):
    """Teacher mix ``teacher_mix``, ``num_rollouts`` per buffer, ``ppo_epochs`` passes, clip ``clip_eps``,
    return options (``gamma``, ``include_current_reward``, ``length_normalization``, ``whiten_advantages``),
    single-step term (``single_step_coef``, ``single_step_weighted``), LM loss (``lm_coef``)."""

    name = "minillm"
    title = "MiniLLM (Gu et al. 2024)"
    state_files = (BUFFER_FILE,)

    def __init__(self, parts: RunParts) -> None:
        super().__init__(parts)
        self.ppo_generator = torch.Generator().manual_seed(self.config.seed + 7)
        self.buffer: MiniLLMBuffer | None = None

    @classmethod
    def check(cls, config: Any, num_processes: int) -> None:
        per_step = config.per_device_batch_size * config.gradient_accumulation_steps * num_processes
        if config.num_rollouts % per_step:
            raise ConfigError(
                f"num_rollouts={config.num_rollouts} must be a multiple of per_device_batch_size × "
                f"gradient_accumulation_steps × processes = {config.per_device_batch_size} × "
                f"{config.gradient_accumulation_steps} × {num_processes} = {per_step}"
            )

    def settings(self) -> str:
        cfg = self.config
        return f"teacher_mix={cfg.teacher_mix}, ppo_epochs={cfg.ppo_epochs}, num_rollouts={cfg.num_rollouts}"

    def generators(self) -> dict[str, torch.Generator]:
        return {"ppo": self.ppo_generator}

    def state_dict(self) -> dict[str, Any]:
        return {BUFFER_FILE: self.buffer.to_dict()} if self.buffer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if BUFFER_FILE in state:
            self.buffer = MiniLLMBuffer.from_dict(state[BUFFER_FILE])

    def fill_buffer(self, n_micro: int) -> MiniLLMBuffer:
        """Teacher-mixed samples for ``n_micro`` micro-batches, their rewards and advantages."""
        cfg, parts = self.config, self.parts
        with parts.timers("rollout"):
            rollouts = []
            for _ in range(n_micro):
                batch = next(parts.batches)
                if cfg.teacher_mix == 0:  # p̃ = q: the student samples, the teacher scores (the only way when served)
                    rollout = self.scored_rollout(parts.sampler.sample(batch, parts.unwrapped))
                else:
                    rollout = parts.sampler.sample(batch, parts.unwrapped, teacher=parts.teacher,
                                                   teacher_mix=cfg.teacher_mix, draft_tokens=cfg.mix_draft_tokens)
                rollout.rows = batch["rows"]
                rollouts.append(rollout)
        with parts.timers("reward"):
            shared = score_rollouts(parts.rewards, parts.tokenizer, rollouts) if parts.rewards else {}
            advantages, token_reward_mean = minillm_advantages(
                rollouts, alpha=cfg.alpha, reward_scale=cfg.reward_scale, gamma=cfg.gamma,
                include_current=cfg.include_current_reward, length_normalized=cfg.length_normalization,
                whiten_advantages=cfg.whiten_advantages, all_reduce_sum=distributed.all_reduce_sum,
                reward_clip=cfg.reward_clip)
            for r, a in zip(rollouts, advantages, strict=True):
                r.advantages = a
            shared["token_reward_mean"] = token_reward_mean
            shared.update(draft_metrics(rollouts))
            shared.update(self.sample_stats(rollouts))
        return MiniLLMBuffer(rollouts, shared)

    @torch.no_grad()
    def scored_rollout(self, rollout: Rollout) -> Rollout:
        """A plain student sample with what teacher-mixed sampling at ``teacher_mix: 0`` stores (the same
        draws, one teacher pass instead of one per round): ``log p(y_t)`` of the unprocessed teacher
        (from the server with a served teacher, whose top-k view is kept for the loss), ``log p̃ = log q``
        of the processed distribution sampled, and ``log q_old`` at the sampling temperature without
        top-k / top-p (a student forward, only when those are set)."""
        cfg, parts = self.config, self.parts
        mask = rollout.completion_mask
        router = parts.teacher if isinstance(parts.teacher, TeacherRouter) else None
        if isinstance(parts.teacher, RemoteTeacher) or (router is not None and router.has_remote):
            tau = self.loss_temperature
            topk, own_tau = view_settings(parts, tau)
            scored = score(parts.teacher, rollout, parts.vocab_size, topk=topk, temperature=own_tau)
            teacher_logprobs = scored.token_logprobs
            rollout.teacher_cache = (tau, scored.teacher_logits)
        else:  # each row's own teacher under teachers:
            logits = (router.logits(rollout, parts.vocab_size) if router is not None else
                      completion_logits(parts.teacher, rollout, parts.vocab_size))
            teacher_logprobs = token_logprobs(logits, rollout.completion_ids)
            del logits
        rollout.teacher_logprobs = teacher_logprobs * mask  # type: ignore[operator]
        rollout.mixed_logprobs = rollout.sampled_logprobs
        if cfg.top_k > 0 or cfg.top_p < 1.0:
            logits = completion_logits(parts.unwrapped, rollout, parts.vocab_size)
            rollout.sampled_logprobs = token_logprobs(logits, rollout.completion_ids, cfg.temperature) * mask
        return rollout

    def steps(self) -> Iterator[dict[str, float]]:
        """One buffer: fill it (unless resuming one), then ``ppo_epochs`` passes of minibatch updates."""
        cfg = self.config
        n_micro = cfg.num_rollouts // (cfg.per_device_batch_size * self.parts.accelerator.num_processes)
        if self.buffer is None:
            self.buffer = self.fill_buffer(n_micro)
        state = self.buffer
        while state.epoch < cfg.ppo_epochs:
            if state.order is None:
                state.order, state.next = torch.randperm(n_micro, generator=self.ppo_generator).tolist(), 0
            while state.next < n_micro:
                idx = state.order[state.next : state.next + cfg.gradient_accumulation_steps]
                state.next += cfg.gradient_accumulation_steps
                metrics = self.optimize([state.rollouts[i] for i in idx])
                metrics.update(state.shared, on_policy=1, ppo_epoch=state.epoch)
                self.maybe_log_samples(state.rollouts[idx[0]])
                if state.next >= n_micro:  # this was the epoch's last minibatch
                    state.epoch, state.order = state.epoch + 1, None
                    if state.epoch == cfg.ppo_epochs:
                        self.buffer = None
                yield metrics
                if self.buffer is None:
                    return

    def term_weights(self, rollout: Rollout) -> dict[str, float]:
        """``pg`` (the PPO-clipped long-term term, weight 1) and ``single_step`` (α × single_step_coef)."""
        return {"pg": 1.0, "single_step": self.config.alpha * self.config.single_step_coef}

    def loss(self, rollout: Rollout) -> LossOutput:
        """Per token: PPO-clipped long-term term + α·single-step reverse KL (eq. 7), plus any extra
        weighted ``objectives``."""
        cfg, parts = self.config, self.parts
        tau = self.loss_temperature
        student, scored = views(parts, rollout, tau, cache=True)
        with parts.timers("update"):
            ids = rollout.completion_ids.reshape(-1)
            mixed, sampled = rollout.mixed_logprobs.reshape(-1), rollout.sampled_logprobs.reshape(-1)  # type: ignore[union-attr]
            adv = rollout.advantages.reshape(-1)  # type: ignore[union-attr]
            teacher = scored.teacher_logits
            flat_teacher = flat_positions(teacher)
            assert flat_teacher is not None  # MiniLLM always has a teacher
            row_tau = row_temperatures(parts, rollout, tau)  # teachers: each row's own τ
            flat_tau = row_tau.reshape(-1) if isinstance(row_tau, torch.Tensor) else None
            logit_terms = logit_terms_fn(parts, rollout, teacher, row_tau, scored.token_logprobs) if cfg.objectives \
                else None
            structure, structure_parts = structure_terms(parts, rollout, student, scored, tau)

            def fn(z: torch.Tensor, rows: Any) -> dict[str, torch.Tensor]:
                logq = token_logprobs(z, ids[rows], cfg.temperature)
                pg = ppo_clipped_loss(logq, mixed[rows], adv[rows], cfg.clip_eps)
                weights = importance_weights(sampled[rows], mixed[rows]) if cfg.single_step_weighted else None
                single = single_step_reverse_kl(z, flat_teacher[rows], weights=weights,
                                                temperature=flat_tau[rows].to(z.device) if flat_tau is not None else tau)
                ratio = torch.exp(logq.detach() - sampled[rows])
                out = {"loss": pg + cfg.alpha * cfg.single_step_coef * single, "pg": pg, "single_step": single,
                       "ratio": ratio, "clip_frac": ppo_clipped_share(logq, mixed[rows], adv[rows], cfg.clip_eps)}
                if logit_terms is not None:  # extra weighted objectives ride along with MiniLLM's own loss
                    extra, terms = logit_terms(z, rows)
                    out["loss"] = out["loss"] + extra
                    out.update({f"loss_{label}": value for label, value in terms.items()})
                return out

            out = run_per_token(parts, rollout, student, fn, structure)
            out.update({f"loss_{label}": value.detach() for label, value in structure_parts.items()})
            return loss_output(out, student, scored)
