"""Per-teacher ``topk`` / ``temperature`` in ``teachers:`` (issue 23): each teacher's rows at its own k and τ.

Guards, each against an independent reference:
- a micro-batch mixing a k=3 / τ=1 teacher with a k=5 / τ=2 one (and a full-vocabulary teacher with a top-k
  one): the step's loss and student gradients equal (1) float64 bucketed divergences written out here, each
  row with its own teacher's k and τ, and (2) single-teacher runs on each row alone with that teacher's
  ``teacher_topk`` / ``loss_temperature``;
- MiniLLM's single-step term: each row at its teacher's k and τ; SKD keeps its verification top-k for the
  loss only when every teacher has the same k and none sets its own τ;
- widening a top-k view with empty buckets changes no top-k objective and no gradient (and makes no NaN);
  a per-position τ tensor in the losses equals each row with its own float τ;
- ``teacher_cache``: each teacher's rows cached at its own k / τ, read back widened; a run whose per-teacher
  k or τ changed is refused, naming the teacher;
- config errors: one line naming the teacher; ``student_init: {from: teacher}`` with ``teachers:`` only, and
  ``student_init: {from: PATH}`` without ``student:``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import capture_step_grads, tiny_model
from test_multi_teacher import ROW_TEACHER, ROWS, _unpadded_logits

from gkd.config import GKDConfig
from gkd.errors import ConfigError, InputError
from gkd.losses import (
    LOGIT_OBJECTIVES,
    TOPK_OBJECTIVES,
    TeacherTopK,
    distillation_loss_per_token,
    single_step_reverse_kl,
)

# (teacher a's (k, τ), teacher b's (k, τ), divergence); k = 0: full vocabulary
CASES = [((3, 1.0), (5, 2.0), "jsd"), ((0, 1.0), (3, 2.0), "reverse_kl")]


def _config(tmp_path: Path, name: str, **kw) -> GKDConfig:
    values = dict(student="unused", dataset="unused", lmbda=0.0, beta=0.5, per_device_batch_size=4, max_steps=1,
                  max_grad_norm=0.0, max_new_tokens=8, output_dir=str(tmp_path / name), progress_bar=False,
                  save_final_model=False, seed=3, log_samples_steps=0)
    values.update(kw)
    return GKDConfig(**values)


def _teachers(tokenizer) -> dict[str, torch.nn.Module]:
    return {"a": tiny_model(tokenizer, hidden=64, seed=12), "b": tiny_model(tokenizer, hidden=32, seed=13)}


def _reference_row(s: torch.Tensor, t: torch.Tensor, k: int, tau: float, divergence: str) -> torch.Tensor:
    """Per-position divergence ``(n,)`` in float64, written out: softmax at τ, the teacher's top-k tokens
    and a tail bucket (none for k = 0), then JSD(0.5) or KL(q‖p) over the buckets."""
    p, q = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    if k:
        top = p.topk(k, -1).indices
        rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
        p = torch.cat([p.gather(-1, top), (p * rest).sum(-1, keepdim=True)], -1)
        q = torch.cat([q.gather(-1, top), (q * rest).sum(-1, keepdim=True)], -1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.log() - b.log())).sum(-1)

    if divergence == "reverse_kl":
        return kl(q, p)
    m = 0.5 * p + 0.5 * q
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@pytest.mark.parametrize(("a", "b", "divergence"), CASES)
def test_mixed_batch_with_per_teacher_topk_and_temperature_equals_each_row_alone(tokenizer, tmp_path, monkeypatch,
                                                                                  a, b, divergence):
    from gkd.trainer import GKDTrainer

    settings = {"a": a, "b": b}
    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    teachers = _teachers(tokenizer)
    reference_student = copy.deepcopy(student).double()
    reference_teachers = {n: copy.deepcopy(t).double() for n, t in teachers.items()}
    captured = capture_step_grads(monkeypatch)
    entries = {n: {"model": "unused", "topk": k, "temperature": tau} for n, (k, tau) in settings.items()}
    trainer = GKDTrainer(_config(tmp_path, "mixed", teachers=entries, divergence=divergence),
                         student=copy.deepcopy(student), teachers=copy.deepcopy(teachers), tokenizer=tokenizer,
                         train_rows=ROWS)
    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.student).named_parameters()}
    (metrics,) = trainer.train()
    got = {names[key]: g for key, g in captured[0].items()}

    # (1) float64, written out: each row with its own teacher's k and τ, one token mean over the batch
    total, tokens, per_teacher = 0.0, 0, {"a": [0.0, 0], "b": [0.0, 0]}
    lengths = []
    for row, name in zip(ROWS, ROW_TEACHER, strict=True):
        p = tokenizer(row["prompt"]).input_ids
        c = tokenizer(row["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        s = _unpadded_logits(reference_student, p, c)
        with torch.no_grad():
            t = _unpadded_logits(reference_teachers[name], p, c)
        d = _reference_row(s, t, *settings[name], divergence)
        total = total + d.sum()
        tokens += len(c)
        lengths.append(len(c))
        per_teacher[name][0] += float(d.detach().sum())
        per_teacher[name][1] += len(c)
    loss = total / tokens
    loss.backward()
    want = {n: p.grad for n, p in reference_student.named_parameters()}
    assert set(got) == set(want)
    for name, g in got.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), want[name], rtol=2e-4, atol=1e-7, msg=name)
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    for name, (value, n) in per_teacher.items():
        # the trainer's divergence is fp32: ~1e-7 absolute on a teacher's mean of ~1e-3
        assert metrics[f"loss/{name}"] == pytest.approx(value / n, rel=1e-4, abs=5e-7)

    # (2) single-teacher runs, each row alone, with its teacher's k and τ as teacher_topk / loss_temperature
    alone_loss, alone_grads = 0.0, None
    for i, (row, name) in enumerate(zip(ROWS, ROW_TEACHER, strict=True)):
        k, tau = settings[name]
        one = GKDTrainer(_config(tmp_path, f"row{i}", teacher="unused", teacher_topk=k, loss_temperature=tau,
                                 divergence=divergence, per_device_batch_size=1),
                         student=copy.deepcopy(student), teacher=copy.deepcopy(teachers[name]), tokenizer=tokenizer,
                         train_rows=[row])
        one_names = {id(p): n for n, p in one.accelerator.unwrap_model(one.student).named_parameters()}
        (m,) = one.train()
        weight = lengths[i] / tokens
        alone_loss += weight * m["loss"]
        grads = {one_names[key]: weight * g.double() for key, g in captured[-1].items()}
        alone_grads = grads if alone_grads is None else {n: alone_grads[n] + g for n, g in grads.items()}
    assert metrics["loss"] == pytest.approx(alone_loss, rel=1e-5)
    for name, g in got.items():
        torch.testing.assert_close(g.double(), alone_grads[name], rtol=2e-4, atol=1e-7, msg=name)


def test_minillm_single_step_term_uses_each_rows_teacher_k_and_temperature(tokenizer, tmp_path):
    from gkd.data import reference_rollout
    from gkd.scorer import completion_logits, score
    from gkd.teachers import select_rows
    from gkd.trainer import GKDTrainer

    settings = {"a": (3, 1.0), "b": (5, 2.0)}
    teachers = _teachers(tokenizer)
    entries = {n: {"model": "unused", "topk": k, "temperature": tau} for n, (k, tau) in settings.items()}
    cfg = _config(tmp_path, "minillm", teachers=entries, algorithm="minillm", num_rollouts=4, teacher_mix=0.0)
    trainer = GKDTrainer(cfg, student=tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11),
                         teachers=copy.deepcopy(teachers), tokenizer=tokenizer,
                         train_rows=[{**r, "teacher": n} for r, n in zip(ROWS, ROW_TEACHER, strict=True)])
    batch = next(trainer.parts.batches)
    rollout = reference_rollout(batch)
    rollout.rows, rollout.on_policy = batch["rows"], True
    zeros = torch.zeros(rollout.completion_ids.shape)
    rollout.sampled_logprobs, rollout.mixed_logprobs, rollout.advantages = zeros, zeros.clone(), zeros.clone()
    got = trainer.algorithm.loss(rollout).terms["single_step"].detach()
    for i, row in enumerate(batch["rows"]):
        k, tau = settings[row["teacher"]]
        one = select_rows(rollout, torch.tensor([i]))
        view = score(teachers[row["teacher"]], one, len(tokenizer), topk=k, temperature=tau).teacher_logits
        with torch.no_grad():
            want = single_step_reverse_kl(completion_logits(trainer.parts.student, one, len(tokenizer)), view,
                                          temperature=tau)[0]
        mask = rollout.completion_mask[i]
        torch.testing.assert_close(got[i][mask], want[mask], rtol=1e-5, atol=1e-6)


def test_skd_keeps_its_verification_topk_only_when_the_teachers_agree(tokenizer, tmp_path):
    from gkd.trainer import GKDTrainer

    def keep(entries: dict) -> tuple | None:
        cfg = _config(tmp_path, f"skd{len(str(entries))}", teachers=entries, rollout="skd", lmbda=1.0, teacher_topk=4)
        return GKDTrainer(cfg, student=tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11),
                          teachers=_teachers(tokenizer), tokenizer=tokenizer, train_rows=ROWS).algorithm.skd_keep()

    assert keep({"a": "unused", "b": "unused"}) == (4, 1.0)
    assert keep({"a": {"model": "unused", "topk": 4}, "b": "unused"}) == (4, 1.0)
    assert keep({"a": {"model": "unused", "topk": 3}, "b": "unused"}) is None  # the loss scores each at its k
    assert keep({"a": {"model": "unused", "temperature": 2.0}, "b": "unused"}) is None


def _view(logits: torch.Tensor, k: int, tau: float) -> TeacherTopK:
    from gkd.chunked import teacher_topk

    return teacher_topk(logits, k, temperature=tau)


def test_empty_buckets_add_exactly_nothing_to_every_topk_objective_and_gradient():
    torch.manual_seed(0)
    z, t = torch.randn(6, 11) * 3, torch.randn(6, 11) * 3
    labels = torch.randint(0, 11, (6,))
    for k in (1, 3, 11):  # 11: the whole vocabulary (empty tail)
        narrow = _view(t, k, 1.5)
        wide = narrow.widen(k + 4)
        assert wide.width == k + 4 and bool((wide.indices[:, k:] == TeacherTopK.EMPTY).all())
        for divergence in TOPK_OBJECTIVES:
            values, grads = [], []
            for view in (narrow, wide):
                zz = z.clone().requires_grad_(True)
                loss = distillation_loss_per_token(zz, view, divergence=divergence, temperature=1.5, labels=labels)
                loss.sum().backward()
                values.append(loss.detach())
                grads.append(zz.grad)
            assert torch.isfinite(values[1]).all() and torch.isfinite(grads[1]).all(), (k, divergence)
            torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-7, msg=f"{k} {divergence}")
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7, msg=f"{k} {divergence}")
        zz = z.clone().requires_grad_(True)
        single_step_reverse_kl(zz, wide, temperature=1.5).sum().backward()
        assert torch.isfinite(zz.grad).all()


def test_full_logits_as_the_k_equals_v_view_are_exact():
    torch.manual_seed(1)
    z, t = torch.randn(5, 9), torch.randn(5, 9)
    for divergence in TOPK_OBJECTIVES:
        full = distillation_loss_per_token(z, t, divergence=divergence, temperature=2.0, labels=torch.zeros(5).long())
        view = distillation_loss_per_token(z, TeacherTopK.from_logits(t, 2.0).widen(12), divergence=divergence,
                                           temperature=2.0, labels=torch.zeros(5).long())
        torch.testing.assert_close(view, full, rtol=1e-5, atol=1e-6, msg=divergence)


def test_per_position_temperature_equals_each_row_with_its_own():
    torch.manual_seed(2)
    z, t = torch.randn(4, 3, 10), torch.randn(4, 3, 10)
    taus = torch.tensor([1.0, 2.0, 0.5, 3.0])
    tau = taus[:, None].expand(4, 3)
    targets, labels = torch.randint(0, 10, (4, 3)), torch.randint(0, 10, (4, 3))
    for divergence in LOGIT_OBJECTIVES:
        for teacher in ("full", "topk"):
            if teacher == "topk" and divergence not in TOPK_OBJECTIVES:
                continue
            views = [t[i] if teacher == "full" else _view(t[i], 4, float(taus[i])) for i in range(4)]
            batch = t if teacher == "full" else TeacherTopK(*(torch.stack([getattr(v, f) for v in views])
                                                             for f in ("indices", "logprobs", "log_tail")))
            zz = z.clone().requires_grad_(True)
            got = distillation_loss_per_token(zz, batch, divergence=divergence, temperature=tau, labels=labels,
                                              targets=targets, temperature_squared=True)
            got.sum().backward()
            for i in range(4):
                zi = z[i].clone().requires_grad_(True)
                want = distillation_loss_per_token(zi, views[i], divergence=divergence, temperature=float(taus[i]),
                                                   labels=labels[i], targets=targets[i], temperature_squared=True)
                want.sum().backward()
                torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6, msg=f"{divergence} {teacher} {i}")
                torch.testing.assert_close(zz.grad[i], zi.grad, rtol=1e-6, atol=1e-6, msg=f"{divergence} {teacher}")
    view = TeacherTopK(*(torch.stack([getattr(_view(t[i], 4, float(taus[i])), f) for i in range(4)])
                         for f in ("indices", "logprobs", "log_tail")))
    got = single_step_reverse_kl(z, view, temperature=tau)
    for i in range(4):
        torch.testing.assert_close(got[i], single_step_reverse_kl(z[i], view[i], temperature=float(taus[i])))


def test_router_merges_teachers_of_different_k_and_full_vocabulary(tokenizer):
    from gkd.data import Example, collate
    from gkd.rollout import Rollout
    from gkd.scorer import score
    from gkd.teachers import TeacherRouter

    teachers = _teachers(tokenizer)
    router = TeacherRouter(teachers, default="a")
    pairs = [("<bos>12+3=", "5010<eos>"), ("<bos>4567+8=", "5111716050<eos>"), ("<bos>9=", "<eos>")]
    enc = [(tokenizer(p, add_special_tokens=False).input_ids, tokenizer(c, add_special_tokens=False).input_ids)
           for p, c in pairs]
    batch = collate([Example(p, c, {}) for p, c in enc], tokenizer.pad_token_id)
    rows = [{"teacher": "b"}, {}, {"teacher": "b"}]
    rollout = Rollout(batch["prompt_ids"], batch["prompt_mask"], batch["reference_ids"], batch["reference_mask"],
                      rows=rows)
    vocab = len(tokenizer)
    for topk, temperature in (({"a": 3, "b": 5}, {"a": 1.0, "b": 2.0}), ({"a": 0, "b": 4}, {"a": 2.0, "b": 1.0})):
        view = score(router, rollout, vocab, topk=topk, temperature=temperature).teacher_logits
        assert isinstance(view, TeacherTopK) and view.width == max(topk["b"], topk["a"] or vocab)
        for i, (row, (p, c)) in enumerate(zip(rows, enc, strict=True)):
            name = row.get("teacher", "a")
            k, n = topk[name] or vocab, len(c)
            with torch.no_grad():
                logp = torch.log_softmax(_unpadded_logits(teachers[name], p, c)[:, :vocab] / temperature[name], -1)
            top = logp.topk(k, -1)
            got = view.logprobs[i, :n].sort(-1, descending=True)
            torch.testing.assert_close(got.values[:, :k], top.values, rtol=1e-5, atol=1e-5)
            assert bool((view.indices[i, :n, k:] == TeacherTopK.EMPTY).all())
            assert bool((view.logprobs[i, :n, k:] == TeacherTopK.LOG_ZERO).all())
    with pytest.raises(TypeError, match="several teachers"):
        score(teachers["a"], rollout, vocab, topk={"a": 3})


def test_fidelity_overlap_of_a_widened_view_uses_the_teachers_own_k():
    from gkd.fidelity import topk_agreement

    torch.manual_seed(3)
    z, t = torch.randn(7, 12), torch.randn(7, 12)
    narrow = _view(t, 3, 1.0)
    for a, b in zip(topk_agreement(z, narrow, 3), topk_agreement(z, narrow.widen(6), 6), strict=True):
        torch.testing.assert_close(b, a)


# --- teacher_cache: each teacher's rows at its own k and τ ----------------------------------------------------


def test_cache_writes_each_teacher_at_its_own_k_and_temperature_and_refuses_a_change(tokenizer, tmp_path):
    from gkd.data import PromptDataset, collate, given_rows, reference_rollout
    from gkd.serving.cache import TeacherCache, module_fingerprint, write_cache
    from gkd.trainer import GKDTrainer

    teachers = _teachers(tokenizer)
    rows = [{**r, "teacher": n} for r, n in zip(ROWS, ROW_TEACHER, strict=True)]
    names = list(ROW_TEACHER)
    own = {"a": (3, 1.0), "b": (5, 2.0)}
    folder = tmp_path / "cache"
    manifest = write_cache(folder, teachers, tokenizer, given_rows(rows, tokenizer),
                           fingerprint={n: module_fingerprint(t) for n, t in teachers.items()}, top_k=4,
                           temperature=1.0, max_prompt_length=512, max_new_tokens=8, row_teachers=names,
                           teacher_settings=own, batch_size=3)
    assert manifest["teacher_widths"] == {"a": 3, "b": 5}
    cache = TeacherCache(folder)
    data = PromptDataset(given_rows(rows, tokenizer), tokenizer, max_prompt_length=512, max_new_tokens=8)
    rollout = reference_rollout(collate([data[i] for i in range(len(rows))], tokenizer.pad_token_id))
    view = cache.lookup(rollout, names)
    assert view.width == 5
    for i, name in enumerate(names):
        e, (k, tau) = data[i], own[name]
        with torch.no_grad():
            full = teachers[name](torch.tensor([e.prompt_ids + e.reference_ids])).logits[0]
        logp = torch.log_softmax(full[len(e.prompt_ids) - 1: -1, : len(tokenizer)].double() / tau, -1)
        n = len(e.reference_ids)
        torch.testing.assert_close(view.logprobs[i, :n, :k].double(), logp.topk(k, -1).values, rtol=1e-5, atol=1e-5)
        assert bool((view.indices[i, :n, k:] == TeacherTopK.EMPTY).all())

    def run(name: str, entries: dict) -> None:
        GKDTrainer(_config(tmp_path, name, teachers=entries, teacher_topk=4, teacher_cache=str(folder),
                           max_new_tokens=8), student=tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11),
                   teachers=copy.deepcopy(teachers), tokenizer=tokenizer, train_rows=rows)

    run("same", {n: {"model": "unused", "topk": k, "temperature": tau} for n, (k, tau) in own.items()})
    with pytest.raises(InputError, match=r"teacher 'b' topk / temperature: cache 5 / 2.0, run 5 / 1.5") as e:
        run("tau", {"a": {"model": "unused", "topk": 3}, "b": {"model": "unused", "topk": 5, "temperature": 1.5}})
    assert "teacher 'a'" not in str(e.value)
    with pytest.raises(InputError, match=r"teacher 'a' topk / temperature: cache 3 / 1.0, run 4 / 1.0"):
        run("k", {"a": "unused", "b": {"model": "unused", "topk": 5, "temperature": 2.0}})


# --- config ---------------------------------------------------------------------------------------------------


def _cfg(**kw) -> GKDConfig:
    return GKDConfig(**{"student": "s", "dataset": "d", "teachers": {"a": "ta", "b": "tb"}, **kw})


@pytest.mark.parametrize(("fields", "message"), [
    (dict(teachers={"a": "ta", "b": {"model": "tb", "cache": "x"}}),
     r"teachers: 'b': per-teacher cache is not supported: teacher_cache is run-wide.*set teacher_cache: FOLDER at "
     "the top level"),
    (dict(teachers={"a": "ta", "b": {"model": "tb", "topk": 8}}, divergence="dkd"),
     r"teachers: 'b' has topk=8, which cannot be used with 'dkd'"),
    (dict(teachers={"a": {"model": "ta", "topk": 8}, "b": {"model": "tb", "topk": 0}}, teacher_topk=8,
          divergence="logit_mse"), r"teachers: 'a' has topk=8"),
    (dict(teachers={"a": "ta", "b": {"model": "http://host:1", "topk": 0}}, teacher_topk=0),
     r"teachers: 'b' \(http://host:1, a served teacher\) sends the top-k.*set its topk"),
    (dict(teachers={"a": "ta", "b": {"model": "http://host:1", "topk": 0}}, teacher_topk=20, lmbda_schedule="adaptive",
          lmbda_check_steps=5, divergence="sampled_reverse_kl"), r"teachers: 'b'.*adaptive.*set its topk"),
    (dict(teachers={"a": "ta", "b": {"model": "tb", "temperature": 2.0}}, loss_temperature_end=0.5,
          loss_temperature_schedule="linear"), r"teachers: 'b' sets its own temperature, but loss_temperature_end"),
    (dict(teachers={"a": {"model": "ta", "topk": 0}, "b": "tb"}, teacher_topk=16, teacher_cache="c"),
     r"teacher_cache='c' stores each teacher's top-k, but teachers: 'a' has topk 0"),
    (dict(teachers={"a": "ta", "b": {"model": "tb", "topk": -1}}), r"teachers: 'b': topk=-1 must be"),
    (dict(teachers={"a": "ta", "b": {"model": "tb", "topk": 2.5}}), r"teachers: 'b': topk=2.5 must be"),
    (dict(teachers={"a": "ta", "b": {"model": "tb", "temperature": 0}}), r"teachers: 'b': temperature=0 must be"),
    (dict(teachers={"a": {"model": "http://host:1", "topk": 8}, "b": "tb"}, student="",
          student_init={"num_layers": 2}), r"student_init from: teacher takes the default teacher's layers, but "
                                          r"teachers: 'a' \(http://host:1\) is served"),
])
def test_config_errors_name_the_teacher(fields, message):
    with pytest.raises(ConfigError, match=message) as e:
        _cfg(**fields)
    assert "\n" not in str(e.value)


def test_per_teacher_settings_that_are_allowed():
    cfg = _cfg(teachers={"a": {"model": "http://host:1", "topk": 20}, "b": {"model": "tb", "topk": 0,
                                                                            "temperature": 2}}, teacher_topk=64)
    from gkd.teacher_specs import own_temperatures, teacher_specs, teacher_topks

    assert teacher_topks(cfg) == {"a": 20, "b": 0}
    assert own_temperatures(cfg) == {"a": 1.0, "b": 2.0}
    assert isinstance(teacher_specs(cfg)["b"].temperature, float)
    assert own_temperatures(_cfg()) is None  # no entry sets its own: one τ, which may follow a schedule
    _cfg(loss_temperature_end=0.5, loss_temperature_schedule="linear")
    _cfg(teachers={"a": {"model": "ta", "topk": 5, "temperature": 2.0}, "b": {"model": "tb", "topk": 3}},
         teacher_cache="c")
    # student_init from the default teacher (teachers: only), and from a folder without student:
    _cfg(student="", student_init={"num_layers": 2})
    _cfg(student="", teachers={"a": "ta", "b": "tb"}, default_teacher="b", student_init={"from": "teacher",
                                                                                      "num_layers": 1})
    GKDConfig(student="", teacher="t", dataset="d", student_init={"from": "some/folder", "num_layers": 1})
    with pytest.raises(ConfigError, match="student is required"):
        GKDConfig(student="", teacher="t", dataset="d")


def test_cli_exits_2_naming_the_teacher(tmp_path, capsys):
    from test_multi_teacher import _one_line_error, _train, _write_rows

    data = _write_rows(tmp_path / "rows.jsonl", ["a", "b"])
    assert _train(tmp_path, data, "bad", "max_steps=1",
                  "teachers={a: builtin:tiny-teacher, b: {model: builtin:tiny-student, cache: x}}") == 2
    err = _one_line_error(capsys)
    assert "teachers: 'b': per-teacher cache is not supported" in err and "run-wide" in err


def test_student_init_from_the_default_teacher_and_from_a_folder(tokenizer, tmp_path):
    from gkd.models import student_path

    folder = tmp_path / "source"
    model = tiny_model(tokenizer, hidden=32, layers=3, seed=5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = GKDConfig(student="", dataset="d", teachers={"a": "unused-elsewhere", "b": str(folder)},
                    default_teacher="b", student_init={"num_layers": 2}, output_dir=str(tmp_path / "run1"))
    made = Path(student_path(cfg))
    assert made == tmp_path / "run1" / "student-init" and (made / "config.json").is_file()
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(made).num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(made).get_vocab() == tokenizer.get_vocab()
    cfg = GKDConfig(student="", teacher="unused", dataset="d", student_init={"from": str(folder), "keep_layers": [0]},
                    output_dir=str(tmp_path / "run2"))
    assert AutoConfig.from_pretrained(student_path(cfg)).num_hidden_layers == 1
