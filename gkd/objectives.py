"""Weighted combinations of distillation objectives, hidden-state projections and the loss-temperature
schedule (the "rest of the distillation family" on top of GKD / MiniLLM).

A recipe names its objectives as a weighted list::

    objectives: ["0.7*jsd(beta=0.5)", "0.3*hidden_mse"]

Each entry is ``[WEIGHT*]NAME[(key=value, ...)]``; the keys override the flat config fields of that
one objective (``beta``, ``skew``, ``kd_weight``, ``dkd_alpha``, ``dkd_beta``). The per-token loss is
``Σ_i w_i·objective_i``, every part logged on its own as ``loss_<label>``. This module only parses
and wires; the tensor math is in :mod:`gkd.losses`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gkd.errors import ConfigError, InputError
from gkd.losses import (
    LOGIT_OBJECTIVES,
    Temperature,
    attention_kl_per_token,
    distillation_loss_per_token,
    hidden_cosine_per_token,
    hidden_mse_per_token,
)
from gkd.sampled_token import SAMPLED_OBJECTIVES, sampled_reverse_kl_per_token

if TYPE_CHECKING:
    from gkd.config import GKDConfig

__all__ = [
    "ATTENTION_OBJECTIVES",
    "SAMPLED_OBJECTIVES",
    "HIDDEN_OBJECTIVES",
    "OBJECTIVE_NAMES",
    "PROJECTION_ATTR",
    "HiddenProjection",
    "Objective",
    "ObjectiveSetup",
    "default_layer_map",
    "objective_terms",
    "parse_objectives",
    "resolve_layer_map",
    "setup_objectives",
    "temperature_at",
]

HIDDEN_OBJECTIVES = ("hidden_mse", "hidden_cosine")
ATTENTION_OBJECTIVES = ("attention_kl",)
OBJECTIVE_NAMES: tuple[str, ...] = (*LOGIT_OBJECTIVES, *SAMPLED_OBJECTIVES, *HIDDEN_OBJECTIVES, *ATTENTION_OBJECTIVES)
#: which per-objective keys each family accepts inside ``name(...)``
_PARAMS = {"jsd": {"beta"}, "skew_forward_kl": {"skew"}, "skew_reverse_kl": {"skew"}, "kd": {"kd_weight"},
           "dkd": {"dkd_alpha", "dkd_beta"}}
#: attribute under which the student carries its hidden-state projection (dropped on export)
PROJECTION_ATTR = "gkd_hidden_projection"

_ENTRY = re.compile(r"^\s*(?:(?P<w>[-+0-9.eE]+)\s*\*\s*)?(?P<name>[a-z_]+)\s*(?:\((?P<args>[^()]*)\))?\s*$")


@dataclass(frozen=True)
class Objective:
    """One weighted term of the distillation loss."""

    name: str
    weight: float = 1.0
    params: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Metric name suffix: ``jsd``, or ``jsd(beta=0.9)`` when parameters are overridden."""
        if not self.params:
            return self.name
        return f"{self.name}({','.join(f'{k}={v:g}' for k, v in sorted(self.params.items()))})"

    @property
    def uses_hidden(self) -> bool:
        return self.name in HIDDEN_OBJECTIVES

    @property
    def uses_attention(self) -> bool:
        return self.name in ATTENTION_OBJECTIVES


def _split_entries(specs: Iterable[str]) -> list[str]:
    out = []
    for spec in specs:
        depth, start = 0, 0
        for i, ch in enumerate(spec):
            depth += (ch == "(") - (ch == ")")
            if ch == "+" and depth == 0 and i > 0 and spec[i - 1] not in "eE":
                out.append(spec[start:i])
                start = i + 1
        out.append(spec[start:])
    return [e for e in (x.strip() for x in out) if e]


