"""The trainer: GKD (Agarwal et al. 2024, Algorithm 1) and MiniLLM (Gu et al. 2024) on accelerate.

Orchestration only. A GKD optimizer step reads top to bottom::

    on_policy = coin(λ)                        # once per step, rank 0, broadcast
    rollouts  = [rollout(b) for b in micro-batches]   # student samples | references | teacher samples
    rewards   = user reward functions (optional, GKD eq. 5)
    optimize(rollouts):                        # shared by both algorithms
        N = global number of completion tokens # all micro-batches, all ranks
        for each micro-batch: score (teacher logits) → loss (sum / N) → backward
        optimizer step
    log → maybe save

A MiniLLM iteration collects ``num_rollouts`` teacher-mixed samples, turns per-token rewards into
length-normalised returns (whitened over the global buffer), then runs ``ppo_epochs`` passes of
``optimize`` over the buffer. The maths lives in :mod:`gkd.losses`, sampling in :mod:`gkd.rollout`,
teacher scoring in :mod:`gkd.scorer`, rewards in :mod:`gkd.rewards`, cross-rank agreement in
:mod:`gkd.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    set_seed,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from gkd import distributed
from gkd.checkpoint import (
    MARKER,
    CheckpointError,
    complete_checkpoints,
    find_resume_checkpoint,
    mark_completed,
    rotate_checkpoints,
)
from gkd.chunked import ChunkFn, chunked_loss, token_weights
from gkd.config import ConfigError, GKDConfig, InputError
from gkd.data import PromptDataset, collate, load_rows, normalize_rows, reference_rollout
from gkd.losses import (
    TeacherTopK,
    importance_weights,
    kd_per_token,
    masked_moments,
    masked_sum_and_count,
    minillm_returns,
    minillm_rewards,
    policy_gradient_loss,
    ppo_clipped_loss,
    single_step_reverse_kl,
    token_logprobs,
    whiten,
)
from gkd.objectives import (
    PROJECTION_ATTR,
    HiddenProjection,
    objective_terms,
    parse_objectives,
    resolve_layer_map,
    temperature_at,
)
from gkd.rewards import RewardFunctions
from gkd.rollout import Rollout, SamplingParams, sample
from gkd.rollout_vllm import VLLMSampler
from gkd.scorer import (
    CompletionOutputs,
    ScoredRollout,
    check_tokenizers_match,
    completion_logits,
    completion_outputs,
    lm_head,
    output_vocab_size,
    score,
)
from gkd.task import resolve_model_path

__all__ = ["PREEMPTED_EXIT_CODE", "GKDTrainer", "NonFiniteError", "Preempted", "build_accelerator", "disable_dropout", "load_model", "load_tokenizer"]

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
        raise InputError(f"tokenizer of {name_or_path!r} has no EOS token; completions could never end")
    if tok.pad_token_id is None:
        logger.warning("tokenizer of %s has no pad token; using EOS (%s) for padding", name_or_path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False,
               quantization: str = "none") -> torch.nn.Module:
    """A causal LM through ``from_pretrained`` (hub id or local folder); ``quantization`` 8bit/4bit
    loads it through bitsandbytes (inference only: used for the teacher)."""
    kwargs: dict[str, Any] = {}
    if quantization != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise InputError(
                f"teacher_quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes (GPU only)"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs
    )


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; resume to continue


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a complete checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"received {signal_name}: stopped after step {step} and saved {checkpoint}; "
            "resume with the same command plus resume_from_checkpoint=latest"
        )


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had NaN/inf values; the run stopped, checkpoints untouched."""

    def __init__(self, step: int, cause: str, count: int, output_dir: Path):
        from gkd.checkpoint import complete_checkpoints

        saved = complete_checkpoints(output_dir)
        last = f"the last good checkpoint {saved[-1]} is intact" if saved else "no checkpoint was saved yet"
        hint = {
            "teacher logits": "the teacher produced NaN/inf: check its weights and teacher_dtype (fp16 overflows; use bfloat16)",
            "student logits": "the student diverged: lower learning_rate, keep max_grad_norm > 0, prefer bf16 over fp16",
            "loss": "the divergence overflowed: lower loss_temperature extremes or learning_rate",
            "gradients": "gradients overflowed: lower learning_rate, enable max_grad_norm, prefer bf16 over fp16",
        }[cause]
        super().__init__(f"step {step}: {count} consecutive steps skipped for non-finite {cause}; {hint}; {last}")


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


def draft_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """Teacher-mixed sampling over a buffer, all ranks: the share of drafts accepted, and the tokens
    a live sequence commits per teacher pass (1 to ``mix_draft_tokens``)."""
    stats = [r.draft_stats for r in rollouts if r.draft_stats is not None]
    if not stats:
        return {}
    totals = distributed.all_reduce_sum(torch.tensor(
        [sum(s[0] for s in stats), sum(s[1] for s in stats), sum(s[2] for s in stats),
         float(sum(r.completion_mask.sum() for r in rollouts))], dtype=torch.float64))
    accepted, rejected, row_rounds, tokens = totals.tolist()
    return {"mix_draft_accept": accepted / max(accepted + rejected, 1.0),
            "mix_tokens_per_teacher_pass": tokens / max(row_rounds, 1.0)}


