"""Training algorithms, one per file, chosen by the config's ``algorithm`` name.

To add one: subclass :class:`~gkd.algorithms.base.Algorithm` in a new file (``steps()`` yields one
metrics dict per optimizer step, ``loss(rollout)`` returns the per-token loss), add it to
:data:`ALGORITHMS`, and add its name to the ``algorithm`` choices in :mod:`gkd.config`.
"""

from __future__ import annotations

from gkd.algorithms.base import Algorithm, RunParts
from gkd.algorithms.gkd import GKD
from gkd.algorithms.minillm import MiniLLM
from gkd.errors import ConfigError

__all__ = ["ALGORITHMS", "Algorithm", "RunParts", "get_algorithm"]

#: The registry: config ``algorithm`` value → class.
ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (GKD, MiniLLM)}


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"algorithm={name!r} is not valid; choose one of: {', '.join(ALGORITHMS)}") from None
