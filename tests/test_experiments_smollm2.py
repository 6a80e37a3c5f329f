"""`benchmarks/experiments_smollm2.py`: the arithmetic check, the report from runs.jsonl, and (``real``)
a quick run on the shipped SmolLM2 pair."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location("experiments_smollm2", ROOT / "benchmarks" / "experiments_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["experiments_smollm2"] = module
    spec.loader.exec_module(module)
    return module


def test_arithmetic_hits_need_the_right_number_as_a_number():
    exp = _driver()
    prompts = ["What is 66 + 19?", "What is 7 times 3?", "What is 4 times 10?", "Name a fox.", "What is 12 + 3?"]
    completions = ["66 + 19 = 85.", "7 times 3 is 213", "The answer is 40", "85", "1,5 or 15"]
    assert exp.arithmetic_hits(prompts, completions) == (3, 4)  # "213" is not 21; "Name a fox." is not asked


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs the experiments extra")
def test_report_aggregates_seeds_and_keeps_the_text_around_it(tmp_path):
    exp = _driver()
    work, out = tmp_path / "w", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    metrics = {key: 1.0 for key, _, _ in exp.COLUMNS}
    ref = {"teacher": {**metrics, "tf_fkl_greedy": 0.0}, "init": {**metrics, "tf_fkl_greedy": 9.0}}
    (work / "reference.json").write_text(json.dumps(ref))
    runs = [{"method": "seqkd", "seed": s, "train_time_s": 10.0, "sampled_tokens": 100.0, **metrics,
             "tf_fkl_greedy": v, "samples": [{"prompt": "<|im_start|>user\nHi<|im_end|>", "completion": "Hello"}] * 2}
            for s, v in ((0, 2.0), (1, 4.0))]
    (work / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    (out / "results.md").write_text("# Results\n\nkept above\n\n<!-- smollm2:start -->\nold\n<!-- smollm2:end -->\n\nkept below\n")
    table = exp.report(work, out, "cmd")
    row = next(line for line in table.splitlines() if line.startswith("| SeqKD"))
    assert "| 2 | 3.00 ± 1.41 |" in row  # two seeds: mean 3, sample std √2
    text = (out / "results.md").read_text()
    assert "kept above" in text and "kept below" in text and "old" not in text
    assert (out / "results_smollm2.png").exists() and (out / "results_smollm2.json").exists()

    # a run in its own --work-dir writes its report there, never into docs/ (a sweep of one experiment
    # overwrote another experiment's section of docs/results.md when it ended)
    docs = ROOT / "docs"
    before = {p.name: p.read_bytes() for p in docs.iterdir() if p.is_file()}
    assert exp.main(["--report", "--work-dir", str(work), "--section", "side"]) == 0
    assert (work / "results.md").exists() and (work / "results_side.json").exists()
    assert {p.name: p.read_bytes() for p in docs.iterdir() if p.is_file()} == before


@pytest.mark.real
def test_quick_run_on_the_real_pair(tmp_path):
    # one arm that walks every phase: the shared KD first half (kd_first), an SKD second half, and the
    # held-out evaluation (on-policy GKD on the real pair is tests/test_real.py's)
    exp = _driver()
    assert exp.main(["--quick", "--methods", "kd_skd", "--work-dir", str(tmp_path / "w"),
                     "--out-dir", str(tmp_path / "o")]) == 0
    runs = [json.loads(line) for line in (tmp_path / "w" / "runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r["steps"]) for r in runs] == [("kd_skd", 2)]
    kd_skd = runs[0]  # 1 KD step, then 1 SKD step from that student
    assert kd_skd["on_policy_steps"] == 1 and kd_skd["skd_replaced_mean"] is not None
    assert (tmp_path / "w" / "kd-half-s0" / "kd_first.json").exists()
    assert kd_skd["if_n"] is not None  # held-out verifiable rows scored
    assert kd_skd["tf_fkl_greedy"] > 0
