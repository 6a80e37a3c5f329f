"""Rollout through vLLM (``rollout_backend: vllm``): fast on-policy sampling for GPU users.

vLLM is a soft dependency: nothing here imports it until a :class:`VLLMSampler` is built, and a
missing install is a one-line error saying what to do. The engine runs *colocated*, inside every
training process (one engine per rank, tensor parallel size 1, vLLM's ``external_launcher``
executor, as TRL's ``vllm_mode="colocate"``), so no server and no extra GPUs are needed.
Each rank samples its own prompts; nothing has to stay in lockstep, which also takes the
per-token parameter gathers of ZeRO-3 generation off the hot path.

Weights: after each optimizer step the student's parameters are pushed into the engine before
the next sampling call, one tensor at a time (gathered one at a time under ZeRO-3; LoRA adapters
merged for the push and unmerged after). Log-probs: the engine returns ``log q(y_t)`` of the
*processed* distribution (after temperature / top-k / top-p), the quantity the HF sampler stores.

Teacher-mixed sampling (MiniLLM) needs the teacher's distribution at every token and stays on
the HF sampler (``gkd.rollout.sample``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gkd.distributed import gathered
from gkd.errors import InputError
from gkd.rollout import Rollout, SamplingParams

__all__ = ["VLLMSampler", "import_vllm", "rollout_from_outputs", "student_weights"]

INSTALL_HINT = ("rollout_backend: vllm needs the vllm package, which is not installed here: `pip install vllm` "
                "(Linux with CUDA GPUs), or set rollout_backend: hf")


def import_vllm() -> Any:
    """The ``vllm`` module, or an :class:`InputError` that says how to install it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise InputError(f"{INSTALL_HINT} ({e})") from None


