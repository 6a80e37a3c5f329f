"""The built-in task: column addition with written carries, tokenizer and tiny models built in code.

Nothing here downloads anything. A problem adds two numbers of 1..``max_digits`` digits, written
least-significant digit first so that column ``i`` of each operand sits at a fixed offset. The completion writes, for each column ``i``, the sum digit ``s_i`` followed by the carry ``c_i``
(``s_i, c_i = divmod-ish(a_i + b_i + c_{i-1})``), one pair per column of the longer operand::

    274 + 59 = 333  →  prompt "472+95="  completion "3" "1" "3" "1" "3" "0" <eos>  ("313130")

Each pair depends on the carry the model itself wrote one token earlier, so a student's early
mistake compounds (docs/results.md: a student's early mistakes must matter); the number of pairs depends on the operand lengths, so
stopping at EOS matters. :func:`check_answer` is the exact-match checker that doubles as the
built-in reward function (``gkd.task:exact_match_reward``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SYMBOLS = list("0123456789+=")
VOCAB = [PAD, BOS, EOS, *SYMBOLS]


@dataclass(frozen=True)
class Problem:
    """One addition problem: ``prompt`` and reference ``completion`` as text, and the operands."""

    a: int
    b: int
    digits: int = 4

    @property
    def prompt(self) -> str:
        return f"{BOS}{_rev(self.a, self.digits)}+{_rev(self.b, self.digits)}="

    @property
    def completion(self) -> str:
        return written_sum(self.a, self.b, self.digits)


def _rev(n: int, digits: int) -> str:
    return str(n).zfill(digits)[::-1]


def written_sum(a: int, b: int, digits: int) -> str:
    """The reference completion (without EOS): ``s_0 c_0 s_1 c_1 ...`` over ``digits`` columns."""
    da, db = _rev(a, digits), _rev(b, digits)
    out, carry = [], 0
    for i in range(digits):
        total = int(da[i]) + int(db[i]) + carry
        carry = total // 10
        out.append(f"{total % 10}{carry}")
    return "".join(out)


def parse_written_sum(text: str) -> int | None:
    """Read the number a completion states (sum digits plus final carry); ``None`` if malformed."""
    text = text.split(EOS)[0].replace(PAD, "").strip()
    if not text or len(text) % 2 or not text.isdigit():
        return None
    digits = text[0::2]
    carries = text[1::2]
    if any(c not in "01" for c in carries):
        return None
    return int(carries[-1] + digits[::-1])


def check_answer(prompt: str, completion: str) -> bool:
    """Exact match: the completion is the full written sum of the prompt's operands (carries included)."""
    body = prompt.replace(BOS, "").rstrip("=")
    try:
        a_rev, b_rev = body.split("+")
        expected = written_sum(int(a_rev[::-1]), int(b_rev[::-1]), len(a_rev))
    except ValueError:
        return False
    return completion.split(EOS)[0].replace(PAD, "") == expected


