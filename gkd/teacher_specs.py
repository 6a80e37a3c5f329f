"""The ``teachers:`` config field: its entries as :class:`TeacherSpec`, the default teacher, and what
routing cannot do yet (checked by :class:`gkd.config.GKDConfig`; the routing itself is :mod:`gkd.teachers`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gkd.errors import ConfigError

__all__ = ["DEFAULT_NAME", "TEACHER_SETTINGS", "TeacherSpec", "check_teachers", "default_teacher_name",
           "teacher_specs"]

#: The name ``teacher:`` gets when it is given beside ``teachers:`` (it is then the default teacher).
DEFAULT_NAME = "default"

#: Per-teacher settings a ``teachers:`` entry may give as a mapping (``model`` required), and the run-wide
#: field each one defaults to.
TEACHER_SETTINGS = {"model": "teacher", "gguf_file": "teacher_gguf_file", "dtype": "teacher_dtype",
                    "quantization": "teacher_quantization", "api_key_env": "teacher_api_key_env",
                    "timeout": "teacher_timeout"}

#: Run-wide teacher settings that cannot differ between teachers yet (one value for all of them).
#: (``cache``: the one teacher_cache folder holds every teacher's scores, each under its own fingerprint.)
_SHARED = {"topk": "teacher_topk", "temperature": "loss_temperature", "cache": "teacher_cache"}

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
            shared = sorted(set(settings) & set(_SHARED))
            if shared:
                raise ConfigError(f"{where}: per-teacher {shared[0]} is not supported; {_SHARED[shared[0]]} applies "
                                  "to every teacher (one value for all of them)")
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
        spec = TeacherSpec(name=name, **{**defaults, **settings})
        for key, valid in (("dtype", ("auto", "float32", "bfloat16", "float16")),
                           ("quantization", ("none", "8bit", "4bit"))):
            if getattr(spec, key) not in valid:
                raise ConfigError(f"{where}: {key}={getattr(spec, key)!r} is not valid; choose one of: {', '.join(valid)}")
        try:
            float(spec.timeout)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: timeout={spec.timeout!r} must be a number") from None
        specs[name] = spec
    return specs


def default_teacher_name(cfg: Any, names: Sequence[str]) -> str:
    """The teacher of rows without ``teacher_column``: ``default_teacher``, else ``teacher:`` (as
    ``default``) when given, else the first of ``teachers``."""
    if cfg.default_teacher:
        if cfg.default_teacher not in names:
            raise ConfigError(f"default_teacher={cfg.default_teacher!r} is not one of teachers: {', '.join(names)}")
        return cfg.default_teacher
    return DEFAULT_NAME if cfg.teacher and DEFAULT_NAME in names else names[0]




def check_teachers(cfg: Any, structural: bool) -> None:
    """``teachers:``: each entry well formed, a known default, served entries checked like ``teacher:``,
    and what routing cannot do yet refused by name (``structural``: hidden-state / attention objectives)."""
    if cfg.teachers is None:
        if cfg.default_teacher:
            raise ConfigError(f"default_teacher={cfg.default_teacher!r} needs teachers: (a mapping name → model)")
        return
    specs = teacher_specs(cfg)
    default_teacher_name(cfg, list(specs))
    if not cfg.teacher_column:
        raise ConfigError("teacher_column is empty: name the row column that names a row's teacher (default teacher)")
    for spec in specs.values():
        if spec.served and spec.name != "default":
            cfg._check_served_teacher(spec.model, f"teachers: {spec.name!r} ({spec.model}, a served teacher)",
                                       spec.quantization, spec.gguf_file, float(spec.timeout), from_teacher=False)
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
