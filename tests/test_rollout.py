"""Sampling: mask rules (EOS kept, padding dropped, pad == EOS), KV cache and left padding correctness."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from gkd.data import Example, collate
from gkd.rollout import SamplingParams, position_ids_from_mask, sample

EOS, PAD, WORD = 2, 0, 5


class ScriptedLM(torch.nn.Module):
    """Emits token WORD until row b's call number reaches ``stop_at[b]``, then EOS (greedy)."""

    def __init__(self, stop_at: list[int], vocab: int = 8):
        super().__init__()
        self.stop_at, self.vocab, self.calls = stop_at, vocab, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True, **kw):
        b, t = input_ids.shape
        logits = torch.full((b, t, self.vocab), -10.0)
        for row in range(b):
            logits[row, -1, EOS if self.calls >= self.stop_at[row] else WORD] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def _prompts(lengths: list[int]):
    examples = [Example(list(range(3, 3 + n)), None, {}) for n in lengths]
    batch = collate(examples, PAD)
    return batch["prompt_ids"], batch["prompt_mask"]


@pytest.mark.parametrize("pad_id", [PAD, EOS])
def test_completion_mask_keeps_eos_and_drops_padding(pad_id):
    ids, mask = _prompts([2, 4, 3])
    model = ScriptedLM(stop_at=[0, 2, 5])
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=4, do_sample=False), eos_token_id=EOS, pad_token_id=pad_id)
    # row 0: EOS first; row 1: WORD WORD EOS; row 2: never stops within 4 tokens
    assert r.completion_ids.tolist() == [[EOS, pad_id, pad_id, pad_id], [WORD, WORD, EOS, pad_id], [WORD] * 4]
    assert r.completion_mask.tolist() == [[True, False, False, False], [True, True, True, False], [True] * 4]
    assert r.num_tokens == 1 + 3 + 4
    assert (r.sampled_logprobs[~r.completion_mask] == 0).all()


def test_loop_stops_when_all_sequences_are_done():
    ids, mask = _prompts([2, 2])
    model = ScriptedLM(stop_at=[1, 2])
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=50, do_sample=False), eos_token_id=EOS, pad_token_id=PAD)
    assert r.completion_ids.shape[1] == 3
    assert model.calls == 3  # prompt pass + 2 decode steps, nothing after the last EOS


def test_lockstep_keeps_stepping_until_all_ranks_done():
    ids, mask = _prompts([2])
    model = ScriptedLM(stop_at=[0])
    votes = iter([False, False, True])  # another rank still runs for two more steps
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=10, do_sample=False), eos_token_id=EOS,
               pad_token_id=PAD, all_ranks_done=lambda local: local and next(votes))
    assert r.completion_ids.shape[1] == 3
    assert r.completion_mask.tolist() == [[True, False, False]]


def test_multiple_eos_ids():
    ids, mask = _prompts([2])
    model = ScriptedLM(stop_at=[1])
    r = sample(model, ids, mask, SamplingParams(max_new_tokens=5, do_sample=False), eos_token_id=[WORD, EOS],
               pad_token_id=PAD)
    assert r.completion_ids.tolist() == [[WORD]]


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]


def test_greedy_matches_transformers_generate_with_left_padding(tokenizer):
    """Our KV-cached loop with left padding gives exactly HF generate's greedy tokens."""
    model = tiny_model(tokenizer, hidden=64, seed=3)
    prompts = ["<bos>12+3=", "<bos>4+5678=", "<bos>9="]
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    ours = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(max_new_tokens=6, do_sample=False),
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    theirs = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)[:, enc.input_ids.shape[1]:]
    length = ours.completion_ids.shape[1]
    for row in range(len(prompts)):
        n = int(ours.completion_mask[row].sum())
        assert ours.completion_ids[row, :n].tolist() == theirs[row, :n].tolist()
    assert length <= theirs.shape[1]


def test_left_padding_does_not_change_samples(tokenizer):
    """A prompt's greedy completion is the same alone and inside a left-padded batch."""
    model = tiny_model(tokenizer, hidden=64, seed=4)
    params = SamplingParams(max_new_tokens=5, do_sample=False)
    alone = tokenizer(["<bos>3+4="], add_special_tokens=False, return_tensors="pt")
    batch = tokenizer(["<bos>3+4=", "<bos>1234+5678="], add_special_tokens=False, padding=True, return_tensors="pt")
    kw = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    a = sample(model, alone.input_ids, alone.attention_mask, params, **kw)
    b = sample(model, batch.input_ids, batch.attention_mask, params, **kw)
    n = int(a.completion_mask[0].sum())
    assert b.completion_ids[0, :n].tolist() == a.completion_ids[0, :n].tolist()


def test_sampled_logprobs_match_a_full_forward(tokenizer):
    """The stored log q(y_t) equals a fresh no-cache forward's log-softmax at each sampled token."""
    from gkd.scorer import completion_logits

    model = tiny_model(tokenizer, hidden=64, seed=5)
    enc = tokenizer(["<bos>12+34=", "<bos>5+6="], add_special_tokens=False, padding=True, return_tensors="pt")
    r = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(max_new_tokens=6), eos_token_id=2,
               pad_token_id=0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(completion_logits(model, r).float(), -1)
    ref = logp.gather(-1, r.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(r.sampled_logprobs[r.completion_mask], ref[r.completion_mask], rtol=1e-4, atol=1e-4)


def test_sampling_is_deterministic_given_a_generator_and_restores_train_mode(tokenizer):
    model = tiny_model(tokenizer, hidden=32, seed=6).train()
    enc = tokenizer(["<bos>12+34="] * 4, add_special_tokens=False, return_tensors="pt")
    kw = dict(eos_token_id=2, pad_token_id=0)
    a = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(8), generator=torch.Generator().manual_seed(1), **kw)
    b = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(8), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert model.training


def test_top_k_one_is_greedy(tokenizer):
    model = tiny_model(tokenizer, hidden=32, seed=7)
    enc = tokenizer(["<bos>1+2=", "<bos>77+8="], add_special_tokens=False, padding=True, return_tensors="pt")
    kw = dict(eos_token_id=2, pad_token_id=0)
    greedy = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(6, do_sample=False), **kw)
    top1 = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(6, top_k=1, temperature=0.7), **kw)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    # with top-k=1 the sampling distribution is a point mass: log q(y_t) = 0
    assert torch.allclose(top1.sampled_logprobs, torch.zeros_like(top1.sampled_logprobs))


def test_vocab_slice_never_samples_padded_rows(tokenizer):
    model = tiny_model(tokenizer, hidden=32, seed=8, vocab=len(tokenizer) + 9)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):] = 0
        model.lm_head.weight[len(tokenizer):, 0] = 100.0  # padded rows would win every draw
    enc = tokenizer(["<bos>1+2="] * 8, add_special_tokens=False, return_tensors="pt")
    r = sample(model, enc.input_ids, enc.attention_mask, SamplingParams(6), eos_token_id=2, pad_token_id=0,
               vocab_size=len(tokenizer), generator=torch.Generator().manual_seed(0))
    assert int(r.completion_ids.max()) < len(tokenizer)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1)])
def test_sampling_params_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
