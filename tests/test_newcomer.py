"""What a newcomer following the docs trips over (issue 17): reruns into one output_dir, overrides on
resume, a diverged student on on-policy steps, the demo's output, sample logs, quiet output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
QUIET = ["progress_bar=false", "save_final_model=false"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _last_err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_second_run_into_the_same_output_dir_is_refused_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=3", *QUIET]) == 0
    capsys.readouterr()
    assert main(["train", TINY, f"output_dir={out}", "max_steps=2", *QUIET]) == 2
    err = _last_err(capsys)
    assert "already holds a run (" in err and "metrics.jsonl" in err and "resume_from_checkpoint=latest" in err
    assert "overwrite_output_dir=true" in err and len(_metrics(out)) == 3  # nothing touched
    assert main(["train", TINY, f"output_dir={out}", "max_steps=2", "overwrite_output_dir=true", *QUIET]) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2]  # one run's lines, not two runs piled up


def test_overrides_on_resume_take_effect_or_are_refused(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=2", "save_steps=2", *QUIET]) == 0
    assert _metrics(out)[-1]["lr"] == pytest.approx(3e-3)
    capsys.readouterr()
    # the batch shape belongs to the checkpoint: refused, naming the field
    assert main(["train", TINY, f"output_dir={out}", "max_steps=4", "per_device_batch_size=4",
                 "resume_from_checkpoint=latest", *QUIET]) == 2
    assert "cannot resume with changed per_device_batch_size (8 → 4)" in _last_err(capsys)
    # the learning rate and max_steps: applied, and said
    with caplog.at_level("WARNING", logger="gkd"):
        assert main(["train", TINY, f"output_dir={out}", "max_steps=4", "learning_rate=1e-4",
                     "resume_from_checkpoint=latest", *QUIET]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows[2:]] == [pytest.approx(1e-4)] * 2
    assert "learning_rate 0.003 → 0.0001" in caplog.text and "max_steps 2 → 4" in caplog.text


def test_a_diverged_student_skips_on_policy_steps_and_exits_3(tmp_path, capsys):
    code = main(["train", TINY, f"output_dir={tmp_path / 'run'}", "lmbda=0.5", "learning_rate=1e30", "max_steps=20",
                 *QUIET])
    err = _last_err(capsys)
    assert code == 3 and "consecutive steps skipped for non-finite student logits" in err, err
    rows = _metrics(tmp_path / "run")
    assert any(r["skipped"] and r["on_policy"] for r in rows)  # on-policy steps skip instead of crashing


def test_samples_say_where_the_completion_came_from(tmp_path):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=6", "log_samples_steps=1", *QUIET]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["on_policy"] for r in _metrics(out)}
    assert {s["source"] for s in samples} == {"student", "reference"}
    for s in samples:
        assert s["source"] == ("student" if steps[s["step"]] else "reference")


def test_gkd_help_loads_no_heavy_module():
    code = ("import sys, gkd.cli; gkd.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    demo = subprocess.run([sys.executable, "-m", "gkd.cli", "demo", "--help"], capture_output=True, text=True, timeout=60)
    assert "default: runs/demo" in demo.stdout and "--no-progress" in demo.stdout and "--seed" in demo.stdout


def test_quick_demo_prints_its_folders_and_little_else(tmp_path):
    env = {**__import__("os").environ, "GKD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "gkd.cli", "demo", "--quick", "--output-dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert len(out.encode()) < 10_000, len(out.encode())  # no progress bars into a pipe
    assert "teacher model:" in proc.stdout and str(tmp_path / "demo" / "student-warmup" / "final") in proc.stdout
    assert "Setting accelerator to CPU" not in out


def test_reward_function_missing_a_column_is_told_so():
    from gkd.rewards import RewardError, RewardFunctions

    def needs_answer(prompts, completions, answer, **kwargs):
        return [1.0] * len(prompts)

    with pytest.raises(RewardError, match="needs 'answer', which no dataset column supplies .*add that column"):
        RewardFunctions.from_specs([needs_answer])(["p"], ["c"], [[1]], [{"prompt": "p"}])


def test_model_card_lists_each_tag_once(tmp_path):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=1", "progress_bar=false"]) == 0
    tags = next(line for line in (out / "final" / "README.md").read_text().splitlines() if line.startswith("tags:"))
    assert tags == "tags: [gkd, knowledge-distillation]"


def test_a_run_that_applied_no_update_fails(tmp_path, tokenizer):
    """Fewer steps than max_consecutive_skips, every one skipped (a NaN teacher): not "done", exit 3."""
    import torch
    from conftest import tiny_model

    from gkd.config import GKDConfig
    from gkd.errors import NonFiniteError
    from gkd.trainer import GKDTrainer

    teacher = tiny_model(tokenizer, hidden=64, seed=2)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(float("nan"))
    cfg = GKDConfig(teacher="t", student="s", num_train_examples=64, max_new_tokens=9, per_device_batch_size=4,
                    max_steps=3, lmbda=0.0, output_dir=str(tmp_path / "run"), progress_bar=False)
    trainer = GKDTrainer(cfg, student=tiny_model(tokenizer, seed=1), teacher=teacher, tokenizer=tokenizer)
    with pytest.raises(NonFiniteError, match="non-finite teacher logits"):
        trainer.train()
    assert not (tmp_path / "run" / "final").exists()


def test_minillm_with_top_k_trains(tmp_path):
    """The recipe that used to skip every step: MiniLLM with top_k, whose reward log p of a token outside
    the teacher's top-k was −inf."""
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / "minillm_tiny.yaml"), f"output_dir={out}", "top_k=3", "max_steps=4",
                 *QUIET]) == 0
    assert [r["skipped"] for r in _metrics(out)] == [0, 0, 0, 0]
