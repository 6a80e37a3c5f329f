"""rollout_backend: vllm, tested on CPU against tests/fake_vllm (vLLM 0.33's API surface; see there).

What a real engine adds (CUDA kernels, paged KV cache) is not exercised here; the glue is: the
missing-package error, request building, output conversion, weight push (plain, LoRA, sleep mode).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from gkd.cli import main
from gkd.config import ConfigError, load_config
from gkd.rollout_vllm import rollout_from_outputs, student_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
FAKE = str(ROOT / "tests" / "fake_vllm")


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.syspath_prepend(FAKE)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    environ = dict(os.environ)  # the sampler sets the launcher variables vLLM reads (RANK, MASTER_PORT, ...)
    import vllm

    assert vllm.__file__.startswith(FAKE)
    vllm.ENGINES.clear()
    yield vllm
    sys.modules.pop("vllm", None)
    os.environ.clear()
    os.environ.update(environ)


def test_missing_vllm_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    assert main(["train", TINY, f"output_dir={tmp_path}", "rollout_backend=vllm", "max_steps=1",
                 "progress_bar=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install vllm" in err and "rollout_backend: hf" in err


def test_vllm_refuses_minillm_and_bad_values():
    with pytest.raises(ConfigError, match="teacher-mixed sampling"):
        load_config(TINY, ["rollout_backend=vllm", "algorithm=minillm"])
    with pytest.raises(ConfigError, match="rollout_backend='sglang' is not valid; choose one of: hf, vllm"):
        load_config(TINY, ["rollout_backend=sglang"])
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization=1.5"):
        load_config(TINY, ["vllm_gpu_memory_utilization=1.5"])


def _output(ids, logps, finish):
    lp = [{t: SimpleNamespace(logprob=v)} for t, v in zip(ids, logps, strict=True)]
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=lp, finish_reason=finish)])


def test_outputs_become_a_rollout_with_masks_from_lengths():
    eos, pad = 2, 2  # pad == EOS: the mask must come from lengths, never from ids != pad
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]])
    mask = prompts != 0
    outs = [
        _output([11, 12, eos], [-0.1, -0.2, -0.3], "stop"),  # EOS kept in token_ids (vLLM's default)
        _output([13], [-0.4], "stop"),  # stopped on an EOS that was left out: appended
        _output([14, 15, 16, 17], [-0.5, -0.6, -0.7, -0.8], "length"),  # cut at max_tokens: no EOS
    ]
    r = rollout_from_outputs(outs, prompts, mask, eos_token_ids=[eos], pad_token_id=pad, max_new_tokens=4)
    assert r.completion_ids.tolist() == [[11, 12, eos, pad], [13, eos, pad, pad], [14, 15, 16, 17]]
    assert r.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    torch.testing.assert_close(r.sampled_logprobs, torch.tensor(
        [[-0.1, -0.2, -0.3, 0], [-0.4, 0, 0, 0], [-0.5, -0.6, -0.7, -0.8]]))
    assert r.on_policy and r.prompt_mask.dtype == torch.bool
    with pytest.raises(ValueError, match="2 outputs for 3 prompts"):
        rollout_from_outputs(outs[:2], prompts, mask, eos_token_ids=[eos], pad_token_id=pad, max_new_tokens=4)


def _trainer(tmp_path, *overrides):
    from gkd.trainer import GKDTrainer

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "progress_bar=false", "save_final_model=false",
                             "rollout_backend=vllm", "lmbda=1.0", "max_steps=3", "per_device_batch_size=4", *overrides])
    return GKDTrainer(cfg)


def _engine_matches(engine, model) -> bool:
    student = dict(model.named_parameters())
    return all(torch.equal(p, student[n]) for n, p in engine.model.hf.named_parameters())


def test_trainer_samples_through_vllm_and_pushes_weights_after_each_step(tmp_path, fake_vllm):
    trainer = _trainer(tmp_path)
    engine = fake_vllm.ENGINES[-1]
    assert engine.kwargs["logprobs_mode"] == "processed_logprobs" and engine.kwargs["load_format"] == "dummy"
    assert engine.kwargs["distributed_executor_backend"] == "external_launcher"  # in-process engine
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"]
    assert engine.kwargs["max_model_len"] == trainer.config.max_prompt_length + trainer.config.max_new_tokens
    student = trainer.accelerator.unwrap_model(trainer.student)
    assert not _engine_matches(engine, student)  # dummy weights until the first push
    history = trainer.train()
    assert len(history) == 3 and all(r["on_policy"] == 1 for r in history)
    generates = [c for c in engine.calls if c[0] == "generate"]
    assert len(generates) == 3
    params = generates[0][1]
    assert all(p.logprobs == 0 and p.max_tokens == trainer.config.max_new_tokens for p in params)
    assert len({p.seed for p in params}) == len(params)  # one seed per request, from the run's generator
    # each sampling call saw the weights of the step before it: pushed 3 times (steps 0, 1, 2), and the
    # engine now holds step 2's weights, one optimizer step behind the final student
    assert [c[0] for c in engine.calls].count("reset_prefix_cache") == 3
    assert trainer.vllm.synced_version == 2
    trainer.vllm.sync(student, trainer.step)
    assert _engine_matches(engine, student)
    assert trainer.vllm.sync(student, trainer.step) is False  # same version: nothing pushed


def test_vllm_runs_are_reproducible_from_the_seed(tmp_path, fake_vllm):
    a = _trainer(tmp_path / "a", "seed=7").train()
    b = _trainer(tmp_path / "b", "seed=7").train()
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["completion_len_mean"] for r in a] == [r["completion_len_mean"] for r in b]


def test_sleep_mode_repushes_weights_before_every_sampling_call(tmp_path, fake_vllm):
    trainer = _trainer(tmp_path, "vllm_sleep_mode=true", "max_steps=2")
    engine = fake_vllm.ENGINES[-1]
    assert engine.asleep == {"weights", "kv_cache"}  # asleep from the start: no memory taken during updates
    trainer.train()  # the fake raises if generate() or a weight push meets a sleeping engine
    names = [c[0] for c in engine.calls]
    assert names.count("generate") == 2 and names.count("reset_prefix_cache") == 2
    assert engine.asleep == {"weights", "kv_cache"}


def test_lora_weights_are_pushed_merged_under_the_base_names(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(tokenizer)
    names = [n for n, _ in base.named_parameters()]
    reference = tiny_model(tokenizer)
    model = get_peft_model(tiny_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # non-zero adapters, so merging changes the weights
    ids = torch.tensor([[1, 5, 6, 13]])
    with torch.no_grad():
        before = model(ids).logits
    pushed = {n: t.clone() for n, t in student_weights(model)}
    assert list(pushed) == names
    merged = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    merged.load_state_dict(model.state_dict())
    merged = merged.merge_and_unload()
    for n, p in merged.named_parameters():
        torch.testing.assert_close(pushed[n], p)
    assert not torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"],
                           base.get_parameter("model.layers.0.self_attn.q_proj.weight"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # unmerged again afterwards


def test_vllm_sampler_errors_name_the_problem(fake_vllm, tmp_path):
    from gkd.rollout import SamplingParams
    from gkd.rollout_vllm import VLLMSampler

    with pytest.raises(TypeError, match="not_an_engine_arg"):
        VLLMSampler(str(tmp_path), SamplingParams(), max_model_len=8, vocab_size=4, model_vocab_size=4,
                    eos_token_ids=[2], pad_token_id=2, engine_kwargs={"not_an_engine_arg": 1})


def test_padded_embedding_rows_are_never_sampled(fake_vllm, tokenizer, tmp_path):
    from gkd.rollout import SamplingParams
    from gkd.rollout_vllm import VLLMSampler

    model = tiny_model(tokenizer, vocab=len(tokenizer) + 64)  # padded rows, as Qwen's 151,936 vs 151,665
    model.config.save_pretrained(tmp_path)
    sampler = VLLMSampler(str(tmp_path), SamplingParams(max_new_tokens=12, temperature=3.0), max_model_len=32,
                          vocab_size=len(tokenizer), model_vocab_size=len(tokenizer) + 64,
                          eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                          engine_kwargs={"load_format": "dummy"})
    sampler.sync(model, version=0)
    prompts = torch.tensor([[5, 6, 7]] * 6)
    r = sampler.sample(prompts, torch.ones_like(prompts, dtype=torch.bool), torch.Generator().manual_seed(0))
    params = fake_vllm.ENGINES[-1].calls[-1][1]
    assert params[0].allowed_token_ids == list(range(len(tokenizer)))
    assert r.completion_ids[r.completion_mask].max() < len(tokenizer)
    assert (r.sampled_logprobs[r.completion_mask] < 0).all()
