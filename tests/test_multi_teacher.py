"""Several teachers in one run (``teachers:``, gkd/teachers.py): each row goes to its own teacher.

Guards, each against an independent reference (not the routing code):
- a micro-batch mixing two teachers' rows: the optimizer step's gradient and loss equal ONE masked
  ``generalized_jsd`` over unpadded float64 forwards of each row with its own teacher; each teacher runs
  once, on its own rows only;
- routed scores (full logits and top-k) equal each row scored alone by its teacher;
- SeqKD: the row's teacher writes its sample; MiniLLM's teacher-mixed sampling stores the log-probs of the
  row's teacher;
- config / row errors: one line, exit 2, naming the row / teacher;
- per-teacher metrics and samples; resume with mixed batches is bit-exact.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import capture_step_grads, tiny_model

from gkd.cli import main
from gkd.config import GKDConfig
from gkd.data import Example, collate
from gkd.losses import generalized_jsd
from gkd.rollout import Rollout
from gkd.scorer import score
from gkd.teachers import TeacherRouter

# completion lengths 1, 2, 4, 8 (EOS included); rows 0 and 3 are teacher a's (row 3 by default), 1 and 2 b's
ROWS = [
    {"prompt": "12+3=", "completion": "", "teacher": "a"},
    {"prompt": "4+5=", "completion": "9", "teacher": "b"},
    {"prompt": "40+51=", "completion": "190", "teacher": "b"},
    {"prompt": "4567+8=", "completion": "5756400"},
]
ROW_TEACHER = ["a", "b", "b", "a"]


def _unpadded_logits(model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    full = model(torch.tensor([prompt_ids + completion_ids])).logits[0]
    return full[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion_ids)]


def _config(tmp_path: Path, **kw) -> GKDConfig:
    values = dict(teachers={"a": "unused", "b": "unused"}, student="unused", dataset="unused", lmbda=0.0,
                  divergence="jsd", beta=0.5, per_device_batch_size=4, max_steps=1, max_grad_norm=0.0,
                  max_new_tokens=8, output_dir=str(tmp_path / "run"), progress_bar=False, save_final_model=False,
                  seed=3, log_samples_steps=0)
    values.update(kw)
    return GKDConfig(**values)


def _teachers(tokenizer) -> dict[str, torch.nn.Module]:
    return {"a": tiny_model(tokenizer, hidden=64, seed=12), "b": tiny_model(tokenizer, hidden=32, seed=13)}


def test_mixed_batch_step_equals_each_row_with_its_own_teacher(tokenizer, tmp_path, monkeypatch):
    from gkd.trainer import GKDTrainer

    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    teachers = _teachers(tokenizer)
    reference_student = copy.deepcopy(student).double()
    reference_teachers = {n: copy.deepcopy(t).double() for n, t in teachers.items()}
    calls: dict[str, list[int]] = {"a": [], "b": []}
    for name, t in teachers.items():  # how often, and on how many rows, each teacher runs
        t.register_forward_hook(lambda m, args, kwargs, out, name=name: calls[name].append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    captured = capture_step_grads(monkeypatch)
    trainer = GKDTrainer(_config(tmp_path), student=student, teachers=teachers, tokenizer=tokenizer, train_rows=ROWS)
    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.student).named_parameters()}
    (metrics,) = trainer.train()
    assert calls == {"a": [2], "b": [2]}, "one forward per teacher, on its own rows only"
    got = {names[k]: v for k, v in captured[0].items()}

    s_rows, t_rows = [], []
    for row, teacher in zip(ROWS, ROW_TEACHER, strict=True):
        p = tokenizer(row["prompt"]).input_ids
        c = tokenizer(row["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        s_rows.append(_unpadded_logits(reference_student, p, c))
        with torch.no_grad():
            t_rows.append(_unpadded_logits(reference_teachers[teacher], p, c))
    lengths = [len(r) for r in s_rows]
    pad = max(lengths)
    mask = torch.tensor([[t < n for t in range(pad)] for n in lengths])
    s = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, pad - len(x))) for x in s_rows])
    t = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, pad - len(x))) for x in t_rows])
    loss = generalized_jsd(s, t, beta=0.5, mask=mask)
    loss.backward()
    want = {n: p.grad for n, p in reference_student.named_parameters()}
    assert set(got) == set(want)
    for name, g in got.items():
        torch.testing.assert_close(g.double(), want[name], rtol=2e-4, atol=1e-7, msg=name)
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    # per teacher: the token mean over its own rows
    with torch.no_grad():
        for name in ("a", "b"):
            sel = torch.tensor([x == name for x in ROW_TEACHER])
            assert metrics[f"rows/{name}"] == 2
            assert metrics[f"loss/{name}"] == pytest.approx(float(generalized_jsd(s[sel], t[sel], beta=0.5,
                                                                                  mask=mask[sel])), rel=1e-5)


@pytest.mark.parametrize("topk", [0, -1])  # -1: k = vocabulary size
def test_routed_scores_equal_each_row_scored_alone(tokenizer, topk):
    teachers = _teachers(tokenizer)
    router = TeacherRouter(teachers, default="a")
    pairs = [("<bos>12+3=", "5010<eos>"), ("<bos>4567+8=", "5111716050<eos>"), ("<bos>9=", "<eos>"), ("<bos>1+1=", "2")]
    enc = [(tokenizer(p, add_special_tokens=False).input_ids, tokenizer(c, add_special_tokens=False).input_ids)
           for p, c in pairs]
    batch = collate([Example(p, c, {}) for p, c in enc], tokenizer.pad_token_id)
    rows = [{"teacher": "b"}, {}, {"teacher": "b"}, {"teacher": "a"}]
    rollout = Rollout(batch["prompt_ids"], batch["prompt_mask"], batch["reference_ids"], batch["reference_mask"],
                      rows=rows)
    vocab = len(tokenizer)
    k = vocab if topk < 0 else 0
    view = score(router, rollout, vocab, topk=k, with_token_logprobs=True)
    for i, (row, (p, c)) in enumerate(zip(rows, enc, strict=True)):
        with torch.no_grad():
            want = _unpadded_logits(teachers[row.get("teacher", "a")], p, c)[:, :vocab]
        n = len(c)
        if k == 0:
            torch.testing.assert_close(view.teacher_logits[i, :n], want, rtol=1e-4, atol=1e-4)
        else:
            got = torch.full((n, vocab), float("nan"))
            got.scatter_(-1, view.teacher_logits.indices[i, :n], view.teacher_logits.logprobs[i, :n])
            torch.testing.assert_close(got, torch.log_softmax(want, -1), rtol=1e-4, atol=1e-4)
        token = torch.log_softmax(want, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(view.token_logprobs[i, :n], token, rtol=1e-4, atol=1e-4)


def _always(model: torch.nn.Module, tokenizer, token: str) -> torch.nn.Module:
    """``model`` with a head that always puts (nearly) all mass on ``token``."""
    hidden, vocab = model.config.hidden_size, model.get_output_embeddings().weight.shape[0]
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[tokenizer.convert_tokens_to_ids(token)] = 30.0
    model.set_output_embeddings(head)
    return model


def test_seq_kd_rows_are_written_by_their_own_teacher(tokenizer, tmp_path):
    from gkd.trainer import GKDTrainer

    teachers = _teachers(tokenizer)
    _always(teachers["b"], tokenizer, "7")
    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    rows = [{**r, "teacher": n} for r, n in zip(ROWS * 2, ["a", "b"] * 4, strict=True)]
    trainer = GKDTrainer(_config(tmp_path, seq_kd=True, per_device_batch_size=8), student=student, teachers=teachers,
                         tokenizer=tokenizer, train_rows=rows)
    batch = next(trainer.parts.batches)
    rollout = trainer.algorithm.rollout(batch, on_policy=False)
    seven = tokenizer.convert_tokens_to_ids("7")
    names = [r["teacher"] for r in rollout.rows]
    assert sorted(names) == ["a"] * 4 + ["b"] * 4
    for i, name in enumerate(names):
        ids = rollout.completion_ids[i][rollout.completion_mask[i]].tolist()
        if name == "b":  # teacher b writes only 7s, to the length limit
            assert ids == [seven] * 8, (i, ids)
        else:
            assert ids != [seven] * len(ids), (i, ids)
    # the stored log-probs are each row's own sampling distribution's
    assert bool((rollout.sampled_logprobs[torch.tensor([n == "b" for n in names])] > -1e-6).all())


def test_teacher_mixed_sampling_stores_each_rows_teacher_logprobs(tokenizer, tmp_path):
    from gkd.scorer import completion_logits
    from gkd.trainer import GKDTrainer

    teachers = _teachers(tokenizer)
    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    rows = [{**r, "teacher": n} for r, n in zip(ROWS * 2, ["a", "b", "b", "a"] * 2, strict=True)]
    cfg = _config(tmp_path, algorithm="minillm", per_device_batch_size=8, num_rollouts=8)
    trainer = GKDTrainer(cfg, student=student, teachers=teachers, tokenizer=tokenizer, train_rows=rows)
    parts = trainer.parts
    batch = next(parts.batches)
    for mix in (0.5, 0.0):  # teacher-mixed sampling, and MiniLLM's teacher_mix: 0 scoring
        if mix > 0:
            rollout = parts.sampler.sample(batch, parts.unwrapped, teacher=parts.teacher, teacher_mix=mix,
                                           draft_tokens=2)
        else:
            rollout = parts.sampler.sample(batch, parts.unwrapped)
            rollout.rows = batch["rows"]
            rollout = trainer.algorithm.scored_rollout(rollout)
        for i, row in enumerate(batch["rows"]):
            mask = rollout.completion_mask[i]
            one = Rollout(rollout.prompt_ids[i : i + 1], rollout.prompt_mask[i : i + 1],
                          rollout.completion_ids[i : i + 1], rollout.completion_mask[i : i + 1])
            with torch.no_grad():
                logp = torch.log_softmax(completion_logits(teachers[row["teacher"]], one, len(tokenizer)).float(), -1)
            want = logp.gather(-1, one.completion_ids[..., None])[0, :, 0]
            torch.testing.assert_close(rollout.teacher_logprobs[i][mask], want[mask], rtol=1e-4, atol=1e-4)


# --- the command line: errors, metrics, resume --------------------------------------------------------------


def _write_rows(path: Path, teachers: list[str | None], n: int = 32) -> Path:
    from gkd.task import make_problems

    lines = []
    for i, p in enumerate(make_problems(n, 3, seed=1)):
        row = {"prompt": p.prompt, "completion": p.completion}
        name = teachers[i % len(teachers)]
        if name is not None:
            row["teacher"] = name
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(tmp_path: Path, data: Path, out: str, *extra: str) -> int:
    return main(["train", str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"),
                 "teachers={a: builtin:tiny-teacher, b: builtin:tiny-student}", f"dataset={data}", "teacher=null",
                 f"output_dir={tmp_path / out}", "progress_bar=false", "save_final_model=false", "max_new_tokens=6",
                 "per_device_batch_size=4", *extra])


def _one_line_error(capsys) -> str:
    """The error: one line (other stderr lines are the datasets library's progress bars)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gkd train:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_teacher_in_a_row_and_empty_mapping_exit_2(tmp_path, capsys):
    data = _write_rows(tmp_path / "rows.jsonl", ["a", "b", "c"])
    assert _train(tmp_path, data, "unknown", "max_steps=1") == 2
    err = _one_line_error(capsys)
    assert "rows.jsonl:3:" in err and "teacher='c'" in err and "a, b" in err
    assert _train(tmp_path, data, "empty", "teachers={}") == 2
    assert "teachers is empty" in _one_line_error(capsys)
    assert _train(tmp_path, data, "default", "default_teacher=z") == 2
    assert "default_teacher='z'" in _one_line_error(capsys)


def test_teacher_with_another_vocabulary_exits_2_naming_it(tmp_path, capsys):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from gkd.task import BOS, EOS, PAD, VOCAB, build_model_config

    vocab = [*VOCAB, "x"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<bos>|<eos>|<pad>|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD)
    folder = tmp_path / "other-teacher"
    AutoModelForCausalLM.from_config(build_model_config(dict(model_type="llama", hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=1, num_attention_heads=4), other)
                                     ).save_pretrained(folder)
    other.save_pretrained(folder)
    data = _write_rows(tmp_path / "rows.jsonl", ["a", "b"])
    assert _train(tmp_path, data, "vocab", "max_steps=1", f"teachers={{a: builtin:tiny-teacher, b: {folder}}}") == 2
    err = _one_line_error(capsys)
    assert "teachers: 'b'" in err and "tokenizers differ" in err


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_per_teacher_metrics_samples_and_bit_exact_resume(tmp_path):
    data = _write_rows(tmp_path / "rows.jsonl", ["a", "b", None])  # every third row: the default teacher (a)
    common = ["lmbda=0.5", "log_samples_steps=1"]
    assert _train(tmp_path, data, "straight", "max_steps=4", *common) == 0
    assert _train(tmp_path, data, "split", "max_steps=2", "save_steps=2", *common) == 0
    assert _train(tmp_path, data, "split", "max_steps=4", "resume_from_checkpoint=latest", *common) == 0
    straight, split = _lines(tmp_path / "straight" / "metrics.jsonl"), _lines(tmp_path / "split" / "metrics.jsonl")
    assert {r["on_policy"] for r in straight} == {0, 1}
    for r in straight:
        assert r["rows/a"] + r["rows/b"] == 4
        for name in ("a", "b"):
            assert (f"loss/{name}" in r) == (r[f"rows/{name}"] > 0)
    keys = ("step", "loss", "on_policy", "rows/a", "rows/b", "loss/a", "loss/b")
    assert [[r.get(k) for k in keys] for r in split] == [[r.get(k) for k in keys] for r in straight]  # exact
    samples = _lines(tmp_path / "straight" / "samples.jsonl")
    assert samples and all(s["teacher"] in ("a", "b") for s in samples)

