"""Rollout: sample completions from a policy with a KV cache, no gradient (GKD Algorithm 1, line 4).

The sampler is our own short loop rather than ``model.generate`` because it must (a) return the
log-probability of every sampled token under the sampling distribution, (b) build the completion
mask at sampling time (docs/design.md, Masks: never from ``ids != pad``, pad may equal EOS), (c) keep ranks
in lockstep under ZeRO-3, and (d) later advance a teacher beside the student (MiniLLM). The logits
processors themselves are transformers' (temperature, top-k, top-p).
"""

from __future__ import annotations

import functools
import inspect
import math
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
    sampled_logprobs: torch.Tensor | None = None  # (B, L) fp32 log q_old(y_t): plain sampling: of the processed distribution; teacher-mixed: at the sampling temperature, without top-k / top-p (as q_θ in MiniLLM's loss)
    teacher_logprobs: torch.Tensor | None = None  # (B, L) fp32 log p(y_t) of the unprocessed teacher (no τ / top-k / top-p), teacher-mixed sampling only
    mixed_logprobs: torch.Tensor | None = None  # (B, L) fp32 log p̃(y_t) of the distribution actually sampled
    # filled by the trainer after sampling:
    rows: list[dict] | None = None  # (B,) dataset rows (prompt text, extra columns for reward functions)
    rewards: torch.Tensor | None = None  # (B,) user reward, weighted sum over reward functions
    reward_mask: torch.Tensor | None = None  # (B,) bool, False where no function gave a reward
    advantages: torch.Tensor | None = None  # (B,) GKD reward term or (B, L) MiniLLM long-term advantage
    teacher_cache: tuple | None = None  # (τ, TeacherTopK): a MiniLLM buffer's teacher scores, reused across epochs
    draft_stats: tuple[int, int, int] | None = None  # teacher-mixed / SKD sampling, live rows: (accepted, rejected, row-rounds)
    skd_replaced: torch.Tensor | None = None  # (B, L) bool: SKD sampling only, the teacher drew this token (gkd.rollout_skd)

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
    draft_tokens: int = 1,
) -> Rollout:
    """Sample a completion for each left-padded prompt with a KV cache.

    With a ``teacher``, this is MiniLLM's teacher-mixed sampling: every token is drawn from
    ``p̃ = teacher_mix·p + (1−teacher_mix)·q`` (mixed in probability space, the same logits
    processors applied to both models first), and ``log q_old(y_t)``, ``log p(y_t)`` and
    ``log p̃(y_t)`` are stored per token, so importance weights need no recomputation. The student
    drafts ``draft_tokens`` tokens and the teacher scores them in one pass (speculative sampling
    with target p̃, see :func:`_sample_mixed`); the result is an exact sample of p̃ for every value.
    ``teacher_mix=0`` draws exactly what the plain sampler draws.

    A sequence stops at its first EOS (kept in ``completion_mask``); later positions hold
    ``pad_token_id`` and are masked. The loop stops as soon as every sequence has finished, or,
    when ``all_ranks_done`` is given (ZeRO-3), once every rank reports done: a finished rank keeps
    stepping so that parameter gathers stay matched. ``vocab_size`` slices logits to the
    tokenizer's length (padded embedding rows are never sampled).
    """
    if not 0.0 <= teacher_mix <= 1.0:
        raise ValueError(f"teacher_mix must be in [0, 1], got {teacher_mix}")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    was_training = model.training
    model.eval()
    common = dict(eos=_as_id_tensor(eos_token_id, prompt_ids.device), pad_token_id=pad_token_id,
                  vocab_size=vocab_size, generator=generator, all_ranks_done=all_ranks_done)
    try:
        if teacher is not None:
            teacher.eval()
            return _sample_mixed(model, teacher, prompt_ids, prompt_mask, params, mix=teacher_mix, k=draft_tokens,
                                 **common)  # type: ignore[arg-type]
        return _sample_plain(model, prompt_ids, prompt_mask, params, **common)  # type: ignore[arg-type]
    finally:
        if was_training:
            model.train()


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row. A row with NaN/inf or no mass (a diverged student) draws uniformly instead of
    crashing: its tokens are junk, but its stored log-probs and the loss on them stay non-finite, so the
    optimizer step skips it like any other non-finite step (no host sync here)."""
    bad = ~torch.isfinite(probs).all(-1, keepdim=True) | ~(probs.sum(-1, keepdim=True) > 0)
    probs = torch.where(bad, torch.ones_like(probs), probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _draw(probs: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    if do_sample:
        return _multinomial(probs, generator)
    return probs.argmax(-1)


def _sample_plain(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
                  *, eos: torch.Tensor, pad_token_id: int, vocab_size: int | None, generator: torch.Generator | None,
                  all_ranks_done: Callable[[bool], bool] | None) -> Rollout:
    batch = prompt_ids.shape[0]
    procs = build_logits_processors(params)
    attention = prompt_mask.long()
    positions = position_ids_from_mask(attention)
    student_step = _Decoder(model, vocab_size)
    s_logits = student_step(prompt_ids, attention, positions)
    next_pos = positions[:, -1:] + 1
    tokens, masks, q_logps = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    for _ in range(params.max_new_tokens):
        q_logp = torch.log_softmax(procs(prompt_ids, s_logits.float()), dim=-1)
        tok = _draw(q_logp.exp(), params.do_sample, generator)
        alive = ~finished
        tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        tokens.append(tok)
        masks.append(alive)
        q_logps.append(_gather_alive(q_logp, tok, alive))
        finished = finished | torch.isin(tok, eos)
        done = bool(finished.all())
        if (all_ranks_done(done) if all_ranks_done is not None else done) or len(tokens) == params.max_new_tokens:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        s_logits = student_step(tok[:, None], attention, next_pos)
        next_pos = next_pos + 1
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), completion_ids=torch.stack(tokens, dim=1),
        completion_mask=torch.stack(masks, dim=1), on_policy=True, sampled_logprobs=torch.stack(q_logps, dim=1),
    )


def _sample_mixed(model: torch.nn.Module, teacher: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  params: SamplingParams, *, eos: torch.Tensor, pad_token_id: int, vocab_size: int | None,
                  generator: torch.Generator | None, all_ranks_done: Callable[[bool], bool] | None, mix: float,
                  k: int) -> Rollout:
    """Teacher-mixed sampling as speculative sampling with target ``p̃ = mix·p + (1−mix)·q``.

    Each round the student drafts ``k`` tokens ``d_1..d_k`` from ``q`` (one KV-cached step each),
    then the teacher scores all of them in one forward. Draft ``d_j`` is accepted with probability
    ``min(1, p̃_j(d_j)/q_j(d_j))``; at the first rejection the token is redrawn from the residual
    ``∝ max(0, p̃_j − q_j) = mix·max(0, p_j − q_j)`` and the rest of the round is discarded (Leviathan
    et al. 2023, Chen et al. 2023: the committed tokens are exact samples of p̃). Since
    ``p̃/q ≥ 1 − mix``, at least 80 % of drafts are accepted at the default mix 0.2, whatever the
    models. Rows advance by different amounts; both KV caches keep one common layout, and rejected
    slots become holes in the attention mask (with explicit position ids, so positions stay
    contiguous per row). ``k = 1`` is the teacher stepping with every token. With ``mix = 0``
    nothing is ever rejected and no extra random numbers are drawn: the plain sampler's tokens.
    """
    device = prompt_ids.device
    batch, max_new = prompt_ids.shape[0], params.max_new_tokens
    procs = build_logits_processors(params)
    attention, base, student_step, teacher_step, s_logits, t_first = _prefill_both(
        model, teacher, prompt_ids, prompt_mask, vocab_size)
    log_mix, log_rest = (math.log(mix) if mix > 0 else -math.inf), (math.log1p(-mix) if mix < 1 else -math.inf)
    width = max_new + k  # room for a round's overshoot; column width - 1 takes the writes of finished rows
    out = {name: torch.zeros(batch, width, device=device) for name in ("q", "p", "mix")}
    out_ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    length = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cols = torch.arange(k, device=device)
    pending: torch.Tensor | None = None  # last committed token, not yet in either cache
    stats = torch.zeros(3, dtype=torch.long, device=device)  # on live rows: drafts accepted, rejected, row-rounds
    for _ in range(max_new):  # every round commits >= 1 token per live row
        start = base + length + (1 if pending is None else 0)  # position of the first fed token
        rnd, attention, s_logits = _draft_and_verify(
            student_step, teacher_step, procs, params, prompt_ids, generator, k=k, s_logits=s_logits,
            t_first=t_first, attention=attention, pending=pending, start=start)
        q_all, qt_all, p_all, r_all = rnd.q, rnd.q_stored, rnd.p, rnd.p_unprocessed
        d_all = rnd.drafts  # (B, k)
        q_d = q_all.gather(-1, d_all[..., None]).squeeze(-1)
        qt_d = qt_all.gather(-1, d_all[..., None]).squeeze(-1)
        p_d = p_all.gather(-1, d_all[..., None]).squeeze(-1)
        r_d = r_all.gather(-1, d_all[..., None]).squeeze(-1)
        mix_d = torch.logaddexp(p_d + log_mix, q_d + log_rest)
        if mix == 0:
            accepted = torch.ones_like(d_all, dtype=torch.bool)
        elif params.do_sample:
            accepted = torch.rand(d_all.shape, generator=generator, device=device) < (mix_d - q_d).exp()
        else:  # greedy: keep the draft while it is the mixture's argmax
            accepted = d_all == torch.logaddexp(p_all + log_mix, q_all + log_rest).argmax(-1)
        n_acc = accepted.long().cumprod(1).sum(1)  # leading accepted drafts per row
        rejected = n_acc < k
        new_ids, new_q, new_r, new_mix = d_all, qt_d, r_d, mix_d
        any_rejected = bool(rejected.any())
        if any_rejected:
            at = n_acc.clamp(max=k - 1)
            rows = torch.arange(batch, device=device)
            q_j, p_j = q_all[rows, at].exp(), p_all[rows, at].exp()
            if params.do_sample:
                resid = (p_j - q_j).clamp(min=0)
                resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, mix * p_j + (1 - mix) * q_j)
                y = _multinomial(resid, generator)
            else:
                y = (mix * p_j + (1 - mix) * q_j).argmax(-1)
            y_q = q_all[rows, at].gather(-1, y[:, None]).squeeze(-1)
            y_p = p_all[rows, at].gather(-1, y[:, None]).squeeze(-1)
            y_qt = qt_all[rows, at].gather(-1, y[:, None]).squeeze(-1)
            y_r = r_all[rows, at].gather(-1, y[:, None]).squeeze(-1)
            put = rejected[:, None] & (cols == at[:, None])
            new_ids = torch.where(put, y[:, None], d_all)
            new_q, new_r = torch.where(put, y_qt[:, None], qt_d), torch.where(put, y_r[:, None], r_d)
            new_mix = torch.where(put, torch.logaddexp(y_p + log_mix, y_q + log_rest)[:, None], mix_d)
        n_new = torch.where(rejected, n_acc + 1, torch.full_like(n_acc, k))
        live = ~finished
        stats += torch.stack([(n_acc * live).sum(), (rejected & live).sum(), live.sum()])  # no host sync
        valid, index, length, finished, pending = _commit(
            rnd, new_ids, n_acc, n_new, pending=pending, attention=attention, out_ids=out_ids, length=length,
            finished=finished, eos=eos, max_new=max_new, pad_token_id=pad_token_id)
        for name, val in (("q", new_q), ("p", new_r), ("mix", new_mix)):
            out[name].scatter_(1, index, torch.where(valid, val, 0.0))
        done = bool(finished.all())
        if all_ranks_done(done) if all_ranks_done is not None else done:
            break
    used = max(int(length.max()), 1)
    mask = torch.arange(used, device=device)[None] < length[:, None]
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(),
        completion_ids=out_ids[:, :used].masked_fill(~mask, pad_token_id),
        completion_mask=mask, on_policy=True, sampled_logprobs=out["q"][:, :used] * mask,
        teacher_logprobs=out["p"][:, :used] * mask, mixed_logprobs=out["mix"][:, :used] * mask,
        draft_stats=tuple(stats.tolist()),  # type: ignore[arg-type]
    )


def _prefill_both(model: torch.nn.Module, teacher: torch.nn.Module, prompt_ids: torch.Tensor,
                  prompt_mask: torch.Tensor, vocab_size: int | None,
                  ) -> tuple[torch.Tensor, torch.Tensor, _Decoder, _Decoder, torch.Tensor, torch.Tensor]:
    """Start of the speculative samplers: both models read the prompts into their KV caches. Returns the
    attention mask, each prompt's last position (new token ``i`` sits at ``base + i``), both decoders
    and the student's and teacher's logits for the first new token."""
    attention = prompt_mask.long()
    positions = position_ids_from_mask(attention)
    student_step, teacher_step = _Decoder(model, vocab_size), _Decoder(teacher, vocab_size)
    s_logits = student_step(prompt_ids, attention, positions)
    t_first = teacher_step(prompt_ids, attention, positions)
    return attention, positions[:, -1], student_step, teacher_step, s_logits, t_first


@dataclass
class _Round:
    """One draft-and-verify round of the speculative samplers (teacher-mixed here, SKD in
    :mod:`gkd.rollout_skd`): ``k`` student drafts and the teacher's distributions at their positions."""

    fed: list[torch.Tensor]  # tokens appended to both KV caches this round (the pending token, then d_1..d_{k-1})
    drafts: torch.Tensor  # (B, k) d_1..d_k
    q: torch.Tensor  # (B, k, V) log q after the logits processors (what the drafts were drawn from)
    q_stored: torch.Tensor  # (B, k, V) log q_old: at the sampling temperature, without the top-k / top-p cut
    p: torch.Tensor  # (B, k, V) log p after the same processors
    p_unprocessed: torch.Tensor  # (B, k, V) log p of the raw teacher (no τ / top-k / top-p)
    p_logits: torch.Tensor  # (B, k, V) the teacher's raw logits


