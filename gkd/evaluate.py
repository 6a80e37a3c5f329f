"""Held-out evaluation, the metrics of ``gkd eval`` (:mod:`gkd.eval_command`) and of ``eval_steps``: task
reward / exact match, Rouge-L, teacher–student KL on the student's own completions, collapse signs and
verifiable instructions (:mod:`gkd.verifiable`), with greedy or seeded sampled decoding.

* **Exact match**: a task checker ``checker(prompt, completion) -> bool`` (the built-in task's
  :func:`gkd.task.check_answer`), or else the completion equals the reference after stripping
  surrounding whitespace.
* **Rewards**: any reward functions in TRL's signature (:mod:`gkd.rewards`), mean per function.
* **Rouge-L**: F-measure of the ``rouge-score`` package against the reference (stemming on, as in
  MiniLLM's evaluation), mean over completions, in [0, 1] (papers print ×100).
* **KL**: on the completions the evaluated model itself produced (greedy, or sampled with a seed),
  the exact per-position ``KL(p_t‖q_t)`` (forward) and ``KL(q_t‖p_t)`` (reverse) over the
  vocabulary (untempered fp32 log-softmax, docs/concepts.md), averaged over all completion tokens (EOS
  included). On sampled completions the reverse-KL token mean is a Monte-Carlo estimate of the
  sequence-level reverse KL per token, the quantity MiniLLM minimises.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gkd.data import PromptDataset, collate
from gkd.errors import InputError
from gkd.losses import forward_kl, log_probs, reverse_kl
from gkd.rewards import RewardFn, RewardFunctions
from gkd.rollout import Rollout, SamplingParams, sample
from gkd.scorer import completion_logits
from gkd.teachers import TeacherRouter

logger = logging.getLogger(__name__)

__all__ = ["DECODINGS", "EvalResult", "KLTotals", "eval_shard", "evaluate", "evaluate_in_training", "exact_match",
           "greedy_completions", "kl_row_sums", "kl_sums", "model_completions", "rouge_l", "sequence_stats",
           "teacher_forced_kl", "teacher_forced_kls"]

#: Decoding modes: ``greedy`` (argmax) or ``sample`` (temperature / top-p / top-k, seeded).
DECODINGS = ("greedy", "sample")


@dataclass
class EvalResult:
    """Metrics of one model under one decoding mode on a list of prompts."""

    accuracy: float | None  # exact-match share (checker, or reference match); None without either
    forward_kl: float | None  # token-mean KL(teacher‖model) on the model's own completions
    reverse_kl: float | None  # token-mean KL(model‖teacher) on the same completions
    completion_len_mean: float  # completion tokens per completion, EOS included
    samples: list[dict[str, str]]  # a few {"prompt", "completion"[, "reference"]}
    rouge_l: float | None = None  # mean Rouge-L F-measure against the references, in [0, 1]
    rewards: dict[str, float] = field(default_factory=dict)  # "reward/<name>" means and the weighted "reward"
    decoding: str = "greedy"
    num_prompts: int = 0
    num_completions: int = 0  # num_prompts × samples_per_prompt
    distinct_2: float | None = None  # mean distinct-bigram share per completion (see sequence_stats)
    repeat_4: float | None = None  # mean share of repeated 4-grams per completion
    no_eos: float | None = None  # share of completions that hit max_new_tokens without EOS
    verifiable: dict[str, Any] | None = None  # IFEval scores of the rows with instruction_id_list (gkd.verifiable)
    # several teachers: name → {"forward_kl", "reverse_kl", "tokens", "num_completions"} over that teacher's rows
    teachers: dict[str, dict[str, float]] | None = None
    completions: list[str] = field(default_factory=list, repr=False)  # every decoded completion, in row order

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("completions")  # in the generations file, not the report
        return out


def sequence_stats(completion_ids: Sequence[Sequence[int]], eos_token_id: int | Sequence[int]) -> dict[str, float]:
    """Collapse signs of a set of completions (token ids, EOS included where it was produced), as sums
    over completions so that processes can add them up: ``distinct_2`` (per completion, distinct
    bigrams / bigrams; a repeated pattern scores low), ``repeat_4`` (share of 4-grams that already
    occurred earlier in the same completion; a loop scores high), ``no_eos`` (completions that ended
    without EOS, i.e. at ``max_new_tokens``) and ``n``."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    distinct = repeat = no_eos = 0.0
    for ids in completion_ids:
        ids = list(ids)
        body = ids[:-1] if ids and ids[-1] in eos else ids
        no_eos += float(not ids or ids[-1] not in eos)
        bigrams = list(zip(body, body[1:], strict=False))
        distinct += len(set(bigrams)) / len(bigrams) if bigrams else 1.0
        grams = [tuple(body[i : i + 4]) for i in range(len(body) - 3)]
        seen: set[tuple[int, ...]] = set()
        repeated = 0
        for g in grams:
            repeated += g in seen
            seen.add(g)
        repeat += repeated / len(grams) if grams else 0.0
    return {"distinct_2": distinct, "repeat_4": repeat, "no_eos": no_eos, "n": float(len(completion_ids))}


