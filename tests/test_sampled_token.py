"""The sampled-token objective (tinker-cookbook's on-policy distillation, gkd.sampled_token): per-sample
gradient against a float64 hand loop, its expectation against the reverse KL's gradient by exact
enumeration, and training against local, served and vLLM teachers from the token's log-prob alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_model

from gkd.losses import reverse_kl
from gkd.sampled_token import sampled_reverse_kl_per_token


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_per_sample_gradient_matches_a_float64_hand_loop(tau):
    """d loss_t / d z_v = (log q(y_t) − log p(y_t))·(1[v = y_t] − q_v)/τ, value log q(y_t) − log p(y_t)."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 6, 5
    z = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2).requires_grad_()
    log_p = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, vocab, (n,), generator=g)
    loss = sampled_reverse_kl_per_token(z, log_p.gather(-1, y[:, None])[:, 0], y, tau)
    loss.sum().backward()
    for i in range(n):
        row = [float(v) / tau for v in z[i].detach()]
        norm = math.log(sum(math.exp(v) for v in row))
        q = [math.exp(v - norm) for v in row]
        k1 = (row[int(y[i])] - norm) - float(log_p[i, y[i]])
        assert float(loss[i].detach()) == pytest.approx(k1, abs=1e-12)
        for v in range(vocab):
            expected = k1 * ((1.0 if v == int(y[i]) else 0.0) - q[v]) / tau
            assert float(z.grad[i, v]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_expected_gradient_is_the_reverse_kl_gradient_by_enumeration(tau):
    """Σ_y q(y)·∇loss(y) = ∇KL(q‖p) exactly (float64), y enumerated over the vocabulary: the sampled-token
    objective is an unbiased estimate of the per-token reverse KL's gradient on the student's samples."""
    g = torch.Generator().manual_seed(1)
    vocab = 6
    z0 = torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5
    log_p = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(z0 / tau, -1)
    expected_grad = torch.zeros(vocab, dtype=torch.float64)
    for y in range(vocab):
        z = z0.clone().requires_grad_()
        sampled_reverse_kl_per_token(z, log_p[y], torch.tensor(y), tau).backward()
        expected_grad += q[y] * z.grad
    z = z0.clone().requires_grad_()
    kl = (torch.softmax(z / tau, -1) * (torch.log_softmax(z / tau, -1) - log_p)).sum()
    kl.backward()
    torch.testing.assert_close(expected_grad, z.grad, rtol=0, atol=1e-12)
    # the library's reverse KL (fp32) has the same gradient
    zf = z0.float().requires_grad_()
    reverse_kl(torch.log_softmax(zf / tau, -1), log_p.float()).backward()
    torch.testing.assert_close(expected_grad.float(), zf.grad, rtol=1e-5, atol=1e-6)
    # and the expected value is the reverse KL itself
    values = [float(sampled_reverse_kl_per_token(z0, log_p[y], torch.tensor(y), tau).detach()) for y in range(vocab)]
    assert sum(float(q[y]) * values[y] for y in range(vocab)) == pytest.approx(float(kl), abs=1e-12)


# --- in training -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_model(tokenizer, hidden=64, seed=12)


def test_served_and_vllm_teachers_give_the_local_losses_from_one_log_prob_per_token(tokenizer, tmp_path, teacher,
                                                                                    monkeypatch):
    """divergence: sampled_reverse_kl, λ = 1: a served teacher (gkd serve-teacher with teacher_topk set,
    vLLM's server without) is asked for k = 1 only, and the per-step losses equal the local teacher's."""
    from fake_vllm_server import create_fake_vllm_app
    from test_served_teacher import LoopbackServer, _train

    from gkd.serving.client import RemoteTeacher
    from gkd.serving.server import TeacherService

    asked: list[int] = []
    score = RemoteTeacher.score
    monkeypatch.setattr(RemoteTeacher, "score", lambda self, r, k, t=1.0: (asked.append(k), score(self, r, k, t))[1])
    fields = dict(lmbda=1.0, divergence="sampled_reverse_kl", teacher_topk=0, temperature=1.0)
    _, local = _train(tokenizer, tmp_path, "local", copy.deepcopy(teacher), **fields)
    for name, app, k in (("gkd", None, 5), ("vllm", create_fake_vllm_app(copy.deepcopy(teacher), tokenizer), 0)):
        srv = LoopbackServer(app if app is not None else TeacherService(copy.deepcopy(teacher), tokenizer)).start()
        try:
            asked.clear()
            trainer, remote = _train(tokenizer, tmp_path, name, None, **{**fields, "teacher": srv.url, "teacher_topk": k})
        finally:
            srv.stop()
        assert trainer.teacher.backend == name and asked and set(asked) == {1}
        for a, b in zip(local, remote, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), (name, a["step"])
    assert all(math.isfinite(h["loss"]) for h in local)


def test_local_top_k_teacher_and_skd_rollouts_supply_the_token_log_prob(tokenizer, tmp_path, teacher):
    """With teacher_topk the local scorer gathers log p(y_t) from its chunks (same losses as full logits),
    beside a top-k objective; with rollout: skd the sampler's stored log p(y_t) is used and the teacher
    is not run again for the loss."""
    from test_served_teacher import _train

    fields = dict(lmbda=1.0, objectives=["0.5*sampled_reverse_kl", "0.5*jsd"], log_samples_steps=0)
    _, full = _train(tokenizer, tmp_path, "full", copy.deepcopy(teacher), teacher_topk=0, **fields)
    _, topk = _train(tokenizer, tmp_path, "topk", copy.deepcopy(teacher), teacher_topk=len(tokenizer), **fields)
    for a, b in zip(full, topk, strict=True):
        assert b["loss_sampled_reverse_kl"] == pytest.approx(a["loss_sampled_reverse_kl"], rel=1e-5, abs=1e-6)
    calls = []
    counted = copy.deepcopy(teacher)
    counted.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    _, skd = _train(tokenizer, tmp_path, "skd", counted, lmbda=1.0, divergence="sampled_reverse_kl", rollout="skd",
                    skd_top_k=3, log_samples_steps=0, max_steps=2)
    assert all(math.isfinite(h["loss"]) and 0 <= h["skd_replaced"] <= 1 for h in skd)
    # per step: one pass over the prompts (> 4 tokens here), then ≤ skd_draft_tokens (4) per round; a scoring
    # pass over prompt + completion would add a long call per step
    assert sum(c > 4 for c in calls) == 2


@pytest.mark.parametrize("fields, words", [
    (dict(teacher="http://127.0.0.1:1", divergence="jsd", teacher_topk=0), "set teacher_topk"),
    (dict(divergence="sampled_reverse_kl", teacher_cache="some/dir", teacher_topk=8), "drop teacher_cache"),
])
def test_what_needs_more_than_the_token_log_prob_is_refused(fields, words):
    from gkd.config import ConfigError, GKDConfig

    with pytest.raises(ConfigError, match=words):
        GKDConfig(**{"teacher": "t", "student": "s", **fields})
    ok = GKDConfig(teacher="http://127.0.0.1:1", student="s", divergence="sampled_reverse_kl", lmbda=1.0)
    assert ok.teacher_topk == 0