class GKDTrainer:
    """On-policy distillation of ``student`` towards ``teacher`` (``config.algorithm``: gkd | minillm).

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
        lm_rows: list[dict[str, Any]] | None = None,
        eval_rows: list[dict[str, Any]] | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.config = cfg = config
        self.accelerator = acc = accelerator or build_accelerator(cfg)
        set_seed(cfg.seed)
        self._check_batch_arithmetic()
        if distributed.zero_stage(acc):
            distributed.check_deepspeed_batch_sizes(acc.state.deepspeed_plugin.deepspeed_config,
                                                    cfg.per_device_batch_size, cfg.gradient_accumulation_steps,
                                                    acc.num_processes)
        need_teacher = teacher is None and not cfg.is_pure_sft
        with acc.main_process_first():  # one process fills caches (built-in models, tokenizer files) first
            student_path = resolve_model_path(cfg.student)
            teacher_path = resolve_model_path(cfg.teacher) if need_teacher else None  # type: ignore[arg-type]
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(student_path, cfg.trust_remote_code)
            if teacher_path is not None:
                check_tokenizers_match(self.tokenizer, load_tokenizer(teacher_path, cfg.trust_remote_code))
        # every process loads the weights at once: under ZeRO-3, from_pretrained partitions them collectively
        if student is None:
            student = load_model(student_path, cfg.student_dtype, cfg.trust_remote_code)
        if teacher_path is not None:
            teacher = load_model(teacher_path, cfg.teacher_dtype, cfg.trust_remote_code, cfg.teacher_quantization)
        self.vocab_size = len(self.tokenizer)
        for name, model in (("student", student), ("teacher", teacher)):
            if model is not None and output_vocab_size(model) < self.vocab_size:
                raise InputError(
                    f"{name} has {output_vocab_size(model)} output rows but the tokenizer has {self.vocab_size} tokens"
                )
        if cfg.lora_r > 0:
            student = add_lora(student, cfg)
        if cfg.fused_lm_head:
            if distributed.zero_stage(acc) == 3:
                raise ConfigError("fused_lm_head is not supported under ZeRO-3 (the head weight is sharded); use "
                                  "loss_chunk_size alone, which bounds the loss's memory the same way")
            lm_head(student)  # a plain bias-free head, or a clear error now rather than at the first step
        if cfg.teacher_topk and teacher is not None:
            lm_head(teacher)
        self._setup_objectives(student, teacher)
        disable_dropout(student)
        if cfg.gradient_checkpointing:
            student.gradient_checkpointing_enable()
            if cfg.lora_r > 0:
                student.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
        if teacher is not None:
            disable_dropout(teacher)
            teacher.requires_grad_(False).eval()
        self.rewards = RewardFunctions.from_specs(cfg.reward_funcs, cfg.reward_weights or None)

        rows = self._given_rows(train_rows) if train_rows is not None else self._load_rows(cfg.dataset)
        loader = self._loader(rows, cfg.seed)
        lm_loader = None
        if cfg.lm_coef > 0:
            lm_loader = self._loader(self._given_rows(lm_rows) if lm_rows is not None else self._load_rows(cfg.lm_dataset),
                                     cfg.seed + 1)
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
        self.teacher = distributed.prepare_teacher(teacher, acc) if teacher is not None else None
        if len(self.loader) == 0:
            raise InputError(
                f"{len(rows)} training rows give no full batch of per_device_batch_size={cfg.per_device_batch_size} "
                f"on {acc.num_processes} process(es)"
            )
        self.eval_rows = self._eval_shard(eval_rows) if cfg.eval_steps else []
        self.sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
        self.vllm = self._build_vllm() if cfg.rollout_backend == "vllm" else None
        self.coin = distributed.OnPolicyScheduler(cfg.lmbda, cfg.seed)
        self.sample_generator = torch.Generator(acc.device).manual_seed(cfg.seed + 1_000_003 * acc.process_index)
        self.ppo_generator = torch.Generator().manual_seed(cfg.seed + 7)
        self.timers = _Timers()
        self.minillm_state: dict[str, Any] | None = None  # MiniLLM buffer in progress (see minillm_iteration)
        self.consecutive_skips = self.skipped_steps = 0
        self._last_logits: tuple[torch.Tensor, torch.Tensor | None] = (torch.zeros(()), None)
        self.step = 0
        # data position: epoch and batches handed out in it, per stream (exact resume)
        self.data_pos = {"train": [0, 0], "lm": [0, 0]}
        self.output_dir = Path(cfg.output_dir)
        if acc.is_main_process:
            _check_writable(self.output_dir)
        resume = find_resume_checkpoint(cfg.resume_from_checkpoint, self.output_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        self._batches = self._batch_stream(self.loader, "train")
        self._lm_batches = self._batch_stream(self.lm_loader, "lm") if self.lm_loader is not None else None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / "config.yaml")
        self.trackers = [t for t in cfg.report_to if t != "none"]
        if self.trackers:
            scalars = {k: v for k, v in cfg.to_dict().items() if isinstance(v, int | float | str | bool)}
            acc.init_trackers("gkd", config=scalars)

    # --- setup helpers ----------------------------------------------------------------------

    def _setup_objectives(self, student: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
        """Parse the weighted objectives; for hidden-state / attention objectives resolve the layer map,
        switch both models to eager attention if attention maps are needed, and attach the learned
        hidden-state projection to the student (so DDP / DeepSpeed / checkpoints treat it as the
        student's own parameters; :meth:`save_model` drops it)."""
        cfg = self.config
        explicit = parse_objectives(cfg.objectives)
        self.objectives = explicit or parse_objectives([cfg.divergence])
        self.hidden_layers: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self.attention_layers: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self.layer_map: dict[int, int] = {}
        uses_hidden = any(o.uses_hidden for o in explicit)
        uses_attention = any(o.uses_attention for o in explicit)
        if not (uses_hidden or uses_attention):
            return
        assert teacher is not None
        s_cfg, t_cfg = student.config, teacher.config
        self.layer_map = resolve_layer_map(cfg.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
        if uses_hidden:
            self.hidden_layers = (tuple(self.layer_map), tuple(self.layer_map.values()))
            projection = HiddenProjection(self.layer_map, s_cfg.hidden_size, t_cfg.hidden_size, seed=cfg.seed)
            student.add_module(PROJECTION_ATTR, projection.to(next(student.parameters()).device))
        if uses_attention:
            heads = (s_cfg.num_attention_heads, t_cfg.num_attention_heads)
            if heads[0] != heads[1]:
                raise InputError(
                    f"attention_kl needs the same number of attention heads, but the student has {heads[0]} and the "
                    f"teacher {heads[1]}; drop attention_kl from objectives"
                )
            pairs = {s: t for s, t in self.layer_map.items() if s > 0 and t > 0}
            if not pairs:
                raise ConfigError(f"attention_kl needs layer_map pairs of blocks (>= 1), got {self.layer_map}")
            self.attention_layers = (tuple(pairs), tuple(pairs.values()))
            for model in (student, teacher):
                model.set_attn_implementation("eager")  # sdpa / flash kernels return no attention maps

    @property
    def loss_temperature(self) -> float:
        """τ of the current step under ``loss_temperature_schedule``."""
        cfg = self.config
        return temperature_at(self.step, cfg.max_steps, cfg.loss_temperature, cfg.loss_temperature_end,
                              cfg.loss_temperature_schedule)

    def _check_batch_arithmetic(self) -> None:
        cfg, world = self.config, self.accelerator.num_processes
        if cfg.algorithm != "minillm":
            return
        per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world
        if cfg.num_rollouts % per_step:
            raise ConfigError(
                f"num_rollouts={cfg.num_rollouts} must be a multiple of per_device_batch_size × "
                f"gradient_accumulation_steps × processes = {cfg.per_device_batch_size} × "
                f"{cfg.gradient_accumulation_steps} × {world} = {per_step}"
            )

    def _load_rows(self, dataset: str | None, part: str = "train") -> list[dict[str, Any]]:
        cfg = self.config
        # the train/validation split and the length filter apply to the training dataset only
        split = dict(validation_size=cfg.validation_size, split_seed=cfg.split_seed,
                     max_response_length=cfg.max_response_length) if dataset == cfg.dataset else {}
        return load_rows(dataset or "", self.tokenizer, dataset_format=cfg.dataset_format,
                         num_examples=cfg.num_train_examples, max_digits=cfg.max_digits, seed=cfg.seed,
                         split=cfg.dataset_split, part=part, **split)

    def _eval_shard(self, given: Any) -> list[dict[str, Any]]:
        """This process's share of the held-out prompts for ``eval_steps``: the first ``eval_prompts``
        rows of the dataset's validation part (or of ``eval_rows`` from the Python API), cut to a
        multiple of the process count so every rank decodes the same number (ZeRO-3 lockstep)."""
        cfg, acc = self.config, self.accelerator
        rows = self._given_rows(given) if given is not None else self._load_rows(cfg.dataset, part="validation")
        per_rank = min(cfg.eval_prompts, len(rows)) // acc.num_processes
        if per_rank == 0:
            raise InputError(f"eval_steps={cfg.eval_steps}: {len(rows)} held-out rows cannot give each of "
                             f"{acc.num_processes} process(es) a prompt")
        return rows[acc.process_index * per_rank:(acc.process_index + 1) * per_rank]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out evaluation of the current student (``eval_steps``), summed over processes:
        ``eval_accuracy``, ``eval_rouge_l``, ``eval_forward_kl`` / ``eval_reverse_kl`` (teacher vs
        student on the student's completions, per token) and ``eval_len`` (tokens per completion)."""
        from gkd.evaluate import evaluate

        cfg = self.config
        checker = None
        if cfg.dataset == "builtin:addition":
            from gkd.task import check_answer

            checker = check_answer
        student = self.accelerator.unwrap_model(self.student)
        start = time.perf_counter()
        with distributed.gathered_for_generation([student] if cfg.zero3_gather_for_generation else []):
            r = evaluate(student, self.tokenizer, self.eval_rows, checker, teacher=self.teacher, decoding="greedy",
                         max_new_tokens=cfg.max_new_tokens, max_prompt_length=cfg.max_prompt_length,
                         batch_size=len(self.eval_rows), num_samples=0,
                         all_ranks_done=distributed.all_ranks_done if distributed.is_distributed() else None)
        n, tokens = float(r.num_completions), r.completion_len_mean * r.num_completions
        # (name, mean, averaged over tokens rather than completions); metrics a run lacks are left out
        parts = [(k, v, per_token) for k, v, per_token in (
            ("eval_accuracy", r.accuracy, False), ("eval_rouge_l", r.rouge_l, False),
            ("eval_forward_kl", r.forward_kl, True), ("eval_reverse_kl", r.reverse_kl, True)) if v is not None]
        total_n, total_tokens, *sums = distributed.all_reduce_sum(torch.tensor(
            [n, tokens, *(v * (tokens if per_token else n) for _, v, per_token in parts)], dtype=torch.float64)).tolist()
        out = {k: total / (max(total_tokens, 1.0) if per_token else total_n)
               for (k, _, per_token), total in zip(parts, sums, strict=True)}
        out.update(eval_len=total_tokens / total_n, time_eval=time.perf_counter() - start)
        return out

    def _given_rows(self, rows: Any) -> list[dict[str, Any]]:
        """Rows passed to the Python API: a list of dicts, a ``datasets.Dataset`` or any iterable of rows."""
        return normalize_rows([dict(r) for r in rows], self.tokenizer, dataset_format=self.config.dataset_format,
                              source="train_rows")

    def _loader(self, rows: list[dict[str, Any]], seed: int) -> torch.utils.data.DataLoader:
        cfg = self.config
        dataset = PromptDataset(rows, self.tokenizer, max_prompt_length=cfg.max_prompt_length,
                                max_new_tokens=cfg.max_new_tokens, long_prompts=cfg.long_prompts)
        return torch.utils.data.DataLoader(
            dataset, batch_size=cfg.per_device_batch_size, shuffle=True, drop_last=True,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(seed),
        )

    def _batch_stream(self, loader: Any, name: str) -> Iterator[dict[str, Any]]:
        """Endless batches; the order of each epoch depends only on (seed, epoch), so a resumed run
        continues exactly where ``data_pos`` says (skipping, not loading, the consumed batches)."""
        pos = self.data_pos[name]
        while True:
            loader.set_epoch(pos[0])
            batches = self.accelerator.skip_first_batches(loader, pos[1]) if pos[1] else loader
            for batch in batches:
                pos[1] += 1
                yield batch
            pos[0], pos[1] = pos[0] + 1, 0

    # --- rollout phase ------------------------------------------------------------------------

    def _build_vllm(self) -> VLLMSampler:
        """The colocated vLLM engine (``rollout_backend: vllm``). It is built from the student's
        config alone (random weights, no tokenizer: it takes and returns token ids); the trained
        weights are pushed before the first sampling call and after every optimizer step."""
        cfg, acc = self.config, self.accelerator
        student = acc.unwrap_model(self.student)
        base = student.get_base_model() if hasattr(student, "get_base_model") else student
        folder = Path(cfg.output_dir) / "vllm_config"
        if acc.is_main_process:
            base.config.save_pretrained(folder)
        acc.wait_for_everyone()
        precision = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.mixed_precision, cfg.student_dtype)
        eos = self.tokenizer.eos_token_id
        sampler = VLLMSampler(
            str(folder), self.sampling, max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
            vocab_size=self.vocab_size, model_vocab_size=output_vocab_size(base),
            eos_token_ids=eos if isinstance(eos, list) else [eos], pad_token_id=self.tokenizer.pad_token_id,
            dtype=precision, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            enable_sleep_mode=cfg.vllm_sleep_mode,
            engine_kwargs={"load_format": "dummy", "skip_tokenizer_init": True,
                           "trust_remote_code": cfg.trust_remote_code, **cfg.vllm_kwargs},
            process_index=acc.process_index, num_processes=acc.num_processes,
            local_process_index=acc.local_process_index,
        )
        acc.wait_for_everyone()  # engines start at different speeds; DeepSpeed collectives must not
        return sampler

    def _sample(self, batch: dict[str, Any], model: torch.nn.Module, **kw: Any) -> Rollout:
        if self.vllm is not None and not kw and model is self.accelerator.unwrap_model(self.student):
            self.vllm.sync(model, self.step)  # no-op unless an optimizer step changed the weights
            return self.vllm.sample(batch["prompt_ids"], batch["prompt_mask"], self.sample_generator)
        gather = [model, kw.get("teacher")] if self.config.zero3_gather_for_generation else []
        with distributed.gathered_for_generation([m for m in gather if m is not None]):
            return sample(
                model, batch["prompt_ids"], batch["prompt_mask"], self.sampling,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                vocab_size=self.vocab_size, generator=self.sample_generator,
                all_ranks_done=distributed.all_ranks_done if distributed.is_distributed() else None, **kw,
            )

    def rollout(self, batch: dict[str, Any], on_policy: bool) -> Rollout:
        """GKD: student samples (on-policy), teacher samples (``seq_kd``) or the dataset's references."""
        if not on_policy and not self.config.seq_kd:
            rollout = reference_rollout(batch)
        elif on_policy:
            if self.config.num_generations > 1:
                batch = _repeat_batch(batch, self.config.num_generations)
            rollout = self._sample(batch, self.accelerator.unwrap_model(self.student))
        else:
            rollout = self._sample(batch, self.teacher)
            rollout.on_policy = False
        rollout.rows = batch["rows"]
        return rollout

    def mixed_rollout(self, batch: dict[str, Any]) -> Rollout:
        """MiniLLM: teacher-mixed sampling, storing log q_old, log p and log p̃ per token."""
        rollout = self._sample(batch, self.accelerator.unwrap_model(self.student), teacher=self.teacher,
                               teacher_mix=self.config.teacher_mix, draft_tokens=self.config.mix_draft_tokens)
        rollout.rows = batch["rows"]
        return rollout

    def score_rewards(self, rollouts: list[Rollout]) -> dict[str, float]:
        """User reward functions on decoded completions (GKD eq. 5); fills ``rollout.rewards``."""
        if not self.rewards:
            return {}
        metrics: dict[str, list[float]] = defaultdict(list)
        for r in rollouts:
            ids = [r.completion_ids[i][r.completion_mask[i]].tolist() for i in range(r.completion_ids.shape[0])]
            prompts = [row["prompt"] for row in r.rows]  # type: ignore[union-attr]
            completions = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            rewards, mask, parts = self.rewards(prompts, completions, ids, r.rows)  # type: ignore[arg-type]
            r.rewards, r.reward_mask = rewards.to(r.completion_ids.device), mask.to(r.completion_ids.device)
            for k, v in parts.items():
                metrics[k].append(v)
            metrics["reward"].extend(rewards[mask].tolist())
        return {k: sum(v) / len(v) for k, v in metrics.items() if v}

    def gkd_advantages(self, rollouts: list[Rollout]) -> None:
        """``A_i = r_i − baseline``: mean over the step's rewarded samples on all ranks, or over a
        prompt's ``num_generations`` samples (group)."""
        cfg = self.config
        if cfg.reward_baseline == "group":
            for r in rollouts:
                g = cfg.num_generations
                rew = r.rewards.view(-1, g)  # type: ignore[union-attr]
                m = r.reward_mask.view(-1, g).float()  # type: ignore[union-attr]
                base = (rew * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
                r.advantages = ((rew - base) * m).view(-1)
            return
        total = distributed.all_reduce_sum(torch.stack([
            sum((r.rewards * r.reward_mask).sum() for r in rollouts),  # type: ignore[operator]
            sum(r.reward_mask.sum() for r in rollouts),  # type: ignore[union-attr]
        ]).float().cpu())
        base = float(total[0] / total[1].clamp(min=1.0))
        for r in rollouts:
            r.advantages = (r.rewards - base) * r.reward_mask  # type: ignore[operator]

    def minillm_advantages(self, rollouts: list[Rollout]) -> dict[str, float]:
        """Per-token rewards → length-normalised long-term returns (MiniLLM eq. 6), user rewards at
        the final token, whitened over the global buffer."""
        cfg = self.config
        token_reward_sum = torch.zeros(())
        tokens = torch.zeros(())
        for r in rollouts:
            mask = r.completion_mask
            kl_reward = minillm_rewards(r.teacher_logprobs, r.sampled_logprobs, mask, cfg.reward_scale)  # type: ignore[arg-type]
            token_reward_sum += kl_reward.sum().cpu()
            tokens += mask.sum().cpu()
            total = cfg.alpha * kl_reward
            if r.rewards is not None and cfg.alpha < 1.0:
                final = torch.zeros_like(total)
                final.scatter_(1, r.last_token_index[:, None], (r.rewards * r.reward_mask)[:, None].float())
                total = total + (1.0 - cfg.alpha) * final * mask
            r.advantages = minillm_returns(total, mask, gamma=cfg.gamma, include_current=cfg.include_current_reward,
                                           length_normalized=cfg.length_normalization)
        if cfg.whiten_advantages:
            moments = distributed.all_reduce_sum(sum(masked_moments(r.advantages, r.completion_mask).cpu()
                                                     for r in rollouts))
            for r in rollouts:
                r.advantages = whiten(r.advantages, r.completion_mask, moments.to(r.advantages.device))  # type: ignore[arg-type]
        glob = distributed.all_reduce_sum(torch.stack([token_reward_sum, tokens]))
        # mean of log p − log q_old over sampled tokens: minus a (mixture-sampled) reverse-KL estimate
        return {"token_reward_mean": float(glob[0] / glob[1].clamp(min=1.0))}

    # --- loss phase (per micro-batch; returns per-token tensors, "loss" is the objective) -----

    def _score(self, rollout: Rollout) -> ScoredRollout:
        """The teacher's view of a rollout (scorer, no grad): full logits or top-k, plus hidden states /
        attentions for those objectives. A MiniLLM buffer's top-k scores are computed once and reused
        by every PPO epoch (valid while τ is unchanged)."""
        cfg = self.config
        tau = self.loss_temperature
        cacheable = cfg.teacher_topk > 0 and not self.hidden_layers[1] and not self.attention_layers[1]
        if cacheable and rollout.teacher_cache is not None and rollout.teacher_cache[0] == tau:
            return ScoredRollout(rollout=rollout, teacher_logits=rollout.teacher_cache[1])
        scored = score(self.teacher, rollout, self.vocab_size, hidden_layers=self.hidden_layers[1],
                       attention_layers=self.attention_layers[1], topk=cfg.teacher_topk, temperature=tau,
                       chunk_size=cfg.loss_chunk_size)
        if cacheable and cfg.algorithm == "minillm" and isinstance(scored.teacher_logits, TeacherTopK):
            rollout.teacher_cache = (tau, scored.teacher_logits)
        return scored

    def _outputs(self, rollout: Rollout) -> tuple[CompletionOutputs, ScoredRollout]:
        """Teacher view (scorer, no grad) and student view (with grad) of the completion positions:
        logits (or, with ``fused_lm_head``, the LM head's input), plus hidden states / attention maps
        when an objective needs them."""
        with self.timers("score"):
            scored = self._score(rollout)
        with self.timers("update"):
            student = completion_outputs(self.student, rollout, self.vocab_size, hidden_layers=self.hidden_layers[0],
                                         attention_layers=self.attention_layers[0],
                                         final_hidden=self.config.fused_lm_head)
        teacher = scored.teacher_logits
        self._last_logits = (  # kept for the non-finite diagnosis
            student.logits if student.logits is not None else student.final_hidden,  # type: ignore[arg-type]
            teacher.logprobs if isinstance(teacher, TeacherTopK) else teacher,
        )
        return student, scored

    def _run_loss(self, rollout: Rollout, student: CompletionOutputs, fn: ChunkFn,
                  extra_loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Apply the per-token function ``fn`` at every completion position: all at once with plain
        autograd (``loss_chunk_size: 0``), or a chunk at a time with the gradient formed in forward
        (:func:`gkd.chunked.chunked_loss`; the scalar comes back as ``"_sum"``). ``extra_loss`` (per
        token, hidden-state / attention objectives) is added to ``"loss"``."""
        cfg = self.config
        b, length = rollout.completion_ids.shape
        head = None
        if student.final_hidden is not None:
            x, head = student.final_hidden.reshape(b * length, -1), lm_head(self.student).weight
        else:
            x = student.logits.reshape(b * length, -1)  # type: ignore[union-attr]
        if cfg.loss_chunk_size == 0 and head is None:
            terms = {k: v.reshape(b, length) for k, v in fn(x, slice(None)).items()}
        else:
            weights = token_weights(rollout.completion_mask, cfg.reduction).to(x.device)
            total, flat = chunked_loss(fn, x, weights.reshape(-1), head=head,
                                       vocab_size=self.vocab_size if head is not None else None,
                                       chunk_size=cfg.loss_chunk_size or b * length)
            terms = {k: v.reshape(b, length) for k, v in flat.items()}
            if extra_loss is not None:
                total = total + (weights * torch.where(rollout.completion_mask, extra_loss, 0.0)).sum()
            terms["_sum"] = total
        if extra_loss is not None:
            terms["loss"] = terms["loss"] + extra_loss
        return terms

    def _structure_terms(self, rollout: Rollout, student: CompletionOutputs, scored: ScoredRollout,
                         ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Hidden-state / attention objectives (no vocabulary axis: computed on whole tensors):
        ``(Σ w_i·objective_i or None, {label: objective_i})``."""
        structural = [o for o in self.objectives if o.uses_hidden or o.uses_attention]
        if not structural:
            return None, {}
        projection = getattr(self.accelerator.unwrap_model(self.student), PROJECTION_ATTR, None) \
            if self.hidden_layers[0] else None
        terms = objective_terms(
            structural, student_logits=None, teacher_logits=None, completion_ids=rollout.completion_ids,  # type: ignore[arg-type]
            on_policy=rollout.on_policy, defaults=self._objective_defaults(), temperature=self.loss_temperature,
            student_hidden=student.hidden, teacher_hidden=scored.teacher_hidden, layer_map=self.layer_map,
            projection=projection, student_attentions=student.attentions, teacher_attentions=scored.teacher_attentions,
        )
        total = sum((o.weight * terms[o.label] for o in structural), torch.zeros(()))
        return total, terms

    def _objective_defaults(self) -> dict[str, float]:
        cfg = self.config
        return {"beta": cfg.beta, "skew": cfg.skew, "kd_weight": cfg.kd_weight, "dkd_alpha": cfg.dkd_alpha,
                "dkd_beta": cfg.dkd_beta}

    def _logit_terms_fn(self, rollout: Rollout, teacher: torch.Tensor | TeacherTopK | None) -> Callable[
            [torch.Tensor, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``rows → (Σ w_i·logit objective_i, {label: objective_i})`` on a chunk of student logits."""
        cfg = self.config
        logit_objectives = [o for o in self.objectives if not (o.uses_hidden or o.uses_attention)]
        ids = rollout.completion_ids.reshape(-1)
        flat_teacher = _flat_positions(teacher)
        defaults, tau = self._objective_defaults(), self.loss_temperature

        def terms_fn(z: torch.Tensor, rows: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            t = flat_teacher[rows] if flat_teacher is not None else None
            terms = objective_terms(logit_objectives, student_logits=z, teacher_logits=t, completion_ids=ids[rows],
                                    on_policy=rollout.on_policy, defaults=defaults, temperature=tau,
                                    temperature_squared=cfg.temperature_squared)
            total = sum((o.weight * terms[o.label] for o in logit_objectives), torch.zeros((), device=z.device))
            return total, terms

        return terms_fn

    def gkd_loss(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """GKD per-token loss ``α·Σ_i w_i·D_i + (1−α)·(−A·log q_θ(y_t))`` (Algorithm 1, eq. 5)."""
        cfg = self.config
        student, scored = self._outputs(rollout)
        with self.timers("update"):
            b, length = rollout.completion_ids.shape
            ids = rollout.completion_ids.reshape(-1)
            with_reward = cfg.alpha < 1.0 and rollout.on_policy and rollout.advantages is not None
            adv = rollout.advantages[:, None].expand(b, length).reshape(-1) if with_reward else None  # type: ignore[index]
            logit_terms = self._logit_terms_fn(rollout, scored.teacher_logits)
            structure, structure_terms = self._structure_terms(rollout, student, scored)
            alpha = cfg.alpha if with_reward else 1.0

            def fn(z: torch.Tensor, rows: Any) -> dict[str, torch.Tensor]:
                div, terms = logit_terms(z, rows)
                out = {"divergence": div}
                if cfg.objectives:  # each part of the weighted sum logged on its own
                    out.update({f"loss_{label}": value for label, value in terms.items()})
                if adv is None:
                    out["loss"] = div
                    return out
                logq = token_logprobs(z, ids[rows], cfg.temperature)
                pg = policy_gradient_loss(logq[:, None], adv[rows][:, None]).squeeze(-1)
                out.update(loss=alpha * div + (1.0 - alpha) * pg, reward_pg=pg)
                return out

            out = self._run_loss(rollout, student, fn, alpha * structure if structure is not None else None)
            if structure is not None:
                out["divergence"] = out["divergence"] + structure.detach()
                out.update({f"loss_{label}": value.detach() for label, value in structure_terms.items()})
            return out

    def minillm_loss(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """MiniLLM per-token loss: PPO-clipped long-term term + α·single-step reverse KL (eq. 7), plus
        any extra weighted ``objectives``."""
        cfg = self.config
        student, scored = self._outputs(rollout)
        with self.timers("update"):
            ids = rollout.completion_ids.reshape(-1)
            mixed, sampled = rollout.mixed_logprobs.reshape(-1), rollout.sampled_logprobs.reshape(-1)  # type: ignore[union-attr]
            adv = rollout.advantages.reshape(-1)  # type: ignore[union-attr]
            teacher = scored.teacher_logits
            flat_teacher = _flat_positions(teacher)
            assert flat_teacher is not None  # MiniLLM always has a teacher
            logit_terms = self._logit_terms_fn(rollout, teacher) if cfg.objectives else None
            structure, structure_terms = self._structure_terms(rollout, student, scored)
            tau = self.loss_temperature

            def fn(z: torch.Tensor, rows: Any) -> dict[str, torch.Tensor]:
                logq = token_logprobs(z, ids[rows], cfg.temperature)
                pg = ppo_clipped_loss(logq, mixed[rows], adv[rows], cfg.clip_eps)
                weights = importance_weights(sampled[rows], mixed[rows]) if cfg.single_step_weighted else None
                single = single_step_reverse_kl(z, flat_teacher[rows], weights=weights, temperature=tau)
                ratio = torch.exp(logq.detach() - sampled[rows])
                out = {"loss": pg + cfg.alpha * cfg.single_step_coef * single, "pg": pg, "single_step": single,
                       "ratio": ratio}
                if logit_terms is not None:  # extra weighted objectives ride along with MiniLLM's own loss
                    extra, terms = logit_terms(z, rows)
                    out["loss"] = out["loss"] + extra
                    out.update({f"loss_{label}": value for label, value in terms.items()})
                return out

            out = self._run_loss(rollout, student, fn, structure)
            out.update({f"loss_{label}": value.detach() for label, value in structure_terms.items()})
            return out

    def lm_loss(self, rollout: Rollout) -> torch.Tensor:
        """Per-token cross-entropy on an LM-dataset batch (MiniLLM's optional pretraining loss)."""
        logits = completion_logits(self.student, rollout, self.vocab_size)
        return kd_per_token(logits, None, rollout.completion_ids, kd_weight=0.0)

    # --- optimisation (shared) ----------------------------------------------------------------

    def optimize(self, rollouts: list[Rollout], loss_fn: Any) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Every per-token term is summed per micro-batch and divided by the global number of
        completion tokens of the step; accelerate divides by the accumulation steps and DDP /
        DeepSpeed average over ranks, so the factor ``gas × world / N`` makes the gradient exactly
        ``d(global sum / N)/dθ``.
        """
        cfg, acc = self.config, self.accelerator
        temperature = self.loss_temperature  # τ of this step (the schedule reads self.step before it advances)
        norm = self._global_count(rollouts)
        lm_rollouts = None
        if self._lm_batches is not None:
            lm_rollouts = [reference_rollout(next(self._lm_batches)) for _ in rollouts]
            lm_norm = self._global_count(lm_rollouts)
        scale = cfg.gradient_accumulation_steps * acc.num_processes
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=acc.device))
        grad_norm, cause = None, None
        deepspeed = distributed.zero_stage(acc) > 0
        for i, rollout in enumerate(rollouts):
            with acc.accumulate(self.student):
                terms = loss_fn(rollout)
                with self.timers("update"):
                    objective = torch.zeros((), device=acc.device)
                    chunked_sum = terms.pop("_sum", None)  # the chunked path's scalar (gradient formed in forward)
                    for name, per_token in terms.items():
                        total, _ = masked_sum_and_count(per_token, rollout.completion_mask, cfg.reduction)
                        sums[name] += total.detach()
                        if name == "loss":
                            total = chunked_sum if chunked_sum is not None else total
                            objective = total / norm.to(total.device)
                    if lm_rollouts is not None:
                        lm_total, _ = masked_sum_and_count(self.lm_loss(lm_rollouts[i]), lm_rollouts[i].completion_mask,
                                                           cfg.reduction)
                        sums["lm"] += lm_total.detach() * norm.to(lm_total.device) / lm_norm.to(lm_total.device)
                        objective = objective + cfg.lm_coef * lm_total / lm_norm.to(lm_total.device)
                    # non-finite values: every rank skips this micro-batch's backward together
                    if distributed.any_rank(not bool(torch.isfinite(objective))):
                        cause = cause or self._diagnose_non_finite()
                        if deepspeed:  # DeepSpeed counts micro-steps in backward: send a zero gradient
                            acc.backward(torch.nan_to_num(self._last_logits[0].float()).sum() * 0.0)
                    else:
                        acc.backward(objective * scale)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
                        if grad_norm is not None and not math.isfinite(float(grad_norm)) and cause is None:
                            cause = "gradients"
                    if acc.sync_gradients and cause is None:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        if cause is None:
            self.scheduler.step()
        self.step += 1
        names = sorted(sums)
        glob = distributed.all_reduce_sum(torch.stack([sums[n] for n in names]).float().cpu()) / norm.cpu()
        metrics = {n: float(v) for n, v in zip(names, glob, strict=True)}
        if lm_rollouts is not None:
            metrics["loss"] += cfg.lm_coef * metrics["lm"]
        tokens = distributed.all_reduce_sum(torch.tensor(float(sum(r.num_tokens for r in rollouts))))
        seqs = distributed.all_reduce_sum(torch.tensor(float(sum(r.completion_ids.shape[0] for r in rollouts))))
        metrics.update(step=self.step, lr=float(lr), completion_len_mean=float(tokens / seqs.clamp(min=1)),
                       tokens=float(tokens), loss_temperature=temperature)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self._count_skips(cause, metrics)
        return metrics

    def _diagnose_non_finite(self) -> str:
        """Which input made the loss non-finite (checked only after it happened)."""
        student_logits, teacher_logits = self._last_logits
        if teacher_logits is not None and not bool(torch.isfinite(teacher_logits).all()):
            return "teacher logits"
        if not bool(torch.isfinite(student_logits).all()):
            return "student logits"
        return "loss"

    def _count_skips(self, cause: str | None, metrics: dict[str, float]) -> None:
        """Skipped steps are counted; ``max_consecutive_skips`` in a row stop the run."""
        cfg = self.config
        if cause is None:
            self.consecutive_skips = 0
        else:
            self.consecutive_skips += 1
            self.skipped_steps += 1
            logger.warning("step %d skipped: non-finite %s (%d in a row)", self.step, cause, self.consecutive_skips)
        metrics["skipped"] = int(cause is not None)
        metrics["skipped_total"] = self.skipped_steps
        if cause is not None and 0 < cfg.max_consecutive_skips <= self.consecutive_skips:
            raise NonFiniteError(self.step, cause, self.consecutive_skips, self.output_dir)

    def _global_count(self, rollouts: list[Rollout]) -> torch.Tensor:
        counts = [masked_sum_and_count(torch.zeros(r.completion_mask.shape), r.completion_mask.cpu(),
                                       self.config.reduction)[1] for r in rollouts]
        return distributed.all_reduce_sum(torch.stack(counts).sum()).clamp(min=1.0)

    # --- one step / iteration -----------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """GKD: one optimizer step, rollout → (rewards) → score → loss → backward → step."""
        cfg = self.config
        start = time.perf_counter()
        on_policy = self.coin.draw()
        batches = [next(self._batches) for _ in range(cfg.gradient_accumulation_steps)]
        with self.timers("rollout"):
            rollouts = [self.rollout(b, on_policy) for b in batches]
        reward_metrics = {}
        if self.rewards and on_policy:
            with self.timers("reward"):
                reward_metrics = self.score_rewards(rollouts)
                self.gkd_advantages(rollouts)
        metrics = self.optimize(rollouts, self.gkd_loss)
        metrics.update(reward_metrics, on_policy=int(on_policy))
        if cfg.log_samples_steps and self.step % cfg.log_samples_steps == 0:
            self.log_samples(rollouts[0])
        if distributed.is_distributed():  # how many ranks took this step on-policy: 0 or all, never a mix
            metrics["on_policy_ranks"] = int(distributed.all_reduce_sum(torch.tensor(float(on_policy))).item())
        return self._timing(metrics, start)

    def minillm_iteration(self) -> Iterator[dict[str, float]]:
        """MiniLLM: fill the rollout buffer, compute advantages, then ``ppo_epochs`` passes of updates.

        The iteration's progress (buffer, epoch, minibatch order, position) lives in
        ``self.minillm_state`` so that a checkpoint taken mid-buffer resumes exactly.
        """
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        n_micro = cfg.num_rollouts // (cfg.per_device_batch_size * acc.num_processes)
        if self.minillm_state is None:
            with self.timers("rollout"):
                buffer = [self.mixed_rollout(next(self._batches)) for _ in range(n_micro)]
            with self.timers("reward"):
                shared = self.score_rewards(buffer)
                shared.update(self.minillm_advantages(buffer))
                shared.update(draft_metrics(buffer))
            self.minillm_state = {"buffer": buffer, "shared": shared, "epoch": 0, "order": None, "next": 0}
        state = self.minillm_state
        while state["epoch"] < cfg.ppo_epochs:
            if state["order"] is None:
                state["order"], state["next"] = torch.randperm(n_micro, generator=self.ppo_generator).tolist(), 0
            while state["next"] < n_micro:
                idx = state["order"][state["next"] : state["next"] + cfg.gradient_accumulation_steps]
                state["next"] += cfg.gradient_accumulation_steps
                metrics = self.optimize([state["buffer"][i] for i in idx], self.minillm_loss)
                metrics.update(state["shared"], on_policy=1, ppo_epoch=state["epoch"])
                if cfg.log_samples_steps and self.step % cfg.log_samples_steps == 0:
                    self.log_samples(state["buffer"][idx[0]])
                if state["next"] >= n_micro:  # this was the epoch's last minibatch
                    state["epoch"], state["order"] = state["epoch"] + 1, None
                    if state["epoch"] == cfg.ppo_epochs:
                        self.minillm_state = None
                yield self._timing(metrics, start)
                start = time.perf_counter()
                if self.step >= cfg.max_steps or self.minillm_state is None:
                    return

    def _timing(self, metrics: dict[str, float], start: float) -> dict[str, float]:
        elapsed = time.perf_counter() - start
        times = self.timers.pop()
        metrics["tokens_per_s"] = metrics.pop("tokens") / max(elapsed, 1e-9)
        for phase in ("rollout", "reward", "score", "update"):
            metrics[f"time_{phase}"] = times.get(phase, 0.0)
        metrics["time_step"] = elapsed
        return metrics

    # --- outer loop ---------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` optimizer steps; returns the per-step metrics."""
        cfg, acc = self.config, self.accelerator
        history: list[dict[str, float]] = []
        bar = None
        if cfg.progress_bar and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.algorithm, dynamic_ncols=True)
        self.student.train()
        with _stop_on_signals() as stop:
            self._train_loop(history, bar, stop)
        if bar is not None:
            bar.close()
        if cfg.save_final_model:
            self.save_model(self.output_dir / "final")
            if self.accelerator.is_main_process:
                write_model_card(self.output_dir / "final", cfg, history)
        if self.trackers:
            self.accelerator.end_training()
        return history

    def _train_loop(self, history: list[dict[str, float]], bar: Any, stop: dict[str, Any]) -> None:
        cfg = self.config
        while self.step < cfg.max_steps:
            steps = self.minillm_iteration() if cfg.algorithm == "minillm" else iter([self.train_step()])
            for metrics in steps:
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

    def log(self, metrics: dict[str, float]) -> None:
        """One line of ``metrics.jsonl`` and, with ``report_to``, the same scalars to the trackers."""
        if self.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))
        if self.accelerator.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(metrics) + "\n")

    @torch.no_grad()
    def log_samples(self, rollout: Rollout, n: int = 2) -> None:
        """A few completions of the current step with the teacher's mean token log-prob on them."""
        if not self.accelerator.is_main_process:
            return
        teacher_logits = score(self.teacher, rollout, self.vocab_size).teacher_logits if self.teacher else None
        with (self.output_dir / "samples.jsonl").open("a") as fh:
            for i in range(min(n, rollout.completion_ids.shape[0])):
                mask = rollout.completion_mask[i]
                ids = rollout.completion_ids[i][mask]
                record = {
                    "step": self.step, "on_policy": int(rollout.on_policy),
                    "prompt": self.tokenizer.decode(rollout.prompt_ids[i][rollout.prompt_mask[i]]),
                    "completion": self.tokenizer.decode(ids),
                }
                if teacher_logits is not None:
                    logp = token_logprobs(teacher_logits[i : i + 1], rollout.completion_ids[i : i + 1])[0][mask]
                    record["teacher_logprob_mean"] = float(logp.mean()) if logp.numel() else None
                logger.info("sample step %d: %r -> %r (teacher log-prob %s)", self.step, record["prompt"][-80:],
                            record["completion"][:80], record.get("teacher_logprob_mean"))
                fh.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> Path:
        """``accelerator.save_state`` (model, optimizer, scheduler, RNG of every rank; sharded under
        DeepSpeed) + the trainer's state, then the ``COMPLETED`` marker, written last."""
        acc = self.accelerator
        path = self.output_dir / f"checkpoint-{self.step}"
        if (path / MARKER).exists():  # already saved (e.g. save_steps and a signal at the same step)
            return path
        if acc.is_main_process and path.exists():  # a torn attempt at this step
            shutil.rmtree(path)
        acc.wait_for_everyone()
        try:
            self._write_checkpoint(path)
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)  # never leave a torn folder behind
            saved = complete_checkpoints(self.output_dir)
            last = f"the previous checkpoint {saved[-1]} is intact" if saved else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; {last}") from e
        return path

    def _write_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        acc.save_state(str(path))
        generators = {"sample": self.sample_generator.get_state(), "coin": self.coin.generator.get_state(),
                      "ppo": self.ppo_generator.get_state()}
        torch.save(generators, path / f"generators_{acc.process_index}.pt")
        if self.minillm_state is not None:  # a MiniLLM buffer in progress: saved so the resume is exact
            state = {**self.minillm_state, "buffer": [dataclasses.asdict(r) for r in self.minillm_state["buffer"]]}
            torch.save(state, path / f"minillm_buffer_{acc.process_index}.pt")
        if acc.is_main_process:
            state = {"step": self.step, "data_pos": self.data_pos, "num_processes": acc.num_processes}
            (path / "trainer_state.json").write_text(json.dumps(state))
        acc.wait_for_everyone()
        if acc.is_main_process:
            mark_completed(path, self.step)
            for old in rotate_checkpoints(self.output_dir, self.config.save_total_limit):
                logger.info("removed old checkpoint %s (save_total_limit=%d)", old, self.config.save_total_limit)
        acc.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; the next step is exactly the one an
        uninterrupted run would have taken."""
        acc = self.accelerator
        state = json.loads((path / "trainer_state.json").read_text())
        if state["num_processes"] != acc.num_processes:
            raise InputError(
                f"checkpoint {path} was written by {state['num_processes']} process(es); resuming with "
                f"{acc.num_processes} would change the data order and sampling streams"
            )
        acc.load_state(str(path))
        generators = torch.load(path / f"generators_{acc.process_index}.pt", weights_only=True)
        self.sample_generator.set_state(generators["sample"])
        self.coin.generator.set_state(generators["coin"])
        self.ppo_generator.set_state(generators["ppo"])
        buffer_file = path / f"minillm_buffer_{acc.process_index}.pt"
        if buffer_file.exists():
            mini = torch.load(buffer_file, weights_only=False, map_location=acc.device)
            mini["buffer"] = [Rollout(**r) for r in mini["buffer"]]
            self.minillm_state = mini
        self.step = state["step"]
        self.data_pos = {k: list(v) for k, v in state["data_pos"].items()}
        if acc.is_main_process:  # drop metrics of steps after the checkpoint (the run died after it)
            metrics = self.output_dir / "metrics.jsonl"
            if metrics.exists():
                kept = [line for line in metrics.read_text().splitlines() if _metrics_step(line) <= self.step]
                metrics.write_text("".join(line + "\n" for line in kept))
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


def add_lora(student: torch.nn.Module, cfg: GKDConfig) -> torch.nn.Module:
    """Wrap the student with peft LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
        target_modules=targets[0] if targets == ["all-linear"] else targets,
    )
    return get_peft_model(student, lora)


def merge_adapters(cfg: GKDConfig, adapter_dir: Path, out: Path) -> None:
    """Base model + saved adapters, merged, saved as a plain Hugging Face model (done on CPU from the
    saved files, so it works whatever ZeRO stage trained them)."""
    from peft import PeftModel

    base = load_model(resolve_model_path(cfg.student), cfg.student_dtype, cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)


def build_accelerator(cfg: GKDConfig) -> Accelerator:
    """The accelerate ``Accelerator`` for a config: mixed precision, accumulation without dataloader
    syncing, epoch-seeded samplers (exact resume), and the process-group backend."""
    backend = cfg.ddp_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    trackers = [t for t in cfg.report_to if t != "none"]
    return Accelerator(
        log_with=trackers or None,
        project_dir=cfg.output_dir,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend)] if multi_process else [],
    )


