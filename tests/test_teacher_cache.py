"""``gkd cache-teacher`` + ``teacher_cache``: off-policy steps read the teacher's cached scores and give
the live teacher's losses without a teacher forward; a cache that does not match the run is refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model

from gkd.cli import main
from gkd.config import ConfigError, GKDConfig
from gkd.data import given_rows
from gkd.errors import InputError
from gkd.serving.cache import TeacherCache, module_fingerprint, write_cache

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5), (40, 51), (7, 8), (33, 9),
                                                                       (61, 20), (5, 5), (18, 27)]]
TINY = "recipes/tiny.yaml"
QUIET = ["progress_bar=false", "log_samples_steps=0"]


class CountingTeacher(torch.nn.Module):
    """Counts forward calls of the wrapped teacher."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0
        self.config = model.config

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def _run(tokenizer, tmp_path, name, teacher, **overrides):
    from gkd.trainer import GKDTrainer

    fields = dict(teacher="unused", student="unused", dataset="unused", per_device_batch_size=2, max_steps=4,
                  max_new_tokens=6, output_dir=str(tmp_path / name), progress_bar=False, save_final_model=False,
                  seed=3, teacher_topk=5, log_samples_steps=0, learning_rate=1e-3, divergence="jsd", beta=0.5)
    trainer = GKDTrainer(GKDConfig(**{**fields, **overrides}), teacher=teacher, tokenizer=tokenizer, train_rows=ROWS,
                         student=tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11))
    return trainer, trainer.train()


@pytest.mark.parametrize("lmbda", [0.0, 0.5])
def test_cached_off_policy_steps_equal_the_live_teacher(tokenizer, tmp_path, lmbda):
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    folder = tmp_path / "cache"
    manifest = write_cache(folder, teacher, tokenizer, given_rows(ROWS, tokenizer), fingerprint=module_fingerprint(teacher),
                           top_k=5, temperature=1.0, max_prompt_length=512, max_new_tokens=6, batch_size=3)
    assert manifest["rows"] == len(ROWS)
    _, live = _run(tokenizer, tmp_path, "live", copy.deepcopy(teacher), lmbda=lmbda)
    counting = CountingTeacher(copy.deepcopy(teacher))
    trainer, cached = _run(tokenizer, tmp_path, "cached", counting, lmbda=lmbda, teacher_cache=str(folder))
    assert [h["on_policy"] for h in live] == [h["on_policy"] for h in cached]
    for a, b in zip(live, cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5, abs=1e-6), a["step"]
    off = sum(1 - h["on_policy"] for h in cached)
    assert off > 0 and trainer.parts.teacher_cache.hits == 2 * off  # every off-policy row came from the cache
    # the teacher ran only for on-policy steps (sampling does not call it; scoring does, once per step)
    assert counting.calls == sum(h["on_policy"] for h in cached)


