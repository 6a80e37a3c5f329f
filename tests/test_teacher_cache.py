"""``gkd cache-teacher`` + ``teacher_cache``: off-policy steps read the teacher's cached scores and give
the live teacher's losses without a teacher forward; a cache that does not match the run is refused."""

from __future__ import annotations

import copy

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
