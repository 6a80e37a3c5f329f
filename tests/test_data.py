"""Data loading, tokenisation and batching; the built-in task and its checker."""

from __future__ import annotations

import json

import pytest

from gkd.data import PromptDataset, collate, load_rows, reference_rollout
from gkd.task import Problem, check_answer, exact_match_reward, parse_written_sum, split_problems, written_sum

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_jsonl(tmp_path, tokenizer):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "<bos>12+3=", "completion": "5010", "answer": 15}])
    rows = load_rows(str(f), tokenizer)
    ds = PromptDataset(rows, tokenizer, max_prompt_length=4, max_new_tokens=3)
    ex = ds[0]
    assert ex.prompt_ids == tokenizer("<bos>12+3=", add_special_tokens=False).input_ids[-4:]  # left-truncated
    assert ex.reference_ids == tokenizer("501", add_special_tokens=False).input_ids  # cut at max_new_tokens
    assert ex.row["answer"] == 15  # extra columns travel along for reward functions


def test_reference_keeps_eos(tmp_path, tokenizer):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "<bos>1+2=", "completion": "30"}])
    ex = PromptDataset(load_rows(str(f), tokenizer), tokenizer, max_prompt_length=64, max_new_tokens=8)[0]
    assert ex.reference_ids[-1] == tokenizer.eos_token_id


def test_messages_use_the_chat_template(tmp_path, tokenizer):
    from gkd.task import build_tokenizer

    chat_tok = build_tokenizer()
    chat_tok.chat_template = CHAT_TEMPLATE
    f = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "1+2"},
                                                    {"role": "assistant", "content": "30"}]}])
    rows = load_rows(str(f), chat_tok)
    assert rows[0]["prompt"] == "1+2=" and rows[0]["completion"] == "30"
    with pytest.raises(ValueError, match="chat template"):
        load_rows(str(f), build_tokenizer())


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\nnot json\n', r"d.jsonl:2: not valid JSON"),
        ('{"question": "a"}\n', r"d.jsonl:1: missing column 'prompt' \(found: question\)"),
        ("\n", "is empty"),
        ("[1, 2]\n", "must be a JSON object"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, tokenizer, content, message):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_rows(str(f), tokenizer)


def test_missing_file_and_unknown_builtin(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_rows(str(tmp_path / "none.jsonl"), tokenizer)
    with pytest.raises(ValueError, match="valid: builtin:addition"):
        load_rows("builtin:sorting", tokenizer)


def test_collate_pads_prompts_left_and_references_right(tokenizer):
    rows = [{"prompt": "<bos>1+2=", "completion": "30"}, {"prompt": "<bos>1234+1=", "completion": "203040"}]
    ds = PromptDataset(rows, tokenizer, max_prompt_length=64, max_new_tokens=16)
    batch = collate([ds[0], ds[1]], tokenizer.pad_token_id)
    assert batch["prompt_mask"][0].tolist() == [False] * 3 + [True] * 5
    assert batch["reference_mask"].sum(1).tolist() == [3, 7]
    r = reference_rollout(batch)
    assert not r.on_policy and r.is_reference and r.num_tokens == 10


def test_off_policy_without_references_is_a_clear_error(tokenizer):
    ds = PromptDataset([{"prompt": "<bos>1+2="}], tokenizer, max_prompt_length=8, max_new_tokens=4)
    with pytest.raises(ValueError, match="reference completions"):
        reference_rollout(collate([ds[0]], tokenizer.pad_token_id))


def test_task_written_sum_and_checker():
    p = Problem(274, 59, digits=4)
    assert p.prompt == "<bos>4720+9500="
    assert p.completion == "31313000" == written_sum(274, 59, 4)
    assert parse_written_sum(p.completion) == 333
    assert check_answer(p.prompt, p.completion + "<eos>")
    assert not check_answer(p.prompt, "31313001")
    assert not check_answer("garbage", "1")
    assert exact_match_reward([p.prompt, p.prompt], [p.completion, "9"]) == [1.0, 0.0]


def test_task_splits_are_disjoint_and_deterministic():
    train, held = split_problems(500, 50, max_digits=3, seed=1)
    assert not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in held}
    assert split_problems(500, 50, max_digits=3, seed=1)[0] == train


def test_dolly_rows_use_the_alpaca_template(tokenizer):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "data" / "dolly_sample.jsonl"
    rows = load_rows(str(path), tokenizer)
    with_context, without = rows[0], rows[1]
    assert "### Input:\nVirgin Australia" in with_context["prompt"]
    assert with_context["prompt"].endswith("### Response:\n")
    assert "### Input" not in without["prompt"] and without["completion"] == "Tope"
    assert with_context["category"] == "closed_qa"  # extra columns reach reward functions
