"""Checkpoint folders: ``checkpoint-<step>/`` with a ``COMPLETED`` marker written last.

A folder without the marker is torn (the process died while writing it) and is never resumed from.
The contents are written by ``accelerator.save_state`` (sharded under DeepSpeed) plus the trainer's
own state (see :meth:`gkd.trainer.GKDTrainer.save_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

__all__ = ["MARKER", "CheckpointError", "complete_checkpoints", "find_resume_checkpoint", "mark_completed", "rotate_checkpoints"]

logger = logging.getLogger("gkd")
MARKER = "COMPLETED"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); earlier checkpoints are intact."""


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for _, p in _checkpoints(Path(output_dir)) if (p / MARKER).is_file()]


def mark_completed(path: Path, step: int) -> None:
    """Write the marker last, flushed to disk, so its presence means every other file is complete."""
    tmp = path / f".{MARKER}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{step}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / MARKER)
    try:  # make the directory entry durable too
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rotate_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete every checkpoint folder older than the ``keep`` newest complete ones (0 keeps all)."""
    if keep <= 0:
        return []
    complete = complete_checkpoints(output_dir)
    if len(complete) <= keep:
        return []
    oldest_kept = int(_NAME.match(complete[-keep].name).group(1))  # type: ignore[union-attr]
    removed = []
    for step, p in _checkpoints(Path(output_dir)):
        if step < oldest_kept:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def find_resume_checkpoint(spec: str | None, output_dir: str | Path) -> Path | None:
    """``None`` → fresh start; ``latest`` → newest complete checkpoint in ``output_dir`` (or ``None``
    if there is none), skipping torn ones with a warning; a path → that checkpoint, which must be complete."""
    if not spec:
        return None
    if spec == "latest":
        torn = [p for _, p in _checkpoints(Path(output_dir)) if not (p / MARKER).is_file()]
        complete = complete_checkpoints(output_dir)
        for p in torn:
            if not complete or int(p.name.split("-")[1]) > int(complete[-1].name.split("-")[1]):
                logger.warning("skipping incomplete checkpoint %s (no %s marker: the run died while saving)", p, MARKER)
        if not complete:
            logger.info("resume_from_checkpoint=latest: no complete checkpoint in %s, starting from scratch", output_dir)
            return None
        return complete[-1]
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={spec!r}: no such folder")
    if not (path / MARKER).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={spec!r} is not a complete checkpoint (no {MARKER} marker); "
            "use 'latest' to pick the newest complete one"
        )
    return path