def exact_match(completion: str, reference: str) -> bool:
    """Reference match: equal after stripping surrounding whitespace (case and inner spacing count)."""
    return completion.strip() == reference.strip()


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Rouge-L F-measure of each prediction against its reference (``rouge-score``, stemmer on)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:  # a core dependency; only a broken install lands here
        raise InputError("Rouge-L needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str] | Sequence[Mapping[str, Any]],
    checker: Callable[[str, str], bool] | None = None,
    *,
    teacher: torch.nn.Module | None = None,
    reward_funcs: RewardFunctions | Sequence[str | RewardFn] | None = None,
    decoding: str = "greedy",
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    max_new_tokens: int = 16,
    max_prompt_length: int = 1024,
    batch_size: int = 128,
    num_samples: int = 3,
    rouge: bool | None = None,
    all_ranks_done: Callable[[bool], bool] | None = None,
    verifiable: bool | None = None,
    save_generations: Callable[[list[dict[str, Any]]], None] | None = None,
) -> EvalResult:
    """Decode every prompt with ``model`` and score the completions.

    ``prompts`` are strings or rows ``{"prompt", "completion" (reference), ...}`` (extra columns go to
    the reward functions). Prompts are tokenised exactly as for training (:class:`PromptDataset`,
    truncated from the left at ``max_prompt_length``). ``decoding="sample"`` draws
    ``samples_per_prompt`` completions per prompt with a generator seeded by ``seed``. With a
    ``teacher`` (same tokenizer), the teacher–model KLs on those completions are computed too.
    ``rouge`` defaults to "when every row has a reference". ``num_samples`` completions are kept
    for display. ``all_ranks_done`` keeps sampling in lockstep across processes (ZeRO-3), as in training.
    Rows that carry ``instruction_id_list`` / ``kwargs`` (IFEval's format) are scored with IFEval's
    checkers (:mod:`gkd.verifiable`) into ``verifiable``: always with ``verifiable=True`` (a missing
    ``if-verifiable`` package is then an error), when the package is installed with ``None``, never with
    ``False``. ``save_generations`` receives one record per completion as soon as decoding ends, before
    anything is scored, so a failure while scoring loses no generation.
    """
    if decoding not in DECODINGS:
        raise InputError(f"decoding={decoding!r} is not valid; choose one of: {', '.join(DECODINGS)}")
    if samples_per_prompt < 1:
        raise InputError(f"samples_per_prompt={samples_per_prompt} must be >= 1")
    rows = [dict(p) if isinstance(p, Mapping) else {"prompt": p} for p in prompts]
    references = [r.get("completion") for r in rows]
    has_refs = bool(rows) and all(isinstance(r, str) for r in references)
    rouge = has_refs if rouge is None else rouge
    if rouge and not has_refs:
        raise InputError("Rouge-L needs a reference 'completion' in every row")
    if isinstance(reward_funcs, RewardFunctions):
        rewards_fn: RewardFunctions | None = reward_funcs
    else:
        rewards_fn = RewardFunctions.from_specs(list(reward_funcs)) if reward_funcs else None
    draws = samples_per_prompt if decoding == "sample" else 1
    rows = [row for row in rows for _ in range(draws)]  # each prompt's draws side by side

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = len(tokenizer)
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                do_sample=decoding == "sample")
    except ValueError as e:
        raise InputError(str(e)) from None
    generator = torch.Generator(device).manual_seed(seed) if decoding == "sample" else None
    dataset = PromptDataset(rows, tokenizer, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens)
    completions: list[str] = []
    completion_ids: list[list[int]] = []
    kls = KLTotals()
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(rows)))],
                        tokenizer.pad_token_id)
        rollout = sample(
            model, batch["prompt_ids"].to(device), batch["prompt_mask"].to(device), params,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab,
            generator=generator, all_ranks_done=all_ranks_done,
        )
        rollout.rows = batch["rows"]  # several teachers: each row's KLs against its own
        ids = [rollout.completion_ids[i][rollout.completion_mask[i]].tolist() for i in range(len(batch["rows"]))]
        completion_ids.extend(ids)
        completions.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
        if teacher is not None:
            kls.add(model, teacher, rollout, vocab)
        else:
            kls.count(rollout)
    if was_training:
        model.train()

    prompt_texts = [r["prompt"] for r in rows]
    if save_generations is not None:
        eos = tokenizer.eos_token_id
        save_generations([{"index": i // draws, "draw": i % draws, **({"key": row["key"]} if "key" in row else {}),
                           "prompt": prompt_texts[i], "completion": completions[i], "tokens": len(completion_ids[i]),
                           "eos": bool(completion_ids[i]) and completion_ids[i][-1] == eos}
                          for i, row in enumerate(rows)])
    verifiable_scores = _score_verifiable(rows, completions, verifiable)
    if checker is not None:
        hits: list[bool] | None = [bool(checker(p, c)) for p, c in zip(prompt_texts, completions, strict=True)]
    elif has_refs:
        hits = [exact_match(c, r["completion"]) for c, r in zip(completions, rows, strict=True)]
    else:
        hits = None
    rewards: dict[str, float] = {}
    if rewards_fn and rows:
        values, mask, rewards = rewards_fn(prompt_texts, completions, completion_ids, rows)
        if bool(mask.any()):
            rewards["reward"] = float(values[mask].mean())
    n = len(rows)
    tokens = kls.tokens
    has_kl = teacher is not None and tokens > 0
    samples = []
    for i in range(0, min(n, num_samples * draws), draws):
        shown = {"prompt": prompt_texts[i], "completion": completions[i]}
        if has_refs:
            shown["reference"] = rows[i]["completion"]
        samples.append(shown)
    stats = sequence_stats(completion_ids, tokenizer.eos_token_id)
    per = max(stats["n"], 1.0)
    return EvalResult(
        distinct_2=stats["distinct_2"] / per, repeat_4=stats["repeat_4"] / per, no_eos=stats["no_eos"] / per,
        accuracy=sum(hits) / n if hits is not None and n else None,
        forward_kl=kls.forward_kl if has_kl else None,
        reverse_kl=kls.reverse_kl if has_kl else None,
        teachers=kls.per_teacher() if has_kl and isinstance(teacher, TeacherRouter) else None,
        completion_len_mean=tokens / max(n, 1),
        samples=samples,
        rouge_l=sum(rouge_l(completions, [r["completion"] for r in rows])) / n if rouge and n else None,
        rewards=rewards,
        decoding=decoding,
        num_prompts=n // draws,
        num_completions=n,
        verifiable=verifiable_scores,
        completions=completions,
    )


