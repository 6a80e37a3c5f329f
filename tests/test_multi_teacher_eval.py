"""Per-teacher KLs with several teachers (``teachers:``): ``gkd eval`` on a run's config and the ``eval_steps``
metrics route each held-out row to its own teacher and report the KLs overall and per teacher.

The reference is independent of the routing: for each teacher, a one-teacher evaluation (``teacher=``) of
just the rows routed to it. The routed evaluation's per-teacher KLs (on the student's own completions and
teacher-forced on the teacher's answers) must equal those, its overall KLs their token-weighted mean, and
each ``teacher:<name>`` entry the one-teacher run's ``teacher`` entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_model

from gkd.cli import main
from gkd.errors import InputError
from gkd.eval_command import load_teachers, run_eval

# rows without the column go to default_teacher (b)
ROUTES = ["a", "b", None, "a", "b"]


def _save(model, tokenizer, folder: Path) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gkd.task import build_tokenizer, make_problems

    tokenizer = build_tokenizer()
    d = tmp_path_factory.mktemp("mteval")
    folders = {"student": _save(tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11), tokenizer, d / "student"),
               "a": _save(tiny_model(tokenizer, hidden=64, seed=12), tokenizer, d / "a"),
               "b": _save(tiny_model(tokenizer, hidden=32, seed=13), tokenizer, d / "b")}
    rows = []
    for i, p in enumerate(make_problems(10, 2, seed=4)):
        row = {"prompt": p.prompt, "completion": p.completion}
        if ROUTES[i % len(ROUTES)] is not None:
            row["teacher"] = ROUTES[i % len(ROUTES)]
        rows.append(row)
    return d, folders, rows


COMMON = dict(split="all", batch_size=1, max_new_tokens=6, num_shown=0)


def test_gkd_eval_on_a_run_with_several_teachers_equals_one_teacher_runs_on_each_teachers_rows(setup, capsys):
    d, folders, rows = setup
    data = _write(d / "rows.jsonl", rows)
    config = d / "config.yaml"  # what a training run saves (the fields gkd eval reads)
    config.write_text(yaml.safe_dump({"teachers": {"a": folders["a"], "b": folders["b"]}, "teacher": None,
                                      "teacher_column": "teacher", "default_teacher": "b", "dataset": data,
                                      "max_new_tokens": 6}))
    out = d / "report.json"
    # batches of 4 rows mixing both teachers (the references: one row at a time, one teacher)
    assert main(["eval", "--model", folders["student"], "--config", str(config), "--split", "all", "--batch-size", "4",
                 "--show", "0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Per teacher" in printed and "| student | greedy | a |" in printed
    report = json.loads(out.read_text())
    assert report["teachers"] == {"a": folders["a"], "b": folders["b"]} and report["default_teacher"] == "b"
    student = next(r for r in report["results"] if r["model"] == "student")
    assert set(student["teachers"]) == {"a", "b"}
    fkl = rkl = tokens = 0.0
    for name in ("a", "b"):
        mine = [r for i, r in enumerate(rows) if (ROUTES[i % len(ROUTES)] or "b") == name]
        one = run_eval(folders["student"], teacher=folders[name], dataset=_write(d / f"{name}.jsonl", mine), **COMMON)
        ref = next(r for r in one["results"] if r["model"] == "student")
        got = student["teachers"][name]
        assert got["num_completions"] == len(mine)
        for key in ("forward_kl", "reverse_kl", "teacher_forced_forward_kl", "teacher_forced_reverse_kl"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (name, key)
        n = ref["completion_len_mean"] * ref["num_completions"]
        fkl, rkl, tokens = fkl + ref["forward_kl"] * n, rkl + ref["reverse_kl"] * n, tokens + n
        own = next(r for r in report["results"] if r["model"] == f"teacher:{name}")  # the teacher on its own rows
        ref_teacher = next(r for r in one["results"] if r["model"] == "teacher")
        for key in ("accuracy", "completion_len_mean", "num_completions", "rouge_l"):
            assert own[key] == pytest.approx(ref_teacher[key]), (name, key)
    assert student["forward_kl"] == pytest.approx(fkl / tokens, rel=1e-5)
    assert student["reverse_kl"] == pytest.approx(rkl / tokens, rel=1e-5)
    # --teacher names one teacher for every row (no per-teacher KLs)
    assert main(["eval", "--model", folders["student"], "--config", str(config), "--split", "all", "--show", "0",
                 "--teacher", folders["a"], "--output", str(d / "one.json")]) == 0
    one = json.loads((d / "one.json").read_text())
    assert "teachers" not in one and "teachers" not in one["results"][0] and one["results"][1]["model"] == "teacher"


def test_gkd_eval_refuses_an_unknown_teacher_in_a_row_and_a_served_teacher(setup, capsys):
    d, folders, rows = setup
    data = _write(d / "bad.jsonl", [*rows[:2], {**rows[2], "teacher": "z"}])
    config = d / "bad.yaml"
    config.write_text(yaml.safe_dump({"teachers": {"a": folders["a"], "b": folders["b"]}, "dataset": data}))
    capsys.readouterr()
    assert main(["eval", "--model", folders["student"], "--config", str(config), "--split", "all"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("gkd eval:") and "settings from" not in line]
    assert len(err) == 1 and "teacher='z'" in err[0] and "a, b" in err[0], err
    from gkd.task import build_tokenizer

    with pytest.raises(InputError, match=r"teachers: 'r' \(http://127.0.0.1:9\) is served"):
        load_teachers({"a": folders["a"], "r": "http://127.0.0.1:9"}, build_tokenizer())


def test_eval_steps_kls_per_teacher_equal_one_teacher_evaluations(setup):
    from gkd.evaluate import evaluate, evaluate_in_training
    from gkd.models import load_model
    from gkd.task import build_tokenizer
    from gkd.teachers import TeacherRouter

    _, folders, rows = setup
    tokenizer = build_tokenizer()
    student = load_model(folders["student"], "float32")
    teachers = {n: load_model(folders[n], "float32") for n in ("a", "b")}
    router = TeacherRouter(teachers, default="b")
    got = evaluate_in_training(student, tokenizer, rows, teacher=router, dataset="rows.jsonl", max_new_tokens=6,
                               max_prompt_length=64, gather_for_generation=False)
    for name in ("a", "b"):
        mine = [r for i, r in enumerate(rows) if (ROUTES[i % len(ROUTES)] or "b") == name]
        alone = evaluate(student, tokenizer, mine, teacher=teachers[name], max_new_tokens=6, max_prompt_length=64,
                         batch_size=1, num_samples=0)
        assert got[f"eval_forward_kl/{name}"] == pytest.approx(alone.forward_kl, rel=1e-4), name
        assert got[f"eval_reverse_kl/{name}"] == pytest.approx(alone.reverse_kl, rel=1e-4), name
    assert set(k for k in got if "/" in k) == {"eval_forward_kl/a", "eval_reverse_kl/a", "eval_forward_kl/b",
                                                "eval_reverse_kl/b"}


def test_training_logs_eval_kls_per_teacher(tmp_path):
    from test_multi_teacher import _lines, _train, _write_rows

    data = _write_rows(tmp_path / "rows.jsonl", ["a", "b"])
    assert _train(tmp_path, data, "run", "max_steps=1", "eval_steps=1", "eval_prompts=6", "validation_size=8") == 0
    last = _lines(tmp_path / "run" / "metrics.jsonl")[-1]
    names = {k.split("/", 1)[1] for k in last if k.startswith(("eval_forward_kl/", "eval_reverse_kl/"))}
    assert names and names <= {"a", "b"} and "eval_forward_kl" in last
