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
    args = parser.parse_args()
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
