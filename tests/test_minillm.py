"""MiniLLM: teacher-mixed sampling and every loss term against float64 brute force."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from gkd.losses import single_step_reverse_kl
from gkd.policy_gradient import (
    importance_weights,
    minillm_returns,
    minillm_rewards,
    policy_gradient_loss,
    ppo_clipped_loss,
    ppo_clipped_share,
    whiten,
)
from gkd.rollout import SamplingParams, build_logits_processors, sample


class FixedLM(torch.nn.Module):
    """Same next-token logits at every position, whatever the input."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, t, -1).clone(), past_key_values=None)


# --- teacher-mixed sampling ------------------------------------------------------------------


def test_teacher_mixed_sampling_draws_from_the_mixture_chi_square():
    q_logits, p_logits, mix = [2.0, 0.0, -1.0, 1.0, 0.5], [-1.0, 2.5, 0.0, 0.0, -3.0], 0.3
    student, teacher = FixedLM(q_logits), FixedLM(p_logits)
    n = 20000
    ids, mask = torch.full((n, 2), 1), torch.ones(n, 2, dtype=torch.bool)
    r = sample(student, ids, mask, SamplingParams(max_new_tokens=1), eos_token_id=99, pad_token_id=0,
               generator=torch.Generator().manual_seed(0), teacher=teacher, teacher_mix=mix)
    q, p = torch.softmax(torch.tensor(q_logits, dtype=torch.float64), -1), torch.softmax(torch.tensor(p_logits, dtype=torch.float64), -1)
    expected = (mix * p + (1 - mix) * q) * n
    counts = torch.bincount(r.completion_ids[:, 0], minlength=5).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # df=4, p=0.001
    # the student alone would be rejected: the test has power
    chi2_student = float(((counts - q * n) ** 2 / (q * n)).sum())
    assert chi2_student > 100
    # stored per-token log-probs are log q, log p and log p̃ of the drawn token
    tok = r.completion_ids[:, 0]
    torch.testing.assert_close(r.sampled_logprobs[:, 0].double(), q.log()[tok], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.teacher_logprobs[:, 0].double(), p.log()[tok], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.mixed_logprobs[:, 0].double(), (mix * p + (1 - mix) * q).log()[tok], rtol=1e-5, atol=1e-5)


def test_processors_apply_to_both_models_before_mixing():
    """With top-k=1 each model is a point mass on its argmax: the mixture only ever draws those two."""
    student, teacher = FixedLM([3.0, 0.0, 0.0, 0.0]), FixedLM([0.0, 0.0, 3.0, 0.0])
    ids, mask = torch.full((4000, 1), 1), torch.ones(4000, 1, dtype=torch.bool)
    r = sample(student, ids, mask, SamplingParams(max_new_tokens=1, top_k=1), eos_token_id=99, pad_token_id=0,
               generator=torch.Generator().manual_seed(1), teacher=teacher, teacher_mix=0.25)
    counts = torch.bincount(r.completion_ids[:, 0], minlength=4)
    assert counts[1] == counts[3] == 0
    assert abs(counts[2].item() / 4000 - 0.25) < 0.03


def test_teacher_mix_zero_equals_the_plain_sampler(tokenizer):
    student, teacher = tiny_model(tokenizer, hidden=32, seed=1), tiny_model(tokenizer, hidden=64, seed=2)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6=", "<bos>987+1="], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    kw = dict(eos_token_id=2, pad_token_id=0, vocab_size=len(tokenizer))
    # no top-k / top-p: with a cut, the mixed sampler stores the uncut log q_old (see the test below)
    params = SamplingParams(max_new_tokens=8, temperature=0.8)
    plain = sample(student, enc.input_ids, enc.attention_mask, params, generator=torch.Generator().manual_seed(3), **kw)
    mixed = sample(student, enc.input_ids, enc.attention_mask, params, generator=torch.Generator().manual_seed(3),
                   teacher=teacher, teacher_mix=0.0, **kw)
    assert torch.equal(plain.completion_ids, mixed.completion_ids)
    assert torch.equal(plain.completion_mask, mixed.completion_mask)
    torch.testing.assert_close(plain.sampled_logprobs, mixed.sampled_logprobs)
    torch.testing.assert_close(mixed.mixed_logprobs, mixed.sampled_logprobs)  # p̃ = q when mix = 0
    assert mixed.teacher_logprobs is not None and plain.teacher_logprobs is None


