"""The GKD trainer (Agarwal et al. 2024, Algorithm 1) on accelerate. Orchestration only.

One optimizer step reads top to bottom::

    on_policy = coin(λ)                        # once per step, rank 0, broadcast
    rollouts  = [rollout(b) for b in micro-batches]   # student samples | references | teacher samples
    N         = global number of completion tokens    # all micro-batches, all ranks
    for each micro-batch:  score (teacher logits) → loss (sum / N) → backward
    optimizer step → log → maybe save

The maths lives in :mod:`gkd.losses`, sampling in :mod:`gkd.rollout`, teacher scoring in
:mod:`gkd.scorer`, cross-rank agreement in :mod:`gkd.distributed`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from gkd import distributed
from gkd.config import GKDConfig
from gkd.data import PromptDataset, collate, load_rows, reference_rollout
from gkd.losses import distillation_loss_per_token, masked_sum_and_count
from gkd.rollout import Rollout, SamplingParams, sample
from gkd.scorer import check_tokenizers_match, completion_logits, output_vocab_size, score
from gkd.task import resolve_model_path

__all__ = ["GKDTrainer", "disable_dropout", "load_model", "load_tokenizer"]

logger = logging.getLogger("gkd")

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in both models (DESIGN §1.2): the divergence compares deterministic distributions."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The student's tokenizer; a missing pad token falls back to EOS (with a warning)."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no EOS token; completions could never end")
    if tok.pad_token_id is None:
        logger.warning("tokenizer of %s has no pad token; using EOS (%s) for padding", name_or_path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False) -> torch.nn.Module:
    """A causal LM through ``from_pretrained`` (hub id or local folder)."""
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code
    )


class _Timers:
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


class GKDTrainer:
    """On-policy distillation of ``student`` towards ``teacher``.

    Models, tokenizer and rows may be passed in (Python API, notebooks); otherwise they are
    loaded from ``config.student`` / ``config.teacher`` / ``config.dataset``.
    """

    def __init__(
        self,
        config: GKDConfig,
        *,
        student: torch.nn.Module | None = None,
        teacher: torch.nn.Module | None = None,
        tokenizer: Any = None,
        train_rows: list[dict[str, Any]] | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.config = cfg = config
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
            ),
        )
        set_seed(cfg.seed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.student, cfg.trust_remote_code)
        student = student if student is not None else load_model(cfg.student, cfg.student_dtype, cfg.trust_remote_code)
        if teacher is None and not cfg.is_pure_sft:
            teacher_tok = load_tokenizer(cfg.teacher, cfg.trust_remote_code)  # type: ignore[arg-type]
            check_tokenizers_match(self.tokenizer, teacher_tok)
            teacher = load_model(cfg.teacher, cfg.teacher_dtype, cfg.trust_remote_code)  # type: ignore[arg-type]
        self.vocab_size = len(self.tokenizer)
        for name, model in (("student", student), ("teacher", teacher)):
            if model is not None and output_vocab_size(model) < self.vocab_size:
                raise ValueError(
                    f"{name} has {output_vocab_size(model)} output rows but the tokenizer has {self.vocab_size} tokens"
                )
        disable_dropout(student)
        if cfg.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        if teacher is not None:
            disable_dropout(teacher)
            teacher.requires_grad_(False).eval()
            teacher.to(self.accelerator.device)

        rows = train_rows if train_rows is not None else load_rows(
            cfg.dataset, self.tokenizer, dataset_format=cfg.dataset_format,
            num_examples=cfg.num_train_examples, max_digits=cfg.max_digits, seed=cfg.seed,
        )
        dataset = PromptDataset(rows, self.tokenizer, max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.per_device_batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad],
            lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
        # The scheduler is stepped by us once per optimizer step (not prepared: accelerate would
        # step it once per process).
        self.scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
        )
        self.student, self.optimizer, self.loader = self.accelerator.prepare(student, optimizer, loader)
        self.teacher = teacher
        if len(self.loader) == 0:
            raise ValueError(
                f"{len(dataset)} training rows give no full batch of per_device_batch_size={cfg.per_device_batch_size} "
                f"on {self.accelerator.num_processes} process(es)"
            )
        self.sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
        self.coin = distributed.OnPolicyScheduler(cfg.lmbda, cfg.seed)
        self.sample_generator = torch.Generator(self.accelerator.device).manual_seed(
            cfg.seed + 1_000_003 * self.accelerator.process_index
        )
        self.timers = _Timers()
        self.step = 0
        self.epoch = 0
        self._batches = self._batch_stream()
        self.output_dir = Path(cfg.output_dir)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / "config.yaml")

    # --- phases -------------------------------------------------------------------------------

    def _batch_stream(self) -> Iterator[dict[str, Any]]:
        while True:
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            yield from self.loader
            self.epoch += 1

    def rollout(self, batch: dict[str, Any], on_policy: bool) -> Rollout:
        """Student samples (on-policy), teacher samples (``seq_kd``) or the dataset's references."""
        if not on_policy and not self.config.seq_kd:
            return reference_rollout(batch)
        model = self.accelerator.unwrap_model(self.student) if on_policy else self.teacher
        rollout = sample(
            model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            self.sampling,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            vocab_size=self.vocab_size,
            generator=self.sample_generator,
            all_ranks_done=distributed.all_ranks_done if distributed.is_distributed() else None,
        )
        rollout.on_policy = on_policy
        return rollout

    def loss_terms(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-token losses, count) for one micro-batch; teacher scored here, student with grad."""
        cfg = self.config
        with self.timers("score"):
            teacher_logits = score(self.teacher, rollout, self.vocab_size).teacher_logits
        with self.timers("update"):
            student_logits = completion_logits(self.student, rollout, self.vocab_size)
            per_token = distillation_loss_per_token(
                student_logits,
                teacher_logits,
                divergence=cfg.divergence,
                beta=cfg.beta,
                skew=cfg.skew,
                temperature=cfg.loss_temperature,
                kd_weight=cfg.kd_weight,
                labels=None if rollout.on_policy else rollout.completion_ids,
            )
            return masked_sum_and_count(per_token, rollout.completion_mask, cfg.reduction)

    def train_step(self) -> dict[str, float]:
        """One optimizer step: rollout → score → loss → backward → step."""
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        on_policy = self.coin.draw()
        batches = [next(self._batches) for _ in range(cfg.gradient_accumulation_steps)]
        with self.timers("rollout"):
            rollouts = [self.rollout(b, on_policy) for b in batches]
        counts = [masked_sum_and_count(torch.zeros_like(r.completion_mask, dtype=torch.float32),
                                       r.completion_mask, cfg.reduction)[1] for r in rollouts]
        normalizer = distributed.all_reduce_sum(torch.stack(counts).sum()).clamp(min=1.0)
        # accelerate divides by the accumulation steps and DDP/DeepSpeed average over ranks;
        # this factor undoes both, so the gradient is d(global sum / N)/dθ.
        scale = cfg.gradient_accumulation_steps * acc.num_processes / normalizer
        loss_sum = torch.zeros((), device=acc.device)
        grad_norm = None
        for rollout in rollouts:
            with acc.accumulate(self.student):
                total, _ = self.loss_terms(rollout)
                with self.timers("update"):
                    acc.backward(total * scale.to(total.device))
                    loss_sum += total.detach()
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1

        tokens = distributed.all_reduce_sum(torch.tensor(float(sum(r.num_tokens for r in rollouts))))
        seqs = distributed.all_reduce_sum(torch.tensor(float(sum(r.completion_ids.shape[0] for r in rollouts))))
        loss = distributed.all_reduce_sum(loss_sum.cpu()) / normalizer.cpu()
        elapsed = time.perf_counter() - start
        times = self.timers.pop()
        metrics = {
            "step": self.step,
            "loss": float(loss),
            "on_policy": int(on_policy),
            "completion_len_mean": float(tokens / seqs.clamp(min=1)),
            "lr": float(lr),
            "tokens_per_s": float(tokens) / max(elapsed, 1e-9),
            "time_rollout": times.get("rollout", 0.0),
            "time_score": times.get("score", 0.0),
            "time_update": times.get("update", 0.0),
            "time_step": elapsed,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {self.step}")
        return metrics

    # --- outer loop ---------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` optimizer steps; returns the per-step metrics."""
        cfg, acc = self.config, self.accelerator
        history: list[dict[str, float]] = []
        bar = None
        if cfg.progress_bar and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="gkd", dynamic_ncols=True)
        self.student.train()
        while self.step < cfg.max_steps:
            metrics = self.train_step()
            history.append(metrics)
            if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                self.log(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", on_policy=metrics["on_policy"],
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if cfg.save_final_model:
            self.save_model(self.output_dir / "final")
        return history

    def log(self, metrics: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(metrics) + "\n")

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` + trainer state, then a ``COMPLETED`` marker written last."""
        acc = self.accelerator
        path = self.output_dir / f"checkpoint-{self.step}"
        if acc.is_main_process and path.exists():
            shutil.rmtree(path)
        acc.wait_for_everyone()
        acc.save_state(str(path))
        if acc.is_main_process:
            state = {"step": self.step, "epoch": self.epoch, "coin": self.coin.state_dict()["generator"].tolist(),
                     "scheduler": self.scheduler.state_dict()}
            (path / "trainer_state.json").write_text(json.dumps(state))
            with open(path / "COMPLETED", "w") as fh:
                fh.write(str(self.step))
                fh.flush()
                os.fsync(fh.fileno())
        acc.wait_for_everyone()
        return path

    def save_model(self, path: Path) -> None:
        """The student in Hugging Face format (loadable with ``AutoModelForCausalLM.from_pretrained``)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.student)
        if acc.is_main_process:
            model = acc.unwrap_model(self.student)
            model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
        acc.wait_for_everyone()
