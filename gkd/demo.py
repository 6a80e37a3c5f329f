"""``gkd demo``: the embedded default, end to end, offline, on CPU.

1. Build the task tokenizer and a Llama-shaped teacher from config; train the teacher with
   supervised fine-tuning on the built-in task (cached, so a second demo skips this).
2. Build a smaller Qwen2-shaped student; give it a short supervised warm-up.
3. Distill with on-policy GKD, and, as a control, continue plain SFT for the same number of steps.
4. Print a table: accuracy of teacher / student before / after, teacher–student KL on held-out prompts.

Every model goes through ``save_pretrained`` → ``from_pretrained``, the path a hub model takes,
and every training phase is the same :class:`~gkd.trainer.GKDTrainer` that ``gkd train`` runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gkd.config import GKDConfig
from gkd.evaluate import EvalResult, evaluate
from gkd.task import STUDENT_SHAPE, TEACHER_SHAPE, cache_dir, check_answer, save_random_model, split_problems

__all__ = ["DemoPlan", "cached_teacher", "run_demo"]


@dataclass
class DemoPlan:
    """Step counts and hyper-parameters of the demo (``quick`` shrinks everything for smoke tests)."""

    max_digits: int = 4
    num_train: int = 20000
    num_eval: int = 256
    teacher_steps: int = 600
    teacher_lr: float = 2e-3
    teacher_batch: int = 64
    warmup_steps: int = 300
    gkd_steps: int = 150
    student_lr: float = 1e-3
    student_batch: int = 32
    gkd: dict[str, Any] = field(default_factory=lambda: {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5})
    minillm: dict[str, Any] = field(default_factory=lambda: {
        "algorithm": "minillm", "teacher_mix": 0.2, "num_rollouts": 128, "ppo_epochs": 4, "clip_eps": 0.2,
    })

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(num_train=512, num_eval=32, teacher_steps=4, warmup_steps=4, gkd_steps=3, student_batch=8,
                   teacher_batch=8, minillm={"algorithm": "minillm", "num_rollouts": 16, "ppo_epochs": 2})


def _sft(plan: DemoPlan, init: Path, out: Path, steps: int, lr: float, batch: int, seed: int,
         scheduler: str = "constant_with_warmup", progress: bool = True) -> Path:
    """Supervised fine-tuning = our trainer with divergence=kd, kd_weight=0, λ=0 (no teacher)."""
    from gkd.trainer import GKDTrainer

    cfg = GKDConfig(
        student=str(init), teacher=None, divergence="kd", kd_weight=0.0, lmbda=0.0,
        max_digits=plan.max_digits, num_train_examples=plan.num_train, max_new_tokens=2 * plan.max_digits + 1,
        max_steps=steps, per_device_batch_size=batch, learning_rate=lr, lr_scheduler=scheduler,
        warmup_steps=min(50, steps // 4), output_dir=str(out), seed=seed, progress_bar=progress,
        overwrite_output_dir=True,  # the demo owns its folders: a rerun starts each phase over
    )
    GKDTrainer(cfg).train()
    return out / "final"


def _distill(plan: DemoPlan, student: Path, teacher: Path, out: Path, steps: int, seed: int, progress: bool = True,
             **overrides: Any) -> Path:
    from gkd.trainer import GKDTrainer

    cfg = GKDConfig(
        student=str(student), teacher=str(teacher),
        max_digits=plan.max_digits, num_train_examples=plan.num_train, max_new_tokens=2 * plan.max_digits + 1,
        max_steps=steps, per_device_batch_size=plan.student_batch, learning_rate=plan.student_lr,
        lr_scheduler="constant", output_dir=str(out), seed=seed, progress_bar=progress, overwrite_output_dir=True,
        **overrides,
    )
    GKDTrainer(cfg).train()
    return out / "final"


def _load(path: Path):
    from gkd.models import load_model, load_tokenizer

    return load_model(str(path), "float32"), load_tokenizer(str(path))


def cached_teacher(plan: DemoPlan, work: Path, seed: int = 0, retrain: bool = False,
                   progress: bool = True) -> tuple[Path, bool]:
    """The demo teacher for ``plan``: from the cache (keyed by shape, task and training settings) or
    trained now with SFT and cached atomically. Returns its folder and whether it was cached."""
    key = hashlib.sha256(json.dumps([TEACHER_SHAPE, plan.max_digits, plan.num_train, plan.teacher_steps,
                                     plan.teacher_lr, plan.teacher_batch, seed]).encode()).hexdigest()[:12]
    cached = cache_dir() / "demo" / f"teacher-{key}"
    if (cached / "COMPLETED").exists() and not retrain:
        return cached, True
    trained = _sft(plan, save_random_model(work / "teacher-init", TEACHER_SHAPE, seed), work / "teacher-sft",
                   plan.teacher_steps, plan.teacher_lr, plan.teacher_batch, seed, scheduler="cosine", progress=progress)
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(trained, tmp)
    (tmp / "COMPLETED").write_text("ok")
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)  # atomic: a killed demo never leaves a half-written cached teacher
    return cached, False


def run_demo(output_dir: str | Path = "runs/demo", seed: int = 0, quick: bool = False,
             retrain_teacher: bool = False, algorithm: str = "gkd", progress: bool = True) -> dict[str, Any]:
    """Run the embedded default and return (and print, and save) its results table.

    ``algorithm="minillm"`` distills with MiniLLM (teacher-mixed sampling, PPO) instead of GKD.
    """
    if algorithm not in ("gkd", "minillm"):
        raise ValueError(f"algorithm must be gkd or minillm, got {algorithm!r}")
    torch.manual_seed(seed)
    plan = DemoPlan.quick() if quick else DemoPlan()
    work = Path(output_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _, held_out = split_problems(plan.num_train, plan.num_eval, plan.max_digits, seed=seed)
    prompts = [p.prompt for p in held_out]

    def ev(path: Path, teacher_model=None) -> EvalResult:
        model, tok = _load(path)
        return evaluate(model, tok, prompts, check_answer, teacher=teacher_model, max_new_tokens=2 * plan.max_digits + 1)

    print("[1/4] teacher: supervised training on the built-in task (cached after the first run)")
    teacher_path, was_cached = cached_teacher(plan, work, seed, retrain_teacher, progress)
    print(f"      teacher model: {teacher_path}  (a recipe's `teacher:` can point at it)")
    t_teacher = time.perf_counter() - t0
    teacher_model, _ = _load(teacher_path)
    teacher_eval = ev(teacher_path)

    print("[2/4] student: short supervised warm-up")
    warm = _sft(plan, save_random_model(work / "student-init", STUDENT_SHAPE, seed + 1), work / "student-warmup",
                plan.warmup_steps, plan.student_lr, plan.student_batch, seed, progress=progress)
    print(f"      warm student: {warm}")
    before = ev(warm, teacher_model)

    settings = plan.minillm if algorithm == "minillm" else plan.gkd
    label = "MiniLLM" if algorithm == "minillm" else "on-policy GKD"
    print(f"[3/4] {label} ({settings}) for {plan.gkd_steps} steps")
    t_gkd = time.perf_counter()
    gkd_final = _distill(plan, warm, teacher_path, work / f"student-{algorithm}", plan.gkd_steps, seed, progress,
                         **settings)
    print(f"      distilled student: {gkd_final}")
    t_gkd = time.perf_counter() - t_gkd
    after = ev(gkd_final, teacher_model)

    print(f"[4/4] control: {plan.gkd_steps} more steps of plain SFT from the same warm student")
    sft_final = _sft(plan, warm, work / "student-sft-control", plan.gkd_steps, plan.student_lr,
                     plan.student_batch, seed, progress=progress)
    print(f"      control student: {sft_final}")
    control = ev(sft_final, teacher_model)

    rows = [
        ("teacher", teacher_eval),
        ("student before (SFT warm-up)", before),
        (f"student after {label}", after),
        ("student after more SFT (control)", control),
    ]
    wall = time.perf_counter() - t0
    table = _table(rows)
    print()
    print(table)
    print(f"\nwall time {wall:.0f}s (teacher {'cached' if was_cached else f'trained in {t_teacher:.0f}s'}; "
          f"{label} phase {t_gkd:.0f}s for {plan.gkd_steps} steps); held-out prompts: {len(prompts)}")
    for shown in after.samples:
        print(f"  sample: {shown['prompt']!r} -> {shown['completion']!r}")
    result = {
        "rows": {name: {"accuracy": r.accuracy, "forward_kl": r.forward_kl, "reverse_kl": r.reverse_kl,
                        "completion_len_mean": r.completion_len_mean} for name, r in rows},
        "wall_time_s": wall, "teacher_cached": was_cached, "distill_time_s": t_gkd, "algorithm": algorithm,
        "plan": plan.__dict__, "teacher_path": str(teacher_path),
    }
    (work / "results.json").write_text(json.dumps(result, indent=2))
    (work / "results.md").write_text(table + "\n")
    return result


def _table(rows: list[tuple[str, EvalResult]]) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = ["| model | held-out exact match | KL(teacher‖student) | KL(student‖teacher) |", "|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r.accuracy:.1%} | {fmt(r.forward_kl)} | {fmt(r.reverse_kl)} |")
    return "\n".join(lines)
