"""User reward functions for the reward term of the GKD objective (GKD paper eq. 5).

GKD eq. 5 trains the student on ``(1 − α)·E[r(y)] − α·D(p‖q_θ)``; this module supplies ``r``.
A reward function has TRL's GRPO reward-function signature, so an existing TRL function plugs in
unchanged::

    def my_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]: ...

It is called with keyword arguments only, exactly as TRL calls it: ``prompts=``, ``completions=``,
``completion_ids=`` (list of token-id lists) and one keyword per dataset column of the batch's rows
(``key -> [row[key] for row in rows]``), except ``prompt``, ``completion``, ``completion_ids``,
``prompts``, ``completions`` and keys starting with ``_``. ``None`` for a sample means "no reward
for this sample". Functions are referenced as ``package.module:function`` or
``path/to/file.py:function`` (:func:`load_reward_function`).
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gkd.errors import InputError
from gkd.rollout import Rollout

__all__ = ["RESERVED_KEYS", "RewardError", "RewardFn", "RewardFunctions", "load_reward_function", "score_rollouts"]

#: A reward function: ``fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]``.
RewardFn = Callable[..., list[float | None]]

#: Row keys never passed as column keyword arguments (they are passed explicitly or would collide).
RESERVED_KEYS = frozenset({"prompt", "completion", "completion_ids", "prompts", "completions"})

_PREVIEW_CHARS = 60
_MAX_LISTED = 8


class RewardError(InputError):
    """A reward function could not be loaded or misbehaved; the one-line message names it and says why."""


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _exc_text(exc: BaseException) -> str:
    msg = _one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _preview(text: object) -> str:
    s = str(text)
    return repr(s[:_PREVIEW_CHARS]) + ("..." if len(s) > _PREVIEW_CHARS else "")


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_file(target: str, spec: str) -> Any:
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if not path.is_file():
        raise RewardError(f"reward function file {target!r} not found (resolved to {str(path)!r}; spec {spec!r})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"_gkd_reward_{path.stem.replace('-', '_').replace('.', '_')}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    if str(path.parent) not in sys.path:  # let the file import helpers that sit next to it
        sys.path.append(str(path.parent))
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"cannot load reward function file {str(path)!r} as Python (spec {spec!r})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # dataclasses/pickling inside the file need the module registered
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise RewardError(f"importing reward function file {str(path)!r} raised {_exc_text(exc)} (spec {spec!r})") from exc
    return module


def _import_module(target: str, spec: str) -> Any:
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # like TRL's scripts: modules in the working directory are importable
        sys.path.append(cwd)
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise RewardError(f"cannot import reward module {target!r} (spec {spec!r}): {_exc_text(exc)}") from exc
    except Exception as exc:
        raise RewardError(f"importing reward module {target!r} raised {_exc_text(exc)} (spec {spec!r})") from exc


def _public_callables(module: Any) -> list[str]:
    """Public callables defined in ``module`` itself: functions first, then classes, each sorted."""
    found = [
        (inspect.isclass(obj), name)
        for name, obj in vars(module).items()
        if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", None) == module.__name__
    ]
    return [name for _, name in sorted(found)]


def load_reward_function(spec: str) -> RewardFn:
    """Import a reward function from ``'package.module:function'`` or ``'path/to/file.py:function'``.

    A file path is relative to the current directory or absolute; ``function`` may be dotted
    (``module:Class.method``). The result is the ``r`` of the GKD paper eq. 5 reward term.
    Raises :class:`RewardError` with a one-line, actionable message on any failure.
    """
    if not isinstance(spec, str):
        raise RewardError(f"reward function spec must be a string like 'package.module:function', got {type(spec).__name__}")
    target, sep, attr = spec.strip().rpartition(":")
    if not sep:
        raise RewardError(
            f"reward function spec {spec!r} has no ':'; write 'package.module:function' or 'path/to/file.py:function'"
        )
    if not target or not attr:
        raise RewardError(
            f"reward function spec {spec!r} is incomplete; write 'package.module:function' or 'path/to/file.py:function'"
        )
    module = _import_file(target, spec) if _is_file_spec(target) else _import_module(target, spec)

    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = target if obj is module else f"{target}:{attr.rsplit('.', 1)[0]}"
            listed = _public_callables(module)
            close = difflib.get_close_matches(part, listed, n=1, cutoff=0.6)
            hint = ", ".join(listed[:_MAX_LISTED]) + (", ..." if len(listed) > _MAX_LISTED else "")
            hint = f"callables defined there: {hint}" if listed else "it defines no public callables"
            hint = f"did you mean {close[0]!r}? {hint}" if close else hint
            raise RewardError(f"{where!r} has no attribute {part!r} (spec {spec!r}); {hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"{spec!r} is a {type(obj).__name__}, not a callable reward function")
    return obj


def _check_weight(name: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise RewardError(f"reward weight for {name!r} must be a number, got {weight!r}")
    w = float(weight)
    if not math.isfinite(w):
        raise RewardError(f"reward weight for {name!r} must be finite, got {w}")
    return w


@dataclass
class RewardFunctions:
    """Weighted reward functions ``(name, fn, weight)``: ``r = Σ_k w_k·r_k``, the r of GKD paper eq. 5."""

    functions: list[tuple[str, RewardFn, float]]

    @classmethod
    def from_specs(cls, specs: Sequence[str | RewardFn], weights: Sequence[float] | None = None) -> RewardFunctions:
        """Load ``specs`` (strings as for :func:`load_reward_function`, or callables) with ``weights``
        (default 1.0 each). Names are the spec strings, or ``fn.__name__`` for callables."""
        specs = list(specs)
        if weights is None:
            weights = [1.0] * len(specs)
        weights = list(weights)
        if len(weights) != len(specs):
            raise RewardError(
                f"reward_weights has {len(weights)} values but reward_funcs has {len(specs)}; give one weight per function"
            )
        functions: list[tuple[str, RewardFn, float]] = []
        for spec, weight in zip(specs, weights, strict=True):
            if isinstance(spec, str):
                name, fn = spec, load_reward_function(spec)
            elif callable(spec):
                name, fn = getattr(spec, "__name__", type(spec).__name__), spec
            else:
                raise RewardError(f"reward function must be a spec string or a callable, got {spec!r}")
            functions.append((name, fn, _check_weight(name, weight)))
        return cls(functions)

    def __bool__(self) -> bool:
        return bool(self.functions)

    def __len__(self) -> int:
        return len(self.functions)

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        rows: list[dict],
        *,
        extra_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Score a batch for the GKD paper eq. 5 reward term.

        Returns ``rewards`` (B,) float32, the per-sample weighted sum over the functions that returned
        a value; ``mask`` (B,) bool, true where at least one function returned a value (``None``
        means "no reward for this sample"; masked samples get reward 0); and ``metrics``
        ``{"reward/<name>": mean of that function's non-None values}`` (absent if it gave none).
        ``extra_kwargs`` (e.g. ``trainer_state``) are passed unchanged to every call.
        """
        n = len(prompts)
        if not (len(completions) == len(completion_ids) == len(rows) == n):
            raise RewardError(
                f"reward batch is inconsistent: {n} prompts, {len(completions)} completions, "
                f"{len(completion_ids)} completion_ids, {len(rows)} rows"
            )
        totals = [0.0] * n
        mask = [False] * n
        metrics: dict[str, float] = {}
        if n == 0:
            return torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool), metrics

        keys: list[str] = []
        for row in rows:
            keys.extend(k for k in row if k not in keys and k not in RESERVED_KEYS and not k.startswith("_"))
        columns = {k: [row.get(k) for row in rows] for k in keys}
        kwargs = {
            "prompts": list(prompts),
            "completions": list(completions),
            "completion_ids": [list(ids) for ids in completion_ids],
            **columns,
            **(extra_kwargs or {}),
        }
        per_sample = {"prompts", "completions", "completion_ids", *columns}

        for name, fn, weight in self.functions:
            values = _call_checked(name, fn, kwargs, per_sample, n)
            given = [v for v in values if v is not None]
            for i, v in enumerate(values):
                if v is not None:
                    totals[i] += weight * v
                    mask[i] = True
            key = f"reward/{name}"
            j = 2
            while key in metrics:  # the same function listed twice
                key, j = f"reward/{name}#{j}", j + 1
            if given:
                metrics[key] = sum(given) / len(given)
        return torch.tensor(totals, dtype=torch.float32), torch.tensor(mask, dtype=torch.bool), metrics