def test_cache_stores_the_reference_tokens_logprob(tokenizer, tmp_path):
    from safetensors import safe_open

    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    rows = given_rows(ROWS[:2], tokenizer)
    write_cache(tmp_path / "c", teacher, tokenizer, rows, fingerprint="x", top_k=3, temperature=2.0,
                max_prompt_length=512, max_new_tokens=6)
    fh = safe_open(str(tmp_path / "c" / "shard-00000.safetensors"), framework="pt")
    got, offsets = fh.get_tensor("token_logprobs"), fh.get_tensor("offsets")
    ref = tiny_model(tokenizer, hidden=64, seed=12).double()
    want = []
    for row in rows:
        p = tokenizer(row["prompt"]).input_ids
        c = tokenizer(row["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = ref(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1]
        want.extend(torch.log_softmax(logits, -1)[range(len(c)), c].tolist())  # temperature 1, not the cache's 2
    assert offsets.tolist() == [0, 3, 5]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_cli_writes_a_cache_and_refuses_a_stale_one(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    common = [f"teacher_cache={cache}", "max_new_tokens=6", "num_train_examples=64"]
    assert main(["cache-teacher", TINY, "teacher_topk=8", *common]) == 0
    assert "rows in 1 shard(s)" in capsys.readouterr().out
    assert main(["train", TINY, "teacher_topk=8", "lmbda=0", "max_steps=3", f"output_dir={out}", *common, *QUIET]) == 0
    cases = [
        (["teacher_topk=4", *common], "top_k: cache 8, run 4"),
        (["teacher_topk=8", f"teacher_cache={cache}", "max_new_tokens=6", "num_train_examples=96"], "lacks"),
        (["teacher_topk=8", f"teacher_cache={tmp_path / 'nowhere'}", "max_new_tokens=6"], "has no manifest.json"),
        (["teacher_topk=8", *common, "loss_temperature=2"], "temperature: cache 1.0, run 2.0"),
    ]
    for i, (fields, words) in enumerate(cases):
        capsys.readouterr()
        code = main(["train", TINY, "lmbda=0", "max_steps=1", f"output_dir={tmp_path / f'bad{i}'}", *fields, *QUIET])
        err = capsys.readouterr().err
        assert code == 2 and words in err and err.strip().count("\n") == 0, (fields, err)
    shard = cache / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # a truncated shard: one line, exit 2 (was a traceback, exit 1)
    code = main(["train", TINY, "teacher_topk=8", "lmbda=0", "max_steps=1", f"output_dir={tmp_path / 'torn'}", *common,
                 *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "is damaged or unreadable" in err and err.strip().count("\n") == 0, err


def test_an_interrupted_or_foreign_cache_is_refused(tokenizer, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard-00000.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="incomplete"):
        TeacherCache(tmp_path / "half")
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    write_cache(tmp_path / "c", teacher, tokenizer, given_rows(ROWS, tokenizer), fingerprint=module_fingerprint(teacher),
                top_k=5, temperature=1.0, max_prompt_length=512, max_new_tokens=6)
    other = tiny_model(tokenizer, hidden=64, seed=13)
    with pytest.raises(InputError, match="teacher: cache"):
        _run(tokenizer, tmp_path, "other", other, lmbda=0.0, teacher_cache=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="set teacher_topk"):
        GKDConfig(teacher="t", student="s", dataset="d", teacher_cache=str(tmp_path / "c"))


def _save_teacher(tokenizer, folder, seed: int = 12):
    teacher = tiny_model(tokenizer, hidden=256, layers=2, seed=seed)  # ~4.6 MB of safetensors: > 2 × 1 MiB
    teacher.save_pretrained(folder)
    return teacher


def _middle_tensor(weights) -> str:
    """A tensor whose bytes lie away from the first and the last MiB of a safetensors file."""
    size = weights.stat().st_size
    with weights.open("rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
        entries = json.loads(fh.read(header))
    return next(name for name, e in entries.items() if name != "__metadata__"
                and e["data_offsets"][0] + 8 + header > 1 << 20 and e["data_offsets"][1] + 8 + header < size - (1 << 20))


def test_fingerprint_covers_the_middle_of_the_weight_file(tokenizer, tmp_path):
    """A teacher changed only in the middle of its weight file gets another fingerprint, and its cache
    is refused (was: only the first and last MiB hashed, the stale cache used with exit 0)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gkd.serving.cache import teacher_fingerprint

    folder = tmp_path / "teacher"
    _save_teacher(tokenizer, folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    before = teacher_fingerprint("t", str(folder))
    with safe_open(str(weights), framework="pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
        metadata = fh.metadata()
    middle = _middle_tensor(weights)
    tensors[middle] = tensors[middle].clone()
    tensors[middle][0, 0] += 1.0
    save_file(tensors, str(weights), metadata=metadata)
    assert weights.stat().st_size == size
    after = teacher_fingerprint("t", str(folder))
    assert after != before
    write_cache(tmp_path / "c", tiny_model(tokenizer), tokenizer, given_rows(ROWS[:2], tokenizer), fingerprint=before,
                top_k=3, temperature=1.0, max_prompt_length=512, max_new_tokens=6)
    with pytest.raises(InputError, match="teacher: cache 'files:"):
        TeacherCache(tmp_path / "c").check(fingerprint=after, tokenizer=tokenizer, top_k=3, temperature=1.0,
                                           max_prompt_length=512, max_new_tokens=6)


def test_weight_hashes_are_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import os

    import gkd.serving.cache as cache

    file = tmp_path / "w.safetensors"
    file.write_bytes(b"a" * 1000)
    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda fh, name: calls.append(1) or real(fh, name))
    first = cache.file_sha256(file)  # just written: not remembered (a coarse mtime could hide a rewrite)
    assert cache.file_sha256(file) == first and len(calls) == 2
    old = file.stat().st_mtime_ns - 60 * 10**9
    os.utime(file, ns=(old, old))  # written a minute ago: remembered
    assert cache.file_sha256(file) == first and len(calls) == 3
    cache._FILE_HASHES.clear()  # a new process: the memo file answers
    assert cache.file_sha256(file) == first and len(calls) == 3
    file.write_bytes(b"a" * 499 + b"b" + b"a" * 500)  # same size, another mtime: hashed again
    os.utime(file, ns=(old + 1000, old + 1000))
    assert cache.file_sha256(file) != first and len(calls) == 4


def test_rows_with_one_prompt_and_different_completions_keep_their_own_scores(tokenizer, tmp_path):
    from gkd.data import PromptDataset, collate, reference_rollout
    from gkd.scorer import score

    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    rows = given_rows([{"prompt": "12+3=", "completion": "15"}, {"prompt": "12+3=", "completion": "51"},
                       {"prompt": "12+3=", "completion": "1"}], tokenizer)
    write_cache(tmp_path / "c", teacher, tokenizer, rows, fingerprint="x", top_k=4, temperature=1.0,
                max_prompt_length=512, max_new_tokens=6)
    cache = TeacherCache(tmp_path / "c")
    assert cache.manifest["rows"] == 3
    dataset = PromptDataset(rows, tokenizer, max_prompt_length=512, max_new_tokens=6)
    rollout = reference_rollout(collate([dataset[i] for i in (2, 0, 1)], tokenizer.pad_token_id))
    got = cache.lookup(rollout)
    want = score(teacher, rollout, len(tokenizer), topk=4).teacher_logits
    m = rollout.completion_mask
    torch.testing.assert_close(got.logprobs[m], want.logprobs[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.indices[m], want.indices[m])
    assert not torch.equal(got.logprobs[1][m[1]], got.logprobs[2][m[2]])


def test_a_second_writer_is_refused_while_one_holds_the_lock(tokenizer, tmp_path):
    from filelock import FileLock

    with FileLock(str(tmp_path / "c.lock")), pytest.raises(InputError, match="being written by another gkd "
                                                                            "cache-teacher") as e:
        write_cache(tmp_path / "c", tiny_model(tokenizer), tokenizer, given_rows(ROWS[:2], tokenizer), fingerprint="x",
                    top_k=3, temperature=1.0, max_prompt_length=512, max_new_tokens=6)
    assert "\n" not in str(e.value) and not (tmp_path / "c.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "index"])
def test_a_damaged_shard_is_one_line(tokenizer, tmp_path, damage):
    from safetensors.torch import save_file

    write_cache(tmp_path / "c", tiny_model(tokenizer), tokenizer, given_rows(ROWS, tokenizer), fingerprint="x",
                top_k=3, temperature=1.0, max_prompt_length=512, max_new_tokens=6)
    shard = tmp_path / "c" / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
        words = "truncated"
    elif damage == "flip":
        raw[-3] ^= 0xFF
        shard.write_bytes(bytes(raw))
        words = "does not match the SHA-256"
    else:  # a consistent file with a broken row index, and no size / hash in the manifest (an older cache)
        manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
        for s in manifest["shards"]:
            s.pop("bytes"), s.pop("sha256")
        (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
        from safetensors.torch import load_file

        tensors = load_file(str(shard))
        tensors["offsets"][-1] += 5
        save_file(tensors, str(shard))
        words = "inconsistent row index"
    with pytest.raises(InputError, match=f"is damaged or unreadable .*{words}") as e:
        TeacherCache(tmp_path / "c")
    assert "\n" not in str(e.value)


def test_cache_with_top_k_above_the_vocabulary_equals_the_live_teacher(tokenizer, tmp_path):
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    k = len(tokenizer) + 5
    write_cache(tmp_path / "cache", teacher, tokenizer, given_rows(ROWS, tokenizer), fingerprint=module_fingerprint(teacher),
                top_k=k, temperature=1.0, max_prompt_length=512, max_new_tokens=6)
    _, live = _run(tokenizer, tmp_path, "live", copy.deepcopy(teacher), lmbda=0.0, teacher_topk=k, max_steps=2)
    _, cached = _run(tokenizer, tmp_path, "cached", copy.deepcopy(teacher), lmbda=0.0, teacher_topk=k, max_steps=2,
                     teacher_cache=str(tmp_path / "cache"))
    for a, b in zip(live, cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5, abs=1e-6)


def test_cli_second_cache_writer_is_one_line_exit_2(tmp_path, capsys):
    """Two `gkd cache-teacher` on one folder: the second stops with one line (was a traceback, exit 1)."""
    from filelock import FileLock

    cache = tmp_path / "cache"
    with FileLock(str(tmp_path / "cache.lock")):  # the first writer, still at work
        code = main(["cache-teacher", TINY, f"teacher_cache={cache}", "teacher_topk=8", "max_new_tokens=6",
                     "num_train_examples=64"])
    err = capsys.readouterr().err
    assert code == 2 and "is being written by another gkd cache-teacher" in err and err.strip().count("\n") == 0, err
    assert not cache.exists()


def test_cli_refuses_a_cache_of_a_teacher_changed_in_the_middle_of_its_weights(tokenizer, tmp_path, capsys):
    """End to end: cache-teacher with a teacher folder, then the middle of its weight file changes (same
    size): training refuses the cache with one line, exit 2 (was: the stale cache used, exit 0)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "teacher"
    _save_teacher(tokenizer, folder)
    tokenizer.save_pretrained(folder)
    cache = tmp_path / "cache"
    common = [f"teacher={folder}", f"teacher_cache={cache}", "teacher_topk=8", "max_new_tokens=6",
              "num_train_examples=64"]
    assert main(["cache-teacher", TINY, *common]) == 0
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(str(weights))
    tensors[_middle_tensor(weights)][3, 3] += 0.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == size
    capsys.readouterr()
    code = main(["train", TINY, "lmbda=0", "max_steps=1", f"output_dir={tmp_path / 'run'}", *common, *QUIET])
    err = capsys.readouterr().err
    assert code == 2 and "was written for another setup (teacher: cache 'files:" in err, err
    assert err.strip().count("\n") == 0
