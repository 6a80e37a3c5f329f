"""Guards of the optimizer step and the teacher's alignment, each against an independent reference.

- The gradient of one optimizer step (gradient accumulation 2, micro-batches with unequal numbers of
  completion tokens) equals the gradient of ONE ``generalized_jsd(…, mask)`` over all of the step's
  sequences at once, computed in float64 from unpadded forwards: the global token mean of the
  design's reduction, not a mean of per-micro-batch means.
- ``score(teacher, rollout)`` returns, at completion position t, the teacher's logits of an unpadded
  forward at the position that predicts completion token t (full logits, and top-k with k = V).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from gkd.config import GKDConfig
from gkd.data import Example, collate
from gkd.losses import generalized_jsd
from gkd.rollout import Rollout
from gkd.scorer import score

# completion lengths 1, 2, 4, 8 (EOS included): every split into two micro-batches of two rows has
# unequal token counts, so a per-micro-batch mean differs from the global token mean
ROWS = [
    {"prompt": "12+3=", "completion": ""},
    {"prompt": "4+5=", "completion": "9"},
    {"prompt": "40+51=", "completion": "190"},
    {"prompt": "4567+8=", "completion": "5756400"},
]


def _unpadded_logits(model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """Logits at the positions that predict each completion token, from one unpadded sequence."""
    full = model(torch.tensor([prompt_ids + completion_ids])).logits[0]
    return full[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion_ids)]


def test_step_gradient_is_the_global_token_mean(tokenizer, tmp_path, monkeypatch):
    from gkd.trainer import GKDTrainer

    student = tiny_model(tokenizer, model_type="qwen2", hidden=32, seed=11)
    teacher = tiny_model(tokenizer, hidden=64, seed=12)
    reference_student = copy.deepcopy(student).double()
    captured: list[dict[str, torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):  # the gradient the optimizer is about to apply
        captured.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                         if p.grad is not None})
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = GKDConfig(teacher="unused", student="unused", dataset="unused", lmbda=0.0, divergence="jsd", beta=0.5,
                    per_device_batch_size=2, gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0,
                    max_new_tokens=16, output_dir=str(tmp_path / "run"), progress_bar=False,
                    save_final_model=False, seed=3)
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_rows=ROWS)
    names = {id(p): n for n, p in trainer.accelerator.unwrap_model(trainer.student).named_parameters()}
    trainer.train()
    assert len(captured) == 1, "one optimizer step"
    got = {names[k]: v for k, v in captured[0].items()}

    # reference: every sequence of the step in one padded batch, one masked token mean, float64
    teacher64 = copy.deepcopy(teacher).double()
    s_rows, t_rows = [], []
    for row in ROWS:
        p = tokenizer(row["prompt"]).input_ids
        c = tokenizer(row["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        s_rows.append(_unpadded_logits(reference_student, p, c))
        with torch.no_grad():
            t_rows.append(_unpadded_logits(teacher64, p, c))
    lengths = [len(r) for r in s_rows]
    assert lengths == [1, 2, 4, 8]
    pad = max(lengths)
    mask = torch.tensor([[t < n for t in range(pad)] for n in lengths])
    s = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, pad - len(x))) for x in s_rows])
    t = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, pad - len(x))) for x in t_rows])
    generalized_jsd(s, t, beta=0.5, mask=mask).backward()
    want = {n: p.grad for n, p in reference_student.named_parameters()}
    assert set(got) == set(want)
    for name, g in got.items():
        torch.testing.assert_close(g.double(), want[name], rtol=2e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("topk", [0, -1])  # -1: k = vocabulary size
def test_score_is_aligned_with_an_unpadded_teacher_forward(tokenizer, topk):
    teacher = tiny_model(tokenizer, hidden=64, seed=5)
    pairs = [("<bos>12+3=", "5010<eos>"), ("<bos>4567+8=", "5111716050<eos>"), ("<bos>9=", "<eos>")]
    enc = [(tokenizer(p, add_special_tokens=False).input_ids, tokenizer(c, add_special_tokens=False).input_ids)
           for p, c in pairs]
    batch = collate([Example(p, c, {}) for p, c in enc], tokenizer.pad_token_id)
    rollout = Rollout(batch["prompt_ids"], batch["prompt_mask"], batch["reference_ids"], batch["reference_mask"])
    vocab = len(tokenizer)
    k = vocab if topk < 0 else 0
    view = score(teacher, rollout, vocab, topk=k).teacher_logits
    for row, (p, c) in enumerate(enc):
        with torch.no_grad():
            want = _unpadded_logits(teacher, p, c)[:, :vocab]
        if k == 0:
            torch.testing.assert_close(view[row, : len(c)], want, rtol=1e-4, atol=1e-4)
        else:  # top-k with k = V: every token's log-prob, in the teacher's order; an empty tail
            got = torch.full((len(c), vocab), float("nan"))
            got.scatter_(-1, view.indices[row, : len(c)], view.logprobs[row, : len(c)])
            torch.testing.assert_close(got, torch.log_softmax(want, -1), rtol=1e-4, atol=1e-4)
