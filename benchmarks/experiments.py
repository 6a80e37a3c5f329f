"""The GKD and MiniLLM papers' comparisons, small and re-runnable, on the built-in task.

    python benchmarks/experiments.py            # full run (~30 min on 2 CPU cores once the demo teacher is cached)
    python benchmarks/experiments.py --quick    # seconds-long smoke version (tiny steps; no quality claim)

Setup (fixed before any result was seen; ``docs/results.md`` explains it): the demo teacher (cached
under ``$GKD_CACHE``), the built-in addition task's 20,000 training problems and its 512 held-out
problems (seen by neither teacher nor students). Per seed ``s``, one student initialisation (random
init seed ``s + 1``, then 300 SFT warm-up steps) that every method of that seed starts from; every
method then takes the same number of optimizer steps on the same number of prompts per step, same
optimizer and learning rate; the seed also sets data order, sampling and the λ coin.

Writes ``results.json`` (every run's curve and final metrics), ``results.png`` (held-out exact match
and reverse KL vs step, mean ± std over seeds) and the generated section of ``results.md`` (between
the ``<!-- results:start -->`` / ``<!-- results:end -->`` markers; the text around it is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Method:
    """One arm of the comparison: a name, a label, and the config fields it sets."""

    key: str
    label: str
    overrides: dict[str, Any]
    uses_teacher: bool = True
    supplementary: bool = False  # reported, but breaks "same number of prompts" (see its label)


MINILLM = {"algorithm": "minillm", "teacher_mix": 0.2, "num_rollouts": 128, "ppo_epochs": 1, "clip_eps": 0.2}

METHODS = [
    Method("sft", "SFT only (no teacher)", {"divergence": "kd", "kd_weight": 0.0, "lmbda": 0.0}, uses_teacher=False),
    Method("kd", "supervised KD (λ=0, forward KL)", {"lmbda": 0.0, "divergence": "forward_kl"}),
    Method("gkd_fkl", "on-policy GKD (λ=1, β=0: forward KL)", {"lmbda": 1.0, "divergence": "jsd", "beta": 0.0}),
    Method("gkd_jsd", "on-policy GKD (λ=1, β=0.5: JSD)", {"lmbda": 1.0, "divergence": "jsd", "beta": 0.5}),
    Method("gkd_rkl", "on-policy GKD (λ=1, β=1: reverse KL)", {"lmbda": 1.0, "divergence": "jsd", "beta": 1.0}),
    Method("gkd_mixed", "mixed GKD (λ=0.5, β=0.5)", {"lmbda": 0.5, "divergence": "jsd", "beta": 0.5}),
    Method("minillm", "MiniLLM (teacher mix 0.2, length norm.)", dict(MINILLM)),
    Method("minillm_no_norm", "MiniLLM without length normalization", {**MINILLM, "length_normalization": False}),
    Method("minillm_no_mix", "MiniLLM without teacher mixing", {**MINILLM, "teacher_mix": 0.0}),
    Method("minillm_4epochs", "MiniLLM, 4 PPO epochs (¼ of the prompts)", {**MINILLM, "ppo_epochs": 4},
           supplementary=True),
]


@dataclass
class Plan:
    """Sizes of the experiment; ``quick()`` shrinks everything to a smoke test."""

    seeds: tuple[int, ...] = (0, 1, 2)
    num_eval: int = 512  # held-out problems (the task's whole held-out set)
    warmup_steps: int = 300
    steps: int = 150
    eval_every: int = 25
    batch: int = 32
    lr: float = 1e-3
    num_rollouts: int = 128
    sample_seed: int = 1234  # sampled-decoding evaluation
    quick: bool = False
    demo: dict[str, Any] = field(default_factory=dict)  # DemoPlan fields (teacher, task sizes)

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(seeds=(0, 1), num_eval=32, warmup_steps=4, steps=4, eval_every=2, batch=8, num_rollouts=16,
                   quick=True)


def _demo_plan(plan: Plan):
    from gkd.demo import DemoPlan

    return DemoPlan.quick() if plan.quick else DemoPlan()


def _eval_trainer_class():
    """A :class:`GKDTrainer` that evaluates the student every ``eval_every`` optimizer steps.

    The trainer has no callback hook; its ``log`` runs after every step (``logging_steps=1``), so the
    evaluation rides on it. Greedy decoding draws no random numbers, so evaluating does not change
    the training run.
    """
    from gkd.trainer import GKDTrainer

    class EvalTrainer(GKDTrainer):
        def __init__(self, config, *, evaluate_fn, eval_every: int, **kwargs: Any) -> None:
            self.curve: list[dict[str, Any]] = []
            self.eval_seconds = 0.0
            self._evaluate_fn, self._eval_every = evaluate_fn, eval_every
            super().__init__(config, **kwargs)

        def log(self, metrics: dict[str, float]) -> None:
            super().log(metrics)
            if self.step % self._eval_every == 0:
                start = time.perf_counter()
                self.curve.append({"step": self.step, **self._evaluate_fn(self.accelerator.unwrap_model(self.student))})
                self.eval_seconds += time.perf_counter() - start

    return EvalTrainer


def _summary(result) -> dict[str, Any]:
    return {"accuracy": result.accuracy, "reverse_kl": result.reverse_kl, "forward_kl": result.forward_kl,
            "completion_len_mean": result.completion_len_mean}


def run(plan: Plan, methods: list[Method], work: Path) -> dict[str, Any]:
    """Train and evaluate every method × seed; returns the JSON-ready record."""
    import torch

    from gkd.config import GKDConfig
    from gkd.demo import cached_teacher
    from gkd.evaluate import evaluate
    from gkd.models import load_model, load_tokenizer
    from gkd.task import STUDENT_SHAPE, check_answer, save_random_model, split_problems
    from gkd.trainer import GKDTrainer

    t_start = time.perf_counter()
    demo = _demo_plan(plan)
    max_new = 2 * demo.max_digits + 1
    # the teacher's own training set and held-out set (the demo teacher trained on builtin:addition, seed 0)
    train_problems, held_out = split_problems(demo.num_train, 512, demo.max_digits, seed=0)
    train_rows = [{"prompt": p.prompt, "completion": p.completion} for p in train_problems]
    eval_rows = [{"prompt": p.prompt, "completion": p.completion} for p in held_out[: plan.num_eval]]
    print(f"teacher: demo teacher ({'cached' if _teacher_cached(demo) else 'training it now, then cached'})", flush=True)
    t0 = time.perf_counter()
    teacher_path, was_cached = cached_teacher(demo, work / "teacher", seed=0)
    teacher_time = time.perf_counter() - t0
    teacher = load_model(str(teacher_path), "float32").eval()
    tokenizer = load_tokenizer(str(teacher_path))

    def ev(model, decoding: str = "greedy"):
        return evaluate(model, tokenizer, eval_rows, check_answer, teacher=teacher, decoding=decoding,
                        seed=plan.sample_seed, max_new_tokens=max_new, batch_size=256, num_samples=3, rouge=False)

    def curve_point(model) -> dict[str, Any]:
        r = ev(model)
        return {"accuracy": r.accuracy, "reverse_kl": r.reverse_kl, "forward_kl": r.forward_kl}

    record: dict[str, Any] = {
        "plan": dataclasses.asdict(plan) | {"demo": dataclasses.asdict(demo)},
        "teacher": {"path": str(teacher_path), "cached": was_cached, "train_time_s": teacher_time,
                    "greedy": _summary(evaluate(teacher, tokenizer, eval_rows, check_answer, max_new_tokens=max_new,
                                                rouge=False))},
        "methods": {m.key: {"label": m.label, "overrides": m.overrides, "supplementary": m.supplementary}
                    for m in methods},
        "warm_start": {}, "runs": {m.key: {} for m in methods},
    }

    def config(student: Path, out: Path, seed: int, steps: int, teacher: str | None, **overrides: Any) -> GKDConfig:
        return GKDConfig(
            student=str(student), teacher=teacher, max_digits=demo.max_digits, max_new_tokens=max_new,
            max_steps=steps, per_device_batch_size=plan.batch, learning_rate=plan.lr, output_dir=str(out), seed=seed,
            progress_bar=False, logging_steps=1, **overrides,
        )

    EvalTrainer = _eval_trainer_class()
    for seed in plan.seeds:
        t0 = time.perf_counter()
        shutil.rmtree(work / f"seed{seed}", ignore_errors=True)  # a rerun starts clean (metrics.jsonl appends)
        init = save_random_model(work / f"seed{seed}" / "init", STUDENT_SHAPE, seed + 1)
        warm_cfg = config(init, work / f"seed{seed}" / "warmup", seed, plan.warmup_steps, None,
                          divergence="kd", kd_weight=0.0, lmbda=0.0, lr_scheduler="constant_with_warmup",
                          warmup_steps=min(50, plan.warmup_steps // 4))
        GKDTrainer(warm_cfg, tokenizer=tokenizer, train_rows=train_rows).train()
        warm = work / f"seed{seed}" / "warmup" / "final"
        warm_eval = curve_point(load_model(str(warm), "float32"))
        record["warm_start"][str(seed)] = {**warm_eval, "time_s": time.perf_counter() - t0}
        print(f"seed {seed}: warm start exact match {warm_eval['accuracy']:.1%}", flush=True)
        for m in methods:
            overrides = dict(m.overrides)
            if overrides.get("algorithm") == "minillm":
                overrides["num_rollouts"] = plan.num_rollouts
            cfg = config(warm, work / f"seed{seed}" / m.key, seed, plan.steps,
                         str(teacher_path) if m.uses_teacher else None, lr_scheduler="constant",
                         save_final_model=False, **overrides)
            t0 = time.perf_counter()
            trainer = EvalTrainer(cfg, evaluate_fn=curve_point, eval_every=plan.eval_every, tokenizer=tokenizer,
                                  train_rows=train_rows, teacher=teacher if m.uses_teacher else None)
            history = trainer.train()
            train_time = time.perf_counter() - t0 - trainer.eval_seconds
            student = trainer.accelerator.unwrap_model(trainer.student)
            greedy, sampled = ev(student), ev(student, "sample")
            prompts = len(history) * plan.batch  # prompts whose completions fed the optimizer steps
            if cfg.algorithm == "minillm":  # each buffer of num_rollouts prompts feeds (num_rollouts/batch)·ppo_epochs steps
                per_buffer = cfg.num_rollouts // plan.batch * cfg.ppo_epochs
                prompts = -(-len(history) // per_buffer) * cfg.num_rollouts
            record["runs"][m.key][str(seed)] = {
                "curve": [{"step": 0, **warm_eval}, *trainer.curve],
                "greedy": _summary(greedy), "sample": _summary(sampled),
                "samples": greedy.samples, "train_time_s": train_time, "steps": len(history), "prompts": prompts,
                "on_policy_steps": int(sum(h.get("on_policy", 0) for h in history)),
            }
            print(f"seed {seed} {m.key:16s} exact match {greedy.accuracy:6.1%}  sampled {sampled.accuracy:6.1%}  "
                  f"KL(s‖t) sampled {sampled.reverse_kl:.4f}  train {train_time:5.1f}s", flush=True)
            del trainer, student
            torch.manual_seed(0)
    record["wall_time_s"] = time.perf_counter() - t_start
    record["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
                         "torch": torch.__version__}
    return record


def _teacher_cached(demo) -> bool:
    import hashlib

    from gkd.task import TEACHER_SHAPE, cache_dir

    key = hashlib.sha256(json.dumps([TEACHER_SHAPE, demo.max_digits, demo.num_train, demo.teacher_steps,
                                     demo.teacher_lr, demo.teacher_batch, 0]).encode()).hexdigest()[:12]
    return (cache_dir() / "demo" / f"teacher-{key}" / "COMPLETED").exists()


# --- aggregation, table, plot ----------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float | None], pct: bool = False, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = _mean_std([100 * v for v in values] if pct else values)
    return f"{mean:.1f} ± {std:.1f}" if pct else f"{mean:.{digits}f} ± {std:.{digits}f}"


def aggregate(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: mean ± std over seeds of the final metrics, and the paired difference to SFT."""
    out: dict[str, dict[str, Any]] = {}
    sft = record["runs"].get("sft", {})
    for key, runs in record["runs"].items():
        seeds = sorted(runs)
        row: dict[str, Any] = {"n_seeds": len(seeds)}
        for mode in ("greedy", "sample"):
            for metric in ("accuracy", "reverse_kl", "forward_kl", "completion_len_mean"):
                vals = [runs[s][mode][metric] for s in seeds]
                row[f"{mode}_{metric}"] = _mean_std(vals) if None not in vals else None
        row["train_time_s"] = _mean_std([runs[s]["train_time_s"] for s in seeds])
        paired = [runs[s]["greedy"]["accuracy"] - sft[s]["greedy"]["accuracy"] for s in seeds if s in sft]
        row["delta_vs_sft"] = _mean_std(paired) if paired else None
        row["beats_sft"] = sum(d > 0 for d in paired)
        out[key] = row
    return out


