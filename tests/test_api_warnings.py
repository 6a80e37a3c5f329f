"""Our calls into transformers / torch / peft use their current API: every FutureWarning and
DeprecationWarning raised while our modules sample, score, train and save is an error here, except the
listed ones that third-party code raises about its own calls."""

from __future__ import annotations

import warnings

import torch
from conftest import tiny_model

from gkd.config import GKDConfig
from gkd.data import Example, collate
from gkd.rollout import SamplingParams, sample
from gkd.scorer import completion_outputs, score

#: Raised inside a library about its own code, not about anything gkd passes it.
NOT_OURS = [
    r"`is_gradient_checkpointing` is deprecated",  # peft reads the old attribute name of the model it wraps
]


def _strict():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", FutureWarning)
    warnings.simplefilter("error", DeprecationWarning)
    for message in NOT_OURS:
        warnings.filterwarnings("ignore", message=message)
    return ctx


def test_sampling_and_scoring_use_the_current_api(tokenizer):
    student, teacher = tiny_model(tokenizer, seed=1), tiny_model(tokenizer, hidden=64, seed=2)
    batch = collate([Example(tokenizer("<bos>12+3=", add_special_tokens=False).input_ids, None, {})],
                    tokenizer.pad_token_id)
    ctx = _strict()
    try:
        for kw in ({}, {"teacher": teacher, "teacher_mix": 0.2, "draft_tokens": 3}):
            r = sample(student, batch["prompt_ids"], batch["prompt_mask"], SamplingParams(max_new_tokens=6),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       generator=torch.Generator().manual_seed(0), **kw)
            score(teacher, r, len(tokenizer))
            score(teacher, r, len(tokenizer), topk=4)
            completion_outputs(student, r, len(tokenizer), hidden_layers=(1,), final_hidden=True)
    finally:
        ctx.__exit__(None, None, None)


def test_a_training_run_uses_the_current_api(tmp_path):
    from gkd.trainer import GKDTrainer

    cfg = GKDConfig(teacher="builtin:tiny-teacher", student="builtin:tiny-student", num_train_examples=64,
                    max_new_tokens=9, per_device_batch_size=4, max_steps=2, lmbda=1.0, gradient_checkpointing=True,
                    lora_r=4, merge_lora=True, output_dir=str(tmp_path / "run"), progress_bar=False, save_steps=2)
    ctx = _strict()
    try:
        GKDTrainer(cfg).train()
    finally:
        ctx.__exit__(None, None, None)
    assert (tmp_path / "run" / "final-merged" / "config.json").is_file()
