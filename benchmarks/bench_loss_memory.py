"""Peak memory and time of one forward + backward of the distillation loss at a real vocabulary.

Generalized JSD (β = 0.5) between a student and a teacher over V = 151,936 (Qwen2.5's vocabulary),
hidden size 896 (Qwen2.5-0.5B), for T ∈ {512, 1024} completion tokens and batch B ∈ {1, 4}:

- ``trl_gkd``: TRL's ``GKDTrainer.generalized_jsd_loss`` on full logits (what TRL's GKD trainer runs);
- ``trl_chunked``: TRL's ``_chunked_divergence_loss`` (DistillationTrainer's hidden-state × lm_head tiles);
- ``ours_chunked``: ``gkd.chunked.chunked_loss`` on full logits (``loss_chunk_size: 128``, the default);
- ``ours_fused``: the same with ``fused_lm_head`` (student logits never exist) and full teacher logits;
- ``ours_fused_topk``: ``fused_lm_head`` + ``teacher_topk: 64`` (teacher kept as top-64 + tail).

Logits-input methods receive student logits (with grad) and teacher logits; hidden-input methods receive
hidden states and LM-head weights; the inputs are allocated before measuring and are not counted. Each
measurement runs in a fresh process; "peak" is the increase of the process's resident-set high-water mark
(Linux ``VmHWM``, reset after the inputs exist) on CPU, or ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/bench_loss_memory.py                 # all configurations, table + JSON + PNG
    python benchmarks/bench_loss_memory.py --quick         # small V, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = int(os.environ.get("GKD_BENCH_CHUNK", "128"))  # tokens per chunk (gkd's default loss_chunk_size)
METHODS = ("trl_gkd", "trl_chunked", "ours_chunked", "ours_fused", "ours_fused_topk")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _limit_memory(gib: float):
    """A per-worker address-space cap: a method that needs more fails with MemoryError (reported as
    such) instead of waking the kernel's OOM killer on a shared machine."""
    import resource

    def apply() -> None:
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def worker(method: str, batch: int, length: int, vocab: int, hidden: int, device: str, dtype_name: str) -> dict:
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    n = batch * length
    dev = torch.device(device)
    mask = torch.ones(batch, length, dtype=torch.bool, device=dev)
    hs = (torch.randn(n, hidden, device=dev) * 0.5).to(dtype)
    ht = (torch.randn(n, hidden, device=dev) * 0.5).to(dtype)
    ws = (torch.randn(vocab, hidden, device=dev) * 0.05).to(dtype)
    wt = (torch.randn(vocab, hidden, device=dev) * 0.05).to(dtype)
    needs_logits = method in ("trl_gkd", "ours_chunked")
    needs_teacher_logits = method in ("trl_gkd", "ours_chunked", "ours_fused")
    with torch.no_grad():
        s_logits = (hs @ ws.t()).view(batch, length, vocab) if needs_logits else None
        t_logits = (ht @ wt.t()).view(batch, length, vocab) if needs_teacher_logits else None
    if s_logits is not None:
        s_logits.requires_grad_(True)
    hs.requires_grad_(True)
    ws.requires_grad_(True)

    # every import happens before the measurement starts
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from gkd.chunked import chunked_loss, teacher_topk, token_weights
    from gkd.losses import distillation_loss_per_token

    def run() -> torch.Tensor:
        if method == "trl_gkd":
            return GKDTrainer.generalized_jsd_loss(s_logits, t_logits, beta=0.5)
        if method == "trl_chunked":
            return _chunked_divergence_loss(hs.view(batch, length, hidden), ht.view(batch, length, hidden), ws, wt,
                                            mask, beta=0.5)[0]
        weights = token_weights(mask).reshape(-1)
        if method == "ours_fused_topk":
            with torch.no_grad():
                head = torch.nn.Linear(hidden, vocab, bias=False, device=dev, dtype=dtype)
                head.weight.copy_(wt)
                teacher = teacher_topk(ht, 64, head=head, chunk_size=CHUNK)
        else:
            teacher = t_logits.view(n, vocab)  # type: ignore[union-attr]

        def fn(z, rows):
            return {"loss": distillation_loss_per_token(z, teacher[rows], divergence="jsd", beta=0.5)}

        if method == "ours_chunked":
            total, _ = chunked_loss(fn, s_logits.view(n, vocab), weights, chunk_size=CHUNK)  # type: ignore[union-attr]
        else:
            total, _ = chunked_loss(fn, hs, weights, head=ws, chunk_size=CHUNK)
        return total / n

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _rss_kb("VmRSS") * 1024
    start = time.perf_counter()
    loss = run()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kb("VmHWM") * 1024 - base
    elapsed = time.perf_counter() - start
    return {"method": method, "batch": batch, "length": length, "vocab": vocab, "hidden": hidden, "device": device,
            "dtype": dtype_name, "loss": float(loss), "peak_bytes": int(peak), "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="V = 8192, T ∈ {64, 128}: a smoke test")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "B", "T", "V"), help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--max-gib", type=float, default=18.0, help="CPU: address-space cap per worker process")
    parser.add_argument("--from-json", help="re-render the table and plot of an earlier run's JSON")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        args.hidden = data["hidden"]
        _report(data["results"], data["results"][0].get("device", device), data["dtype"], data["vocab"], args)
        return
    if args.worker:
        method, b, t, v = args.worker
        print("RESULT " + json.dumps(worker(method, int(b), int(t), int(v), args.hidden, device, dtype)))
        return
    vocab = 8192 if args.quick else 151936
    shapes = [(1, 64), (1, 128)] if args.quick else [(1, 512), (1, 1024), (4, 512), (4, 1024)]
    methods = args.methods.split(",")
    results = []
    for b, t in shapes:
        for method in methods:  # alternating methods within each shape, each in a fresh process
            cmd = [sys.executable, __file__, "--worker", method, str(b), str(t), str(vocab), "--hidden",
                   str(args.hidden), "--device", device, "--dtype", dtype]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"},
                                      preexec_fn=_limit_memory(args.max_gib) if device == "cpu" else None)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                row = json.loads(line[7:]) if line else {"method": method, "batch": b, "length": t,
                                                         "error": (proc.stderr.strip().splitlines() or
                                                                   [f"exit {proc.returncode}"])[-1][:200]}
            except subprocess.TimeoutExpired:
                row = {"method": method, "batch": b, "length": t, "error": f"timeout {args.timeout}s"}
            results.append(row)
            shown = f"{row['peak_bytes'] / 2**30:8.2f} GiB {row['seconds']:8.2f} s" if "peak_bytes" in row \
                else row["error"]
            print(f"B={b} T={t:5d} {method:16s} {shown}", flush=True)
    _report(results, device, dtype, vocab, args)


