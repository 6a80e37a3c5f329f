"""GPU paths (``-m gpu``): bf16 steps, the chunked / fused losses and the sampler on the device, vLLM's
rollout. They run where CUDA is, or on any device named by ``GKD_TEST_DEVICE`` (the ``--dry-run`` of
``benchmarks/gpu_check.sh`` runs them on ``cpu`` so that CI keeps them from rotting); else skipped."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model

DEVICE = os.environ.get("GKD_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not DEVICE, reason="no CUDA device (set GKD_TEST_DEVICE to force)")]
ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5), (40, 51), (7, 8), (33, 9),
                                                                       (61, 20), (5, 5), (18, 27)]]


def _train(tokenizer, tmp_path, name: str, **overrides):
    from accelerate.state import AcceleratorState

    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    AcceleratorState._reset_state(reset_partial_state=True)  # a new mixed precision needs a fresh state
    fields = dict(teacher="unused", student="unused", dataset="unused", per_device_batch_size=4, max_steps=2,
                  max_new_tokens=6, output_dir=str(tmp_path / name), progress_bar=False, save_final_model=False,
                  seed=3, log_samples_steps=0, divergence="jsd", beta=0.5)
    trainer = GKDTrainer(GKDConfig(**{**fields, **overrides}), tokenizer=tokenizer, train_rows=ROWS,
                         student=tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11),
                         teacher=tiny_model(tokenizer, hidden=64, seed=12))
    assert trainer.accelerator.device.type == torch.device(DEVICE).type
    return trainer.train()


def test_bf16_gkd_step_matches_fp32(tokenizer, tmp_path, monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    fp32 = _train(tokenizer, tmp_path, "fp32", lmbda=0.0)
    bf16 = _train(tokenizer, tmp_path, "bf16", lmbda=0.0, mixed_precision="bf16")
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=3e-2)  # same references, bf16 autocast
    on_policy = _train(tokenizer, tmp_path, "bf16-on", lmbda=1.0, mixed_precision="bf16")
    assert all(torch.isfinite(torch.tensor(h["loss"])) and h["skipped"] == 0 for h in on_policy)


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_and_fused_losses_on_device_equal_the_float64_reference(fused):
    from gkd.chunked import chunked_loss
    from gkd.losses import generalized_jsd_per_token, log_probs

    def jsd(z, teacher):
        return generalized_jsd_per_token(log_probs(z), log_probs(teacher), 0.5)

    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 48, 32, 1000
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.3
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    weights = torch.rand(n, generator=g, dtype=torch.float64)

    # reference: float64 on the CPU, all positions at once
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    per_token = jsd(h_ref @ w_ref.t(), t)
    (per_token * weights).sum().backward()

    dev = torch.device(DEVICE)
    hd = h.float().to(dev).requires_grad_()
    wd = w.float().to(dev).requires_grad_()
    td, wts = t.float().to(dev), weights.float().to(dev)

    def fn(z, rows):
        return {"loss": jsd(z, td[rows])}

    if fused:
        total, _ = chunked_loss(fn, hd, wts, head=wd, chunk_size=16)
    else:
        total, _ = chunked_loss(fn, hd @ wd.t(), wts, chunk_size=16)
    total.backward()
    assert float(total) == pytest.approx(float((per_token * weights).sum()), rel=1e-4)
    torch.testing.assert_close(hd.grad.double().cpu(), h_ref.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(wd.grad.double().cpu(), w_ref.grad, rtol=1e-3, atol=1e-5)


def test_sampler_on_device_equals_hf_generate_greedy(tokenizer):
    from gkd.rollout import SamplingParams, sample

    model = tiny_model(tokenizer, hidden=64, seed=7).to(DEVICE)
    enc = tokenizer(["12+34=", "5+6=", "987+1="], padding=True, return_tensors="pt").to(DEVICE)
    ours = sample(model, enc.input_ids, enc.attention_mask.bool(), SamplingParams(max_new_tokens=8, do_sample=False),
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    hf = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)[:, enc.input_ids.shape[1]:]
    for i in range(3):
        mine = ours.completion_ids[i][ours.completion_mask[i]].tolist()
        theirs = hf[i].tolist()
        theirs = theirs[: theirs.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in theirs else theirs
        assert mine == theirs, i


def test_vllm_rollout_samples_our_samplers_distribution(tokenizer, tmp_path):
    """First-token frequencies of vLLM's rollout and ours on one prompt, 4,000 draws each: total
    variation distance under 0.05 (both sample the same model at temperature 1)."""
    pytest.importorskip("vllm")
    if DEVICE != "cuda":
        pytest.skip("vLLM needs CUDA")
    from gkd.rollout import SamplingParams, sample
    from gkd.rollout_vllm import VLLMSampler

    model = tiny_model(tokenizer, hidden=64, seed=7).to(DEVICE)
    model.config.save_pretrained(tmp_path)
    params = SamplingParams(max_new_tokens=1, temperature=1.0)
    sampler = VLLMSampler(str(tmp_path), params, max_model_len=32, vocab_size=len(tokenizer),
                          model_vocab_size=len(tokenizer), eos_token_ids=[tokenizer.eos_token_id],
                          pad_token_id=tokenizer.pad_token_id, dtype="float32", gpu_memory_utilization=0.2,
                          engine_kwargs={"load_format": "dummy", "skip_tokenizer_init": True})
    sampler.sync(model, version=0)
    n = 4000
    prompts = torch.tensor([[5, 6, 7, 14]] * n, device=DEVICE)
    mask = torch.ones_like(prompts, dtype=torch.bool)
    theirs = sampler.sample(prompts, mask, torch.Generator(DEVICE).manual_seed(0)).completion_ids[:, 0]
    ours = sample(model, prompts, mask, params, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  vocab_size=len(tokenizer), generator=torch.Generator(DEVICE).manual_seed(1)).completion_ids[:, 0]
    v = len(tokenizer)
    tv = 0.5 * (torch.bincount(theirs.cpu(), minlength=v) / n - torch.bincount(ours.cpu(), minlength=v) / n).abs().sum()
    assert float(tv) < 0.05
