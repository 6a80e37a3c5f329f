"""Everything that must agree across processes lives here (docs/design.md, Invariants across processes).

Uses ``torch.distributed`` directly when a process group is up (accelerate and DeepSpeed both
create one), and is a no-op in a single process.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist

__all__ = [
    "OnPolicyScheduler",
    "all_ranks_done",
    "all_reduce_sum",
    "any_rank",
    "broadcast_from_main",
    "check_deepspeed_batch_sizes",
    "gathered",
    "gathered_for_generation",
    "is_distributed",
    "prepare_teacher",
    "shutdown",
    "without_zero3_init",
    "world_size",
    "zero_stage",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown(synchronize: bool = True) -> None:
    """Tear the process group down before interpreter exit.

    Left to interpreter shutdown, the gloo / DeepSpeed shared-memory communicator threads can be
    destroyed while still joinable, which aborts the process ("terminate called without an active
    exception", SIGABRT) *after* training finished. ``synchronize`` waits for every rank first; pass
    False on error paths where another rank may never arrive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # DDP reducers / DeepSpeed engines left unreferenced still hold the group
    if synchronize and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except RuntimeError:
            pass
    dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _comm_device() -> torch.device:
    # NCCL needs CUDA tensors; gloo takes CPU tensors.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_main(value: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    t = value.detach().to(_comm_device()).clone()
    dist.broadcast(t, src=0)
    return t.to(value.device)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks (a copy; no gradient)."""
    if not is_distributed():
        return value.detach().clone()
    t = value.detach().to(_comm_device()).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(value.device)


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


def all_ranks_done(local_done: bool) -> bool:
    """True once every rank is done (keeps ZeRO-3 generation in lockstep)."""
    if not is_distributed():
        return local_done
    flag = torch.tensor([0.0 if local_done else 1.0], device=_comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return bool(flag.item() == 0)


class OnPolicyScheduler:
    """GKD Algorithm 1's coin: ``u ~ U(0, 1)`` once per optimizer step, on rank 0, broadcast.

    The step is on-policy iff ``u < λ`` (the paper writes ≤; with ``u ∈ [0, 1)`` this makes λ=0 and λ=1 exact). The generator is seeded by ``seed`` alone and is
    checkpointable through :meth:`state_dict`, so resumed runs make the same decisions.
    """

    def __init__(self, lmbda: float, seed: int):
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        self.lmbda = lmbda
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, lmbda: float | None = None) -> bool:
        """One decision; ``lmbda`` overrides λ for this step (a schedule: the same value on every rank)."""
        u = torch.rand(1, generator=self.generator, dtype=torch.float64)
        u = broadcast_from_main(u)
        return bool(u.item() < (self.lmbda if lmbda is None else lmbda))  # u ∈ [0, 1): λ=0 never, λ=1 always

    def state_dict(self) -> dict:
        return {"lmbda": self.lmbda, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def zero_stage(accelerator) -> int:
    """DeepSpeed ZeRO stage of the run (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def check_deepspeed_batch_sizes(ds_config: dict, per_device_batch_size: int, gradient_accumulation_steps: int,
                                num_processes: int) -> None:
    """DeepSpeed requires ``train_batch_size = micro_batch × accumulation × processes``; numbers written
    into the JSON (instead of ``"auto"``) must agree with the recipe. Raises with the arithmetic."""
    from gkd.errors import ConfigError

    micro = ds_config.get("train_micro_batch_size_per_gpu", "auto")
    gas = ds_config.get("gradient_accumulation_steps", "auto")
    total = ds_config.get("train_batch_size", "auto")
    if micro != "auto" and int(micro) != per_device_batch_size:
        raise ConfigError(f"DeepSpeed config train_micro_batch_size_per_gpu={micro} but per_device_batch_size="
                          f"{per_device_batch_size}; set it to \"auto\" or make them equal")
    if gas != "auto" and int(gas) != gradient_accumulation_steps:
        raise ConfigError(f"DeepSpeed config gradient_accumulation_steps={gas} but the recipe has "
                          f"{gradient_accumulation_steps}; set it to \"auto\" or make them equal")
    want = per_device_batch_size * gradient_accumulation_steps * num_processes
    if total != "auto" and int(total) != want:
        raise ConfigError(
            f"DeepSpeed config train_batch_size={total} must equal per_device_batch_size × "
            f"gradient_accumulation_steps × processes = {per_device_batch_size} × {gradient_accumulation_steps} × "
            f"{num_processes} = {want}; set it to \"auto\" or change the recipe"
        )


def gathered(params: list[torch.nn.Parameter]) -> AbstractContextManager:
    """The full values of ``params`` for the duration (DeepSpeed ``GatheredParameters``) when they
    are ZeRO-3-partitioned; a no-op for ordinary parameters."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


@contextmanager
def gathered_for_generation(models: list[torch.nn.Module]) -> Iterator[None]:
    """Hold the full weights of every ZeRO-3-partitioned model in ``models`` for a sampling loop.

    Without it each decoding step all-gathers every layer again (a collective per layer and
    token); with it there is one gather per model per rollout, at the cost of one full copy of
    the weights per rank while sampling (TRL's ``ds3_gather_for_generation``). Models that are not
    partitioned pass through untouched.
    """
    params = [p for m in models for p in m.parameters() if hasattr(p, "ds_id")]
    # ZeRO-3's post-forward hooks re-partition a layer's weights unless a module still uses them
    # (``ds_active_sub_modules``); a marker no module id can take keeps them whole while sampling,
    # so the pre-forward hooks find them available and gather nothing.
    marker = -1
    with gathered(params):
        for p in params:
            p.ds_active_sub_modules.add(marker)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(marker)


def prepare_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Place the frozen teacher for inference.

    Without DeepSpeed or under ZeRO-2 it is replicated on every device. Under ZeRO-3 its weights
    were partitioned at load time (``from_pretrained`` under ``deepspeed.zero.Init``); a DeepSpeed
    inference engine without optimizer gathers them layer by layer during forward, so the teacher
    never holds optimizer state and no rank holds all of it. Returns the module to call.
    """
    if zero_stage(accelerator) != 3:
        return teacher.to(accelerator.device)
    import copy

    import deepspeed

    ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        ds_config.pop(key, None)
    zero = ds_config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    hidden = getattr(teacher.config, "hidden_size", None)
    for key, value in (("reduce_bucket_size", hidden * hidden if hidden else 5e8),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden) if hidden else 5e8),
                       ("stage3_param_persistence_threshold", 10 * hidden if hidden else 1e5)):
        if zero.get(key) == "auto":
            zero[key] = value
    for key in ("train_batch_size", "gradient_clipping"):
        if ds_config.get(key) == "auto":
            ds_config.pop(key)
    for section in ("bf16", "fp16"):
        if isinstance(ds_config.get(section), dict) and ds_config[section].get("enabled") == "auto":
            ds_config[section]["enabled"] = False
    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    return engine.module


@contextmanager
def without_zero3_init() -> Iterator[None]:
    """Plain (non-partitioned) initialisation even inside a ZeRO-3 launch.

    Only the main process materialises a built-in, converted or pruned model (the others wait in
    ``main_process_first``);
    under ZeRO-3, transformers would build it inside ``deepspeed.zero.Init`` (it does so whenever an
    ``HfDeepSpeedConfig`` of stage 3 is alive, whatever accelerate's ``zero3_init_flag``), whose
    collective initialisation then waits forever for the other ranks. transformers keeps that config
    in a module-level weak reference; it is unset here and restored afterwards."""
    from transformers.integrations import deepspeed as hf_deepspeed

    live = hf_deepspeed._hf_deepspeed_config_weak_ref() if hf_deepspeed._hf_deepspeed_config_weak_ref else None
    if live is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(live)
