"""``teacher_cache`` / ``gkd cache-teacher`` with several teachers (``teachers:``): each row is cached as
scored by its own teacher, under per-teacher fingerprints, and a run whose teachers changed is refused.

Guards, each against an independent reference:
- every cached row's top-k equals ``torch.topk`` of the log-softmax of an unpadded forward of that row alone
  with its own teacher (the same text routed to two teachers has two entries, each its teacher's);
- off-policy steps read the cache and give the live routed run's losses, with no teacher forward;
- a cache of other teachers (one fingerprint changed, a teacher added, one teacher's cache), or rows now
  routed elsewhere: refused, naming the teacher; the command line writes one and refuses a stale one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_multi_teacher import _write_rows
from test_teacher_cache import CountingTeacher

from gkd.cli import main
from gkd.config import GKDConfig
from gkd.data import collate, given_rows, reference_rollout
from gkd.errors import InputError
from gkd.serving.cache import TeacherCache, module_fingerprint, write_cache

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5), (40, 51), (7, 8), (33, 9),
                                                                       (61, 20), (5, 5), (18, 27)]]
# row 5 is row 1 again, routed to the other teacher; row 7 has no column (the default teacher, a)
ROW_TEACHER = ["a", "b", "b", "a", "b", "a", "b", None]
K = 5


def _rows() -> list[dict]:
    rows = [dict(r) for r in ROWS]
    rows[5] = {**ROWS[1]}
    return [{**r, "teacher": n} if n else r for r, n in zip(rows, ROW_TEACHER, strict=True)]


def _teachers(tokenizer) -> dict[str, torch.nn.Module]:
    return {"a": tiny_model(tokenizer, hidden=64, seed=12), "b": tiny_model(tokenizer, hidden=32, seed=13)}


def _names() -> list[str]:
    return [n or "a" for n in ROW_TEACHER]


def _write(tokenizer, folder: Path, teachers: dict[str, torch.nn.Module]) -> dict:
    return write_cache(folder, teachers, tokenizer, given_rows(_rows(), tokenizer),
                       fingerprint={n: module_fingerprint(t) for n, t in teachers.items()}, top_k=K, temperature=1.0,
                       max_prompt_length=512, max_new_tokens=6, row_teachers=_names(), batch_size=3)


def test_each_row_is_cached_as_its_own_teacher_scores_it_alone(tokenizer, tmp_path):
    from gkd.data import PromptDataset

    teachers = _teachers(tokenizer)
    manifest = _write(tokenizer, tmp_path / "cache", teachers)
    assert manifest["rows"] == len(ROWS)  # the repeated text is stored once per teacher
    assert set(manifest["teachers"]) == {"a", "b"} and "teacher" not in manifest
    cache = TeacherCache(tmp_path / "cache")
    dataset = PromptDataset(given_rows(_rows(), tokenizer), tokenizer, max_prompt_length=512, max_new_tokens=6)
    rollout = reference_rollout(collate([dataset[i] for i in range(len(ROWS))], tokenizer.pad_token_id))
    view = cache.lookup(rollout, _names())
    for i, name in enumerate(_names()):
        e = dataset[i]
        with torch.no_grad():  # the row alone, unpadded, with its own teacher
            full = teachers[name](torch.tensor([e.prompt_ids + e.reference_ids])).logits[0]
        logp = torch.log_softmax(full[len(e.prompt_ids) - 1: -1, : len(tokenizer)].double(), -1)
        top = logp.topk(K, -1)
        n = len(e.reference_ids)
        torch.testing.assert_close(view.logprobs[i, :n].double(), top.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(view.indices[i, :n], top.indices), i
    # rows 1 and 5: the same tokens, each with its own teacher's scores
    assert not torch.allclose(view.logprobs[1], view.logprobs[5])
    with pytest.raises(ValueError, match="pass each row's teacher"):
        cache.lookup(rollout)


def _run(tokenizer, tmp_path, name, models, **overrides):
    from gkd.trainer import GKDTrainer

    fields = dict(teachers={"a": "unused", "b": "unused"}, student="unused", dataset="unused",
                  per_device_batch_size=4, max_steps=4, max_new_tokens=6, output_dir=str(tmp_path / name),
                  progress_bar=False, save_final_model=False, seed=3, teacher_topk=K, log_samples_steps=0,
                  learning_rate=1e-3, divergence="jsd", beta=0.5)
    trainer = GKDTrainer(GKDConfig(**{**fields, **overrides}), teachers=models, tokenizer=tokenizer,
                         train_rows=_rows(), student=tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11))
    return trainer, trainer.train()


def test_cached_off_policy_steps_equal_the_live_teachers(tokenizer, tmp_path):
    teachers = _teachers(tokenizer)
    _write(tokenizer, tmp_path / "cache", teachers)
    _, live = _run(tokenizer, tmp_path, "live", copy.deepcopy(teachers), lmbda=0.5)
    counting = {n: CountingTeacher(copy.deepcopy(t)) for n, t in teachers.items()}
    trainer, cached = _run(tokenizer, tmp_path, "cached", counting, lmbda=0.5, teacher_cache=str(tmp_path / "cache"))
    assert [h["on_policy"] for h in live] == [h["on_policy"] for h in cached]
    for a, b in zip(live, cached, strict=True):
        for key in ("loss", "loss/a", "loss/b"):
            assert (key in a) == (key in b), key
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (a["step"], key)
    off = sum(1 - h["on_policy"] for h in cached)
    assert off > 0 and trainer.parts.teacher_cache.hits == 4 * off  # every off-policy row came from the cache
    on = sum(h["on_policy"] for h in cached)  # teachers ran on on-policy steps only (each once, if it had rows)
    assert sum(t.calls for t in counting.values()) <= 2 * on and (on == 0) == (sum(t.calls for t in counting.values()) == 0)


def test_a_cache_of_other_teachers_or_other_routing_is_refused(tokenizer, tmp_path):
    teachers = _teachers(tokenizer)
    folder = tmp_path / "cache"
    _write(tokenizer, folder, teachers)
    changed = {"a": teachers["a"], "b": tiny_model(tokenizer, hidden=32, seed=14)}
    with pytest.raises(InputError, match=r"teacher 'b': cache 'params:.*', run 'params:") as e:
        _run(tokenizer, tmp_path, "changed", changed, lmbda=0.0, teacher_cache=str(folder))
    assert "teacher 'a'" not in str(e.value)
    added = {**teachers, "c": tiny_model(tokenizer, hidden=32, seed=15)}
    with pytest.raises(InputError, match="teacher 'c': not in the cache"):
        _run(tokenizer, tmp_path, "added", added, lmbda=0.0, teacher_cache=str(folder),
             teachers={"a": "unused", "b": "unused", "c": "unused"})
    with pytest.raises(InputError, match=r"lacks 1 of the 8 training rows \(.*default_teacher"):  # row 7 now b's
        _run(tokenizer, tmp_path, "rerouted", teachers, lmbda=0.0, teacher_cache=str(folder), default_teacher="b")
    one = tmp_path / "one"  # a cache of one teacher
    write_cache(one, teachers["a"], tokenizer, given_rows(_rows(), tokenizer),
                fingerprint=module_fingerprint(teachers["a"]), top_k=K, temperature=1.0, max_prompt_length=512,
                max_new_tokens=6)
    with pytest.raises(InputError, match="cache of one teacher, run of teachers a, b"):
        _run(tokenizer, tmp_path, "one", teachers, lmbda=0.0, teacher_cache=str(one))


def test_cli_caches_several_teachers_and_refuses_when_one_changes(tmp_path, capsys):
    data = _write_rows(tmp_path / "rows.jsonl", ["a", "b", None], n=12)
    cache = tmp_path / "cache"
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    common = ["teachers={a: builtin:tiny-teacher, b: builtin:tiny-student}", "teacher=null", f"dataset={data}",
              "teacher_topk=8", f"teacher_cache={cache}", "max_new_tokens=6", "per_device_batch_size=4",
              "progress_bar=false", "log_samples_steps=0"]
    assert main(["cache-teacher", recipe, *common]) == 0
    assert "rows in 1 shard(s)" in capsys.readouterr().out
    assert main(["train", recipe, *common, "lmbda=0", "max_steps=2", f"output_dir={tmp_path / 'ok'}"]) == 0
    capsys.readouterr()
    swapped = [c if not c.startswith("teachers=") else "teachers={a: builtin:tiny-teacher, b: builtin:tiny-teacher}"
               for c in common]
    assert main(["train", recipe, *swapped, "lmbda=0", "max_steps=1", f"output_dir={tmp_path / 'bad'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gkd train:")]
    assert len(err) == 1 and "teacher 'b': cache 'files:" in err[0] and "teacher 'a'" not in err[0], err
