"""gkd: on-policy knowledge distillation for language models (GKD, MiniLLM) on accelerate / DeepSpeed.

Data flows ``data → rollout → scorer → losses → trainer``; see ``docs/design.md``. The public names
below load lazily, so ``gkd --help`` and ``import gkd`` do not pull in torch / transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name → the module that defines it.
_EXPORTS = {
    "ConfigError": "gkd.errors",
    "GKDConfig": "gkd.config",
    "GKDTrainer": "gkd.trainer",
    "Objective": "gkd.objectives",
    "Rollout": "gkd.rollout",
    "SamplingParams": "gkd.rollout",
    "distillation_loss_per_token": "gkd.losses",
    "generalized_jsd": "gkd.losses",
    "load_config": "gkd.config",
    "parse_objectives": "gkd.objectives",
    "reduce_loss": "gkd.losses",
    "sample": "gkd.rollout",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gkd' has no attribute {name!r}")