def exact_match_reward(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """Built-in reward in TRL's reward-function signature: 1.0 for an exact written sum, else 0.0."""
    return [float(check_answer(p, c)) for p, c in zip(prompts, completions, strict=True)]


def digit_match_reward(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """Built-in partial-credit reward: the share of the written sum's characters (digits and carries)
    that the completion has at the right place, in [0, 1]; 1.0 exactly when :func:`exact_match_reward` is."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        body = prompt.replace(BOS, "").rstrip("=")
        try:
            a_rev, b_rev = body.split("+")
            expected = written_sum(int(a_rev[::-1]), int(b_rev[::-1]), len(a_rev))
        except ValueError:
            out.append(0.0)
            continue
        got = completion.split(EOS)[0].replace(PAD, "")
        hits = sum(g == e for g, e in zip(got, expected, strict=False))
        out.append(hits / max(len(expected), len(got)))
    return out


def max_problems(max_digits: int) -> int:
    """How many distinct problems :func:`make_problems` can draw with ``max_digits``."""
    return 10 ** (2 * max_digits) // 2


def make_problems(n: int, max_digits: int = 4, seed: int = 0, exclude: set[tuple[int, int]] | None = None) -> list[Problem]:
    """``n`` distinct problems; each operand has 1..``max_digits`` digits (length uniform), zero-padded."""
    if n > max_problems(max_digits):
        from gkd.errors import InputError  # a ValueError; the command line prints it as one line

        raise InputError(f"cannot draw {n} distinct addition problems with max_digits={max_digits} (at most "
                         f"{max_problems(max_digits)}); lower num_train_examples or raise max_digits")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set(exclude or ())
    out: list[Problem] = []
    while len(out) < n:
        la, lb = rng.randint(1, max_digits), rng.randint(1, max_digits)
        a = rng.randint(10 ** (la - 1) if la > 1 else 0, 10**la - 1)
        b = rng.randint(10 ** (lb - 1) if lb > 1 else 0, 10**lb - 1)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append(Problem(a, b, max_digits))
    return out


def split_problems(n_train: int, n_eval: int, max_digits: int = 4, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train / held-out problem sets."""
    limit = max_problems(max_digits)
    if n_train + n_eval > limit:
        from gkd.errors import InputError

        raise InputError(f"builtin:addition needs {n_train} training + {n_eval} held-out = {n_train + n_eval} distinct "
                         f"problems, but max_digits={max_digits} allows at most {limit}; lower num_train_examples or "
                         "raise max_digits")
    held_out = make_problems(n_eval, max_digits, seed=seed + 10_000)
    train = make_problems(n_train, max_digits, seed=seed, exclude={(p.a, p.b) for p in held_out})
    return train, held_out


def build_tokenizer():
    """A character-level tokenizer for the task, built with the ``tokenizers`` library.

    Returned as a ``PreTrainedTokenizerFast`` so it saves/loads through ``AutoTokenizer`` exactly
    like a hub tokenizer. Left padding, as generation needs.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<bos>|<eos>|<pad>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=PAD,
        padding_side="left",
        model_max_length=64,
    )


#: Model shapes of the embedded default: a Llama-shaped teacher, a smaller Qwen2-shaped student.
TEACHER_SHAPE = dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
STUDENT_SHAPE = dict(model_type="qwen2", hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


def build_model_config(shape: dict, tokenizer) -> object:
    """A ``transformers`` config for a tiny causal LM of the given shape over the task vocabulary."""
    from transformers import AutoConfig

    shape = dict(shape)
    model_type = shape.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **shape,
    )


def save_random_model(path: str | Path, shape: dict, seed: int = 0) -> Path:
    """Build a randomly initialised model of ``shape`` with the task tokenizer and save both to ``path``
    (then it loads through ``from_pretrained`` like any hub model)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    # a private RNG stream: materialising a built-in model must not change the caller's random state
    # (a first run with a cold cache would otherwise differ from every later run)
    from gkd.distributed import without_zero3_init

    with torch.random.fork_rng(devices=[]), without_zero3_init():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(build_model_config(shape, tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cache_dir() -> Path:
    """``$GKD_CACHE`` or ``$XDG_CACHE_HOME/gkd`` or ``~/.cache/gkd``."""
    import os

    if os.environ.get("GKD_CACHE"):
        return Path(os.environ["GKD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gkd"


#: Models a recipe can name without any download: randomly initialised, fixed seed, saved once to the
#: cache folder and then loaded through ``from_pretrained`` like any other model folder.
BUILTIN_MODELS = {"builtin:tiny-teacher": (TEACHER_SHAPE, 0), "builtin:tiny-student": (STUDENT_SHAPE, 1)}


def resolve_model_path(name: str) -> str:
    """``builtin:tiny-teacher`` / ``builtin:tiny-student`` → a local folder (created on first use);
    any other name (hub id or folder) is returned unchanged."""
    if not name.startswith("builtin:"):
        return name
    if name not in BUILTIN_MODELS:
        from gkd.errors import InputError

        raise InputError(f"unknown built-in model {name!r}; valid: {', '.join(BUILTIN_MODELS)}")
    import hashlib
    import json
    import os
    import shutil

    shape, seed = BUILTIN_MODELS[name]
    key = hashlib.sha256(json.dumps([shape, seed, VOCAB]).encode()).hexdigest()[:12]
    path = cache_dir() / "builtin" / f"{name.split(':', 1)[1]}-{key}"
    if not (path / "config.json").exists():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        save_random_model(tmp, shape, seed)
        if not path.exists():
            try:
                tmp.rename(path)  # atomic; a concurrent process may have won the race
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
