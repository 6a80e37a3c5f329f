"""MiniLLM and the reward term through the trainer (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from gkd.algorithms.gkd import group_baseline_advantages
from gkd.algorithms.minillm import minillm_advantages
from gkd.cli import main
from gkd.config import ConfigError, GKDConfig
from gkd.evaluate import evaluate
from gkd.rewards import RewardError
from gkd.rollout import Rollout
from gkd.task import check_answer, split_problems
from gkd.trainer import GKDTrainer

ROOT = Path(__file__).resolve().parents[1]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_minillm_lowers_reverse_kl_to_the_teacher_on_held_out_prompts(tmp_path, tokenizer):
    teacher = tiny_model(tokenizer, "llama", hidden=64, seed=11)
    with torch.no_grad():  # a peaked teacher: large, learnable reverse KL from a near-uniform student
        teacher.lm_head.weight.mul_(6.0)
    student = tiny_model(tokenizer, "qwen2", hidden=32, seed=12)
    _, held = split_problems(10, 48, max_digits=4, seed=5)
    prompts = [p.prompt for p in held]
    before = evaluate(student, tokenizer, prompts, check_answer, teacher=teacher, max_new_tokens=9)
    cfg = GKDConfig(algorithm="minillm", student="unused", teacher="unused", num_train_examples=512,
                    max_new_tokens=9, num_rollouts=32, ppo_epochs=2, per_device_batch_size=16, max_steps=24,
                    learning_rate=3e-3, lr_scheduler="constant", output_dir=str(tmp_path / "run"), progress_bar=False,
                    save_final_model=False)
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer)
    history = trainer.train()
    assert len(history) == 24 and {h["ppo_epoch"] for h in history} == {0, 1}
    after = evaluate(trainer.accelerator.unwrap_model(trainer.student), tokenizer, prompts, check_answer,
                     teacher=teacher, max_new_tokens=9)
    assert after.reverse_kl < 0.7 * before.reverse_kl, (before.reverse_kl, after.reverse_kl)
    # the first update of every buffer is on-policy: q_θ = q_old exactly
    assert history[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    # speculative teacher-mixed sampling (default 4 drafts per teacher pass) reports how it went
    assert 1 - cfg.teacher_mix - 0.05 <= history[0]["mix_draft_accept"] <= 1  # ≥ 1 − mix in expectation
    assert 1 <= history[0]["mix_tokens_per_teacher_pass"] <= cfg.mix_draft_tokens


def test_minillm_recipe_runs_from_the_cli(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / "minillm_tiny.yaml"), f"output_dir={out}", "progress_bar=false",
                 "max_steps=4", "save_final_model=false"]) == 0
    rows = _metrics(out)
    for key in ("loss", "pg", "single_step", "ratio", "token_reward_mean", "time_rollout"):
        assert key in rows[0]
    # 16 rollouts in minibatches of 8, 2 PPO epochs: one buffer of 4 steps, its rewards shared
    assert [r["ppo_epoch"] for r in rows] == [0, 0, 1, 1]
    assert len({r["token_reward_mean"] for r in rows}) == 1
    # the first update of a buffer sees the student that sampled it: q_θ = q_old, ratio exactly 1
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and rows[0]["clip_frac"] == 0.0
    assert any(abs(r["ratio"] - 1.0) > 1e-4 for r in rows[1:])  # later minibatches see an updated student
    for r in rows:  # loss = PPO long-term term + α·single_step_coef·single-step KL (α = coef = 1 here)
        assert r["loss"] == pytest.approx(r["pg"] + r["single_step"], rel=1e-5)
        assert r["single_step"] > 0 and 0.0 <= r["clip_frac"] <= 1.0 and 0.0 < r["mix_draft_accept"] <= 1.0


def test_user_reward_enters_the_return_at_the_final_token():
    zeros = torch.zeros(2, 4)
    r = Rollout(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.bool),
                completion_ids=torch.ones(2, 4, dtype=torch.long),
                completion_mask=torch.tensor([[True, True, True, False], [True, True, True, True]]),
                sampled_logprobs=zeros, teacher_logprobs=zeros, mixed_logprobs=zeros,
                rewards=torch.tensor([1.0, 2.0]), reward_mask=torch.tensor([True, False]))
    (advantages,), _ = minillm_advantages([r], alpha=0.5, reward_scale=1.0, gamma=1.0, include_current=False,
                                          length_normalized=True, whiten_advantages=False)
    # row 0: final reward 0.5·1 at t=2; paper-form returns average the later tokens: 0.5/2, 0.5/1, 0
    assert advantages.tolist() == [[0.25, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # row 1: reward masked out


def test_gkd_with_group_baseline_reward_term(tmp_path):
    """The logged loss is α·divergence + (1 − α)·reward_pg with α = 0.3 and a reward term that is not 0
    (the partial-credit reward differs between samples); the reward is the weighted sum of the functions'."""
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / "gkd_reward_tiny.yaml"), f"output_dir={out}", "progress_bar=false",
                 "max_steps=3", "save_final_model=false", "alpha=0.3"]) == 0
    rows = _metrics(out)
    assert all(r["on_policy"] == 1 for r in rows)
    assert any(r["reward_pg"] != 0 for r in rows) and all(r["reward"] > 0 for r in rows)
    for r in rows:
        assert r["loss"] == pytest.approx(0.3 * r["divergence"] + 0.7 * r["reward_pg"], rel=1e-5, abs=1e-8)
        assert r["reward"] == pytest.approx(r["reward/gkd.task:exact_match_reward"]
                                            + r["reward/gkd.task:digit_match_reward"], rel=1e-6)


def test_group_baseline_is_the_mean_of_each_prompts_samples():
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 9.0])
    mask = torch.tensor([True, True, True, True, True, False])
    assert group_baseline_advantages(rewards, mask, 2).tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_failing_reward_function_stops_with_its_name(tmp_path, capsys):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def reward(prompts, completions, **kw):\n    return [float('nan')] * len(prompts)\n")
    code = main(["train", str(ROOT / "recipes" / "tiny.yaml"), f"output_dir={tmp_path / 'run'}", "lmbda=1",
                 f"reward_funcs=['{bad}:reward']", "alpha=0.5", "max_steps=1", "progress_bar=false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "reward" in err and "prompt index 0" in err


def test_lm_loss_on_a_separate_dataset(tmp_path):
    lm = tmp_path / "lm.jsonl"
    lm.write_text("".join(json.dumps({"prompt": "<bos>1+2=", "completion": "30000000"}) + "\n" for _ in range(20)))
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes" / "minillm_tiny.yaml"), f"output_dir={out}", "progress_bar=false",
                 "max_steps=2", f"lm_dataset={lm}", "lm_coef=0.5", "save_final_model=false"]) == 0
    rows = _metrics(out)
    assert all(r["lm"] > 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["pg"] + rows[0]["single_step"] + 0.5 * rows[0]["lm"], rel=1e-4)


def test_buffer_arithmetic_error_explains_itself():
    cfg = GKDConfig(algorithm="minillm", student="builtin:tiny-student", teacher="builtin:tiny-teacher",
                    num_rollouts=12, per_device_batch_size=8, progress_bar=False)
    with pytest.raises(ConfigError, match=r"num_rollouts=12 must be a multiple of .* = 8 × 1 × 1 = 8"):
        GKDTrainer(cfg)


def test_reward_error_type_is_a_value_error():
    assert issubclass(RewardError, ValueError)
