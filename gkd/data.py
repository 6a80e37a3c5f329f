"""Data: prompts and reference completions, tokenised and batched for rollout.

Rows are plain dicts with ``prompt`` (text), ``completion`` (reference text, optional) and any other
columns (passed along for reward functions). Sources: the built-in task, or local JSONL in
``prompt``/``completion``, chat ``messages`` or Dolly ``instruction``/``context``/``response`` format.

A dataset file can be split into train and validation parts (:func:`split_rows`, seeded, decided on
the raw rows so that the validation set does not depend on the tokenizer) and length-filtered
(:func:`filter_by_length`, MiniLLM's data filter); ``gkd eval --split validation`` evaluates on the
part that training never saw.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gkd.errors import InputError
from gkd.rollout import Rollout

if TYPE_CHECKING:
    from gkd.config import GKDConfig

logger = logging.getLogger("gkd")

__all__ = [
    "PARTS",
    "BatchStream",
    "Example",
    "PromptDataset",
    "collate",
    "config_rows",
    "filter_by_length",
    "given_rows",
    "load_rows",
    "make_loader",
    "normalize_rows",
    "reference_rollout",
    "require_references",
    "split_rows",
]

#: Parts of a dataset :func:`load_rows` can return: the training part, the held-out validation part, or all rows.
PARTS = ("train", "validation", "all")

#: Held-out problems of the built-in task: never drawn into its training set (see :func:`gkd.task.split_problems`).
BUILTIN_VALIDATION_SIZE = 512


@dataclass
class Example:
    """One tokenised row."""

    prompt_ids: list[int]
    reference_ids: list[int] | None  # reference completion + EOS, truncated to max_new_tokens
    row: dict[str, Any]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} not found")
    rows = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    if not rows:
        raise InputError(f"dataset file {str(path)!r} is empty")
    return rows


def _present(row: dict[str, Any], key: str) -> bool:
    """A column with a value (``datasets`` fills a column a row lacks with None in mixed files)."""
    return row.get(key) is not None


def _messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    """A chat turn list ``[{role, content}, ...]``, checked."""
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise InputError(f"{where}: {column!r} must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                         "messages with text content")
    return value


def _chat_prompt(messages: list[dict[str, str]], tokenizer, where: str) -> str:
    """The prompt text of a conversation: the chat template with the generation prompt appended,
    applied once here (the text is then tokenised without adding special tokens again)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{where}: chat rows (a list of messages) need a tokenizer with a chat template; "
                         "this tokenizer has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _text(value: Any, where: str, column: str) -> str | None:
    """A text cell: strings pass, numbers (a CSV column that looks numeric) become text, None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise InputError(f"{where}: {column!r} must be text, got {type(value).__name__} ({str(value)[:40]!r})")


def _chat_row(row: dict[str, Any], tokenizer, where: str) -> dict[str, Any]:
    """``{messages}``: ending with an assistant turn → prompt + reference; ending with a user turn → prompt only."""
    messages = _messages(row["messages"], where, "messages")
    if messages[-1]["role"] == "assistant":
        if len(messages) == 1:
            raise InputError(f"{where}: 'messages' holds only an assistant turn; a prompt needs a user turn")
        return {**row, "prompt": _chat_prompt(messages[:-1], tokenizer, where),
                "completion": messages[-1]["content"], "_chat": True}
    return {**row, "prompt": _chat_prompt(messages, tokenizer, where), "completion": None, "_chat": True}


def _prompt_row(row: dict[str, Any], tokenizer, where: str) -> dict[str, Any]:
    """TRL's four formats: ``prompt`` text or messages, ``completion`` text, messages or absent."""
    prompt, completion = row["prompt"], row.get("completion")
    chat = isinstance(prompt, list)
    if chat:
        prompt = _chat_prompt(_messages(prompt, where, "prompt"), tokenizer, where)
    elif not isinstance(prompt, str):
        raise InputError(f"{where}: 'prompt' must be text or a list of chat messages, got {type(prompt).__name__}")
    if isinstance(completion, list):
        turns = _messages(completion, where, "completion")
        completion = "".join(m["content"] for m in turns if m["role"] == "assistant")
    return {**row, "prompt": prompt, "completion": _text(completion, where, "completion"), "_chat": chat}


