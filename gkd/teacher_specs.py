"""The ``teachers:`` config field: its entries as :class:`TeacherSpec`, the default teacher, and what
routing cannot do yet (checked by :class:`gkd.config.GKDConfig`; the routing itself is :mod:`gkd.teachers`)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gkd.errors import ConfigError

__all__ = ["DEFAULT_NAME", "TEACHER_SETTINGS", "TeacherSpec", "check_teachers", "default_teacher_name",
           "own_temperatures", "teacher_specs", "teacher_topks"]

#: The name ``teacher:`` gets when it is given beside ``teachers:`` (it is then the default teacher).
DEFAULT_NAME = "default"

#: Per-teacher settings a ``teachers:`` entry may give as a mapping (``model`` required), and the run-wide
#: field each one defaults to. ``topk``: the k of that teacher's top-k view (0: full vocabulary);
#: ``temperature``: the loss temperature τ of that teacher's rows (both models' logits, in the divergence).
TEACHER_SETTINGS = {"model": "teacher", "gguf_file": "teacher_gguf_file", "dtype": "teacher_dtype",
                    "quantization": "teacher_quantization", "api_key_env": "teacher_api_key_env",
                    "timeout": "teacher_timeout", "topk": "teacher_topk", "temperature": "loss_temperature"}

#: Run-wide settings a ``teachers:`` entry may not give, and why (the error says what to do instead).
_RUN_WIDE = {
    "cache": "teacher_cache is run-wide: one folder holds every teacher's scores, each teacher's rows under its "
             "own fingerprint, k and temperature; set teacher_cache: FOLDER at the top level (gkd cache-teacher "
             "writes every teacher's rows into it)",
}

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class TeacherSpec:
    """One entry of ``teachers:``: the model and how to load it."""

    name: str
    model: str
    gguf_file: str = ""
    dtype: str = "auto"
    quantization: str = "none"
    api_key_env: str = "GKD_TEACHER_API_KEY"
    timeout: float = 600.0
    topk: int = 0
    temperature: float = 1.0
    own_temperature: bool = False  # the entry gives its own temperature: (not the run's loss_temperature)

    @property
    def served(self) -> bool:
        return self.model.startswith(("http://", "https://"))


def teacher_specs(cfg: Any) -> dict[str, TeacherSpec]:
    """``cfg.teachers`` as specs, in recipe order, with ``teacher:`` (when also given) as ``default``;
    raises :class:`ConfigError` (one line, naming the entry) for anything malformed."""
    if cfg.teachers is None:
        return {}
    if not cfg.teachers:
        raise ConfigError("teachers is empty: name at least one teacher (teachers: {name: model, ...}) or use teacher:")
    entries: dict[str, Any] = dict(cfg.teachers)
    if cfg.teacher:
        if DEFAULT_NAME in entries:
            raise ConfigError(f"teacher={cfg.teacher!r} joins teachers as {DEFAULT_NAME!r}, but teachers already has "
                              f"an entry {DEFAULT_NAME!r}; rename it or drop teacher:")
        entries = {DEFAULT_NAME: cfg.teacher, **entries}
    specs = {}
    for name, value in entries.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"teachers: name {name!r} must be letters, digits, '_', '-' or '.' (it names metrics "
                              "loss/<name>, rows/<name>)")
        where = f"teachers: {name!r}"
        defaults = {key: getattr(cfg, field) for key, field in TEACHER_SETTINGS.items() if key != "model"}
        if isinstance(value, str):
            settings: dict[str, Any] = {"model": value}
        elif isinstance(value, Mapping):
            settings = dict(value)
            run_wide = sorted(set(settings) & set(_RUN_WIDE))
            if run_wide:
                raise ConfigError(f"{where}: per-teacher {run_wide[0]} is not supported: {_RUN_WIDE[run_wide[0]]}")
            unknown = sorted(set(settings) - set(TEACHER_SETTINGS))
            if unknown:
                raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; valid: {', '.join(TEACHER_SETTINGS)}")
            if not isinstance(settings.get("model"), str) or not settings["model"]:
                raise ConfigError(f"{where}: needs model: (a hub id, folder, .gguf file, builtin:… or http://…)")
        else:
            raise ConfigError(f"{where}: must be a model (hub id, folder, .gguf file, builtin:…, http://…) or a mapping "
                              f"with model: and per-teacher settings, got {type(value).__name__}")
        if not settings["model"]:
            raise ConfigError(f"{where}: the model is empty")
        spec = TeacherSpec(name=name, **{**defaults, **settings}, own_temperature="temperature" in settings)
        for key, valid in (("dtype", ("auto", "float32", "bfloat16", "float16")),
                           ("quantization", ("none", "8bit", "4bit"))):
            if getattr(spec, key) not in valid:
                raise ConfigError(f"{where}: {key}={getattr(spec, key)!r} is not valid; choose one of: {', '.join(valid)}")
        try:
            float(spec.timeout)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: timeout={spec.timeout!r} must be a number") from None
        if isinstance(spec.topk, bool) or not isinstance(spec.topk, int) or spec.topk < 0:
            raise ConfigError(f"{where}: topk={spec.topk!r} must be a whole number >= 0 (0: full vocabulary)")
        if isinstance(spec.temperature, bool) or not isinstance(spec.temperature, int | float) or not (
                spec.temperature > 0 and math.isfinite(spec.temperature)):
            raise ConfigError(f"{where}: temperature={spec.temperature!r} must be a number > 0")
        specs[name] = dataclasses.replace(spec, temperature=float(spec.temperature))
    return specs


def teacher_topks(cfg: Any) -> dict[str, int]:
    """Each teacher's k (its ``topk``, else ``teacher_topk``); ``{"teacher": teacher_topk}`` for one teacher."""
    if cfg.teachers is None:
        return {"teacher": cfg.teacher_topk}
    return {name: spec.topk for name, spec in teacher_specs(cfg).items()}