def _invoke(fn: RewardFn, kwargs: dict[str, Any]) -> Any:
    out = fn(**kwargs)
    if inspect.isawaitable(out):  # TRL also accepts async reward functions
        out = asyncio.run(_await(out))
    return out


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _call_checked(name: str, fn: RewardFn, kwargs: dict[str, Any], per_sample: set[str], n: int) -> list[float | None]:
    """Call ``fn`` on the batch and validate its output; on an exception, find the first failing sample."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        missing = re.search(r"missing a required argument: '([^']+)'", str(exc))
        if missing:  # usually a dataset column the function reads but the rows do not have
            columns = sorted(k for k in kwargs if k not in ("prompts", "completions", "completion_ids"))
            raise RewardError(
                f"reward function {name!r} needs {missing.group(1)!r}, which no dataset column supplies (columns: "
                f"{', '.join(columns) or 'none'}); add that column to the data, or give the parameter a default"
            ) from exc
        raise RewardError(
            f"reward function {name!r} cannot be called with keywords {sorted(kwargs)}: {_one_line(exc)}; "
            "declare it as f(prompts, completions, **kwargs)"
        ) from exc
    except ValueError:  # no signature available (some builtins): just call it
        pass
    try:
        out = _invoke(fn, kwargs)
    except Exception as batch_exc:
        for i in range(n):
            single = {k: (v[i : i + 1] if k in per_sample else v) for k, v in kwargs.items()}
            try:
                _invoke(fn, single)
            except Exception as exc:
                raise RewardError(
                    f"reward function {name!r} raised {_exc_text(exc)} at prompt index {i} "
                    f"(prompt: {_preview(kwargs['prompts'][i])})"
                ) from exc
        raise RewardError(
            f"reward function {name!r} raised {_exc_text(batch_exc)} on the batch of {n} "
            "(every single-sample call succeeded)"
        ) from batch_exc
    return _validate(name, out, n)


def _validate(name: str, out: Any, n: int) -> list[float | None]:
    if hasattr(out, "ndim") and hasattr(out, "tolist") and not isinstance(out, list | tuple):
        if out.ndim != 1:  # torch / numpy / jax arrays
            raise RewardError(
                f"reward function {name!r} returned a {out.ndim}-D {type(out).__name__}; expected one value per prompt ({n})"
            )
        out = out.tolist()
    if not isinstance(out, list | tuple):
        raise RewardError(
            f"reward function {name!r} returned {type(out).__name__}; expected a list of {n} floats or None (one per prompt)"
        )
    if len(out) != n:
        raise RewardError(f"reward function {name!r} returned {len(out)} values for {n} prompts")
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # 0-d tensor / numpy scalar
            v = v.item()
        if isinstance(v, bool):
            values.append(float(v))
            continue
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward function {name!r} returned {_preview(v) if isinstance(v, str) else _one_line(repr(v), 80)} "
                f"({type(v).__name__}) at prompt index {i}; expected a float or None"
            )
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(
                f"reward function {name!r} returned {f} at prompt index {i}; rewards must be finite "
                "(return None to skip a sample)"
            )
        values.append(f)
    return values


def score_rollouts(rewards: RewardFunctions, tokenizer, rollouts: list[Rollout]) -> dict[str, float]:
    """Score decoded completions with the user's reward functions (GKD eq. 5's ``r(y)``): fills each
    rollout's ``rewards`` / ``reward_mask`` and returns the mean of every logged part and ``reward``."""
    metrics: dict[str, list[float]] = {}
    for r in rollouts:
        ids = [r.completion_ids[i][r.completion_mask[i]].tolist() for i in range(r.completion_ids.shape[0])]
        prompts = [row["prompt"] for row in r.rows]  # type: ignore[union-attr]
        completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
        values, mask, parts = rewards(prompts, completions, ids, r.rows)  # type: ignore[arg-type]
        r.rewards, r.reward_mask = values.to(r.completion_ids.device), mask.to(r.completion_ids.device)
        for k, v in parts.items():
            metrics.setdefault(k, []).append(v)
        metrics.setdefault("reward", []).extend(values[mask].tolist())
    return {k: sum(v) / len(v) for k, v in metrics.items() if v}
