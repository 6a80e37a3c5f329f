"""Several teachers in one run (``teachers:``): each row names its teacher, and a micro-batch is split
by teacher wherever a teacher is asked for something.

    teachers: {general: builtin:smollm2-135m-instruct, math: runs/math-specialist/final}
    teacher_column: teacher          # a row's column naming its teacher
    default_teacher: general         # rows without it (default: the first teacher, or teacher: if given)

:class:`TeacherRouter` holds the named teachers (local modules or served clients, each loaded once) and
stands where a single teacher stands (``RunParts.teacher``). For a batch it groups the rows by teacher,
asks each teacher about its own rows only (one forward / one sampling call per teacher present) and
scatters the answers back into batch order, so every path that takes a teacher honours the row's:

- scoring (:func:`gkd.scorer.score` hands a router to :meth:`TeacherRouter.score`): on- and off-policy
  steps, MiniLLM's ``teacher_mix: 0`` scoring, the LM loss's KD share, samples.jsonl, the adaptive-λ
  validation loss and the ``eval_steps`` KLs;
- sampling (:meth:`gkd.sampling.RolloutSampler.sample` hands a router to :meth:`TeacherRouter.sample`):
  SeqKD samples (the row's teacher writes them), MiniLLM's teacher-mixed sampling (the row's teacher is
  mixed in, its log-probs stored) and SKD (the row's teacher verifies).

Routing only regroups rows: every row keeps its completion tokens and mask, so the step's global token
count, the λ coin and the random streams are what they are without it. With several processes every
rank asks every teacher that any rank needs (a rank without rows for it uses one of its rows and drops
the answer), so ZeRO-3 gathers and the sampler's all-ranks-done checks stay matched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gkd import distributed
from gkd.config import GKDConfig
from gkd.errors import ConfigError, InputError
from gkd.losses import TeacherTopK, masked_sum_and_count
from gkd.models import disable_dropout, load_model, load_tokenizer, resolve_model
from gkd.rollout import Rollout
from gkd.scorer import ScoredRollout, check_tokenizers_match, lm_head, output_vocab_size, score
from gkd.serving.client import RemoteTeacher
from gkd.teacher_specs import (
    DEFAULT_NAME,
    TEACHER_SETTINGS,
    TeacherSpec,
    default_teacher_name,
    own_temperatures,
    teacher_specs,
    teacher_topks,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["DEFAULT_NAME", "TEACHER_SETTINGS", "TeacherRouter", "TeacherSpec", "load_router", "select_rows",
           "teacher_specs"]

# --- selecting rows of batches and rollouts, and putting answers back in batch order ------------------------


def _index(value: Any, idx: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.index_select(0, idx.to(value.device))
    if isinstance(value, TeacherTopK):
        return value.rows(idx.to(value.indices.device))
    if isinstance(value, list):
        return [value[i] for i in idx.tolist()]
    return value


def select_rows(rollout: Rollout, idx: torch.Tensor) -> Rollout:
    """The rollout's rows ``idx`` (every per-row field, in that order)."""
    fields = {}
    for f in dataclasses.fields(rollout):
        value = getattr(rollout, f.name)
        if f.name == "teacher_cache" and value is not None:
            value = (value[0], _index(value[1], idx))
        elif f.name == "draft_stats":
            value = None  # a count of the whole batch's sampling, not per row
        else:
            value = _index(value, idx)
        fields[f.name] = value
    return Rollout(**fields)


