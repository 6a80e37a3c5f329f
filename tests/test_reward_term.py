"""The GKD reward term (eq. 5) against independent float64 references, with α ≠ 0.5 and rewards that
differ by row: swapping α and 1 − α, or flipping the sign of the reward policy gradient, fails here."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from gkd.config import GKDConfig

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 3), (4, 5), (40, 51), (7, 8)]]
REWARD = '''
def reward(prompts, completions, **kw):
    """Varies by row: the completion's length, and more for a completion with a 1 in it."""
    return [float(len(c)) + 3.0 * ("1" in c) for c in completions]
'''


def _jsd64(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per position ``β·KL(P‖M) + (1−β)·KL(Q‖M)``, ``M = βP + (1−β)Q``, P teacher, Q student, float64."""
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


@pytest.mark.parametrize("baseline", ["batch", "group"])
def test_one_step_gradient_of_the_alpha_weighted_reward_term(tokenizer, tmp_path, monkeypatch, baseline):
    from gkd.algorithms.gkd import GKD
    from gkd.trainer import GKDTrainer

    alpha, beta = 0.3, 0.3
    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    (tmp_path / "rw.py").write_text(REWARD)
    grads: list[dict[int, torch.Tensor]] = []
    seen = []
    real_step, real_loss = torch.optim.AdamW.step, GKD.loss

    def recording_step(self, *args, **kwargs):
        grads.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None})
        return real_step(self, *args, **kwargs)

    def recording_loss(self, rollout):
        seen.append(copy.copy(rollout))
        return real_loss(self, rollout)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(GKD, "loss", recording_loss)
    cfg = GKDConfig(teacher="unused", student="unused", dataset="unused", lmbda=1.0, divergence="jsd", beta=beta,
                    alpha=alpha, reward_funcs=[f"{tmp_path / 'rw.py'}:reward"], reward_baseline=baseline,
                    num_generations=2 if baseline == "group" else 1, per_device_batch_size=4, max_steps=1,
                    max_grad_norm=0.0, max_new_tokens=6, output_dir=str(tmp_path / "run"), progress_bar=False,
                    save_final_model=False, seed=5, log_samples_steps=0)
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_rows=ROWS)
    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.student).named_parameters()}
    history = trainer.train()
    assert len(grads) == 1 and len(seen) == 1 and history[0]["on_policy"] == 1
    got = {names[k]: v for k, v in grads[0].items()}

    # reference: rewards from the decoded completions, baselines by hand, unpadded float64 forwards
    r = seen[0]
    rows_p = [r.prompt_ids[i][r.prompt_mask[i]].tolist() for i in range(len(r.prompt_ids))]
    rows_c = [r.completion_ids[i][r.completion_mask[i]].tolist() for i in range(len(r.completion_ids))]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in rows_c]
    rewards = torch.tensor([float(len(t)) + 3.0 * ("1" in t) for t in texts], dtype=torch.float64)
    if baseline == "group":
        adv = rewards - rewards.view(-1, 2).mean(-1).repeat_interleave(2)
    else:
        adv = rewards - rewards.mean()
    assert adv.abs().max() > 0, "the rewards must differ between rows for this test to mean anything"
    torch.testing.assert_close(r.advantages.double(), adv)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for p, c, a in zip(rows_p, rows_c, adv, strict=True):
        s = student64(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1, : len(tokenizer)]
        with torch.no_grad():
            t = teacher64(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1, : len(tokenizer)]
        logq = torch.log_softmax(s, -1)[torch.arange(len(c)), torch.tensor(c)]
        total = total + (alpha * _jsd64(s, t, beta) + (1 - alpha) * (-a * logq)).sum()
        count += len(c)
    (total / count).backward()
    want = {n: p.grad for n, p in student64.named_parameters()}
    assert set(got) == set(want)
    for name, g in got.items():
        torch.testing.assert_close(g.double(), want[name], rtol=2e-4, atol=1e-7, msg=name)


def test_digit_match_reward_gives_partial_credit():
    from gkd.task import digit_match_reward, exact_match_reward, make_problems

    problems = make_problems(3, 4, seed=1)
    prompts, refs = [p.prompt for p in problems], [p.completion for p in problems]
    assert digit_match_reward(prompts, refs) == exact_match_reward(prompts, refs) == [1.0, 1.0, 1.0]
    assert digit_match_reward(prompts, [r[:3] + "9" * 5 for r in refs]) == [3 / 8, 4 / 8, 3 / 8]  # "9" can hit
    assert digit_match_reward(prompts, ["", "1", refs[2] + "<eos>77"]) == [0.0, 0.0, 1.0]
    assert digit_match_reward(prompts, [refs[0] + "00", refs[1][:4], refs[2]]) == [0.8, 0.5, 1.0]