def _draft_and_verify(student_step: _Decoder, teacher_step: _Decoder, procs: LogitsProcessorList,
                      params: SamplingParams, prompt_ids: torch.Tensor, generator: torch.Generator | None, *, k: int,
                      s_logits: torch.Tensor, t_first: torch.Tensor, attention: torch.Tensor,
                      pending: torch.Tensor | None, start: torch.Tensor) -> tuple[_Round, torch.Tensor, torch.Tensor]:
    """The student drafts ``k`` tokens (one KV-cached step each, the ``pending`` token first), then one
    teacher pass over the fed tokens gives ``p`` at every drafted position. ``start``: position of the first
    fed token per row. Returns the round, the grown attention mask and the student's logits after the
    last fed token."""
    truncates = params.top_k > 0 or params.top_p < 1.0
    fed = [] if pending is None else [pending]
    if pending is not None:
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        s_logits = student_step(pending[:, None], attention, start[:, None])
    q_steps, drafts, qt_steps = [], [], []
    for j in range(k):
        q = torch.log_softmax(procs(prompt_ids, s_logits.float()), dim=-1)
        d = _draw(q.exp(), params.do_sample, generator)
        q_steps.append(q)
        drafts.append(d)
        if truncates:
            qt_steps.append(torch.log_softmax(s_logits.float() / params.temperature, dim=-1))
        if j < k - 1:
            fed.append(d)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            s_logits = student_step(d[:, None], attention, (start + len(fed) - 1)[:, None])
    p_logits = []
    if pending is None:
        p_logits.append(t_first[:, None])
    if fed:
        slot_pos = start[:, None] + torch.arange(len(fed), device=prompt_ids.device)
        p_logits.append(teacher_step(torch.stack(fed, 1), attention, slot_pos, all_positions=True))
    p_raw = torch.cat(p_logits, 1).float()  # (B, k, V)
    q_all = torch.stack(q_steps, 1)
    p_all = torch.log_softmax(procs(prompt_ids, p_raw.flatten(0, 1)), dim=-1).view_as(q_all)
    # log p(y_t) for the reward / the stored teacher log-probs comes from the unprocessed teacher (as the
    # MiniLLM authors score it): a token outside the teacher's top-k / top-p keeps a finite log-prob
    r_all = torch.log_softmax(p_raw, dim=-1) if procs else p_all
    qt_all = torch.stack(qt_steps, 1) if truncates else q_all
    rnd = _Round(fed=fed, drafts=torch.stack(drafts, 1), q=q_all, q_stored=qt_all, p=p_all, p_unprocessed=r_all,
                 p_logits=p_raw)
    return rnd, attention, s_logits