def _text_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """``{text}`` (language-modelling data, e.g. lm_dataset): the whole text is the completion."""
    return {**row, "prompt": "", "completion": _text(row["text"], where, "text"), "_chat": False}


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)


def _dolly_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Dolly / MiniLLM format ``{instruction, context, response}`` with the Alpaca template (no
    response: prompt only)."""
    if not _present(row, "instruction"):
        raise InputError(f"{where}: missing column 'instruction' (found: {', '.join(sorted(row))})")
    instruction = _text(row["instruction"], where, "instruction")
    context = (_text(row.get("context") or row.get("input"), where, "context") or "").strip()
    template = ALPACA_PROMPT_WITH_INPUT if context else ALPACA_PROMPT
    prompt = template.format(instruction=instruction.strip(), context=context)  # type: ignore[union-attr]
    response = row.get("response") if _present(row, "response") else row.get("output")
    return {**row, "prompt": prompt, "completion": _text(response, where, "response"), "_chat": False}


_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _csv_as_text(path: Path) -> dict[str, Any]:
    """``load_dataset`` arguments that read every CSV column as text; only an empty cell is missing."""
    import csv

    import datasets

    with path.open(newline="") as fh:
        header = next(csv.reader(fh), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False, "na_values": [""]}


def _load_with_datasets(dataset: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """Rows of a local JSONL / JSON / Parquet / CSV file or a ``datasets.load_dataset`` source
    (a hub name works on machines with internet). JSONL errors are reported with file and line."""
    import datasets

    path = Path(dataset)
    suffix = path.suffix.lower()
    if suffix in _FILE_TYPES:
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {str(path)!r} not found")
        if suffix == ".jsonl":
            _read_jsonl(path)  # validates every line first, so a broken one is named with its line number
        try:
            # CSV cells stay text (a column of digits would otherwise become integers)
            kwargs = _csv_as_text(path) if suffix == ".csv" else {}
            ds = datasets.load_dataset(_FILE_TYPES[suffix], data_files=str(path), split="train", **kwargs)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; report one line
            raise InputError(f"cannot read dataset file {str(path)!r}: {str(e).splitlines()[0]}") from None
        rows = [dict(r) for r in ds]
        if not rows:
            raise InputError(f"dataset file {str(path)!r} is empty")
        return rows, str(path)
    if path.exists():
        raise InputError(f"dataset {dataset!r}: unsupported file type; use .jsonl, .json, .parquet or .csv")
    try:
        ds = datasets.load_dataset(dataset, split=split)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load dataset {dataset!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    return [dict(r) for r in ds], dataset


#: Row formats of a dataset (``dataset_format``); ``auto`` detects one per row.
FORMATS = ("auto", "prompt_completion", "messages", "dolly", "text")


_SIGNALS = {"messages": "messages", "instruction": "dolly", "prompt": "prompt_completion", "text": "text"}


def detect_format(row: dict[str, Any], where: str = "row") -> str | None:
    """The format of one row by the columns it has a value in (``None``: none recognised); a row with
    values in the columns of two formats cannot be told apart and is refused."""
    found = [column for column in _SIGNALS if _present(row, column)]
    if len(found) > 1:
        raise InputError(f"{where}: the row has both {found[0]!r} and {found[1]!r}, so its format cannot be told; keep "
                         "one of them, or set dataset_format")
    return _SIGNALS[found[0]] if found else None


def normalize_rows(rows: list[dict[str, Any]], tokenizer, *, dataset_format: str = "auto",
                   source: str = "dataset") -> list[dict[str, Any]]:
    """Bring rows of any supported format to ``{prompt, completion, _chat, ...}`` (extra columns kept;
    ``completion`` None for prompt-only rows; ``_chat``: the prompt is chat-templated text).

    Formats (``auto`` detects each row's own): TRL's standard and conversational prompt-only /
    prompt-completion rows (``prompt`` text or messages, ``completion`` text, messages or absent);
    ``messages`` (ending with the assistant's reference, or with a user turn: prompt only); Dolly
    ``{instruction, context, response}`` (Alpaca template); ``{text}`` (all completion, for lm_dataset)."""
    if dataset_format not in FORMATS:
        raise InputError(f"dataset_format={dataset_format!r} is not valid; choose one of: {', '.join(FORMATS)}")
    column = {fmt: col for col, fmt in _SIGNALS.items()}
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{source}:{i}"
        fmt = detect_format(row, where) if dataset_format == "auto" else dataset_format
        if fmt is None or not _present(row, column[fmt]):
            want = column[fmt] if fmt else "prompt"
            hint = "" if fmt else "; a row needs prompt, messages, instruction (Dolly) or text"
            raise InputError(f"{where}: missing column {want!r} (found: {', '.join(sorted(row))}){hint}")
        if fmt == "dolly":
            new = _dolly_row(row, where)
        elif fmt == "messages":
            new = _chat_row(row, tokenizer, where)
        elif fmt == "text":
            new = _text_row(row, where)
        else:
            new = _prompt_row(row, tokenizer, where)
        new["_where"] = where  # underscore keys are not passed to reward functions
        out.append(new)
    return out


def require_references(rows: list[dict[str, Any]], why: str, fix: str) -> None:
    """Raise (naming the first one) if a row has no reference completion although ``why`` needs one."""
    for i, row in enumerate(rows, 1):
        if row.get("completion") is None:
            where = row.get("_where", f"row {i}")
            raise InputError(f"{where}: no reference completion, but {why}; give every row one, or {fix}")


def split_rows(rows: list[dict[str, Any]], validation_size: float, seed: int = 0
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train / validation split: ``validation_size`` is a share in (0, 1) or a row count
    (>= 1); the rows are drawn by a ``random.Random(seed)`` shuffle of the row indices. Both parts
    keep the file order. ``validation_size=0`` puts every row in train."""
    if validation_size < 0 or (validation_size >= 1 and not float(validation_size).is_integer()):
        raise InputError(f"validation_size={validation_size!r} must be a share in [0, 1) or a whole number of rows")
    if validation_size == 0:
        return list(rows), []
    n = len(rows)
    k = int(validation_size) if validation_size >= 1 else max(1, round(validation_size * n))
    if k >= n:
        raise InputError(f"validation_size={validation_size!r} leaves no training rows ({n} rows in the dataset)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def filter_by_length(rows: list[dict[str, Any]], tokenizer, *, max_prompt_length: int = 0,
                     max_response_length: int = 0, source: str = "dataset") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop rows whose prompt has more than ``max_prompt_length`` tokens or whose reference response
    has more than ``max_response_length`` tokens (0 disables a limit). Returns the kept rows and the
    counts ``{"too_long_prompt": .., "too_long_response": ..}``, which are also logged."""
    if max_prompt_length < 0 or max_response_length < 0:
        raise InputError("length limits must be >= 0 (0 disables a limit)")
    kept, dropped = [], {"too_long_prompt": 0, "too_long_response": 0}
    for row in rows:
        if max_prompt_length and len(tokenizer(row["prompt"], add_special_tokens=not row.get("_chat")).input_ids) \
                > max_prompt_length:
            dropped["too_long_prompt"] += 1
            continue
        ref = row.get("completion")
        if max_response_length and ref is not None and \
                len(tokenizer(ref, add_special_tokens=False).input_ids) > max_response_length:
            dropped["too_long_response"] += 1
            continue
        kept.append(row)
    if any(dropped.values()):
        logger.warning("length filter on %s: dropped %d of %d rows (%d prompts over %d tokens, %d responses over %d tokens)",
                       source, len(rows) - len(kept), len(rows), dropped["too_long_prompt"], max_prompt_length,
                       dropped["too_long_response"], max_response_length)
    return kept, dropped


def load_rows(dataset: str, tokenizer, *, dataset_format: str = "auto", num_examples: int = 20000,
              max_digits: int = 4, seed: int = 0, split: str = "train", part: str = "train",
              validation_size: float = 0.0, split_seed: int = 0, max_response_length: int = 0) -> list[dict[str, Any]]:
    """Rows ``{prompt, completion, ...}`` from ``builtin:addition``, a local file (through
    ``datasets``) or a ``datasets`` hub name, in ``prompt_completion``, chat ``messages`` or Dolly
    ``instruction/context/response`` format.

    ``part`` picks the ``train`` or ``validation`` part of :func:`split_rows` (``validation_size``,
    ``split_seed``) or ``all`` rows; then rows whose response is over ``max_response_length`` tokens
    are dropped (:func:`filter_by_length`). For ``builtin:addition`` the validation part is the task's
    512 held-out problems (disjoint from the ``num_examples`` training problems of the same ``seed``).
    ``split`` is the split name of a ``datasets`` hub source.
    """
    if part not in PARTS:
        raise InputError(f"part={part!r} is not valid; choose one of: {', '.join(PARTS)}")
    if dataset == "builtin:addition":
        from gkd.task import split_problems

        train, held = split_problems(num_examples, BUILTIN_VALIDATION_SIZE, max_digits=max_digits, seed=seed)
        problems = {"train": train, "validation": held, "all": train + held}[part]
        return [{"prompt": p.prompt, "completion": p.completion} for p in problems]
    if dataset.startswith("builtin:"):
        raise InputError(f"unknown built-in dataset {dataset!r}; valid: builtin:addition")
    rows, source = _load_with_datasets(dataset, split)
    rows = normalize_rows(rows, tokenizer, dataset_format=dataset_format, source=source)
    if part != "all":
        train, validation = split_rows(rows, validation_size, split_seed)
        if part == "validation" and not validation:
            raise InputError(f"{source} has no validation part: set validation_size (gkd eval: --validation-size), "
                             "a share like 0.1 or a row count")
        rows = train if part == "train" else validation
    if max_response_length:
        rows, _ = filter_by_length(rows, tokenizer, max_response_length=max_response_length, source=f"{source} ({part})")
        if not rows:
            raise InputError(f"the length filter dropped every row of {source}; raise max_response_length")
    return rows


class PromptDataset(torch.utils.data.Dataset):
    """Tokenises rows lazily: prompt truncated from the left, reference + EOS cut at ``max_new_tokens``."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer, *, max_prompt_length: int, max_new_tokens: int,
                 long_prompts: str = "truncate"):
        if tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        if long_prompts not in ("truncate", "skip"):
            raise InputError(f"long_prompts={long_prompts!r} is not valid; choose truncate or skip")
        self.tokenizer = tokenizer
        self.max_prompt_length, self.max_new_tokens = max_prompt_length, max_new_tokens
        too_long = [i for i, row in enumerate(rows) if self._prompt_length(row) > max_prompt_length]
        if too_long:
            action = "skipped" if long_prompts == "skip" else "truncated from the left"
            logger.warning("%d of %d prompts are longer than max_prompt_length=%d tokens and were %s",
                           len(too_long), len(rows), max_prompt_length, action)
        if long_prompts == "skip":
            drop = set(too_long)
            rows = [row for i, row in enumerate(rows) if i not in drop]
        self.num_long_prompts = len(too_long)
        self.rows = rows

    def _prompt_ids(self, row: dict[str, Any]) -> list[int]:
        """The prompt's tokens: chat-templated text as is (the template placed its special tokens);
        plain text with the tokenizer's own special tokens, but never two BOS when the text already
        starts with one; an empty prompt (``{text}`` rows) is the BOS (or EOS) token alone, so the
        first completion token has a position that predicts it."""
        tok = self.tokenizer
        ids = tok(row["prompt"], add_special_tokens=not row.get("_chat")).input_ids
        bos = tok.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids or [bos if bos is not None else tok.eos_token_id]

    def _prompt_length(self, row: dict[str, Any]) -> int:
        return len(self._prompt_ids(row))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        row = self.rows[i]
        prompt_ids = self._prompt_ids(row)[-self.max_prompt_length :]
        ref = row.get("completion")
        reference_ids = None
        if ref is not None:
            reference_ids = self.tokenizer(ref, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
            reference_ids = reference_ids[: self.max_new_tokens]
        return Example(prompt_ids=prompt_ids, reference_ids=reference_ids, row=row)


def collate(examples: list[Example], pad_token_id: int) -> dict[str, Any]:
    """Left-pad prompts, right-pad references; masks record real tokens (never derived from pad ids)."""
    batch = len(examples)
    p_len = max(len(e.prompt_ids) for e in examples)
    prompt_ids = torch.full((batch, p_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((batch, p_len), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.prompt_ids)
        prompt_ids[i, p_len - n :] = torch.tensor(e.prompt_ids)
        prompt_mask[i, p_len - n :] = True
    out: dict[str, Any] = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "rows": [e.row for e in examples]}
    if all(e.reference_ids is not None for e in examples):
        r_len = max(len(e.reference_ids) for e in examples)  # type: ignore[arg-type]
        ref_ids = torch.full((batch, r_len), pad_token_id, dtype=torch.long)
        ref_mask = torch.zeros((batch, r_len), dtype=torch.bool)
        for i, e in enumerate(examples):
            n = len(e.reference_ids)  # type: ignore[arg-type]
            ref_ids[i, :n] = torch.tensor(e.reference_ids)
            ref_mask[i, :n] = True
        out["reference_ids"], out["reference_mask"] = ref_ids, ref_mask
    return out


def reference_rollout(batch: dict[str, Any]) -> Rollout:
    """An off-policy rollout made of the dataset's reference completions."""
    if "reference_ids" not in batch:
        raise InputError("off-policy steps need reference completions: every row needs a 'completion' (or set lmbda=1 / seq_kd)")
    return Rollout(
        prompt_ids=batch["prompt_ids"],
        prompt_mask=batch["prompt_mask"],
        completion_ids=batch["reference_ids"],
        completion_mask=batch["reference_mask"],
        on_policy=False,
        is_reference=True,
        rows=batch.get("rows"),
    )


def config_rows(cfg: GKDConfig, dataset: str | None, tokenizer, part: str = "train") -> list[dict[str, Any]]:
    """:func:`load_rows` with a run's settings; the train/validation split and the length filter
    apply to the training dataset (``cfg.dataset``) only, not to ``lm_dataset``."""
    split = dict(validation_size=cfg.validation_size, split_seed=cfg.split_seed,
                 max_response_length=cfg.max_response_length) if dataset == cfg.dataset else {}
    return load_rows(dataset or "", tokenizer, dataset_format=cfg.dataset_format, num_examples=cfg.num_train_examples,
                     max_digits=cfg.max_digits, seed=cfg.seed, split=cfg.dataset_split, part=part, **split)


def given_rows(rows: Any, tokenizer, dataset_format: str = "auto") -> list[dict[str, Any]]:
    """Rows passed to the Python API: a list of dicts, a ``datasets.Dataset`` or any iterable of rows."""
    return normalize_rows([dict(r) for r in rows], tokenizer, dataset_format=dataset_format, source="train_rows")


def make_loader(rows: list[dict[str, Any]], tokenizer, cfg: GKDConfig, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled, full batches of ``per_device_batch_size`` rows; the order depends only on ``seed`` and the epoch."""
    dataset = PromptDataset(rows, tokenizer, max_prompt_length=cfg.max_prompt_length,
                            max_new_tokens=cfg.max_new_tokens, long_prompts=cfg.long_prompts)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.per_device_batch_size, shuffle=True, drop_last=True,
        collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
    )


class BatchStream:
    """Endless batches of a (prepared) loader. The order of each epoch depends only on (seed, epoch),
    so a resumed run continues exactly at :attr:`position` ``[epoch, batches handed out in it]``,
    skipping, not loading, the consumed batches (``skip_first_batches``: the accelerator's)."""

    def __init__(self, loader: Any, skip_first_batches: Callable[[Any, int], Any]) -> None:
        self.loader, self._skip = loader, skip_first_batches
        self.position = [0, 0]
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self.loader.set_epoch(self.position[0])
                skip = self.position[1]
                self._it = iter(self._skip(self.loader, skip) if skip else self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it, self.position = None, [self.position[0] + 1, 0]
                continue
            self.position[1] += 1
            return batch

    def load_position(self, position: list[int]) -> None:
        """Continue at ``position`` (from a checkpoint); only before the first batch is drawn."""
        assert self._it is None, "a stream's position is restored before it starts"
        self.position = list(position)
