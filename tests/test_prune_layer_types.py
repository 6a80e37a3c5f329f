"""Depth pruning of a model whose layers differ in type (Qwen2 with sliding-window and full-attention
``layer_types``): each kept layer keeps its own attention type."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from gkd.models import prune_layers
from gkd.task import save_random_model

TYPES = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
SHAPE = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             layer_types=TYPES, use_sliding_window=True, sliding_window=2, max_window_layers=0)


def test_pruned_layers_keep_their_attention_type(tmp_path):
    teacher_dir = save_random_model(tmp_path / "teacher", SHAPE, seed=3)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, attn_implementation="eager").eval()
    assert teacher.config.layer_types == TYPES
    prune_layers(str(teacher_dir), [1, 2], tmp_path / "two")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "two", attn_implementation="eager").eval()
    assert pruned.config.num_hidden_layers == 2
    assert pruned.config.layer_types == ["sliding_attention", "full_attention"]  # layer 1 is sliding, 2 is full

    # reference: the teacher itself running only its blocks 1 and 2, each with the type given here by hand
    reference = copy.deepcopy(teacher)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[1], reference.model.layers[2]])
    reference.config.num_hidden_layers = 2
    reference.config.layer_types = ["sliding_attention", "full_attention"]
    ids = torch.tensor([[1, 5, 7, 13, 6, 14, 3, 9, 4, 8]])  # longer than the window of 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids, use_cache=False).logits, rtol=1e-5, atol=1e-6)
        # the types matter on this input: the same weights with the types swapped answer differently
        reference.config.layer_types = ["full_attention", "sliding_attention"]
        assert not torch.allclose(pruned(ids).logits, reference(ids, use_cache=False).logits, atol=1e-4)
