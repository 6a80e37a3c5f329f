"""End to end: `gkd train` on the tiny recipe, gradient accumulation and 2-process equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_recipe_trains_and_loss_decreases(tmp_path):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "progress_bar=false"]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for key in ("loss", "on_policy", "completion_len_mean", "lr", "tokens_per_s", "time_rollout", "time_score",
                "time_update"):
        assert key in rows[0]
    assert {r["on_policy"] for r in rows} == {0, 1}  # λ=0.5 mixes both kinds of steps
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (out / "config.yaml").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").eos_token == "<eos>"
    assert model.config.model_type == "qwen2"


@pytest.mark.parametrize("lmbda", ["0.0", "1.0"])
def test_lambda_endpoints(tmp_path, lmbda):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", f"lmbda={lmbda}", "max_steps=3", "progress_bar=false",
                 "save_final_model=false"]) == 0
    assert {r["on_policy"] for r in _metrics(out)} == {int(float(lmbda))}


def test_seq_kd_and_kd_objectives_run(tmp_path):
    """From the command line; their maths is checked by hand in tests/test_objective_reference.py. Here:
    the settings reach the run (seq_kd's off-policy completions are the teacher's, not the references;
    the kd loss moves with kd_weight)."""
    runs = {}
    for extra in (["lmbda=0"], ["seq_kd=true", "lmbda=0"], ["divergence=kd", "kd_weight=0.5", "lmbda=0"],
                  ["divergence=kd", "kd_weight=1.0", "lmbda=0"], ["reduction=sequence_mean", "lmbda=0"]):
        out = tmp_path / "_".join(extra).replace("=", "-")
        assert main(["train", TINY, f"output_dir={out}", "max_steps=2", "progress_bar=false",
                     "save_final_model=false", *extra]) == 0
        runs[" ".join(extra)] = rows = _metrics(out)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and all(r["on_policy"] == 0 for r in rows)
    ref, seqkd = runs["lmbda=0"], runs["seq_kd=true lmbda=0"]
    assert [r["completion_len_mean"] for r in seqkd] != [r["completion_len_mean"] for r in ref]
    assert seqkd[0]["loss"] != pytest.approx(ref[0]["loss"], rel=1e-3)
    kd_half, kd_soft = runs["divergence=kd kd_weight=0.5 lmbda=0"], runs["divergence=kd kd_weight=1.0 lmbda=0"]
    assert kd_half[0]["loss"] != pytest.approx(kd_soft[0]["loss"], rel=1e-3)
    assert kd_half[0]["completion_len_mean"] == ref[0]["completion_len_mean"]  # the same reference batch
    # builtin:addition's references all have one length, so sequence_mean equals the token mean here (its
    # difference on unequal lengths: tests/test_objective_reference.py)
    assert runs["reduction=sequence_mean lmbda=0"][0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-5)


def test_config_errors_exit_nonzero_with_one_line(tmp_path, capsys):
    assert main(["train", TINY, "lamda=0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'lmbda'" in err


def test_checkpoint_is_written_with_completed_marker(tmp_path):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=2", "save_steps=2", "progress_bar=false",
                 "save_final_model=false"]) == 0
    ckpt = out / "checkpoint-2"
    assert (ckpt / "COMPLETED").exists() and (ckpt / "trainer_state.json").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2


def _launch(nproc: int, out: Path, *overrides: str) -> list[dict]:
    # accelerate runs several CPU processes (gloo) when launched like multi-GPU with ACCELERATE_USE_CPU set;
    # plain `--cpu --num_processes 2` starts only one process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "ACCELERATE_USE_CPU": "true"}
    mode = ["--multi_gpu"] if nproc > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "gkd.cli", "train", TINY, f"output_dir={out}", "progress_bar=false", "save_final_model=false",
           *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(out)


def test_two_processes_equal_one_process_with_gradient_accumulation(tmp_path):
    """2 ranks × 1 micro-batch == 1 rank × 2 accumulated micro-batches: same samples per step, same
    global-token-mean loss, so the same λ draws and per-step losses (off- and on-policy steps)."""
    common = ["max_steps=4", "per_device_batch_size=4", "lmbda=0.0", "eval_steps=2", "eval_prompts=16"]
    one = _launch(1, tmp_path / "one", *common, "gradient_accumulation_steps=2")
    two = _launch(2, tmp_path / "two", *common, "gradient_accumulation_steps=1")
    assert [r["on_policy"] for r in one] == [r["on_policy"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["completion_len_mean"] == pytest.approx(b["completion_len_mean"])
    # held-out evaluation: 16 prompts on one process == 8 + 8 on two, summed over ranks
    evals = [(a, b) for a, b in zip(one, two, strict=True) if "eval_accuracy" in a]
    assert [a["step"] for a, _ in evals] == [2, 4] and all("eval_accuracy" in b for _, b in evals)
    for a, b in evals:
        for key in ("eval_accuracy", "eval_len", "eval_rouge_l"):
            assert a[key] == pytest.approx(b[key]), key
        for key in ("eval_reverse_kl", "eval_forward_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), key


def test_minillm_two_processes_with_gradient_accumulation(tmp_path):
    """The rollout buffer, global whitening and PPO epochs run in lockstep on 2 ranks with accumulation."""
    rows = _launch(2, tmp_path / "mini", "algorithm=minillm", "num_rollouts=16", "per_device_batch_size=4",
                   "gradient_accumulation_steps=2", "ppo_epochs=2", "max_steps=4", "teacher_mix=0.2")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["ppo_epoch"] for r in rows] == [0, 1, 0, 1]
    assert all(abs(r["loss"]) < 1e3 for r in rows)


def test_eval_steps_log_held_out_metrics_that_match_gkd_eval(tmp_path):
    """eval_steps evaluates the student on held-out prompts during training; the last evaluation equals
    an independent evaluate() of the saved final model on the same rows."""
    from gkd.data import load_rows
    from gkd.evaluate import evaluate
    from gkd.task import check_answer, resolve_model_path
    from gkd.trainer import load_model, load_tokenizer

    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=3", "eval_steps=2", "eval_prompts=24",
                 "progress_bar=false", "logging_steps=10"]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [2, 3]  # logged at every evaluation, whatever logging_steps says
    for r in rows:
        assert 0 <= r["eval_accuracy"] <= 1 and r["eval_reverse_kl"] >= 0 and r["eval_forward_kl"] >= 0
        assert 0 < r["eval_len"] <= 9 and 0 <= r["eval_rouge_l"] <= 1
    tokenizer = load_tokenizer(str(out / "final"))
    held = load_rows("builtin:addition", tokenizer, num_examples=2000, max_digits=4, seed=0, part="validation")[:24]
    ref = evaluate(load_model(str(out / "final")), tokenizer, held, check_answer,
                   teacher=load_model(resolve_model_path("builtin:tiny-teacher")), max_new_tokens=9)
    last = rows[-1]
    assert last["eval_accuracy"] == pytest.approx(ref.accuracy)
    assert last["eval_len"] == pytest.approx(ref.completion_len_mean)
    assert last["eval_reverse_kl"] == pytest.approx(ref.reverse_kl, rel=1e-4)
    assert last["eval_forward_kl"] == pytest.approx(ref.forward_kl, rel=1e-4)


def test_eval_steps_needs_a_validation_part(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) for i in range(20)))
    assert main(["train", TINY, f"output_dir={tmp_path / 'run'}", f"dataset={data}", "eval_steps=2",
                 "progress_bar=false"]) == 2
    assert "validation_size" in capsys.readouterr().err
