"""``term_grad_norm_steps``: each loss term's gradient norm, checked against the gradients the
optimizer really receives (and a float64 brute-force loss), and shown not to change training."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import capture_step_grads, tiny_model

from gkd.config import GKDConfig
from gkd.losses import generalized_jsd

ROWS = [
    {"prompt": "12+3=", "completion": "15"},
    {"prompt": "4+5=", "completion": "9"},
    {"prompt": "40+51=", "completion": "91"},
    {"prompt": "4567+8=", "completion": "4575"},
]


def _run(tokenizer, tmp_path, monkeypatch, name: str, **overrides):
    """One optimizer step; returns (logged metrics, the gradient AdamW applied by parameter name)."""
    from gkd.trainer import GKDTrainer

    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    captured = capture_step_grads(monkeypatch)
    fields = dict(teacher="unused", student="unused", dataset="unused", per_device_batch_size=4, max_steps=1,
                  max_grad_norm=1e9, max_new_tokens=6, output_dir=str(tmp_path / name), progress_bar=False,
                  save_final_model=False, seed=3, log_samples_steps=0)
    trainer = GKDTrainer(GKDConfig(**{**fields, **overrides}), student=student, teacher=teacher, tokenizer=tokenizer,
                         train_rows=ROWS)
    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.student).named_parameters()}
    history = trainer.train()
    monkeypatch.undo()
    assert len(captured) == 1
    return history[-1], {names[k]: v for k, v in captured[0].items()}


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def test_gkd_term_norm_is_the_norm_of_the_applied_gradient(tokenizer, tmp_path, monkeypatch):
    """Off-policy JSD, one micro-batch: ``grad_norm_divergence`` = ‖applied gradient‖ = ‖float64
    brute-force gradient of the token-mean JSD‖, with the diagnostic on; training is unchanged by it."""
    on, g_on = _run(tokenizer, tmp_path, monkeypatch, "on", lmbda=0.0, divergence="jsd", beta=0.5,
                    term_grad_norm_steps=1)
    off, g_off = _run(tokenizer, tmp_path, monkeypatch, "off", lmbda=0.0, divergence="jsd", beta=0.5)
    assert "grad_norm_divergence" not in off
    for name in g_on:  # the diagnostic forward/backward leaves the step's gradient as it was
        torch.testing.assert_close(g_on[name], g_off[name], rtol=0, atol=0, msg=name)

    # brute force: every row unpadded, float64, one masked token mean
    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11).double()
    teacher = tiny_model(tokenizer, hidden=64, seed=12).double()
    s_rows, t_rows = [], []
    for row in ROWS:
        p = tokenizer(row["prompt"]).input_ids
        c = tokenizer(row["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids = torch.tensor([p + c])
        s_rows.append(student(ids).logits[0, len(p) - 1 : len(p) + len(c) - 1])
        with torch.no_grad():
            t_rows.append(teacher(ids).logits[0, len(p) - 1 : len(p) + len(c) - 1])
    pad = max(len(x) for x in s_rows)
    mask = torch.tensor([[t < len(x) for t in range(pad)] for x in s_rows])
    s = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, pad - len(x))) for x in s_rows])
    t = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, pad - len(x))) for x in t_rows])
    generalized_jsd(s, t, beta=0.5, mask=mask).backward()
    want = _norm({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    assert on["grad_norm_divergence"] == pytest.approx(want, rel=1e-4)
    assert on["grad_norm_loss"] == pytest.approx(want, rel=1e-4)
    assert on["grad_norm"] == pytest.approx(want, rel=1e-4)


def test_minillm_terms_decompose_the_applied_gradient(tokenizer, tmp_path, monkeypatch):
    """MiniLLM's loss = pg + coef·single_step: with the single-step term off, the applied gradient is the
    pg term's alone, so ``grad_norm_pg`` = ‖g_pg‖ and ``grad_norm_single_step`` = ‖g_full − g_pg‖,
    from two real optimizer steps on the same rollouts."""
    minillm = dict(algorithm="minillm", num_rollouts=4, ppo_epochs=1, teacher_mix=0.2, single_step_coef=0.7,
                   term_grad_norm_steps=1)
    full, g_full = _run(tokenizer, tmp_path, monkeypatch, "full", **minillm)
    pg_only, g_pg = _run(tokenizer, tmp_path, monkeypatch, "pg", **{**minillm, "single_step_coef": 0.0})
    assert pg_only["pg"] == pytest.approx(full["pg"], rel=1e-6), "same rollouts in both runs"
    assert full["grad_norm_pg"] == pytest.approx(_norm(g_pg), rel=1e-4)
    assert full["grad_norm_single_step"] == pytest.approx(_norm({n: g_full[n] - g_pg[n] for n in g_full}), rel=1e-4)
    assert full["grad_norm_loss"] == pytest.approx(_norm(g_full), rel=1e-4)
    assert pg_only["grad_norm_single_step"] == 0.0


def test_lm_loss_norm_and_the_unsupported_paths(tokenizer, tmp_path, monkeypatch):
    """``grad_norm_lm`` appears with an LM dataset and equals the applied gradient when it is the only
    term that moves (single-step off, pg with zero advantages is not guaranteed, so compare against a
    run without the LM loss); fused_lm_head logs no per-term norm (warned once)."""
    rows = tmp_path / "lm.jsonl"
    rows.write_text("\n".join('{"text": "1+2=3 and 4+4=8"}' for _ in range(8)) + "\n")
    minillm = dict(algorithm="minillm", num_rollouts=4, ppo_epochs=1, teacher_mix=0.0, term_grad_norm_steps=1)
    with_lm, g_lm = _run(tokenizer, tmp_path, monkeypatch, "lm", **minillm, lm_dataset=str(rows), lm_coef=0.5)
    without, g_no = _run(tokenizer, tmp_path, monkeypatch, "nolm", **minillm)
    assert with_lm["grad_norm_lm"] == pytest.approx(_norm({n: g_lm[n] - g_no[n] for n in g_lm}), rel=1e-4)
    fused, _ = _run(tokenizer, tmp_path, monkeypatch, "fused", lmbda=0.0, fused_lm_head=True, term_grad_norm_steps=1)
    assert not any(k.startswith("grad_norm_") for k in fused)
