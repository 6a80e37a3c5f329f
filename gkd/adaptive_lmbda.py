"""Adaptive on-policy share (``lmbda_schedule: adaptive``), after DistiLLM's adaptive off-policy approach
(Ko et al., ICML 2024, §3.2): start from the dataset's or the teacher's text, and raise the share of
student-generated data only when a held-out validation loss stops improving.

**The rule (ours, written down).** λ starts at ``lmbda`` (0 for DistiLLM's start: every step off-policy).
Every ``lmbda_check_steps`` optimizer steps, before the next step (and once before the first, which
sets the baseline), the validation loss ``v`` is measured; with ``best`` the lowest value so far::

    if v < best − lmbda_tolerance:   best = v                                   # still improving
    else:                            λ = min(λ + lmbda_step, lmbda_end or 1)    # stalled: more on-policy

λ never goes down. GKD's coin then draws each step on-policy with probability λ, as with a fixed λ.

**The validation loss.** ``KL(p‖q_θ)`` (forward KL, temperature 1, teacher-forced), token mean over the
completions of the first ``lmbda_val_prompts`` held-out prompts (the dataset's validation part:
``validation_size`` rows of a file, builtin:addition's own held-out problems): their reference
completions when every row has one, otherwise the teacher's greedy completions, written once per run
(deterministic, so a resumed run scores the same text). It measures how well the student fits the
teacher on text the student did not write, whatever the training objective is, and the student
cannot lower it by changing what it samples. With ``teacher_topk`` it is the bucketed forward KL
(exact at k = V), as the training loss.

**Agreement and resume.** The loss is summed over all ranks before the rule runs, rank 0's new λ is
broadcast (as GKD's coin), and ``(λ, best, checks)`` is checkpointed and restored, so a resumed run
takes the same decisions (tested bit-exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AdaptiveLambda", "validation_loss", "validation_rollouts"]


@dataclass
class AdaptiveLambda:
    """The state and rule of ``lmbda_schedule: adaptive``: current ``lmbda``, lowest validation loss
    ``best`` so far, ``checks`` made, and ``raised``: whether the last check raised λ."""

    lmbda: float
    step: float
    max_lmbda: float = 1.0
    tolerance: float = 0.0
    best: float = math.inf
    checks: int = 0
    raised: bool = False

    def update(self, validation_loss: float) -> float:
        """One check: keep λ while the loss improves on the best by more than ``tolerance``, else raise it
        by ``step`` (capped at ``max_lmbda``). A non-finite loss counts as no improvement. Returns λ."""
        improved = math.isfinite(validation_loss) and validation_loss < self.best - self.tolerance
        if improved:
            self.best = validation_loss
        else:
            self.lmbda = min(self.lmbda + self.step, self.max_lmbda)
        self.checks += 1
        self.raised = not improved
        return self.lmbda

    def state_dict(self) -> dict[str, Any]:
        return {"lmbda": self.lmbda, "best": self.best, "checks": self.checks, "raised": self.raised}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lmbda, self.best = float(state["lmbda"]), float(state["best"])
        self.checks, self.raised = int(state["checks"]), bool(state["raised"])


@torch.no_grad()
def validation_loss(student: torch.nn.Module, teacher: Any, batches: list[Any], vocab_size: int, *, topk: Any,
                    chunk_size: int, all_reduce_sum: Any) -> float:
    """Token mean of ``KL(p‖q)`` (τ = 1) over the rollouts in ``batches`` (this rank's share), summed over
    ranks by ``all_reduce_sum``; the student and teacher forwards are teacher-forced, no gradient. ``topk``:
    the teacher's k (``teachers:``: a mapping, each teacher's own)."""
    from gkd.losses import distillation_loss_per_token, masked_sum_and_count
    from gkd.scorer import completion_logits, score

    total = torch.zeros(2, dtype=torch.float64)
    for rollout in batches:
        teacher_view = score(teacher, rollout, vocab_size, topk=topk, chunk_size=chunk_size).teacher_logits
        logits = completion_logits(student, rollout, vocab_size)
        kl = distillation_loss_per_token(logits, teacher_view, divergence="forward_kl")
        s, n = masked_sum_and_count(kl, rollout.completion_mask)
        total += torch.stack([s.double().cpu(), n.double().cpu()])
    s, n = all_reduce_sum(total).tolist()
    return s / max(n, 1.0)


@torch.no_grad()
def validation_rollouts(rows: list[dict[str, Any]], tokenizer: Any, teacher: Any, *, batch_size: int,
                        max_prompt_length: int, max_new_tokens: int, device: torch.device,
                        gather_for_generation: bool = True) -> list[Any]:
    """The held-out completions the validation loss is measured on, in batches of ``batch_size``: the
    rows' references when every row has one, else the teacher's greedy completions (a local teacher;
    all ranks step in lockstep under ZeRO-3)."""
    from gkd import distributed
    from gkd.data import PromptDataset, collate, reference_rollout
    from gkd.rollout import SamplingParams, sample
    from gkd.teachers import TeacherRouter

    data = PromptDataset(rows, tokenizer, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens)
    with_refs = all(row.get("completion") is not None for row in rows)
    routed = isinstance(teacher, TeacherRouter) and not teacher.has_remote  # teachers: each row's writes it
    if not with_refs and not (isinstance(teacher, torch.nn.Module) or routed):
        from gkd.errors import InputError

        raise InputError("lmbda_schedule=adaptive: the held-out rows have no reference completions and a served "
                         "teacher cannot write them; give the validation rows completions or use a local teacher")
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(rows)))], tokenizer.pad_token_id)
        if with_refs:
            out.append(reference_rollout(batch).to(device))
            continue

        def greedy(model: torch.nn.Module, part: dict[str, Any]) -> Any:
            with distributed.gathered_for_generation([model] if gather_for_generation else []):
                return sample(model, part["prompt_ids"].to(device), part["prompt_mask"].to(device),
                              SamplingParams(max_new_tokens, do_sample=False), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                              all_ranks_done=distributed.all_ranks_done if distributed.is_distributed() else None)

        rollout = teacher.sample(batch, greedy, tokenizer.pad_token_id) if routed else greedy(teacher, batch)
        rollout.rows = batch["rows"]
        rollout.on_policy = False
        out.append(rollout)
    return out
