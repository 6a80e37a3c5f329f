"""gkd: on-policy knowledge distillation for language models (GKD, MiniLLM) on accelerate / DeepSpeed.

Data flows ``data → rollout → scorer → losses → trainer``; see ``docs/design.md``.
"""

from gkd.config import ConfigError, GKDConfig, load_config
from gkd.losses import distillation_loss_per_token, generalized_jsd, reduce_loss
from gkd.objectives import Objective, parse_objectives
from gkd.rollout import Rollout, SamplingParams, sample

__all__ = [
    "ConfigError",
    "GKDConfig",
    "GKDTrainer",
    "Objective",
    "Rollout",
    "SamplingParams",
    "distillation_loss_per_token",
    "generalized_jsd",
    "load_config",
    "parse_objectives",
    "reduce_loss",
    "sample",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # the trainer pulls in accelerate; import it lazily
    if name == "GKDTrainer":
        from gkd.trainer import GKDTrainer

        return GKDTrainer
    raise AttributeError(name)