def _report(results: list[dict], device: str, dtype: str, vocab: int, args: argparse.Namespace) -> None:
    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"loss_memory_{device}{'_quick' if args.quick else ''}"
    (out / f"{tag}.json").write_text(json.dumps({"machine": machine, "dtype": dtype, "vocab": vocab,
                                                  "hidden": args.hidden, "results": results}, indent=1))
    by = {(r["method"], r["batch"], r["length"]): r for r in results}
    shapes = sorted({(r["batch"], r["length"]) for r in results})
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    lines = [f"| B × T | {' | '.join(methods)} |", "|---|" + "---|" * len(methods)]
    for b, t in shapes:
        cells = []
        for m in methods:
            r = by.get((m, b, t), {})
            if "peak_bytes" in r:
                ratio = r["peak_bytes"] / by[("trl_gkd", b, t)]["peak_bytes"] \
                    if "peak_bytes" in by.get(("trl_gkd", b, t), {}) else None
                cells.append(f"{r['peak_bytes'] / 2**30:.2f} GiB, {r['seconds']:.1f} s"
                             + (f" ({ratio:.2f}×)" if ratio is not None and m != "trl_gkd" else ""))
            elif "allocate memory" in r.get("error", "") or "MemoryError" in r.get("error", ""):
                cells.append(f"out of memory (> {args.max_gib:g} GiB cap)")
            else:
                cells.append(r.get("error", "—"))
        lines.append(f"| {b} × {t} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    print(f"\nV = {vocab}, H = {args.hidden}, {dtype} on {device}; peak extra memory of forward+backward "
          "(ratio to trl_gkd)\n" + table)
    (out / f"{tag}.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in methods:
        pts = sorted((b * t, by[(m, b, t)]["peak_bytes"] / 2**30) for b, t in shapes if "peak_bytes" in by.get((m, b, t), {}))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xlabel("tokens in the batch (B × T)")
    ax.set_ylabel("peak extra memory (GiB)")
    ax.set_title(f"Loss forward+backward, V = {vocab}, {device}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{tag}.png", dpi=120)
    print(f"wrote {out / (tag + '.json')}, .md, .png")


if __name__ == "__main__":
    main()