def _select_batch(batch: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
    return {k: _index(v, idx) for k, v in batch.items()}


#: What a completion-aligned field of a merged rollout holds after a group's shorter completions.
_COMPLETION_PAD = {"completion_mask": False, "sampled_logprobs": 0.0, "teacher_logprobs": 0.0, "mixed_logprobs": 0.0,
                   "skd_replaced": False}


def _pad_to(x: torch.Tensor, length: int, value: Any) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = torch.full((x.shape[0], length - x.shape[1], *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], 1)


def _pad_topk(view: TeacherTopK, length: int) -> TeacherTopK:
    """A top-k view ``(b, L_g, k)`` padded to ``length`` positions with a valid, finite distribution
    (masked positions: never in the loss)."""
    b, have, k = view.indices.shape
    if have == length:
        return view
    extra = length - have
    idx = torch.arange(k, device=view.indices.device).expand(b, extra, k)
    logp = torch.full((b, extra, k), -float(torch.log(torch.tensor(float(k)))), dtype=view.logprobs.dtype,
                      device=view.logprobs.device)
    tail = torch.full((b, extra), TeacherTopK.LOG_ZERO, dtype=view.log_tail.dtype, device=view.log_tail.device)
    return TeacherTopK(torch.cat([view.indices, idx.to(view.indices.dtype)], 1), torch.cat([view.logprobs, logp], 1),
                       torch.cat([view.log_tail, tail], 1))


def _widen_all(views: list[TeacherTopK]) -> list[TeacherTopK]:
    """Every view widened to the widest k (empty buckets: probability 0, exactly 0 in every divergence)."""
    k = max(v.width for v in views)
    return [v.widen(k) for v in views]


def _cat_topk(views: list[TeacherTopK]) -> TeacherTopK:
    """Views of groups of rows, one after the other (widened to the widest k: empty buckets)."""
    views = _widen_all(views)
    return TeacherTopK(torch.cat([v.indices for v in views]), torch.cat([v.logprobs for v in views]),
                       torch.cat([v.log_tail for v in views]))


def _common_views(values: list[Any], temperatures: list[float]) -> list[Any]:
    """Teacher views of groups of rows made mergeable: top-k views widened to the widest k (empty buckets,
    probability 0: they add exactly 0 to every divergence); when top-k and full-logit groups meet (a
    teacher with ``topk: 0`` beside top-k teachers), the full logits as the exact ``k = V`` view at that
    group's temperature (``temperatures``)."""
    if not any(isinstance(v, TeacherTopK) for v in values) or any(v is None for v in values):
        return values  # all full logits; or a group without a view (then the merged answer has none)
    values = [TeacherTopK.from_logits(v, tau) if isinstance(v, torch.Tensor) else v
              for v, tau in zip(values, temperatures, strict=True)]
    return _widen_all(values)


def merge_rollouts(parts: list[Rollout], order: torch.Tensor, pad_token_id: int) -> Rollout:
    """Rollouts of groups of rows (``order``: the batch position of each of their rows, concatenated) as one
    rollout in batch order; completions are right-padded to the longest group's (masked)."""
    length = max(p.completion_ids.shape[1] for p in parts)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "draft_stats":
            present = [v for v in values if v is not None]
            fields[f.name] = tuple(sum(col) for col in zip(*present, strict=True)) if present else None
        elif f.name == "teacher_cache":
            if all(v is not None for v in values) and len({v[0] for v in values}) == 1:
                view = _cat_topk([_pad_topk(v[1], length) for v in values])
                fields[f.name] = (values[0][0], view.rows(back.to(view.indices.device)))
            else:
                fields[f.name] = None  # not kept by every group: the loss scores the teacher again
        elif all(isinstance(v, torch.Tensor) for v in values):
            if f.name == "completion_ids":
                values = [_pad_to(v, length, pad_token_id) for v in values]
            elif f.name in _COMPLETION_PAD:
                values = [_pad_to(v, length, _COMPLETION_PAD[f.name]) for v in values]
            merged = torch.cat(values)
            fields[f.name] = merged.index_select(0, back.to(merged.device))
        elif all(isinstance(v, list) for v in values):
            flat = [x for v in values for x in v]
            fields[f.name] = [flat[i] for i in back.tolist()]
        elif all(v is None for v in values) or not all(isinstance(v, torch.Tensor | list) for v in values):
            fields[f.name] = values[0]  # None, or a flag the groups share (on_policy, is_reference)
        else:
            raise ValueError(f"cannot merge rollout field {f.name!r}: some groups have it and some do not")
    return Rollout(**fields)


def _scatter(values: list[Any], groups: list[torch.Tensor], batch: int) -> Any:
    """Per-group answers ``(b_g, …)`` (tensors or top-k views) placed at their rows of a ``(batch, …)`` one."""
    if any(v is None for v in values):
        return None
    first = values[0]
    if isinstance(first, TeacherTopK):
        return TeacherTopK(*(_scatter([getattr(v, n) for v in values], groups, batch)
                             for n in ("indices", "logprobs", "log_tail")))
    dtype = first.dtype
    for v in values[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    out = torch.zeros((batch, *first.shape[1:]), dtype=dtype, device=first.device)
    for v, idx in zip(values, groups, strict=True):
        out[idx.to(out.device)] = v.to(device=out.device, dtype=dtype)
    return out


class TeacherRouter:
    """Named teachers, each answering for the rows that name it (see the module docstring).

    ``teachers``: name → local ``nn.Module`` (frozen, eval mode) or served client
    (:class:`gkd.serving.client.RemoteTeacher`); ``default``: the teacher of rows without ``column``."""

    routes_rows = True  # gkd.scorer.score hands a router the whole rollout

    def __init__(self, teachers: Mapping[str, Any], default: str, column: str = "teacher") -> None:
        if not teachers:
            raise ConfigError("teachers is empty: name at least one teacher")
        if default not in teachers:
            raise ConfigError(f"default_teacher={default!r} is not one of teachers: {', '.join(teachers)}")
        self.teachers, self.default, self.column = dict(teachers), default, column
        self.names = tuple(self.teachers)
        self.topk: dict[str, int] | None = None  # name → k of its top-k view (teachers: topk), see configure
        self.temperature: dict[str, float] | None = None  # name → its loss τ, when some teacher sets its own

    def configure(self, topk: Mapping[str, int] | None = None, temperature: Mapping[str, float] | None = None
                  ) -> TeacherRouter:
        """Each teacher's own ``topk`` / loss ``temperature`` (``teachers:`` entries): what :meth:`view_settings`
        hands the scorer for the training view, and :meth:`row_temperatures` the loss."""
        for what, values in (("topk", topk), ("temperature", temperature)):
            if values is not None and set(values) != set(self.names):
                raise ValueError(f"{what} names {', '.join(values)}, the teachers are {', '.join(self.names)}")
        self.topk = dict(topk) if topk is not None else None
        self.temperature = dict(temperature) if temperature is not None else None
        return self

    def view_settings(self, topk: int, temperature: float) -> tuple[int | dict[str, int], float | dict[str, float]]:
        """``(topk, temperature)`` to score the training view with: each teacher's own where configured, else
        the run's ``topk`` / ``temperature`` (:func:`gkd.scorer.score` takes either)."""
        return (self.topk if self.topk is not None else topk,
                self.temperature if self.temperature is not None else temperature)

    @property
    def any_topk(self) -> bool:
        """Some teacher's training view is top-k (configured)."""
        return self.topk is not None and any(k > 0 for k in self.topk.values())

    def row_temperatures(self, rollout: Rollout, temperature: float) -> float | torch.Tensor:
        """The loss τ of every completion position: ``temperature`` (the run's) when no teacher sets its
        own, else ``(B, L)`` float32, each row at its teacher's τ (:data:`gkd.losses.Temperature`)."""
        if self.temperature is None:
            return temperature
        b, length = rollout.completion_ids.shape
        per_row = torch.tensor([self.temperature[n] for n in self.row_names(rollout.rows, b)], dtype=torch.float32,
                               device=rollout.completion_ids.device)
        return per_row[:, None].expand(b, length)

    def __repr__(self) -> str:
        return f"TeacherRouter({', '.join(self.names)}; default {self.default!r}, column {self.column!r})"

    def __getitem__(self, name: str) -> Any:
        return self.teachers[name]

    def local(self) -> dict[str, torch.nn.Module]:
        """The teachers that are modules in this process."""
        return {n: t for n, t in self.teachers.items() if isinstance(t, torch.nn.Module)}

    @property
    def has_remote(self) -> bool:
        """Some teacher is served (it sends top-k log-probs, not full logits)."""
        return len(self.local()) < len(self.teachers)

    def map_models(self, fn: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Apply ``fn`` to every local teacher (placing it on the device, ZeRO-3 wrapping), in place."""
        self.teachers = {n: fn(t) if isinstance(t, torch.nn.Module) else t for n, t in self.teachers.items()}

    # --- which rows go to which teacher ---------------------------------------------------------------

    def row_names(self, rows: Sequence[Mapping[str, Any]] | None, n: int | None = None) -> list[str]:
        """The teacher of each row (``default`` where the column is missing or empty); an unknown name is an
        :class:`InputError` naming the row and the name."""
        if rows is None:
            return [self.default] * (n or 0)
        out = []
        for i, row in enumerate(rows):
            name = row.get(self.column)
            if name is None or name == "":
                out.append(self.default)
                continue
            if not isinstance(name, str) or name not in self.teachers:
                where = row.get("_where", f"row {i}")
                raise InputError(f"{where}: {self.column}={name!r} is not one of teachers: {', '.join(self.names)} "
                                 "(fix the row, or add that teacher to teachers:)")
            out.append(name)
        return out

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Every row names a known teacher (or none); returns the rows per teacher."""
        counts = dict.fromkeys(self.names, 0)
        for name in self.row_names(rows):
            counts[name] += 1
        return counts

    def groups(self, rows: Sequence[Mapping[str, Any]] | None, n: int) -> list[tuple[str, torch.Tensor]]:
        """``(name, row indices)`` per teacher that has rows, in ``teachers`` order. With several processes,
        every teacher that any rank has rows for (a rank without rows for it gets an empty index)."""
        names = self.row_names(rows, n)
        present = torch.tensor([float(name in names) for name in self.names])
        if distributed.is_distributed():
            present = distributed.all_reduce_sum(present)
        return [(name, torch.tensor([i for i, x in enumerate(names) if x == name], dtype=torch.long))
                for name, p in zip(self.names, present.tolist(), strict=True) if p > 0]

    # --- asking the teachers ---------------------------------------------------------------------------

    def score(self, rollout: Rollout, vocab_size: int | None = None, *, topk: int | Mapping[str, int] = 0,
              temperature: float | Mapping[str, float] = 1.0, **kwargs: Any) -> ScoredRollout:
        """:func:`gkd.scorer.score`, each teacher on its own rows (one call per teacher), answers in batch
        order. ``topk`` / ``temperature``: one value for every teacher, or one per teacher name (their own,
        :meth:`view_settings`); top-k views of different k are merged by padding with empty buckets, and a
        full-vocabulary teacher's rows beside top-k ones become the exact ``k = V`` view. With a served
        teacher among them, local teachers add ``log p(y_t)`` too, so that every row has it."""
        if kwargs.get("hidden_layers") or kwargs.get("attention_layers"):
            raise ConfigError("hidden-state / attention objectives are not supported with teachers: (each teacher "
                              "would need its own projection); use logit objectives")
        if self.has_remote:
            kwargs["with_token_logprobs"] = True
        b = rollout.completion_ids.shape[0]
        groups, answers, taus, whole = [], [], [], None
        for name, idx in self.groups(rollout.rows, b):
            teacher = self.teachers[name]
            own = dict(kwargs, topk=topk[name] if isinstance(topk, Mapping) else topk,
                       temperature=temperature[name] if isinstance(temperature, Mapping) else temperature)
            if idx.numel() == 0:  # another rank's teacher: take part in its collectives, drop the answer
                if isinstance(teacher, torch.nn.Module):
                    score(teacher, select_rows(rollout, torch.zeros(1, dtype=torch.long)), vocab_size, **own)
            elif idx.numel() == b:  # every row is this teacher's: the batch as it is
                whole = score(teacher, rollout, vocab_size, **own)
            else:
                groups.append(idx)
                taus.append(own["temperature"])
                answers.append(score(teacher, select_rows(rollout, idx), vocab_size, **own))
        if whole is not None:
            return whole
        return ScoredRollout(
            rollout=rollout,
            teacher_logits=_scatter(_common_views([a.teacher_logits for a in answers], taus), groups, b),
            token_logprobs=_scatter([a.token_logprobs for a in answers], groups, b),
        )

    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        """Full teacher logits ``(B, L, V)`` of each row's teacher (local teachers only)."""
        logits = self.score(rollout, vocab_size).teacher_logits
        if not isinstance(logits, torch.Tensor):
            raise InputError("full teacher logits need local teachers; a served teacher sends top-k log-probs only")
        return logits

    def sample(self, batch: dict[str, Any], sample_one: Callable[[Any, dict[str, Any]], Rollout],
               pad_token_id: int) -> Rollout:
        """Sampling that involves a teacher, per teacher: ``sample_one(teacher, sub_batch)`` on each
        teacher's rows, merged back into batch order."""
        b = batch["prompt_ids"].shape[0]
        parts, order, whole = [], [], None
        for name, idx in self.groups(batch.get("rows"), b):
            if idx.numel() == 0:  # another rank's teacher: step along with its sampling loop, drop the result
                sample_one(self.teachers[name], _select_batch(batch, torch.zeros(1, dtype=torch.long)))
            elif idx.numel() == b:  # every row is this teacher's: the batch as it is
                whole = sample_one(self.teachers[name], batch)
            else:
                parts.append(sample_one(self.teachers[name], _select_batch(batch, idx)))
                order.append(idx)
        if whole is not None:
            return whole
        return merge_rollouts(parts, torch.cat(order), pad_token_id)

    # --- what a step reports per teacher ---------------------------------------------------------------

    def step_metrics(self, rollouts: list[Rollout], losses: list[torch.Tensor | None],
                     reduction: str = "token_mean") -> dict[str, float]:
        """``rows/<name>`` (the step's rows, all ranks) and ``loss/<name>`` (the loss over that teacher's
        rows, reduced like the step's loss: its token sum over its token count, all ranks) per teacher."""
        sums = torch.zeros(3, len(self.names), dtype=torch.float64)
        for rollout, loss in zip(rollouts, losses, strict=True):
            names = self.row_names(rollout.rows, rollout.completion_ids.shape[0])
            for j, name in enumerate(self.names):
                sel = torch.tensor([x == name for x in names], dtype=torch.bool)
                if not bool(sel.any()):
                    continue
                sums[0, j] += float(sel.sum())
                if loss is not None:
                    mask = rollout.completion_mask & sel.to(rollout.completion_mask.device)[:, None]
                    total, count = masked_sum_and_count(loss.detach(), mask, reduction)
                    sums[1, j] += float(total)
                    sums[2, j] += float(count)
        sums = distributed.all_reduce_sum(sums)
        out: dict[str, float] = {}
        for j, name in enumerate(self.names):
            out[f"rows/{name}"] = float(sums[0, j])
            if sums[2, j] > 0:
                out[f"loss/{name}"] = float(sums[1, j] / sums[2, j])
        return out


def load_router(cfg: GKDConfig, acc: Accelerator, tokenizer: Any,
                given: Mapping[str, torch.nn.Module] | None = None) -> TeacherRouter:
    """The run's teachers (``cfg.teachers``), each loaded once: the models in ``given`` (Python API) as they
    are (every local teacher; served ones may be left out), the rest from their specs (local: tokenizer checked against the student's; served: connected,
    the server's tokenizer checked), frozen in eval mode."""
    specs = teacher_specs(cfg)
    given = dict(given or {})
    # teachers= passes every local teacher (a served one may be left to its URL, or passed as a client)
    missing = {name for name, spec in specs.items() if name not in given and not spec.served}
    if given and (set(given) - set(specs) or missing):
        raise ConfigError(f"teachers= passes {', '.join(sorted(given))} but the config's teachers name "
                          f"{', '.join(specs) or 'none'}; name the same teachers in both (served ones may be left out)")
    paths: dict[str, str] = {}
    with acc.main_process_first():  # one process fills the caches (converted, built-in models) first
        for name, spec in specs.items():
            if name in given or spec.served:
                continue
            paths[name] = resolve_model(spec.model, spec.gguf_file, f"teacher {name!r}")
            try:
                check_tokenizers_match(tokenizer, load_tokenizer(paths[name], cfg.trust_remote_code))
            except InputError as e:
                raise InputError(f"teachers: {name!r} ({spec.model}): {e}") from None
    teachers: dict[str, Any] = {}
    vocab_size = len(tokenizer)
    for name, spec in specs.items():
        if name in given:
            teacher: Any = given[name]
        elif spec.served:
            teacher = RemoteTeacher.from_config(spec.model, spec.api_key_env, float(spec.timeout))
            try:
                teacher.connect(tokenizer)
            except InputError as e:
                raise InputError(f"teachers: {name!r} ({spec.model}): {e}") from None
        else:
            teacher = load_model(paths[name], spec.dtype, cfg.trust_remote_code, spec.quantization)
        if isinstance(teacher, torch.nn.Module):
            if output_vocab_size(teacher) < vocab_size:
                raise InputError(f"teachers: {name!r} has {output_vocab_size(teacher)} output rows but the student's "
                                 f"tokenizer has {vocab_size} tokens: not the student's vocabulary")
            if spec.topk:  # its top-k view is formed from its final hidden states and head
                lm_head(teacher)
            disable_dropout(teacher)
            teacher.requires_grad_(False).eval()
        teachers[name] = teacher
    return TeacherRouter(teachers, default_teacher_name(cfg, list(specs)), cfg.teacher_column).configure(
        teacher_topks(cfg), own_temperatures(cfg))
