"""A stand-in for the parts of vLLM that ``gkd.rollout_vllm`` uses, for CPU tests.

vLLM needs a CUDA GPU and cannot be installed here, so the backend's glue (weight push, request
building, output conversion, sleep mode) is tested against this module, put on ``sys.path`` by the
tests. It mirrors vLLM 0.33.0's API: the keyword names accepted by ``LLM`` (EngineArgs) and
``SamplingParams`` below were read from the 0.33.0 wheel, and unknown names raise ``TypeError``
as vLLM does. Sampling is plain per-request ancestral sampling with the request's seed; like
vLLM, a stop token is kept in ``token_ids``, ``load_format="dummy"`` gives random weights and
``logprobs=0`` returns the sampled token's processed log-prob.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ENGINE_ARGS = frozenset("""
    model enable_return_routed_experts return_sampling_mask model_weights served_model_name tokenizer
    hf_config_path runner convert skip_tokenizer_init enable_prompt_embeds tokenizer_mode
    trust_remote_code allowed_local_media_path allowed_media_domains download_dir
    safetensors_load_strategy safetensors_prefetch_num_threads safetensors_prefetch_block_size
    load_format config_format dtype kv_cache_dtype seed max_model_len cudagraph_capture_sizes
    max_cudagraph_capture_size ir_op_priority distributed_executor_backend pipeline_parallel_size
    master_addr master_port nnodes node_rank distributed_timeout_seconds cpu_distributed_timeout_seconds
    numa_bind numa_bind_nodes numa_bind_cpus device_ids tensor_parallel_size
    prefill_context_parallel_size decode_context_parallel_size dcp_comm_backend dcp_q_replicate
    dcp_kv_cache_interleave_size cp_kv_cache_interleave_size data_parallel_size data_parallel_rank
    data_parallel_start_rank data_parallel_size_local data_parallel_address data_parallel_rpc_port
    data_parallel_hybrid_lb data_parallel_external_lb data_parallel_multi_port_external_lb
    data_parallel_backend enable_hc_sp enable_expert_parallel enable_batch_sharded_sampling
    enable_ep_weight_filter moe_backend linear_backend sparse_indexer_topk_backend enable_elastic_ep
    elastic_ep_max_dp_size enable_dbo ubatch_size dbo_decode_token_threshold dp_sync_interval
    dbo_prefill_token_threshold disable_nccl_for_dp_synchronization eplb_config enable_eplb
    expert_placement_strategy max_parallel_loading_workers block_size enable_prefix_caching
    prefix_caching_hash_algo prefix_cache_retention_interval disable_sliding_window disable_cascade_attn
    offload_backend cpu_offload_gb cpu_offload_params offload_group_size offload_num_in_group
    offload_prefetch_step offload_params gpu_memory_utilization kv_cache_memory_bytes
    max_num_batched_tokens max_num_scheduled_tokens long_prefill_token_threshold
    long_prefill_token_threshold_adaptive max_num_seqs max_num_active_seqs max_num_queued_reqs
    max_num_queued_tokens max_logprobs logprobs_mode enable_trace_replay disable_log_stats
    aggregate_engine_logging revision code_revision hf_token hf_overrides model_class_overrides
    tokenizer_revision quantization quantization_config allow_deprecated_quantization enforce_eager
    disable_custom_all_reduce enable_shm_tensor_arena language_model_only limit_mm_per_prompt
    enable_mm_embeds interleave_mm_strings media_io_kwargs mm_processor_kwargs mm_processor_cache_gb
    mm_processor_cache_type mm_hasher_algorithm mm_shm_cache_max_object_size_mb mm_encoder_only
    mm_encoder_tp_mode mm_encoder_attn_backend mm_encoder_attn_dtype io_processor_plugin
    renderer_num_workers skip_mm_profiling video_pruning_rate video_pruning_method mm_tensor_ipc
    mm_processor_device mm_ipc_gpu_memory_gb mm_device_do_normalize enable_lora max_loras max_lora_rank
    default_mm_loras fully_sharded_loras max_cpu_loras lora_dtype lora_target_modules
    enable_tower_connector_lora specialize_active_lora enable_mixed_moe_lora_format
    enable_moe_shared_loras max_lora_cls_labels ray_workers_use_nsight num_gpu_blocks_override
    model_loader_extra_config ignore_patterns enable_chunked_prefill disable_chunked_mm_input
    scheduler_reserve_full_isl prefill_schedule_interval watermark disable_hybrid_kv_cache_manager
    structured_outputs_config aux_output_config reasoning_parser reasoning_parser_plugin
    speculative_config spec_method spec_model spec_tokens watermark_config diffusion_config
    show_hidden_metrics_for_version otlp_traces_endpoint collect_detailed_traces
    per_request_spec_decode_metrics kv_cache_metrics kv_cache_metrics_sample custom_histogram_buckets
    cudagraph_metrics enable_layerwise_nvtx_tracing enable_mfu_metrics enable_logging_iteration_details
    jit_monitor_mode jit_monitor_verbose enable_mm_processor_stats scheduling_policy scheduler_cls
    pooler_config compilation_config attention_config engram_config mamba_config kernel_config
    enable_flashinfer_autotune monokernel worker_cls worker_extension_cls profiler_config logging_config
    log_level log_config_file kv_transfer_config kv_events_config ec_transfer_config ec_manager_config
    reasoning_config generation_config enable_sleep_mode sleep_mode_backend sleep_mode_offload_cudagraph
    sleep_preserve_parameter_names enable_cumem_allocator enable_nccl_comm_suspend
    override_generation_config model_impl attention_backend kv_cache_dtype_skip_layers mamba_cache_dtype
    mamba_ssm_cache_dtype mamba_block_size prefix_match_unit mamba_cache_mode
    enable_mamba_shared_prefix_checkpoint replayssm_buffer_len use_replayssm mamba_backend
    mamba_ssu_algorithm enable_mamba_cache_stochastic_rounding mamba_cache_philox_rounds
    additional_config use_tqdm_on_load pt_load_map_location logits_processors async_scheduling
    stream_interval kv_sharing_fast_prefill swa_bounded_replay optimization_level performance_mode
    fault_tolerance_config enable_fault_tolerance kv_offloading_size kv_offloading_backend tokens_only
    shutdown_timeout watchdog_config weight_transfer_config fail_on_environ_validation
    gdn_prefill_backend kda_prefill_backend kda_decode_backend
