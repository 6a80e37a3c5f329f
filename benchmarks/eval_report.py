"""Side-by-side markdown table of several ``gkd eval --output`` reports (e.g. a student before and after
training, the teacher beside), for docs/results.md.

    python benchmarks/eval_report.py "pruned=before.json" "healed=after.json" [--decoding greedy]

One row per (label, model, decoding): verifiable-instruction scores (IFEval's checkers: prompt /
instruction level, strict / loose), Rouge-L against the teacher, teacher-forced KLs both ways, KL on the
model's own completions, repeated 4-grams, no-EOS share, mean length. A teacher row is printed once (the
first report that has one), since every report's teacher is the same model on the same prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _fmt(x: float | None, pct: bool = False, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.{digits}f}"


def rows(labelled: list[tuple[str, dict[str, Any]]], decodings: tuple[str, ...]) -> list[str]:
    head = ("| model | decoding | IF prompt strict % | IF prompt loose % | IF instr. strict % | IF instr. loose % | "
            "Rouge-L | KL(t‖s) teacher's | KL(s‖t) teacher's | KL(s‖t) own | repeat-4 % | no EOS % | length |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    teacher_done = set()
    for label, report in labelled:
        for r in report["results"]:
            if r["decoding"] not in decodings:
                continue
            if r["model"] == "teacher":
                if r["decoding"] in teacher_done:
                    continue
                teacher_done.add(r["decoding"])
                name = "teacher"
            else:
                name = label
            v = r.get("verifiable") or {}
            out.append(
                f"| {name} | {r['decoding']} | {_fmt(v.get('prompt_strict'), True)} | {_fmt(v.get('prompt_loose'), True)} | "
                f"{_fmt(v.get('instruction_strict'), True)} | {_fmt(v.get('instruction_loose'), True)} | "
                f"{_fmt(r.get('rouge_l'), True)} | {_fmt(r.get('teacher_forced_forward_kl'))} | "
                f"{_fmt(r.get('teacher_forced_reverse_kl'))} | {_fmt(r.get('reverse_kl'))} | "
                f"{_fmt(r.get('repeat_4'), True)} | {_fmt(r.get('no_eos'), True)} | {r['completion_len_mean']:.0f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", metavar="LABEL=REPORT.json")
    parser.add_argument("--decoding", choices=["greedy", "sample", "both"], default="both")
    args = parser.parse_args(argv)
    labelled = []
    for item in args.reports:
        label, _, path = item.partition("=")
        if not path:
            parser.error(f"{item!r}: give LABEL=REPORT.json")
        labelled.append((label, json.loads(Path(path).read_text())))
    decodings = ("greedy", "sample") if args.decoding == "both" else (args.decoding,)
    print("\n".join(rows(labelled, decodings)))
    for label, report in labelled:
        loop = report.get("looping")
        if loop and loop.get("repeat_4_ratio") is not None:
            print(f"\n{label}: greedy repeated 4-grams {100 * loop['student_repeat_4']:.1f}% vs teacher "
                  f"{100 * loop['teacher_repeat_4']:.1f}% ({loop['repeat_4_ratio']:.1f}×); no EOS "
                  f"{100 * loop['student_no_eos']:.1f}% vs {100 * loop['teacher_no_eos']:.1f}%; "
                  f"eval wall time {report['wall_time_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
