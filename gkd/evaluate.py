"""Held-out evaluation (``gkd eval``): task reward / exact match, Rouge-L, and teacher–student KL on the
student's own completions, with greedy or seeded sampled decoding.

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
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gkd.data import PARTS, PromptDataset, collate, load_rows
from gkd.errors import InputError
from gkd.losses import forward_kl, log_probs, masked_sum_and_count, reverse_kl
from gkd.rewards import RewardFn, RewardFunctions
from gkd.rollout import SamplingParams, sample
from gkd.scorer import check_tokenizers_match, completion_logits

logger = logging.getLogger(__name__)

__all__ = ["BENCHMARKS", "DECODINGS", "EvalResult", "load_benchmark", "looping_summary", "rescore_generations", "eval_shard", "evaluate", "evaluate_in_training", "model_completions", "sequence_stats", "teacher_forced_kl", "exact_match", "format_table", "read_run_config", "rouge_l", "run_eval",
           "write_report"]

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
    tokens, fkl_sum, rkl_sum = 0.0, 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(rows)))],
                        tokenizer.pad_token_id)
        rollout = sample(
            model, batch["prompt_ids"].to(device), batch["prompt_mask"].to(device), params,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab,
            generator=generator, all_ranks_done=all_ranks_done,
        )
        ids = [rollout.completion_ids[i][rollout.completion_mask[i]].tolist() for i in range(len(batch["rows"]))]
        completion_ids.extend(ids)
        completions.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))
        tokens += float(rollout.completion_mask.sum())
        if teacher is not None:
            s = log_probs(completion_logits(model, rollout, vocab))
            t = log_probs(completion_logits(teacher, rollout, vocab))
            fkl_sum += float(masked_sum_and_count(forward_kl(s, t), rollout.completion_mask)[0])
            rkl_sum += float(masked_sum_and_count(reverse_kl(s, t), rollout.completion_mask)[0])
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
        forward_kl=fkl_sum / tokens if has_kl else None,
        reverse_kl=rkl_sum / tokens if has_kl else None,
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
def teacher_forced_kl(model: torch.nn.Module, teacher: torch.nn.Module, tokenizer, rows: Sequence[Mapping[str, Any]], *,
                      max_new_tokens: int, max_prompt_length: int, batch_size: int) -> tuple[float, float]:
    """Token means of ``KL(teacher‖model)`` and ``KL(model‖teacher)`` on given completions (the rows'
    ``completion``, here the teacher's own answers), teacher-forced: unlike the KLs on the model's own
    samples, a model cannot lower these by repeating itself."""
    from gkd.data import reference_rollout

    device = next(model.parameters()).device
    dataset = PromptDataset([dict(r) for r in rows], tokenizer, max_prompt_length=max_prompt_length,
                            max_new_tokens=max_new_tokens)
    fkl = rkl = tokens = 0.0
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(rows)))], tokenizer.pad_token_id)
        rollout = reference_rollout(batch).to(device)
        s = log_probs(completion_logits(model, rollout, len(tokenizer)))
        t = log_probs(completion_logits(teacher, rollout, len(tokenizer)))
        fkl += float(masked_sum_and_count(forward_kl(s, t), rollout.completion_mask)[0])
        rkl += float(masked_sum_and_count(reverse_kl(s, t), rollout.completion_mask)[0])
        tokens += float(rollout.completion_mask.sum())
    return fkl / max(tokens, 1.0), rkl / max(tokens, 1.0)


# --- gkd eval -------------------------------------------------------------------------------------

#: Data and sampling fields ``gkd eval`` takes from a training run's ``config.yaml`` (flags override them).
CONFIG_KEYS = ("dataset", "dataset_format", "dataset_split", "validation_size", "split_seed", "max_response_length",
               "num_train_examples", "max_digits", "max_new_tokens", "max_prompt_length", "seed", "temperature",
               "top_p", "top_k", "reward_funcs", "teacher")


def _load_model_and_tokenizer(name: str, role: str, dtype: str = "float32"):
    """Load a model (folder, .gguf file, packaged or built-in name, hub id) for evaluation; a missing or
    broken one is a one-line error."""
    from gkd.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(name, role=role)
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype)
    model.eval()
    return model, tokenizer


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The data / sampling fields of a training run's ``config.yaml`` (or any recipe)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read config {str(path)!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise InputError(f"config {str(path)!r} must be a mapping of key: value")
    return {k: values[k] for k in CONFIG_KEYS if k in values}


#: ``gkd eval --benchmark`` names.
BENCHMARKS = ("ifeval",)
#: Default completion length of ``--benchmark ifeval``: IFEval asks for essays, lists and letters of hundreds
#: of words (lm-evaluation-harness allows 1280 tokens); 512 lets most answers of a small chat model end.
BENCHMARK_MAX_NEW_TOKENS = 512


def load_benchmark(name: str, data: str, tokenizer, *, chat_template: bool = True) -> list[dict[str, Any]]:
    """Rows of a verifiable-instruction benchmark in IFEval's published format (``key``, ``prompt``,
    ``instruction_id_list``, ``kwargs``): a ``.jsonl`` / ``.json`` / ``.parquet`` file or a ``datasets``
    name (``google/IFEval`` online). Each prompt becomes one user turn under the tokenizer's chat
    template (the raw text where the tokenizer has none, or ``chat_template=False``). Every row is checked
    (:func:`gkd.verifiable.check_rows`) before anything is generated."""
    from gkd import verifiable
    from gkd.data import _load_with_datasets, normalize_rows

    if name not in BENCHMARKS:
        raise InputError(f"benchmark {name!r} is not known; choose one of: {', '.join(BENCHMARKS)}")
    verifiable.registry()  # a missing extra fails here, before any model runs
    raw, source = _load_with_datasets(data, "train")
    use_chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for i, row in enumerate(raw, 1):
        where = f"{source} row key={row['key']!r}" if row.get("key") is not None else f"{source}:{i}"
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: 'prompt' must be non-empty text (IFEval format: key, prompt, "
                             "instruction_id_list, kwargs)")
        if not row.get("instruction_id_list"):
            raise InputError(f"{where}: no 'instruction_id_list'; a {name} row needs at least one instruction id")
        extra = {k: row[k] for k in ("key", "instruction_id_list", "kwargs") if k in row}
        if use_chat:
            rows.append({"messages": [{"role": "user", "content": prompt}], "ifeval_prompt": prompt, **extra})
        else:
            rows.append({"prompt": prompt, "ifeval_prompt": prompt, **extra})
    rows = normalize_rows(rows, tokenizer, source=source)
    verifiable.check_rows(rows, source)
    return rows


def _generations_writer(path: str | Path | None, model: str) -> Callable[[list[dict[str, Any]]], None] | None:
    """Appends each decoding's completions to ``path`` (JSONL), tagged with ``model`` and decoding."""
    if path is None:
        return None
    path = Path(path)

    def write(records: list[dict[str, Any]], *, role: str, decoding: str) -> None:
        with path.open("a") as fh:
            for r in records:
                fh.write(json.dumps({"model": role, "name": model, "decoding": decoding, **r}, ensure_ascii=False) + "\n")
    return write  # type: ignore[return-value]


