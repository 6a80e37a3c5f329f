"""`gkd demo --quick`: the whole embedded default runs offline (tiny step counts, no quality claim)."""

import json

from gkd.cli import main


def test_quick_demo_runs_end_to_end_and_caches_the_teacher(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["rows"]) == {"teacher", "student before (SFT warm-up)", "student after on-policy GKD",
                                   "student after more SFT (control)"}
    assert result["rows"]["student after on-policy GKD"]["reverse_kl"] >= 0
    assert not result["teacher_cached"]
    printed = capsys.readouterr().out
    assert "| teacher |" in printed
    # a second run reuses the cached teacher
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "demo2")]) == 0
    assert json.loads((tmp_path / "demo2" / "results.json").read_text())["teacher_cached"]