def test_teacher_logprobs_from_sampling_match_a_teacher_forward(tokenizer):
    """log p(y_t) kept from teacher-mixed sampling equals a separate teacher scoring pass."""
    from gkd.scorer import completion_logits

    student, teacher = tiny_model(tokenizer, hidden=32, seed=4), tiny_model(tokenizer, hidden=64, seed=5)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6="], add_special_tokens=False, padding=True, return_tensors="pt")
    r = sample(student, enc.input_ids, enc.attention_mask, SamplingParams(8), eos_token_id=2, pad_token_id=0,
               generator=torch.Generator().manual_seed(6), teacher=teacher, teacher_mix=0.5)
    with torch.no_grad():
        ref = torch.log_softmax(completion_logits(teacher, r).float(), -1).gather(-1, r.completion_ids[..., None])[..., 0]
    m = r.completion_mask
    torch.testing.assert_close(r.teacher_logprobs[m], ref[m], rtol=1e-4, atol=1e-4)


class MarkovLM(torch.nn.Module):
    """Next-token logits depend on the current input token only: ``table[token]``. Ignores caches and
    masks, so exact sequence probabilities can be enumerated by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        return SimpleNamespace(logits=self.table[input_ids].clone(), past_key_values=None)


def _sequence_probs(q_tab, p_tab, mix, start, eos, length):
    """Exact probability of every completion (cut at EOS) under p̃ = mix·p + (1−mix)·q, float64."""
    q, p = torch.softmax(q_tab.double(), -1), torch.softmax(p_tab.double(), -1)
    mixed = mix * p + (1 - mix) * q
    probs = {}

    def walk(prefix, last, prob):
        if len(prefix) == length or (prefix and prefix[-1] == eos):
            probs[tuple(prefix)] = probs.get(tuple(prefix), 0.0) + prob
            return
        for tok in range(mixed.shape[1]):
            walk(prefix + [tok], tok, prob * float(mixed[last, tok]))

    walk([], start, 1.0)
    return probs, q, p, mixed


@pytest.mark.parametrize("k", [1, 2, 4])
def test_speculative_mixed_sampling_draws_whole_sequences_from_the_mixture(k):
    """χ² over every completion of 3 tokens (EOS = 3 ends early): the committed sequences follow
    p̃ exactly for any draft length k, including rejections, residual draws and EOS inside a round."""
    g = torch.Generator().manual_seed(11)
    q_tab, p_tab, mix, eos = torch.randn(4, 4, generator=g) * 1.5, torch.randn(4, 4, generator=g) * 1.5, 0.35, 3
    probs, q, p, mixed = _sequence_probs(q_tab, p_tab, mix, start=1, eos=eos, length=3)
    n = 40000
    ids, mask = torch.full((n, 2), 1), torch.ones(n, 2, dtype=torch.bool)
    r = sample(MarkovLM(q_tab), ids, mask, SamplingParams(max_new_tokens=3), eos_token_id=eos, pad_token_id=0,
               generator=torch.Generator().manual_seed(k), teacher=MarkovLM(p_tab), teacher_mix=mix, draft_tokens=k)
    counts: dict[tuple, int] = {}
    for row, m in zip(r.completion_ids.tolist(), r.completion_mask.tolist(), strict=True):
        seq = tuple(t for t, keep in zip(row, m, strict=True) if keep)
        counts[seq] = counts.get(seq, 0) + 1
    assert set(counts) <= set(probs)
    chi2 = sum((counts.get(s, 0) - n * pr) ** 2 / (n * pr) for s, pr in probs.items())
    df = len(probs) - 1  # 40 cells here
    assert chi2 < df + 4 * math.sqrt(2 * df)  # ≈ p < 0.001
    student_only, _, _, _ = _sequence_probs(q_tab, p_tab, 0.0, start=1, eos=eos, length=3)
    chi2_student = sum((counts.get(s, 0) - n * pr) ** 2 / (n * pr) for s, pr in student_only.items())
    assert chi2_student > 10 * df  # the test has power: the student's own distribution is rejected
    # stored log q, log p, log p̃ of every committed token, conditioned on the token before it
    prev = torch.cat([torch.ones(n, 1, dtype=torch.long), r.completion_ids[:, :-1]], 1)
    m, tok = r.completion_mask, r.completion_ids
    for stored, table in ((r.sampled_logprobs, q), (r.teacher_logprobs, p), (r.mixed_logprobs, mixed)):
        torch.testing.assert_close(stored[m].double(), table.log()[prev[m], tok[m]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_speculative_rounds_keep_the_caches_right(tokenizer, k):
    """Real transformers with KV caches: rejected drafts leave holes in the attention mask, yet the
    stored log q and log p equal fresh no-cache forwards of the final sequences."""
    from gkd.scorer import completion_logits

    student, teacher = tiny_model(tokenizer, hidden=32, seed=4), tiny_model(tokenizer, hidden=64, seed=5)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6=", "<bos>987+1="], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    masks = []
    teacher.register_forward_pre_hook(lambda mod, args, kw: masks.append(kw["attention_mask"].clone()), with_kwargs=True)
    params = SamplingParams(10, temperature=0.3)  # sharper distributions: rejections happen
    r = sample(student, enc.input_ids, enc.attention_mask, params, eos_token_id=2, pad_token_id=0,
               generator=torch.Generator().manual_seed(6), teacher=teacher, teacher_mix=0.5, draft_tokens=k)
    m = r.completion_mask
    assert m.sum() > 6
    assert (masks[-1][:, enc.input_ids.shape[1]:] == 0).any()  # some drafts were rejected: holes exist
    # log q at the sampling temperature; log p of the reward from the teacher's unprocessed distribution
    for model, stored, tau in ((student, r.sampled_logprobs, params.temperature), (teacher, r.teacher_logprobs, 1.0)):
        with torch.no_grad():
            logits = completion_logits(model, r).float() / tau
        ref = torch.log_softmax(logits, -1).gather(-1, r.completion_ids[..., None])[..., 0]
        torch.testing.assert_close(stored[m], ref[m], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("processing", [dict(top_k=2), dict(top_p=0.5, temperature=0.7)])
def test_reward_log_p_is_finite_outside_the_teachers_top_k(tokenizer, processing):
    """With top-k / top-p, a token the mixture draws can lie outside the teacher's truncated support
    (p = 0 there). The reward's log p(y_t) is scored, as in the MiniLLM authors' code, with the
    teacher's unprocessed distribution: finite, and equal to an unpadded no-cache teacher forward."""
    from gkd.scorer import completion_logits

    student, teacher = tiny_model(tokenizer, hidden=32, seed=4), tiny_model(tokenizer, hidden=64, seed=5)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6=", "<bos>987+1="] * 4, add_special_tokens=False, padding=True,
                    return_tensors="pt")
    params = SamplingParams(10, **processing)
    r = sample(student, enc.input_ids, enc.attention_mask, params, eos_token_id=2, pad_token_id=0,
               generator=torch.Generator().manual_seed(3), teacher=teacher, teacher_mix=0.2, draft_tokens=3)
    m = r.completion_mask
    with torch.no_grad():
        raw = torch.log_softmax(completion_logits(teacher, r).float(), -1)
        processed = torch.log_softmax(
            build_logits_processors(params)(None, completion_logits(teacher, r).float().flatten(0, 1)), -1
        ).view_as(raw)
    ids = r.completion_ids[..., None]
    outside = torch.isinf(processed.gather(-1, ids)[..., 0]) & m
    assert outside.any()  # the case exists: some sampled tokens are outside the teacher's truncated support
    assert torch.isfinite(r.teacher_logprobs[m]).all()
    torch.testing.assert_close(r.teacher_logprobs[m], raw.gather(-1, ids)[..., 0][m], rtol=1e-4, atol=1e-4)
    # log q_old likewise: at the sampling temperature, untruncated, as q_θ is computed in the loss
    with torch.no_grad():
        q = torch.log_softmax(completion_logits(student, r).float() / params.temperature, -1).gather(-1, ids)[..., 0]
    assert torch.isfinite(r.sampled_logprobs[m]).all()
    torch.testing.assert_close(r.sampled_logprobs[m], q[m], rtol=1e-4, atol=1e-4)


