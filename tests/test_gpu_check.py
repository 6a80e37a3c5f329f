"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's every step on CPU at tiny sizes, so that the
script a scarce GPU session runs in one go cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--bundle", str(tmp_path / "gpu.tgz")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    assert {"environment", "gpu_tests", "real_pair", "loss_memory", "rollout", "total"} <= set(steps)
    assert all(s["rc"] == 0 for s in steps.values())
    summary = (out / "summary.md").read_text()
    for words in ("GPU tests | 5 run, 0 failed", "real pair (tiny", "gkd / TRL step time", "loss memory",
                  "best teacher-mixed / (plain + scoring)"):
        assert words in summary, words
    pair = json.loads((out / "real_pair.json").read_text())
    assert pair["summary"]["gkd"]["step_s"] > 0 and pair["summary"]["trl"]["tokens_per_s"] > 0
    assert (tmp_path / "gpu.tgz").stat().st_size > 0


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