def _score_verifiable(rows: Sequence[Mapping[str, Any]], completions: Sequence[str],
                      verifiable: bool | None) -> dict[str, Any] | None:
    """IFEval scores of the constrained rows (see :func:`evaluate`), or None."""
    from gkd import verifiable as ver

    if verifiable is False or not any(ver.constrained(r) for r in rows):
        return None
    try:
        ver.registry()
    except InputError:
        if verifiable:
            raise
        logger.warning("rows carry verifiable instructions but if-verifiable is not installed; not scored "
                       "(pip install 'gkd[eval]')")
        return None
    return ver.score_rows(rows, completions).summary()


#: Most logits (rows × positions × vocabulary) :func:`kl_sums` holds per model at once (~256 MB in fp32).
KL_CHUNK_ELEMENTS = 2**26


@torch.no_grad()
def kl_row_sums(model: torch.nn.Module, teacher: torch.nn.Module | TeacherRouter, rollout: Rollout, vocab_size: int,
                max_elements: int = KL_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``(B,)`` float64: the sums over its completion tokens of ``KL(teacher‖model)`` and
    ``KL(model‖teacher)``, a few rows at a time so that full-vocabulary logits stay bounded (32 rows × 512
    tokens × 49,152 tokens would be 3.2 GB per tensor, and an evaluation with a teacher ran out of 24 GB).
    A :class:`gkd.teachers.TeacherRouter` scores each row (``rollout.rows``) with its own teacher."""
    n, length = rollout.completion_ids.shape
    rows = max(1, max_elements // max(length * vocab_size, 1))
    fkl = torch.zeros(n, dtype=torch.float64)
    rkl = torch.zeros(n, dtype=torch.float64)
    for i in range(0, n, rows):
        part = Rollout(rollout.prompt_ids[i:i + rows], rollout.prompt_mask[i:i + rows],
                       rollout.completion_ids[i:i + rows], rollout.completion_mask[i:i + rows],
                       rows=rollout.rows[i:i + rows] if rollout.rows is not None else None)
        s = log_probs(completion_logits(model, part, vocab_size))
        t = log_probs(teacher.logits(part, vocab_size) if isinstance(teacher, TeacherRouter) else  # teachers: each row's
                      completion_logits(teacher, part, vocab_size))
        mask = part.completion_mask.to(s.device)
        fkl[i:i + rows] = (forward_kl(s, t).double() * mask).sum(-1).cpu()
        rkl[i:i + rows] = (reverse_kl(s, t).double() * mask).sum(-1).cpu()
        del s, t
    return fkl, rkl


@torch.no_grad()
def kl_sums(model: torch.nn.Module, teacher: torch.nn.Module | TeacherRouter, rollout: Rollout, vocab_size: int,
            max_elements: int = KL_CHUNK_ELEMENTS) -> tuple[float, float]:
    """Sums over all completion tokens of ``KL(teacher‖model)`` and ``KL(model‖teacher)``
    (:func:`kl_row_sums`)."""
    fkl, rkl = kl_row_sums(model, teacher, rollout, vocab_size, max_elements)
    return float(fkl.sum()), float(rkl.sum())


class KLTotals:
    """Token sums of ``KL(teacher‖model)`` and ``KL(model‖teacher)`` over rollouts, overall and, with several
    teachers (a :class:`gkd.teachers.TeacherRouter`), per teacher over the rows routed to it."""

    def __init__(self) -> None:
        self.fkl = self.rkl = self.tokens = 0.0
        self.by_teacher: dict[str, list[float]] = {}  # name → [Σ forward, Σ reverse, tokens, rows]

    def count(self, rollout: Rollout) -> None:
        """Only the tokens (no teacher)."""
        self.tokens += float(rollout.completion_mask.sum())

    def add(self, model: torch.nn.Module, teacher: torch.nn.Module | TeacherRouter, rollout: Rollout,
            vocab_size: int) -> None:
        fkl, rkl = kl_row_sums(model, teacher, rollout, vocab_size)
        tokens = rollout.completion_mask.sum(-1).double().cpu()
        self.fkl, self.rkl, self.tokens = self.fkl + float(fkl.sum()), self.rkl + float(rkl.sum()), \
            self.tokens + float(tokens.sum())
        if isinstance(teacher, TeacherRouter):
            for i, name in enumerate(teacher.row_names(rollout.rows, fkl.shape[0])):
                acc = self.by_teacher.setdefault(name, [0.0, 0.0, 0.0, 0.0])
                acc[0] += float(fkl[i])
                acc[1] += float(rkl[i])
                acc[2] += float(tokens[i])
                acc[3] += 1.0

    @property
    def forward_kl(self) -> float:
        return self.fkl / max(self.tokens, 1.0)

    @property
    def reverse_kl(self) -> float:
        return self.rkl / max(self.tokens, 1.0)

    def per_teacher(self) -> dict[str, dict[str, float]]:
        """name → token means over that teacher's rows, its tokens and rows (teachers with rows only)."""
        return {name: {"forward_kl": f / max(t, 1.0), "reverse_kl": r / max(t, 1.0), "tokens": t,
                       "num_completions": n} for name, (f, r, t, n) in self.by_teacher.items()}


def greedy_completions(model: torch.nn.Module, tokenizer, rows: Sequence[Mapping[str, Any]], *, max_new_tokens: int,
                       max_prompt_length: int, batch_size: int) -> list[str]:
    """``model``'s greedy answer to each row's prompt (the reference of prompt-only rows in ``gkd eval``)."""
    return model_completions(model, tokenizer, rows, max_new_tokens=max_new_tokens,
                             max_prompt_length=max_prompt_length, batch_size=batch_size)


@torch.no_grad()
def model_completions(model: torch.nn.Module, tokenizer, rows: Sequence[Mapping[str, Any]], *, max_new_tokens: int,
                      max_prompt_length: int, batch_size: int, do_sample: bool = False, temperature: float = 1.0,
                      seed: int = 0) -> list[str]:
    """``model``'s answer to each row's prompt: greedy, or sampled at ``temperature`` with a generator
    seeded by ``seed`` (the same seed gives the same answers for the same batch size)."""
    device = next(model.parameters()).device
    dataset = PromptDataset([dict(r) for r in rows], tokenizer, max_prompt_length=max_prompt_length,
                            max_new_tokens=max_new_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature)
    generator = torch.Generator(device).manual_seed(seed) if do_sample else None
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(rows)))], tokenizer.pad_token_id)
        r = sample(model, batch["prompt_ids"].to(device), batch["prompt_mask"].to(device), params,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                   generator=generator)
        ids = [r.completion_ids[i][r.completion_mask[i]].tolist() for i in range(r.completion_ids.shape[0])]
        out.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
    return out