def rollout_from_outputs(
    outputs: Sequence[Any],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int,
) -> Rollout:
    """vLLM ``RequestOutput`` s (one completion each) → a :class:`Rollout` on ``prompt_ids.device``.

    Completions are right-padded with ``pad_token_id``; the mask is built from each completion's
    own length, never from ``ids != pad`` (docs/design.md, Masks). A completion that vLLM reports as stopped
    (``finish_reason == "stop"``) without its EOS token gets the EOS appended (masked in, log-prob 0),
    so a finished sequence always ends in EOS as the HF sampler's do.
    """
    batch = len(outputs)
    if batch != prompt_ids.shape[0]:
        raise ValueError(f"vLLM returned {batch} outputs for {prompt_ids.shape[0]} prompts")
    eos = set(eos_token_ids)
    rows: list[list[int]] = []
    logps: list[list[float]] = []
    for out in outputs:
        comp = out.outputs[0]
        ids = list(comp.token_ids)[:max_new_tokens]
        lp = _token_logprobs(comp.logprobs, ids)
        if comp.finish_reason == "stop" and (not ids or ids[-1] not in eos) and len(ids) < max_new_tokens:
            ids.append(min(eos))  # stopped on an EOS that vLLM left out of token_ids
            lp.append(0.0)
        rows.append(ids)
        logps.append(lp)
    length = max(1, max(len(r) for r in rows))
    device = prompt_ids.device
    completion = torch.full((batch, length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    sampled = torch.zeros(batch, length, dtype=torch.float32)
    for i, (ids, lp) in enumerate(zip(rows, logps, strict=True)):
        completion[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = True
        sampled[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), completion_ids=completion.to(device),
        completion_mask=mask.to(device), on_policy=True, sampled_logprobs=sampled.to(device),
    )


def _token_logprobs(logprobs: Any, ids: list[int]) -> list[float]:
    """The sampled token's log-prob at each position (vLLM returns ``{token_id: Logprob}`` per position)."""
    if logprobs is None:
        raise ValueError("vLLM returned no log-probs; the sampler asks for logprobs=0 (the sampled token's)")
    return [float(logprobs[t][tok].logprob) for t, tok in enumerate(ids)]


def student_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a (possibly LoRA-wrapped, possibly ZeRO-3-sharded) student under
    the names of the plain Hugging Face model, which vLLM's ``load_weights`` expects.

    Under ZeRO-3 each parameter is gathered on its own (a collective: every rank must iterate).
    A peft model is gathered whole, its adapters merged for the duration and unmerged afterwards;
    adapter tensors themselves are skipped.
    """
    if _is_peft(model):
        with gathered(list(model.parameters())):
            model.merge_adapter()  # type: ignore[operator]
            try:
                prefix = model.prefix  # type: ignore[attr-defined]  # "lora_"
                for name, p in model.named_parameters():
                    if prefix in name or "original_module" in name:
                        continue
                    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                    yield name.replace("modules_to_save.default.", ""), p.data
            finally:
                model.unmerge_adapter()  # type: ignore[operator]
        return
    for name, p in model.named_parameters():
        with gathered([p]):
            yield name, p.data


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "merge_adapter") and hasattr(model, "peft_config")


class VLLMSampler:
    """A colocated vLLM engine that samples the student's completions.

    Args:
        model_path: folder or hub id of the student's *base* weights (the engine loads the
            architecture and tokenizer from it; the current weights are pushed by :meth:`sync`).
        sampling: temperature / top-k / top-p / max_new_tokens, as for the HF sampler.
        max_model_len: prompt + completion budget in tokens.
        vocab_size: the tokenizer's length; when the model has padded embedding rows beyond it,
            sampling is restricted to real tokens (as the HF sampler slices its logits).
        model_vocab_size: the model's embedding rows.
        dtype: the engine's weight dtype (``"auto"``, ``"bfloat16"``, ...).
        gpu_memory_utilization: share of GPU memory the engine may take (weights + KV cache).
        enable_sleep_mode: release the engine's weights and KV cache between sampling calls
            (weights re-pushed before the next call): less memory during the update, slower sampling.
        engine_kwargs: passed to ``vllm.LLM`` unchanged (e.g. ``enforce_eager: true``).
        process_index / num_processes: this rank and the world size.
    """

    def __init__(
        self,
        model_path: str,
        sampling: SamplingParams,
        *,
        max_model_len: int,
        vocab_size: int,
        model_vocab_size: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
        process_index: int = 0,
        num_processes: int = 1,
        local_process_index: int = 0,
    ) -> None:
        vllm = import_vllm()
        self.vllm, self.sampling = vllm, sampling
        self.eos_token_ids, self.pad_token_id = list(eos_token_ids), pad_token_id
        self.allowed = list(range(vocab_size)) if vocab_size < model_vocab_size else None
        self.sleep_mode = enable_sleep_mode
        kwargs: dict[str, Any] = dict(
            model=model_path, tensor_parallel_size=1, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, dtype=dtype, seed=process_index, enable_sleep_mode=enable_sleep_mode,
            logprobs_mode="processed_logprobs",  # log q of the distribution actually sampled
        )
        # One engine per training process, run in this process (TRL's colocate mode): the
        # external_launcher executor turns vLLM's engine-core subprocess off, so weights are pushed
        # by reference, never pickled. It reads the launcher's variables.
        os.environ.update(RANK=str(process_index), LOCAL_RANK=str(local_process_index), WORLD_SIZE=str(num_processes))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:  # a plain single-process run
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(engine_kwargs or {})
        self.llm = vllm.LLM(**kwargs)
        self.synced_version: int | None = None  # the optimizer step whose weights the engine holds
        self.weights_asleep = False
        if enable_sleep_mode:
            self.llm.sleep(level=2)
            self.weights_asleep = True

    def sync(self, model: torch.nn.Module, version: int) -> bool:
        """Push ``model``'s weights into the engine unless it already holds ``version``.

        Collective under ZeRO-3: every rank must call it with the same ``version``. Returns whether
        weights were pushed.
        """
        if version == self.synced_version and not self.weights_asleep:
            return False
        if self.weights_asleep:
            self.llm.wake_up(tags=["weights"])
        for name, tensor in student_weights(model):
            self.llm.apply_model(lambda m, item=(name, tensor): m.load_weights([item]))
        self.llm.reset_prefix_cache()  # cached KV of the old weights is stale
        self.synced_version, self.weights_asleep = version, False
        return True

    def sample(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample one completion per left-padded prompt; ``generator`` seeds every request, so a
        run's samples depend only on its seed (and the weights), like the HF sampler's."""
        s = self.sampling
        device = generator.device if generator is not None else "cpu"
        seeds = torch.randint(0, 2**31 - 1, (prompt_ids.shape[0],), generator=generator, device=device).tolist()
        params = [
            self.vllm.SamplingParams(
                n=1, max_tokens=s.max_new_tokens, temperature=s.temperature if s.do_sample else 0.0,
                top_p=s.top_p, top_k=s.top_k, seed=int(seed), logprobs=0, stop_token_ids=self.eos_token_ids,
                allowed_token_ids=self.allowed, skip_special_tokens=False, detokenize=False,
            )
            for seed in seeds
        ]
        prompts = [{"prompt_token_ids": ids[m].tolist()} for ids, m in zip(prompt_ids, prompt_mask.bool(), strict=True)]
        if self.sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self.weights_asleep = True
        return rollout_from_outputs(outputs, prompt_ids, prompt_mask, eos_token_ids=self.eos_token_ids,
                                    pad_token_id=self.pad_token_id, max_new_tokens=s.max_new_tokens)
