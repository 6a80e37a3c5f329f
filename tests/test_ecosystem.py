"""Hugging Face workflow: datasets loading, TensorBoard logging, sample logs, model card, Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def _rows(n: int = 24) -> list[dict]:
    from gkd.task import make_problems

    return [{"prompt": p.prompt, "completion": p.completion, "answer": p.a + p.b} for p in make_problems(n, seed=3)]


def test_local_jsonl_through_datasets_with_tensorboard_and_samples(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", f"dataset={data}", "max_steps=2", "report_to=[tensorboard]",
                 "log_samples_steps=1", "lmbda=1", "progress_bar=false"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and len(acc.Scalars("loss")) == 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "teacher_logprob_mean"} <= set(samples[0])
    card = (out / "final" / "README.md").read_text()
    assert "GKD (Agarwal et al. 2024)" in card and "builtin:tiny-teacher" in card and "| loss |" in card


def test_parquet_file_and_bad_tracker(tmp_path, capsys):
    import datasets

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(_rows()).to_parquet(str(path))
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", f"dataset={path}", "max_steps=1", "progress_bar=false",
                 "save_final_model=false"]) == 0
    assert main(["train", TINY, f"output_dir={out}", "report_to=[mlflow]"]) == 2
    assert "report_to entry 'mlflow' is not valid" in capsys.readouterr().err


def test_python_api_with_a_datasets_object_and_models_passed_in(tmp_path, tokenizer):
    import datasets
    from conftest import tiny_model

    from gkd import GKDConfig, GKDTrainer

    config = GKDConfig(student="unused", teacher="unused", lmbda=0.5, max_new_tokens=9, max_steps=2,
                       per_device_batch_size=4, output_dir=str(tmp_path / "api"), progress_bar=False)
    trainer = GKDTrainer(config, student=tiny_model(tokenizer, "qwen2", hidden=32, seed=1),
                         teacher=tiny_model(tokenizer, "llama", hidden=32, seed=2), tokenizer=tokenizer,
                         train_rows=datasets.Dataset.from_list(_rows()))
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2]
    assert (tmp_path / "api" / "final" / "model.safetensors").exists()


def test_quantized_teacher_without_bitsandbytes_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    assert main(["train", TINY, f"output_dir={tmp_path / 'q'}", "teacher_quantization=4bit"]) == 2
    assert "pip install bitsandbytes" in capsys.readouterr().err
