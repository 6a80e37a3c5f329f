"""Verifiable instruction following (IFEval, Zhou et al. 2023): a row that carries
``instruction_id_list`` and ``kwargs`` (IFEval's published format) is scored by the checker registry of
the ``if-verifiable`` package (IFEval's own checkers, maintained outside this project; install with
``pip install 'gkd[eval]'``). Nothing here re-implements a checker.

Scores, as IFEval reports them:

* **prompt-level** accuracy: share of rows whose instructions all pass;
* **instruction-level** accuracy: share of all instructions that pass;
* **strict**: the completion as written; **loose**: the instruction passes on any of IFEval's eight
  variants of the completion (first / last line removed, ``*`` removed);
* per instruction id (``detectable_format:title`` …): strict and loose pass rates and counts.

Two checkers (sentence counting; word splitting for the capital-word count) ask NLTK for its ``punkt``
data, which NLTK downloads on first use. Where that data is absent (an offline machine) both fall back
to dependency-free splitters: IFEval's own regex ``split_into_sentences`` for sentences and a regex
word splitter; the report says which splitter scored (``sentence_splitter``). ``langdetect`` (the
lowercase / capital checkers ask it whether the text is English) is seeded, so scores are repeatable.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gkd.errors import InputError

__all__ = ["VerifiableCounts", "check_rows", "constrained", "instruction_text", "registry", "score_rows",
           "sentence_splitter"]

logger = logging.getLogger(__name__)

#: Columns of a verifiable row (IFEval's format); training ignores them.
COLUMNS = ("instruction_id_list", "kwargs")

_INSTALL = "pip install 'gkd[eval]' (or: pip install if-verifiable)"
_SPLITTER = {"name": "nltk punkt"}


def constrained(row: Mapping[str, Any]) -> bool:
    """Whether ``row`` carries verifiable instructions (a non-empty ``instruction_id_list``)."""
    ids = row.get("instruction_id_list")
    return isinstance(ids, list | tuple) and len(ids) > 0


def instruction_text(row: Mapping[str, Any]) -> str:
    """The instruction as the user wrote it (what ``combination:repeat_prompt`` compares against):
    IFEval's ``prompt`` column before any chat template (kept as ``ifeval_prompt``), else the last user
    turn of ``messages``, else the row's prompt text."""
    if isinstance(row.get("ifeval_prompt"), str):
        return row["ifeval_prompt"]
    messages = row.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    return str(row.get("prompt") or "")


class _WordTokenizeShim:
    """``nltk`` for if-verifiable's checkers, with ``word_tokenize`` replaced by a regex splitter
    (words, numbers and contractions as one token; each punctuation mark a token of its own)."""

    _WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")

    def __init__(self, nltk_module: Any) -> None:
        self._nltk = nltk_module

    def word_tokenize(self, text: str, *args: Any, **kwargs: Any) -> list[str]:
        return self._WORD.findall(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nltk, name)


def _install_fallbacks(util: Any) -> None:
    """Use dependency-free splitters when NLTK's punkt data is missing (see the module docstring)."""
    import nltk

    try:
        util.count_sentences("One sentence. Two sentences.")
        nltk.word_tokenize("A test.")
        _SPLITTER["name"] = "nltk punkt"
        return
    except LookupError:
        pass
    util.count_sentences = lambda text: len(util.split_into_sentences(text))
    util.nltk = _WordTokenizeShim(nltk)
    _SPLITTER["name"] = ("regex fallback (NLTK punkt data not found; IFEval's split_into_sentences and a regex word "
                         "splitter; `python -m nltk.downloader punkt_tab punkt` for NLTK's)")
    logger.warning("verifiable instructions: NLTK's punkt data is not installed; sentence and word counts use "
                   "dependency-free splitters (python -m nltk.downloader punkt_tab punkt for NLTK's)")


@functools.cache
def registry() -> dict[str, Any]:
    """IFEval's checker registry (instruction id → checker class) from ``if-verifiable``; a missing
    package is a one-line :class:`InputError`."""
    try:
        from if_verifiable.ifeval import instructions_util
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as e:
        raise InputError(f"verifiable-instruction scoring needs the if-verifiable package ({e}): {_INSTALL}") from None
    try:
        from langdetect import DetectorFactory

        DetectorFactory.seed = 0  # langdetect is random unless seeded
    except ImportError:
        pass
    _install_fallbacks(instructions_util)
    return dict(INSTRUCTION_DICT)


def sentence_splitter() -> str:
    """Which splitter counts sentences and words (``nltk punkt`` or the regex fallback)."""
    registry()
    return _SPLITTER["name"]


def _where(row: Mapping[str, Any], index: int, source: str) -> str:
    if row.get("key") is not None:
        return f"{source} row key={row['key']!r}"
    return str(row.get("_where") or f"{source} row {index}")


def _kwargs_list(row: Mapping[str, Any], n: int, where: str) -> list[dict[str, Any]]:
    kwargs = row.get("kwargs")
    if kwargs is None:
        return [{} for _ in range(n)]
    if not isinstance(kwargs, list | tuple) or not all(k is None or isinstance(k, Mapping) for k in kwargs):
        raise InputError(f"{where}: 'kwargs' must be a list of objects, one per instruction id")
    if len(kwargs) != n:
        raise InputError(f"{where}: 'kwargs' has {len(kwargs)} entries for {n} instruction ids; give one object per id")
    # datasets fills keys a row lacks with None (IFEval's own files do too): None means absent
    return [{k: v for k, v in (k_ or {}).items() if v is not None} for k_ in kwargs]


