"""Two teachers in one run (issue 23), the real demonstration, in one command:

    python benchmarks/two_teachers.py                  # all of it (estimate: under 20 min on 2 CPU cores)
    python benchmarks/two_teachers.py --quick          # toy sizes, a minute or two: a smoke test of every phase
    python benchmarks/two_teachers.py --threads 2 --work-dir runs/two-teachers

Phases, each timed and printed (the issue asks how long the specialist takes to make):

1. **The specialist**: SmolLM2-135M-Instruct fine-tuned by plain SFT on generated arithmetic problems
   (``recipes/smollm2-135m-arith-specialist.yaml``, data from ``recipes/data/make_arithmetic.py``);
   skipped when ``<work>/arith-specialist`` already holds it for the same settings.
2. **Two distillations at equal compute** (``recipes/smollm2-135m-two-teachers.yaml``): the pruned
   SmolLM2 (20 of 30 layers) from both teachers, each row routed by its ``teacher`` column (``both``),
   and the same student from the generalist alone (``general-only``: ``teachers=null
   teacher=builtin:smollm2-135m-instruct``): the same data, order, steps, batch and token limit. A run
   whose ``run.json`` is there is not trained again.
3. **Held-out evaluation**, greedy: on the 99 problems of ``recipes/data/arithmetic_eval.jsonl``, exact
   match of the final answer (:func:`make_arithmetic.final_answer`), "the right number appears", per kind,
   and the teacher-forced KL(specialist‖model) on the specialist's own greedy answers, for the generalist,
   the specialist, the pruned student as built and both students; on the 64 held-out chat rows of
   ``recipes/data/instructions.jsonl`` (``validation_size: 64``, ``split_seed: 0``, as the heal recipe),
   gkd eval's metrics against the generalist (:mod:`gkd.evaluate`): teacher-forced KL both ways on its
   greedy answers, Rouge-L to them, repeat-4 / distinct-2 / no-EOS, and IFEval's checkers on the rows
   that carry constraints.
4. **Report**: a table and samples between ``<!-- two-teachers:start -->`` / ``<!-- two-teachers:end -->``
   in ``docs/results.md`` (section "Two teachers in one run (issue 23)"; nothing else in that file is
   touched) and every number in ``docs/results_two_teachers.json``. With ``--quick`` both go to the work
   folder (``results.md`` there is a copy of docs/results.md with the section filled), never into docs/.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The two students: ``pruned`` (the recipe: 20 of the generalist's 30 layers, compression) and ``full``
#: (the whole generalist, ``student_init: null``: merging the specialist's skill into a same-size model).
STUDENTS = ("pruned", "full")


def markers(student: str) -> tuple[str, str]:
    name = "two-teachers" if student == "pruned" else f"two-teachers-{student}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


START, END = markers("pruned")

GENERALIST = "builtin:smollm2-135m-instruct"
SPECIALIST_RECIPE = ROOT / "recipes" / "smollm2-135m-arith-specialist.yaml"
RECIPE = ROOT / "recipes" / "smollm2-135m-two-teachers.yaml"
DATA = ROOT / "recipes" / "data"
ARMS = ("both", "general-only")


def arithmetic_module():
    """``recipes/data/make_arithmetic.py`` (the answer checker and the data), imported by path."""
    spec = importlib.util.spec_from_file_location("make_arithmetic", DATA / "make_arithmetic.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@dataclass
class Plan:
    """Sizes; ``None``: the recipe's value."""

    specialist_steps: int | None = None
    specialist_batch: int | None = None
    steps: int | None = None
    batch: int | None = None
    max_new_tokens: int | None = None
    arith_eval: int = 99  # held-out problems (all)
    arith_tokens: int = 40  # room for the generalist's longer answers to reach their result (~27 tokens)
    chat_eval: int = 64  # held-out chat rows (all)
    eval_batch: int = 64
    student: str = "pruned"  # one of STUDENTS

    @classmethod
    def quick(cls) -> Plan:
        return cls(specialist_steps=3, specialist_batch=2, steps=3, batch=2, max_new_tokens=8, arith_eval=6,
                   arith_tokens=12, chat_eval=4, eval_batch=8)