def run_eval(
    model: str,
    *,
    teacher: str | None = None,
    dataset: str = "builtin:addition",
    dataset_format: str = "auto",
    dataset_split: str = "train",
    split: str = "validation",
    validation_size: float = 0.0,
    split_seed: int = 0,
    max_response_length: int = 0,
    num_train_examples: int = 20000,
    max_digits: int = 4,
    data_seed: int = 42,
    max_prompts: int | None = None,
    max_new_tokens: int | None = None,
    max_prompt_length: int = 512,
    decodings: Sequence[str] = ("greedy",),
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    reward_funcs: Sequence[str] = (),
    num_shown: int = 3,
    teacher_metrics: bool = True,
    benchmark: str | None = None,
    benchmark_data: str | None = None,
    generations: str | Path | None = None,
) -> dict[str, Any]:
    """``gkd eval``: load the model (and teacher), load the evaluation rows, evaluate under each
    decoding mode; returns a JSON-ready dict (``results``: one entry per model × decoding).

    ``split``/``validation_size``/``split_seed``/``max_response_length`` select rows exactly as
    training did (:func:`gkd.data.load_rows`); for ``builtin:addition`` the validation split is
    the task's held-out problems for training seed ``data_seed``, scored with
    :func:`gkd.task.check_answer` and the built-in reward ``gkd.task:exact_match_reward``.
    With ``teacher_metrics`` the teacher is evaluated the same way (no KL against itself).
    ``benchmark="ifeval"`` evaluates the rows of ``benchmark_data`` instead (:func:`load_benchmark`,
    default length :data:`BENCHMARK_MAX_NEW_TOKENS`). Rows with verifiable instructions are scored on any
    dataset. ``generations``: a JSONL file that receives every completion as soon as it is decoded.
    """
    for d in decodings:
        if d not in DECODINGS:
            raise InputError(f"decoding {d!r} is not valid; choose from: {', '.join(DECODINGS)}")
    if split not in PARTS:
        raise InputError(f"split {split!r} is not valid; choose one of: {', '.join(PARTS)}")
    if benchmark is not None:
        if benchmark not in BENCHMARKS:
            raise InputError(f"benchmark {benchmark!r} is not known; choose one of: {', '.join(BENCHMARKS)}")
        if not benchmark_data:
            raise InputError(f"--benchmark {benchmark} needs --benchmark-data: a file in IFEval's format "
                             "(key, prompt, instruction_id_list, kwargs) or a datasets name such as google/IFEval")
        from gkd import verifiable

        verifiable.registry()  # a missing extra is refused before any model is loaded
    t0 = time.perf_counter()
    student, tokenizer = _load_model_and_tokenizer(model, "model")
    teacher_model = None
    if teacher:
        teacher_model, teacher_tokenizer = _load_model_and_tokenizer(teacher, "teacher")
        check_tokenizers_match(tokenizer, teacher_tokenizer)
    if benchmark is not None:
        dataset, split = str(benchmark_data), "all"
        rows = load_benchmark(benchmark, str(benchmark_data), tokenizer)
        max_new_tokens = max_new_tokens or BENCHMARK_MAX_NEW_TOKENS
    else:
        rows = load_rows(dataset, tokenizer, dataset_format=dataset_format, num_examples=num_train_examples,
                         max_digits=max_digits, seed=data_seed, split=dataset_split, part=split,
                         validation_size=validation_size, split_seed=split_seed,
                         max_response_length=max_response_length)
    builtin = dataset == "builtin:addition"
    if max_prompts is not None:
        if max_prompts < 1:
            raise InputError(f"max_prompts={max_prompts} must be >= 1")
        rows = rows[:max_prompts]
    from gkd import verifiable as ver

    num_constrained = ver.check_rows(rows, dataset) if benchmark is None and _verifiable_available(rows) else \
        sum(ver.constrained(r) for r in rows)
    if generations is not None:
        Path(generations).parent.mkdir(parents=True, exist_ok=True)
        Path(generations).write_text("")  # this run's completions only
    writer = _generations_writer(generations, model)
    teacher_writer = _generations_writer(generations, str(teacher))
    new_tokens = max_new_tokens or (2 * max_digits + 1 if builtin else 64)
    checker = None
    funcs = list(reward_funcs)
    if builtin:
        from gkd.task import check_answer

        checker = check_answer
        if "gkd.task:exact_match_reward" not in funcs:
            funcs.insert(0, "gkd.task:exact_match_reward")
    rewards = RewardFunctions.from_specs(funcs) if funcs else None
    reference = "dataset"
    teacher_answers: list[str] = []
    teacher_greedy: EvalResult | None = None
    prompt_only = all(r.get("completion") is None for r in rows)
    if teacher_model is not None:  # what the teacher itself answers: a reference the student cannot move
        keep = teacher_writer is not None and teacher_metrics and "greedy" in decodings and prompt_only
        teacher_greedy = evaluate(
            teacher_model, tokenizer, rows, reward_funcs=rewards, max_new_tokens=new_tokens,
            max_prompt_length=max_prompt_length, batch_size=batch_size, num_samples=num_shown, rouge=False,
            verifiable=benchmark is not None or None,
            save_generations=(lambda recs: teacher_writer(recs, role="teacher", decoding="greedy"))  # type: ignore[misc]
            if keep else None)
        teacher_answers = teacher_greedy.completions
    if any(r.get("completion") is None for r in rows):  # prompt-only rows (on-policy data)
        if teacher_model is None:
            reference = "none"
        else:  # Rouge-L / exact match against the teacher's answers
            missing = sum(r.get("completion") is None for r in rows)
            for row, answer in zip(rows, teacher_answers, strict=True):
                if row.get("completion") is None:
                    row["completion"] = answer
            reference = "teacher greedy" if missing == len(rows) else "dataset, else teacher greedy"
    common = dict(checker=checker, reward_funcs=rewards, samples_per_prompt=samples_per_prompt,
                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=new_tokens,
                  max_prompt_length=max_prompt_length, batch_size=batch_size, num_samples=num_shown,
                  verifiable=benchmark is not None or None)
    forced: dict[str, float] = {}
    if teacher_model is not None:
        answered = [{**row, "completion": answer} for row, answer in zip(rows, teacher_answers, strict=True)]
        fkl, rkl = teacher_forced_kl(student, teacher_model, tokenizer, answered, max_new_tokens=common["max_new_tokens"],
                                     max_prompt_length=max_prompt_length, batch_size=batch_size)
        forced = {"teacher_forced_forward_kl": fkl, "teacher_forced_reverse_kl": rkl}
    results = []
    for decoding in decodings:
        save = (lambda recs, d=decoding: writer(recs, role="student", decoding=d)) if writer else None  # type: ignore[call-arg]
        r = evaluate(student, tokenizer, rows, teacher=teacher_model, decoding=decoding, save_generations=save, **common)
        results.append({"model": "student", **r.to_dict(), **forced})
        if teacher_model is not None and teacher_metrics:
            if decoding == "greedy" and reference == "teacher greedy" and teacher_greedy is not None:
                r = teacher_greedy  # the reference itself: Rouge-L / exact match against itself mean nothing
                r.accuracy, r.rouge_l = None, None
            else:
                save = (lambda recs, d=decoding: teacher_writer(recs, role="teacher", decoding=d)) \
                    if teacher_writer else None  # type: ignore[call-arg]
                r = evaluate(teacher_model, tokenizer, rows, decoding=decoding, save_generations=save, **common)
            results.append({"model": "teacher", **r.to_dict()})
    report = {
        "model": model, "teacher": teacher, "dataset": dataset, "split": split, "num_prompts": len(rows),
        "reference": reference,
        "benchmark": benchmark, "num_constrained": num_constrained,
        "generations": str(generations) if generations is not None else None,
        "settings": {"max_new_tokens": common["max_new_tokens"], "max_prompt_length": max_prompt_length,
                     "samples_per_prompt": samples_per_prompt, "temperature": temperature, "top_p": top_p,
                     "top_k": top_k, "seed": seed, "validation_size": validation_size, "split_seed": split_seed,
                     "max_response_length": max_response_length, "reward_funcs": funcs,
                     **({"data_seed": data_seed, "max_digits": max_digits} if builtin else {})},
        "results": results,
        "wall_time_s": time.perf_counter() - t0,
    }
    report["looping"] = looping_summary(report)
    return report


