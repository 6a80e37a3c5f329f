"""Reward functions: loading by spec, weighted combination, None masking, kwargs, and every error path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gkd.rewards import RewardError, RewardFunctions, load_reward_function
from gkd.task import Problem, exact_match_reward


def _batch(n: int = 3):
    prompts = [f"prompt number {i}" for i in range(n)]
    completions = [f"c{i}" for i in range(n)]
    completion_ids = [[i, i + 1] for i in range(n)]
    rows = [{"prompt": p, "completion": "ref", "answer": i, "_private": "x"} for i, p in enumerate(prompts)]
    return prompts, completions, completion_ids, rows


def _rf(*fns, weights=None) -> RewardFunctions:
    return RewardFunctions.from_specs(list(fns), weights)


# --- loading -------------------------------------------------------------------------------------


def test_load_by_module_spec_builtin_exact_match():
    fn = load_reward_function("gkd.task:exact_match_reward")
    assert fn is exact_match_reward
    p = Problem(274, 59)
    rewards, mask, metrics = RewardFunctions.from_specs(["gkd.task:exact_match_reward"])(
        [p.prompt, p.prompt], [p.completion, "9"], [[1], [2]], [{"prompt": p.prompt}, {"prompt": p.prompt}]
    )
    assert rewards.tolist() == [1.0, 0.0] and mask.tolist() == [True, True]
    assert metrics == {"reward/gkd.task:exact_match_reward": 0.5}


def test_load_by_file_path_relative_and_absolute(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text("def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    rel = load_reward_function("my_rewards.py:length")
    absolute = load_reward_function(f"{path}:length")
    assert rel(prompts=["a"], completions=["abc"]) == [3.0]
    assert absolute(prompts=["a"], completions=["ab"]) == [2.0]


def test_load_dotted_attribute(tmp_path):
    path = tmp_path / "cls_rewards.py"
    path.write_text("class R:\n    @staticmethod\n    def score(prompts, completions, **kw):\n        return [1.0] * len(prompts)\n")
    assert load_reward_function(f"{path}:R.score")(prompts=["a"], completions=["b"]) == [1.0]


def test_load_error_missing_colon():
    with pytest.raises(RewardError, match=r"has no ':'; write 'package.module:function'"):
        load_reward_function("gkd.task.exact_match_reward")


def test_load_error_incomplete_spec():
    with pytest.raises(RewardError, match="is incomplete"):
        load_reward_function("gkd.task:")


def test_load_error_file_not_found(tmp_path):
    with pytest.raises(RewardError, match=r"reward function file 'nowhere/r\.py' not found"):
        load_reward_function("nowhere/r.py:f")


def test_load_error_module_not_importable():
    with pytest.raises(RewardError, match=r"cannot import reward module 'no_such_pkg_xyz\.mod'.*ModuleNotFoundError: "
                                          r"No module named 'no_such_pkg_xyz'"):
        load_reward_function("no_such_pkg_xyz.mod:f")


def test_load_error_file_raises_on_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardError, match="raised RuntimeError: boom at import"):
        load_reward_function(f"{path}:f")


def test_load_error_attribute_missing_lists_callables():
    with pytest.raises(RewardError) as info:
        load_reward_function("gkd.task:exact_match")
    msg = str(info.value)
    assert "'gkd.task' has no attribute 'exact_match'" in msg
    assert "did you mean 'exact_match_reward'?" in msg
    assert "exact_match_reward" in msg and "check_answer" in msg
    assert "\n" not in msg


def test_load_error_attribute_missing_in_file(tmp_path):
    path = tmp_path / "few.py"
    path.write_text("import os\n\ndef alpha(prompts, completions, **kw):\n    return []\n\nVALUE = 3\n")
    with pytest.raises(RewardError, match=r"has no attribute 'beta'.*callables defined there: alpha$"):
        load_reward_function(f"{path}:beta")


def test_load_error_not_callable():
    with pytest.raises(RewardError, match=r"'gkd\.task:VOCAB' is a list, not a callable reward function"):
        load_reward_function("gkd.task:VOCAB")


def test_load_error_is_value_error():
    assert issubclass(RewardError, ValueError)


# --- weights and combination ---------------------------------------------------------------------


def const(v):
    def fn(prompts, completions, **kwargs):
        return [v] * len(prompts)

    fn.__name__ = f"const_{v}"
    return fn


def by_index(prompts, completions, answer, **kwargs):
    return [float(a) for a in answer]


def test_weighted_sum_and_metrics():
    prompts, completions, ids, rows = _batch(3)
    rewards, mask, metrics = _rf(const(2.0), by_index, weights=[0.5, -3.0])(prompts, completions, ids, rows)
    # 0.5 * 2 - 3 * [0, 1, 2]
    assert rewards.dtype == torch.float32 and mask.dtype == torch.bool
    assert rewards.tolist() == [1.0, -2.0, -5.0]
    assert mask.tolist() == [True, True, True]
    assert metrics == {"reward/const_2.0": 2.0, "reward/by_index": 1.0}


def test_default_weights_are_one_and_bool():
    assert [w for _, _, w in _rf(const(1.0), by_index).functions] == [1.0, 1.0]
    assert not RewardFunctions.from_specs([])
    assert RewardFunctions.from_specs(["gkd.task:exact_match_reward"])
    assert RewardFunctions.from_specs(["gkd.task:exact_match_reward"]).functions[0][0] == "gkd.task:exact_match_reward"


def test_weights_length_mismatch():
    with pytest.raises(RewardError, match="reward_weights has 1 values but reward_funcs has 2"):
        _rf(const(1.0), by_index, weights=[1.0])


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1"])
def test_weights_must_be_finite_numbers(bad):
    with pytest.raises(RewardError, match="reward weight for 'by_index' must be"):
        _rf(by_index, weights=[bad])


def test_same_function_twice_keeps_both_metrics():
    prompts, completions, ids, rows = _batch(2)
    rewards, _, metrics = _rf(by_index, by_index, weights=[1.0, 2.0])(prompts, completions, ids, rows)
    assert rewards.tolist() == [0.0, 3.0]
    assert metrics == {"reward/by_index": 0.5, "reward/by_index#2": 0.5}


# --- None masking --------------------------------------------------------------------------------


def test_none_masking_keeps_other_functions_value():
    def sometimes(prompts, completions, **kwargs):
        return [None, 4.0, None]

    def never(prompts, completions, **kwargs):
        return [None, None, None]

    prompts, completions, ids, rows = _batch(3)
    rewards, mask, metrics = _rf(sometimes, by_index, never, weights=[1.0, 10.0, 5.0])(prompts, completions, ids, rows)
    assert rewards.tolist() == [0.0, 14.0, 20.0]
    assert mask.tolist() == [True, True, True]
    assert metrics == {"reward/sometimes": 4.0, "reward/by_index": 1.0}  # 'never' gave no value: no metric


def test_all_none_is_masked_with_zero_reward():
    def partial(prompts, completions, **kwargs):
        return [1.5, None, None]

    def other(prompts, completions, **kwargs):
        return [None, 2.0, None]

    prompts, completions, ids, rows = _batch(3)
    rewards, mask, _ = _rf(partial, other, weights=[2.0, 1.0])(prompts, completions, ids, rows)
    assert rewards.tolist() == [3.0, 2.0, 0.0]
    assert mask.tolist() == [True, True, False]


def test_empty_batch():
    rewards, mask, metrics = _rf(by_index)([], [], [], [])
    assert rewards.shape == (0,) and mask.shape == (0,) and metrics == {}


# --- kwargs --------------------------------------------------------------------------------------


def test_kwargs_columns_and_completion_ids_arrive_reserved_keys_do_not():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, **kwargs)
        return [0.0] * len(prompts)

    prompts, completions, ids, rows = _batch(2)
    rows[1]["extra"] = "only in row 1"
    _rf(spy)(prompts, completions, ids, rows)
    assert set(seen) == {"prompts", "completions", "completion_ids", "answer", "extra"}
    assert seen["prompts"] == prompts and seen["completions"] == completions
    assert seen["completion_ids"] == [[0, 1], [1, 2]]
    assert seen["answer"] == [0, 1]
    assert seen["extra"] == [None, "only in row 1"]


def test_trl_style_keyword_only_use():
    # TRL calls reward functions with keywords, so a function may omit `prompts` or list args in any order.
    def trl_fn(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def reordered(completions, prompts, completion_ids, answer):
        return [float(len(ids) + a) for ids, a in zip(completion_ids, answer, strict=True)]

    prompts, completions, ids, rows = _batch(2)
    rewards, _, metrics = _rf(trl_fn, reordered)(prompts, completions, ids, rows)
    assert rewards.tolist() == [2.0 + 2.0, 2.0 + 3.0]
    assert metrics == {"reward/trl_fn": 2.0, "reward/reordered": 2.5}


def test_extra_kwargs_are_passed_unchanged():
    def staged(prompts, completions, trainer_state, **kwargs):
        return [float(trainer_state)] * len(prompts)

    prompts, completions, ids, rows = _batch(2)
    rewards, _, _ = _rf(staged)(prompts, completions, ids, rows, extra_kwargs={"trainer_state": 7})
    assert rewards.tolist() == [7.0, 7.0]


def test_function_without_kwargs_gets_actionable_error():
    def strict(prompts, completions):
        return [0.0] * len(prompts)

    prompts, completions, ids, rows = _batch(2)
    with pytest.raises(RewardError, match=r"reward function 'strict' cannot be called with keywords .*"
                                          r"declare it as f\(prompts, completions, \*\*kwargs\)"):
        _rf(strict)(prompts, completions, ids, rows)


# --- return types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda n: torch.arange(n, dtype=torch.float64),
        lambda n: np.arange(n, dtype=np.float32),
        lambda n: tuple(float(i) for i in range(n)),
        lambda n: [np.float64(i) for i in range(n)],
        lambda n: [torch.tensor(float(i)) for i in range(n)],
        lambda n: [i for i in range(n)],
    ],
    ids=["tensor", "numpy", "tuple", "numpy-scalars", "0d-tensors", "ints"],
)
def test_array_like_returns_accepted(make):
    def fn(prompts, completions, **kwargs):
        return make(len(prompts))

    prompts, completions, ids, rows = _batch(3)
    rewards, mask, _ = _rf(fn)(prompts, completions, ids, rows)
    assert rewards.tolist() == [0.0, 1.0, 2.0] and mask.all()


def test_bool_values_are_zero_one():
    def fn(prompts, completions, **kwargs):
        return [True, False, np.bool_(True)]

    prompts, completions, ids, rows = _batch(3)
    assert _rf(fn)(prompts, completions, ids, rows)[0].tolist() == [1.0, 0.0, 1.0]


def test_numpy_object_array_with_none():
    def fn(prompts, completions, **kwargs):
        return np.array([1.0, None, 2.0], dtype=object)

    prompts, completions, ids, rows = _batch(3)
    rewards, mask, _ = _rf(fn)(prompts, completions, ids, rows)
    assert rewards.tolist() == [1.0, 0.0, 2.0] and mask.tolist() == [True, False, True]


def test_async_reward_function():
    async def fn(prompts, completions, **kwargs):
        return [1.0] * len(prompts)

    prompts, completions, ids, rows = _batch(2)
    assert _rf(fn)(prompts, completions, ids, rows)[0].tolist() == [1.0, 1.0]


# --- error paths ---------------------------------------------------------------------------------


def test_raise_reports_first_offending_prompt_index():
    def picky(prompts, completions, **kwargs):
        for c in completions:
            if c == "c2":
                raise ValueError("cannot parse 'c2'")
        return [0.0] * len(prompts)

    prompts, completions, ids, rows = _batch(4)
    prompts[2] = "x" * 100
    with pytest.raises(RewardError) as info:
        _rf(picky)(prompts, completions, ids, rows)
    msg = str(info.value)
    assert msg == (
        "reward function 'picky' raised ValueError: cannot parse 'c2' at prompt index 2 "
        f"(prompt: '{'x' * 60}'...)"
    )
    assert isinstance(info.value.__cause__, ValueError)


def test_raise_slices_columns_for_single_sample_calls():
    def needs_answer(prompts, completions, answer, **kwargs):
        assert len(answer) == len(prompts) == len(kwargs["completion_ids"])
        if 1 in answer:
            raise KeyError("answer 1")
        return [0.0] * len(prompts)

    prompts, completions, ids, rows = _batch(3)
    with pytest.raises(RewardError, match=r"'needs_answer' raised KeyError: 'answer 1' at prompt index 1 "
                                          r"\(prompt: 'prompt number 1'\)"):
        _rf(needs_answer)(prompts, completions, ids, rows)


def test_raise_only_on_batch_reports_without_index():
    def batch_only(prompts, completions, **kwargs):
        if len(prompts) > 1:
            raise RuntimeError("batch too big")
        return [1.0]

    prompts, completions, ids, rows = _batch(3)
    with pytest.raises(RewardError) as info:
        _rf(batch_only)(prompts, completions, ids, rows)
    msg = str(info.value)
    assert msg.startswith("reward function 'batch_only' raised RuntimeError: batch too big")
    assert "prompt index" not in msg


def test_wrong_count():
    def short(prompts, completions, **kwargs):
        return [1.0, 2.0, 3.0]

    prompts, completions, ids, rows = _batch(4)
    with pytest.raises(RewardError, match=r"^reward function 'short' returned 3 values for 4 prompts$"):
        _rf(short)(prompts, completions, ids, rows)


@pytest.mark.parametrize("out", [1.0, None, {"a": 1.0}, "1234"], ids=["float", "None", "dict", "str"])
def test_not_a_list(out):
    def bad(prompts, completions, **kwargs):
        return out

    prompts, completions, ids, rows = _batch(4)
    with pytest.raises(RewardError, match=rf"reward function 'bad' returned {type(out).__name__}; expected a list of 4"):
        _rf(bad)(prompts, completions, ids, rows)


def test_two_dimensional_tensor_rejected():
    def matrix(prompts, completions, **kwargs):
        return torch.zeros(len(prompts), 1)

    prompts, completions, ids, rows = _batch(2)
    with pytest.raises(RewardError, match=r"'matrix' returned a 2-D Tensor; expected one value per prompt \(2\)"):
        _rf(matrix)(prompts, completions, ids, rows)


def test_non_numeric_value_names_index_and_value():
    def stringy(prompts, completions, **kwargs):
        return [1.0, "0.5", 2.0]

    prompts, completions, ids, rows = _batch(3)
    with pytest.raises(RewardError, match=r"^reward function 'stringy' returned '0\.5' \(str\) at prompt index 1; "
                                          r"expected a float or None$"):
        _rf(stringy)(prompts, completions, ids, rows)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value_names_index_and_value(bad):
    def nonfinite(prompts, completions, **kwargs):
        return [0.0, 0.0, bad]

    prompts, completions, ids, rows = _batch(3)
    with pytest.raises(RewardError, match=rf"^reward function 'nonfinite' returned {bad} at prompt index 2; "
                                          r"rewards must be finite"):
        _rf(nonfinite)(prompts, completions, ids, rows)


def test_nan_in_tensor_is_rejected():
    def nan_tensor(prompts, completions, **kwargs):
        return torch.tensor([1.0, float("nan")])

    prompts, completions, ids, rows = _batch(2)
    with pytest.raises(RewardError, match="'nan_tensor' returned nan at prompt index 1"):
        _rf(nan_tensor)(prompts, completions, ids, rows)


def test_inconsistent_batch_rejected():
    prompts, completions, ids, rows = _batch(3)
    with pytest.raises(RewardError, match="3 prompts, 2 completions"):
        _rf(by_index)(prompts, completions[:2], ids, rows)


def test_error_messages_are_one_line():
    def multiline(prompts, completions, **kwargs):
        raise ValueError("first line\nsecond line")

    prompts, completions, ids, rows = _batch(2)
    with pytest.raises(RewardError) as info:
        _rf(multiline)(prompts, completions, ids, rows)
    assert "\n" not in str(info.value)
    assert "raised ValueError: first line second line at prompt index 0" in str(info.value)
