"""The summary table of a ``benchmarks/gpu_check.sh`` folder: each step's status and time, then the key
numbers of each benchmark. Exit status 1 when a step failed or timed out.

    python benchmarks/gpu_summary.py benchmarks/results/gpu
"""

from __future__ import annotations

import glob
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(folder: Path) -> tuple[str, bool]:
    steps = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines() if line.strip()]
    env = _load(folder / "environment.json") or {}
    ok = all(s["rc"] == 0 for s in steps)
    lines = [f"gkd GPU check on {env.get('device', '?')} (torch {env.get('torch', '?')}, CUDA {env.get('cuda')})", "",
             "| step | status | seconds |", "|---|---|---|"]
    for s in steps:
        status = "ok" if s["rc"] == 0 else ("timed out" if s.get("timed_out") else f"failed (rc {s['rc']})")
        lines.append(f"| {s['step']} | {status} | {s['seconds']} |")
    lines += ["", "| measurement | value |", "|---|---|"]
    if env.get("vllm_note"):
        lines.append(f"| vLLM | {env['vllm_note']} |")
    junit = folder / "gpu_tests.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        if suite is not None:
            a = suite.attrib
            lines.append(f"| GPU tests | {a.get('tests')} run, {a.get('failures')} failed, {a.get('errors')} errors, "
                         f"{a.get('skipped')} skipped |")
    pair = _load(folder / "real_pair.json")
    if pair:
        s, meta = pair["summary"], pair["meta"]
        for name in ("gkd", "trl"):
            if name in s:
                lines.append(f"| real pair ({meta['models']}, {meta['precision']}, batch {meta['batch']} × "
                             f"{meta['new_tokens']} tokens): {name} | {s[name]['step_s']:.3f} s/step, "
                             f"{s[name]['tokens_per_s']:.0f} tokens/s, peak {s[name]['peak_gib']:.2f} GiB |")
        if "gkd_over_trl_step_time" in s:
            lines.append(f"| real pair: gkd / TRL step time | {s['gkd_over_trl_step_time']:.2f}× |")
    for path in sorted(glob.glob(str(folder / "loss_memory_*.json"))):
        data = _load(Path(path)) or {}
        results = [r for r in data.get("results", []) if r.get("peak_bytes")]
        if results:
            b, t = max((r["batch"], r["length"]) for r in results)
            cells = ", ".join(f"{r['method']} {r['peak_bytes'] / 2**30:.2f} GiB"
                              for r in results if (r["batch"], r["length"]) == (b, t))
            lines.append(f"| loss memory, V = {data.get('vocab')}, {b} × {t} | {cells} |")
    for path in sorted(glob.glob(str(folder / "rollout_*.json"))):
        data = _load(Path(path)) or {}
        mixed = [r for r in data.get("results", []) if r["method"].startswith("teacher-mixed")]
        if mixed:
            best = min(mixed, key=lambda r: r["ratio_to_plain_plus_scoring"])
            lines.append(f"| rollout ({data['setup'].get('size')}): best teacher-mixed / (plain + scoring) | "
                         f"{best['ratio_to_plain_plus_scoring']:.2f}× ({best['method']}; target ≤ 1.3×) |")
    return "\n".join(lines), ok


def main() -> int:
    text, ok = summary(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu"))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
