"""On-policy fidelity metrics (gkd.fidelity), each against an independent reference: float64 loops over
the vocabulary, a hand-made top-k example, and one real on-policy training step whose logged metrics are
recomputed from unpadded float64 forwards of the student before the update and the teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_model

from gkd.config import GKDConfig
from gkd.fidelity import fidelity_terms, reverse_kl_full, sampled_token_reverse_kl, topk_agreement
from gkd.losses import TeacherTopK


def _softmax64(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def test_reverse_kl_and_sampled_token_against_float64_loops():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11) * 2, torch.randn(5, 11) * 2
    ids = torch.tensor([0, 3, 10, 7, 7])
    got = reverse_kl_full(s, t)
    got_tok = sampled_token_reverse_kl(s, ids, torch.log_softmax(t.double(), -1)[torch.arange(5), ids])
    for i in range(5):
        q, p = _softmax64(s[i].tolist()), _softmax64(t[i].tolist())
        assert float(got[i]) == pytest.approx(sum(qv * (math.log(qv) - math.log(pv)) for qv, pv in zip(q, p, strict=True)), rel=1e-5)
        assert float(got_tok[i]) == pytest.approx(math.log(q[ids[i]]) - math.log(p[ids[i]]), rel=1e-5, abs=1e-6)


def test_sampled_token_mean_is_the_reverse_kl_in_expectation():
    """E_{y~q}[log q(y) − log p(y)] = KL(q‖p), by exact enumeration of a 6-token vocabulary."""
    torch.manual_seed(1)
    s, t = torch.randn(1, 6), torch.randn(1, 6)
    q = torch.softmax(s.double(), -1)[0]
    logp = torch.log_softmax(t.double(), -1)[0]
    per_token = [float(sampled_token_reverse_kl(s, torch.tensor([y]), logp[y:y + 1])) for y in range(6)]
    assert sum(float(q[y]) * per_token[y] for y in range(6)) == pytest.approx(float(reverse_kl_full(s, t)), rel=1e-5)


def test_topk_overlap_and_mass_on_a_hand_made_example():
    # teacher probabilities over 6 tokens: 0.4, 0.3, 0.15, 0.1, 0.05, 0.0 → top-3 = {0, 1, 2} (mass 0.85)
    p = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 1e-12]])
    teacher = p.log()
    student = torch.tensor([[5.0, 0.0, 4.0, 3.0, 1.0, 2.0]])  # student's top-3 = {0, 2, 3}
    overlap, mass = topk_agreement(student, teacher, 3)
    assert float(overlap) == pytest.approx(2 / 3)  # tokens 0 and 2 of {0, 1, 2}
    assert float(mass) == pytest.approx((0.4 + 0.15) / 0.85, rel=1e-6)
    # the same from a top-k view given in another order (a served teacher's top-4): k is capped by the view
    view = TeacherTopK(torch.tensor([[2, 0, 3, 1]]), p[0, [2, 0, 3, 1]].log()[None], torch.tensor([0.05]).log())
    overlap, mass = topk_agreement(student, view, 3)
    assert float(overlap) == pytest.approx(2 / 3) and float(mass) == pytest.approx((0.4 + 0.15) / 0.85, rel=1e-6)
    overlap, _ = topk_agreement(student, view, 10)  # k = 4 here: teacher {0,1,2,3}, student {0,2,3,5}
    assert float(overlap) == pytest.approx(3 / 4)


def test_which_metrics_each_teacher_view_allows():
    torch.manual_seed(2)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    ids = torch.tensor([1, 2, 3, 4])
    full = fidelity_terms(s, ids, t, None, topk=3, teacher_temperature=1.0)
    assert set(full) == {"onpolicy_rkl", "onpolicy_rkl_sampled", "onpolicy_topk_overlap", "onpolicy_topk_mass"}
    view = TeacherTopK(*torch.log_softmax(t, -1).topk(9, -1)[::-1], torch.full((4,), TeacherTopK.LOG_ZERO))
    served = fidelity_terms(s, ids, view, torch.log_softmax(t, -1)[torch.arange(4), ids], topk=3, teacher_temperature=1.0)
    assert set(served) == {"onpolicy_rkl_sampled", "onpolicy_rkl_buckets", "onpolicy_topk_overlap", "onpolicy_topk_mass"}
    # with k = V the bucketed reverse KL is the exact one; the top-k metrics agree with full logits
    assert torch.allclose(served["onpolicy_rkl_buckets"], full["onpolicy_rkl"], atol=1e-5)
    assert torch.allclose(served["onpolicy_topk_mass"], full["onpolicy_topk_mass"], atol=1e-6)
    assert torch.allclose(served["onpolicy_rkl_sampled"], full["onpolicy_rkl_sampled"], atol=1e-6)
    tempered = fidelity_terms(s, ids, view, None, topk=3, teacher_temperature=2.0)
    assert set(tempered) == {"onpolicy_topk_overlap"}  # a view at τ ≠ 1 is not the teacher's own distribution
    assert set(fidelity_terms(s, ids, t, None, topk=0, teacher_temperature=1.0)) == {"onpolicy_rkl", "onpolicy_rkl_sampled"}


def test_logged_on_policy_metrics_equal_a_float64_recomputation(tokenizer, tmp_path, monkeypatch):
    """One on-policy GKD step (2 micro-batches): the logged token means equal float64 brute force on the
    step's samples, with the student as it was before the update (the metrics describe its samples)."""
    from gkd.algorithms.gkd import GKD
    from gkd.trainer import GKDTrainer

    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=5)
    teacher = tiny_model(tokenizer, hidden=64, seed=6)
    before = copy.deepcopy(student).double()
    teacher64 = copy.deepcopy(teacher).double()
    rollouts = []
    real = GKD.rollout

    def recording(self, batch, on_policy):
        r = real(self, batch, on_policy)
        rollouts.append(r)
        return r

    monkeypatch.setattr(GKD, "rollout", recording)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5), (40, 51), (7, 8)]]
    cfg = GKDConfig(teacher="unused", student="unused", dataset="unused", lmbda=1.0, divergence="jsd", beta=0.5,
                    per_device_batch_size=2, gradient_accumulation_steps=2, max_steps=1, max_new_tokens=12,
                    fidelity_topk=4, output_dir=str(tmp_path / "run"), progress_bar=False, save_final_model=False,
                    seed=3, loss_chunk_size=5)
    history = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_rows=rows).train()
    logged = history[0]
    assert logged["on_policy"] == 1 and len(rollouts) == 2
    rkl = tok = overlap = mass = 0.0
    count = 0
    for r in rollouts:
        for i in range(r.completion_ids.shape[0]):
            prompt = r.prompt_ids[i][r.prompt_mask[i]].tolist()
            completion = r.completion_ids[i][r.completion_mask[i]].tolist()
            full = torch.tensor([prompt + completion])
            span = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
            with torch.no_grad():
                s = before(full).logits[0, span, :len(tokenizer)]
                t = teacher64(full).logits[0, span, :len(tokenizer)]
            for pos, y in enumerate(completion):
                q, p = _softmax64(s[pos].tolist()), _softmax64(t[pos].tolist())
                rkl += sum(qv * (math.log(qv) - math.log(pv)) for qv, pv in zip(q, p, strict=True))
                tok += math.log(q[y]) - math.log(p[y])
                top_t = sorted(range(len(p)), key=lambda v: -p[v])[:4]
                top_s = set(sorted(range(len(q)), key=lambda v: -q[v])[:4])
                overlap += sum(v in top_s for v in top_t) / 4
                mass += sum(p[v] for v in top_t if v in top_s) / sum(p[v] for v in top_t)
                count += 1
    assert count > 4
    assert logged["onpolicy_rkl"] == pytest.approx(rkl / count, rel=1e-4)
    assert logged["onpolicy_rkl_sampled"] == pytest.approx(tok / count, rel=1e-4, abs=1e-5)
    assert logged["onpolicy_topk_overlap"] == pytest.approx(overlap / count, rel=1e-5)
    assert logged["onpolicy_topk_mass"] == pytest.approx(mass / count, rel=1e-4)


def test_off_policy_steps_log_no_fidelity(tokenizer, tmp_path):
    from gkd.trainer import GKDTrainer

    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5)]]
    cfg = GKDConfig(teacher="unused", student="unused", dataset="unused", lmbda=0.0, per_device_batch_size=2,
                    max_steps=1, max_new_tokens=8, output_dir=str(tmp_path / "run"), progress_bar=False,
                    save_final_model=False)
    history = GKDTrainer(cfg, student=tiny_model(tokenizer, seed=1), teacher=tiny_model(tokenizer, seed=2),
                         tokenizer=tokenizer, train_rows=rows).train()
    assert not any(k.startswith("onpolicy_") for k in history[0])
