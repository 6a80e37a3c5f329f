"""The logged loss of one off-policy step against float64 references computed by hand from unpadded
forwards: classic KD (w·T²·KL(p^T‖q^T) + (1−w)·CE on the reference tokens at T = 1), the
``sequence_mean`` reduction (mean over sequences of per-sequence token means), and SeqKD (``seq_kd``:
the off-policy completions are the teacher's samples, scored like references)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from gkd.config import GKDConfig

ROWS = [{"prompt": "12+3=", "completion": "15"}, {"prompt": "4+5=", "completion": "9"},
        {"prompt": "40+51=", "completion": "9100"}, {"prompt": "7+8=", "completion": "51"}]


def _run(tokenizer, tmp_path, monkeypatch, rows=ROWS, **overrides):
    """One off-policy step; returns (logged metrics, the rollout the loss saw, float64 student, teacher)."""
    from gkd.algorithms.gkd import GKD
    from gkd.trainer import GKDTrainer

    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    seen, real_loss = [], GKD.loss
    monkeypatch.setattr(GKD, "loss", lambda self, rollout: seen.append(rollout) or real_loss(self, rollout))
    fields = dict(teacher="unused", student="unused", dataset="unused", lmbda=0.0, per_device_batch_size=4,
                  max_steps=1, max_new_tokens=6, output_dir=str(tmp_path / "run"), progress_bar=False,
                  save_final_model=False, seed=5, log_samples_steps=0)
    models64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    trainer = GKDTrainer(GKDConfig(**{**fields, **overrides}), student=student, teacher=teacher,
                         tokenizer=tokenizer, train_rows=rows)
    history = trainer.train()
    assert len(seen) == 1
    return history[0], seen[0], *models64


def _per_row_logits(rollout, student64, teacher64, vocab: int):
    for i in range(rollout.completion_ids.shape[0]):
        p = rollout.prompt_ids[i][rollout.prompt_mask[i]].tolist()
        c = rollout.completion_ids[i][rollout.completion_mask[i]].tolist()
        window = slice(len(p) - 1, len(p) + len(c) - 1)
        with torch.no_grad():
            yield (c, student64(torch.tensor([p + c])).logits[0, window, :vocab],
                   teacher64(torch.tensor([p + c])).logits[0, window, :vocab])


def _jsd64(s, t, beta):
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


def test_classic_kd_loss_by_hand(tokenizer, tmp_path, monkeypatch):
    w, temp = 0.3, 2.0
    metrics, rollout, s64, t64 = _run(tokenizer, tmp_path, monkeypatch, divergence="kd", kd_weight=w,
                                      loss_temperature=temp)
    assert not rollout.on_policy and rollout.is_reference
    total, n = 0.0, 0
    for c, s, t in _per_row_logits(rollout, s64, t64, len(tokenizer)):
        pt, logqt = torch.softmax(t / temp, -1), torch.log_softmax(s / temp, -1)
        soft = (pt * (pt.log() - logqt)).sum(-1)
        ce = -torch.log_softmax(s, -1)[torch.arange(len(c)), torch.tensor(c)]
        total += float((w * temp**2 * soft + (1 - w) * ce).sum())
        n += len(c)
    assert metrics["loss"] == pytest.approx(total / n, rel=1e-4)


@pytest.mark.parametrize("chunk", [128, 2])  # 2: the loss is formed two tokens at a time
def test_sequence_mean_reduction_by_hand(tokenizer, tmp_path, monkeypatch, chunk):
    """The loss and the gradient of one step (logged value and what the optimizer applies)."""
    grads, real_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    metrics, rollout, s64, t64 = _run(tokenizer, tmp_path, monkeypatch, divergence="jsd", beta=0.2,
                                      reduction="sequence_mean", loss_chunk_size=chunk, max_grad_norm=0.0)
    lengths = rollout.completion_mask.sum(-1).tolist()
    assert len(set(lengths)) > 1  # unequal lengths: a token mean would differ
    per_seq = []
    for i in range(rollout.completion_ids.shape[0]):
        p = rollout.prompt_ids[i][rollout.prompt_mask[i]].tolist()
        c = rollout.completion_ids[i][rollout.completion_mask[i]].tolist()
        window = slice(len(p) - 1, len(p) + len(c) - 1)
        s = s64(torch.tensor([p + c])).logits[0, window, : len(tokenizer)]
        with torch.no_grad():
            t = t64(torch.tensor([p + c])).logits[0, window, : len(tokenizer)]
        per_seq.append(_jsd64(s, t, 0.2).mean())
    loss = torch.stack(per_seq).mean()
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-4)
    loss.backward()
    assert len(grads) == 1
    for got, param in zip(grads[0], s64.parameters(), strict=True):
        torch.testing.assert_close(got.double(), param.grad, rtol=5e-4, atol=1e-7)


def test_seq_kd_trains_on_the_teachers_samples(tokenizer, tmp_path, monkeypatch):
    """References are all empty (EOS only); with seq_kd the completions of the off-policy step come from the
    teacher (longer than 1 token), and the loss is the divergence on them."""
    empty = [{"prompt": r["prompt"], "completion": ""} for r in ROWS]
    plain, _, _, _ = _run(tokenizer, tmp_path / "plain", monkeypatch, rows=empty)
    assert plain["completion_len_mean"] == 1.0
    metrics, rollout, s64, t64 = _run(tokenizer, tmp_path / "seqkd", monkeypatch, rows=empty, seq_kd=True)
    assert not rollout.on_policy and metrics["on_policy"] == 0
    assert metrics["completion_len_mean"] > 1.0
    total, n = 0.0, 0
    for c, s, t in _per_row_logits(rollout, s64, t64, len(tokenizer)):
        total += float(_jsd64(s, t, 0.5).sum())
        n += len(c)
    assert metrics["completion_len_mean"] == pytest.approx(n / rollout.completion_ids.shape[0])
    assert metrics["loss"] == pytest.approx(total / n, rel=1e-4)