""".split())

SAMPLING_PARAMS = frozenset("""
    n presence_penalty frequency_penalty repetition_penalty temperature watermarking top_p top_k min_p
    seed stop stop_token_ids ignore_eos max_tokens min_tokens logprobs prompt_logprobs
    prompt_logprob_token_ids prompt_logprob_start logprob_token_ids flat_logprobs detokenize
    skip_special_tokens spaces_between_special_tokens include_stop_str_in_output output_kind
    stream_interval skip_clone output_text_buffer_length structured_outputs logit_bias allowed_token_ids
    extra_args bad_words skip_reading_prefix_cache thinking_token_budget repetition_detection
    routed_experts_prompt_start trace_decode_token_ids
""".split())

# every engine built in this process, newest last (tests inspect them)
ENGINES: list[LLM] = []


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_PARAMS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        self.n, self.temperature, self.top_p, self.top_k = 1, 1.0, 1.0, 0
        self.seed = self.stop_token_ids = self.logprobs = self.allowed_token_ids = None
        self.max_tokens = 16
        self.__dict__.update(kwargs)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class _Model:
    """What ``LLM.apply_model`` hands to its function: the engine's model with ``load_weights``."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.hf = hf_model
        self.loaded: list[str] = []

    def load_weights(self, weights: Any) -> set[str]:
        params = dict(self.hf.named_parameters())
        done = set()
        for name, tensor in weights:
            if name not in params:  # vLLM raises on names its model does not have
                raise KeyError(f"fake vllm: no parameter named {name!r}")
            params[name].data.copy_(tensor.to(params[name].dtype))
            self.loaded.append(name)
            done.add(name)
        return done


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
        from transformers import AutoConfig, AutoModelForCausalLM

        self.kwargs = {"model": model, **kwargs}
        if kwargs.get("load_format") != "dummy":
            raise AssertionError("the fake only builds dummy-weight engines, as gkd asks for")
        torch.manual_seed(12345)  # "dummy" weights: random, unrelated to the student's
        self.model = _Model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).eval())
        self.calls: list[tuple[str, Any]] = []
        self.asleep: set[str] = set()
        ENGINES.append(self)

    def apply_model(self, func: Any) -> list[Any]:
        if "weights" in self.asleep:
            raise RuntimeError("fake vllm: weights touched while asleep")
        self.calls.append(("apply_model", None))
        return [func(self.model)]

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache", None))
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        assert self.kwargs.get("enable_sleep_mode"), "sleep() needs enable_sleep_mode=True"
        self.calls.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}
        if level == 2:  # level 2 discards the weights
            for p in self.model.hf.parameters():
                p.data.zero_()

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        self.asleep -= set(tags or ["weights", "kv_cache"])
        return True

    @torch.no_grad()
    def generate(self, prompts: list[dict], sampling_params: Any = None, *, use_tqdm: Any = True,
                 **kwargs: Any) -> list[RequestOutput]:
        if self.asleep:
            raise RuntimeError(f"fake vllm: generate() while {sorted(self.asleep)} asleep")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append(("generate", params))
        return [self._one(i, p["prompt_token_ids"], sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]

    def _one(self, index: int, prompt: list[int], sp: SamplingParams) -> RequestOutput:
        g = torch.Generator().manual_seed(sp.seed if sp.seed is not None else index)
        ids, out, logps = list(prompt), [], []
        finish = "length"
        for _ in range(sp.max_tokens):
            logits = self.model.hf(torch.tensor([ids])).logits[0, -1].float()
            if sp.allowed_token_ids is not None:
                keep = torch.full_like(logits, float("-inf"))
                keep[sp.allowed_token_ids] = 0.0
                logits = logits + keep
            if sp.temperature == 0:
                tok = int(logits.argmax())
                logp = torch.log_softmax(logits, -1)
            else:
                logits = logits / sp.temperature
                if sp.top_k and sp.top_k > 0:
                    kth = logits.topk(sp.top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                if sp.top_p < 1.0:
                    sorted_logits, order = logits.sort(descending=True)
                    cum = sorted_logits.softmax(-1).cumsum(-1)
                    drop = cum - sorted_logits.softmax(-1) > sp.top_p
                    logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
                logp = torch.log_softmax(logits, -1)  # processed_logprobs
                tok = int(torch.multinomial(logp.exp(), 1, generator=g))
            ids.append(tok)
            out.append(tok)
            logps.append({tok: Logprob(float(logp[tok]), rank=1)})
            if tok in (sp.stop_token_ids or []):
                finish = "stop"  # the stop token stays in token_ids, as in vLLM's check_stop
                break
        comp = CompletionOutput(0, "", out, sum(d[t].logprob for d, t in zip(logps, out, strict=True)),
                                logps if sp.logprobs is not None else None, finish)
        return RequestOutput(str(index), None, list(prompt), [comp])
