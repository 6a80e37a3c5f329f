"""Rollout: sample completions from a policy with a KV cache, no gradient (GKD Algorithm 1, line 4).

The sampler is our own short loop rather than ``model.generate`` because it must (a) return the
log-probability of every sampled token under the sampling distribution, (b) build the completion
mask at sampling time (DESIGN §1.4: never from ``ids != pad``, pad may equal EOS), (c) keep ranks
in lockstep under ZeRO-3, and (d) later advance a teacher beside the student (MiniLLM). The logits
processors themselves are transformers' (temperature, top-k, top-p).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["Rollout", "SamplingParams", "build_logits_processors", "position_ids_from_mask", "sample"]


@dataclass
class SamplingParams:
    """How completions are drawn. ``do_sample=False`` is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


@dataclass
class Rollout:
    """A batch of prompts with completions, as handed from rollout to scorer.

    Prompts are left-padded, completions right-padded; the masks are the only source of truth
    for which positions are real tokens.
    """

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) bool
    completion_ids: torch.Tensor  # (B, L) long, right-padded with pad_token_id
    completion_mask: torch.Tensor  # (B, L) bool, True up to and including EOS
    on_policy: bool = False  # sampled from the student (True) or reference / teacher text (False)
    is_reference: bool = False  # completions are dataset references (CE targets for classic KD)
    sampled_logprobs: torch.Tensor | None = None  # (B, L) fp32 log q_old(y_t), student's (processed) distribution
    teacher_logprobs: torch.Tensor | None = None  # (B, L) fp32 log p(y_t), teacher-mixed sampling only
    mixed_logprobs: torch.Tensor | None = None  # (B, L) fp32 log p̃(y_t) of the distribution actually sampled
    # filled by the trainer after sampling:
    rows: list[dict] | None = None  # (B,) dataset rows (prompt text, extra columns for reward functions)
    rewards: torch.Tensor | None = None  # (B,) user reward, weighted sum over reward functions
    reward_mask: torch.Tensor | None = None  # (B,) bool, False where no function gave a reward
    advantages: torch.Tensor | None = None  # (B,) GKD reward term or (B, L) MiniLLM long-term advantage
    teacher_cache: tuple | None = None  # (τ, TeacherTopK): a MiniLLM buffer's teacher scores, reused across epochs

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + L)
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + L) long
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1).long()

    @property
    def num_tokens(self) -> int:
        """Number of completion tokens (EOS included)."""
        return int(self.completion_mask.sum())

    def to(self, device: torch.device | str) -> Rollout:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return replace(self, **moved)

    @property
    def last_token_index(self) -> torch.Tensor:  # (B,) index of each sequence's last real token (0 if empty)
        return (self.completion_mask.long().sum(-1) - 1).clamp(min=0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token (HF convention: pads get 1)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def build_logits_processors(params: SamplingParams) -> LogitsProcessorList:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p."""
    procs = LogitsProcessorList()
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    return procs


def _as_id_tensor(ids: int | Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor([ids] if isinstance(ids, int) else list(ids), device=device)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    *,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    all_ranks_done: Callable[[bool], bool] | None = None,
    teacher: torch.nn.Module | None = None,
    teacher_mix: float = 0.0,
) -> Rollout:
    """Sample a completion for each left-padded prompt with a KV cache.

    With a ``teacher``, this is MiniLLM's teacher-mixed sampling: both models advance together,
    each with its own KV cache, the same logits processors are applied to both, and the next
    token is drawn from ``p̃ = teacher_mix·p + (1−teacher_mix)·q`` (mixed in probability space).
    ``log q_old(y_t)``, ``log p(y_t)`` and ``log p̃(y_t)`` are stored per token, so importance
    weights need no recomputation. ``teacher_mix=0`` draws exactly what the plain sampler draws.

    A sequence stops at its first EOS (kept in ``completion_mask``); later positions hold
    ``pad_token_id`` and are masked. The loop stops as soon as every sequence has finished, or,
    when ``all_ranks_done`` is given (ZeRO-3), once every rank reports done: a finished rank keeps
    stepping so that parameter gathers stay matched. ``vocab_size`` slices logits to the
    tokenizer's length (padded embedding rows are never sampled).
    """
    if not 0.0 <= teacher_mix <= 1.0:
        raise ValueError(f"teacher_mix must be in [0, 1], got {teacher_mix}")
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    eos = _as_id_tensor(eos_token_id, device)
    procs = build_logits_processors(params)
    attention = prompt_mask.long()
    positions = position_ids_from_mask(attention)
    student_step = _Decoder(model, vocab_size)
    teacher_step = _Decoder(teacher, vocab_size) if teacher is not None else None

    s_logits = student_step(prompt_ids, attention, positions)
    t_logits = teacher_step(prompt_ids, attention, positions) if teacher_step else None
    next_pos = positions[:, -1:] + 1

    tokens, masks, q_logps, p_logps, mix_logps = [], [], [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = prompt_ids
    for _ in range(params.max_new_tokens):
        q_logp = torch.log_softmax(procs(generated, s_logits.float()), dim=-1)
        probs = q_logp.exp()
        p_logp = None
        if t_logits is not None:
            p_logp = torch.log_softmax(procs(generated, t_logits.float()), dim=-1)
            if teacher_mix > 0:
                probs = teacher_mix * p_logp.exp() + (1.0 - teacher_mix) * probs
        if params.do_sample:
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tok = probs.argmax(-1)
        alive = ~finished
        tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        tokens.append(tok)
        masks.append(alive)
        q_logps.append(_gather_alive(q_logp, tok, alive))
        if p_logp is not None:
            p_logps.append(_gather_alive(p_logp, tok, alive))
            mix_logps.append(torch.where(alive, probs.gather(-1, tok[:, None]).squeeze(-1).log(), 0.0))
        finished = finished | torch.isin(tok, eos)
        done = bool(finished.all())
        if (all_ranks_done(done) if all_ranks_done is not None else done) or len(tokens) == params.max_new_tokens:
            break
        generated = torch.cat([generated, tok[:, None]], dim=1)
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        s_logits = student_step(tok[:, None], attention, next_pos)
        if teacher_step is not None:
            t_logits = teacher_step(tok[:, None], attention, next_pos)
        next_pos = next_pos + 1

    if was_training:
        model.train()
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask.bool(),
        completion_ids=torch.stack(tokens, dim=1),
        completion_mask=torch.stack(masks, dim=1),
        on_policy=True,
        sampled_logprobs=torch.stack(q_logps, dim=1),
        teacher_logprobs=torch.stack(p_logps, dim=1) if p_logps else None,
        mixed_logprobs=torch.stack(mix_logps, dim=1) if mix_logps else None,
    )


def _gather_alive(logp: torch.Tensor, tok: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``logp[b, tok[b]]`` for live rows, 0 for finished ones."""
    return torch.where(alive, logp.gather(-1, tok[:, None]).squeeze(-1), 0.0)


class _Decoder:
    """One model's incremental decoding state: its KV cache, returning next-token logits ``(B, V)``."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None):
        self.model, self.vocab_size, self.cache = model, vocab_size, None

    def __call__(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1, : self.vocab_size]