def table(record: dict[str, Any]) -> str:
    runs = record["runs"]
    seeds = sorted(next(iter(runs.values())))
    lines = [
        "| method | exact match % (greedy) | Δ vs SFT, paired (pp) | exact match % (sampled, T=1) | "
        "KL(s‖t) on samples | KL(t‖s) on samples | KL(s‖t) greedy | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    teacher = record["teacher"]["greedy"]["accuracy"]
    lines.append(f"| teacher | {100 * teacher:.1f} | | | | | | |")
    warm = record["warm_start"]
    lines.append(f"| warm start (step 0, all methods) | {_fmt([warm[s]['accuracy'] for s in seeds], True)} | | | | | "
                 f"{_fmt([warm[s]['reverse_kl'] for s in seeds])} | |")
    sft = runs.get("sft", {})
    for key, per_seed in runs.items():
        meta = record["methods"][key]
        g = [per_seed[s]["greedy"] for s in seeds]
        smp = [per_seed[s]["sample"] for s in seeds]
        delta = "" if key == "sft" or not sft else _fmt(
            [per_seed[s]["greedy"]["accuracy"] - sft[s]["greedy"]["accuracy"] for s in seeds], True)
        if delta:
            wins = sum(per_seed[s]["greedy"]["accuracy"] > sft[s]["greedy"]["accuracy"] for s in seeds)
            delta += f" ({wins}/{len(seeds)} seeds > SFT)"
        label = meta["label"] + (" †" if meta["supplementary"] else "")
        lines.append(
            f"| {label} | {_fmt([r['accuracy'] for r in g], True)} | {delta} | {_fmt([r['accuracy'] for r in smp], True)} | "
            f"{_fmt([r['reverse_kl'] for r in smp])} | {_fmt([r['forward_kl'] for r in smp])} | "
            f"{_fmt([r['reverse_kl'] for r in g])} | {_fmt([per_seed[s]['train_time_s'] for s in seeds], digits=0)} |"
        )
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """2×2 panels: exact match (top) and reverse KL (bottom) vs step; GKD family (left), MiniLLM family
    (right), SFT and supervised KD in both; lines are means over seeds, bands ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(record["runs"])
    baselines = [k for k in keys if k in ("sft", "kd")]
    groups = [("GKD", [k for k in keys if not k.startswith("minillm")]),
              ("MiniLLM", baselines + [k for k in keys if k.startswith("minillm")])]
    colors = {k: plt.get_cmap("tab10").colors[i % 10] for i, k in enumerate(keys)}
    n = len(next(iter(record["runs"].values())))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex=True)
    for col, (title, members) in enumerate(groups):
        for key in members:
            per_seed = record["runs"][key]
            seeds = sorted(per_seed)
            steps = [p["step"] for p in per_seed[seeds[0]]["curve"]]
            for row, metric, scale in ((0, "accuracy", 100.0), (1, "reverse_kl", 1.0)):
                vals = [[scale * per_seed[s]["curve"][j][metric] for s in seeds] for j in range(len(steps))]
                mean = [statistics.fmean(v) for v in vals]
                std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
                ax = axes[row][col]
                ax.plot(steps, mean, "--" if key in baselines else "-", color=colors[key],
                        label=record["methods"][key]["label"], lw=1.6, marker="o", ms=3)
                ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                                [m + s for m, s in zip(mean, std, strict=True)], color=colors[key], alpha=0.10)
        axes[0][col].axhline(100 * record["teacher"]["greedy"]["accuracy"], color="grey", lw=0.8, ls=":",
                             label="teacher")
        axes[0][col].set(title=f"{title} vs SFT and KD: held-out exact match ({n} seeds, mean ± std)",
                         ylabel="exact match % (greedy)")
        axes[1][col].set(xlabel="optimizer step", ylabel="KL(student‖teacher), token mean, greedy completions")
        axes[0][col].legend(fontsize=8, loc="lower right")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def generated_section(record: dict[str, Any], command: str) -> str:
    plan = record["plan"]
    t = record["teacher"]
    teacher_note = "cached" if t["cached"] else f"trained in {t['train_time_s']:.0f} s, then cached"
    per_method = {k: statistics.fmean(r["prompts"] for r in v.values()) for k, v in record["runs"].items()}
    return "\n".join([
        START,
        "<!-- generated by benchmarks/experiments.py; edits here are overwritten -->",
        f"Command: `{command}` — wall time {record['wall_time_s'] / 60:.1f} min on {record['machine']['cpus']} CPU "
        f"cores (teacher {teacher_note}); seeds {', '.join(map(str, plan['seeds']))}; "
        f"{plan['num_eval']} held-out problems; {plan['steps']} optimizer steps of {plan['batch']} prompts per method.",
        "",
        table(record),
        "",
        "Mean ± sample standard deviation over seeds. Exact match: share of held-out problems whose whole written "
        "sum (digits and carries) is right. KLs: token means of the exact per-position KL on the student's own "
        "completions (sampled at T=1, or greedy). Δ vs SFT: per-seed difference to the SFT run of the same seed "
        "(same initialisation, same data order). † supplementary: MiniLLM with the paper's 4 PPO epochs sees "
        f"{per_method.get('minillm_4epochs', 0):.0f} prompts instead of {per_method.get('minillm', 0):.0f} "
        "in the same number of steps.",
        "",
        "![held-out exact match and reverse KL vs step](results.png)",
        END,
    ])


def write_markdown(path: Path, section: str) -> None:
    if path.exists() and START in path.read_text() and END in path.read_text():
        text = path.read_text()
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(head + section + tail)
    else:
        path.write_text("# Results\n\n" + section + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke version (tiny sizes, no quality claim)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; quick: 0 1)")
    parser.add_argument("--methods", nargs="+", choices=[m.key for m in METHODS], help="subset of methods (default all)")
    parser.add_argument("--out-dir", help="where results.json/png/md go (default docs/; quick: runs/experiments-quick)")
    parser.add_argument("--work-dir", help="scratch folder for the runs (default runs/experiments[-quick])")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print("experiments: error: the plot needs matplotlib: pip install -e '.[experiments]'", file=sys.stderr)
        return 2
    plan = Plan.quick_plan() if args.quick else Plan()
    if args.seeds:
        plan.seeds = tuple(args.seeds)
    methods = [m for m in METHODS if not args.methods or m.key in args.methods]
    suffix = "-quick" if args.quick else ""
    out = Path(args.out_dir or (ROOT / "docs" if not args.quick else Path(f"runs/experiments{suffix}")))
    work = Path(args.work_dir or f"runs/experiments{suffix}") / "work"
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    record = run(plan, methods, work)
    record["summary"] = aggregate(record)
    (out / "results.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    plot(record, out / "results.png")
    command = "python benchmarks/experiments.py" + (" --quick" if args.quick else "")
    write_markdown(out / "results.md", generated_section(record, command))
    print()
    print(table(record))
    print(f"\nwall time {record['wall_time_s'] / 60:.1f} min; wrote {out / 'results.json'}, {out / 'results.png'}, "
          f"{out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
