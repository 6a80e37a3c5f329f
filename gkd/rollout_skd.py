"""Speculative KD sampling (Xu et al., "Speculative Knowledge Distillation", ICLR 2025, §3.2).

Token by token, SKD builds a completion like this: at position ``t`` the student proposes
``ŷ_t ~ q_t = q(·|x, y_<t)``; if ``ŷ_t`` is among the ``K`` most likely tokens of the teacher's
``p_t = p(·|x, y_<t)`` it is kept, otherwise ``y_t ~ p_t`` is drawn from the teacher. Both ``q_t``
and ``p_t`` are the *processed* distributions (the same temperature / top-k / top-p for both models;
a token the teacher's top-k / top-p cut gives probability 0 is never "in its top-K"). So

    y_t ~ s_t(y) = q_t(y)·1[y ∈ T_t] + q_t(V ∖ T_t)·p_t(y),      T_t = top-K(p_t).

The completion is then trained on like an on-policy one. ``K = |V|`` accepts every proposal (pure
on-policy: the student's own samples); small ``K`` approaches sampling from the teacher.

**Speculative form.** Stepping the teacher once per token would make the (bigger) teacher decode
token by token. Instead each round the student drafts ``k`` tokens ``d_1..d_k`` with its KV cache
(``d_j ~ q(·|h, d_<j)`` after the committed prefix ``h``), the teacher scores all of them in one
forward (``p(·|h, d_<j)`` for ``j = 1..k``), the drafts are accepted up to the first one outside the
teacher's top-K, that one is replaced by a draw from ``p(·|h, d_<j)``, and the rest of the round is
dropped (it was drafted after a token that is not in the sequence).

**Why this is exactly token-by-token SKD.** By induction over committed tokens. Given the committed
prefix ``h``, the next draft ``d_1`` is drawn from ``q(·|h)`` — the proposal SKD makes at that
position — and its verdict depends only on ``d_1`` and ``p(·|h)``, which the teacher pass computes
on that same prefix. So the next committed token is ``d_1`` with probability ``q(y|h)·1[y ∈ T(h)]``
and otherwise (probability ``q(V ∖ T(h)|h)``) a fresh draw from ``p(·|h)``: the law ``s(·|h)``.
If ``d_1`` is kept, ``d_2`` was drawn from ``q(·|h, d_1)`` and is judged with ``p(·|h, d_1)``: the
same step one token later, and so on. Drafts after a replacement are thrown away unused; later
rounds use fresh random numbers. Unlike speculative sampling of a *target* distribution (the
teacher-mixed sampler of :mod:`gkd.rollout`, which needs ``min(1, p̃/q)`` acceptance and a residual
draw), SKD's own rule is a deterministic test of the student's proposal, so the block form needs no
correction at all: the teacher's replacement draw *is* SKD's teacher draw. This holds for every
``k`` (tested with a χ² test over whole sequences); ``k = 1`` is the token-by-token loop.

With ``K ≥ |V|`` and no top-k / top-p every draft is accepted and no extra random numbers are drawn:
the plain sampler's tokens for the same generator state.

Stored per committed token (the same fields as teacher-mixed sampling): ``log q_old(y_t)`` at the
sampling temperature without the top-k / top-p cut (finite for a teacher-drawn token outside the
student's cut), ``log p(y_t)`` of the teacher's *unprocessed* distribution (what the sampled-token
objective needs, here for free), ``log s_t(y_t)`` of the distribution actually sampled (in
``mixed_logprobs``), and ``skd_replaced``: whether the teacher drew it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gkd.losses import TeacherTopK
from gkd.rollout import (
    Rollout,
    SamplingParams,
    _as_id_tensor,
    _commit,
    _draft_and_verify,
    _multinomial,
    _prefill_both,
    build_logits_processors,
)
from gkd.serving.protocol import padded_topk

__all__ = ["in_teacher_top_k", "sample_skd", "skd_metrics", "skd_token_logprobs"]


def in_teacher_top_k(p_logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    """``(…, V)`` bool: token ``v`` is among the ``top_k`` most likely tokens of ``p`` (ties at the
    K-th value count as in) and has ``p(v) > 0``. ``top_k ≥ V``: every token of the support."""
    support = p_logprobs > -math.inf
    if top_k >= p_logprobs.shape[-1]:
        return support
    kth = p_logprobs.topk(top_k, dim=-1).values[..., -1:]
    return support & (p_logprobs >= kth)


def skd_token_logprobs(q_logprobs: torch.Tensor, p_logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    """``log s(y)`` for every token ``(…, V)``: ``s = q·1[y ∈ T] + q(V ∖ T)·p``, ``T`` = top-K of ``p``
    (the distribution SKD samples from, given processed ``log q`` and ``log p``)."""
    inside = in_teacher_top_k(p_logprobs, top_k)
    kept = torch.where(inside, q_logprobs, -math.inf)
    log_out = torch.where(inside, -math.inf, q_logprobs).logsumexp(-1, keepdim=True)  # log q(V ∖ T)
    return torch.logaddexp(kept, log_out + p_logprobs)


@torch.no_grad()
def sample_skd(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    *,
    teacher: torch.nn.Module,
    skd_top_k: int,
    draft_tokens: int = 4,
    adaptive_draft: bool = True,
    keep_teacher_topk: tuple[int, float] | None = None,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    all_ranks_done: Callable[[bool], bool] | None = None,
) -> Rollout:
    """SKD completions of left-padded prompts (see the module docstring), at most ``draft_tokens`` student
    drafts per teacher pass; the other arguments are :func:`gkd.rollout.sample`'s. Both models are put
    in eval mode for sampling (the student's mode is restored).

    With ``adaptive_draft`` each round drafts ``k = min(⌊a/(1−a)⌋ + 1, draft_tokens)`` tokens, ``a``
    the share of drafts this call has kept so far (smoothed: ``(kept + 1)/(judged + 2)``): the expected
    run of kept drafts plus the one that ends it. A student that is often replaced (a broken one, early
    in training) then stops paying for drafts that are thrown away, and a good one drafts long blocks.
    ``k`` depends only on earlier rounds, so every round is still exactly token-by-token SKD.

    ``keep_teacher_topk = (k, τ)`` keeps, from the verification passes, the teacher's top-``k`` view
    at temperature ``τ`` of every committed position in ``Rollout.teacher_cache`` (``(τ, TeacherTopK)``,
    what :func:`gkd.scorer.score` with ``topk=k`` returns), so the loss needs no teacher scoring pass.

    Rows advance by different amounts per round; both KV caches keep one common layout in which the
    slots of dropped drafts are holes in the attention mask (explicit position ids keep positions
    contiguous per row), as in the teacher-mixed sampler. Greedy (``do_sample=False``): the student's
    argmax, replaced by the teacher's argmax when outside the teacher's top-K."""
    if skd_top_k < 1:
        raise ValueError(f"skd_top_k must be >= 1, got {skd_top_k}")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    was_training = model.training
    model.eval()
    teacher.eval()
    try:
        return _sample_skd(model, teacher, prompt_ids, prompt_mask, params, top_k=skd_top_k, k_max=draft_tokens,
                           adaptive=adaptive_draft, keep=keep_teacher_topk,
                           eos=_as_id_tensor(eos_token_id, prompt_ids.device), pad_token_id=pad_token_id,
                           vocab_size=vocab_size, generator=generator, all_ranks_done=all_ranks_done)
    finally:
        if was_training:
            model.train()


def _sample_skd(model: torch.nn.Module, teacher: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                params: SamplingParams, *, top_k: int, k_max: int, adaptive: bool, keep: tuple[int, float] | None,
                eos: torch.Tensor, pad_token_id: int,
                vocab_size: int | None, generator: torch.Generator | None,
                all_ranks_done: Callable[[bool], bool] | None) -> Rollout:
    device = prompt_ids.device
    batch, max_new = prompt_ids.shape[0], params.max_new_tokens
    procs = build_logits_processors(params)
    attention, base, student_step, teacher_step, s_logits, t_first = _prefill_both(
        model, teacher, prompt_ids, prompt_mask, vocab_size)
    width = max_new + k_max  # room for a round's overshoot; column width - 1 takes the writes of finished rows
    names = ("q", "p", "s", "replaced")
    out = {name: torch.zeros(batch, width, device=device) for name in names}
    out_ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    if keep is not None:  # the teacher's top-k view of committed positions: uniform filler elsewhere (masked)
        kk = min(keep[0], int(t_first.shape[-1]))
        view = [t.to(device) for t in padded_topk(batch, width, kk)]  # indices, logprobs, log tail
    length = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    pending: torch.Tensor | None = None  # last committed token, not yet in either cache
    stats = torch.zeros(3, dtype=torch.long, device=device)  # on live rows: drafts accepted, replaced, row-rounds
    kept = judged = 0  # drafts kept / judged so far on live rows (adaptive draft length)
    for _ in range(max_new):  # every round commits >= 1 token per live row
        a = (kept + 1) / (judged + 2)
        k = min(k_max, math.floor(a / (1 - a)) + 1) if adaptive else k_max
        cols = torch.arange(k, device=device)
        start = base + length + (1 if pending is None else 0)  # position of the first fed token
        rnd, attention, s_logits = _draft_and_verify(
            student_step, teacher_step, procs, params, prompt_ids, generator, k=k, s_logits=s_logits,
            t_first=t_first, attention=attention, pending=pending, start=start)
        q_all, qt_all, p_all, r_all, p_raw = rnd.q, rnd.q_stored, rnd.p, rnd.p_unprocessed, rnd.p_logits
        inside = in_teacher_top_k(p_all, top_k)  # (B, k, V) the teacher's top-K
        log_out = torch.where(inside, -math.inf, q_all).logsumexp(-1)  # (B, k) log q(V ∖ T): P(replace)
        d_all = rnd.drafts  # (B, k)
        accepted = inside.gather(-1, d_all[..., None]).squeeze(-1)
        n_acc = accepted.long().cumprod(1).sum(1)  # leading accepted drafts per row
        rejected = n_acc < k
        new_ids = d_all
        any_rejected = bool(rejected.any())
        if any_rejected:  # the teacher's draw at each row's first rejected draft
            at = n_acc.clamp(max=k - 1)
            p_j = p_all[rows, at]
            y = _multinomial(p_j.exp(), generator) if params.do_sample else p_j.argmax(-1)
            put = rejected[:, None] & (cols == at[:, None])
            new_ids = torch.where(put, y[:, None], d_all)
        else:
            put = torch.zeros_like(d_all, dtype=torch.bool)

        at_ids = new_ids[..., None]  # gather each committed candidate's value at its position
        log_s = torch.logaddexp(torch.where(inside.gather(-1, at_ids), q_all.gather(-1, at_ids), -math.inf),
                                log_out[..., None] + p_all.gather(-1, at_ids)).squeeze(-1)
        values = {"q": qt_all.gather(-1, at_ids).squeeze(-1), "p": r_all.gather(-1, at_ids).squeeze(-1), "s": log_s,
                  "replaced": put.float()}
        n_new = torch.where(rejected, n_acc + 1, torch.full_like(n_acc, k))
        live = ~finished
        stats += torch.stack([(n_acc * live).sum(), (rejected & live).sum(), live.sum()])
        if adaptive:
            kept, judged = int(stats[0]), int(stats[0] + stats[1])
        valid, index, length, finished, pending = _commit(
            rnd, new_ids, n_acc, n_new, pending=pending, attention=attention, out_ids=out_ids, length=length,
            finished=finished, eos=eos, max_new=max_new, pad_token_id=pad_token_id)
        for name in names:
            out[name].scatter_(1, index, torch.where(valid, values[name], 0.0))
        if keep is not None:
            lp = r_all if keep[1] == 1.0 else torch.log_softmax(p_raw / keep[1], dim=-1)
            top, idx = lp.topk(kk, dim=-1)  # (B, k, kk)
            tail = torch.logsumexp(lp.scatter(-1, idx, -math.inf), -1).clamp(min=TeacherTopK.LOG_ZERO)
            at = torch.where(valid, index, width - 1)
            for buf, val in ((view[0], idx), (view[1], top)):
                buf.scatter_(1, at[..., None].expand(-1, -1, kk), torch.where(valid[..., None], val, buf[:, -1:]))
            view[2].scatter_(1, at, torch.where(valid, tail, view[2][:, -1:]))
        done = bool(finished.all())
        if all_ranks_done(done) if all_ranks_done is not None else done:
            break
    used = max(int(length.max()), 1)
    mask = torch.arange(used, device=device)[None] < length[:, None]
    cached = None
    if keep is not None:
        cached = (keep[1], TeacherTopK(view[0][:, :used], view[1][:, :used], view[2][:, :used]))
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(),
        completion_ids=out_ids[:, :used].masked_fill(~mask, pad_token_id),
        completion_mask=mask, on_policy=True, sampled_logprobs=out["q"][:, :used] * mask,
        teacher_logprobs=out["p"][:, :used] * mask, mixed_logprobs=out["s"][:, :used] * mask,
        skd_replaced=(out["replaced"][:, :used] > 0) & mask, teacher_cache=cached,
        draft_stats=tuple(stats.tolist()),  # type: ignore[arg-type]
    )


def skd_metrics(rollouts: list[Rollout], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Over a step's SKD rollouts, all ranks: ``skd_replaced``, the share of committed tokens the teacher
    drew, and ``skd_tokens_per_teacher_pass``, the tokens a live sequence commits per teacher pass."""
    stats = [r for r in rollouts if r.skd_replaced is not None and r.draft_stats is not None]
    if not stats:
        return {}
    totals = all_reduce_sum(torch.tensor([
        float(sum(int(r.skd_replaced.sum()) for r in stats)),  # type: ignore[union-attr]
        float(sum(r.num_tokens for r in stats)),
        float(sum(r.draft_stats[2] for r in stats)),  # type: ignore[index]
    ], dtype=torch.float64))
    replaced, tokens, rounds = totals.tolist()
    return {"skd_replaced": replaced / max(tokens, 1.0), "skd_tokens_per_teacher_pass": tokens / max(rounds, 1.0)}
