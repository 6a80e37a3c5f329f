"""Cached teacher scores for off-policy data (``gkd cache-teacher RECIPE``, then ``teacher_cache:``).

The teacher's view of a dataset's reference completions does not change while the student trains,
yet every off-policy step (λ < 1, supervised KD) recomputes it. ``gkd cache-teacher`` scores every
reference completion once and writes, per completion position, the teacher's top-k log-probs at the
loss temperature with the tail bucket (the ``teacher_topk`` view) and the reference token's log-prob
under the unprocessed teacher, into safetensors shards; training reads them instead of running the
teacher on those steps (on-policy steps still ask the live teacher).

A row is found by the hash of its token ids (prompt + reference, as training tokenizes them), so
batch composition and order do not matter. The manifest records what the scores depend on: the
teacher (a fingerprint of its files), the tokenizer (:func:`gkd.serving.protocol.tokenizer_hash`),
k, the temperature and the prompt / completion length limits; a cache that differs in any of them,
that lacks a training row, or that was never completed is refused with the reason. Each shard's size
and SHA-256 are in the manifest and checked when it is opened (a truncated or altered shard is one
line, exit 2). Shards are read lazily (``safe_open``), so memory does not grow with the dataset. One
writer at a time: ``gkd cache-teacher`` holds ``FOLDER.lock`` while it writes.

Several teachers (``teachers:``): each row is scored by its own teacher (the one its ``teacher_column``
names, else the default), the manifest's ``teachers`` holds one fingerprint per teacher name, and a row
is found by its token ids *and* its teacher's name (the same text routed to two teachers has two
entries). A run whose teachers differ from the cache's in any name or fingerprint is refused, naming
the teacher; a row now routed to another teacher (a changed column or ``default_teacher``) is a missing
row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gkd.errors import InputError
from gkd.losses import TeacherTopK
from gkd.serving.protocol import padded_topk, tokenizer_hash

__all__ = ["CACHE_VERSION", "TeacherCache", "file_sha256", "row_hash", "teacher_fingerprint", "teacher_settings_for",
           "write_cache"]

CACHE_VERSION = 1
MANIFEST = "manifest.json"


def row_hash(prompt_ids: list[int], completion_ids: list[int], teacher: str | None = None) -> bytes:
    """SHA-256 (32 bytes) of a row's token ids (and, in a cache of several teachers, the name of the
    row's teacher): the key a cached row is found by."""
    h = hashlib.sha256()
    h.update(len(prompt_ids).to_bytes(4, "little"))
    h.update(torch.tensor(prompt_ids + completion_ids, dtype=torch.int64).numpy().tobytes())
    if teacher is not None:
        h.update(b"\0teacher:" + teacher.encode())
    return h.digest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) → SHA-256, this process


def _hash_memo_file() -> Path:
    from gkd.task import cache_dir

    return cache_dir() / "file-sha256.json"


