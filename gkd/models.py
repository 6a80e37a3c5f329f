"""Models and the accelerator: loading (hub id or folder), tokenizer checks, LoRA, dropout, merging.

The student and teacher must share a tokenizer (:func:`gkd.scorer.check_tokenizers_match`); a teacher
with a padded embedding (151,936 vs 152,064 rows for one tokenizer) is sliced to the tokenizer's length
by the scorer. Dropout is off in both models: the divergence compares deterministic distributions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs
from transformers import AutoModelForCausalLM, AutoTokenizer

from gkd import distributed
from gkd.errors import ConfigError, InputError
from gkd.scorer import check_tokenizers_match, lm_head, output_vocab_size
from gkd.task import resolve_model_path

if TYPE_CHECKING:
    from gkd.config import GKDConfig

__all__ = ["add_lora", "build_accelerator", "disable_dropout", "finish_models", "load_model", "load_models",
           "load_tokenizer", "merge_adapters"]

logger = logging.getLogger("gkd")

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off (GKD Algorithm 1 compares the models' deterministic next-token distributions)."""
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


def load_models(cfg: GKDConfig, acc: Accelerator, student: torch.nn.Module | None = None,
                teacher: torch.nn.Module | None = None, tokenizer: Any = None,
                ) -> tuple[Any, torch.nn.Module, torch.nn.Module | None]:
    """``(tokenizer, student, teacher)`` for a run: what was passed in, the rest loaded from the config.

    Checks that teacher and student share the tokenizer and that both heads cover it, wraps the
    student in LoRA adapters (``lora_r > 0``) and checks the LM head where ``fused_lm_head`` /
    ``teacher_topk`` multiply by it themselves. The teacher is ``None`` for pure SFT."""
    need_teacher = teacher is None and not cfg.is_pure_sft
    with acc.main_process_first():  # one process fills caches (built-in models, tokenizer files) first
        student_path = resolve_model_path(cfg.student)
        teacher_path = resolve_model_path(cfg.teacher) if need_teacher else None  # type: ignore[arg-type]
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(student_path, cfg.trust_remote_code)
        if teacher_path is not None:
            check_tokenizers_match(tokenizer, load_tokenizer(teacher_path, cfg.trust_remote_code))
    # every process loads the weights at once: under ZeRO-3, from_pretrained partitions them collectively
    if student is None:
        student = load_model(student_path, cfg.student_dtype, cfg.trust_remote_code)
    if teacher_path is not None:
        teacher = load_model(teacher_path, cfg.teacher_dtype, cfg.trust_remote_code, cfg.teacher_quantization)
    vocab_size = len(tokenizer)
    for name, model in (("student", student), ("teacher", teacher)):
        if model is not None and output_vocab_size(model) < vocab_size:
            raise InputError(f"{name} has {output_vocab_size(model)} output rows but the tokenizer has {vocab_size} tokens")
    if cfg.lora_r > 0:
        student = add_lora(student, cfg)
    if cfg.fused_lm_head:
        if distributed.zero_stage(acc) == 3:
            raise ConfigError("fused_lm_head is not supported under ZeRO-3 (the head weight is sharded); use "
                              "loss_chunk_size alone, which bounds the loss's memory the same way")
        lm_head(student)  # a plain bias-free head, or a clear error now rather than at the first step
    if cfg.teacher_topk and teacher is not None:
        lm_head(teacher)
    return tokenizer, student, teacher


def finish_models(cfg: GKDConfig, student: torch.nn.Module, teacher: torch.nn.Module | None) -> None:
    """Dropout off in both, gradient checkpointing on the student if asked, the teacher frozen in eval mode."""
    disable_dropout(student)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        if cfg.lora_r > 0:
            student.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    if teacher is not None:
        disable_dropout(teacher)
        teacher.requires_grad_(False).eval()


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