def rescore_generations(generations: str | Path, benchmark: str, benchmark_data: str, tokenizer=None) -> dict[str, Any]:
    """Score a generations file written by ``gkd eval`` (``--generations``) again, without any model:
    IFEval's checkers on every (model, decoding) group's completions against ``benchmark_data``'s rows,
    matched by row index (and ``key`` where present), plus the no-EOS share and mean length. For a run
    whose scoring failed, or to score with NLTK's data once it is installed."""
    from gkd import verifiable as ver
    from gkd.data import _load_with_datasets, _read_jsonl

    if benchmark not in BENCHMARKS:
        raise InputError(f"benchmark {benchmark!r} is not known; choose one of: {', '.join(BENCHMARKS)}")
    ver.registry()
    records = _read_jsonl(Path(generations))
    raw, source = _load_with_datasets(benchmark_data, "train")
    ver.check_rows(raw, source)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i, g in enumerate(records, 1):
        if not {"model", "decoding", "index", "completion"} <= set(g) or not 0 <= int(g["index"]) < len(raw):
            raise InputError(f"{generations}:{i}: not a gkd eval generations record for {source} "
                             "(needs model, decoding, index within the benchmark, completion)")
        row = raw[int(g["index"])]
        if "key" in g and row.get("key") is not None and g["key"] != row["key"]:
            raise InputError(f"{generations}:{i}: key {g['key']!r} but row {g['index']} of {source} has key "
                             f"{row['key']!r}: the generations were made on other data")
        groups.setdefault((g["model"], g["decoding"]), []).append(g)
    results = []
    for (model, decoding), recs in groups.items():
        rows = [raw[int(g["index"])] for g in recs]
        scores = ver.score_rows(rows, [g["completion"] for g in recs]).summary()
        results.append({"model": model, "decoding": decoding, "num_completions": len(recs),
                        "no_eos": sum(not g.get("eos", True) for g in recs) / len(recs),
                        "completion_len_mean": sum(g.get("tokens", 0) for g in recs) / len(recs),
                        "verifiable": scores})
    return {"generations": str(generations), "dataset": source, "benchmark": benchmark, "results": results}