def test_speculative_greedy_and_mix_zero_match_the_step_by_step_samplers(tokenizer):
    student, teacher = tiny_model(tokenizer, hidden=32, seed=1), tiny_model(tokenizer, hidden=64, seed=2)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6="], add_special_tokens=False, padding=True, return_tensors="pt")
    kw = dict(eos_token_id=2, pad_token_id=0, vocab_size=len(tokenizer), teacher=teacher)
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    one = sample(student, enc.input_ids, enc.attention_mask, greedy, teacher_mix=0.5, draft_tokens=1, **kw)
    four = sample(student, enc.input_ids, enc.attention_mask, greedy, teacher_mix=0.5, draft_tokens=4, **kw)
    assert torch.equal(one.completion_ids, four.completion_ids)
    torch.testing.assert_close(one.teacher_logprobs, four.teacher_logprobs, rtol=1e-4, atol=1e-5)
    params = SamplingParams(max_new_tokens=8, temperature=0.8)
    plain = sample(student, enc.input_ids, enc.attention_mask, params, generator=torch.Generator().manual_seed(3),
                   eos_token_id=2, pad_token_id=0, vocab_size=len(tokenizer))
    mixed = sample(student, enc.input_ids, enc.attention_mask, params, generator=torch.Generator().manual_seed(3),
                   teacher_mix=0.0, draft_tokens=3, **kw)
    assert torch.equal(plain.completion_ids, mixed.completion_ids)


