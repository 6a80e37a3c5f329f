"""Bad input gets one actionable line on stderr and a non-zero exit, never a stack trace."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from gkd.cli import main
from gkd.task import build_model_config, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
QUIET = ["progress_bar=false", "save_final_model=false", "max_steps=1"]


def _fails(capsys, *args: str, expect: str) -> None:
    code = main(["train", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("gkd train: error:"), err
    assert expect in err[-1], err[-1]


def _model_dir(path: Path, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    shape = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(build_model_config(shape, tokenizer))
    model.resize_token_embeddings(max(len(tokenizer), model.config.vocab_size))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _jsonl(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("override, expect", [
    ("max_steps=ten", "max_steps='ten' must be an integer"),
    ("beta=2", "beta=2.0 must be in [0, 1]"),
    ("student=", "student is required"),
    ("lamda=0.5", "did you mean 'lmbda'"),
    ("max_new_tokens=0", "max_new_tokens=0 must be > 0"),
    ("reward_funcs=['no_such_module:fn']", "no_such_module"),
    ("dataset=builtin:sorting", "valid: builtin:addition"),
    ("teacher=builtin:huge-teacher", "unknown built-in model"),
])
def test_bad_values(capsys, tmp_path, override, expect):
    _fails(capsys, TINY, f"output_dir={tmp_path / 'run'}", *QUIET, "alpha=0.5" if "reward" in override else "alpha=1",
           override, expect=expect)


def test_missing_and_invalid_recipe(capsys, tmp_path):
    _fails(capsys, str(tmp_path / "none.yaml"), expect="not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [\n")
    _fails(capsys, str(bad), expect="not valid YAML")


@pytest.mark.parametrize("content, expect", [
    (None, "not found"),
    ("", "is empty"),
    ('{"prompt": "<bos>1+2=", "completion": "30"}\n{broken\n', "d.jsonl:2: not valid JSON"),
    ('{"question": "1+2"}\n', "d.jsonl:1: missing column 'prompt' (found: question)"),
    ('{"messages": [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]}\n', "chat template"),
])
def test_bad_dataset_files(capsys, tmp_path, content, expect):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    _fails(capsys, TINY, f"output_dir={tmp_path / 'run'}", *QUIET, f"dataset={path}", expect=expect)


def test_teacher_with_a_different_tokenizer(capsys, tmp_path):
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    teacher = _model_dir(tmp_path / "teacher", other)
    _fails(capsys, TINY, f"output_dir={tmp_path / 'run'}", *QUIET, f"teacher={teacher}", expect="tokenizers differ")


def test_tokenizer_without_eos_is_an_error_and_without_pad_falls_back_to_eos(capsys, tmp_path, caplog):
    no_eos = build_tokenizer()
    no_eos.eos_token = None
    student = _model_dir(tmp_path / "no_eos", no_eos)
    _fails(capsys, TINY, f"output_dir={tmp_path / 'run'}", *QUIET, f"student={student}", expect="has no EOS token")

    no_pad = build_tokenizer()
    no_pad.pad_token = None
    student = _model_dir(tmp_path / "no_pad", no_pad)
    with caplog.at_level(logging.WARNING, logger="gkd"):
        assert main(["train", TINY, f"output_dir={tmp_path / 'run2'}", *QUIET, f"student={student}",
                     f"teacher={student}"]) == 0
    assert "no pad token; using EOS" in caplog.text


def test_long_prompts_are_truncated_or_skipped_and_counted(tmp_path, caplog):
    rows = [{"prompt": "<bos>" + "1" * 40 + "+2=", "completion": "30"}] * 4 + [{"prompt": "<bos>1+2=", "completion": "30"}] * 8
    data = _jsonl(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for policy, word in (("truncate", "truncated from the left"), ("skip", "skipped")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gkd"):
            assert main(["train", TINY, f"output_dir={tmp_path / policy}", *QUIET, f"dataset={data}", "lmbda=0",
                         "max_prompt_length=16", f"long_prompts={policy}", "per_device_batch_size=4"]) == 0
        assert f"4 of 12 prompts are longer than max_prompt_length=16 tokens and were {word}" in caplog.text


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _fails(capsys, TINY, f"output_dir={blocker / 'run'}", *QUIET, expect="is not writable")


def test_minillm_buffer_arithmetic_is_explained(capsys, tmp_path):
    _fails(capsys, str(ROOT / "recipes" / "minillm_tiny.yaml"), f"output_dir={tmp_path / 'run'}", *QUIET,
           "num_rollouts=20", expect="num_rollouts=20 must be a multiple of per_device_batch_size")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = {"n": 0}

    def flaky(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", flaky)
    out = tmp_path / "run"
    code = main(["train", TINY, f"output_dir={out}", "progress_bar=false", "save_final_model=false", "max_steps=4",
                 "save_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert "checkpoint-1 is intact" in err
    assert (out / "checkpoint-1" / "COMPLETED").exists() and not (out / "checkpoint-2").exists()


def test_deepspeed_batch_arithmetic_is_explained():
    from gkd.config import ConfigError
    from gkd.distributed import check_deepspeed_batch_sizes

    check_deepspeed_batch_sizes({"train_batch_size": "auto"}, 8, 2, 4)
    check_deepspeed_batch_sizes({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 8, 2, 4)
    with pytest.raises(ConfigError, match=r"train_batch_size=60 must equal .* = 8 × 2 × 4 = 64"):
        check_deepspeed_batch_sizes({"train_batch_size": 60}, 8, 2, 4)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4 but per_device_batch_size=8"):
        check_deepspeed_batch_sizes({"train_micro_batch_size_per_gpu": 4}, 8, 2, 4)


@pytest.mark.parametrize("body, expect", [
    ("def reward(prompts, completions, **kw):\n    raise ValueError('boom')\n", "raised ValueError: boom at prompt index 0"),
    ("def reward(prompts, completions, **kw):\n    return [1.0]\n", "returned 1 values for 8 prompts"),
])
def test_reward_function_errors_from_the_command_line(capsys, tmp_path, body, expect):
    fn = tmp_path / "my_reward.py"
    fn.write_text(body)
    _fails(capsys, TINY, f"output_dir={tmp_path / 'run'}", *QUIET, "lmbda=1", "alpha=0.5",
           f"reward_funcs=['{fn}:reward']", expect=expect)


def test_impossible_builtin_task_size_is_one_line(tmp_path, capsys):
    _fails(capsys, TINY, f"output_dir={tmp_path / 'run'}", "max_digits=1", "num_train_examples=60",
           expect="needs 60 training + 512 held-out = 572 distinct problems, but max_digits=1 allows at most 50")
