"""The ``gkd eval`` command: load the models and the rows (a run's held-out data, or a verifiable-instruction
benchmark in IFEval's format), evaluate each model under each decoding with :func:`gkd.evaluate.evaluate`,
write every completion to a generations file before scoring, and format the report (the main table,
IFEval's tables, greedy looping beside the teacher). ``--rescore`` scores a generations file again
without any model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gkd.data import PARTS, load_rows
from gkd.errors import InputError
from gkd.evaluate import DECODINGS, EvalResult, evaluate, teacher_forced_kls
from gkd.rewards import RewardFunctions
from gkd.scorer import check_tokenizers_match
from gkd.teachers import TeacherRouter

__all__ = ["BENCHMARKS", "BENCHMARK_MAX_NEW_TOKENS", "CONFIG_KEYS", "format_table", "load_benchmark", "load_teachers",
           "looping_summary", "read_run_config", "rescore_generations", "run_eval", "write_report"]

#: Data and sampling fields ``gkd eval`` takes from a training run's ``config.yaml`` (flags override them).
CONFIG_KEYS = ("dataset", "dataset_format", "dataset_split", "validation_size", "split_seed", "max_response_length",
               "num_train_examples", "max_digits", "max_new_tokens", "max_prompt_length", "seed", "temperature",
               "top_p", "top_k", "reward_funcs", "teacher", "teachers", "teacher_column", "default_teacher")
#: The fields of a run with several teachers; a teacher named on the command line replaces them.
TEACHERS_KEYS = ("teachers", "teacher_column", "default_teacher")


def _load_model_and_tokenizer(name: str, role: str, dtype: str = "float32", gguf_file: str = ""):
    """Load a model (folder, .gguf file, packaged or built-in name, hub id) for evaluation; a missing or
    broken one is a one-line error."""
    from gkd.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(name, gguf_file, role=role)
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype)
    model.eval()
    return model, tokenizer


def load_teachers(teachers: Mapping[str, Any], tokenizer, *, teacher: str | None = None, teacher_column: str = "teacher",
                  default_teacher: str | None = None) -> tuple[TeacherRouter, dict[str, str]]:
    """A run's ``teachers:`` for ``gkd eval``: every teacher loaded (local ones only: the KLs need each
    teacher's full distribution), its tokenizer checked against the model's, as a
    :class:`gkd.teachers.TeacherRouter` that routes each row as training did. Also returns name → model."""
    import dataclasses
    from types import SimpleNamespace

    from gkd.config import GKDConfig
    from gkd.teacher_specs import TEACHER_SETTINGS, default_teacher_name, teacher_specs

    defaults = {f.name: f.default for f in dataclasses.fields(GKDConfig) if f.name in TEACHER_SETTINGS.values()}
    cfg = SimpleNamespace(**{**defaults, "teacher": teacher or ""}, teachers=dict(teachers),
                          default_teacher=default_teacher or "", teacher_column=teacher_column or "teacher")
    specs = teacher_specs(cfg)
    models = {}
    for name, spec in specs.items():
        if spec.served:
            raise InputError(f"teachers: {name!r} ({spec.model}) is served; gkd eval's KLs need each teacher's full "
                             "distribution: pass --teacher MODEL (one local teacher for every row) or --teacher none")
        model, teacher_tokenizer = _load_model_and_tokenizer(spec.model, f"teacher {name!r}", gguf_file=spec.gguf_file)
        try:
            check_tokenizers_match(tokenizer, teacher_tokenizer)
        except InputError as e:
            raise InputError(f"teachers: {name!r} ({spec.model}): {e}") from None
        models[name] = model
    router = TeacherRouter(models, default_teacher_name(cfg, list(specs)), cfg.teacher_column)
    return router, {name: spec.model for name, spec in specs.items()}


def read_run_config(path: str | Path, teacher_given: bool = False) -> dict[str, Any]:
    """The data / sampling fields of a training run's ``config.yaml`` (or any recipe). A run with several
    teachers brings ``teachers`` / ``teacher_column`` / ``default_teacher`` (each held-out row compared
    with its own teacher), unless a teacher is named on the command line (``teacher_given``)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read config {str(path)!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise InputError(f"config {str(path)!r} must be a mapping of key: value")
    out = {k: values[k] for k in CONFIG_KEYS if k in values}
    if teacher_given or not out.get("teachers"):  # one teacher: the one named, or the run's teacher:
        for k in TEACHERS_KEYS:
            out.pop(k, None)
    return out


#: ``gkd eval --benchmark`` names.
BENCHMARKS = ("ifeval",)
#: Default completion length of ``--benchmark ifeval``: IFEval asks for essays, lists and letters of hundreds
#: of words (lm-evaluation-harness allows 1280 tokens); 512 lets most answers of a small chat model end.
BENCHMARK_MAX_NEW_TOKENS = 512


def load_benchmark(name: str, data: str, tokenizer, *, chat_template: bool = True) -> list[dict[str, Any]]:
    """Rows of a verifiable-instruction benchmark in IFEval's published format (``key``, ``prompt``,
    ``instruction_id_list``, ``kwargs``): a ``.jsonl`` / ``.json`` / ``.parquet`` file or a ``datasets``
    name (``google/IFEval`` online). Each prompt becomes one user turn under the tokenizer's chat
    template (the raw text where the tokenizer has none, or ``chat_template=False``). Every row is checked
    (:func:`gkd.verifiable.check_rows`) before anything is generated."""
    from gkd import verifiable
    from gkd.data import _load_with_datasets, normalize_rows

    if name not in BENCHMARKS:
        raise InputError(f"benchmark {name!r} is not known; choose one of: {', '.join(BENCHMARKS)}")
    verifiable.registry()  # a missing extra fails here, before any model runs
    raw, source = _load_with_datasets(data, "train")
    use_chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for i, row in enumerate(raw, 1):
        where = f"{source} row key={row['key']!r}" if row.get("key") is not None else f"{source}:{i}"
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: 'prompt' must be non-empty text (IFEval format: key, prompt, "
                             "instruction_id_list, kwargs)")
        if not row.get("instruction_id_list"):
            raise InputError(f"{where}: no 'instruction_id_list'; a {name} row needs at least one instruction id")
        extra = {k: row[k] for k in ("key", "instruction_id_list", "kwargs") if k in row}
        if use_chat:
            rows.append({"messages": [{"role": "user", "content": prompt}], "ifeval_prompt": prompt, **extra})
        else:
            rows.append({"prompt": prompt, "ifeval_prompt": prompt, **extra})
    rows = normalize_rows(rows, tokenizer, source=source)
    verifiable.check_rows(rows, source)
    return rows


def _generations_writer(path: str | Path | None, model: str) -> Callable[[list[dict[str, Any]]], None] | None:
    """Appends each decoding's completions to ``path`` (JSONL), tagged with ``model`` and decoding."""
    if path is None:
        return None
    path = Path(path)

    def write(records: list[dict[str, Any]], *, role: str, decoding: str) -> None:
        with path.open("a") as fh:
            for r in records:
                fh.write(json.dumps({"model": role, "name": model, "decoding": decoding, **r}, ensure_ascii=False) + "\n")
    return write  # type: ignore[return-value]


def run_eval(
    model: str,
    *,
    teacher: str | None = None,
    teachers: Mapping[str, Any] | None = None,
    teacher_column: str = "teacher",
    default_teacher: str | None = None,
    dataset: str = "builtin:addition",
    dataset_format: str = "auto",
    dataset_split: str = "train",
    split: str = "validation",
    validation_size: float = 0.0,
    split_seed: int = 0,
    max_response_length: int = 0,
    num_train_examples: int = 20000,
    max_digits: int = 4,
    data_seed: int = 42,
    max_prompts: int | None = None,
    max_new_tokens: int | None = None,
    max_prompt_length: int = 512,
    decodings: Sequence[str] = ("greedy",),
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    reward_funcs: Sequence[str] = (),
    num_shown: int = 3,
    teacher_metrics: bool = True,
    benchmark: str | None = None,
    benchmark_data: str | None = None,
    generations: str | Path | None = None,
) -> dict[str, Any]:
    """``gkd eval``: load the model (and teacher), load the evaluation rows, evaluate under each
    decoding mode; returns a JSON-ready dict (``results``: one entry per model × decoding).

    ``split``/``validation_size``/``split_seed``/``max_response_length`` select rows exactly as
    training did (:func:`gkd.data.load_rows`); for ``builtin:addition`` the validation split is
    the task's held-out problems for training seed ``data_seed``, scored with
    :func:`gkd.task.check_answer` and the built-in reward ``gkd.task:exact_match_reward``.
    With ``teacher_metrics`` the teacher is evaluated the same way (no KL against itself).
    ``benchmark="ifeval"`` evaluates the rows of ``benchmark_data`` instead (:func:`load_benchmark`,
    default length :data:`BENCHMARK_MAX_NEW_TOKENS`). Rows with verifiable instructions are scored on any
    dataset. ``generations``: a JSONL file that receives every completion as soon as it is decoded.

    ``teachers`` (a run's ``teachers:``, with its ``teacher_column`` / ``default_teacher``; ``teacher`` then
    joins them as ``default``): each row is compared with its own teacher, as training routed it (KLs on
    the model's own completions and teacher-forced on its teacher's greedy answers); the student's entry
    gives them overall (token means over all rows) and per teacher under ``teachers``, and each teacher is
    evaluated on its own rows as ``teacher:<name>``.
    """
    for d in decodings:
        if d not in DECODINGS:
            raise InputError(f"decoding {d!r} is not valid; choose from: {', '.join(DECODINGS)}")
    if split not in PARTS:
        raise InputError(f"split {split!r} is not valid; choose one of: {', '.join(PARTS)}")
    if benchmark is not None:
        if benchmark not in BENCHMARKS:
            raise InputError(f"benchmark {benchmark!r} is not known; choose one of: {', '.join(BENCHMARKS)}")
        if not benchmark_data:
            raise InputError(f"--benchmark {benchmark} needs --benchmark-data: a file in IFEval's format "
                             "(key, prompt, instruction_id_list, kwargs) or a datasets name such as google/IFEval")
        from gkd import verifiable

        verifiable.registry()  # a missing extra is refused before any model is loaded
    t0 = time.perf_counter()
    student, tokenizer = _load_model_and_tokenizer(model, "model")
    teacher_model: Any = None
    teacher_names: dict[str, str] = {"teacher": str(teacher)}  # several teachers: name → model
    if teachers:
        teacher_model, teacher_names = load_teachers(teachers, tokenizer, teacher=teacher, teacher_column=teacher_column,
                                                     default_teacher=default_teacher)
    elif teacher:
        teacher_model, teacher_tokenizer = _load_model_and_tokenizer(teacher, "teacher")
        check_tokenizers_match(tokenizer, teacher_tokenizer)
    if benchmark is not None:
        dataset, split = str(benchmark_data), "all"
        rows = load_benchmark(benchmark, str(benchmark_data), tokenizer)
        max_new_tokens = max_new_tokens or BENCHMARK_MAX_NEW_TOKENS
    else:
        rows = load_rows(dataset, tokenizer, dataset_format=dataset_format, num_examples=num_train_examples,
                         max_digits=max_digits, seed=data_seed, split=dataset_split, part=split,
                         validation_size=validation_size, split_seed=split_seed,
                         max_response_length=max_response_length)
    builtin = dataset == "builtin:addition"
    if max_prompts is not None:
        if max_prompts < 1:
            raise InputError(f"max_prompts={max_prompts} must be >= 1")
        rows = rows[:max_prompts]
    router = teacher_model if isinstance(teacher_model, TeacherRouter) else None
    if router is not None:
        router.check_rows(rows)  # every row names a known teacher (one line naming the row otherwise)
    from gkd import verifiable as ver

    num_constrained = ver.check_rows(rows, dataset) if benchmark is None and _verifiable_available(rows) else \
        sum(ver.constrained(r) for r in rows)
    if generations is not None:
        Path(generations).parent.mkdir(parents=True, exist_ok=True)
        Path(generations).write_text("")  # this run's completions only
    writer = _generations_writer(generations, model)
    new_tokens = max_new_tokens or (2 * max_digits + 1 if builtin else 64)
    checker = None
    funcs = list(reward_funcs)
    if builtin:
        from gkd.task import check_answer

        checker = check_answer
        if "gkd.task:exact_match_reward" not in funcs:
            funcs.insert(0, "gkd.task:exact_match_reward")
    rewards = RewardFunctions.from_specs(funcs) if funcs else None
    reference = "dataset"
    teacher_answers: list[str] = []
    teacher_greedy: dict[str, EvalResult] = {}  # "teacher", or with several teachers "teacher:<name>"
    prompt_only = all(r.get("completion") is None for r in rows)
    keep = generations is not None and teacher_metrics and "greedy" in decodings and prompt_only
    if teacher_model is not None:  # what the teacher itself answers: a reference the student cannot move
        teacher_greedy, teacher_answers = _evaluate_teachers(
            teacher_model, teacher_names, tokenizer, rows, generations if keep else None, "greedy",
            reward_funcs=rewards, max_new_tokens=new_tokens, max_prompt_length=max_prompt_length,
            batch_size=batch_size, num_samples=num_shown, rouge=False, verifiable=benchmark is not None or None)
    if any(r.get("completion") is None for r in rows):  # prompt-only rows (on-policy data)
        if teacher_model is None:
            reference = "none"
        else:  # Rouge-L / exact match against the teacher's answers
            missing = sum(r.get("completion") is None for r in rows)
            for row, answer in zip(rows, teacher_answers, strict=True):
                if row.get("completion") is None:
                    row["completion"] = answer
            reference = "teacher greedy" if missing == len(rows) else "dataset, else teacher greedy"
    common = dict(checker=checker, reward_funcs=rewards, samples_per_prompt=samples_per_prompt,
                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=new_tokens,
                  max_prompt_length=max_prompt_length, batch_size=batch_size, num_samples=num_shown,
                  verifiable=benchmark is not None or None)
    forced: dict[str, float] = {}
    forced_per_teacher: dict[str, dict[str, float]] = {}
    if teacher_model is not None:
        answered = [{**row, "completion": answer} for row, answer in zip(rows, teacher_answers, strict=True)]
        kls = teacher_forced_kls(student, teacher_model, tokenizer, answered, max_new_tokens=common["max_new_tokens"],
                                 max_prompt_length=max_prompt_length, batch_size=batch_size)
        forced = {"teacher_forced_forward_kl": kls.forward_kl, "teacher_forced_reverse_kl": kls.reverse_kl}
        forced_per_teacher = {name: {"teacher_forced_forward_kl": v["forward_kl"],
                                     "teacher_forced_reverse_kl": v["reverse_kl"]}
                              for name, v in kls.per_teacher().items()}
    results = []
    for decoding in decodings:
        save = (lambda recs, d=decoding: writer(recs, role="student", decoding=d)) if writer else None  # type: ignore[call-arg]
        r = evaluate(student, tokenizer, rows, teacher=teacher_model, decoding=decoding, save_generations=save, **common)
        entry = {"model": "student", **r.to_dict(), **forced}
        if router is not None:  # each teacher's rows: KLs on the student's own completions and teacher-forced
            entry["teachers"] = {name: {**v, **forced_per_teacher.get(name, {})} for name, v in (r.teachers or {}).items()}
        else:
            entry.pop("teachers", None)
        results.append(entry)
        if teacher_model is not None and teacher_metrics:
            if decoding == "greedy" and reference == "teacher greedy" and teacher_greedy:
                own = teacher_greedy  # the reference itself: Rouge-L / exact match against itself mean nothing
                for t in own.values():
                    t.accuracy, t.rouge_l = None, None
            else:
                own, _ = _evaluate_teachers(teacher_model, teacher_names, tokenizer, rows, generations, decoding,
                                            **common)
            for role, t in own.items():
                results.append({"model": role, **{k: v for k, v in t.to_dict().items() if k != "teachers"}})
    report = {
        "model": model, "teacher": teacher, "dataset": dataset, "split": split, "num_prompts": len(rows),
        **({"teachers": teacher_names, "teacher_column": router.column, "default_teacher": router.default}
           if router is not None else {}),
        "reference": reference,
        "benchmark": benchmark, "num_constrained": num_constrained,
        "generations": str(generations) if generations is not None else None,
        "settings": {"max_new_tokens": common["max_new_tokens"], "max_prompt_length": max_prompt_length,
                     "samples_per_prompt": samples_per_prompt, "temperature": temperature, "top_p": top_p,
                     "top_k": top_k, "seed": seed, "validation_size": validation_size, "split_seed": split_seed,
                     "max_response_length": max_response_length, "reward_funcs": funcs,
                     **({"data_seed": data_seed, "max_digits": max_digits} if builtin else {})},
        "results": results,
        "wall_time_s": time.perf_counter() - t0,
    }
    report["looping"] = looping_summary(report)
    return report


def _evaluate_teachers(teacher: Any, names: Mapping[str, str], tokenizer, rows: list[dict[str, Any]],
                       generations: str | Path | None, decoding: str, **kw: Any) -> tuple[dict[str, EvalResult], list[str]]:
    """The teacher's own completions of ``rows`` under ``decoding`` (:func:`gkd.evaluate.evaluate`): one
    result, ``"teacher"``; with several teachers (a router) one per teacher with rows, ``"teacher:<name>"``,
    each on its own rows (``names``: teacher name → model, or ``{"teacher": model}`` for one teacher). Also returns each row's (first) completion, in row order; every completion goes
    to ``generations`` with its index among ``rows``."""
    if not isinstance(teacher, TeacherRouter):
        write = _generations_writer(generations, names.get("teacher", ""))
        save = (lambda recs: write(recs, role="teacher", decoding=decoding)) if write else None  # type: ignore[call-arg]
        r = evaluate(teacher, tokenizer, rows, decoding=decoding, save_generations=save, **kw)
        draws = max(1, r.num_completions // max(len(rows), 1))
        return {"teacher": r}, r.completions[::draws]
    answers: list[str] = [""] * len(rows)
    results: dict[str, EvalResult] = {}
    row_names = teacher.row_names(rows)
    for name in teacher.names:
        idx = [i for i, n in enumerate(row_names) if n == name]
        if not idx:
            continue
        write = _generations_writer(generations, names.get(name, name))
        save = (lambda recs, idx=idx, write=write, name=name: write(  # type: ignore[misc]
            [{**rec, "index": idx[rec["index"]]} for rec in recs], role=f"teacher:{name}", decoding=decoding)) \
            if write else None
        r = evaluate(teacher[name], tokenizer, [rows[i] for i in idx], decoding=decoding, save_generations=save, **kw)
        results[f"teacher:{name}"] = r
        draws = max(1, r.num_completions // len(idx))
        for i, answer in zip(idx, r.completions[::draws], strict=True):
            answers[i] = answer
    return results, answers


def rescore_generations(generations: str | Path, benchmark: str, benchmark_data: str) -> dict[str, Any]:
    """Score a generations file written by ``gkd eval`` (``--generations``) again, without any model:
    IFEval's checkers on every (model, decoding) group's completions against ``benchmark_data``'s rows,
    matched by row index (and ``key`` where present), plus the no-EOS share and mean length. For a run
    whose scoring failed, or to score with NLTK's data once it is installed."""
    from gkd import verifiable as ver
    from gkd.data import _load_with_datasets, _read_jsonl

    if benchmark not in BENCHMARKS:
        raise InputError(f"benchmark {benchmark!r} is not known; choose one of: {', '.join(BENCHMARKS)}")
    ver.registry()
    records = _read_jsonl(Path(generations))
    raw, source = _load_with_datasets(benchmark_data, "train")
    ver.check_rows(raw, source)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i, g in enumerate(records, 1):
        if not {"model", "decoding", "index", "completion"} <= set(g) or not 0 <= int(g["index"]) < len(raw):
            raise InputError(f"{generations}:{i}: not a gkd eval generations record for {source} "
                             "(needs model, decoding, index within the benchmark, completion)")
        row = raw[int(g["index"])]
        if "key" in g and row.get("key") is not None and g["key"] != row["key"]:
            raise InputError(f"{generations}:{i}: key {g['key']!r} but row {g['index']} of {source} has key "
                             f"{row['key']!r}: the generations were made on other data")
        groups.setdefault((g["model"], g["decoding"]), []).append(g)
    results = []
    for (model, decoding), recs in groups.items():
        rows = [raw[int(g["index"])] for g in recs]
        scores = ver.score_rows(rows, [g["completion"] for g in recs]).summary()
        results.append({"model": model, "decoding": decoding, "num_completions": len(recs),
                        "no_eos": sum(not g.get("eos", True) for g in recs) / len(recs),
                        "completion_len_mean": sum(g.get("tokens", 0) for g in recs) / len(recs),
                        "verifiable": scores})
    return {"generations": str(generations), "dataset": source, "benchmark": benchmark, "results": results}


def _verifiable_available(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Constrained rows are checked up front only where if-verifiable is installed (else they are skipped)."""
    from gkd import verifiable as ver

    if not any(ver.constrained(r) for r in rows):
        return False
    try:
        ver.registry()
    except InputError:
        return False
    return True


def format_table(report: dict[str, Any]) -> str:
    """A markdown table of :func:`run_eval`'s results, then a few generations per entry."""
    def fmt(x: float | None, pct: bool = False) -> str:
        if x is None:
            return "-"
        return f"{100 * x:.1f}" if pct else f"{x:.4f}"

    lines = [
        "| model | decoding | exact match % | Rouge-L | reward | KL(t‖m) own | KL(m‖t) own | KL(t‖m) teacher's | "
        "KL(m‖t) teacher's | distinct-2 | repeat-4 % | no EOS % | mean length |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['decoding']} | {fmt(r['accuracy'], True)} | {fmt(r['rouge_l'], True)} | "
                     f"{fmt(r['rewards'].get('reward'))} | {fmt(r['forward_kl'])} | {fmt(r['reverse_kl'])} | "
                     f"{fmt(r.get('teacher_forced_forward_kl'))} | {fmt(r.get('teacher_forced_reverse_kl'))} | "
                     f"{fmt(r.get('distinct_2'))} | {fmt(r.get('repeat_4'), True)} | {fmt(r.get('no_eos'), True)} | "
                     f"{r['completion_len_mean']:.1f} |")
    lines.append("")
    lines.append("KL … own: on the model's own completions (repetition flatters these); KL … teacher's: teacher-forced "
                 "on the teacher's greedy answers (the model's output cannot move them).")
    reference = report.get("reference", "dataset")
    lines.append(f"{report['num_prompts']} prompts from {report['dataset']} ({report['split']}); "
                 "KLs are token means on the model's own completions; Rouge-L ×100"
                 + (f" against the {reference} answers." if reference != "none" else "; no references, so no Rouge-L."))
    lines.extend(_per_teacher_lines(report))
    lines.extend(_verifiable_lines(report))
    lines.extend(_looping_lines(report))
    for r in report["results"]:
        for s in r["samples"]:
            ref = f"  (reference {s['reference'][:80]!r})" if "reference" in s else ""
            lines.append(f"  {r['model']}/{r['decoding']}: {s['prompt'][-60:]!r} -> {s['completion'][:80]!r}{ref}")
    if report.get("generations"):
        lines.append(f"every completion: {report['generations']}")
    return "\n".join(lines)


def _per_teacher_lines(report: dict[str, Any]) -> list[str]:
    """Several teachers: the student's KLs over each teacher's rows (each row against its own teacher)."""
    routed = [r for r in report["results"] if r.get("teachers")]
    if not routed:
        return []
    lines = ["", f"Per teacher (rows routed by {report.get('teacher_column', 'teacher')!r}, default "
                 f"{report.get('default_teacher')!r}; each row against its own teacher):",
             "| model | decoding | teacher | completions | KL(t‖m) own | KL(m‖t) own | KL(t‖m) teacher's | "
             "KL(m‖t) teacher's |", "|---|---|---|---|---|---|---|---|"]
    for r in routed:
        for name, v in r["teachers"].items():
            tf_f, tf_r = v.get("teacher_forced_forward_kl"), v.get("teacher_forced_reverse_kl")
            lines.append(f"| {r['model']} | {r['decoding']} | {name} | {int(v['num_completions'])} | "
                         f"{v['forward_kl']:.4f} | {v['reverse_kl']:.4f} | "
                         f"{'-' if tf_f is None else f'{tf_f:.4f}'} | {'-' if tf_r is None else f'{tf_r:.4f}'} |")
    return lines


def _verifiable_lines(report: dict[str, Any]) -> list[str]:
    """The IFEval table (prompt / instruction level, strict / loose) and the per-instruction-id table."""
    scored = [r for r in report["results"] if r.get("verifiable")]
    if not scored:
        return []
    first = scored[0]["verifiable"]
    lines = ["", f"Verifiable instructions (IFEval checkers, if-verifiable): {first['num_prompts']} prompts, "
                 f"{first['num_instructions']} instructions; sentences/words split by {first['sentence_splitter']}.",
             "| model | decoding | prompt strict % | prompt loose % | instruction strict % | instruction loose % |",
             "|---|---|---|---|---|---|"]
    for r in scored:
        v = r["verifiable"]
        lines.append(f"| {r['model']} | {r['decoding']} | {100 * v['prompt_strict']:.1f} | {100 * v['prompt_loose']:.1f} | "
                     f"{100 * v['instruction_strict']:.1f} | {100 * v['instruction_loose']:.1f} |")
    ids = sorted({k for r in scored for k in r["verifiable"]["per_instruction"]})
    heads = [f"{r['model']}/{r['decoding']}" for r in scored]
    lines += ["", "Per instruction id (strict % / loose %):", "| instruction id | n | " + " | ".join(heads) + " |",
              "|---|---|" + "---|" * len(heads)]
    for k in ids:
        cells = []
        for r in scored:
            e = r["verifiable"]["per_instruction"].get(k)
            cells.append(f"{100 * e['strict']:.0f} / {100 * e['loose']:.0f}" if e else "-")
        n = next(r["verifiable"]["per_instruction"][k]["n"] for r in scored if k in r["verifiable"]["per_instruction"])
        lines.append(f"| {k} | {n} | " + " | ".join(cells) + " |")
    errors = sum(r["verifiable"].get("checker_errors", 0) for r in scored)
    if errors:
        lines.append(f"({errors} completion(s) made a checker raise; counted as not followed)")
    return lines


def looping_summary(report: dict[str, Any]) -> dict[str, float | None] | None:
    """The student's greedy repeated-4-gram and no-EOS shares beside the teacher's, with ratios
    (student / teacher); None without both greedy entries."""
    greedy = {r["model"]: r for r in report["results"] if r["decoding"] == "greedy"}
    if "student" not in greedy or "teacher" not in greedy:
        return None
    s, t = greedy["student"], greedy["teacher"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b
    return {"student_repeat_4": s.get("repeat_4"), "teacher_repeat_4": t.get("repeat_4"),
            "repeat_4_ratio": ratio(s.get("repeat_4"), t.get("repeat_4")),
            "student_no_eos": s.get("no_eos"), "teacher_no_eos": t.get("no_eos"),
            "no_eos_ratio": ratio(s.get("no_eos"), t.get("no_eos"))}


def _looping_lines(report: dict[str, Any]) -> list[str]:
    loop = looping_summary(report)
    if loop is None:
        return []

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def times(x: float | None) -> str:
        return "(teacher 0)" if x is None else f"{x:.2f}×"
    return ["", f"Greedy looping: repeated 4-grams student {pct(loop['student_repeat_4'])} vs teacher "
                f"{pct(loop['teacher_repeat_4'])} ({times(loop['repeat_4_ratio'])}); no EOS within "
                f"{report['settings']['max_new_tokens']} tokens student {pct(loop['student_no_eos'])} vs teacher "
                f"{pct(loop['teacher_no_eos'])} ({times(loop['no_eos_ratio'])})"]


def write_report(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