@torch.no_grad()
def teacher_forced_kl(model: torch.nn.Module, teacher: torch.nn.Module | TeacherRouter, tokenizer,
                      rows: Sequence[Mapping[str, Any]], *, max_new_tokens: int, max_prompt_length: int,
                      batch_size: int) -> tuple[float, float]:
    """Token means of ``KL(teacher‖model)`` and ``KL(model‖teacher)`` on given completions (the rows'
    ``completion``, here the teacher's own answers), teacher-forced: unlike the KLs on the model's own
    samples, a model cannot lower these by repeating itself."""
    kls = teacher_forced_kls(model, teacher, tokenizer, rows, max_new_tokens=max_new_tokens,
                             max_prompt_length=max_prompt_length, batch_size=batch_size)
    return kls.forward_kl, kls.reverse_kl


@torch.no_grad()
def teacher_forced_kls(model: torch.nn.Module, teacher: torch.nn.Module | TeacherRouter, tokenizer,
                       rows: Sequence[Mapping[str, Any]], *, max_new_tokens: int, max_prompt_length: int,
                       batch_size: int) -> KLTotals:
    """:func:`teacher_forced_kl` as :class:`KLTotals` (per teacher too, with several teachers)."""
    from gkd.data import reference_rollout

    device = next(model.parameters()).device
    dataset = PromptDataset([dict(r) for r in rows], tokenizer, max_prompt_length=max_prompt_length,
                            max_new_tokens=max_new_tokens)
    kls = KLTotals()
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(rows)))], tokenizer.pad_token_id)
        kls.add(model, teacher, reference_rollout(batch).to(device), len(tokenizer))
    return kls


