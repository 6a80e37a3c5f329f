"""LoRA (peft) students: adapters train, save, reload and merge; also under DeepSpeed ZeRO-3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gkd.cli import main
from gkd.task import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")


def test_lora_student_saves_adapters_that_reload_and_merge(tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", "max_steps=4", "lora_r=4", "merge_lora=true",
                 "progress_bar=false", "learning_rate=1e-2"]) == 0
    final = out / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    base_path = resolve_model_path("builtin:tiny-student")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), final)
    merged = AutoModelForCausalLM.from_pretrained(out / "final-merged")
    ids = torch.tensor([[1, 5, 6, 13, 7, 14]])
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (base, peft_model.eval(), merged))
    assert not torch.allclose(a, b)  # the adapters learned something
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)  # merging preserves the function


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_under_deepspeed_two_processes(tmp_path, stage):
    out = tmp_path / f"z{stage}lora"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "ds_configs" / f"accelerate_zero{stage}_cpu2.yaml"), "-m", "gkd.cli", "train", TINY,
           f"output_dir={out}", "max_steps=3", "lora_r=4", "progress_bar=false", "learning_rate=1e-2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert (out / "final" / "adapter_config.json").exists()
    from safetensors.torch import load_file

    adapters = load_file(out / "final" / "adapter_model.safetensors")
    assert adapters and all(t.numel() > 0 for t in adapters.values())  # gathered, not empty ZeRO-3 shards
