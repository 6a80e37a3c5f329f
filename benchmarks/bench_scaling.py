"""Step time of the tiny recipe: 1 process vs 2 processes (DDP, DeepSpeed ZeRO-2, ZeRO-3) on CPU.

Run by hand:  python benchmarks/bench_scaling.py [--steps 20]
Prints one table and writes benchmarks/results/scaling.json. On a 2-core machine, 2 processes share
the cores, so this measures overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {
    "1 process": ["--cpu", "--num_processes", "1"],
    "2 processes DDP": ["--multi_gpu", "--num_processes", "2"],
    "2 processes ZeRO-2": ["--config_file", str(ROOT / "ds_configs" / "accelerate_zero2_cpu2.yaml")],
    "2 processes ZeRO-3": ["--config_file", str(ROOT / "ds_configs" / "accelerate_zero3_cpu2.yaml")],
    "2 processes ZeRO-3, per-layer gathers while sampling": [
        "--config_file", str(ROOT / "ds_configs" / "accelerate_zero3_cpu2.yaml")],
}
EXTRA = {"2 processes ZeRO-3, per-layer gathers while sampling": ["zero3_gather_for_generation=false"]}


def run(name: str, launch: list[str], steps: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true" if "DDP" in name else "false"}
    if "1 process" in name:
        env["OMP_NUM_THREADS"] = "2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_machines", "1",
           "--dynamo_backend", "no", "-m", "gkd.cli", "train", str(ROOT / "recipes" / "tiny.yaml"),
           f"output_dir={out}", f"max_steps={steps}", "progress_bar=false", "save_final_model=false",
           "per_device_batch_size=8", *EXTRA.get(name, [])]
    if "DeepSpeed" not in name and "ZeRO" not in name:
        cmd.insert(cmd.index("--num_machines"), "--mixed_precision")
        cmd.insert(cmd.index("--num_machines"), "no")
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]  # skip warm-up
    on = [r["time_step"] for r in rows if r["on_policy"]]
    off = [r["time_step"] for r in rows if not r["on_policy"]]
    return {"setup": name, "median_step_s": statistics.median(r["time_step"] for r in rows),
            "median_on_policy_s": statistics.median(on) if on else None,
            "median_off_policy_s": statistics.median(off) if off else None,
            "prompts_per_step": 8 * (1 if "1 process" in name else 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, launch in SETUPS.items():
            results.append(run(name, launch, args.steps, Path(tmp) / name.replace(" ", "_")))
    print("| setup | prompts/step | median step (s) | on-policy step (s) | off-policy step (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"| {r['setup']} | {r['prompts_per_step']} | {fmt(r['median_step_s'])} | "
              f"{fmt(r['median_on_policy_s'])} | {fmt(r['median_off_policy_s'])} |")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
