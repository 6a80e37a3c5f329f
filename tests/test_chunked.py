"""Chunked losses with the gradient formed in forward: equal to the unchunked reference for values
and gradients, with logits or with the fused LM head; top-k teacher with a tail bucket, exact at k = V."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gkd.chunked import chunked_loss, teacher_topk, token_weights
from gkd.config import ConfigError, GKDConfig
from gkd.losses import (
    DIVERGENCES,
    TeacherTopK,
    distillation_loss_per_token,
    masked_sum_and_count,
    single_step_reverse_kl,
)

N, H, V = 37, 8, 23


def _data(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    head = torch.randn(V + 3, H, generator=g, dtype=dtype) * 0.7  # padded head: 3 rows beyond the vocabulary
    teacher = torch.randn(N, V, generator=g, dtype=dtype) * 2
    ids = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.2
    return hidden, head, teacher, ids, mask


def _objective(name):
    def fn(z, teacher, ids):
        kw = dict(divergence=name, beta=0.3, skew=0.1, temperature=1.7, kd_weight=0.6, labels=ids, targets=ids)
        return {"loss": distillation_loss_per_token(z, teacher, **kw)}
    return fn


@pytest.mark.parametrize("name", [*sorted(DIVERGENCES), "dkd", "logit_mse"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_equals_unchunked_values_and_gradients(name, chunk):
    hidden, head, teacher, ids, mask = _data()
    fn = _objective(name)
    w = token_weights(mask)
    # reference: everything at once, plain autograd
    logits_ref = (hidden @ head.t())[:, :V].clone().requires_grad_(True)
    ref_terms = fn(logits_ref, teacher, ids)
    ref = masked_sum_and_count(ref_terms["loss"], mask)[0]
    ref.backward()
    # chunked on logits
    logits = (hidden @ head.t())[:, :V].clone().requires_grad_(True)
    total, terms = chunked_loss(lambda z, r: fn(z, teacher[r], ids[r]), logits, w, chunk_size=chunk)
    (2.0 * total).backward()  # the upstream gradient is applied in backward
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-6)
    expect = torch.where(mask, ref_terms["loss"].detach(), torch.zeros(()))  # masked rows are never computed
    torch.testing.assert_close(terms["loss"], expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, 2.0 * logits_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [4, 100])
def test_fused_lm_head_equals_logits_path(chunk):
    hidden, head, teacher, ids, mask = _data(1)
    fn = _objective("jsd")
    w = token_weights(mask)
    h_ref, W_ref = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    ref = masked_sum_and_count(fn((h_ref @ W_ref.t())[:, :V], teacher, ids)["loss"], mask)[0]
    ref.backward()
    h, W = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    total, _ = chunked_loss(lambda z, r: fn(z, teacher[r], ids[r]), h, w, head=W, vocab_size=V, chunk_size=chunk)
    total.backward()
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-5, atol=1e-6)
    assert W.grad[V:].abs().max() == 0  # padded rows never receive gradient


def test_float64_reference_for_the_chunked_path():
    hidden, head, teacher, ids, mask = (t.double() if t.is_floating_point() else t for t in _data(2))
    fn = _objective("reverse_kl")
    h = hidden.clone().requires_grad_(True)
    total, _ = chunked_loss(lambda z, r: fn(z, teacher[r], ids[r]), h.float(), token_weights(mask), head=head.float(),
                            vocab_size=V, chunk_size=7)
    total.backward()
    h64 = hidden.clone().requires_grad_(True)
    ref = masked_sum_and_count(fn((h64 @ head.t())[:, :V], teacher, ids)["loss"], mask)[0]
    ref.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(h.grad, h64.grad, rtol=1e-4, atol=1e-6)


def test_sequence_mean_weights_match_the_reduction():
    g = torch.Generator().manual_seed(3)
    values, mask = torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g) > 0.3
    expect = masked_sum_and_count(values, mask, "sequence_mean")[0]
    assert (token_weights(mask, "sequence_mean") * values).sum().item() == pytest.approx(expect.item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_topk_with_k_equal_vocab_is_exact(name):
    _, _, teacher, ids, _ = _data(4)
    student = torch.randn(N, V, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    kw = dict(divergence=name, beta=0.3, skew=0.1, temperature=1.3, kd_weight=0.6, labels=ids)
    dense = distillation_loss_per_token(student, teacher, **kw)
    (g_dense,) = torch.autograd.grad(dense.sum(), student)
    top = teacher_topk(teacher, V, temperature=1.3, chunk_size=8)
    sparse = distillation_loss_per_token(student, top, **kw)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), student)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-5, atol=1e-6)


def test_topk_buckets_match_brute_force_and_bound_the_error():
    _, _, teacher, _, _ = _data(6)
    student = torch.randn(N, V, generator=torch.Generator().manual_seed(7))
    top = teacher_topk(teacher, 5)
    p, q = teacher.double().softmax(-1), student.double().softmax(-1)
    for i in range(3):
        idx = top.indices[i].tolist()
        rest = [v for v in range(V) if v not in idx]
        pb = [p[i, v].item() for v in idx] + [sum(p[i, v].item() for v in rest)]
        qb = [q[i, v].item() for v in idx] + [sum(q[i, v].item() for v in rest)]
        import math

        ref = sum(a * math.log(a / b) for a, b in zip(pb, qb, strict=True) if a > 0)
        got = distillation_loss_per_token(student[i : i + 1], top.rows(slice(i, i + 1)), divergence="forward_kl")
        assert got.item() == pytest.approx(ref, rel=1e-5)
    # coarsening never increases an f-divergence (data-processing inequality)
    full = distillation_loss_per_token(student, teacher, divergence="forward_kl")
    assert (distillation_loss_per_token(student, top, divergence="forward_kl") <= full + 1e-6).all()


def test_topk_from_hidden_states_with_head_equals_from_logits():
    hidden, head, _, _, _ = _data(8)
    lin = torch.nn.Linear(H, V + 3, bias=False)
    lin.weight.data.copy_(head)
    a = teacher_topk(hidden, 6, head=lin, vocab_size=V, chunk_size=5)
    b = teacher_topk((hidden @ head.t())[:, :V], 6)
    torch.testing.assert_close(a.logprobs, b.logprobs)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.log_tail, b.log_tail)


def test_single_step_and_topk_reject_objectives_that_need_every_logit():
    _, _, teacher, ids, _ = _data(9)
    student = torch.randn(N, V)
    top = teacher_topk(teacher, V)
    torch.testing.assert_close(single_step_reverse_kl(student, top), single_step_reverse_kl(student, teacher),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot use teacher_topk"):
        distillation_loss_per_token(student, top, divergence="dkd", targets=ids)
    assert isinstance(top, TeacherTopK)


# --- through the trainer ----------------------------------------------------------------------------

def _run(tmp_path, name, *extra):
    import json

    from gkd.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / ("minillm_tiny.yaml" if "minillm" in name else "tiny.yaml")
    out = tmp_path / name
    assert main(["train", str(recipe), f"output_dir={out}", "progress_bar=false", "save_final_model=false",
                 *extra] + ([] if any(e.startswith("max_steps=") for e in extra) else ["max_steps=4"])) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trainer_loss_paths_agree(tmp_path):
    """Unchunked autograd, chunks of 3 tokens, the fused LM head and an exact top-k teacher (k = V = 15)
    train identically: same per-step losses and gradient norms."""
    common = ["lmbda=0.5", "objectives=[0.6*jsd(beta=0.3), 0.4*kd]", "kd_weight=0.5", "loss_temperature=1.5"]
    ref = _run(tmp_path, "ref", *common, "loss_chunk_size=0")
    for extra in (["loss_chunk_size=3"], ["fused_lm_head=true", "loss_chunk_size=5"], ["teacher_topk=15"]):
        rows = _run(tmp_path, "_".join(extra).replace("=", "-"), *common, *extra)
        assert [r["on_policy"] for r in rows] == [r["on_policy"] for r in ref]
        for key in ("loss", "loss_kd", "grad_norm"):
            assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref], rel=2e-4, abs=1e-6), (extra, key)


def test_minillm_paths_agree_and_topk_scores_each_buffer_once(tmp_path, monkeypatch):
    import gkd.algorithms.common

    calls = []
    real_score = gkd.algorithms.common.score
    monkeypatch.setattr(gkd.algorithms.common, "score", lambda *a, **k: calls.append(k.get("topk", 0)) or real_score(*a, **k))
    common = ["single_step_weighted=true", "objectives=[0.5*reverse_kl]", "ppo_epochs=2", "max_steps=4"]
    ref = _run(tmp_path, "minillm_ref", *common, "loss_chunk_size=0")
    topk = _run(tmp_path, "minillm_topk", *common, "teacher_topk=15", "loss_chunk_size=4")
    full_calls, topk_calls = calls.count(0), calls.count(15)
    assert full_calls == 2 * topk_calls > 0  # the second PPO epoch reuses the buffer's top-k teacher scores
    for key in ("loss", "pg", "single_step", "loss_reverse_kl", "ratio"):
        assert [r[key] for r in topk] == pytest.approx([r[key] for r in ref], rel=2e-4, abs=1e-6), key


def test_fused_head_and_topk_config_errors(tmp_path):
    from gkd.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    with pytest.raises(ConfigError, match="cannot be used with 'dkd'"):
        GKDConfig(student="s", teacher="t", divergence="dkd", teacher_topk=8)
    assert main(["train", tiny, f"output_dir={tmp_path}", "teacher_topk=4", "objectives=[logit_mse]"]) == 2
