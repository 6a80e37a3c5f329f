"""The interface every algorithm implements, and the parts of a run it works with.

An algorithm decides where a step's completions come from and what loss they get; everything else
(sampling backends, the optimizer step, logging, checkpoints) is a shared part it is handed. The
trainer's loop only calls :meth:`Algorithm.steps` and logs what each optimizer step returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gkd import distributed
from gkd.data import BatchStream, reference_rollout
from gkd.evaluate import sequence_stats
from gkd.losses import kd_per_token
from gkd.objectives import ObjectiveSetup, temperature_at
from gkd.reporting import Reporter, Timers
from gkd.rewards import RewardFunctions
from gkd.rollout import Rollout
from gkd.sampling import RolloutSampler
from gkd.scorer import completion_logits, score
from gkd.teachers import TeacherRouter
from gkd.update import LossOutput, Updater

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gkd.config import GKDConfig

__all__ = ["Algorithm", "RunParts"]


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


@dataclass
class RunParts:
    """What an algorithm works with; built once by :class:`gkd.trainer.GKDTrainer`."""

    config: GKDConfig
    accelerator: Accelerator
    tokenizer: Any
    student: Any  # prepared by accelerate (DDP / DeepSpeed engine); ``unwrapped`` for sampling
    unwrapped: torch.nn.Module
    teacher: Any  # nn.Module (frozen, eval mode; ZeRO-3-sharded under stage 3), a served teacher's client, a
    # gkd.teachers.TeacherRouter (teachers: rows routed to their own teacher) or None (pure SFT)
    objectives: ObjectiveSetup
    sampler: RolloutSampler
    updater: Updater
    rewards: RewardFunctions
    batches: BatchStream
    lm_batches: BatchStream | None  # lm_dataset (lm_coef > 0)
    timers: Timers
    reporter: Reporter
    teacher_cache: Any = None  # gkd.serving.cache.TeacherCache: the teacher's view of reference rows (teacher_cache)
    validation_rows: list[dict[str, Any]] | None = None  # this rank's held-out rows (lmbda_schedule: adaptive)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


class Algorithm(ABC):
    """One training algorithm. Subclasses set :attr:`name` (the config's ``algorithm`` value) and
    :attr:`title`, and implement :meth:`steps` and :meth:`loss`; state that must survive a resume
    goes through :meth:`generators` and :meth:`state_dict` / :meth:`load_state_dict`."""

    name: ClassVar[str]
    title: ClassVar[str]  # name and paper, for the model card

    def __init__(self, parts: RunParts) -> None:
        self.parts, self.config = parts, parts.config

    @classmethod  # noqa: B027 - an optional hook
    def check(cls, config: GKDConfig, num_processes: int) -> None:
        """Raise :class:`gkd.errors.ConfigError` for settings this algorithm cannot run with."""

    @classmethod  # noqa: B027 - an optional hook
    def check_rows(cls, config: GKDConfig, rows: list[dict[str, Any]]) -> None:
        """Raise :class:`gkd.errors.InputError` (naming the row) for training rows this run cannot use."""

    @abstractmethod
    def steps(self) -> Iterator[dict[str, float]]:
        """Optimizer steps: one metrics dict each (``Updater.optimize``'s plus the algorithm's own).
        The trainer draws from it until ``max_steps``; a finished iterator is started again."""

    @abstractmethod
    def loss(self, rollout: Rollout) -> LossOutput:
        """The per-token loss of one micro-batch (``terms["loss"]``) and what to log beside it."""

    def term_weights(self, rollout: Rollout) -> dict[str, float]:
        """The per-token terms of :meth:`loss` by name, with the weight each enters ``terms["loss"]``
        with (``term_grad_norm_steps``: each term's gradient norm is logged on its own)."""
        return {}

    def settings(self) -> str:
        """The algorithm's main knobs, one line, for the model card."""
        return ""

    def generators(self) -> dict[str, torch.Generator]:
        """The algorithm's own random streams by name (checkpointed per rank)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Per-rank state in progress that a checkpoint must hold, by file name (empty: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned (only the files a checkpoint holds)."""

    state_files: ClassVar[tuple[str, ...]] = ()  # the names :meth:`state_dict` can return

    # --- shared by the algorithms -------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.parts.updater.step

    @property
    def loss_temperature(self) -> float:
        """τ of the current step under ``loss_temperature_schedule``."""
        cfg = self.config
        return temperature_at(self.step, cfg.max_steps, cfg.loss_temperature, cfg.loss_temperature_end,
                              cfg.loss_temperature_schedule)

    def optimize(self, rollouts: list[Rollout]) -> dict[str, float]:
        """One optimizer step on ``rollouts`` with :meth:`loss` (plus ``lm_coef`` × the LM loss on as
        many ``lm_dataset`` batches)."""
        lm = self.parts.lm_batches
        lm_rollouts = [reference_rollout(next(lm)) for _ in rollouts] if lm is not None else None
        router = self.parts.teacher if isinstance(self.parts.teacher, TeacherRouter) else None
        loss_fn = self.loss
        losses: dict[int, torch.Tensor] = {}
        if router is not None:  # keep each micro-batch's per-token loss for loss/<teacher>
            def loss_fn(rollout: Rollout) -> LossOutput:
                out = self.loss(rollout)
                losses[id(rollout)] = out.terms["loss"].detach()
                return out
        # τ of this step, read before the step count advances
        metrics = self.parts.updater.optimize(rollouts, loss_fn, lm_rollouts, self.lm_loss,
                                              logged={"loss_temperature": self.loss_temperature},
                                              term_weights=self.term_weights)
        if router is not None:
            metrics.update(router.step_metrics(rollouts, [losses.get(id(r)) for r in rollouts], self.config.reduction))
        return metrics

    def lm_loss(self, rollout: Rollout) -> torch.Tensor:
        """Per-token loss on an LM-dataset batch (MiniLLM's language-modelling loss L_PT): cross-entropy,
        or with ``lm_kd_weight = w`` ``(1−w)·CE + w·KL(teacher‖student)`` (classic KD on that data)."""
        logits = completion_logits(self.parts.student, rollout, self.parts.vocab_size)
        w = self.config.lm_kd_weight
        if w == 0 or self.parts.teacher is None:
            return kd_per_token(logits, None, rollout.completion_ids, kd_weight=0.0)
        with torch.no_grad():
            teacher = score(self.parts.teacher, rollout, self.parts.vocab_size).teacher_logits
        return kd_per_token(logits, teacher, rollout.completion_ids, kd_weight=w)

    def sample_stats(self, rollouts: list[Rollout]) -> dict[str, float]:
        """Collapse signs of the student's samples of a step, over all ranks (:func:`gkd.evaluate.sequence_stats`):
        ``sample_distinct_2``, ``sample_repeat_4``, ``sample_no_eos`` (share that hit max_new_tokens)."""
        ids = [r.completion_ids[i][r.completion_mask[i]].tolist() for r in rollouts for i in range(r.completion_ids.shape[0])]
        st = sequence_stats(ids, self.parts.tokenizer.eos_token_id)
        d, rep, e, n = distributed.all_reduce_sum(torch.tensor(
            [st["distinct_2"], st["repeat_4"], st["no_eos"], st["n"]], dtype=torch.float64)).tolist()
        n = max(n, 1.0)
        return {"sample_distinct_2": d / n, "sample_repeat_4": rep / n, "sample_no_eos": e / n}

    def maybe_log_samples(self, rollout: Rollout) -> None:
        cfg, parts = self.config, self.parts
        every = cfg.log_samples_steps
        if (every > 0 and self.step % every == 0) or (every < 0 and _power_of_ten(self.step)):
            parts.reporter.log_samples(self.step, rollout, parts.tokenizer, parts.teacher)
