"""What both algorithms' losses share: the teacher's and the student's views of a rollout, the
weighted objective list, and a per-token function applied over every completion position (whole,
or a chunk at a time with the gradient formed in forward)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gkd.algorithms.base import RunParts
from gkd.chunked import ChunkFn, chunked_loss, token_weights
from gkd.losses import TeacherTopK, Temperature
from gkd.objectives import PROJECTION_ATTR, objective_terms
from gkd.rollout import Rollout
from gkd.sampled_token import teacher_token_logprobs
from gkd.scorer import CompletionOutputs, ScoredRollout, completion_outputs, lm_head, score
from gkd.serving.client import RemoteTeacher
from gkd.update import LossOutput

__all__ = ["PerTokenFn", "any_topk", "flat_positions", "logit_terms_fn", "loss_output", "objective_defaults",
           "row_temperatures", "run_per_token", "structure_terms", "view_settings", "view_temperature", "views"]

#: ``(chunk of student logits (n, V), rows) → (Σ w_i·objective_i, {label: objective_i})``, per token.
PerTokenFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def teacher_view(parts: RunParts, rollout: Rollout, temperature: float, cache: bool = False) -> ScoredRollout:
    """The teacher's view of a rollout (scorer, no grad): full logits or top-k, plus hidden states /
    attentions for those objectives. With ``cache`` (MiniLLM's buffer, scored by every PPO epoch) the
    top-k scores are computed once per rollout and reused while τ is unchanged. With ``teacher_cache``,
    the dataset's reference rows are read from the cache written by ``gkd cache-teacher``. When an
    objective needs only the teacher's log-prob of each token (``sampled_reverse_kl``), ``token_logprobs``
    is filled, from the rollout when its sampler stored it (SKD; no teacher pass at all then if no
    other objective needs the teacher), and a served teacher is asked for k = 1 only."""
    obj = parts.objectives
    if obj.needs_token_logprobs and not _needs_distribution(parts) and rollout.teacher_logprobs is not None:
        return ScoredRollout(rollout=rollout, teacher_logits=None, token_logprobs=rollout.teacher_logprobs)
    scored = _teacher_scores(parts, rollout, temperature, cache)
    if obj.needs_token_logprobs:
        scored.token_logprobs = teacher_token_logprobs(rollout.teacher_logprobs, scored.token_logprobs)
    return scored


def _needs_distribution(parts: RunParts) -> bool:
    """More of the teacher than log p(y_t) is read: by an objective, or by MiniLLM's single-step term."""
    return parts.objectives.needs_teacher_distribution or parts.config.algorithm == "minillm"


def _teacher_scores(parts: RunParts, rollout: Rollout, temperature: float, cache: bool) -> ScoredRollout:
    cfg, obj = parts.config, parts.objectives
    cache_file = parts.teacher_cache
    if cache_file is not None and rollout.is_reference and temperature == cache_file.manifest["temperature"]:
        names = None  # several teachers: each row's scores are its own teacher's
        if getattr(parts.teacher, "routes_rows", False):
            names = parts.teacher.row_names(rollout.rows, rollout.completion_ids.shape[0])
        return ScoredRollout(rollout=rollout, teacher_logits=cache_file.lookup(rollout, names))  # gkd cache-teacher
    cacheable = any_topk(parts) and not obj.hidden_layers[1] and not obj.attention_layers[1]
    if cacheable and rollout.teacher_cache is not None and rollout.teacher_cache[0] == temperature:
        return ScoredRollout(rollout=rollout, teacher_logits=rollout.teacher_cache[1])
    topk, tau = view_settings(parts, temperature)
    if not _needs_distribution(parts) and isinstance(parts.teacher, RemoteTeacher):
        topk, tau = 0, 1.0  # only log p(y_t) (unprocessed): the server sends k = 1, no top-k transfer
    scored = score(parts.teacher, rollout, parts.vocab_size, hidden_layers=obj.hidden_layers[1],
                   attention_layers=obj.attention_layers[1], topk=topk, temperature=tau,
                   chunk_size=cfg.loss_chunk_size,
                   with_token_logprobs=obj.needs_token_logprobs and rollout.teacher_logprobs is None)
    if cacheable and cache and isinstance(scored.teacher_logits, TeacherTopK) and _all_topk(parts):
        rollout.teacher_cache = (temperature, scored.teacher_logits)  # (not k = V views of a full-vocabulary teacher)
    return scored


def _router(parts: RunParts) -> Any:
    """The run's :class:`gkd.teachers.TeacherRouter` (``teachers:``), or None for one teacher."""
    return parts.teacher if getattr(parts.teacher, "routes_rows", False) else None


def any_topk(parts: RunParts) -> bool:
    """The teacher's training view is top-k (``teacher_topk``; with ``teachers:``, some teacher's ``topk``)."""
    router = _router(parts)
    return router.any_topk if router is not None and router.topk is not None else parts.config.teacher_topk > 0


def _all_topk(parts: RunParts) -> bool:
    """Every teacher's training view is top-k (none at full vocabulary)."""
    router = _router(parts)
    if router is not None and router.topk is not None:
        return all(k > 0 for k in router.topk.values())
    return parts.config.teacher_topk > 0


def view_settings(parts: RunParts, temperature: float) -> tuple[Any, Any]:
    """``(topk, temperature)`` the teacher's training view is scored with: ``teacher_topk`` and this step's
    loss τ; with ``teachers:``, each teacher's own ``topk`` / ``temperature`` (mappings by name)."""
    router = _router(parts)
    if router is not None:
        return router.view_settings(parts.config.teacher_topk, temperature)
    return parts.config.teacher_topk, temperature


def row_temperatures(parts: RunParts, rollout: Rollout, temperature: float) -> Temperature:
    """The loss τ of the rollout's positions: this step's ``temperature``, or with ``teachers:`` entries
    that set their own, a ``(B, L)`` tensor (each row at its teacher's τ)."""
    router = _router(parts)
    return router.row_temperatures(rollout, temperature) if router is not None else temperature


def view_temperature(parts: RunParts, temperature: float) -> float:
    """The one τ of the teacher's top-k views (fidelity metrics need 1): this step's ``temperature``, the
    teachers' common one, or NaN when the teachers' own temperatures differ."""
    router = _router(parts)
    if router is None or router.temperature is None:
        return temperature
    values = set(router.temperature.values())
    return values.pop() if len(values) == 1 else float("nan")


def views(parts: RunParts, rollout: Rollout, temperature: float, cache: bool = False,
          ) -> tuple[CompletionOutputs, ScoredRollout]:
    """Student view (with grad) and teacher view (no grad) of the completion positions: logits (or,
    with ``fused_lm_head``, the LM head's input), plus hidden states / attention maps when an
    objective needs them."""
    with parts.timers("score"):
        scored = teacher_view(parts, rollout, temperature, cache)
    with parts.timers("update"):
        student = completion_outputs(parts.student, rollout, parts.vocab_size,
                                     hidden_layers=parts.objectives.hidden_layers[0],
                                     attention_layers=parts.objectives.attention_layers[0],
                                     final_hidden=parts.config.fused_lm_head)
    return student, scored


def loss_output(terms: dict[str, torch.Tensor], student: CompletionOutputs, scored: ScoredRollout) -> LossOutput:
    """Package per-token ``terms`` (``"_sum"``: the chunked path's scalar) with the loss's inputs."""
    chunked_sum = terms.pop("_sum", None)
    teacher = scored.teacher_logits
    return LossOutput(
        terms=terms, chunked_sum=chunked_sum,
        student_view=student.logits if student.logits is not None else student.final_hidden,  # type: ignore[arg-type]
        teacher_view=teacher.logprobs if isinstance(teacher, TeacherTopK) else teacher,
    )


def flat_positions(teacher: torch.Tensor | TeacherTopK | None) -> torch.Tensor | TeacherTopK | None:
    """Teacher view ``(B, L, …)`` → one row per completion position, indexable by chunk rows."""
    if teacher is None:
        return None
    return teacher.flatten_positions() if isinstance(teacher, TeacherTopK) else teacher.reshape(-1, teacher.shape[-1])


def objective_defaults(parts: RunParts) -> dict[str, float]:
    """The flat config values an objective's own parameters override."""
    cfg = parts.config
    return {"beta": cfg.beta, "skew": cfg.skew, "kd_weight": cfg.kd_weight, "dkd_alpha": cfg.dkd_alpha,
            "dkd_beta": cfg.dkd_beta, "sample_temperature": cfg.temperature}


def run_per_token(parts: RunParts, rollout: Rollout, student: CompletionOutputs, fn: ChunkFn,
                  extra_loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Apply the per-token function ``fn`` at every completion position: all at once with plain
    autograd (``loss_chunk_size: 0``), or a chunk at a time with the gradient formed in forward
    (:func:`gkd.chunked.chunked_loss`; the scalar comes back as ``"_sum"``). ``extra_loss`` (per
    token, hidden-state / attention objectives) is added to ``"loss"``."""
    cfg = parts.config
    b, length = rollout.completion_ids.shape
    head = None
    if student.final_hidden is not None:
        x, head = student.final_hidden.reshape(b * length, -1), lm_head(parts.student).weight
    else:
        x = student.logits.reshape(b * length, -1)  # type: ignore[union-attr]
    if cfg.loss_chunk_size == 0 and head is None:
        terms = {k: v.reshape(b, length) for k, v in fn(x, slice(None)).items()}
    else:
        weights = token_weights(rollout.completion_mask, cfg.reduction).to(x.device)
        total, flat = chunked_loss(fn, x, weights.reshape(-1), head=head,
                                   vocab_size=parts.vocab_size if head is not None else None,
                                   chunk_size=cfg.loss_chunk_size or b * length)
        terms = {k: v.reshape(b, length) for k, v in flat.items()}
        if extra_loss is not None:
            total = total + (weights * torch.where(rollout.completion_mask, extra_loss, 0.0)).sum()
        terms["_sum"] = total
    if extra_loss is not None:
        terms["loss"] = terms["loss"] + extra_loss
    return terms


def structure_terms(parts: RunParts, rollout: Rollout, student: CompletionOutputs, scored: ScoredRollout,
                    temperature: float) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Hidden-state / attention objectives (no vocabulary axis: computed on whole tensors):
    ``(Σ w_i·objective_i or None, {label: objective_i})``."""
    obj = parts.objectives
    structural = obj.structural
    if not structural:
        return None, {}
    projection = getattr(parts.unwrapped, PROJECTION_ATTR, None) if obj.hidden_layers[0] else None
    terms = objective_terms(
        structural, student_logits=None, teacher_logits=None, completion_ids=rollout.completion_ids,  # type: ignore[arg-type]
        on_policy=rollout.on_policy, defaults=objective_defaults(parts), temperature=temperature,
        student_hidden=student.hidden, teacher_hidden=scored.teacher_hidden, layer_map=obj.layer_map,
        projection=projection, student_attentions=student.attentions, teacher_attentions=scored.teacher_attentions,
    )
    total = sum((o.weight * terms[o.label] for o in structural), torch.zeros(()))
    return total, terms


def logit_terms_fn(parts: RunParts, rollout: Rollout, teacher: torch.Tensor | TeacherTopK | None,
                   temperature: Temperature, teacher_tokens: torch.Tensor | None = None) -> PerTokenFn:
    """The weighted logit objectives (``Σ_i w_i·D_i``, each ``D_i`` logged) on a chunk of student logits;
    ``temperature``: one τ, or ``(B, L)`` (:func:`row_temperatures`); ``teacher_tokens`` ``(B, L)``: the
    teacher's log p(y_t) (``ScoredRollout.token_logprobs``), for ``sampled_reverse_kl``."""
    cfg = parts.config
    logit_objectives = parts.objectives.logit
    ids = rollout.completion_ids.reshape(-1)
    flat_teacher = flat_positions(teacher)
    flat_tokens = teacher_tokens.reshape(-1) if teacher_tokens is not None else None
    flat_tau = temperature.reshape(-1) if isinstance(temperature, torch.Tensor) else None
    defaults = objective_defaults(parts)

    def terms_fn(z: torch.Tensor, rows: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = flat_teacher[rows] if flat_teacher is not None else None
        tau = flat_tau[rows].to(z.device) if flat_tau is not None else temperature
        terms = objective_terms(logit_objectives, student_logits=z, teacher_logits=t, completion_ids=ids[rows],
                                on_policy=rollout.on_policy, defaults=defaults, temperature=tau,
                                temperature_squared=cfg.temperature_squared,
                                teacher_token_logprobs=flat_tokens[rows] if flat_tokens is not None else None)
        total = sum((o.weight * terms[o.label] for o in logit_objectives), torch.zeros((), device=z.device))
        return total, terms

    return terms_fn