def write_model_card(path: Path, cfg: GKDConfig, history: list[dict[str, float]]) -> None:
    """``README.md`` beside the saved student: recipe, teacher, algorithm and final metrics."""
    last = history[-1] if history else {}
    keep = ("loss", "divergence", "pg", "single_step", "reward", "completion_len_mean", "skipped_total")
    metrics = "\n".join(f"| {k} | {last[k]:.6g} |" for k in keep if k in last)
    algo = "MiniLLM (Gu et al. 2024)" if cfg.algorithm == "minillm" else "GKD (Agarwal et al. 2024)"
    settings = (f"teacher_mix={cfg.teacher_mix}, ppo_epochs={cfg.ppo_epochs}, num_rollouts={cfg.num_rollouts}"
                if cfg.algorithm == "minillm" else f"lmbda={cfg.lmbda}, divergence={cfg.divergence}, beta={cfg.beta}")
    lora = f"LoRA adapters (r={cfg.lora_r}, alpha={cfg.lora_alpha}) on `{cfg.student}`" if cfg.lora_r else "full weights"
    text = f"""---
library_name: transformers
tags: [gkd, knowledge-distillation, {cfg.algorithm}]
---
# Student distilled with gkd

- **Algorithm:** {algo}; {settings}
- **Teacher:** `{cfg.teacher}`
- **Student initialisation:** `{cfg.student}` ({lora})
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


def _check_writable(path: Path) -> None:
    """Fail before training, not at the first checkpoint, when output_dir cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output_dir={str(path)!r} is not writable: {e.strerror or e}") from None


def _metrics_step(line: str) -> float:
    """Step of a metrics.jsonl line; a torn (half-written) line sorts after everything."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _flat_positions(teacher: torch.Tensor | TeacherTopK | None) -> torch.Tensor | TeacherTopK | None:
    """Teacher view ``(B, L, …)`` → one row per completion position, indexable by chunk rows."""
    if teacher is None:
        return None
    return teacher.flatten_positions() if isinstance(teacher, TeacherTopK) else teacher.reshape(-1, teacher.shape[-1])


def _repeat_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """Each prompt ``n`` times in a row (``num_generations`` samples per prompt)."""
    out = {k: v.repeat_interleave(n, dim=0) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["rows"] = [row for row in batch["rows"] for _ in range(n)]
    return out
