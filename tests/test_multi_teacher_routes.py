"""Several teachers (``teachers:``) on two more paths: a served teacher (``gkd serve-teacher`` on loopback)
beside a local one, and speculative KD (``rollout: skd``) verified by each row's own teacher.

References, independent of the routing:
- served + local: each step's loss and per-teacher losses equal a run with both teachers local (the served
  one's model loaded in-process, at the same top-k; also with a full-vocabulary local teacher beside a served
  one at its own k and τ), and the served teacher answers only its own rows;
- routed SKD: with each teacher rigged to put all mass on one token and K = 1, every committed token of a
  row is its own teacher's token; with plain teachers, the teacher view SKD keeps for the loss equals
  scoring each row alone with its own teacher (:func:`gkd.scorer.score`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_multi_teacher import ROWS, _always
from test_served_teacher import TOL, LoopbackServer

from gkd.config import GKDConfig
from gkd.rollout import Rollout
from gkd.scorer import score
from gkd.serving.client import RemoteTeacher
from gkd.serving.server import TeacherService

# rows 0, 2, 4, 6: teacher a (local); 1, 3, 5, 7: teacher r (served in the first test)
TRAIN_ROWS = [{**r, "teacher": n} for r, n in zip(ROWS * 2, ["a", "r"] * 4, strict=True)]


def _config(tmp_path: Path, name: str, teachers: dict, **kw) -> GKDConfig:
    values = dict(teachers=teachers, student="unused", dataset="unused", per_device_batch_size=4, max_steps=4,
                  max_new_tokens=6, output_dir=str(tmp_path / name), progress_bar=False, save_final_model=False,
                  seed=3, log_samples_steps=0, learning_rate=1e-3)
    values.update(kw)
    return GKDConfig(**values)


def _student(tokenizer):
    return tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)


# per-teacher settings: none (teacher_topk for both), or a full-vocabulary local teacher beside a served one at
# its own k and τ (its views widened to the local one's k = V in mixed micro-batches)
OWN = [{"a": {}, "r": {}}, {"a": {"topk": 0}, "r": {"topk": 3, "temperature": 2.0}}]


@pytest.mark.parametrize("own", OWN, ids=["shared", "own"])
def test_a_served_teacher_beside_a_local_one_gives_the_all_local_losses(tokenizer, tmp_path, own):
    from gkd.trainer import GKDTrainer

    def entries(**models: str) -> dict:
        return {n: {"model": m, **own[n]} if own[n] else m for n, m in models.items()}

    a, r = tiny_model(tokenizer, hidden=64, seed=12), tiny_model(tokenizer, hidden=32, seed=13)
    served_rows: list[int] = []
    served_model = copy.deepcopy(r)
    served_model.register_forward_pre_hook(lambda m, args, kw: served_rows.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    server = LoopbackServer(TeacherService(served_model, tokenizer)).start()
    try:
        fields = dict(lmbda=0.5, divergence="jsd", beta=0.5, teacher_topk=5)
        local = GKDTrainer(_config(tmp_path, "local", entries(a="unused", r="unused"), **fields), student=_student(tokenizer),
                           teachers={"a": copy.deepcopy(a), "r": copy.deepcopy(r)}, tokenizer=tokenizer,
                           train_rows=TRAIN_ROWS).train()
        trainer = GKDTrainer(_config(tmp_path, "mixed", entries(a="unused", r=server.url), **fields),
                             student=_student(tokenizer), teachers={"a": copy.deepcopy(a)}, tokenizer=tokenizer,
                             train_rows=TRAIN_ROWS)
        mixed = trainer.train()
    finally:
        server.stop()
    assert isinstance(trainer.teacher["r"], RemoteTeacher) and trainer.teacher["r"].requests > 0
    assert [h["on_policy"] for h in local] == [h["on_policy"] for h in mixed] and {h["on_policy"] for h in mixed} == {0, 1}
    for x, y in zip(local, mixed, strict=True):
        for key in ("loss", "loss/a", "loss/r", "rows/a", "rows/r"):
            assert (key in x) == (key in y), key
            if key in x:
                assert y[key] == pytest.approx(x[key], **TOL), (x["step"], key)
    assert served_rows and all(n <= 2 for n in served_rows)  # each batch of 4 holds 2 of r's rows: only those


def test_routed_skd_replaces_each_rows_tokens_with_its_own_teachers(tokenizer, tmp_path):
    from gkd.trainer import GKDTrainer

    teachers = {"a": _always(tiny_model(tokenizer, hidden=64, seed=12), tokenizer, "3"),
                "b": _always(tiny_model(tokenizer, hidden=32, seed=13), tokenizer, "7")}
    rows = [{**r, "teacher": n} for r, n in zip(ROWS * 2, ["a", "b", "b", "a"] * 2, strict=True)]
    cfg = _config(tmp_path, "skd", {"a": "unused", "b": "unused"}, rollout="skd", skd_top_k=1, skd_draft_tokens=3,
                  lmbda=1.0, per_device_batch_size=8)
    trainer = GKDTrainer(cfg, student=_student(tokenizer), teachers=teachers, tokenizer=tokenizer, train_rows=rows)
    batch = next(trainer.parts.batches)
    rollout = trainer.algorithm.rollout(batch, on_policy=True)
    token = {"a": tokenizer.convert_tokens_to_ids("3"), "b": tokenizer.convert_tokens_to_ids("7")}
    assert sorted(r["teacher"] for r in rollout.rows) == ["a"] * 4 + ["b"] * 4
    for i, row in enumerate(rollout.rows):
        ids = rollout.completion_ids[i][rollout.completion_mask[i]].tolist()
        assert ids == [token[row["teacher"]]] * 6, (i, row["teacher"], ids)  # K = 1: only the teacher's token
    assert bool(rollout.skd_replaced[rollout.completion_mask].any())  # the student proposed others: replaced


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_routed_skd_keeps_each_rows_own_teacher_view(tokenizer, tmp_path, tau):
    from gkd.trainer import GKDTrainer

    teachers = {"a": tiny_model(tokenizer, hidden=64, seed=12), "b": tiny_model(tokenizer, hidden=32, seed=13)}
    rows = [{**r, "teacher": n} for r, n in zip(ROWS * 2, ["a", "b", "b", "a"] * 2, strict=True)]
    cfg = _config(tmp_path, f"skd{tau}", {"a": "unused", "b": "unused"}, rollout="skd", skd_top_k=2,
                  skd_draft_tokens=2, lmbda=1.0, per_device_batch_size=8, teacher_topk=4, loss_temperature=tau)
    trainer = GKDTrainer(cfg, student=_student(tokenizer), teachers=copy.deepcopy(teachers), tokenizer=tokenizer,
                         train_rows=rows)
    rollout = trainer.algorithm.rollout(next(trainer.parts.batches), on_policy=True)
    assert rollout.teacher_cache is not None and rollout.teacher_cache[0] == tau
    kept = rollout.teacher_cache[1]
    for i, row in enumerate(rollout.rows):
        one = Rollout(rollout.prompt_ids[i:i + 1], rollout.prompt_mask[i:i + 1], rollout.completion_ids[i:i + 1],
                      rollout.completion_mask[i:i + 1])
        want = score(teachers[row["teacher"]], one, len(tokenizer), topk=4, temperature=tau).teacher_logits
        m = rollout.completion_mask[i]
        torch.testing.assert_close(kept.logprobs[i][m], want.logprobs[0][m], rtol=1e-4, atol=1e-4)
        assert torch.equal(kept.indices[i][m], want.indices[0][m]), i
