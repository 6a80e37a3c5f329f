"""Memory-lean loss evaluation: per-token losses over the vocabulary, a chunk of tokens at a time.

A full-vocabulary loss written naively holds several ``(tokens, V)`` fp32 tensors at once (upcast
logits, two log-softmaxes, the mixture, their gradients): at V = 151,936 and 8 × 1024 tokens each is
~5 GB. :func:`chunked_loss` instead runs the loss and its gradient **inside the forward pass**, one
chunk of rows at a time (an ``autograd.Function`` whose backward only rescales the stored gradient,
the approach of Liger-Kernel's fused-linear losses, written here in plain PyTorch so every
divergence of :mod:`gkd.losses` works unchanged and on CPU). At most one chunk of ``(chunk, V)`` fp32
intermediates is alive at any time; beyond that only the gradient of the logits is kept, in the
logits' own dtype.

With ``head`` (the student's LM-head weight) the input is the final hidden states ``(N, H)``; each
chunk's logits are formed as ``h @ Wᵀ``, used and dropped, so full student logits never exist; the
gradients of ``h`` and ``W`` are accumulated chunk by chunk.

The same file holds the teacher side: :func:`teacher_topk` turns the teacher's final hidden states
into top-k log-probs plus a tail bucket (``gkd.losses.TeacherTopK``), also a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gkd.losses import TeacherTopK

__all__ = ["ChunkFn", "chunked_loss", "teacher_topk", "teacher_topk_and_targets", "token_weights"]

#: ``fn(logits_chunk (n, V), rows) -> {name: (n,) per-token values}``; ``"loss"`` is differentiated;
#: ``rows`` indexes the flattened batch (a LongTensor, or ``slice(None)`` on the unchunked path).
ChunkFn = Callable[[torch.Tensor, "torch.Tensor | slice"], dict[str, torch.Tensor]]


def token_weights(mask: torch.Tensor, reduction: str = "token_mean") -> torch.Tensor:
    """Per-token weights ``c_t`` with ``Σ_t c_t·ℓ_t`` = :func:`gkd.losses.masked_sum_and_count`'s sum:
    the mask for ``token_mean``, ``mask / L_seq`` for ``sequence_mean``."""
    m = mask.bool()
    if reduction == "token_mean":
        return m.float()
    if reduction == "sequence_mean":
        return m.float() / m.sum(-1, keepdim=True).clamp(min=1).float()
    raise ValueError(f"unknown reduction {reduction!r}; valid: token_mean, sequence_mean")


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, head, weights, fn, chunk_size, vocab_size, names_out):  # type: ignore[override]
        ctx.head_dtype = head.dtype if head is not None else None
        grad_x_needed = ctx.needs_input_grad[0]
        grad_w_needed = head is not None and ctx.needs_input_grad[1]
        n = student.shape[0]
        grad_student = torch.zeros_like(student) if grad_x_needed else None
        grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if grad_w_needed else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        active = (weights != 0).nonzero().squeeze(-1)  # rows outside the mask are never computed
        collected: dict[str, torch.Tensor] = {}
        for start in range(0, active.numel(), chunk_size):
            rows = active[start : start + chunk_size]
            w = weights[rows]
            with torch.enable_grad():
                x = student[rows].detach().requires_grad_(grad_x_needed)
                h = head.detach().requires_grad_(grad_w_needed) if head is not None else None
                logits = x @ h.t() if h is not None else x
                if vocab_size is not None:
                    logits = logits[..., :vocab_size]
                terms = fn(logits, rows)
                objective = (terms["loss"].float() * w).sum()
                inputs = [t for t in (x, h) if t is not None and t.requires_grad]
                grads = list(torch.autograd.grad(objective, inputs)) if inputs and objective.requires_grad else []
            if grad_student is not None and grads:
                grad_student[rows] = grads.pop(0).to(grad_student.dtype)
            if grad_head is not None and grads:
                grad_head += grads.pop(0).float()
            total += objective.detach()
            for name, value in terms.items():
                if name not in collected:
                    collected[name] = torch.zeros(n, dtype=torch.float32, device=student.device)
                collected[name][rows] = value.detach().float()
            del logits, terms, objective, grads, x, h  # nothing of the chunk outlives it
        names_out.extend(collected)
        ctx.save_for_backward(grad_student, grad_head)
        stacked = torch.stack(list(collected.values())) if collected else student.new_zeros(0, n)
        ctx.mark_non_differentiable(stacked)
        return total, stacked

    @staticmethod
    def backward(ctx, grad_total, _grad_terms):  # type: ignore[override]
        grad_student, grad_head = ctx.saved_tensors
        gs = grad_student * grad_total.to(grad_student.dtype) if grad_student is not None else None
        gh = (grad_head * grad_total).to(ctx.head_dtype) if grad_head is not None else None
        return gs, gh, None, None, None, None, None


def chunked_loss(
    fn: ChunkFn,
    student: torch.Tensor,
    weights: torch.Tensor,
    *,
    head: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(Σ_t weights_t·loss_t, {name: (N,) values})``, gradient to ``student`` (and ``head``).

    ``student`` is ``(N, V)`` logits, or ``(N, H)`` final hidden states when ``head`` ``(V', H)`` is
    given (fused LM head; ``vocab_size`` slices a padded head). Only rows with a non-zero weight are
    computed (their values are 0 in the returned dict). ``fn(logits_chunk, rows)`` returns per-token
    values for the rows ``rows`` (a LongTensor of row indices) of the flattened batch; it indexes its
    own auxiliary tensors (teacher logits, ids, advantages) with ``rows``. Equal to evaluating ``fn``
    on all rows at once, for values and gradients (tested), with one chunk of intermediates alive.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if weights.shape != student.shape[:1]:
        raise ValueError(f"weights {tuple(weights.shape)} must have one entry per row of student {tuple(student.shape)}")
    names: list[str] = []
    total, stacked = _ChunkedLoss.apply(student, head, weights.float(), fn, chunk_size, vocab_size, names)
    return total, {name: stacked[i] for i, name in enumerate(names)}


@torch.no_grad()
def teacher_topk(
    hidden_or_logits: torch.Tensor,
    k: int,
    *,
    head: torch.nn.Module | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> TeacherTopK:
    """The teacher's ``k`` most likely tokens per position with their log-probs at ``temperature``,
    and the log-probability of everything else (the tail bucket), a chunk of rows at a time.

    Input is ``(N, V)`` logits, or ``(N, H)`` final hidden states with the teacher's ``head`` module
    (so full teacher logits never exist). Exact: with ``k >= V`` the tail is empty (log 0 → -inf,
    stored as a large negative number)."""
    return teacher_topk_and_targets(hidden_or_logits, k, None, head=head, vocab_size=vocab_size,
                                    temperature=temperature, chunk_size=chunk_size)[0]


@torch.no_grad()
def teacher_topk_and_targets(
    hidden_or_logits: torch.Tensor,
    k: int,
    targets: torch.Tensor | None,
    *,
    head: torch.nn.Module | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[TeacherTopK, torch.Tensor | None]:
    """:func:`teacher_topk`, plus (with ``targets``, ``(N,)`` token ids) each target's log-prob under the
    unprocessed teacher (temperature 1: MiniLLM's reward ``log p(y_t)``), from the same chunks."""
    n = hidden_or_logits.shape[0]
    indices, logprobs, tails, picked = [], [], [], []
    for start in range(0, n, chunk_size):
        x = hidden_or_logits[start : start + chunk_size]
        logits = head(x) if head is not None else x
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        logits = logits.float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        kk = min(k, logp.shape[-1])
        top, idx = logp.topk(kk, dim=-1)
        rest = logp.scatter(-1, idx, float("-inf"))
        tails.append(torch.logsumexp(rest, dim=-1).clamp(min=TeacherTopK.LOG_ZERO))
        indices.append(idx)
        logprobs.append(top)
        if targets is not None:
            raw = logp if temperature == 1.0 else torch.log_softmax(logits, dim=-1)
            picked.append(raw.gather(-1, targets[start : start + chunk_size, None].to(raw.device)).squeeze(-1))
            del raw
        del logits, logp, rest
    token_logprobs = torch.cat(picked) if targets is not None else None
    return TeacherTopK(torch.cat(indices), torch.cat(logprobs), torch.cat(tails)), token_logprobs