def parse_objectives(specs: Iterable[str]) -> list[Objective]:
    """Parse ``["0.7*jsd(beta=0.5)", "0.3*hidden_mse"]`` (entries may also be joined with ``+``).

    Errors are :class:`~gkd.config.ConfigError` naming the offending entry.
    """
    objectives: list[Objective] = []
    for entry in _split_entries(specs):
        m = _ENTRY.match(entry)
        if m is None:
            raise ConfigError(f"objective {entry!r} must look like WEIGHT*NAME or WEIGHT*NAME(key=value), "
                              "e.g. 0.7*jsd(beta=0.5)")
        name = m["name"]
        if name not in OBJECTIVE_NAMES:
            import difflib

            close = difflib.get_close_matches(name, OBJECTIVE_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown objective {name!r} in {entry!r}; {hint}valid: {', '.join(OBJECTIVE_NAMES)}")
        try:
            weight = float(m["w"]) if m["w"] is not None else 1.0
        except ValueError:
            raise ConfigError(f"objective {entry!r}: weight {m['w']!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"objective {entry!r}: weight must be a finite number >= 0, got {weight}")
        params: dict[str, float] = {}
        for arg in (m["args"] or "").split(","):
            if not arg.strip():
                continue
            key, _, raw = arg.partition("=")
            key = key.strip()
            allowed = _PARAMS.get(name, set())
            if key not in allowed:
                valid = ", ".join(sorted(allowed)) or "none"
                raise ConfigError(f"objective {entry!r}: parameter {key!r} is not one of {name}'s ({valid})")
            try:
                params[key] = float(raw)
            except ValueError:
                raise ConfigError(f"objective {entry!r}: {key}={raw.strip()!r} is not a number") from None
        objectives.append(Objective(name, weight, params))
    labels = [o.label for o in objectives]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"objective {dupes[0]!r} is listed twice; merge the weights into one entry")
    return objectives


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Uniform mapping of student blocks onto teacher blocks (TinyBERT's ``g(m) = m·N/M``).

    Indices are ``output_hidden_states`` indices: 0 is the embedding output, ``i`` the output of
    block ``i``; the last student block maps onto the last teacher block."""
    return {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}


def resolve_layer_map(layer_map: dict[int, int], student_layers: int, teacher_layers: int) -> dict[int, int]:
    """The configured map (or the uniform default when empty), range-checked."""
    resolved = dict(layer_map) if layer_map else default_layer_map(student_layers, teacher_layers)
    for s, t in resolved.items():
        if not 0 <= s <= student_layers:
            raise ConfigError(f"layer_map student layer {s} is outside 0..{student_layers} (the student has "
                              f"{student_layers} blocks; 0 = embeddings)")
        if not 0 <= t <= teacher_layers:
            raise ConfigError(f"layer_map teacher layer {t} (for student layer {s}) is outside 0..{teacher_layers} "
                              f"(the teacher has {teacher_layers} blocks; 0 = embeddings)")
    return dict(sorted(resolved.items()))


class HiddenProjection(torch.nn.Module):
    """One learned linear map ``W_s: R^{H_S} → R^{H_T}`` per mapped student layer (TinyBERT eq. 8).

    Trained with the student (same optimizer, checkpointed with it) and dropped on export. With equal
    hidden sizes it is the identity and has no parameters."""

    def __init__(self, layers: Iterable[int], student_hidden: int, teacher_hidden: int, seed: int = 0) -> None:
        super().__init__()
        self.identity = student_hidden == teacher_hidden
        self.maps = torch.nn.ModuleDict()
        if not self.identity:
            # own generator: the same initial W on every rank and every run, whatever the global RNG did
            gen = torch.Generator().manual_seed(seed)
            bound = 1.0 / student_hidden**0.5  # nn.Linear's default range
            for layer in layers:
                lin = torch.nn.Linear(student_hidden, teacher_hidden, bias=False)
                with torch.no_grad():
                    lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=gen))
                self.maps[str(layer)] = lin

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return hidden
        proj = self.maps[str(layer)]
        return proj(hidden.to(proj.weight.dtype))


@dataclass
class ObjectiveSetup:
    """A run's objectives and the layers they read: ``(student layers, teacher layers)`` pairs in
    ``layer_map`` order (empty when no hidden-state / attention objective is used)."""

    objectives: list[Objective]
    layer_map: dict[int, int] = field(default_factory=dict)
    hidden_layers: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    attention_layers: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    @property
    def logit(self) -> list[Objective]:
        """Objectives on the vocabulary axis (computed a chunk of positions at a time)."""
        return [o for o in self.objectives if not (o.uses_hidden or o.uses_attention)]

    @property
    def structural(self) -> list[Objective]:
        """Hidden-state / attention objectives (no vocabulary axis: computed on whole tensors)."""
        return [o for o in self.objectives if o.uses_hidden or o.uses_attention]

    @property
    def needs_token_logprobs(self) -> bool:
        """An objective reads the teacher's log-prob of each completion token (``sampled_reverse_kl``)."""
        return any(o.name in SAMPLED_OBJECTIVES for o in self.objectives)

    @property
    def needs_teacher_distribution(self) -> bool:
        """An objective reads more of the teacher than one token's log-prob (logits, top-k, hidden states)."""
        return any(o.name not in SAMPLED_OBJECTIVES for o in self.objectives)


def setup_objectives(cfg: GKDConfig, student: torch.nn.Module, teacher: torch.nn.Module | None) -> ObjectiveSetup:
    """Parse the weighted objectives; for hidden-state / attention objectives resolve the layer map,
    switch both models to eager attention if attention maps are needed, and attach the learned
    hidden-state projection to the student (so DDP / DeepSpeed / checkpoints treat it as the
    student's own parameters; the exported model drops it)."""
    explicit = parse_objectives(cfg.objectives)
    setup = ObjectiveSetup(explicit or parse_objectives([cfg.divergence]))
    uses_hidden = any(o.uses_hidden for o in explicit)
    uses_attention = any(o.uses_attention for o in explicit)
    if not (uses_hidden or uses_attention):
        return setup
    if not isinstance(teacher, torch.nn.Module):
        raise ConfigError(f"hidden-state / attention objectives need a local teacher (teacher={cfg.teacher!r} sends "
                          "log-probs only)")
    s_cfg, t_cfg = student.config, teacher.config
    setup.layer_map = resolve_layer_map(cfg.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    if uses_hidden:
        setup.hidden_layers = (tuple(setup.layer_map), tuple(setup.layer_map.values()))
        projection = HiddenProjection(setup.layer_map, s_cfg.hidden_size, t_cfg.hidden_size, seed=cfg.seed)
        student.add_module(PROJECTION_ATTR, projection.to(next(student.parameters()).device))
    if uses_attention:
        heads = (s_cfg.num_attention_heads, t_cfg.num_attention_heads)
        if heads[0] != heads[1]:
            raise InputError(
                f"attention_kl needs the same number of attention heads, but the student has {heads[0]} and the "
                f"teacher {heads[1]}; drop attention_kl from objectives"
            )
        pairs = {s: t for s, t in setup.layer_map.items() if s > 0 and t > 0}
        if not pairs:
            raise ConfigError(f"attention_kl needs layer_map pairs of blocks (>= 1), got {setup.layer_map}")
        setup.attention_layers = (tuple(pairs), tuple(pairs.values()))
        for model in (student, teacher):
            model.set_attn_implementation("eager")  # sdpa / flash kernels return no attention maps
    return setup


def temperature_at(step: int, max_steps: int, start: float, end: float | None, schedule: str) -> float:
    """Loss temperature at optimizer step ``step`` (0-based): constant, or linear / cosine from
    ``start`` (first step) to ``end`` (last step)."""
    if schedule == "constant" or end is None or max_steps <= 1:
        return start
    progress = min(max(step / (max_steps - 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown temperature schedule {schedule!r}; valid: constant, linear, cosine")


def objective_terms(
    objectives: list[Objective],
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    completion_ids: torch.Tensor,
    on_policy: bool,
    defaults: dict[str, float],
    temperature: Temperature,
    temperature_squared: bool = False,
    student_hidden: dict[int, torch.Tensor] | None = None,
    teacher_hidden: dict[int, torch.Tensor] | None = None,
    layer_map: dict[int, int] | None = None,
    projection: HiddenProjection | None = None,
    student_attentions: dict[int, torch.Tensor] | None = None,
    teacher_attentions: dict[int, torch.Tensor] | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token ``(B, L)`` value of every objective, keyed by label, unweighted.

    ``defaults`` holds the flat config values (beta, skew, kd_weight, dkd_alpha, dkd_beta, and
    sample_temperature: the sampling temperature, for ``sampled_reverse_kl``); an objective's own
    ``params`` override them. Hidden / attention inputs are dicts keyed by layer;
    ``teacher_token_logprobs`` is the teacher's log p(y_t) of each completion token.
    """
    terms: dict[str, torch.Tensor] = {}
    for obj in objectives:
        p = {**defaults, **obj.params}
        if obj.name in SAMPLED_OBJECTIVES:  # gkd.sampled_token: the sampled token's reverse-KL advantage
            if teacher_token_logprobs is None:
                raise ValueError(f"{obj.name} needs the teacher's log-prob of each completion token")
            terms[obj.label] = sampled_reverse_kl_per_token(student_logits, teacher_token_logprobs, completion_ids,
                                                            p.get("sample_temperature", 1.0))
        elif obj.name in LOGIT_OBJECTIVES:
            terms[obj.label] = distillation_loss_per_token(
                student_logits, teacher_logits, divergence=obj.name, beta=p["beta"], skew=p["skew"],
                temperature=temperature, kd_weight=p["kd_weight"], dkd_alpha=p["dkd_alpha"], dkd_beta=p["dkd_beta"],
                labels=None if on_policy else completion_ids, targets=completion_ids,
                temperature_squared=temperature_squared,
            )
        elif obj.uses_hidden:
            assert student_hidden is not None and teacher_hidden is not None and layer_map is not None
            fn = hidden_mse_per_token if obj.name == "hidden_mse" else hidden_cosine_per_token
            parts = []
            for s_layer, t_layer in layer_map.items():
                hs = student_hidden[s_layer]
                hs = projection(s_layer, hs) if projection is not None else hs
                parts.append(fn(hs, teacher_hidden[t_layer]))
            terms[obj.label] = torch.stack(parts).mean(0)
        else:
            assert student_attentions is not None and teacher_attentions is not None and layer_map is not None
            pairs = [(s, t) for s, t in layer_map.items() if s > 0 and t > 0]
            terms[obj.label] = torch.stack(
                [attention_kl_per_token(student_attentions[s], teacher_attentions[t]) for s, t in pairs]
            ).mean(0)
    return terms
