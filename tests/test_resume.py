"""Checkpoints: exact resume, torn checkpoints skipped, rotation."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from gkd.checkpoint import MARKER, complete_checkpoints, find_resume_checkpoint
from gkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
MINILLM = str(ROOT / "recipes" / "minillm_tiny.yaml")
COMMON = ["progress_bar=false", "save_final_model=false", "lmbda=0.5"]


def _losses(out: Path) -> list[tuple[int, float, int]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["on_policy"]) for r in rows]


@pytest.mark.parametrize("recipe, total, half, extra", [
    (TINY, 8, 4, ["max_new_tokens=9"]),
    (MINILLM, 8, 4, ["num_rollouts=16", "ppo_epochs=2"]),  # 4 steps per rollout buffer: resume at a boundary
    (MINILLM, 8, 3, ["num_rollouts=16", "ppo_epochs=2"]),  # ... and in the middle of a buffer's PPO epochs
])
def test_resume_gives_bit_identical_losses(tmp_path, recipe, total, half, extra):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", recipe, f"output_dir={straight}", f"max_steps={total}", *COMMON, *extra]) == 0
    assert main(["train", recipe, f"output_dir={split}", f"max_steps={half}", f"save_steps={half}", *COMMON, *extra]) == 0
    assert main(["train", recipe, f"output_dir={split}", f"max_steps={total}", "resume_from_checkpoint=latest",
                 *COMMON, *extra]) == 0
    a, b = _losses(straight), _losses(split)
    assert [s for s, _, _ in b] == list(range(1, total + 1))
    assert a == b  # exact float equality: same data, same samples, same λ draws, same optimizer state


def test_resume_truncates_metrics_written_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=4", "save_steps=2", *COMMON]) == 0
    shutil.rmtree(out / "checkpoint-4")  # as if the run died after step 4's metrics but before its save
    assert main(["train", TINY, f"output_dir={out}", "max_steps=4", "resume_from_checkpoint=latest", *COMMON]) == 0
    assert [s for s, _, _ in _losses(out)] == [1, 2, 3, 4]


def test_torn_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=2", "save_steps=2", *COMMON]) == 0
    torn = out / "checkpoint-5"
    shutil.copytree(out / "checkpoint-2", torn)
    (torn / MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger="gkd"):
        assert find_resume_checkpoint("latest", out) == out / "checkpoint-2"
    assert "checkpoint-5" in caplog.text
    assert main(["train", TINY, f"output_dir={out}", "max_steps=3", "resume_from_checkpoint=latest", *COMMON]) == 0
    assert [s for s, _, _ in _losses(out)] == [1, 2, 3]


def test_latest_without_checkpoints_starts_fresh_and_bad_paths_are_errors(tmp_path, capsys):
    assert find_resume_checkpoint("latest", tmp_path / "nothing") is None
    assert find_resume_checkpoint(None, tmp_path) is None
    not_ckpt = tmp_path / "some-folder"
    not_ckpt.mkdir()
    code = main(["train", TINY, f"output_dir={tmp_path / 'run'}", f"resume_from_checkpoint={not_ckpt}", *COMMON])
    assert code == 2
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=4", "save_steps=1", "save_total_limit=2",
                 *COMMON]) == 0
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert not (out / "checkpoint-1").exists()
