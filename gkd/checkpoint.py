"""Checkpoint folders: ``checkpoint-<step>/`` with a ``COMPLETED`` marker written last.

A folder without the marker is torn (the process died while writing it) and is never resumed from.
The contents (:func:`save_checkpoint`): ``accelerator.save_state`` (model, optimizer, scheduler, RNG of
every rank; sharded under DeepSpeed), ``generators_<rank>.pt`` (the sampling stream and the
algorithm's own random streams), ``<name>_<rank>.pt`` for an algorithm's state in progress (MiniLLM:
``minillm_buffer``), ``trainer_state.json`` (step, data position, process count), then the marker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gkd.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["MARKER", "CheckpointError", "TrainingState", "complete_checkpoints", "find_resume_checkpoint", "load_checkpoint",
           "mark_completed", "rotate_checkpoints", "save_checkpoint"]

logger = logging.getLogger("gkd")
MARKER = "COMPLETED"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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


@dataclass
class TrainingState:
    """What a checkpoint holds besides ``accelerator.save_state``."""

    trainer: dict[str, Any]  # written by the main process: step, data_pos, num_processes
    generators: dict[str, Any]  # this rank's random streams by name (``torch.Generator.get_state()``)
    rank_files: dict[str, Any]  # this rank's algorithm state in progress, by file name (picklable)


def save_checkpoint(acc: Accelerator, output_dir: Path, step: int, state: TrainingState, save_total_limit: int) -> Path:
    """Write ``checkpoint-<step>`` (every rank calls this), then the ``COMPLETED`` marker, then rotate.
    A failed write removes the torn folder and raises :class:`CheckpointError`."""
    path = output_dir / f"checkpoint-{step}"
    if (path / MARKER).exists():  # already saved (e.g. save_steps and a signal at the same step)
        return path
    if acc.is_main_process and path.exists():  # a torn attempt at this step
        shutil.rmtree(path)
    acc.wait_for_everyone()
    try:
        _write(acc, path, step, state, save_total_limit)
    except OSError as e:
        shutil.rmtree(path, ignore_errors=True)  # never leave a torn folder behind
        saved = complete_checkpoints(output_dir)
        last = f"the previous checkpoint {saved[-1]} is intact" if saved else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; {last}") from e
    return path


def _write(acc: Accelerator, path: Path, step: int, state: TrainingState, save_total_limit: int) -> None:
    acc.save_state(str(path))
    torch.save(state.generators, path / f"generators_{acc.process_index}.pt")
    for name, obj in state.rank_files.items():
        torch.save(obj, path / f"{name}_{acc.process_index}.pt")
    if acc.is_main_process:
        (path / "trainer_state.json").write_text(json.dumps(state.trainer))
    acc.wait_for_everyone()
    if acc.is_main_process:
        mark_completed(path, step)
        for old in rotate_checkpoints(path.parent, save_total_limit):
            logger.info("removed old checkpoint %s (save_total_limit=%d)", old, save_total_limit)
    acc.wait_for_everyone()


def load_checkpoint(acc: Accelerator, path: Path, rank_file_names: tuple[str, ...] = ()) -> TrainingState:
    """Restore the accelerator's state from ``path`` and return the rest; only the ``rank_file_names``
    that the checkpoint holds are read. A checkpoint of another process count is refused (the data
    order and sampling streams depend on it)."""
    trainer = json.loads((path / "trainer_state.json").read_text())
    if trainer["num_processes"] != acc.num_processes:
        raise InputError(
            f"checkpoint {path} was written by {trainer['num_processes']} process(es); resuming with "
            f"{acc.num_processes} would change the data order and sampling streams"
        )
    acc.load_state(str(path))
    generators = torch.load(path / f"generators_{acc.process_index}.pt", weights_only=True)
    rank_files = {}
    for name in rank_file_names:
        file = path / f"{name}_{acc.process_index}.pt"
        if file.exists():
            rank_files[name] = torch.load(file, weights_only=False, map_location=acc.device)
    return TrainingState(trainer, generators, rank_files)