def _recipe(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _config(path: Path, **changes: Any):
    """The recipe with ``changes`` (dataset paths made absolute, so any working directory works)."""
    from gkd.config import GKDConfig

    values = {**_recipe(path), **changes}
    if not str(values["dataset"]).startswith(("builtin:", "/")):
        values["dataset"] = str(ROOT / values["dataset"])
    values.update(overwrite_output_dir=True, progress_bar=False)
    return GKDConfig(**{k: v for k, v in values.items()})


def _sized(plan: Plan, steps: str, batch: str, tokens: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(plan, steps) is not None:
        out["max_steps"] = getattr(plan, steps)
    if getattr(plan, batch) is not None:
        out["per_device_batch_size"] = getattr(plan, batch)
    if tokens and plan.max_new_tokens is not None:
        out["max_new_tokens"] = plan.max_new_tokens
    return out


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _train(cfg) -> tuple[list[dict[str, Any]], float]:
    from gkd.trainer import GKDTrainer

    t0 = time.perf_counter()
    trainer = GKDTrainer(cfg)
    history = trainer.train()
    seconds = time.perf_counter() - t0
    del trainer
    return history, seconds


def make_specialist(plan: Plan, work: Path) -> dict[str, Any]:
    """Phase 1: SFT of the generalist on the arithmetic problems, unless ``<work>/arith-specialist`` holds
    one made with the same settings. Returns its ``made.json`` (path, settings, seconds)."""
    out = work / "arith-specialist"
    cfg = _config(SPECIALIST_RECIPE, output_dir=str(out), **_sized(plan, "specialist_steps", "specialist_batch"))
    settings = {"max_steps": cfg.max_steps, "per_device_batch_size": cfg.per_device_batch_size,
                "learning_rate": cfg.learning_rate, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                "data_md5": _md5(Path(cfg.dataset))}
    made = out / "made.json"
    if made.is_file() and (out / "final" / "config.json").is_file():
        info = json.loads(made.read_text())
        if info["settings"] == settings:
            print(f"[specialist] present in {out / 'final'} (made in {info['seconds']:.0f}s); skipped", flush=True)
            return {**info, "skipped": True}
    print(f"[specialist] SFT of {GENERALIST}: {cfg.max_steps} steps × {cfg.per_device_batch_size} problems", flush=True)
    history, seconds = _train(cfg)
    info = {"path": str(out / "final"), "settings": settings, "seconds": seconds,
            "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}
    made.write_text(json.dumps(info, indent=1))
    print(f"[specialist] made in {seconds:.0f}s ({seconds / len(history):.2f}s/step), loss "
          f"{info['loss_first']:.3f} → {info['loss_last']:.3f}", flush=True)
    return {**info, "skipped": False}


def arm_config(plan: Plan, work: Path, arm: str, specialist: str):
    """Phase 2's configs: the recipe (``both``) or its equal-compute control (``general-only``)."""
    recipe = _recipe(RECIPE)
    changes: dict[str, Any] = {"output_dir": str(work / arm), **_sized(plan, "steps", "batch", tokens=True)}
    if plan.student == "full":
        changes["student_init"] = None
    if arm == "both":
        changes["teachers"] = {**recipe["teachers"], "arith": specialist}
    else:  # the command line the recipe documents: teachers=null teacher=builtin:smollm2-135m-instruct
        changes.update(teachers=None, teacher=recipe["teachers"]["general"])
    return _config(RECIPE, **changes)


def distill(plan: Plan, work: Path, arm: str, specialist: dict[str, Any]) -> dict[str, Any]:
    """Phase 2: one arm, unless its ``run.json`` is there for the same settings (and specialist)."""
    cfg = arm_config(plan, work, arm, specialist["path"])
    specialist_made = {"settings": specialist["settings"], "seconds": specialist["seconds"]}
    done = work / arm / "run.json"
    key = {"max_steps": cfg.max_steps, "per_device_batch_size": cfg.per_device_batch_size,
           "max_new_tokens": cfg.max_new_tokens, "teachers": cfg.teachers, "teacher": cfg.teacher,
           "student_init": cfg.student_init,
           "data_md5": _md5(Path(cfg.dataset)), **({"specialist": specialist_made} if arm == "both" else {})}
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        info = json.loads(done.read_text())
        print(f"[{arm}] present ({info['seconds']:.0f}s); skipped", flush=True)
        return info
    print(f"[{arm}] {cfg.max_steps} steps × {cfg.per_device_batch_size} prompts, ≤ {cfg.max_new_tokens} new tokens, "
          f"teachers: {cfg.teachers or {'general': cfg.teacher}}", flush=True)
    history, seconds = _train(cfg)
    rows: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    for h in history:
        for k, v in h.items():
            if k.startswith("rows/"):
                rows[k[5:]] = rows.get(k[5:], 0) + v
            elif k.startswith("loss/"):
                losses.setdefault(k[5:], []).append(v)
    info = {"key": key, "seconds": seconds, "steps": len(history),
            "sampled_tokens": sum(h.get("completion_len_mean", 0.0) * cfg.per_device_batch_size for h in history),
            "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
            "rows_per_teacher": rows, "loss_last_per_teacher": {k: v[-1] for k, v in losses.items()}}
    done.write_text(json.dumps(info, indent=1))
    print(f"[{arm}] trained in {seconds:.0f}s ({seconds / len(history):.2f}s/step), loss {info['loss_first']:.3f} → "
          f"{info['loss_last']:.3f}", flush=True)
    return info


def _load(path: str):
    from gkd.models import load_model, resolve_model

    return load_model(resolve_model(path), "float32").eval()


def arithmetic_metrics(arith, rows: list[dict[str, Any]], completions: list[str]) -> dict[str, Any]:
    """Exact match of the final answer, "appears", and exact match per kind, in % of the rows."""
    hits = [arith.answer_hits(c, int(r["answer"])) for r, c in zip(rows, completions, strict=True)]
    out: dict[str, Any] = {"em": 100 * sum(h[0] for h in hits) / len(rows),
                           "appears": 100 * sum(h[1] for h in hits) / len(rows), "n": len(rows)}
    for kind in arith.KINDS:
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        out[f"em_{kind}"] = 100 * sum(hits[i][0] for i in idx) / len(idx) if idx else None
    return out


def evaluate_all(plan: Plan, work: Path, specialist: str) -> dict[str, Any]:
    """Phase 3: every model on the held-out problems, the students (and the specialist) on the chat rows."""
    from gkd.data import load_rows
    from gkd.evaluate import evaluate, model_completions, teacher_forced_kl
    from gkd.models import load_tokenizer, resolve_model

    arith = arithmetic_module()
    tokenizer = load_tokenizer(resolve_model(GENERALIST))
    generalist, spec_model = _load(GENERALIST), _load(specialist)
    models = {"generalist": generalist, "specialist": spec_model,
              **({"pruned init": str(work / "both" / "student-init")} if plan.student == "pruned" else {}),
              "student: both": str(work / "both" / "final"), "student: general-only": str(work / "general-only" / "final")}
    kw = {"max_prompt_length": 256, "batch_size": plan.eval_batch}
    problems = load_rows(str(DATA / "arithmetic_eval.jsonl"), tokenizer, part="all")[: plan.arith_eval]
    spec_answers = model_completions(spec_model, tokenizer, problems, max_new_tokens=plan.arith_tokens, **kw)
    spec_refs = [{**r, "completion": a} for r, a in zip(problems, spec_answers, strict=True)]
    chat = load_rows(str(DATA / "instructions.jsonl"), tokenizer, part="validation", validation_size=64,
                     split_seed=0)[: plan.chat_eval]
    chat_tokens = plan.max_new_tokens or _recipe(RECIPE)["max_new_tokens"]
    general_answers = model_completions(generalist, tokenizer, chat, max_new_tokens=chat_tokens, **kw)
    chat_refs = [{**r, "completion": a} for r, a in zip(chat, general_answers, strict=True)]
    out: dict[str, Any] = {"arithmetic": {}, "chat": {}, "arith_samples": {}, "chat_samples": {},
                           "chat_prompts": [r["messages"][-1]["content"] for r in chat[:3]],
                           "arith_prompts": [r["messages"][0]["content"] for r in problems],
                           "chat_max_new_tokens": chat_tokens, "arith_max_new_tokens": plan.arith_tokens}
    for name, model in models.items():
        t0 = time.perf_counter()
        model = _load(model) if isinstance(model, str) else model
        r = evaluate(model, tokenizer, problems, max_new_tokens=plan.arith_tokens, rouge=False, verifiable=False,
                     num_samples=0, **kw)
        m = arithmetic_metrics(arith, problems, r.completions)
        if model is not spec_model:
            m["tf_kl_from_specialist"], m["tf_kl_to_specialist"] = teacher_forced_kl(
                model, spec_model, tokenizer, spec_refs, max_new_tokens=plan.arith_tokens, **kw)
        m["length"] = r.completion_len_mean
        out["arithmetic"][name] = m
        out["arith_samples"][name] = r.completions
        # chat: against the generalist's greedy answers (the generalist itself: its own IF / looping only)
        teacher = None if model is generalist else generalist
        c = evaluate(model, tokenizer, chat_refs, teacher=teacher, max_new_tokens=chat_tokens,
                     rouge=teacher is not None, num_samples=0, **kw)
        cm: dict[str, Any] = {"rouge_l": 100 * c.rouge_l if c.rouge_l is not None else None,
                              "repeat_4": c.repeat_4, "distinct_2": c.distinct_2, "no_eos": c.no_eos,
                              "length": c.completion_len_mean, "own_kl_forward": c.forward_kl,
                              "own_kl_reverse": c.reverse_kl, "n": c.num_prompts}
        if teacher is not None:
            cm["tf_kl_forward"], cm["tf_kl_reverse"] = teacher_forced_kl(
                model, generalist, tokenizer, chat_refs, max_new_tokens=chat_tokens, **kw)
        v = c.verifiable or {}
        cm.update(if_instruction_strict=v.get("instruction_strict"), if_prompt_strict=v.get("prompt_strict"),
                  if_n=v.get("num_prompts"))
        out["chat"][name] = cm
        out["chat_samples"][name] = c.completions[:3]
        print(f"[eval] {name:22s} arithmetic EM {m['em']:5.1f}%  appears {m['appears']:5.1f}%  | chat Rouge-L "
              f"{_f(out['chat'][name]['rouge_l'], 1)}  tf KL(g‖m) {_f(out['chat'][name].get('tf_kl_forward'))}  "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def _f(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    return "—" if value is None else f"{scale * value:.{digits}f}"


def _one_line(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= n else text[: n - 1] + "…"
    return "`" + text.replace("`", "'") + "`" if text else "(empty)"


def report(results: dict[str, Any]) -> str:
    """The markdown between the markers."""
    ev, timing = results["eval"], results["timing"]
    runs = results["runs"]
    spec = results["specialist"]
    lines = [
        "<!-- generated by benchmarks/two_teachers.py; edits here are overwritten -->",
        f"Command: `{results['command']}` (torch threads: {results['threads'] or 'default'}; "
        f"{'QUICK toy sizes, not a result' if results['quick'] else 'full sizes'}). "
        f"Specialist: {spec['settings']['max_steps']} SFT steps × {spec['settings']['per_device_batch_size']} "
        f"problems, made in **{spec['seconds'] / 60:.1f} min**. Students: {runs['both']['steps']} steps × "
        f"{results['settings']['batch']} prompts, ≤ {results['settings']['max_new_tokens']} new tokens each, same data "
        f"order; both teachers: {runs['both']['seconds'] / 60:.1f} min (rows per teacher "
        + ", ".join(f"{k} {v:.0f}" for k, v in runs["both"]["rows_per_teacher"].items())
        + f"), generalist only: {runs['general-only']['seconds'] / 60:.1f} min; teacher tokens sampled "
        f"{runs['both']['sampled_tokens']:.0f} vs {runs['general-only']['sampled_tokens']:.0f}. Evaluation {timing['eval'] / 60:.1f} min; all phases {timing['total'] / 60:.1f} min.",
        "",
        f"**Arithmetic**, {ev['arithmetic']['generalist']['n']} held-out problems (recipes/data/arithmetic_eval.jsonl), "
        f"greedy, ≤ {ev['arith_max_new_tokens']} new tokens. EM: the final answer is right "
        "(`make_arithmetic.final_answer`); appears: the right number is in the answer; KL: teacher-forced on the "
        "specialist's greedy answers, nats/token.",
        "",
        "| model | EM % | appears % | EM + | EM − | EM × | KL(spec‖model) | KL(model‖spec) | tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in ev["arithmetic"].items():
        lines.append(f"| {name} | {_f(m['em'], 1)} | {_f(m['appears'], 1)} | {_f(m['em_add'], 1)} | "
                     f"{_f(m['em_sub'], 1)} | {_f(m['em_mul'], 1)} | {_f(m.get('tf_kl_from_specialist'))} | "
                     f"{_f(m.get('tf_kl_to_specialist'))} | {_f(m['length'], 1)} |")
    first = next(iter(ev["chat"].values()))
    lines += [
        "",
        f"**Chat**, the {first['n']} held-out rows "
        "of recipes/data/instructions.jsonl (validation_size 64, split_seed 0), greedy, "
        f"≤ {ev['chat_max_new_tokens']} new tokens, against the generalist's greedy answers: teacher-forced KLs "
        "(nats/token), Rouge-L (×100), repeated 4-grams and distinct-2 of the model's own answers, share without "
        f"EOS; IF: IFEval's checkers on the {first.get('if_n') or 0} constrained rows (instruction / prompt level, "
        "strict; answers this short rarely meet length or ending constraints).",
        "",
        "| model | KL(gen‖model) | KL(model‖gen) | Rouge-L | repeat-4 | distinct-2 | no EOS | IF instr % | IF prompt % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in ev["chat"].items():
        lines.append(f"| {name} | {_f(m.get('tf_kl_forward'))} | {_f(m.get('tf_kl_reverse'))} | {_f(m['rouge_l'], 1)} | "
                     f"{_f(m['repeat_4'])} | {_f(m['distinct_2'])} | {_f(m['no_eos'])} | "
                     f"{_f(m['if_instruction_strict'], 1, 100)} | {_f(m['if_prompt_strict'], 1, 100)} |")
    lines += ["", "Samples (greedy), arithmetic:", ""]
    for i, prompt in enumerate(ev["arith_prompts"][:4]):
        lines.append(f"- *{prompt}*")
        for name, comps in ev["arith_samples"].items():
            lines.append(f"  - {name}: {_one_line(comps[i])}")
    lines += ["", "Samples (greedy), chat:", ""]
    for i, prompt in enumerate(ev["chat_prompts"][:2]):
        lines.append(f"- *{_one_line(prompt, 120)[1:-1]}*")
        for name, comps in ev["chat_samples"].items():
            if name in ("generalist", "student: both", "student: general-only") and i < len(comps):
                lines.append(f"  - {name}: {_one_line(comps[i], 140)}")
    return "\n".join(lines)


def write_section(path: Path, body: str, student: str = "pruned") -> None:
    """Replace what lies between the markers of ``path`` (they must be there)."""
    START, END = markers(student)
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{body}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke test; writes nothing into docs/)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--work-dir", type=Path, help="runs and models (default runs/two-teachers, "
                                                      "--quick: runs/two-teachers-quick)")
    parser.add_argument("--specialist-steps", type=int, help="SFT steps of the specialist (default: its recipe's)")
    parser.add_argument("--steps", type=int, help="distillation steps of each student (default: the recipe's)")
    parser.add_argument("--student", choices=STUDENTS, default="pruned",
                        help="pruned: the recipe's student, 20 of the generalist's 30 layers (compression); full: the "
                             "whole generalist (student_init=null: the specialist's skill merged into a same-size "
                             "model); its own work folder, section and JSON")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    plan.specialist_steps = args.specialist_steps or plan.specialist_steps
    plan.steps = args.steps or plan.steps
    plan.student = args.student
    suffix = "" if args.student == "pruned" else f"-{args.student}"
    work = (args.work_dir or ROOT / "runs" / f"two-teachers{suffix}{'-quick' if args.quick else ''}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    docs, out_json = ROOT / "docs" / "results.md", ROOT / "docs" / f"results_two_teachers{suffix.replace('-', '_')}.json"
    if args.quick:  # never into docs/: a copy of results.md in the work folder gets the section
        shutil.copyfile(docs, work / "results.md")
        docs, out_json = work / "results.md", work / out_json.name
    t_all = time.perf_counter()
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = make_specialist(plan, work)
    timing["specialist_phase"] = time.perf_counter() - t0
    runs = {}
    for arm in ARMS:
        t0 = time.perf_counter()
        runs[arm] = distill(plan, work, arm, spec)
        timing[f"distill_{arm}_phase"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate_all(plan, work, spec["path"])
    timing["eval"] = time.perf_counter() - t0
    # the total counts the work as if done in this run (a skipped phase by its recorded time)
    timing["total"] = (spec["seconds"] + sum(r["seconds"] for r in runs.values()) + timing["eval"]
                       + max(0.0, time.perf_counter() - t_all - sum(timing.values())))
    recipe = _recipe(RECIPE)
    settings = {"batch": plan.batch or recipe["per_device_batch_size"],
                "max_new_tokens": plan.max_new_tokens or recipe["max_new_tokens"],
                "steps": plan.steps or recipe["max_steps"],
                **{k: v for k, v in asdict(plan).items() if k.startswith(("arith", "chat", "specialist"))}}
    results = {"command": "python benchmarks/two_teachers.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
               "student": args.student, "quick": args.quick, "threads": args.threads, "settings": settings, "specialist": spec, "runs": runs,
               "timing": timing, "eval": ev}
    out_json.write_text(json.dumps(results, indent=1))
    write_section(docs, report(results), args.student)
    print(f"[time] specialist {spec['seconds']:.0f}s{' (made earlier)' if spec.get('skipped') else ''}, "
          + ", ".join(f"{arm} {r['seconds']:.0f}s" for arm, r in runs.items())
          + f", eval {timing['eval']:.0f}s, total {timing['total']:.0f}s", flush=True)
    print(f"wrote {out_json} and the section between the markers of {docs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
