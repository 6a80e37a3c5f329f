"""One optimizer step over a step's rollouts, shared by every algorithm.

The reduction is the global token mean (docs/design.md, "Normalisation"): every per-token term is
summed per micro-batch and divided by ``N``, the number of completion tokens of the whole step (all
micro-batches, all ranks). accelerate divides the loss by the accumulation steps and DDP / DeepSpeed
average gradients over ranks, so backward runs on ``loss_sum / N × gas × world``: the gradient is
exactly ``d(global sum / N)/dθ``, whatever the micro-batches' lengths.

A non-finite objective on any rank makes every rank skip that micro-batch's backward (DeepSpeed,
which counts micro-steps in backward, gets a zero gradient instead) and the optimizer step;
``max_consecutive_skips`` skipped steps in a row stop the run with :class:`gkd.errors.NonFiniteError`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gkd import distributed
from gkd.checkpoint import complete_checkpoints
from gkd.errors import NonFiniteError
from gkd.losses import masked_sum_and_count
from gkd.reporting import Timers
from gkd.rollout import Rollout

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gkd.config import GKDConfig

__all__ = ["LossOutput", "Updater", "diagnose_non_finite", "global_token_count"]

logger = logging.getLogger("gkd")


@dataclass
class LossOutput:
    """An algorithm's loss on one micro-batch.

    ``terms``: per-token ``(B, L)`` values by name; ``"loss"`` is the objective, the rest are logged.
    ``chunked_sum``: the objective's masked, reduction-weighted sum when the chunked path formed its
    gradient in forward (:func:`gkd.chunked.chunked_loss`), else ``None``. ``student_view`` /
    ``teacher_view``: the inputs of the loss (logits or the LM head's input; teacher logits or top-k
    log-probs), for the non-finite diagnosis and DeepSpeed's zero gradient."""

    terms: dict[str, torch.Tensor]
    chunked_sum: torch.Tensor | None
    student_view: torch.Tensor
    teacher_view: torch.Tensor | None


def global_token_count(rollouts: list[Rollout], reduction: str) -> torch.Tensor:
    """``N``: the step's completion tokens (or sequences, ``sequence_mean``) over all micro-batches and ranks."""
    counts = [masked_sum_and_count(torch.zeros(r.completion_mask.shape), r.completion_mask.cpu(), reduction)[1]
              for r in rollouts]
    return distributed.all_reduce_sum(torch.stack(counts).sum()).clamp(min=1.0)


def diagnose_non_finite(student_view: torch.Tensor, teacher_view: torch.Tensor | None,
                        rollout: Rollout | None = None) -> str:
    """Which input made the loss non-finite (checked only after it happened): the log-probs stored at
    sampling time and the advantages made from them, the teacher's view, the student's."""
    if rollout is not None:
        mask = rollout.completion_mask
        for stored in (rollout.sampled_logprobs, rollout.mixed_logprobs, rollout.teacher_logprobs, rollout.advantages):
            if stored is not None and stored.shape == mask.shape and not bool(torch.isfinite(stored[mask]).all()):
                return "sampled log-probs"
    if teacher_view is not None and not bool(torch.isfinite(teacher_view).all()):
        return "teacher logits"
    if not bool(torch.isfinite(student_view).all()):
        return "student logits"
    return "loss"


