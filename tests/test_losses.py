"""Every divergence against a float64 brute-force loop over positions and vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from gkd.losses import (
    DIVERGENCES,
    distillation_loss_per_token,
    generalized_jsd,
    get_divergence,
    kd_per_token,
    masked_sum_and_count,
    reduce_loss,
)

B, T, V = 2, 3, 7


def _logits(seed: int, scale: float = 3.0, shape=(B, T, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _softmax64(row: torch.Tensor, temperature: float = 1.0) -> list[float]:
    row = [float(x) / temperature for x in row.double()]
    m = max(row)
    ex = [math.exp(x - m) for x in row]
    z = sum(ex)
    return [e / z for e in ex]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def brute(name: str, s_row: torch.Tensor, t_row: torch.Tensor, *, beta=0.5, skew=0.1, temperature=1.0) -> float:
    q, p = _softmax64(s_row, temperature), _softmax64(t_row, temperature)
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd" and beta in (0.0, 1.0):  # the GKD/TRL convention for the endpoints
        return _kl(p, q) if beta == 0.0 else _kl(q, p)
    if name == "jsd":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
    if name == "skew_forward_kl":
        return _kl(p, [skew * pi + (1 - skew) * qi for pi, qi in zip(p, q, strict=True)])
    if name == "skew_reverse_kl":
        return _kl(q, [(1 - skew) * pi + skew * qi for pi, qi in zip(p, q, strict=True)])
    raise KeyError(name)


def brute_per_token(name, s, t, **kw) -> torch.Tensor:
    out = torch.zeros(s.shape[:-1], dtype=torch.float64)
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            out[b, i] = brute(name, s[b, i], t[b, i], **kw)
    return out


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_matches_float64_brute_force(name, temperature):
    s, t = _logits(0), _logits(1)
    got = distillation_loss_per_token(s, t, divergence=name, beta=0.3, skew=0.2, temperature=temperature)
    want = brute_per_token(name, s, t, beta=0.3, skew=0.2, temperature=temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_brute_force_with_mask(beta):
    s, t = _logits(2), _logits(3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    got = generalized_jsd(s, t, beta=beta, mask=mask)
    per = brute_per_token("jsd", s, t, beta=beta)
    want = per[mask].mean()
    assert abs(float(got) - float(want)) < 1e-6


def test_jsd_endpoints_are_exact_kls():
    s, t = _logits(4), _logits(5)
    fkl = brute_per_token("forward_kl", s, t).mean()
    rkl = brute_per_token("reverse_kl", s, t).mean()
    assert abs(float(generalized_jsd(s, t, beta=0.0)) - float(fkl)) < 1e-6
    assert abs(float(generalized_jsd(s, t, beta=1.0)) - float(rkl)) < 1e-6
    # the endpoints are not ~0 (a known trap: mixing with weight 0 gives KL(P‖P))
    assert float(fkl) > 0.1 and float(rkl) > 0.1


def test_jsd_near_endpoints_is_small_but_positive():
    s, t = _logits(6), _logits(7)
    # the mixture form tends to 0 as β → 0; only the endpoint itself is defined as forward KL
    small = float(generalized_jsd(s, t, beta=1e-4))
    assert 0 < small < float(generalized_jsd(s, t, beta=0.5))


@pytest.mark.parametrize("name", sorted(set(DIVERGENCES) - {"kd"}))
def test_identical_inputs_give_zero(name):
    s = _logits(8)
    got = distillation_loss_per_token(s, s.clone(), divergence=name)
    assert torch.allclose(got, torch.zeros_like(got), atol=1e-6)


def test_all_masked_gives_zero_not_nan():
    s, t = _logits(9).requires_grad_(), _logits(10)
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss = generalized_jsd(s, t, beta=0.5, mask=mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_masked_positions_never_leak_even_if_nan():
    s, t = _logits(11), _logits(12)
    s[0, 2] = float("nan")
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = generalized_jsd(s, t, beta=0.5, mask=mask)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_bf16_inputs_computed_in_fp32(name):
    s, t = _logits(13).bfloat16(), _logits(14).bfloat16()
    got = distillation_loss_per_token(s, t, divergence=name)
    assert got.dtype == torch.float32
    assert (got >= -1e-6).all()
    want = brute_per_token(name, s.float(), t.float())  # same bf16-rounded values, float64 maths
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bf16_teacher_fp32_student_is_nonnegative():
    s = _logits(15, scale=8.0)
    t = s.bfloat16()  # nearly identical distributions, different dtypes
    got = distillation_loss_per_token(s, t, divergence="forward_kl")
    assert (got >= -1e-6).all()  # fp32 rounding only
    torch.testing.assert_close(got.double(), brute_per_token("forward_kl", s, t.float()), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_equals_trl(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    s, t = _logits(16, shape=(3, 5, 11)), _logits(17, shape=(3, 5, 11))
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))
    labels[0, 3:] = -100
    labels[2, 1:] = -100
    mask = labels != -100
    ours = generalized_jsd(s, t, beta=beta, temperature=temperature, mask=mask)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


def test_kd_matches_brute_force():
    s, t = _logits(18), _logits(19)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    w, temp = 0.3, 2.0
    got = kd_per_token(s, t, labels, kd_weight=w, temperature=temp)
    want = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            soft = brute("forward_kl", s[b, i], t[b, i], temperature=temp)
            ce = -math.log(_softmax64(s[b, i])[int(labels[b, i])])
            want[b, i] = w * temp**2 * soft + (1 - w) * ce
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # on student samples (no labels) only the soft term remains
    no_ce = kd_per_token(s, t, None, kd_weight=w, temperature=temp)
    torch.testing.assert_close(no_ce.double(), want - (1 - w) * torch.tensor(
        [[-math.log(_softmax64(s[b, i])[int(labels[b, i])]) for i in range(T)] for b in range(B)], dtype=torch.float64
    ), rtol=1e-5, atol=1e-6)


def test_kd_weight_zero_is_sft_without_teacher():
    s = _logits(20)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    got = distillation_loss_per_token(s, None, divergence="kd", kd_weight=0.0, labels=labels)
    want = torch.nn.functional.cross_entropy(s.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(B, T)
    torch.testing.assert_close(got, want)


def test_unknown_divergence_lists_valid_names():
    with pytest.raises(ValueError, match="unknown divergence 'jensen'.*forward_kl.*jsd"):
        get_divergence("jensen")


def test_sequence_mean_is_mean_of_per_sequence_means():
    per = torch.tensor([[1.0, 3.0, 100.0], [5.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    total, count = masked_sum_and_count(per, mask, "sequence_mean")
    assert count.item() == 2  # the empty sequence does not count
    assert reduce_loss(per, mask, "sequence_mean").item() == pytest.approx((2.0 + 5.0) / 2)
    assert reduce_loss(per, mask, "token_mean").item() == pytest.approx((1 + 3 + 5) / 3)
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_loss(per, mask, "batchmean")


def test_global_normalizer_over_micro_batches_equals_full_batch_gradient():
    """Sum over micro-batches (or ranks) of sum_i / N_global == full-batch token mean, gradients included."""
    s, t = _logits(21, shape=(4, 5, V)), _logits(22, shape=(4, 5, V))
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    full = s.clone().requires_grad_()
    generalized_jsd(full, t, beta=0.5, mask=mask).backward()

    split = s.clone().requires_grad_()
    n_global = mask.sum()
    for part in (slice(0, 1), slice(1, 4)):  # uneven token counts per micro-batch
        per = distillation_loss_per_token(split[part], t[part], divergence="jsd", beta=0.5)
        reduce_loss(per, mask[part], normalizer=n_global).backward()
    torch.testing.assert_close(split.grad, full.grad)
    # while averaging per-micro-batch means (the trap) gives a different gradient
    naive = s.clone().requires_grad_()
    for part in (slice(0, 1), slice(1, 4)):
        (generalized_jsd(naive[part], t[part], beta=0.5, mask=mask[part]) / 2).backward()
    assert not torch.allclose(naive.grad, full.grad)


def test_gradient_of_jsd_matches_float64_autograd():
    s, t = _logits(23), _logits(24)
    s32 = s.clone().requires_grad_()
    generalized_jsd(s32, t, beta=0.4).backward()
    s64 = s.double().requires_grad_()
    q = torch.softmax(s64, -1)
    p = torch.softmax(t.double(), -1)
    m = 0.4 * p + 0.6 * q
    ref = (0.4 * (p * (p / m).log()).sum(-1) + 0.6 * (q * (q / m).log()).sum(-1)).mean()
    ref.backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
