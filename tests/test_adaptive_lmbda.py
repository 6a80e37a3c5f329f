"""lmbda_schedule: adaptive (DistiLLM's adaptive off-policy share, gkd.adaptive_lmbda): the rule by hand,
its validation loss against gkd.evaluate's teacher-forced KL, λ in training, and bit-exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gkd.adaptive_lmbda import AdaptiveLambda
from gkd.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
COMMON = ["progress_bar=false", "save_final_model=false", "per_device_batch_size=4", "max_new_tokens=7",
          "lmbda_schedule=adaptive", "lmbda=0", "lmbda_step=0.5", "lmbda_check_steps=2", "lmbda_val_prompts=8",
          "log_samples_steps=0"]


def test_rule_by_hand():
    """Improved = below the best by more than the tolerance; otherwise λ += step, capped; never down."""
    rule = AdaptiveLambda(lmbda=0.0, step=0.25, max_lmbda=0.6, tolerance=0.05)
    trace = [rule.update(v) for v in [1.0, 0.9, 0.88, 0.7, 0.71, math.nan, 0.1, 0.5]]
    assert trace == [0.0, 0.0, 0.25, 0.25, 0.5, 0.6, 0.6, 0.6]
    assert rule.best == 0.1 and rule.checks == 8 and rule.raised
    again = AdaptiveLambda(lmbda=0.0, step=0.25)
    again.load_state_dict(rule.state_dict())
    assert again.state_dict() == rule.state_dict()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lambda_rises_when_the_validation_loss_stalls_and_the_loss_is_the_teacher_forced_kl(tokenizer, tmp_path):
    """A tolerance no loss can beat: the first check sets the baseline, every later one raises λ by 0.5
    (steps 1-2 off-policy, 3-4 at λ = 0.5, 5-6 on-policy). The first check's loss is gkd.evaluate's
    teacher-forced KL(teacher‖student) of the initial student on the same held-out references."""
    from gkd.config import load_config
    from gkd.evaluate import teacher_forced_kl
    from gkd.trainer import GKDTrainer

    cfg = load_config(TINY, [*COMMON, f"output_dir={tmp_path / 'run'}", "max_steps=6", "lmbda_tolerance=100"])
    trainer = GKDTrainer(cfg)
    rows = trainer.parts.validation_rows
    assert len(rows) == 8 and all(r.get("completion") for r in rows)
    expected, _ = teacher_forced_kl(trainer.accelerator.unwrap_model(trainer.student), trainer.teacher,
                                    trainer.tokenizer, rows, max_new_tokens=cfg.max_new_tokens,
                                    max_prompt_length=cfg.max_prompt_length, batch_size=4)
    history = trainer.train()
    assert [h["lmbda"] for h in history] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert [h["on_policy"] for h in history][:2] == [0, 0] and [h["on_policy"] for h in history][4:] == [1, 1]
    assert [("lmbda_val_loss" in h) for h in history] == [True, False, True, False, True, False]
    assert history[0]["lmbda_val_loss"] == pytest.approx(expected, rel=1e-5)
    assert history[0]["lmbda_val_best"] == history[0]["lmbda_val_loss"]
    assert history[4]["lmbda_val_best"] == history[0]["lmbda_val_loss"]  # never improved by > 100 nats


def test_adaptive_lambda_resumes_bit_exactly(tmp_path):
    """Stopped at step 3 (between checks at 2 and 4) and resumed: the same losses, λ, coins and
    validation losses as the uninterrupted run (λ, best and checks come back from the checkpoint)."""
    extra = ["lmbda_tolerance=0.01", "max_steps=8"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", TINY, f"output_dir={straight}", *COMMON, *extra]) == 0
    assert main(["train", TINY, f"output_dir={split}", *COMMON, "max_steps=3", "save_steps=3",
                 "lmbda_tolerance=0.01"]) == 0
    assert main(["train", TINY, f"output_dir={split}", *COMMON, *extra, "resume_from_checkpoint=latest"]) == 0
    keys = ("step", "loss", "on_policy", "lmbda", "lmbda_val_loss", "lmbda_val_best")
    a, b = _metrics(straight), _metrics(split)
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    assert a[-1]["lmbda"] > 0  # λ did move in this run: the state that had to survive the restart is not trivial


@pytest.mark.parametrize("fields, words", [
    (dict(lmbda_schedule="adaptive"), "lmbda_check_steps"),
    (dict(lmbda_schedule="adaptive", lmbda_check_steps=2, lmbda=0.5, lmbda_end=0.2), "below it"),
    (dict(lmbda_schedule="adaptive", lmbda_check_steps=2, lmbda_step=0.0), "lmbda_step"),
    (dict(lmbda_schedule="adaptive", lmbda_check_steps=2, algorithm="minillm"), "algorithm=gkd"),
    (dict(lmbda_schedule="adaptive", lmbda_check_steps=2, teacher="http://127.0.0.1:1", divergence="sampled_reverse_kl"),
     "set teacher_topk"),
])
def test_adaptive_settings_are_checked(fields, words):
    from gkd.config import ConfigError, GKDConfig

    with pytest.raises(ConfigError, match=words):
        GKDConfig(**{"teacher": "t", "student": "s", **fields})


def test_two_processes_agree_on_lambda(tmp_path):
    """2 CPU ranks (gloo, ~20 s): the validation loss is summed over ranks and rank 0's λ is broadcast, so
    both ranks take every coin alike (on_policy_ranks is 0 or 2, never 1), with SKD's lockstep sampling."""
    from test_train import _launch

    rows = _launch(2, tmp_path / "two", "max_steps=4", "per_device_batch_size=4", "lmbda_schedule=adaptive", "lmbda=0",
                   "lmbda_step=0.5", "lmbda_check_steps=2", "lmbda_val_prompts=8", "lmbda_tolerance=100",
                   "rollout=skd", "skd_top_k=3", "max_new_tokens=7", "log_samples_steps=0")
    assert [r["lmbda"] for r in rows] == [0.0, 0.0, 0.5, 0.5]
    assert [("lmbda_val_loss" in r) for r in rows] == [True, False, True, False]
    assert all(r["on_policy_ranks"] == 2 * r["on_policy"] for r in rows)