def check_rows(rows: Sequence[Mapping[str, Any]], source: str = "dataset") -> int:
    """Check every row that carries ``instruction_id_list`` before anything is generated: ids known
    to the registry, one ``kwargs`` object per id holding exactly the checker's arguments, values the
    checker accepts (each checker is built once). Returns the number of constrained rows; a bad row
    is a one-line :class:`InputError` naming it."""
    checkers = None
    count = 0
    for i, row in enumerate(rows, 1):
        ids = row.get("instruction_id_list")
        if ids is None or (isinstance(ids, list | tuple) and not ids):
            continue
        where = _where(row, i, source)
        if not isinstance(ids, list | tuple) or not all(isinstance(x, str) for x in ids):
            raise InputError(f"{where}: 'instruction_id_list' must be a list of instruction ids (strings)")
        checkers = checkers or registry()
        for instruction_id, kwargs in zip(ids, _kwargs_list(row, len(ids), where), strict=True):
            cls = checkers.get(instruction_id)
            if cls is None:
                raise InputError(f"{where}: unknown instruction id {instruction_id!r}; valid ids: "
                                 f"{', '.join(sorted(checkers))}")
            checker = cls(instruction_id)
            wanted = set(checker.get_instruction_args_keys())
            extra, missing = sorted(set(kwargs) - wanted), sorted(wanted - set(kwargs))
            if extra or missing:
                what = (f"unexpected {extra}" if extra else "") + ("; " if extra and missing else "") + \
                       (f"missing {missing}" if missing else "")
                raise InputError(f"{where}: kwargs of {instruction_id!r}: {what} (it takes {sorted(wanted) or 'none'})")
            try:
                checker.build_description(**kwargs)
            except (ValueError, TypeError, KeyError) as e:
                raise InputError(f"{where}: kwargs of {instruction_id!r} are not valid: {e}") from None
        count += 1
    return count


@dataclass
class VerifiableCounts:
    """Sums over scored rows (so processes can add them up) and per instruction id."""

    prompts: int = 0
    prompt_strict: int = 0
    prompt_loose: int = 0
    instructions: int = 0
    instruction_strict: int = 0
    instruction_loose: int = 0
    checker_errors: int = 0  # a checker raised on a completion: counted as not followed
    per_id: dict[str, list[int]] = field(default_factory=dict)  # id → [n, strict, loose]

    def add(self, strict: Sequence[bool], loose: Sequence[bool], ids: Sequence[str]) -> None:
        self.prompts += 1
        self.prompt_strict += int(all(strict))
        self.prompt_loose += int(all(loose))
        self.instructions += len(ids)
        self.instruction_strict += sum(strict)
        self.instruction_loose += sum(loose)
        for instruction_id, s, lo in zip(ids, strict, loose, strict=True):
            entry = self.per_id.setdefault(instruction_id, [0, 0, 0])
            entry[0] += 1
            entry[1] += int(s)
            entry[2] += int(lo)

    def as_vector(self) -> list[float]:
        """The six totals, in a fixed order (for an all-reduce)."""
        return [float(x) for x in (self.prompts, self.prompt_strict, self.prompt_loose, self.instructions,
                                   self.instruction_strict, self.instruction_loose)]

    def summary(self) -> dict[str, Any]:
        """Accuracies in [0, 1] and the per-id table."""
        p, n = max(self.prompts, 1), max(self.instructions, 1)
        return {
            "prompt_strict": self.prompt_strict / p, "prompt_loose": self.prompt_loose / p,
            "instruction_strict": self.instruction_strict / n, "instruction_loose": self.instruction_loose / n,
            "num_prompts": self.prompts, "num_instructions": self.instructions,
            "checker_errors": self.checker_errors, "sentence_splitter": sentence_splitter(),
            "per_instruction": {k: {"n": v[0], "strict": v[1] / v[0], "loose": v[2] / v[0]}
                                for k, v in sorted(self.per_id.items())},
        }


def score_rows(rows: Sequence[Mapping[str, Any]], completions: Sequence[str]) -> VerifiableCounts:
    """Score each constrained row's completion with IFEval's checkers (strict and loose, through
    ``if_verifiable.common.evaluate_instructions``); rows without constraints are skipped. An empty
    completion follows no instruction."""
    from if_verifiable.common import evaluate_instructions

    checkers = registry()
    counts = VerifiableCounts()
    for i, (row, completion) in enumerate(zip(rows, completions, strict=True), 1):
        if not constrained(row):
            continue
        ids = list(row["instruction_id_list"])
        kwargs = _kwargs_list(row, len(ids), _where(row, i, "rows"))
        strict, loose = [False] * len(ids), [False] * len(ids)
        try:
            results, _ = evaluate_instructions(response=completion, instruction_id_list=ids, kwargs_list=kwargs,
                                               prompt=instruction_text(row), instruction_registry=checkers)
        except Exception:  # noqa: BLE001 - a checker crashing on odd text must not lose the evaluation
            counts.checker_errors += 1
            results = []
        if len(results) == len(ids):  # fewer only for an empty completion (all fail)
            strict = [r.strict_pass for r in results]
            loose = [r.loose_pass for r in results]
        counts.add(strict, loose, ids)
    return counts
