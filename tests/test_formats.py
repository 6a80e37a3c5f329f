"""Every dataset format a user brings (TRL's four, chat messages with and without a reference, Dolly,
{text}), mixed in one file, CSV cells, special tokens applied once, and prompt-only data refused at
start-up where a step needs references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkd.cli import main
from gkd.data import PromptDataset, load_rows, normalize_rows

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
USER = [{"role": "user", "content": "1+2"}]
ANSWER = [{"role": "assistant", "content": "30"}]


@pytest.fixture
def chat_tokenizer():
    from gkd.task import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _bos_adding_tokenizer():
    """The built-in tokenizer, but adding <bos> itself like Llama / Gemma tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    from gkd.task import build_tokenizer

    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("row, prompt, completion, chat", [
    ({"prompt": "<bos>1+2="}, "<bos>1+2=", None, False),                          # standard prompt-only
    ({"prompt": "<bos>1+2=", "completion": "30"}, "<bos>1+2=", "30", False),    # standard prompt-completion
    ({"prompt": USER}, "<bos>1+2=", None, True),                                # conversational prompt-only
    ({"prompt": USER, "completion": ANSWER}, "<bos>1+2=", "30", True),          # conversational prompt-completion
    ({"messages": USER + ANSWER}, "<bos>1+2=", "30", True),                     # messages with the reference
    ({"messages": USER}, "<bos>1+2=", None, True),                              # messages ending with the user
    ({"instruction": "Add", "context": "1+2", "response": "3"}, None, "3", False),  # Dolly
    ({"instruction": "Add"}, None, None, False),                                # Dolly, prompt only
    ({"text": "1+2=3"}, "", "1+2=3", False),                                    # {text}: lm_dataset
])
def test_each_format_becomes_prompt_and_completion(chat_tokenizer, row, prompt, completion, chat):
    (got,) = normalize_rows([row], chat_tokenizer, source="d.jsonl")
    if prompt is not None:
        assert got["prompt"] == prompt
    else:
        assert "### Instruction:\nAdd" in got["prompt"]
    assert got["completion"] == completion and got["_chat"] is chat and got["_where"] == "d.jsonl:1"


def test_a_file_mixing_formats_is_read_row_by_row(tmp_path, chat_tokenizer):
    """datasets fills a column a row lacks with None: a prompt/completion row must not "have" messages."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "<bos>1+2=", "completion": "30"}, {"messages": USER + ANSWER},
            {"instruction": "Add", "context": "1+2", "response": "3"}, {"prompt": USER}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_rows(str(path), chat_tokenizer, part="all")
    assert [r["completion"] for r in got] == ["30", "30", "3", None]
    assert [r["_chat"] for r in got] == [False, True, False, True]


@pytest.mark.parametrize("row, message", [
    ({"prompt": 12}, "d.jsonl:1: 'prompt' must be text or a list of chat messages, got int"),
    ({"prompt": [{"role": "user"}]}, "d.jsonl:1: 'prompt' must be a non-empty list"),
    ({"messages": ANSWER}, "d.jsonl:1: 'messages' holds only an assistant turn"),
    ({"prompt": "x", "completion": {"a": 1}}, "d.jsonl:1: 'completion' must be text, got dict"),
    ({"question": "x"}, "d.jsonl:1: missing column 'prompt' (found: question)"),
    ({"prompt": "x", "messages": USER}, "d.jsonl:1: the row has both 'messages' and 'prompt'"),
])
def test_bad_rows_name_the_row(chat_tokenizer, row, message):
    with pytest.raises(ValueError) as err:
        normalize_rows([row], chat_tokenizer, source="d.jsonl")
    assert message in str(err.value)


def test_csv_cells_stay_text(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"<bos>1+2=",007\n"<bos>3+4=",\n')
    rows = load_rows(str(path), tokenizer, part="all")
    assert [r["completion"] for r in rows] == ["007", None]  # digits stay text; an empty cell is no reference


def test_special_tokens_are_applied_once():
    tok = _bos_adding_tokenizer()
    bos = tok.bos_token_id
    rows = normalize_rows([{"prompt": "1+2="}, {"prompt": "<bos>1+2="}, {"prompt": USER}, {"text": "12"}], tok)
    ds = PromptDataset(rows, tok, max_prompt_length=64, max_new_tokens=8)
    plain, carried, chat, text = (ds[i].prompt_ids for i in range(4))
    body = tok("1+2=", add_special_tokens=False).input_ids
    assert plain == carried == chat == [bos, *body]  # one BOS: added, already in the text, or from the template
    assert text == [bos]  # an empty prompt is the BOS alone, so the first text token is predicted


def test_prompt_only_data_with_off_policy_steps_fails_at_start(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "<bos>1+2=", "completion": "30"}) + "\n" + json.dumps({"prompt": "<bos>3+4="}) + "\n")
    code = main(["train", str(ROOT / "recipes" / "tiny.yaml"), f"dataset={data}", "lmbda=0.5", "per_device_batch_size=1",
                 f"output_dir={tmp_path / 'run'}", "progress_bar=false", "max_steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert err[-1].startswith("gkd train: error:") and f"{data}:2: no reference completion" in err[-1], err[-1]
    assert "lmbda: 1" in err[-1]
    # every step on-policy: prompts suffice
    assert main(["train", str(ROOT / "recipes" / "tiny.yaml"), f"dataset={data}", "lmbda=1", "per_device_batch_size=1",
                 f"output_dir={tmp_path / 'run2'}", "progress_bar=false", "max_steps=2", "save_final_model=false"]) == 0


def test_text_rows_feed_the_lm_loss(tmp_path, tokenizer):
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    cfg = GKDConfig(algorithm="minillm", teacher="builtin:tiny-teacher", student="builtin:tiny-student",
                    num_train_examples=64, max_new_tokens=9, num_rollouts=4, per_device_batch_size=4, ppo_epochs=1,
                    max_steps=1, lm_coef=0.5, lm_dataset="given", output_dir=str(tmp_path / "run"),
                    progress_bar=False, save_final_model=False)
    lm = [{"text": "<bos>12+34=" + "6400"}] * 8
    (metrics,) = GKDTrainer(cfg, lm_rows=lm).train()
    assert metrics["lm"] > 0 and metrics["loss"] == pytest.approx(
        metrics["pg"] + cfg.alpha * cfg.single_step_coef * metrics["single_step"] + 0.5 * metrics["lm"], rel=1e-5)
