"""Where a training step's completions come from: the student (our KV-cached sampler or a colocated
vLLM engine), the teacher (SeqKD), both mixed (MiniLLM), or the student checked by the teacher (SKD). The sampling itself is in
:mod:`gkd.rollout` / :mod:`gkd.rollout_vllm`; this module picks the backend, keeps the sampling
random stream (one per rank, checkpointed), and holds ZeRO-3 weights whole while sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gkd import distributed
from gkd.rollout import Rollout, SamplingParams, sample
from gkd.rollout_skd import sample_skd
from gkd.rollout_vllm import VLLMSampler
from gkd.scorer import output_vocab_size

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gkd.config import GKDConfig

__all__ = ["RolloutSampler", "repeat_batch"]


class RolloutSampler:
    """Samples completions for batches of prompts (``dict`` batches of :func:`gkd.data.collate`).

    ``student`` is the unwrapped student; ``version()`` the number of optimizer steps taken so far
    (vLLM's copy of the weights is refreshed when it changes)."""

    def __init__(self, cfg: GKDConfig, acc: Accelerator, tokenizer: Any, student: torch.nn.Module,
                 teacher: torch.nn.Module | None, version: Callable[[], int]) -> None:
        self.cfg, self.acc, self.tokenizer = cfg, acc, tokenizer
        self.student, self.teacher, self.version = student, teacher, version
        self.vocab_size = len(tokenizer)
        self.params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
        self.vllm = self._build_vllm() if cfg.rollout_backend == "vllm" else None
        self.generator = torch.Generator(acc.device).manual_seed(cfg.seed + 1_000_003 * acc.process_index)

    def _build_vllm(self) -> VLLMSampler:
        """The colocated vLLM engine (``rollout_backend: vllm``). It is built from the student's
        config alone (random weights, no tokenizer: it takes and returns token ids); the trained
        weights are pushed before the first sampling call and after every optimizer step."""
        cfg, acc = self.cfg, self.acc
        base = self.student.get_base_model() if hasattr(self.student, "get_base_model") else self.student
        folder = Path(cfg.output_dir) / "vllm_config"
        if acc.is_main_process:
            base.config.save_pretrained(folder)
        acc.wait_for_everyone()
        precision = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.mixed_precision, cfg.student_dtype)
        eos = self.tokenizer.eos_token_id
        sampler = VLLMSampler(
            str(folder), self.params, max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
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

    def sample(self, batch: dict[str, Any], model: torch.nn.Module, **kw: Any) -> Rollout:
        """Completions of ``model`` (``teacher=``, ``teacher_mix=``… for MiniLLM's mixed sampling;
        ``teacher=``, ``skd_top_k=``, ``draft_tokens=`` for speculative KD, :mod:`gkd.rollout_skd`).
        Several teachers (:class:`gkd.teachers.TeacherRouter`, as ``model`` for SeqKD or as ``teacher=``):
        each teacher samples with / for its own rows, merged back into batch order."""
        from gkd.teachers import TeacherRouter

        router = model if isinstance(model, TeacherRouter) else kw.get("teacher")
        if isinstance(router, TeacherRouter):
            def one(teacher: Any, sub: dict[str, Any]) -> Rollout:
                if model is router:
                    return self.sample(sub, teacher, **kw)
                return self.sample(sub, model, **{**kw, "teacher": teacher})

            return router.sample(batch, one, self.tokenizer.pad_token_id)
        if self.vllm is not None and not kw and model is self.student:
            self.vllm.sync(model, self.version())  # no-op unless an optimizer step changed the weights
            return self.vllm.sample(batch["prompt_ids"], batch["prompt_mask"], self.generator)
        gather = [model, kw.get("teacher")] if self.cfg.zero3_gather_for_generation else []
        with distributed.gathered_for_generation([m for m in gather if m is not None]):
            return (sample_skd if "skd_top_k" in kw else sample)(  # type: ignore[operator]
                model, batch["prompt_ids"], batch["prompt_mask"], self.params,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                vocab_size=self.vocab_size, generator=self.generator,
                all_ranks_done=distributed.all_ranks_done if distributed.is_distributed() else None, **kw,
            )


def repeat_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """Each prompt ``n`` times in a row (``num_generations`` samples per prompt)."""
    out = {k: v.repeat_interleave(n, dim=0) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["rows"] = [row for row in batch["rows"] for _ in range(n)]
    return out
