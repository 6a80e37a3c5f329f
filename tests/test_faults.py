"""Faults lose nothing: SIGTERM checkpoints and exits 75; SIGKILL at any moment leaves a resumable run."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gkd.checkpoint import complete_checkpoints, find_resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
STEPS = 30
ARGS = [f"max_steps={STEPS}", "per_device_batch_size=16", "lmbda=0.5", "progress_bar=false", "save_final_model=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gkd.cli", "train", TINY, f"output_dir={out}", *ARGS, *extra]


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _wait_for_lines(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < end and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[tuple[int, float]]:
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(_cmd(out), env=ENV, check=True, capture_output=True, timeout=600)
    return _losses(out)


def test_sigterm_saves_exits_75_and_resumes_to_the_same_losses(tmp_path, straight):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "resume_from_checkpoint=latest" in err and "SIGTERM" in err
    saved = complete_checkpoints(out)
    assert saved and int(saved[-1].name.split("-")[1]) < STEPS
    done = subprocess.run(_cmd(out, "resume_from_checkpoint=latest"), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(out) == straight


def test_sigkill_at_random_moments_never_breaks_resume(tmp_path, straight):
    out = tmp_path / "run"
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen(_cmd(out, "save_steps=1", "save_total_limit=2", "resume_from_checkpoint=latest"),
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        already = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
        _wait_for_lines(out, already + rng.randint(1, 4), proc)
        time.sleep(rng.uniform(0.0, 0.3))  # land anywhere: inside a step, a save, a rotation
        proc.kill()
        proc.wait()
        ckpt = find_resume_checkpoint("latest", out)
        assert ckpt is None or (ckpt / "trainer_state.json").exists()
    done = subprocess.run(_cmd(out, "save_steps=1", "save_total_limit=2", "resume_from_checkpoint=latest"),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(out) == straight


class _FlakyTeacher(torch.nn.Module):
    """A teacher whose logits are NaN on chosen forward calls (counted per scoring call)."""

    def __init__(self, inner: torch.nn.Module, bad_calls: set[int] | None = None, always: bool = False):
        super().__init__()
        self.inner, self.bad_calls, self.always, self.calls = inner, bad_calls or set(), always, 0
        self.config = inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kw):
        out = self.inner(**kw)
        if not kw.get("use_cache", False):  # a scoring pass, not a decoding step
            self.calls += 1
            if self.always or self.calls in self.bad_calls:
                out.logits = torch.full_like(out.logits, float("nan"))
        return out


def _trainer(tmp_path, teacher, **overrides):
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    values = dict(student="builtin:tiny-student", teacher="builtin:tiny-teacher", lmbda=0.0, max_new_tokens=9,
                  num_train_examples=256, per_device_batch_size=8, max_steps=4, learning_rate=3e-3,
                  output_dir=str(tmp_path / "run"), progress_bar=False, save_final_model=False,
                  log_samples_steps=0)  # the flaky teacher counts its forward calls: no extra sample scoring
    cfg = GKDConfig(**{**values, **overrides})
    return GKDTrainer(cfg, teacher=teacher, tokenizer=None)


def test_nan_teacher_logits_skip_the_step_without_touching_weights(tmp_path):
    from gkd.trainer import load_model

    teacher = _FlakyTeacher(load_model("builtin:tiny-teacher"), bad_calls={2})
    trainer = _trainer(tmp_path, teacher)
    metrics = [trainer.train_step()]
    before = [p.detach().clone() for p in trainer.student.parameters()]
    metrics.append(trainer.train_step())  # teacher NaN here
    after = [p.detach().clone() for p in trainer.student.parameters()]
    metrics += [trainer.train_step(), trainer.train_step()]
    assert [m["skipped"] for m in metrics] == [0, 1, 0, 0]
    assert metrics[-1]["skipped_total"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the bad step changed nothing
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
    assert math.isfinite(metrics[-1]["loss"])


def test_consecutive_non_finite_steps_stop_with_a_clear_message(tmp_path):
    from gkd.trainer import NonFiniteError, load_model

    teacher = _FlakyTeacher(load_model("builtin:tiny-teacher"), bad_calls={3, 4, 5, 6})
    trainer = _trainer(tmp_path, teacher, max_consecutive_skips=3, save_steps=1, max_steps=10)
    with pytest.raises(NonFiniteError, match=r"step 5: 3 consecutive steps skipped for non-finite teacher logits"
                                             r".*teacher_dtype.*checkpoint-2 is intact"):
        trainer.train()
    # the last good checkpoint loads and was written before the NaNs started
    assert find_resume_checkpoint("latest", tmp_path / "run").name == "checkpoint-2"