def _verifiable_available(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Constrained rows are checked up front only where if-verifiable is installed (else they are skipped)."""
    from gkd import verifiable as ver

    if not any(ver.constrained(r) for r in rows):
        return False
    try:
        ver.registry()
    except InputError:
        return False
    return True


def format_table(report: dict[str, Any]) -> str:
    """A markdown table of :func:`run_eval`'s results, then a few generations per entry."""
    def fmt(x: float | None, pct: bool = False) -> str:
        if x is None:
            return "-"
        return f"{100 * x:.1f}" if pct else f"{x:.4f}"

    lines = [
        "| model | decoding | exact match % | Rouge-L | reward | KL(t‖m) own | KL(m‖t) own | KL(t‖m) teacher's | "
        "KL(m‖t) teacher's | distinct-2 | repeat-4 % | no EOS % | mean length |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['decoding']} | {fmt(r['accuracy'], True)} | {fmt(r['rouge_l'], True)} | "
                     f"{fmt(r['rewards'].get('reward'))} | {fmt(r['forward_kl'])} | {fmt(r['reverse_kl'])} | "
                     f"{fmt(r.get('teacher_forced_forward_kl'))} | {fmt(r.get('teacher_forced_reverse_kl'))} | "
                     f"{fmt(r.get('distinct_2'))} | {fmt(r.get('repeat_4'), True)} | {fmt(r.get('no_eos'), True)} | "
                     f"{r['completion_len_mean']:.1f} |")
    lines.append("")
    lines.append("KL … own: on the model's own completions (repetition flatters these); KL … teacher's: teacher-forced "
                 "on the teacher's greedy answers (the model's output cannot move them).")
    reference = report.get("reference", "dataset")
    lines.append(f"{report['num_prompts']} prompts from {report['dataset']} ({report['split']}); "
                 "KLs are token means on the model's own completions; Rouge-L ×100"
                 + (f" against the {reference} answers." if reference != "none" else "; no references, so no Rouge-L."))
    lines.extend(_verifiable_lines(report))
    lines.extend(_looping_lines(report))
    for r in report["results"]:
        for s in r["samples"]:
            ref = f"  (reference {s['reference'][:80]!r})" if "reference" in s else ""
            lines.append(f"  {r['model']}/{r['decoding']}: {s['prompt'][-60:]!r} -> {s['completion'][:80]!r}{ref}")
    if report.get("generations"):
        lines.append(f"every completion: {report['generations']}")
    return "\n".join(lines)


def _verifiable_lines(report: dict[str, Any]) -> list[str]:
    """The IFEval table (prompt / instruction level, strict / loose) and the per-instruction-id table."""
    scored = [r for r in report["results"] if r.get("verifiable")]
    if not scored:
        return []
    first = scored[0]["verifiable"]
    lines = ["", f"Verifiable instructions (IFEval checkers, if-verifiable): {first['num_prompts']} prompts, "
                 f"{first['num_instructions']} instructions; sentences/words split by {first['sentence_splitter']}.",
             "| model | decoding | prompt strict % | prompt loose % | instruction strict % | instruction loose % |",
             "|---|---|---|---|---|---|"]
    for r in scored:
        v = r["verifiable"]
        lines.append(f"| {r['model']} | {r['decoding']} | {100 * v['prompt_strict']:.1f} | {100 * v['prompt_loose']:.1f} | "
                     f"{100 * v['instruction_strict']:.1f} | {100 * v['instruction_loose']:.1f} |")
    ids = sorted({k for r in scored for k in r["verifiable"]["per_instruction"]})
    heads = [f"{r['model']}/{r['decoding']}" for r in scored]
    lines += ["", "Per instruction id (strict % / loose %):", "| instruction id | n | " + " | ".join(heads) + " |",
              "|---|---|" + "---|" * len(heads)]
    for k in ids:
        cells = []
        for r in scored:
            e = r["verifiable"]["per_instruction"].get(k)
            cells.append(f"{100 * e['strict']:.0f} / {100 * e['loose']:.0f}" if e else "-")
        n = next(r["verifiable"]["per_instruction"][k]["n"] for r in scored if k in r["verifiable"]["per_instruction"])
        lines.append(f"| {k} | {n} | " + " | ".join(cells) + " |")
    errors = sum(r["verifiable"].get("checker_errors", 0) for r in scored)
    if errors:
        lines.append(f"({errors} completion(s) made a checker raise; counted as not followed)")
    return lines


def looping_summary(report: dict[str, Any]) -> dict[str, float | None] | None:
    """The student's greedy repeated-4-gram and no-EOS shares beside the teacher's, with ratios
    (student / teacher); None without both greedy entries."""
    greedy = {r["model"]: r for r in report["results"] if r["decoding"] == "greedy"}
    if "student" not in greedy or "teacher" not in greedy:
        return None
    s, t = greedy["student"], greedy["teacher"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b
    return {"student_repeat_4": s.get("repeat_4"), "teacher_repeat_4": t.get("repeat_4"),
            "repeat_4_ratio": ratio(s.get("repeat_4"), t.get("repeat_4")),
            "student_no_eos": s.get("no_eos"), "teacher_no_eos": t.get("no_eos"),
            "no_eos_ratio": ratio(s.get("no_eos"), t.get("no_eos"))}


def _looping_lines(report: dict[str, Any]) -> list[str]:
    loop = looping_summary(report)
    if loop is None:
        return []

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def times(x: float | None) -> str:
        return "(teacher 0)" if x is None else f"{x:.2f}×"
    return ["", f"Greedy looping: repeated 4-grams student {pct(loop['student_repeat_4'])} vs teacher "
                f"{pct(loop['teacher_repeat_4'])} ({times(loop['repeat_4_ratio'])}); no EOS within "
                f"{report['settings']['max_new_tokens']} tokens student {pct(loop['student_no_eos'])} vs teacher "
                f"{pct(loop['teacher_no_eos'])} ({times(loop['no_eos_ratio'])})"]


def write_report(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


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
    (tokens per completion)."""
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
    total_n, total_tokens, *sums = distributed.all_reduce_sum(torch.tensor(
        [n, tokens, *ifeval, *(v * (tokens if per_token else n) for _, v, per_token in parts)],
        dtype=torch.float64)).tolist()
    (prompts, p_strict, p_loose, instructions, i_strict, i_loose), sums = sums[:6], sums[6:]
    out = {k: total / (max(total_tokens, 1.0) if per_token else total_n)
           for (k, _, per_token), total in zip(parts, sums, strict=True)}
    if prompts > 0:
        out.update(eval_ifeval_prompt_strict=p_strict / prompts, eval_ifeval_prompt_loose=p_loose / prompts,
                   eval_ifeval_instruction_strict=i_strict / instructions,
                   eval_ifeval_instruction_loose=i_loose / instructions, eval_ifeval_prompts=prompts)
    out.update(eval_len=total_tokens / total_n, time_eval=time.perf_counter() - start)
    return out