def _commit(rnd: _Round, new_ids: torch.Tensor, n_acc: torch.Tensor, n_new: torch.Tensor, *,
            pending: torch.Tensor | None, attention: torch.Tensor, out_ids: torch.Tensor, length: torch.Tensor,
            finished: torch.Tensor, eos: torch.Tensor, max_new: int, pad_token_id: int,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """End of a speculative round: the fed slots holding dropped drafts become holes in ``attention``
    (in place); each row's first ``n_new`` of ``new_ids`` are written to ``out_ids`` up to its first EOS
    and ``max_new`` tokens, nothing for finished rows (column ``width − 1`` takes the discarded writes).
    Returns ``valid`` (B, k), the write ``index`` (B, k), and the new ``length``, ``finished`` and
    ``pending`` (each row's last committed token, not yet in either cache)."""
    k, width = new_ids.shape[1], out_ids.shape[1]
    cols = torch.arange(k, device=new_ids.device)
    if rnd.fed:  # slot s holds d_s, or the pending token at s = 0
        draft_index = cols[: len(rnd.fed)] + (0 if pending is not None else 1)
        attention[:, -len(rnd.fed):] = (draft_index[None] <= n_acc[:, None]).long()
    valid = (cols[None] < n_new[:, None]) & ~finished[:, None]
    is_eos = torch.isin(new_ids, eos) & valid
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(n_new, k))
    valid &= (cols[None] <= first_eos[:, None]) & (length[:, None] + cols[None] < max_new)
    index = torch.where(valid, length[:, None] + cols[None], torch.full_like(new_ids, width - 1))
    out_ids.scatter_(1, index, torch.where(valid, new_ids, pad_token_id))
    length = length + valid.sum(1)
    finished = finished | (is_eos & valid).any(1) | (length >= max_new)
    rows = torch.arange(new_ids.shape[0], device=new_ids.device)
    pending = new_ids[rows, (n_new - 1).clamp(max=k - 1)]
    return valid, index, length, finished, pending


def _gather_alive(logp: torch.Tensor, tok: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``logp[b, tok[b]]`` for live rows, 0 for finished ones."""
    return torch.where(alive, logp.gather(-1, tok[:, None]).squeeze(-1), 0.0)


@functools.cache
def _cache_argument(model_class: type) -> str:
    """The keyword a model's ``forward`` takes the KV cache by: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (older releases; deprecated, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class _Decoder:
    """One model's incremental decoding state: its KV cache, returning next-token logits ``(B, V)``."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None):
        self.model, self.vocab_size, self.cache = model, vocab_size, None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft forwards **kwargs
        self.cache_arg = _cache_argument(type(base))

    def __call__(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                 all_positions: bool = False) -> torch.Tensor:
        """Feed ``input_ids`` (B, n); next-token logits of the last position ``(B, V)``, or of every
        fed position ``(B, n, V)`` with ``all_positions``."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
            logits_to_keep=0 if all_positions else 1, **{self.cache_arg: self.cache},
        )
        self.cache = getattr(out, self.cache_arg)
        logits = out.logits[..., : self.vocab_size]
        return logits if all_positions else logits[:, -1]
