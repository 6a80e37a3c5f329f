"""What a run reports: ``metrics.jsonl`` and the trackers, timed phases, sample completions, and the
model card beside the exported student."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gkd.losses import token_logprobs
from gkd.rollout import Rollout
from gkd.scorer import score

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gkd.config import GKDConfig

__all__ = ["PHASES", "Reporter", "Timers", "truncate_metrics", "write_model_card"]

logger = logging.getLogger("gkd")

#: The timed phases of a step, logged as ``time_<phase>`` (seconds).
PHASES = ("rollout", "reward", "score", "update")


class Timers:
    """Seconds spent per named phase since the last :meth:`pop`: ``with timers("score"): …``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def add_timing(metrics: dict[str, float], elapsed: float, times: dict[str, float]) -> dict[str, float]:
    """``tokens_per_s`` (from the step's ``tokens``), ``time_<phase>`` and ``time_step`` into ``metrics``."""
    metrics["tokens_per_s"] = metrics.pop("tokens") / max(elapsed, 1e-9)
    for phase in PHASES:
        metrics[f"time_{phase}"] = times.get(phase, 0.0)
    metrics["time_step"] = elapsed
    return metrics


class Reporter:
    """One line of ``metrics.jsonl`` per logged step (main process), the same scalars to the trackers
    (``report_to``), and a few sample completions to ``samples.jsonl``."""

    def __init__(self, cfg: GKDConfig, acc: Accelerator, output_dir: Path) -> None:
        self.cfg, self.acc, self.output_dir = cfg, acc, output_dir
        self.trackers = [t for t in cfg.report_to if t != "none"]

    def start(self) -> None:
        """Start the trackers (with the config's scalar fields as hyperparameters)."""
        if self.trackers:
            scalars = {k: v for k, v in self.cfg.to_dict().items() if isinstance(v, int | float | str | bool)}
            self.acc.init_trackers("gkd", config=scalars)

    def log(self, metrics: dict[str, float]) -> None:
        if self.trackers:
            self.acc.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))
        if self.acc.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(metrics) + "\n")

    @torch.no_grad()
    def log_samples(self, step: int, rollout: Rollout, tokenizer: Any, teacher: torch.nn.Module | None,
                    n: int = 2) -> None:
        """A few completions of the current step (``source``: the student's own samples, the dataset's
        references or the teacher's samples, by the kind of step) with the teacher's mean token log-prob;
        under ``teachers:`` the row's teacher (``teacher``: its name) scores it."""
        # every process scores (under ZeRO-3 a teacher forward is a collective); the main one writes
        scored = score(teacher, rollout, len(tokenizer)) if teacher is not None else None
        from gkd.teachers import TeacherRouter

        names = teacher.row_names(rollout.rows, rollout.completion_ids.shape[0]) if isinstance(
            teacher, TeacherRouter) else None
        teacher_logits = scored.teacher_logits if scored is not None else None
        served = scored.token_logprobs if scored is not None else None  # a served teacher's log p(y_t)
        if not self.acc.is_main_process:
            return
        with (self.output_dir / "samples.jsonl").open("a") as fh:
            for i in range(min(n, rollout.completion_ids.shape[0])):
                mask = rollout.completion_mask[i]
                ids = rollout.completion_ids[i][mask]
                source = "student" if rollout.on_policy else "reference" if rollout.is_reference else "teacher"
                record = {
                    "step": step, "on_policy": int(rollout.on_policy), "source": source,
                    "prompt": tokenizer.decode(rollout.prompt_ids[i][rollout.prompt_mask[i]]),
                    "completion": tokenizer.decode(ids),
                }
                if names is not None:  # teachers: whose row this is (its teacher log-prob is that teacher's)
                    record["teacher"] = names[i]
                if teacher_logits is not None or served is not None:
                    logp = (served[i][mask] if served is not None else
                            token_logprobs(teacher_logits[i : i + 1], rollout.completion_ids[i : i + 1])[0][mask])  # type: ignore[index]
                    record["teacher_logprob_mean"] = float(logp.mean()) if logp.numel() else None
                logger.info("sample step %d: %r -> %r (teacher log-prob %s)", step, record["prompt"][-80:],
                            record["completion"][:80], record.get("teacher_logprob_mean"))
                fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.trackers:
            self.acc.end_training()


def truncate_metrics(output_dir: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` lines of steps after ``step`` (a resumed run died after its checkpoint)."""
    metrics = output_dir / "metrics.jsonl"
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines() if _metrics_step(line) <= step]
        metrics.write_text("".join(line + "\n" for line in kept))


def _metrics_step(line: str) -> float:
    """Step of a metrics.jsonl line; a torn (half-written) line sorts after everything."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def write_model_card(path: Path, cfg: GKDConfig, history: list[dict[str, float]], algorithm: str,
                     settings: str) -> None:
    """``README.md`` beside the saved student: recipe, teacher, algorithm (``algorithm``: its name and
    paper; ``settings``: its knobs) and final metrics."""
    last = history[-1] if history else {}
    keep = ("loss", "divergence", "pg", "single_step", "reward", "completion_len_mean", "skipped_total")
    metrics = "\n".join(f"| {k} | {last[k]:.6g} |" for k in keep if k in last)
    student = f"`{cfg.student}`"
    teacher = f"`{cfg.teacher}`"
    if cfg.teachers:  # several teachers, rows routed by their teacher column
        from gkd.teacher_specs import teacher_specs

        teacher = ", ".join(f"{n}: `{s.model}`" for n, s in teacher_specs(cfg).items()) + (
            f" (rows routed by their `{cfg.teacher_column}` column)")
    marker = path.parent / "student-init" / "GKD_COMPLETE"
    if cfg.student_init and marker.is_file():
        made = json.loads(marker.read_text())
        student = (f"layers {made['keep_layers']} of the {made['source_layers']}-layer `{made['source']}` (student_init; "
                   "saved in `../student-init/`)")
    lora = f"LoRA adapters (r={cfg.lora_r}, alpha={cfg.lora_alpha}) on it" if cfg.lora_r else "full weights"
    tags = ", ".join(dict.fromkeys(["gkd", "knowledge-distillation", cfg.algorithm]))  # each tag once
    text = f"""---
library_name: transformers
tags: [{tags}]
---
# Student distilled with gkd

- **Algorithm:** {algorithm}; {settings}
- **Teacher:** {teacher}
- **Student initialisation:** {student} ({lora})
- **Data:** `{cfg.dataset}`; max_new_tokens={cfg.max_new_tokens}
- **Training:** {len(history)} logged optimizer steps of this run (max_steps={cfg.max_steps}),
  per_device_batch_size={cfg.per_device_batch_size}, gradient_accumulation_steps={cfg.gradient_accumulation_steps},
  learning_rate={cfg.learning_rate}, seed={cfg.seed}

## Final step metrics

| metric | value |
|---|---|
{metrics}

The full recipe is in `../config.yaml`, per-step metrics in `../metrics.jsonl`.
"""
    (path / "README.md").write_text(text)
