"""Several teachers on two processes (gloo): kept apart from tests/test_multi_teacher.py because starting
three processes takes most of a minute on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_multi_teacher import _lines, _write_rows


def _launch(nproc: int, out: Path, data: Path, *overrides: str) -> list[dict]:
    """``gkd train`` under ``accelerate launch`` with ``nproc`` CPU processes (gloo), as tests/test_train.py."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "ACCELERATE_USE_CPU": "true"}
    mode = ["--multi_gpu"] if nproc > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "gkd.cli", "train", str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"),
           "teachers={a: builtin:tiny-teacher, b: builtin:tiny-student}", f"dataset={data}", "teacher=null",
           f"output_dir={out}", "progress_bar=false", "save_final_model=false", "max_new_tokens=6", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _lines(out / "metrics.jsonl")


def test_two_processes_equal_one_process_with_mixed_teachers(tmp_path):
    """2 ranks × 1 micro-batch == 1 rank × 2 micro-batches with rows of both teachers spread unevenly over the
    ranks (a rank may hold one teacher's rows only): the same global token mean, per-teacher losses and
    eval KLs, and no rank waits for a teacher call another rank skipped."""
    data = _write_rows(tmp_path / "rows.jsonl", ["a", "a", "b", None, "a"])
    common = ["max_steps=3", "per_device_batch_size=2", "lmbda=0.0", "eval_steps=3", "eval_prompts=4",
              "validation_size=8"]
    one = _launch(1, tmp_path / "one", data, *common, "gradient_accumulation_steps=2")
    two = _launch(2, tmp_path / "two", data, *common, "gradient_accumulation_steps=1")
    for a, b in zip(one, two, strict=True):
        assert a["rows/a"] == b["rows/a"] and a["rows/b"] == b["rows/b"]
        for key in ("loss", "loss/a", "loss/b", "eval_forward_kl", "eval_reverse_kl"):
            assert (key in a) == (key in b), key
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert "eval_forward_kl" in one[-1]
