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

__all__ = ["FROZEN_ON_RESUME", "MARKER", "CheckpointError", "TrainingState", "apply_optimizer_settings", "claim_output_dir",
           "complete_checkpoints", "config_changes", "find_resume_checkpoint", "load_checkpoint", "state_config",
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


#: What a run writes into its output_dir (a second run must not mix its own with these).
RUN_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "final", "final-merged", "student-init", "vllm_config")


def _run_outputs(output_dir: Path) -> list[Path]:
    found = [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    return found + [p for _, p in _checkpoints(output_dir)]


def claim_output_dir(output_dir: Path, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Refuse to start a new run on top of an old one in ``output_dir`` (its metrics.jsonl would mix two
    runs' steps, its final/ be overwritten): continue it (``resume_from_checkpoint``), start over
    (``overwrite``: the old run's outputs are deleted, by the main process), or use another folder.
    Every process checks, so every process raises the same error."""
    found = _run_outputs(output_dir)
    if not found or resume:
        return
    if not overwrite:
        names = ", ".join(sorted(p.name for p in found)[:4]) + (", …" if len(found) > 4 else "")
        raise InputError(f"output_dir={str(output_dir)!r} already holds a run ({names}); continue it with "
                         "resume_from_checkpoint=latest, start over with overwrite_output_dir=true, or choose a new "
                         "output_dir")
    if is_main:
        logger.warning("overwrite_output_dir: deleting the previous run's outputs in %s", output_dir)
        for path in found:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


#: Fields a resumed run cannot change: they decide the models, the data order, the algorithm's state
#: or the batch shape that the checkpoint's weights, optimizer state and data position belong to.
FROZEN_ON_RESUME = (
    "teacher", "teachers", "teacher_column", "default_teacher", "student", "teacher_gguf_file", "student_gguf_file", "student_init", "teacher_dtype", "student_dtype",
    "teacher_quantization", "trust_remote_code", "lora_r", "lora_alpha", "lora_target_modules", "objectives",
    "layer_map", "dataset", "dataset_split", "dataset_format", "num_train_examples", "max_digits",
    "max_prompt_length", "long_prompts", "validation_size", "split_seed", "max_response_length", "lm_dataset",
    "algorithm", "per_device_batch_size", "gradient_accumulation_steps", "num_rollouts", "num_generations",
    "ppo_epochs", "seed",
)
#: Not settings of the run itself.
_NOT_COMPARED = ("resume_from_checkpoint", "output_dir", "overwrite_output_dir")


def state_config(path: Path) -> dict[str, Any] | None:
    """The config a checkpoint was written with (checkpoints before it was stored there: the run's
    ``config.yaml`` beside them, if any)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if "config" in state:
        return state["config"]
    beside = path.parent / "config.yaml"
    if beside.is_file():
        import yaml

        return yaml.safe_load(beside.read_text())
    return None


def config_changes(saved: dict[str, Any], config: Any) -> dict[str, tuple[Any, Any]]:
    """``{field: (old, new)}`` of the settings that differ from the checkpoint's; a change to a
    :data:`FROZEN_ON_RESUME` field is an :class:`InputError` listing every such field."""
    now = config.to_dict()
    changed = {k: (saved[k], now[k]) for k in now if k in saved and k not in _NOT_COMPARED and saved[k] != now[k]}
    frozen = {k: v for k, v in changed.items() if k in FROZEN_ON_RESUME}
    if frozen:
        listed = ", ".join(f"{k} ({a!r} → {b!r})" for k, (a, b) in frozen.items())
        raise InputError(f"cannot resume with changed {listed}: the checkpoint's weights, optimizer state and data "
                         "position belong to the old values; resume with them, or start a new run in a new output_dir")
    return changed


def apply_optimizer_settings(config: Any, optimizer: Any, scheduler: Any, changed: dict[str, Any]) -> None:
    """Make changed optimizer / schedule settings take effect after a checkpoint restored the old ones:
    the learning rate (through the schedule, whose shape follows ``lr_scheduler`` / ``warmup_steps`` /
    ``max_steps`` as given now), weight decay and Adam's betas."""
    if {"learning_rate", "lr_scheduler", "warmup_steps", "max_steps"} & set(changed):
        scheduler.base_lrs = [config.learning_rate for _ in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        if "weight_decay" in changed:
            group["weight_decay"] = config.weight_decay
        if {"adam_beta1", "adam_beta2"} & set(changed):
            group["betas"] = (config.adam_beta1, config.adam_beta2)
