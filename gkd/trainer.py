"""The trainer: wires the parts of a run and runs the loop.

    models, data, sampler, updater, reporter  (built once, in ``__init__``)
    algorithm = ALGORITHMS[config.algorithm]  (gkd | minillm: gkd/algorithms/)
    while step < max_steps:
        metrics = next(algorithm.steps())     # rollout → score → loss → backward → optimizer step
        maybe evaluate → log → maybe checkpoint → stop on a signal (with a checkpoint)

What each stage computes lives in its own module: sampling in :mod:`gkd.sampling` / :mod:`gkd.rollout`,
teacher scoring in :mod:`gkd.scorer`, the losses in :mod:`gkd.losses`, the optimizer step in
:mod:`gkd.update`, cross-rank agreement in :mod:`gkd.distributed`, checkpoints in
:mod:`gkd.checkpoint`, metrics and samples in :mod:`gkd.reporting`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from gkd import distributed
from gkd.algorithms import Algorithm, RunParts, get_algorithm
from gkd.checkpoint import (
    TrainingState,
    apply_optimizer_settings,
    claim_output_dir,
    config_changes,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
    state_config,
)
from gkd.config import GKDConfig
from gkd.data import BatchStream, config_rows, given_rows, make_loader, require_references
from gkd.errors import PREEMPTED_EXIT_CODE, ConfigError, InputError, NonFiniteError, Preempted
from gkd.evaluate import eval_shard, evaluate_in_training
from gkd.models import (
    build_accelerator,
    disable_dropout,
    finish_models,
    load_model,
    load_models,
    load_tokenizer,
    merge_adapters,
)
from gkd.objectives import PROJECTION_ATTR, setup_objectives
from gkd.reporting import Reporter, Timers, add_timing, truncate_metrics, write_model_card
from gkd.rewards import RewardFunctions
from gkd.sampling import RolloutSampler
from gkd.teachers import TeacherRouter, load_router
from gkd.update import Updater

__all__ = ["PREEMPTED_EXIT_CODE", "GKDTrainer", "NonFiniteError", "Preempted", "build_accelerator", "disable_dropout",
           "load_model", "load_tokenizer"]

logger = logging.getLogger("gkd")


class GKDTrainer:
    """On-policy distillation of ``student`` towards ``teacher`` (``config.algorithm``: gkd | minillm).

    Models, tokenizer and rows may be passed in (Python API, notebooks); otherwise they are
    loaded from ``config.student`` / ``config.teacher`` / ``config.dataset``. Several teachers
    (``config.teachers``) may be passed as ``teachers={name: model}``, with the same names.
    """

    def __init__(
        self,
        config: GKDConfig,
        *,
        student: torch.nn.Module | None = None,
        teacher: torch.nn.Module | None = None,
        tokenizer: Any = None,
        train_rows: list[dict[str, Any]] | None = None,
        lm_rows: list[dict[str, Any]] | None = None,
        eval_rows: list[dict[str, Any]] | None = None,
        accelerator: Accelerator | None = None,
        teachers: dict[str, torch.nn.Module] | None = None,
    ) -> None:
        self.config = cfg = config
        self.accelerator = acc = accelerator or build_accelerator(cfg)
        set_seed(cfg.seed)
        claim_output_dir(Path(cfg.output_dir), cfg.resume_from_checkpoint, cfg.overwrite_output_dir, acc.is_main_process)
        acc.wait_for_everyone()  # the main process may have deleted an old run's outputs
        algorithm_cls = get_algorithm(cfg.algorithm)
        algorithm_cls.check(cfg, acc.num_processes)
        if distributed.zero_stage(acc):
            distributed.check_deepspeed_batch_sizes(acc.state.deepspeed_plugin.deepspeed_config,
                                                    cfg.per_device_batch_size, cfg.gradient_accumulation_steps,
                                                    acc.num_processes)
        if teachers is not None and cfg.teachers is None:
            raise ConfigError("teachers= (several teacher models) needs config.teachers naming the same teachers")
        if teacher is not None and cfg.teachers is not None:
            raise ConfigError("config.teachers is set: pass the models as teachers={name: model} (teacher: joins "
                              "them as 'default'), not teacher=")
        self.tokenizer, student, teacher = load_models(cfg, acc, student, teacher, tokenizer)
        if cfg.teachers is not None:  # several teachers: rows routed to theirs (gkd/teachers.py)
            teacher = load_router(cfg, acc, self.tokenizer, teachers)
        objectives = setup_objectives(cfg, student, teacher)
        finish_models(cfg, student, teacher)
        rewards = RewardFunctions.from_specs(cfg.reward_funcs, cfg.reward_weights or None)

        rows = self._rows(train_rows, cfg.dataset)
        algorithm_cls.check_rows(cfg, rows)
        if isinstance(teacher, TeacherRouter):  # every row names a known teacher, before any step
            logger.info("rows per teacher: %s", teacher.check_rows(rows))
        loader = make_loader(rows, self.tokenizer, cfg, cfg.seed)
        lm_loader = None
        if cfg.lm_coef > 0:
            lm = self._rows(lm_rows, cfg.lm_dataset)
            require_references(lm, f"lm_coef={cfg.lm_coef} trains on lm_dataset's text", "drop the row")
            if isinstance(teacher, TeacherRouter):
                teacher.check_rows(lm)
            lm_loader = make_loader(lm, self.tokenizer, cfg, cfg.seed + 1)
        optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
            lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
        # Stepped by us once per optimizer step (a prepared scheduler steps once per process).
        self.scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
        )
        self.student, self.optimizer, self.loader = acc.prepare(student, optimizer, loader)
        self.lm_loader = acc.prepare(lm_loader) if lm_loader is not None else None
        acc.register_for_checkpointing(self.scheduler)
        # teacher: replicated (no DeepSpeed / ZeRO-2) or ZeRO-3-sharded for inference, never with optimizer state
        # a served teacher (teacher: http://…) is a client object and stays as it is
        if isinstance(teacher, TeacherRouter):
            teacher.map_models(lambda model: distributed.prepare_teacher(model, acc))
        self.teacher = distributed.prepare_teacher(teacher, acc) if isinstance(teacher, torch.nn.Module) else teacher
        if len(self.loader) == 0:
            raise InputError(
                f"{len(rows)} training rows give no full batch of per_device_batch_size={cfg.per_device_batch_size} "
                f"on {acc.num_processes} process(es)"
            )
        self.eval_rows = eval_shard(self._rows(eval_rows, cfg.dataset, "validation"), cfg.eval_prompts,
                                    acc.process_index, acc.num_processes, cfg.eval_steps) if cfg.eval_steps else []
        if isinstance(teacher, TeacherRouter):
            teacher.check_rows(self.eval_rows)
        self.output_dir = Path(cfg.output_dir)
        if acc.is_main_process:
            _check_writable(self.output_dir)
        self.timers = Timers()
        self.updater = Updater(cfg, acc, self.student, self.optimizer, self.scheduler, self.timers, self.output_dir)
        unwrapped = acc.unwrap_model(self.student)
        self.sampler = RolloutSampler(cfg, acc, self.tokenizer, unwrapped, self.teacher, lambda: self.updater.step)
        self.reporter = Reporter(cfg, acc, self.output_dir)
        self.parts = RunParts(
            config=cfg, accelerator=acc, tokenizer=self.tokenizer, student=self.student, unwrapped=unwrapped,
            teacher=self.teacher, objectives=objectives, sampler=self.sampler, updater=self.updater, rewards=rewards,
            batches=BatchStream(self.loader, acc.skip_first_batches),
            lm_batches=BatchStream(self.lm_loader, acc.skip_first_batches) if self.lm_loader is not None else None,
            timers=self.timers, reporter=self.reporter,
        )
        if cfg.lmbda_schedule == "adaptive":  # the held-out rows of adaptive λ's validation loss
            held_out = self._rows(eval_rows, cfg.dataset, "validation")
            if len(held_out) < acc.num_processes:
                raise InputError(f"lmbda_schedule=adaptive measures a validation loss on held-out rows, but there are "
                                 f"{len(held_out)}; set validation_size (e.g. 64)")
            self.parts.validation_rows = eval_shard(held_out, cfg.lmbda_val_prompts, acc.process_index,
                                                    acc.num_processes)
        if cfg.teacher_cache:  # the teacher's view of reference rows, scored once by gkd cache-teacher
            from gkd.serving.cache import open_cache

            self.parts.teacher_cache = open_cache(cfg, self.tokenizer, teacher, loader.dataset,
                                                  structural=bool(objectives.structural))
        self.algorithm: Algorithm = algorithm_cls(self.parts)
        self._steps: Iterator[dict[str, float]] = iter(())
        resume = find_resume_checkpoint(cfg.resume_from_checkpoint, self.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        elif acc.is_main_process:  # "latest" without a checkpoint: a fresh start, without the dead run's lines
            truncate_metrics(self.output_dir, 0)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / "config.yaml")
        self.reporter.start()

    def _rows(self, given: Any, dataset: str | None, part: str = "train") -> list[dict[str, Any]]:
        if given is not None:
            return given_rows(given, self.tokenizer, self.config.dataset_format)
        return config_rows(self.config, dataset, self.tokenizer, part)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.updater.step

    @property
    def vllm(self) -> Any:
        """The colocated vLLM engine (``rollout_backend: vllm``), else ``None``."""
        return self.sampler.vllm

    # --- the loop -----------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step of the configured algorithm, with its timings."""
        start = time.perf_counter()
        metrics = next(self._steps, None)
        if metrics is None:  # the algorithm's iteration ended (a MiniLLM buffer is used up): start the next
            self._steps = self.algorithm.steps()
            metrics = next(self._steps)
        return add_timing(metrics, time.perf_counter() - start, self.timers.pop())

    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` optimizer steps; returns the per-step metrics."""
        cfg, acc = self.config, self.accelerator
        history: list[dict[str, float]] = []
        bar = None
        if cfg.progress_bar and acc.is_main_process and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.algorithm, dynamic_ncols=True)
        self.student.train()
        with _stop_on_signals() as stop:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                evaluated = bool(cfg.eval_steps) and (self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps)
                if evaluated:
                    metrics.update(self.evaluate())
                history.append(metrics)
                if evaluated or self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                    self.log(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", on_policy=metrics["on_policy"],
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")
                if cfg.save_steps and self.step % cfg.save_steps == 0 and not metrics["skipped"]:
                    self.save_checkpoint()  # never right after a skipped (non-finite) step
                # a signal on any rank stops every rank after this step, with a checkpoint
                if distributed.any_rank(stop["signal"] is not None) and self.step < cfg.max_steps:
                    path = self.save_checkpoint()
                    if bar is not None:
                        bar.close()
                    raise Preempted(stop["signal"] or "a signal on another rank", self.step, path)
        if bar is not None:
            bar.close()
        if history and self.updater.applied == 0:  # every step of this run was skipped: a failed run
            raise self.updater.failure()
        if cfg.save_final_model:
            self.save_model(self.output_dir / "final")
            if acc.is_main_process:
                write_model_card(self.output_dir / "final", cfg, history, self.algorithm.title,
                                 self.algorithm.settings())
        self.reporter.close()
        return history

    def log(self, metrics: dict[str, float]) -> None:
        """One line of ``metrics.jsonl`` and, with ``report_to``, the same scalars to the trackers."""
        self.reporter.log(metrics)

    def evaluate(self) -> dict[str, float]:
        """Greedy held-out evaluation of the current student (``eval_steps``), summed over processes."""
        cfg = self.config
        return evaluate_in_training(
            self.accelerator.unwrap_model(self.student), self.tokenizer, self.eval_rows,
            teacher=self.teacher if isinstance(self.teacher, torch.nn.Module) or (  # KLs need full logits
                isinstance(self.teacher, TeacherRouter) and not self.teacher.has_remote) else None,
            dataset=cfg.dataset, max_new_tokens=cfg.max_new_tokens, max_prompt_length=cfg.max_prompt_length,
            gather_for_generation=cfg.zero3_gather_for_generation)

    # --- checkpoints and the exported model ------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` + the trainer's and the algorithm's state, then ``COMPLETED``."""
        p = self.parts
        state = TrainingState(
            trainer={"step": self.step, "data_pos": {"train": p.batches.position,
                                                     "lm": p.lm_batches.position if p.lm_batches else [0, 0]},
                     "num_processes": self.accelerator.num_processes, "config": self.config.to_dict()},
            generators={name: g.get_state() for name, g in self._generators().items()},
            rank_files=self.algorithm.state_dict(),
        )
        return save_checkpoint(self.accelerator, self.output_dir, self.step, state, self.config.save_total_limit)

    def _generators(self) -> dict[str, torch.Generator]:
        return {"sample": self.sampler.generator, **self.algorithm.generators()}

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; the next step is exactly the one an
        uninterrupted run would have taken."""
        saved = state_config(path)
        changed = config_changes(saved, self.config) if saved is not None else {}
        state = load_checkpoint(self.accelerator, path, self.algorithm.state_files)
        if changed:
            apply_optimizer_settings(self.config, self.optimizer, self.scheduler, changed)
            logger.warning("resumed with changed settings: %s",
                           ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changed.items()))
        for name, generator in self._generators().items():
            generator.set_state(state.generators[name])
        self.algorithm.load_state_dict(state.rank_files)
        self.updater.step = state.trainer["step"]
        self.parts.batches.load_position(state.trainer["data_pos"]["train"])
        if self.parts.lm_batches is not None:
            self.parts.lm_batches.load_position(state.trainer["data_pos"]["lm"])
        if self.accelerator.is_main_process:  # drop metrics of steps after the checkpoint (the run died after it)
            truncate_metrics(self.output_dir, self.step)
        logger.info("resumed from %s at step %d", path, self.step)

    def save_model(self, path: Path) -> None:
        """The student in Hugging Face format (loadable with ``AutoModelForCausalLM.from_pretrained``)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.student)
        if state_dict is not None:  # the hidden-state projection is training machinery, not part of the model
            state_dict = {k: v for k, v in state_dict.items() if PROJECTION_ATTR not in k}
        if acc.is_main_process:
            model = acc.unwrap_model(self.student)
            model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)  # adapters only under LoRA
            self.tokenizer.save_pretrained(path)
            if self.config.lora_r > 0 and self.config.merge_lora:
                merge_adapters(self.config, path, path.with_name(path.name + "-merged"))
        acc.wait_for_everyone()


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, Any]]:
    """SIGTERM / SIGINT set a flag instead of killing the process; the loop checkpoints and stops.
    A second SIGINT interrupts at once."""
    import signal
    import threading

    flag: dict[str, Any] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        logger.warning("%s received: finishing the current step, then saving a checkpoint", flag["signal"])

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _check_writable(path: Path) -> None:
    """Fail before training, not at the first checkpoint, when output_dir cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output_dir={str(path)!r} is not writable: {e.strerror or e}") from None
