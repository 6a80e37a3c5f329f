"""`benchmarks/experiments.py --quick` regenerates the results JSON, plot and table (tiny sizes, no quality claim)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location("experiments", ROOT / "benchmarks" / "experiments.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["experiments"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs the experiments extra")
def test_quick_experiments_write_json_plot_and_table(tmp_path):
    exp = _driver()
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("# Results\n\nintro kept\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nreading kept\n")
    methods = ["sft", "kd", "gkd_jsd", "minillm", "minillm_no_mix"]
    assert exp.main(["--quick", "--methods", *methods, "--out-dir", str(out), "--work-dir", str(tmp_path / "w")]) == 0
    record = json.loads((out / "results.json").read_text())
    assert list(record["runs"]) == methods and all(sorted(r) == ["0", "1"] for r in record["runs"].values())
    run = record["runs"]["gkd_jsd"]["0"]
    assert [p["step"] for p in run["curve"]] == [0, 2, 4] and run["steps"] == 4 and run["on_policy_steps"] == 4
    assert run["curve"][0] == {"step": 0, **{k: record["warm_start"]["0"][k] for k in ("accuracy", "reverse_kl", "forward_kl")}}
    assert record["runs"]["sft"]["1"]["greedy"]["reverse_kl"] >= 0  # KL measured even for the teacher-free arm
    assert record["runs"]["minillm"]["0"]["prompts"] == record["runs"]["gkd_jsd"]["0"]["prompts"] == 32
    md = (out / "results.md").read_text()
    assert "intro kept" in md and "reading kept" in md and "\nold\n" not in md
    assert md.count("| MiniLLM without teacher mixing |") == 1 and "results.png" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same initialisation for every method of a seed: identical step-0 points
    assert record["runs"]["kd"]["1"]["curve"][0] == record["runs"]["minillm"]["1"]["curve"][0]


def test_aggregate_reports_paired_differences():
    exp = _driver()
    runs = {key: {s: {"greedy": {"accuracy": acc + i, "reverse_kl": 0.1, "forward_kl": 0.1, "completion_len_mean": 9},
                      "sample": {"accuracy": 0.5, "reverse_kl": 0.2, "forward_kl": 0.2, "completion_len_mean": 9},
                      "train_time_s": 1.0}
                  for i, s in enumerate(["0", "1", "2"])}
            for key, acc in (("sft", 0.5), ("gkd_jsd", 0.6))}
    agg = exp.aggregate({"runs": runs})
    assert agg["gkd_jsd"]["delta_vs_sft"][0] == pytest.approx(0.1) and agg["gkd_jsd"]["delta_vs_sft"][1] == pytest.approx(0)
    assert agg["gkd_jsd"]["beats_sft"] == 3 and agg["sft"]["greedy_accuracy"][1] == pytest.approx(1.0)
