"""Training-step throughput: gkd's GKD trainer vs TRL's ``GKDTrainer`` (and, at λ = 1 with β = 1, TRL's
``DistillationTrainer``) on identical tiny models and data.

Both train the built-in tiny student (Qwen2-shaped) towards the built-in tiny teacher (Llama-shaped) on
the built-in addition task, from the same saved weights, with the same batch size, learning rate,
``max_new_tokens``, λ, β = 0.5 and sampling temperature 1. TRL gets the task as ``messages`` through a
minimal chat template that renders exactly the same token sequences (prompt, then completion + EOS).
For each λ ∈ {0, 0.5, 1} the two trainers alternate (TRL, gkd, TRL, gkd, …) in one invocation; each
measurement (a fresh process each) is the wall time of ``trainer.train()`` for ``--steps`` optimizer
steps after a 2-step warm-up run in the same process, excluding model loading and trainer construction.

Note how the λ draw differs: TRL draws on-policy per micro-batch with ``random.random() <= λ``; gkd
once per optimizer step on rank 0 (``u < λ``). At λ = 0.5 the realised on-policy share of each run is
reported beside its time, since it drives the cost.

    python benchmarks/bench_step.py                      # table + JSON in benchmarks/results/
    python benchmarks/bench_step.py --steps 10 --reps 1  # faster
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def _rows(n: int) -> list[dict]:
    from gkd.task import make_problems

    problems = make_problems(n, max_digits=4, seed=0)
    return [{"prompt": p.prompt, "completion": p.completion} for p in problems]


def run_gkd(student: str, teacher: str, rows: list[dict], lmbda: float, steps: int, batch: int, out: Path,
            beta: float = 0.5) -> dict:
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    cfg = GKDConfig(student=student, teacher=teacher, lmbda=lmbda, beta=beta, divergence="jsd", max_steps=steps,
                    per_device_batch_size=batch, learning_rate=1e-3, lr_scheduler="constant", max_new_tokens=9,
                    output_dir=str(out), save_final_model=False, progress_bar=False, seed=0, max_grad_norm=1.0)
    trainer = GKDTrainer(cfg, train_rows=rows)
    start = time.perf_counter()
    history = trainer.train()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "on_policy_share": statistics.mean(h["on_policy"] for h in history),
            "completion_tokens": sum(h["completion_len_mean"] * batch for h in history)}


def run_trl(student: str, teacher: str, rows: list[dict], lmbda: float, steps: int, batch: int, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(student)
    tok.chat_template = CHAT_TEMPLATE
    data = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["completion"]}]} for r in rows])
    args = GKDConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
                     lr_scheduler_type="constant", lmbda=lmbda, beta=0.5, temperature=1.0, max_new_tokens=9,
                     logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0, max_grad_norm=1.0,
                     disable_tqdm=True, dataloader_num_workers=0)
    on_policy = []
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                         teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args, train_dataset=data,
                         processing_class=tok)
    original = trainer.generate_on_policy_outputs

    def counting(*a, **k):
        on_policy.append(1)
        return original(*a, **k)

    trainer.generate_on_policy_outputs = counting  # type: ignore[method-assign]
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "on_policy_share": len(on_policy) / steps}


def run_trl_distill(student: str, teacher: str, rows: list[dict], lmbda: float, steps: int, batch: int,
                    out: Path) -> dict:
    """TRL's ``DistillationTrainer`` (on-policy, β = 1: reverse KL), prompts only."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
                              lr_scheduler_type="constant", beta=1.0, temperature=1.0, max_completion_length=9,
                              logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                              max_grad_norm=1.0, disable_tqdm=True)
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                                  teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args,
                                  train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
                                  processing_class=AutoTokenizer.from_pretrained(student))
    start = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - start, "on_policy_share": 1.0}


def run_gkd_beta1(student: str, teacher: str, rows: list[dict], lmbda: float, steps: int, batch: int, out: Path) -> dict:
    return run_gkd(student, teacher, rows, lmbda, steps, batch, out, beta=1.0)


WORKERS = {"trl": run_trl, "gkd": run_gkd, "trl_distill": run_trl_distill, "gkd_beta1": run_gkd_beta1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lambdas", default="0,0.5,1")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-distill", action="store_true", help="skip the DistillationTrainer (β = 1) pair")
    parser.add_argument("--worker", nargs=2, metavar=("TRAINER", "LAMBDA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import subprocess
    import sys
    import tempfile

    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        from gkd.task import resolve_model_path

        name, lmbda = args.worker[0], float(args.worker[1])
        student, teacher = resolve_model_path("builtin:tiny-student"), resolve_model_path("builtin:tiny-teacher")
        rows = _rows(2000)
        fn = WORKERS[name]
        with tempfile.TemporaryDirectory() as tmp:
            fn(student, teacher, rows, lmbda, 2, args.batch, Path(tmp) / "warm")  # warm-up: imports, caches, kernels
            r = fn(student, teacher, rows, lmbda, args.steps, args.batch, Path(tmp) / "run")
        print("RESULT " + json.dumps(r))
        return
    results = []
    plan = [(float(x), ("trl", "gkd")) for x in args.lambdas.split(",")]
    if not args.no_distill:  # TRL's DistillationTrainer is on-policy reverse KL: compare at λ = 1, β = 1
        plan.append((1.0, ("trl_distill", "gkd_beta1")))
    for lmbda, pair in plan:
        for rep in range(args.reps):
            for name in pair:  # alternating, each run in a fresh process (TRL and gkd both own accelerate's state)
                cmd = [sys.executable, __file__, "--worker", name, str(lmbda), "--steps", str(args.steps),
                       "--batch", str(args.batch)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{name} λ={lmbda} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(line[7:])
                r.update(trainer=name, lmbda=lmbda, rep=rep, steps_per_s=args.steps / r["seconds"])
                results.append(r)
                print(f"λ={lmbda:<4} {name:4s} rep {rep}: {r['steps_per_s']:.2f} steps/s "
                      f"(on-policy share {r['on_policy_share']:.2f})", flush=True)
    lines = ["| λ, β | TRL trainer | TRL steps/s | gkd steps/s | gkd / TRL |", "|---|---|---|---|---|"]
    summary = []
    for lmbda, (theirs, ours_name) in plan:
        def med(name: str, lam: float = lmbda) -> float:
            return statistics.median(r["steps_per_s"] for r in results if r["lmbda"] == lam and r["trainer"] == name)

        trl_rate, ours = med(theirs), med(ours_name)
        beta = 1.0 if theirs == "trl_distill" else 0.5
        label = "DistillationTrainer" if theirs == "trl_distill" else "experimental GKDTrainer"
        summary.append({"lmbda": lmbda, "beta": beta, "trl_trainer": label, "trl_steps_per_s": trl_rate,
                        "gkd_steps_per_s": ours, "ratio": ours / trl_rate})
        lines.append(f"| {lmbda:g}, {beta:g} | {label} | {trl_rate:.2f} | {ours:.2f} | {ours / trl_rate:.2f}× |")
    table = "\n".join(lines)
    print(table)
    import trl

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "trl": trl.__version__, "steps": args.steps, "batch": args.batch, "max_new_tokens": 9}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cpu.json").write_text(json.dumps({"machine": machine, "summary": summary, "runs": results}, indent=1))
    (out / "step_cpu.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