def test_draft_stats_estimate_the_acceptance_probability():
    """Per draft, P(accept) = Σ_x min(q(x), p̃(x)); the counted rate estimates it. mix = 0 accepts all."""
    q_logits, p_logits, mix = [2.0, 0.0, -1.0, 1.0, 0.5], [-1.0, 2.5, 0.0, 0.0, -3.0], 0.3
    q, p = torch.softmax(torch.tensor(q_logits, dtype=torch.float64), -1), torch.softmax(torch.tensor(p_logits, dtype=torch.float64), -1)
    alpha = float(torch.minimum(q, mix * p + (1 - mix) * q).sum())
    ids, mask = torch.full((5000, 1), 1), torch.ones(5000, 1, dtype=torch.bool)
    kw = dict(eos_token_id=99, pad_token_id=0, generator=torch.Generator().manual_seed(2), draft_tokens=4)
    r = sample(FixedLM(q_logits), ids, mask, SamplingParams(max_new_tokens=12), teacher=FixedLM(p_logits),
               teacher_mix=mix, **kw)
    accepted, rejected, row_rounds = r.draft_stats
    assert accepted / (accepted + rejected) == pytest.approx(alpha, abs=0.01)
    assert 1 < r.num_tokens / row_rounds <= 4
    r0 = sample(FixedLM(q_logits), ids, mask, SamplingParams(max_new_tokens=12), teacher=FixedLM(p_logits),
                teacher_mix=0.0, **kw)
    assert r0.draft_stats[1] == 0 and r0.num_tokens / r0.draft_stats[2] == 4


def test_speculative_lockstep_keeps_calling_both_models_until_all_ranks_done():
    """A finished rank keeps making the same model calls per round (ZeRO-3 gathers must match)."""
    calls = {"student": 0, "teacher": 0}

    class Counting(MarkovLM):
        def __init__(self, table, name):
            super().__init__(table)
            self.name = name

        def forward(self, input_ids, **kw):
            calls[self.name] += 1
            return super().forward(input_ids, **kw)

    table = torch.full((4, 4), -20.0)
    table[:, 3] = 20.0  # EOS at once
    votes = iter([False, False, True])
    ids, mask = torch.full((2, 2), 1), torch.ones(2, 2, dtype=torch.bool)
    r = sample(Counting(table, "student"), ids, mask, SamplingParams(max_new_tokens=20), eos_token_id=3,
               pad_token_id=0, generator=torch.Generator().manual_seed(0), teacher=Counting(table, "teacher"),
               teacher_mix=0.2, draft_tokens=3, all_ranks_done=lambda local: local and next(votes))
    assert r.completion_mask.tolist() == [[True], [True]]
    # prefill + 3 rounds: 2 draft steps in the first, 3 in each later one; the teacher once per round
    assert calls == {"student": 1 + 2 + 3 + 3, "teacher": 1 + 3}