def eval_shard(rows: list[dict[str, Any]], eval_prompts: int, process_index: int, num_processes: int,
               eval_steps: int = 0) -> list[dict[str, Any]]:
    """This process's share of the held-out prompts for ``eval_steps``: the first ``eval_prompts`` rows,
    cut to a multiple of the process count so every rank decodes the same number (ZeRO-3 lockstep)."""
    per_rank = min(eval_prompts, len(rows)) // num_processes
    if per_rank == 0:
        raise InputError(f"eval_steps={eval_steps}: {len(rows)} held-out rows cannot give each of "
                         f"{num_processes} process(es) a prompt")
    return rows[process_index * per_rank:(process_index + 1) * per_rank]


@torch.no_grad()
def evaluate_in_training(student: torch.nn.Module, tokenizer, rows: list[dict[str, Any]], *,
                         teacher: torch.nn.Module | None, dataset: str, max_new_tokens: int, max_prompt_length: int,
                         gather_for_generation: bool) -> dict[str, float]:
    """Greedy held-out evaluation of the student during training (``eval_steps``) on this process's
    ``rows``, summed over processes: ``eval_accuracy``, ``eval_rouge_l``, ``eval_forward_kl`` /
    ``eval_reverse_kl`` (teacher vs student on the student's completions, per token) and ``eval_len``
    (tokens per completion). With several teachers (a :class:`gkd.teachers.TeacherRouter`) each row's KLs
    are against its own teacher, and ``eval_forward_kl/<name>`` / ``eval_reverse_kl/<name>`` are the token
    means over each teacher's rows (all processes; a teacher without held-out rows is left out)."""
    from gkd import distributed

    checker = None
    if dataset == "builtin:addition":
        from gkd.task import check_answer

        checker = check_answer
    start = time.perf_counter()
    with distributed.gathered_for_generation([student] if gather_for_generation else []):
        r = evaluate(student, tokenizer, rows, checker, teacher=teacher, decoding="greedy",
                     max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                     batch_size=len(rows), num_samples=0,
                     all_ranks_done=distributed.all_ranks_done if distributed.is_distributed() else None)
    n, tokens = float(r.num_completions), r.completion_len_mean * r.num_completions
    # (name, mean, averaged over tokens rather than completions); metrics a run lacks are left out
    parts = [(k, v, per_token) for k, v, per_token in (
        ("eval_accuracy", r.accuracy, False), ("eval_rouge_l", r.rouge_l, False),
        ("eval_forward_kl", r.forward_kl, True), ("eval_reverse_kl", r.reverse_kl, True)) if v is not None]
    # verifiable instructions: counts summed over processes (every process takes part, with zeros if it
    # holds no constrained row, so the all-reduce below has one shape everywhere)
    scores = r.verifiable or {}
    ifeval = [float(scores.get("num_prompts", 0)), scores.get("prompt_strict", 0.0) * scores.get("num_prompts", 0),
              scores.get("prompt_loose", 0.0) * scores.get("num_prompts", 0), float(scores.get("num_instructions", 0)),
              scores.get("instruction_strict", 0.0) * scores.get("num_instructions", 0),
              scores.get("instruction_loose", 0.0) * scores.get("num_instructions", 0)]
    # several teachers: [tokens, Σ forward, Σ reverse] of each teacher's rows, in the router's order on every rank
    names = list(teacher.names) if isinstance(teacher, TeacherRouter) else []
    per_teacher = r.teachers or {}
    routed = [x for name in names for x in (
        (per_teacher[name]["tokens"], per_teacher[name]["forward_kl"] * per_teacher[name]["tokens"],
         per_teacher[name]["reverse_kl"] * per_teacher[name]["tokens"]) if name in per_teacher else (0.0, 0.0, 0.0))]
    total_n, total_tokens, *sums = distributed.all_reduce_sum(torch.tensor(
        [n, tokens, *ifeval, *routed, *(v * (tokens if per_token else n) for _, v, per_token in parts)],
        dtype=torch.float64)).tolist()
    (prompts, p_strict, p_loose, instructions, i_strict, i_loose), sums = sums[:6], sums[6:]
    routed, sums = sums[:len(routed)], sums[len(routed):]
    out = {k: total / (max(total_tokens, 1.0) if per_token else total_n)
           for (k, _, per_token), total in zip(parts, sums, strict=True)}
    if prompts > 0:
        out.update(eval_ifeval_prompt_strict=p_strict / prompts, eval_ifeval_prompt_loose=p_loose / prompts,
                   eval_ifeval_instruction_strict=i_strict / instructions,
                   eval_ifeval_instruction_loose=i_loose / instructions, eval_ifeval_prompts=prompts)
    for j, name in enumerate(names):
        teacher_tokens, fkl, rkl = routed[3 * j:3 * j + 3]
        if teacher_tokens > 0:
            out[f"eval_forward_kl/{name}"], out[f"eval_reverse_kl/{name}"] = fkl / teacher_tokens, rkl / teacher_tokens
    out.update(eval_len=total_tokens / total_n, time_eval=time.perf_counter() - start)
    return out
