"""MiniLLM's step against independent float64 references: the PPO ratio's denominator is the mixture
p̃ = mix·p + (1−mix)·q_old that was sampled, the single-step term is weighted by w_t = q_old(y_t)/p̃(y_t)
(``single_step_weighted``), and a buffer's cached teacher top-k is re-scored when the loss temperature
changes between PPO epochs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from gkd.config import GKDConfig

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5), (40, 51), (7, 8)]]


def _trainer(tokenizer, tmp_path, student, teacher, **overrides):
    from gkd.trainer import GKDTrainer

    fields = dict(teacher="unused", student="unused", dataset="unused", algorithm="minillm", teacher_mix=0.3,
                  num_rollouts=4, per_device_batch_size=4, ppo_epochs=1, max_steps=1, max_grad_norm=0.0,
                  max_new_tokens=6, output_dir=str(tmp_path / "run"), progress_bar=False, save_final_model=False,
                  seed=5, log_samples_steps=0)
    return GKDTrainer(GKDConfig(**{**fields, **overrides}), student=student, teacher=teacher, tokenizer=tokenizer,
                      train_rows=ROWS)


@pytest.mark.parametrize("weighted", [True, False])
def test_one_step_gradient_with_the_mixture_as_ratio_denominator_and_weighted_single_step(
        tokenizer, tmp_path, monkeypatch, weighted):
    from gkd.algorithms.minillm import MiniLLM

    mix, eps, coef = 0.5, 0.05, 0.7  # a small ε: the near-uniform tiny models give ratios within 1 ± 0.2
    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    grads, seen = [], []
    real_step, real_loss = torch.optim.AdamW.step, MiniLLM.loss

    def recording_step(self, *args, **kwargs):
        grads.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None})
        return real_step(self, *args, **kwargs)

    def recording_loss(self, rollout):
        seen.append(copy.copy(rollout))
        return real_loss(self, rollout)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(MiniLLM, "loss", recording_loss)
    trainer = _trainer(tokenizer, tmp_path, student, teacher, teacher_mix=mix, clip_eps=eps, single_step_coef=coef,
                       single_step_weighted=weighted)
    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.student).named_parameters()}
    trainer.train()
    assert len(grads) == 1 and len(seen) == 1
    got = {names[k]: v for k, v in grads[0].items()}

    r = seen[0]
    total, count, weights, ratios = torch.zeros((), dtype=torch.float64), 0, [], []
    for i in range(r.completion_ids.shape[0]):
        p_ids = r.prompt_ids[i][r.prompt_mask[i]].tolist()
        c_ids = r.completion_ids[i][r.completion_mask[i]].tolist()
        ids, at = torch.tensor([p_ids + c_ids]), torch.arange(len(c_ids))
        window = slice(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1)
        s = student64(ids).logits[0, window, : len(tokenizer)]
        with torch.no_grad():
            t = teacher64(ids).logits[0, window, : len(tokenizer)]
        logq_all, logp_all = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        y = torch.tensor(c_ids)
        q_old = logq_all.detach().exp()[at, y]  # the student before the update sampled with q_old
        p_mix = mix * logp_all.exp()[at, y] + (1 - mix) * q_old  # p̃(y_t)
        rho = logq_all[at, y].exp() / p_mix  # q_θ / p̃, gradient through q_θ
        w = q_old / p_mix
        adv = r.advantages[i, : len(c_ids)].double()
        pg = torch.maximum(-adv * rho, -adv * rho.clamp(1 - eps, 1 + eps))
        kl = (logq_all.exp() * (logq_all - logp_all)).sum(-1)  # KL(q_θ,t ‖ p_t) over the vocabulary
        total = total + (pg + coef * (w if weighted else 1.0) * kl).sum()
        count += len(c_ids)
        weights.append(w)
        ratios.append(rho.detach())
        # what the buffer stored is what was sampled: log q_old and log p̃
        torch.testing.assert_close(r.sampled_logprobs[i, : len(c_ids)].double(), q_old.log(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r.mixed_logprobs[i, : len(c_ids)].double(), p_mix.log(), rtol=1e-4, atol=1e-5)
    w_all = torch.cat(weights)
    assert (w_all - 1).abs().max() > 0.05, "p̃ must differ from q_old for this test to tell them apart"
    assert ((torch.cat(ratios) - 1).abs() > eps).any(), "some ratio must be clipped"
    (total / count).backward()
    want = {n: p.grad for n, p in student64.named_parameters()}
    assert set(got) == set(want)
    for name, g in got.items():
        torch.testing.assert_close(g.double(), want[name], rtol=5e-4, atol=1e-7, msg=name)


def test_buffer_top_k_is_rescored_when_the_loss_temperature_changes_between_epochs(tokenizer, tmp_path, monkeypatch):
    """With a loss-temperature schedule, PPO epoch 2 must not reuse the top-k scored at epoch 1's τ:
    the per-step losses equal those of a run that re-scores the teacher at every step."""
    import gkd.algorithms.minillm as minillm_module

    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    common = dict(teacher_mix=0.0, teacher_topk=5, ppo_epochs=2, per_device_batch_size=2, num_rollouts=4,
                  max_steps=4, loss_temperature=1.0, loss_temperature_end=4.0, loss_temperature_schedule="linear",
                  max_grad_norm=1.0)
    cached = _trainer(tokenizer, tmp_path / "a", copy.deepcopy(student), copy.deepcopy(teacher), **common).train()
    real_views = minillm_module.views
    monkeypatch.setattr(minillm_module, "views", lambda parts, rollout, tau, cache=False: real_views(
        parts, rollout, tau, cache=False))
    fresh = _trainer(tokenizer, tmp_path / "b", copy.deepcopy(student), copy.deepcopy(teacher), **common).train()
    assert [h["ppo_epoch"] for h in cached] == [0, 0, 1, 1]
    assert len({h["loss_temperature"] for h in cached}) == 4  # τ moves every step
    for a, b in zip(cached, fresh, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert a["single_step"] == pytest.approx(b["single_step"], rel=1e-5, abs=1e-7), a["step"]