# --- returns ---------------------------------------------------------------------------------

R = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, -2.0, 9.0, 9.0]])
M = torch.tensor([[True, True, True, False], [True, True, False, False]])


def test_returns_paper_form_hand_worked():
    got = minillm_returns(R, M)
    assert got.tolist() == [[2.5, 3.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]


def test_returns_including_current_hand_worked():
    got = minillm_returns(R, M, include_current=True)
    assert got.tolist() == [[2.0, 2.5, 3.0, 0.0], [1.0, -2.0, 0.0, 0.0]]


def test_returns_discounted_and_unnormalized_hand_worked():
    assert minillm_returns(R, M, gamma=0.5).tolist() == [[1.75, 3.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]
    assert minillm_returns(R, M, length_normalized=False).tolist() == [[5.0, 3.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("include_current", [False, True])
@pytest.mark.parametrize("normalized", [False, True])
def test_returns_match_float64_brute_force(gamma, include_current, normalized):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 7, generator=g)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[i < n for i in range(7)] for n in lengths])
    got = minillm_returns(rewards, mask, gamma=gamma, include_current=include_current, length_normalized=normalized)
    for b, n in enumerate(lengths):
        for t in range(7):
            if t >= n:
                assert got[b, t] == 0
                continue
            first = t if include_current else t + 1
            terms = [gamma ** (j - first) * float(rewards[b, j]) for j in range(first, n)]
            want = sum(terms) / max(len(terms), 1) if normalized else sum(terms)
            assert math.isclose(float(got[b, t]), want, rel_tol=1e-5, abs_tol=1e-6)


def test_rewards_are_log_ratio_and_masked():
    p = torch.tensor([[-1.0, -2.0, -3.0]])
    q = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    assert minillm_rewards(p, q, mask).tolist() == [[0.5, -1.0, 0.0]]
    assert minillm_rewards(p, q, mask, scale=2.0).tolist() == [[1.0, -2.0, 0.0]]


def test_whitening_uses_only_unmasked_values_and_global_moments():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    m = torch.tensor([[True, True, False], [True, True, False]])
    w = whiten(x, m)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    want = (vals - vals.mean()) / vals.std(unbiased=False)
    torch.testing.assert_close(w[m].double(), want, rtol=1e-5, atol=1e-5)
    assert (w[~m] == 0).all()
    # moments summed over two "ranks" give the same result as whitening the union
    from gkd.policy_gradient import masked_moments

    moments = masked_moments(x[:1], m[:1]) + masked_moments(x[1:], m[1:])
    torch.testing.assert_close(torch.cat([whiten(x[:1], m[:1], moments), whiten(x[1:], m[1:], moments)]), w)


# --- loss terms ------------------------------------------------------------------------------


def test_ppo_clipped_loss_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    logq = torch.randn(3, 5, generator=g) * 0.3 - 1.0
    logmix = torch.randn(3, 5, generator=g) * 0.3 - 1.0
    adv = torch.randn(3, 5, generator=g)
    got = ppo_clipped_loss(logq, logmix, adv, clip_eps=0.2)
    for b in range(3):
        for t in range(5):
            rho = math.exp(float(logq[b, t]) - float(logmix[b, t]))
            a = float(adv[b, t])
            want = max(-a * rho, -a * min(max(rho, 0.8), 1.2))
            assert math.isclose(float(got[b, t]), want, rel_tol=1e-5, abs_tol=1e-6)


def test_clip_fraction_marks_the_tokens_without_gradient():
    """1 exactly where the clipped branch wins, i.e. where autograd gives the token no gradient."""
    g = torch.Generator().manual_seed(4)
    logq = (torch.randn(4, 6, generator=g) * 0.4 - 1.0).requires_grad_()
    logmix = torch.randn(4, 6, generator=g) * 0.4 - 1.0
    adv = torch.randn(4, 6, generator=g)
    ppo_clipped_loss(logq, logmix, adv, clip_eps=0.2).sum().backward()
    share = ppo_clipped_share(logq, logmix, adv, clip_eps=0.2)
    assert 0 < share.sum() < share.numel()  # both kinds of tokens occur
    assert torch.equal(share.bool(), logq.grad == 0)


def test_ratio_factorises_into_policy_ratio_times_importance_weight():
    g = torch.Generator().manual_seed(2)
    logq, logold, logmix = (torch.randn(2, 4, generator=g) for _ in range(3))
    w = importance_weights(logold, logmix)
    adv = torch.ones(2, 4)  # positive advantage, unclipped region picks -ρ where ρ < 1.2
    rho = torch.exp(logq - logold) * w
    got = ppo_clipped_loss(logq, logmix, adv, clip_eps=1e9)
    torch.testing.assert_close(got, -rho)


def test_single_step_term_is_exact_reverse_kl_with_autograd_gradient():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 6, generator=g)
    t = torch.randn(2, 3, 6, generator=g)
    w = torch.rand(2, 3, generator=g) + 0.5
    s32 = s.clone().requires_grad_()
    single_step_reverse_kl(s32, t, weights=w).sum().backward()
    s64 = s.double().requires_grad_()
    q = torch.softmax(s64, -1)
    p = torch.softmax(t.double(), -1)
    ref = ((q * (q.log() - p.log())).sum(-1) * w.double()).sum()
    ref.backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    val = single_step_reverse_kl(s, t)
    torch.testing.assert_close(val.double(), (q * (q.log() - p.log())).sum(-1).detach(), rtol=1e-5, atol=1e-6)


