"""Speculative KD sampling (Xu et al. 2025, gkd.rollout_skd): exact law of the replacement rule for
every draft length, K = |V| is the student's own sampler, KV caches stay right."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from test_minillm import FixedLM, MarkovLM

from gkd.rollout import SamplingParams, sample
from gkd.rollout_skd import in_teacher_top_k, sample_skd, skd_token_logprobs


def _skd_table(q_tab: torch.Tensor, p_tab: torch.Tensor, top_k: int) -> torch.Tensor:
    """float64 ``s[prev, y] = q(y)·1[y ∈ top-K(p)] + q(outside)·p(y)``, by hand, one state at a time."""
    q, p = torch.softmax(q_tab.double(), -1), torch.softmax(p_tab.double(), -1)
    s = torch.zeros_like(q)
    for state in range(q.shape[0]):
        top = set(torch.argsort(p[state], descending=True)[:top_k].tolist())
        outside = sum(float(q[state, v]) for v in range(q.shape[1]) if v not in top)
        for y in range(q.shape[1]):
            s[state, y] = (float(q[state, y]) if y in top else 0.0) + outside * float(p[state, y])
    return s


def _sequence_probs(table: torch.Tensor, start: int, eos: int, length: int) -> dict[tuple, float]:
    probs: dict[tuple, float] = {}

    def walk(prefix: list[int], last: int, prob: float) -> None:
        if len(prefix) == length or (prefix and prefix[-1] == eos):
            probs[tuple(prefix)] = probs.get(tuple(prefix), 0.0) + prob
            return
        for tok in range(table.shape[1]):
            walk(prefix + [tok], tok, prob * float(table[last, tok]))

    walk([], start, 1.0)
    return probs


def test_top_k_membership_and_token_law_by_hand():
    logp = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.0, 0.5, 0.5, 0.0]]))
    assert in_teacher_top_k(logp, 2).tolist() == [[False, True, False, True], [False, True, True, False]]
    assert in_teacher_top_k(logp, 4)[1].tolist() == [False, True, True, False]  # p = 0 is never in the top-K
    q = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    s = skd_token_logprobs(q, logp[0], 2).exp()
    torch.testing.assert_close(s, torch.tensor([0.5 * 0.1, 0.25 + 0.5 * 0.4, 0.5 * 0.2, 0.25 + 0.5 * 0.3]))


@pytest.mark.parametrize("k, adaptive", [(1, False), (3, False), (4, True)])
def test_skd_draws_whole_sequences_from_the_replacement_rule_chi_square(k, adaptive):
    """χ² over every completion of 3 tokens (EOS = 3 ends early) against the float64 law of token-by-
    token SKD: the block form (drafts, one teacher pass, accept to the first miss, teacher draw there)
    is exact for any draft length, fixed or adapted to the acceptance so far, with replacements,
    dropped drafts and EOS inside a round."""
    g = torch.Generator().manual_seed(5)
    q_tab, p_tab, top_k, eos = torch.randn(5, 5, generator=g) * 1.5, torch.randn(5, 5, generator=g) * 1.5, 2, 3
    law = _skd_table(q_tab, p_tab, top_k)
    probs = _sequence_probs(law, start=1, eos=eos, length=3)
    n = 40000
    ids, mask = torch.full((n, 2), 1), torch.ones(n, 2, dtype=torch.bool)
    r = sample_skd(MarkovLM(q_tab), ids, mask, SamplingParams(max_new_tokens=3), eos_token_id=eos, pad_token_id=0,
                   generator=torch.Generator().manual_seed(k), teacher=MarkovLM(p_tab), skd_top_k=top_k, draft_tokens=k,
                   adaptive_draft=adaptive)
    counts: dict[tuple, int] = {}
    for row, m in zip(r.completion_ids.tolist(), r.completion_mask.tolist(), strict=True):
        seq = tuple(t for t, keep in zip(row, m, strict=True) if keep)
        counts[seq] = counts.get(seq, 0) + 1
    assert set(counts) <= set(probs)
    chi2 = sum((counts.get(s, 0) - n * pr) ** 2 / (n * pr) for s, pr in probs.items())
    df = len(probs) - 1
    assert chi2 < df + 4 * math.sqrt(2 * df)  # ≈ p < 0.001
    for other in (torch.softmax(q_tab.double(), -1), torch.softmax(p_tab.double(), -1)):  # the test has power
        alt = _sequence_probs(other, start=1, eos=eos, length=3)
        assert sum((counts.get(s, 0) - n * pr) ** 2 / (n * pr) for s, pr in alt.items()) > 10 * df
    # stored per committed token, conditioned on the token before it: log q, log p, log s
    prev = torch.cat([torch.ones(n, 1, dtype=torch.long), r.completion_ids[:, :-1]], 1)
    m, tok = r.completion_mask, r.completion_ids
    q, p = torch.softmax(q_tab.double(), -1), torch.softmax(p_tab.double(), -1)
    for stored, table in ((r.sampled_logprobs, q), (r.teacher_logprobs, p), (r.mixed_logprobs, law)):
        torch.testing.assert_close(stored[m].double(), table.log()[prev[m], tok[m]], rtol=1e-5, atol=1e-5)
    # the share of replaced tokens at the first position is q(outside the teacher's top-K | start)
    top = torch.argsort(p[1], descending=True)[:top_k]
    outside = float(q[1].sum() - q[1, top].sum())
    assert r.skd_replaced[:, 0].double().mean().item() == pytest.approx(outside, abs=0.015)
    assert not r.skd_replaced[~m].any()


def test_k_equal_to_the_vocabulary_gives_the_students_own_samples(tokenizer):
    """K = |V|: every proposal is kept and no extra random number is drawn, so the same generator
    state gives exactly the plain sampler's tokens and log-probs (for every draft length)."""
    student, teacher = tiny_model(tokenizer, hidden=32, seed=1), tiny_model(tokenizer, hidden=64, seed=2)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6=", "<bos>987+1="], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    kw = dict(eos_token_id=2, pad_token_id=0, vocab_size=len(tokenizer))
    params = SamplingParams(max_new_tokens=9, temperature=1.3)
    plain = sample(student, enc.input_ids, enc.attention_mask, params, generator=torch.Generator().manual_seed(3), **kw)
    for k in (1, 4):
        skd = sample_skd(student, enc.input_ids, enc.attention_mask, params, generator=torch.Generator().manual_seed(3),
                         teacher=teacher, skd_top_k=len(tokenizer), draft_tokens=k, **kw)
        assert torch.equal(plain.completion_ids, skd.completion_ids)
        assert torch.equal(plain.completion_mask, skd.completion_mask)
        torch.testing.assert_close(plain.sampled_logprobs, skd.sampled_logprobs)
        torch.testing.assert_close(skd.mixed_logprobs, skd.sampled_logprobs)  # s = q when nothing is replaced
        assert not skd.skd_replaced.any() and skd.draft_stats[1] == 0
    small = sample_skd(student, enc.input_ids, enc.attention_mask, params, generator=torch.Generator().manual_seed(3),
                       teacher=teacher, skd_top_k=1, draft_tokens=4, **kw)
    assert small.skd_replaced.any()  # K = 1 does replace (the check above is not vacuous)


