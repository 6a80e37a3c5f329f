"""Golden runs: the tiny recipes' metrics and a resume from a committed MiniLLM mid-buffer checkpoint.

The files in ``tests/golden/`` were recorded before the trainer was split into ``gkd/algorithms/``
(``python tests/golden/record.py``); a refactor that changes any logged number, or stops an old
checkpoint from resuming to the same losses, fails here. Discrete values must match exactly; floats
to 1e-4 relative (the recording machine reproduces them bit for bit; the slack absorbs a CI CPU with
other vector instructions and library releases — transformers 5.23 → 5.24 moved a divergence by 2e-6
relative — far below any change of maths, which moves these losses by percents). The ``onpolicy_*``
fidelity keys were added to the recorded runs later, with every older value checked unchanged.
``gkd_reward_tiny`` was re-recorded once its recipe added a partial-credit reward (issue 22: the
exact-match reward was 0 at every step, so the reward term never moved a gradient); at step 1 only
``loss``, ``grad_norm``, ``reward`` and ``reward_pg`` changed, as they must, the other recipes not at all.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("golden_record", HERE / "golden" / "record.py")
record = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(record)  # type: ignore[union-attr]


def _golden(recipe: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / "golden" / f"{recipe}.jsonl").read_text().splitlines()]


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w), f"step {w['step']}: keys differ: {sorted(set(g) ^ set(w))}"
        for key, value in w.items():
            if isinstance(value, float) and not float(value).is_integer():
                assert math.isclose(g[key], value, rel_tol=1e-4, abs_tol=1e-7), (w["step"], key, g[key], value)
            else:
                assert g[key] == value, (w["step"], key, g[key], value)


@pytest.mark.parametrize("recipe", record.RECIPES)
def test_recipe_metrics_equal_the_golden_run(recipe, tmp_path):
    _assert_same(record.run(recipe, tmp_path / recipe), _golden(recipe))


def test_old_minillm_mid_buffer_checkpoint_resumes_to_the_same_losses(tmp_path):
    out = tmp_path / "run"
    step = record.CHECKPOINT_STEP
    shutil.copytree(HERE / "golden" / f"minillm_checkpoint-{step}", out / f"checkpoint-{step}")
    assert (out / f"checkpoint-{step}" / "minillm_buffer_0.pt").exists()  # a buffer in progress
    got = record.run("minillm_tiny", out, "resume_from_checkpoint=latest")
    want = _golden("minillm_tiny")[step:]
    # the buffer in progress comes from the old checkpoint, whose shared metrics predate the sample_* ones
    want = [{k: v for k, v in w.items() if k in g or not k.startswith("sample_")} for g, w in zip(got, want, strict=True)]
    _assert_same(got, want)
