"""DeepSpeed ZeRO-2 / ZeRO-3 with 2 CPU processes (gloo) through `accelerate launch`.

The first DeepSpeed start on a machine compiles a shared-memory comm op (~1 min, cached in
TORCH_EXTENSIONS_DIR); later starts take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
COMMON = ["progress_bar=false", "lmbda=0.5", "seed=3"]

pytest.importorskip("deepspeed")


def _ds_launch(stage: int, out: Path, *overrides: str, env_extra: dict | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "ds_configs" / f"accelerate_zero{stage}_cpu2.yaml"),
           "-m", "gkd.cli", "train", TINY, f"output_dir={out}", *COMMON, *overrides]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_lambda_agreement(rows: list[dict]) -> None:
    assert {r["on_policy"] for r in rows} == {0, 1}  # both kinds of steps happened
    for r in rows:  # every rank made the same decision at every step
        assert r["on_policy_ranks"] == 2 * r["on_policy"]


def test_zero2_gkd_two_processes(tmp_path):
    rows = _ds_launch(2, tmp_path / "z2", "max_steps=4", "save_final_model=false")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    _check_lambda_agreement(rows)


def test_zero3_gkd_runs_resumes_bit_identically_and_consolidates_the_model(tmp_path):
    # with a hidden-state objective, so the learned projection is sharded, checkpointed and restored too
    obj = "objectives=[0.8*jsd, 0.2*hidden_mse]"
    straight = _ds_launch(3, tmp_path / "straight", "max_steps=4", obj)
    _check_lambda_agreement(straight)
    # the split run also samples with per-layer gathers instead of one whole-model gather: same numbers
    split_dir, per_layer = tmp_path / "split", "zero3_gather_for_generation=false"
    _ds_launch(3, split_dir, "max_steps=2", "save_steps=2", "save_final_model=false", obj, per_layer)
    assert (split_dir / "checkpoint-2" / "COMPLETED").exists()
    split = _ds_launch(3, split_dir, "max_steps=4", "resume_from_checkpoint=latest", "save_final_model=false", obj,
                       per_layer)
    assert [(r["step"], r["loss"], r["loss_hidden_mse"], r["on_policy"]) for r in split] == \
        [(r["step"], r["loss"], r["loss_hidden_mse"], r["on_policy"]) for r in straight]
    # the final model is gathered from the ZeRO-3 shards into one Hugging Face folder
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]  # the projection is not exported
    assert all(p.numel() > 0 for p in model.parameters())
    assert model.config.model_type == "qwen2"


def test_zero3_minillm_teacher_mixed_sampling(tmp_path):
    # a cold model cache: rank 0 materialises the built-in models while rank 1 waits (once deadlocked
    # under ZeRO-3, whose partitioned init is a collective)
    rows = _ds_launch(3, tmp_path / "mini", "algorithm=minillm", "num_rollouts=16", "per_device_batch_size=4",
                      "ppo_epochs=2", "max_steps=4", "teacher_mix=0.2", "save_final_model=false",
                      "eval_steps=2", "eval_prompts=8", env_extra={"GKD_CACHE": str(tmp_path / "cold-cache")})
    assert [r["ppo_epoch"] for r in rows] == [0, 0, 1, 1]
    # held-out evaluation under ZeRO-3 (sharded teacher, gathered student, lockstep decoding)
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [2, 4]
    assert all(r["eval_reverse_kl"] >= 0 for r in rows if "eval_reverse_kl" in r)
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5)


def test_zero3_student_made_from_the_teacher(tmp_path):
    # rank 0 makes the pruned student outside zero.Init while rank 1 waits; both then load it partitioned
    out = tmp_path / "init"
    init = ["student=", "student_init={from: teacher, num_layers: 2}", "save_steps=1"]
    rows = _ds_launch(3, out, *init, "max_steps=2", env_extra={"GKD_CACHE": str(tmp_path / "cold-cache")})
    assert [r["step"] for r in rows] == [1, 2]
    made = json.loads((out / "student-init" / "GKD_COMPLETE").read_text())
    assert made["keep_layers"] == [0, 3]
    assert json.loads((out / "final" / "config.json").read_text())["num_hidden_layers"] == 2
    # resumed with another cache folder (as on another machine): the made student is found by its spec
    resumed = _ds_launch(3, out, *init, "max_steps=3", "resume_from_checkpoint=latest", "save_final_model=false")
    assert [r["step"] for r in resumed] == [1, 2, 3]
