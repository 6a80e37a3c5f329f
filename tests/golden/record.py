"""Re-record the golden files of ``tests/test_golden.py`` (run from the repository root).

Only when a change is *meant* to alter training numbers: the golden files pin the metrics of the
tiny recipes and a MiniLLM checkpoint taken in the middle of a rollout buffer, so that refactors
provably change nothing.

    python tests/golden/record.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RECIPES = ("tiny", "minillm_tiny", "objectives_tiny", "gkd_reward_tiny")
CHECKPOINT_STEP = 3  # MiniLLM tiny: 2 minibatches × 2 PPO epochs per buffer, so step 3 is mid-buffer


def timeless(row: dict) -> dict:
    """A metrics.jsonl row without wall-clock values (they differ between runs)."""
    return {k: v for k, v in row.items() if not (k.startswith("time_") or k == "tokens_per_s")}


def run(recipe: str, output_dir: Path, *extra: str) -> list[dict]:
    from gkd.cli import main

    code = main(["train", str(ROOT / "recipes" / f"{recipe}.yaml"), f"output_dir={output_dir}",
                 "progress_bar=false", "save_final_model=false", *extra])
    assert code == 0, f"{recipe}: exit {code}"
    return [timeless(json.loads(line)) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GKD_CACHE"] = str(Path(tmp) / "cache")
        for recipe in RECIPES:
            rows = run(recipe, Path(tmp) / recipe)
            (HERE / f"{recipe}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = Path(tmp) / "minillm_ckpt"
        run("minillm_tiny", out, f"save_steps={CHECKPOINT_STEP}", "save_total_limit=1", f"max_steps={CHECKPOINT_STEP}")
        target = HERE / f"minillm_checkpoint-{CHECKPOINT_STEP}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out / f"checkpoint-{CHECKPOINT_STEP}", target)
    print(f"recorded {', '.join(RECIPES)} and {target.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