def test_skd_keeps_the_caches_right_and_greedy_matches_token_by_token(tokenizer):
    """Real transformers with KV caches: dropped drafts leave holes, yet stored log q / log p equal fresh
    no-cache forwards of the final sequences; greedy SKD gives the same tokens for k = 1 and k = 4."""
    from gkd.scorer import completion_logits

    student, teacher = tiny_model(tokenizer, hidden=32, seed=4), tiny_model(tokenizer, hidden=64, seed=5)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6=", "<bos>987+1="], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    params = SamplingParams(10, temperature=0.7)
    r = sample_skd(student, enc.input_ids, enc.attention_mask, params, eos_token_id=2, pad_token_id=0,
                   generator=torch.Generator().manual_seed(6), teacher=teacher, skd_top_k=2, draft_tokens=3)
    m = r.completion_mask
    assert m.sum() > 6 and r.skd_replaced.any()
    for model, stored, tau in ((student, r.sampled_logprobs, params.temperature), (teacher, r.teacher_logprobs, 1.0)):
        with torch.no_grad():
            logits = completion_logits(model, r).float() / tau
        ref = torch.log_softmax(logits, -1).gather(-1, r.completion_ids[..., None])[..., 0]
        torch.testing.assert_close(stored[m], ref[m], rtol=1e-4, atol=1e-4)
    # random-init tied-embedding models repeat their input under greedy decoding; a fixed logit bias makes
    # the teacher's argmax differ from the student's, so greedy SKD replaces tokens
    bias = torch.randn(teacher.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 0.05
    bias[14] = -1.0  # the student's greedy favourite here

    def shift(mod: torch.nn.Module, args: tuple, out: object) -> None:
        out.logits.add_(bias)  # type: ignore[attr-defined]

    teacher.register_forward_hook(shift)
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    kw = dict(eos_token_id=2, pad_token_id=0, vocab_size=len(tokenizer), teacher=teacher, skd_top_k=1)
    one = sample_skd(student, enc.input_ids, enc.attention_mask, greedy, draft_tokens=1, **kw)
    four = sample_skd(student, enc.input_ids, enc.attention_mask, greedy, draft_tokens=4, **kw)
    assert torch.equal(one.completion_ids, four.completion_ids) and one.skd_replaced.any()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kept_teacher_view_equals_a_scoring_pass(tokenizer, tau):
    """keep_teacher_topk: the top-k view of every committed position, taken from the verification passes,
    is what gkd.scorer.score(topk=k, temperature=τ) computes on the finished sequences (no second pass)."""
    from gkd.scorer import score

    student, teacher = tiny_model(tokenizer, hidden=32, seed=4), tiny_model(tokenizer, hidden=64, seed=5)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6=", "<bos>987+1="], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    r = sample_skd(student, enc.input_ids, enc.attention_mask, SamplingParams(10, temperature=0.7), eos_token_id=2,
                   pad_token_id=0, vocab_size=len(tokenizer), generator=torch.Generator().manual_seed(6),
                   teacher=teacher, skd_top_k=2, draft_tokens=3, keep_teacher_topk=(4, tau))
    assert r.skd_replaced.any() and r.teacher_cache[0] == tau
    kept, m = r.teacher_cache[1], r.completion_mask
    ref = score(teacher, r, len(tokenizer), topk=4, temperature=tau).teacher_logits
    assert torch.equal(kept.indices[m], ref.indices[m])
    torch.testing.assert_close(kept.logprobs[m], ref.logprobs[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kept.log_tail[m], ref.log_tail[m], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(kept.logprobs).all() and torch.isfinite(kept.log_tail).all()


def test_processors_apply_to_the_teacher_before_its_top_k():
    """With top-k = 1 sampling the teacher's processed support is its argmax alone: a student proposal
    elsewhere is always replaced, by that argmax."""
    student, teacher = FixedLM([3.0, 0.0, 0.0, 0.0]), FixedLM([0.0, 0.0, 3.0, 0.0])
    ids, mask = torch.full((200, 1), 1), torch.ones(200, 1, dtype=torch.bool)
    r = sample_skd(student, ids, mask, SamplingParams(max_new_tokens=2, top_k=1), eos_token_id=99, pad_token_id=0,
                   generator=torch.Generator().manual_seed(1), teacher=teacher, skd_top_k=3, draft_tokens=2)
    assert (r.completion_ids == 2).all() and r.skd_replaced.all()


# --- in training (rollout: skd) ----------------------------------------------------------------


def _metrics(out) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_skd_training_logs_the_replaced_share_and_resumes_bit_exactly(tmp_path):
    """rollout=skd in a tiny run: skd_replaced is logged on on-policy steps; a run stopped at step 3 and
    resumed gives the uninterrupted run's losses and replaced shares exactly (sampling stream restored)."""
    from pathlib import Path

    from gkd.cli import main

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    common = ["progress_bar=false", "save_final_model=false", "lmbda=0.5", "rollout=skd", "skd_top_k=2",
              "skd_draft_tokens=3", "max_new_tokens=7", "per_device_batch_size=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", recipe, f"output_dir={straight}", "max_steps=6", *common]) == 0
    assert main(["train", recipe, f"output_dir={split}", "max_steps=3", "save_steps=3", *common]) == 0
    assert main(["train", recipe, f"output_dir={split}", "max_steps=6", "resume_from_checkpoint=latest", *common]) == 0
    a, b = _metrics(straight), _metrics(split)
    keys = ("step", "loss", "on_policy", "skd_replaced", "skd_tokens_per_teacher_pass")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    on = [r for r in a if r["on_policy"]]
    assert on and all(0 < r["skd_replaced"] < 1 and r["skd_tokens_per_teacher_pass"] >= 1 for r in on)
    assert all("skd_replaced" not in r for r in a if not r["on_policy"])


def test_skd_training_with_teacher_topk_scores_the_teacher_only_while_sampling(tokenizer, tmp_path):
    """rollout=skd with teacher_topk: the loss reuses the view kept from verification (no teacher pass over
    prompt + completion per step), and gives the losses of a run whose loss scores the teacher again."""
    import copy

    from test_served_teacher import _train

    from gkd.algorithms.gkd import GKD

    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    calls: list[int] = []
    counted = copy.deepcopy(teacher)
    counted.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    fields = dict(lmbda=1.0, rollout="skd", skd_top_k=3, teacher_topk=6, log_samples_steps=0, max_steps=3)
    _, kept = _train(tokenizer, tmp_path, "kept", counted, **fields)
    assert sum(c > 4 for c in calls) == 3  # one pass over the prompts per step, then ≤ 4-token verifications

    class Rescoring(GKD):
        def skd_keep(self):
            return None

    import gkd.algorithms as registry

    original = registry.ALGORITHMS["gkd"]
    registry.ALGORITHMS["gkd"] = Rescoring
    try:
        _, rescored = _train(tokenizer, tmp_path, "rescored", copy.deepcopy(teacher), **fields)
    finally:
        registry.ALGORITHMS["gkd"] = original
    for a, b in zip(kept, rescored, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("fields, words", [
    (dict(rollout="skd", algorithm="minillm"), "algorithm=gkd"),
    (dict(rollout="skd", rollout_backend="vllm"), "rollout_backend=hf"),
    (dict(rollout="skd", teacher="http://127.0.0.1:1", teacher_topk=8), "full distribution"),
    (dict(rollout="skd", skd_top_k=0), "skd_top_k"),
    (dict(rollout="skd", skd_draft_tokens=0), "skd_draft_tokens"),
    (dict(rollout="greedy"), "rollout"),
])
def test_what_skd_cannot_run_with_is_refused_in_one_line(fields, words):
    from gkd.config import ConfigError, GKDConfig

    with pytest.raises(ConfigError, match=words) as e:
        GKDConfig(**{"teacher": "t", "student": "s", **fields})
    assert "\n" not in str(e.value)