class Updater:
    """Backward, clipping, the optimizer and scheduler step, and the count of steps taken and skipped."""

    def __init__(self, cfg: GKDConfig, acc: Accelerator, model: Any, optimizer: Any, scheduler: Any,
                 timers: Timers, output_dir: Path) -> None:
        self.cfg, self.acc, self.model, self.optimizer, self.scheduler = cfg, acc, model, optimizer, scheduler
        self.timers, self.output_dir = timers, output_dir
        self.step = 0  # optimizer steps taken (skipped ones included)
        self.consecutive_skips = self.skipped_steps = 0
        self.applied = 0  # steps of this process's run that changed the weights
        self.last_cause: str | None = None

    def optimize(self, rollouts: list[Rollout], loss_fn: Callable[[Rollout], LossOutput],
                 lm_rollouts: list[Rollout] | None = None,
                 lm_loss: Callable[[Rollout], torch.Tensor] | None = None,
                 logged: dict[str, float] | None = None,
                 term_weights: Callable[[Rollout], dict[str, float]] | None = None) -> dict[str, float]:
        """One optimizer step over ``rollouts`` (one per accumulation micro-batch); ``lm_rollouts`` (one
        per micro-batch) add ``lm_coef × lm_loss`` normalised by their own global token count.
        ``logged``: values of this step to log with its metrics (e.g. ``loss_temperature``).
        ``term_weights``: the loss's terms and weights, for ``term_grad_norm_steps``."""
        cfg, acc = self.cfg, self.acc
        every = cfg.term_grad_norm_steps
        if every > 0 and (self.step + 1) % every == 0 and term_weights is not None:
            logged = {**(logged or {}), **self.term_grad_norms(
                rollouts[0], loss_fn, term_weights(rollouts[0]),
                lm_rollouts[0] if lm_rollouts is not None else None, lm_loss)}
        norm = global_token_count(rollouts, cfg.reduction)
        if lm_rollouts is not None:
            lm_norm = global_token_count(lm_rollouts, cfg.reduction)
        scale = cfg.gradient_accumulation_steps * acc.num_processes
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=acc.device))
        grad_norm, cause = None, None
        deepspeed = distributed.zero_stage(acc) > 0
        for i, rollout in enumerate(rollouts):
            with acc.accumulate(self.model):
                out = loss_fn(rollout)
                with self.timers("update"):
                    objective = torch.zeros((), device=acc.device)
                    for name, per_token in out.terms.items():
                        total, _ = masked_sum_and_count(per_token, rollout.completion_mask, cfg.reduction)
                        sums[name] += total.detach()
                        if name == "loss":
                            total = out.chunked_sum if out.chunked_sum is not None else total
                            objective = total / norm.to(total.device)
                    if lm_rollouts is not None:
                        assert lm_loss is not None
                        lm_total, _ = masked_sum_and_count(lm_loss(lm_rollouts[i]), lm_rollouts[i].completion_mask,
                                                           cfg.reduction)
                        sums["lm"] += lm_total.detach() * norm.to(lm_total.device) / lm_norm.to(lm_total.device)
                        objective = objective + cfg.lm_coef * lm_total / lm_norm.to(lm_total.device)
                    # non-finite values: every rank skips this micro-batch's backward together
                    if distributed.any_rank(not bool(torch.isfinite(objective))):
                        cause = cause or diagnose_non_finite(out.student_view, out.teacher_view, rollout)
                        if deepspeed:  # DeepSpeed counts micro-steps in backward: send a zero gradient
                            acc.backward(torch.nan_to_num(out.student_view.float()).sum() * 0.0)
                    else:
                        acc.backward(objective * scale)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        if grad_norm is not None and not math.isfinite(float(grad_norm)) and cause is None:
                            cause = "gradients"
                    if acc.sync_gradients and cause is None:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        if cause is None:
            self.scheduler.step()
        self.step += 1
        names = sorted(sums)
        glob = distributed.all_reduce_sum(torch.stack([sums[n] for n in names]).float().cpu()) / norm.cpu()
        metrics = {n: float(v) for n, v in zip(names, glob, strict=True)}
        if lm_rollouts is not None:
            metrics["loss"] += cfg.lm_coef * metrics["lm"]
        tokens = distributed.all_reduce_sum(torch.tensor(float(sum(r.num_tokens for r in rollouts))))
        seqs = distributed.all_reduce_sum(torch.tensor(float(sum(r.completion_ids.shape[0] for r in rollouts))))
        metrics.update(step=self.step, lr=float(lr), completion_len_mean=float(tokens / seqs.clamp(min=1)),
                       tokens=float(tokens), **(logged or {}))
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self._count_skips(cause, metrics)
        return metrics

    def term_grad_norms(self, rollout: Rollout, loss_fn: Callable[[Rollout], LossOutput], weights: dict[str, float],
                        lm_rollout: Rollout | None = None,
                        lm_loss: Callable[[Rollout], torch.Tensor] | None = None) -> dict[str, float]:
        """``grad_norm_<term>``: ‖d(weight × token mean of the term over ``rollout``)/dθ‖ for each term
        of the loss on its own (``grad_norm_loss``: their sum; ``grad_norm_lm``: ``lm_coef`` × the LM
        loss), from this process's micro-batch, before the step. Runs the loss unchunked (the chunked
        path forms only the sum's gradient) outside the step: no gradient is kept, and the random
        streams are restored, so training is unchanged."""
        cfg, acc = self.cfg, self.acc
        if distributed.zero_stage(acc) > 0 or cfg.fused_lm_head:
            if not getattr(self, "_warned_term_norms", False):
                logger.warning("term_grad_norm_steps: per-term gradient norms are not computed under DeepSpeed or "
                               "with fused_lm_head (parameters sharded / logits never materialised)")
                self._warned_term_norms = True
            return {}
        params = [p for p in self.model.parameters() if p.requires_grad]
        cuda = [acc.device] if acc.device.type == "cuda" else []
        chunk = cfg.loss_chunk_size
        result: dict[str, float] = {}

        def norm_of(value: torch.Tensor) -> float:
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))

        with torch.random.fork_rng(devices=cuda), acc.no_sync(self.model):
            try:
                cfg.loss_chunk_size = 0
                out = loss_fn(rollout)
            finally:
                cfg.loss_chunk_size = chunk
            count = masked_sum_and_count(out.terms["loss"], rollout.completion_mask, cfg.reduction)[1].clamp(min=1.0)
            for name, weight in {**weights, "loss": 1.0}.items():
                term = out.terms.get(name)
                if term is None or not term.requires_grad:
                    continue
                total = masked_sum_and_count(term, rollout.completion_mask, cfg.reduction)[0]
                result[f"grad_norm_{name}"] = norm_of(weight * total / count.to(total.device))
            if lm_rollout is not None and lm_loss is not None:
                total, n = masked_sum_and_count(lm_loss(lm_rollout), lm_rollout.completion_mask, cfg.reduction)
                result["grad_norm_lm"] = norm_of(cfg.lm_coef * total / n.clamp(min=1.0))
        return result

    def _count_skips(self, cause: str | None, metrics: dict[str, float]) -> None:
        """Skipped steps are counted; ``max_consecutive_skips`` in a row stop the run."""
        cfg = self.cfg
        if cause is None:
            self.consecutive_skips = 0
            self.applied += 1
        else:
            self.last_cause = cause
            self.consecutive_skips += 1
            self.skipped_steps += 1
            logger.warning("step %d skipped: non-finite %s (%d in a row)", self.step, cause, self.consecutive_skips)
        metrics["skipped"] = int(cause is not None)
        metrics["skipped_total"] = self.skipped_steps
        if cause is not None and 0 < cfg.max_consecutive_skips <= self.consecutive_skips:
            raise self.failure()

    def failure(self) -> NonFiniteError:
        """The error of a run stopped by skipped steps (or that applied no update at all)."""
        saved = complete_checkpoints(self.output_dir)
        return NonFiniteError(self.step, self.last_cause or "loss", self.consecutive_skips, saved[-1] if saved else None)