def test_policy_gradient_loss_gradient_is_reinforce():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4)).requires_grad_()
    ids = torch.tensor([[1, 2, 3], [0, 4, 4]])
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    adv = torch.tensor([0.5, -2.0])
    policy_gradient_loss(logp, adv).sum().backward()
    g = logits.grad.clone()
    logits.grad = None
    logp2 = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    (-(adv[:, None] * logp2).sum()).backward()
    torch.testing.assert_close(g, logits.grad)


@pytest.mark.parametrize("processing", [{}, {"top_k": 4, "temperature": 0.8}])
def test_mix_zero_buffer_stores_what_the_mixed_sampler_would(tokenizer, tmp_path, processing):
    """``teacher_mix: 0`` samples plainly and scores once (``MiniLLM.scored_rollout``). Its stored
    log-probs must be those the teacher-mixed sampler stores, computed here from separate forwards:
    log p(y_t) of the unprocessed teacher, log q_old at the sampling temperature without top-k, and
    log p̃ = the processed (cut, renormalised) student distribution that was sampled."""
    from gkd.config import GKDConfig
    from gkd.rollout import build_logits_processors
    from gkd.scorer import completion_logits
    from gkd.trainer import GKDTrainer

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5), (40, 51), (7, 8)]]
    cfg = GKDConfig(teacher="t", student="s", dataset="d", algorithm="minillm", teacher_mix=0.0, num_rollouts=4,
                    per_device_batch_size=2, max_new_tokens=8, output_dir=str(tmp_path), progress_bar=False,
                    save_final_model=False, log_samples_steps=0, **processing)
    student, teacher = tiny_model(tokenizer, hidden=32, seed=4), tiny_model(tokenizer, hidden=64, seed=5)
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_rows=rows)
    buffer = trainer.algorithm.fill_buffer(2)
    params = SamplingParams(8, **processing)
    for r in buffer.rollouts:
        m, ids = r.completion_mask, r.completion_ids[..., None]
        with torch.no_grad():
            s_logits = completion_logits(student, r).float()
            t_logits = completion_logits(teacher, r).float()
        p = torch.log_softmax(t_logits, -1).gather(-1, ids)[..., 0]
        q = torch.log_softmax(s_logits / params.temperature, -1).gather(-1, ids)[..., 0]
        cut = build_logits_processors(params)(None, s_logits.flatten(0, 1))  # temperature, then top-k
        mixed = torch.log_softmax(cut, -1).view_as(s_logits).gather(-1, ids)[..., 0]
        torch.testing.assert_close(r.teacher_logprobs[m], p[m], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r.sampled_logprobs[m], q[m], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r.mixed_logprobs[m], mixed[m], rtol=1e-4, atol=1e-4)
