from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in models are materialised into a per-session cache, never the user's."""
    monkeypatch.setenv("GKD_CACHE", str(tmp_path_factory.getbasetemp() / "gkd-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    from gkd.task import build_tokenizer

    return build_tokenizer()


def tiny_model(tokenizer, model_type: str = "llama", hidden: int = 32, layers: int = 2, seed: int = 0, vocab: int | None = None):
    from transformers import AutoModelForCausalLM

    from gkd.task import build_model_config

    cfg = build_model_config(
        dict(model_type=model_type, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
             num_attention_heads=4),
        tokenizer,
    )
    if vocab is not None:
        cfg.vocab_size = vocab
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def capture_step_grads(monkeypatch) -> list[dict[int, torch.Tensor]]:
    """Record, at every ``AdamW.step``, a copy of each parameter's gradient keyed by ``id(param)``."""
    captured: list[dict[int, torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        captured.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                         if p.grad is not None})
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return captured