_RACY_NS = 3_000_000_000  # a file modified this close to its hashing may change again within one mtime tick


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a whole file, streamed (flat memory), remembered by resolved path, size and mtime in
    this process and in ``$GKD_CACHE/file-sha256.json``: a teacher's weights are read once, not at every
    start; a file rewritten since (new size or mtime) is hashed again. As git's index does, a hash taken
    within 3 s of the file's mtime is not remembered (a filesystem with coarse timestamps could show a
    later rewrite with the same mtime)."""
    import time

    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    memo_file = _hash_memo_file()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    entry = memo.get(key[0])
    if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [st.st_size, st.st_mtime_ns]:
        return str(entry[2])
    started = time.time_ns()
    digest = _sha256_now(real)
    if started - st.st_mtime_ns < _RACY_NS:
        return digest
    _FILE_HASHES[key] = digest
    memo[key[0]] = [st.st_size, st.st_mtime_ns, digest]
    try:  # best effort: an unwritable cache folder only costs a re-hash next time
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass
    return digest


def _sha256_now(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def teacher_fingerprint(name: str, path: str | None) -> str:
    """The teacher's identity: its ``config.json`` and weight files (name, size and the SHA-256 of the
    whole file, :func:`file_sha256`) when ``path`` is a local folder, else the name it was given (a hub
    id, a served teacher's URL)."""
    folder = Path(path) if path else None
    if folder is None or not folder.is_dir():
        return f"name:{name}"
    h = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.suffix not in (".json", ".safetensors", ".bin", ".gguf", ".pt") or not file.is_file():
            continue
        if file.suffix == ".json" and file.name != "config.json":
            continue
        h.update(f"{file.name}:{file.stat().st_size}:{file_sha256(file)}".encode())
    return "files:" + h.hexdigest()


#: Several teachers whose ``topk`` / ``temperature`` differ from the run's: name → (k, τ) of each.
TeacherSettings = Mapping[str, tuple[int, float]]


def _key(fingerprint: str | Mapping[str, str], tokenizer, k: int, temperature: float, max_prompt_length: int,
         max_new_tokens: int, teacher_settings: TeacherSettings | None = None) -> dict[str, Any]:
    """What a cache's scores depend on. ``fingerprint``: the teacher's, or one per teacher name (several);
    ``teacher_settings``: each teacher's own k and τ, when some teacher's differ from the run's."""
    who = {"teachers": dict(fingerprint)} if isinstance(fingerprint, Mapping) else {"teacher": fingerprint}
    own = {} if teacher_settings is None else {"teacher_settings": {
        name: {"top_k": int(kt), "temperature": float(tau)} for name, (kt, tau) in teacher_settings.items()}}
    return {"version": CACHE_VERSION, **who, "tokenizer": tokenizer_hash(tokenizer), "top_k": k,
            "temperature": float(temperature), "max_prompt_length": max_prompt_length,
            "max_new_tokens": max_new_tokens, **own}


def teacher_settings_for(cfg) -> dict[str, tuple[int, float]] | None:
    """Each teacher's (k, τ) when some ``teachers:`` entry's ``topk`` / ``temperature`` differs from
    ``teacher_topk`` / ``loss_temperature`` (they enter the cache's key per teacher), else None."""
    if cfg.teachers is None:
        return None
    from gkd.teacher_specs import teacher_specs

    settings = {name: (spec.topk, spec.temperature) for name, spec in teacher_specs(cfg).items()}
    if all(value == (cfg.teacher_topk, cfg.loss_temperature) for value in settings.values()):
        return None
    return settings


#: A teacher to cache with: the model, or (several teachers) a function that loads it when its rows come up.
TeacherSource = torch.nn.Module | Callable[[], torch.nn.Module]


@torch.no_grad()
def write_cache(folder: str | Path, teacher: TeacherSource | Mapping[str, TeacherSource], tokenizer,
                rows: list[dict[str, Any]], *, fingerprint: str | Mapping[str, str], top_k: int, temperature: float,
                max_prompt_length: int, max_new_tokens: int, row_teachers: Sequence[str] | None = None,
                teacher_settings: TeacherSettings | None = None, batch_size: int = 16, shard_rows: int = 4096,
                progress: bool = False) -> dict[str, Any]:
    """Score every row's reference completion with ``teacher`` and write the cache to ``folder``
    (atomically: a temporary folder renamed at the end, the manifest written last), holding
    ``FOLDER.lock``: a second writer is refused with one line. Returns the manifest. A ``top_k`` above
    the vocabulary keeps the whole distribution (as a live teacher does).

    Several teachers: ``teacher`` and ``fingerprint`` map each teacher name to its model (or a function
    that loads it, called once, when that teacher's rows come up, and dropped after them) and to its
    fingerprint; ``row_teachers`` names each row's teacher. Each row is scored by its own teacher only,
    at its own k and τ when ``teacher_settings`` gives them (name → (k, τ); ``top_k`` / ``temperature``
    are then the run's, recorded as such; each teacher's rows go to shards of their own)."""
    from filelock import FileLock, Timeout

    several = isinstance(fingerprint, Mapping)
    if several != (row_teachers is not None) or several != isinstance(teacher, Mapping):
        raise ValueError("several teachers need a mapping of teachers, one of fingerprints, and row_teachers")
    if row_teachers is not None and len(row_teachers) != len(rows):
        raise ValueError(f"row_teachers names {len(row_teachers)} rows, there are {len(rows)}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.with_name(folder.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise InputError(f"teacher_cache={str(folder)!r} is being written by another gkd cache-teacher (it holds "
                         f"{lock.lock_file}): wait for it to finish, or write to another folder") from None
    try:
        return _write_cache(folder, teacher, tokenizer, rows, fingerprint=fingerprint, top_k=top_k,
                            temperature=temperature, max_prompt_length=max_prompt_length,
                            max_new_tokens=max_new_tokens, row_teachers=row_teachers,
                            teacher_settings=teacher_settings, batch_size=batch_size, shard_rows=shard_rows,
                            progress=progress)
    finally:
        lock.release()


def _write_cache(folder: Path, teacher: TeacherSource | Mapping[str, TeacherSource], tokenizer,
                 rows: list[dict[str, Any]], *, fingerprint: str | Mapping[str, str], top_k: int, temperature: float,
                 max_prompt_length: int, max_new_tokens: int, row_teachers: Sequence[str] | None,
                 teacher_settings: TeacherSettings | None, batch_size: int, shard_rows: int,
                 progress: bool) -> dict[str, Any]:
    """:func:`write_cache` once the writer's lock is held."""
    from safetensors.torch import save_file

    from gkd.chunked import teacher_topk_and_targets
    from gkd.data import PromptDataset, collate, reference_rollout
    from gkd.scorer import completion_outputs, lm_head

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dataset = PromptDataset(rows, tokenizer, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens)
    # (teacher name or None, teacher, its rows): one group per teacher that has rows, in the mapping's order
    if isinstance(teacher, Mapping):
        assert row_teachers is not None
        groups = [(name, source, [i for i, n in enumerate(row_teachers) if n == name]) for name, source in teacher.items()]
        unknown = sorted(set(row_teachers) - set(teacher))
        if unknown:
            raise InputError(f"gkd cache-teacher: rows name teacher {unknown[0]!r}, which is not one of "
                             f"{', '.join(teacher)}")
    else:
        groups = [(None, teacher, list(range(len(dataset))))]
    if teacher_settings is not None and (row_teachers is None or set(teacher_settings) != {g[0] for g in groups}):
        raise ValueError("teacher_settings needs several teachers, one (k, τ) per teacher name")
    vocab = len(tokenizer)
    shards: list[dict[str, Any]] = []
    seen: set[bytes] = set()
    buffer: dict[str, list[torch.Tensor]] = {"indices": [], "logprobs": [], "log_tail": [], "token_logprobs": []}
    hashes: list[bytes] = []
    offsets = [0]

    def flush() -> None:
        if not hashes:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {key: torch.cat(values).contiguous() for key, values in buffer.items()}
        tensors["offsets"] = torch.tensor(offsets, dtype=torch.int64)
        tensors["hashes"] = torch.frombuffer(bytearray(b"".join(hashes)), dtype=torch.uint8).reshape(-1, 32).clone()
        save_file(tensors, str(tmp / name))
        shards.append({"file": name, "rows": len(hashes), "bytes": (tmp / name).stat().st_size,
                       "sha256": _sha256_now(tmp / name)})
        for values in buffer.values():
            values.clear()
        hashes.clear()
        offsets[:] = [0]

    for name, source, members in groups:
        if not members:
            continue
        k_t, tau_t = teacher_settings[name] if teacher_settings is not None else (top_k, temperature)  # type: ignore[index]
        model = source if isinstance(source, torch.nn.Module) else source()  # several: loaded when its rows come up
        device = next(model.parameters()).device
        head = lm_head(model)
        model.eval()
        iterator: Any = range(0, len(members), batch_size)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="teacher cache" + (f" ({name})" if name else ""), unit="batch")
        for start in iterator:
            examples = [dataset[i] for i in members[start:start + batch_size]]
            fresh = []
            for e in examples:
                if e.reference_ids is None:
                    raise InputError("gkd cache-teacher scores reference completions: every row needs a 'completion'")
                key = row_hash(e.prompt_ids, e.reference_ids, name)
                if key not in seen:  # a duplicated row is stored once
                    seen.add(key)
                    fresh.append((e, key))
            if not fresh:
                continue
            batch = collate([e for e, _ in fresh], tokenizer.pad_token_id)
            rollout = reference_rollout(batch).to(device)
            out = completion_outputs(model, rollout, vocab, final_hidden=True)
            hidden = out.final_hidden[rollout.completion_mask]  # type: ignore[index]
            targets = rollout.completion_ids[rollout.completion_mask]
            top, token = teacher_topk_and_targets(hidden, k_t, targets, head=head, vocab_size=vocab,
                                                  temperature=tau_t)
            buffer["indices"].append(top.indices.int().cpu())
            buffer["logprobs"].append(top.logprobs.float().cpu())
            buffer["log_tail"].append(top.log_tail.float().cpu())
            buffer["token_logprobs"].append(token.float().cpu())  # type: ignore[union-attr]
            for i, (_, key) in enumerate(fresh):
                hashes.append(key)
                offsets.append(offsets[-1] + int(rollout.completion_mask[i].sum()))
            if len(hashes) >= shard_rows:
                flush()
        del model, head
        if teacher_settings is not None:
            flush()  # a shard holds one k: one teacher's rows
    flush()
    manifest = {**_key(fingerprint, tokenizer, top_k, temperature, max_prompt_length, max_new_tokens, teacher_settings),
                "width": min(top_k, vocab), "rows": len(seen), "dataset": hashlib.sha256(b"".join(sorted(seen))).hexdigest(),
                "shards": shards}
    if teacher_settings is not None:
        manifest["teacher_widths"] = {name: min(int(k_t), vocab) for name, (k_t, _) in teacher_settings.items()}
    if row_teachers is not None:
        manifest["rows_per_teacher"] = {name: len(members) for name, _, members in groups}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return manifest


class TeacherCache:
    """A written cache, opened for reading: ``lookup(rollout)`` → the top-k view of its reference rows."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import SafetensorError

        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            hint = (" (an interrupted gkd cache-teacher left it incomplete: run it again)"
                    if self.folder.with_name(self.folder.name + ".tmp").exists() or self.folder.exists() else
                    ": run gkd cache-teacher RECIPE first")
            raise InputError(f"teacher_cache={str(folder)!r} has no {MANIFEST}{hint}")
        self._where: dict[bytes, tuple[int, int, int]] = {}
        try:
            self.manifest = json.loads(manifest.read_text())
            self._files = [self._open_shard(shard) for shard in self.manifest["shards"]]
            for s, fh in enumerate(self._files):
                hashes, offsets = fh.get_tensor("hashes"), fh.get_tensor("offsets")
                positions = fh.get_slice("indices").get_shape()[0]
                if (hashes.shape != (len(offsets) - 1, 32) or int(offsets[0]) != 0 or int(offsets[-1]) != positions
                        or bool((offsets[1:] < offsets[:-1]).any())):
                    raise ValueError(f"{self.manifest['shards'][s]['file']}: inconsistent row index")
                for i in range(hashes.shape[0]):
                    self._where[bytes(hashes[i].tolist())] = (s, int(offsets[i]), int(offsets[i + 1]))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise InputError(f"teacher_cache={str(folder)!r} is damaged or unreadable ({str(e).splitlines()[0]}): "
                             "run gkd cache-teacher again") from None
        self.hits = 0

    def _open_shard(self, shard: dict[str, Any]) -> Any:
        """``safe_open`` a shard after checking its size and SHA-256 against the manifest."""
        from safetensors import safe_open

        path = self.folder / shard["file"]
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise ValueError(f"{shard['file']} has {size} bytes, the manifest says {shard['bytes']} (truncated?)")
        if "sha256" in shard and file_sha256(path) != shard["sha256"]:
            raise ValueError(f"{shard['file']} does not match the SHA-256 in the manifest (altered since written)")
        return safe_open(str(path), framework="pt")

    @property
    def teachers(self) -> dict[str, str] | None:
        """Teacher name → fingerprint of a cache of several teachers; None for one teacher."""
        return self.manifest.get("teachers")

    def check(self, *, fingerprint: str | Mapping[str, str], tokenizer, top_k: int, temperature: float,
              max_prompt_length: int, max_new_tokens: int, teacher_settings: TeacherSettings | None = None) -> None:
        """Refuse a cache written for another teacher (or other teachers: one fingerprint per name, and
        each teacher's own k / τ), tokenizer, k, temperature or length limits."""
        want = _key(fingerprint, tokenizer, top_k, temperature, max_prompt_length, max_new_tokens, teacher_settings)
        stale = []
        cached_own, run_own = self.manifest.get("teacher_settings") or {}, want.get("teacher_settings") or {}
        both = [n for n in want.get("teachers") or {} if n in (self.teachers or {})] if cached_own or run_own else []
        for n in both:  # each teacher's k / τ as the cache has it and as the run asks for it
            have = cached_own.get(n, {"top_k": self.manifest.get("top_k"), "temperature": self.manifest.get("temperature")})
            now = run_own.get(n, {"top_k": top_k, "temperature": float(temperature)})
            if have != now:
                stale.append(f"teacher {n!r} topk / temperature: cache {have['top_k']} / {have['temperature']}, run "
                             f"{now['top_k']} / {now['temperature']}")
        if ("teachers" in want) != (self.teachers is not None):
            have = f"teachers {', '.join(self.teachers)}" if self.teachers is not None else "one teacher"
            run = f"teachers {', '.join(want['teachers'])}" if "teachers" in want else "one teacher"
            stale.append(f"cache of {have}, run of {run}")
        elif self.teachers is not None:
            cached, run = self.teachers, want["teachers"]
            stale += [f"teacher {n!r}: cache {cached[n]!r}, run {run[n]!r}" for n in run if n in cached and cached[n] != run[n]]
            stale += [f"teacher {n!r}: not in the cache" for n in run if n not in cached]
            stale += [f"teacher {n!r}: in the cache, not in the run" for n in cached if n not in run]
        stale += [f"{k}: cache {self.manifest.get(k)!r}, run {v!r}" for k, v in want.items()
                  if k not in ("teacher", "teachers", "teacher_settings") and self.manifest.get(k) != v]
        if "teacher" in want and self.teachers is None and self.manifest.get("teacher") != want["teacher"]:
            stale.insert(0, f"teacher: cache {self.manifest.get('teacher')!r}, run {want['teacher']!r}")
        if stale:
            raise InputError(f"teacher_cache={str(self.folder)!r} was written for another setup ({'; '.join(stale)}): "
                             "run gkd cache-teacher with this recipe again")

    def _key_names(self, n: int, row_teachers: Sequence[str] | None) -> list[str | None]:
        """Each row's teacher name as its key needs it (None for a cache of one teacher)."""
        if self.teachers is None:
            return [None] * n
        if row_teachers is None or len(row_teachers) != n:
            raise ValueError("a cache of several teachers finds a row by its teacher: pass each row's teacher name")
        return list(row_teachers)

    def check_rows(self, dataset, row_teachers: Sequence[str] | None = None) -> None:
        """Every row of ``dataset`` (a :class:`gkd.data.PromptDataset`) must be in the cache (several
        teachers: under its teacher, ``row_teachers``)."""
        names = self._key_names(len(dataset), row_teachers)
        missing = 0
        for i in range(len(dataset)):
            e = dataset[i]
            if e.reference_ids is not None and row_hash(e.prompt_ids, e.reference_ids, names[i]) not in self._where:
                missing += 1
        if missing:
            what = ("the dataset, its split or the rows' teachers (teacher column, default_teacher) changed"
                    if self.teachers is not None else "the dataset or its split changed")
            raise InputError(f"teacher_cache={str(self.folder)!r} lacks {missing} of the {len(dataset)} training rows "
                             f"({what} since it was written): run gkd cache-teacher again")

    def lookup(self, rollout, row_teachers: Sequence[str] | None = None) -> TeacherTopK:
        """The cached top-k view ``(B, L, k)`` of a reference rollout (several teachers: each row's
        from its teacher, ``row_teachers``); padded positions hold a uniform top-k. Teachers cached at their
        own k (``teacher_settings``): the rows of a narrower one are widened with empty buckets."""
        k = int(self.manifest.get("width", self.manifest["top_k"]))  # top_k, or the vocabulary when smaller
        pm, cm = rollout.prompt_mask.cpu(), rollout.completion_mask.cpu()
        b, length = cm.shape
        names = self._key_names(b, row_teachers)
        widths = [k] * b
        if "teacher_widths" in self.manifest:
            widths = [int(self.manifest["teacher_widths"][n]) for n in names]  # type: ignore[index]
            k = max(widths)
        indices, logprobs, tail = padded_topk(b, length, k)
        for i in range(b):
            p = rollout.prompt_ids[i].cpu()[pm[i]].tolist()
            c = rollout.completion_ids[i].cpu()[cm[i]].tolist()
            where = self._where.get(row_hash(p, c, names[i]))
            if where is None:
                raise InputError(f"teacher_cache={str(self.folder)!r} has no entry for a batch row (prompt of {len(p)} "
                                 "tokens): the data changed since gkd cache-teacher ran")
            s, lo, hi = where
            fh = self._files[s]
            w = widths[i]
            indices[i, : hi - lo, :w] = fh.get_slice("indices")[lo:hi].long()
            logprobs[i, : hi - lo, :w] = fh.get_slice("logprobs")[lo:hi]
            tail[i, : hi - lo] = fh.get_slice("log_tail")[lo:hi]
            if w < k:  # empty buckets: probability 0 for both models
                indices[i, : hi - lo, w:] = TeacherTopK.EMPTY
                logprobs[i, : hi - lo, w:] = TeacherTopK.LOG_ZERO
        self.hits += b
        device = rollout.completion_ids.device
        return TeacherTopK(indices.to(device), logprobs.to(device), tail.to(device))


def module_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters (a teacher passed to the Python API as a module)."""
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):  # values only: a wrapper's name prefix does not matter
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return "params:" + h.hexdigest()


def _model_fingerprint(model: str, gguf_file: str, teacher: Any = None) -> str:
    """A teacher's fingerprint: its files when ``model`` resolves to a local folder, else the parameters
    of the ``teacher`` module passed in, else the name (a hub id or a served teacher)."""
    from gkd.models import resolve_model
    from gkd.serving.client import is_remote_teacher

    if model and not is_remote_teacher(model):
        try:
            path = resolve_model(model, gguf_file, "teacher")
        except InputError:
            path = None
        if path and Path(path).is_dir():
            return teacher_fingerprint(model, path)
    if isinstance(teacher, torch.nn.Module):
        return module_fingerprint(teacher)
    return f"name:{model}"


def fingerprint_for(cfg, teacher: Any = None) -> str | dict[str, str]:
    """The run's teacher fingerprint (:func:`_model_fingerprint`); with several teachers (``teacher`` a
    :class:`gkd.teachers.TeacherRouter`) one per teacher name."""
    if getattr(teacher, "routes_rows", False):
        from gkd.teacher_specs import teacher_specs

        return {name: _model_fingerprint(spec.model, spec.gguf_file, teacher[name])
                for name, spec in teacher_specs(cfg).items()}
    return _model_fingerprint(cfg.teacher, cfg.teacher_gguf_file, teacher)


def open_cache(cfg, tokenizer, teacher: Any, dataset, structural: bool = False) -> TeacherCache:
    """Open ``cfg.teacher_cache`` for a run and refuse it unless it matches the run (teacher(s), tokenizer,
    k, temperature, length limits) and holds every training row (under its teacher)."""
    if structural:
        raise InputError("teacher_cache holds the teacher's top-k log-probs; hidden-state / attention objectives "
                         "need the live teacher")
    cache = TeacherCache(cfg.teacher_cache)
    cache.check(fingerprint=fingerprint_for(cfg, teacher), tokenizer=tokenizer, top_k=cfg.teacher_topk,
                temperature=cfg.loss_temperature, max_prompt_length=cfg.max_prompt_length,
                max_new_tokens=cfg.max_new_tokens, teacher_settings=teacher_settings_for(cfg))
    routed = getattr(teacher, "routes_rows", False)
    cache.check_rows(dataset, teacher.row_names(dataset.rows) if routed else None)
    return cache


def cache_teacher(cfg, progress: bool = False) -> dict[str, Any]:
    """``gkd cache-teacher``: score the recipe's training rows with its teacher into ``cfg.teacher_cache``
    (several teachers: each row with its own, each teacher loaded in turn)."""
    from gkd.data import config_rows
    from gkd.models import load_model, load_tokenizer, resolve_model
    from gkd.serving.client import is_remote_teacher

    if not cfg.teacher_cache:
        raise InputError("gkd cache-teacher writes to teacher_cache: set it in the recipe or as teacher_cache=FOLDER")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.teachers is not None:
        return _cache_teachers(cfg, device, progress)
    if not cfg.teacher or is_remote_teacher(cfg.teacher):
        raise InputError(f"gkd cache-teacher needs a local teacher (teacher={cfg.teacher!r})")
    path = resolve_model(cfg.teacher, cfg.teacher_gguf_file, "teacher")
    tokenizer = load_tokenizer(_tokenizer_path(cfg, path), cfg.trust_remote_code)
    rows = config_rows(cfg, cfg.dataset, tokenizer, "train")
    teacher = load_model(path, cfg.teacher_dtype, cfg.trust_remote_code)
    teacher.to(device)
    return write_cache(cfg.teacher_cache, teacher, tokenizer, rows, fingerprint=teacher_fingerprint(cfg.teacher, path),
                       top_k=cfg.teacher_topk, temperature=cfg.loss_temperature,
                       max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
                       batch_size=max(cfg.per_device_batch_size, 8), progress=progress)


def _tokenizer_path(cfg, teacher_path: str) -> str:
    """Where the student's tokenizer is: the student's, or the teacher's when the student is made from it
    (the student's tokenizer renders and tokenises the rows in training)."""
    from gkd.models import resolve_model

    origin = cfg.student_source_name
    if origin is None:
        return resolve_model(cfg.student, cfg.student_gguf_file, "student")
    if origin == "teacher":
        return teacher_path
    return resolve_model(cfg.student if origin == "student" else str(origin))


def _cache_teachers(cfg, device: str, progress: bool) -> dict[str, Any]:
    """:func:`cache_teacher` with several teachers: every teacher local, each row scored by its own teacher
    (the row's ``teacher_column``, else ``default_teacher``), the teachers loaded one at a time."""
    from gkd.data import config_rows
    from gkd.models import load_model, load_tokenizer, resolve_model
    from gkd.scorer import check_tokenizers_match
    from gkd.teacher_specs import default_teacher_name, teacher_specs
    from gkd.teachers import TeacherRouter

    specs = teacher_specs(cfg)
    served = [name for name, spec in specs.items() if spec.served]
    if served:
        raise InputError(f"gkd cache-teacher needs local teachers; teachers: {served[0]!r} ({specs[served[0]].model}) "
                         "is served")
    paths = {name: resolve_model(spec.model, spec.gguf_file, f"teacher {name!r}") for name, spec in specs.items()}
    default = default_teacher_name(cfg, list(specs))
    tokenizer = load_tokenizer(_tokenizer_path(cfg, paths[default]), cfg.trust_remote_code)
    for name, path in paths.items():
        try:
            check_tokenizers_match(tokenizer, load_tokenizer(path, cfg.trust_remote_code))
        except InputError as e:
            raise InputError(f"teachers: {name!r} ({specs[name].model}): {e}") from None
    rows = config_rows(cfg, cfg.dataset, tokenizer, "train")
    names = TeacherRouter(dict.fromkeys(specs), default, cfg.teacher_column).row_names(rows)

    def loader(name: str) -> Callable[[], torch.nn.Module]:
        spec = specs[name]
        return lambda: load_model(paths[name], spec.dtype, cfg.trust_remote_code, spec.quantization).to(device)

    return write_cache(cfg.teacher_cache, {name: loader(name) for name in specs}, tokenizer, rows,
                       fingerprint={name: teacher_fingerprint(spec.model, paths[name]) for name, spec in specs.items()},
                       top_k=cfg.teacher_topk, temperature=cfg.loss_temperature,
                       max_prompt_length=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
                       row_teachers=names, teacher_settings=teacher_settings_for(cfg),
                       batch_size=max(cfg.per_device_batch_size, 8), progress=progress)