def own_temperatures(cfg: Any) -> dict[str, float] | None:
    """Each teacher's loss temperature when some ``teachers:`` entry gives its own (the others keep
    ``loss_temperature``); None when none does (one τ for every row, which may follow a schedule)."""
    if cfg.teachers is None:
        return None
    specs = teacher_specs(cfg)
    if not any(spec.own_temperature for spec in specs.values()):
        return None
    return {name: spec.temperature for name, spec in specs.items()}


def default_teacher_name(cfg: Any, names: Sequence[str]) -> str:
    """The teacher of rows without ``teacher_column``: ``default_teacher``, else ``teacher:`` (as
    ``default``) when given, else the first of ``teachers``."""
    if cfg.default_teacher:
        if cfg.default_teacher not in names:
            raise ConfigError(f"default_teacher={cfg.default_teacher!r} is not one of teachers: {', '.join(names)}")
        return cfg.default_teacher
    return DEFAULT_NAME if cfg.teacher and DEFAULT_NAME in names else names[0]




def check_teachers(cfg: Any, objectives: Sequence[Any]) -> None:
    """``teachers:``: each entry well formed, a known default, served entries checked like ``teacher:``,
    each teacher's ``topk`` / ``temperature`` checked against the objectives and the run, and what routing
    cannot do yet refused by name (hidden-state / attention objectives)."""
    if cfg.teachers is None:
        if cfg.default_teacher:
            raise ConfigError(f"default_teacher={cfg.default_teacher!r} needs teachers: (a mapping name → model)")
        return
    from gkd.losses import TOPK_OBJECTIVES
    from gkd.sampled_token import SAMPLED_OBJECTIVES

    structural = any(o.uses_hidden or o.uses_attention for o in objectives)
    specs = teacher_specs(cfg)
    default = default_teacher_name(cfg, list(specs))
    if not cfg.teacher_column:
        raise ConfigError("teacher_column is empty: name the row column that names a row's teacher (default teacher)")
    for spec in specs.values():
        where = f"teachers: {spec.name!r}"
        if spec.served and spec.name != "default":
            cfg._check_served_teacher(spec.model, f"{where} ({spec.model}, a served teacher)", spec.quantization,
                                       spec.gguf_file, float(spec.timeout), from_teacher=False, topk=spec.topk)
        full = [o.name for o in objectives
                if o.name not in (*TOPK_OBJECTIVES, *SAMPLED_OBJECTIVES) and not (o.uses_hidden or o.uses_attention)]
        if spec.topk and full:
            raise ConfigError(f"{where} has topk={spec.topk}, which cannot be used with {full[0]!r}, which needs every "
                              f"teacher logit; set its topk: 0 or use one of {', '.join(TOPK_OBJECTIVES)}")
        if spec.own_temperature and (cfg.loss_temperature_end is not None or cfg.loss_temperature_schedule != "constant"):
            raise ConfigError(f"{where} sets its own temperature, but loss_temperature_end / loss_temperature_schedule "
                              "move one τ for every row; drop the schedule or the per-teacher temperatures")
    if cfg.student_source_name == "teacher" and specs[default].served:
        raise ConfigError(f"student_init from: teacher takes the default teacher's layers, but teachers: {default!r} "
                          f"({specs[default].model}) is served; point from: at a local copy")
    no_topk = [spec for spec in specs.values() if not spec.topk]
    if cfg.teacher_cache and no_topk:
        raise ConfigError(f"teacher_cache={cfg.teacher_cache!r} stores each teacher's top-k, but teachers: "
                          f"{no_topk[0].name!r} has topk 0 (full vocabulary): give it a topk (or set teacher_topk)")
    served = [spec for spec in specs.values() if spec.served]
    if cfg.teacher_cache and served:
        raise ConfigError(f"teachers: {served[0].name!r} ({served[0].model}) is served, but teacher_cache="
                          f"{cfg.teacher_cache!r} holds every teacher's scores and gkd cache-teacher needs local "
                          "teachers; drop teacher_cache or use a local copy of that teacher")
    unsupported = [
        (structural,
         "hidden-state / attention objectives (each teacher would need its own projection / layer map): use "
         "logit objectives"),
    ]
    for bad, why in unsupported:
        if bad:
            raise ConfigError(f"teachers: not supported with {why}")
