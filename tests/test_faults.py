"""Faults lose nothing: SIGTERM checkpoints and exits 75; SIGKILL at any moment leaves a resumable run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gkd.checkpoint import complete_checkpoints, find_resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
STEPS = 40
ARGS = [f"max_steps={STEPS}", "per_device_batch_size=32", "lmbda=0.5", "progress_bar=false", "save_final_model=false"]
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
