"""`gkd eval` and the Dolly data path: split, length filter, metrics, CLI, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from gkd.cli import main
from gkd.data import filter_by_length, load_rows, split_rows
from gkd.evaluate import evaluate, exact_match, rouge_l

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT / "tests" / "data" / "dolly_small.jsonl"


def text_tokenizer():
    """Character-level tokenizer over printable ASCII (+ newline), built in code like the task's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<bos>", "<eos>", "\n", *[chr(c) for c in range(32, 127)]]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<bos>|<eos>|<pad>|\n|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<pad>", padding_side="left", model_max_length=1024)


def text_model(tokenizer, seed: int = 0, hidden: int = 32):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ttok():
    return text_tokenizer()


# --- data path ------------------------------------------------------------------------------------

def test_dolly_file_uses_the_alpaca_template_with_and_without_input(ttok):
    rows = load_rows(str(DOLLY), ttok, part="all")
    assert len(rows) == 30
    plain, with_input = rows[0], rows[2]
    assert plain["prompt"].startswith("Below is an instruction that describes a task. Write a response")
    assert "### Input" not in plain["prompt"] and plain["prompt"].endswith("### Response:\n")
    assert "paired with an input" in with_input["prompt"]
    assert "### Input:\nThe river rises" in with_input["prompt"]
    assert plain["completion"] == "Paris is the capital of France." and plain["category"] == "open_qa"


def test_split_is_seeded_disjoint_and_keeps_file_order():
    rows = [{"prompt": str(i), "completion": "x"} for i in range(30)]
    train, val = split_rows(rows, 0.2, seed=0)
    assert len(val) == 6 and len(train) == 24
    assert sorted(int(r["prompt"]) for r in train + val) == list(range(30))
    assert [int(r["prompt"]) for r in val] == sorted(int(r["prompt"]) for r in val)
    assert split_rows(rows, 0.2, seed=0) == (train, val)
    assert split_rows(rows, 0.2, seed=1)[1] != val
    assert len(split_rows(rows, 5, seed=0)[1]) == 5
    assert split_rows(rows, 0, seed=0) == (rows, [])
    for bad in (30, 2.5, -0.1):
        with pytest.raises(ValueError, match="validation_size"):
            split_rows(rows, bad)


def test_load_rows_parts_and_length_filter(ttok, caplog):
    train = load_rows(str(DOLLY), ttok, validation_size=0.2, split_seed=3)
    val = load_rows(str(DOLLY), ttok, part="validation", validation_size=0.2, split_seed=3)
    assert len(train) == 24 and len(val) == 6
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    with caplog.at_level(logging.WARNING, logger="gkd"):
        kept = load_rows(str(DOLLY), ttok, part="all", max_response_length=200)
    assert len(kept) == 28  # the two long answers (printing press, bicycle gears) are dropped
    assert "dropped 2 of 30 rows" in caplog.text
    _, counts = filter_by_length(load_rows(str(DOLLY), ttok, part="all"), ttok, max_prompt_length=200)
    assert counts["too_long_prompt"] > 0 and counts["too_long_response"] == 0
    with pytest.raises(ValueError, match="no validation part"):
        load_rows(str(DOLLY), ttok, part="validation")


def test_training_uses_only_the_train_part(ttok, tmp_path):
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    student = save(text_model(ttok), ttok, tmp_path / "student")
    cfg = GKDConfig(student=str(student), teacher=None, divergence="kd", kd_weight=0.0, lmbda=0.0,
                    dataset=str(DOLLY), validation_size=0.2, split_seed=3, max_response_length=200,
                    per_device_batch_size=2, max_new_tokens=8, output_dir=str(tmp_path / "run"), progress_bar=False)
    trained_on = {r["prompt"] for r in GKDTrainer(cfg).loader.dataset.rows}
    val = {r["prompt"] for r in load_rows(str(DOLLY), ttok, part="validation", validation_size=0.2, split_seed=3)}
    assert not trained_on & val
    assert len(trained_on) == 24 - sum(r["prompt"] not in val and len(r["completion"]) > 200
                                       for r in load_rows(str(DOLLY), ttok, part="all"))


# --- metrics --------------------------------------------------------------------------------------

def test_rouge_l_and_exact_match_values():
    # LCS 3 of 3 predicted and 6 reference words: P = 1, R = 0.5, F = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"])[0] == pytest.approx(2 / 3)
    assert rouge_l(["Cats sitting"], ["cat sits"])[0] == pytest.approx(1.0)  # lower-cased and stemmed
    assert exact_match(" Four. \n", "Four.") and not exact_match("four.", "Four.")


def test_evaluate_exact_match_rouge_and_kl(ttok):
    model, other = text_model(ttok, seed=0), text_model(ttok, seed=1)
    prompts = [f"Q{i}: say something" for i in range(6)]
    first = evaluate(model, ttok, prompts, max_new_tokens=6, num_samples=2)
    assert first.accuracy is None and first.rouge_l is None and first.forward_kl is None
    greedy = [s["completion"] for s in evaluate(model, ttok, prompts, max_new_tokens=6, num_samples=6).samples]
    # references equal to the greedy output for half the rows: exact match 1/2 exactly
    rows = [{"prompt": p, "completion": g if i % 2 == 0 else "zzz"} for i, (p, g) in enumerate(zip(prompts, greedy, strict=True))]
    r = evaluate(model, ttok, rows, teacher=model, max_new_tokens=6)
    assert r.accuracy == pytest.approx(0.5)
    assert r.forward_kl == pytest.approx(0.0, abs=1e-6) and r.reverse_kl == pytest.approx(0.0, abs=1e-6)
    assert r.samples[0]["reference"] == greedy[0]
    r2 = evaluate(model, ttok, rows, teacher=other, max_new_tokens=6)
    assert r2.forward_kl > 0.01 and r2.reverse_kl > 0.01 and r2.forward_kl != pytest.approx(r2.reverse_kl)
    # a checker takes precedence over the references; reward functions are averaged per function
    always = evaluate(model, ttok, rows, lambda p, c: True, max_new_tokens=6,
                      reward_funcs=[lambda prompts, completions, **kw: [float(len(c)) for c in completions]])
    assert always.accuracy == 1.0
    assert always.rewards["reward"] == pytest.approx(sum(len(g) for g in greedy) / 6)


def test_sampled_decoding_is_seeded(ttok):
    model = text_model(ttok)
    prompts = [f"prompt {i}" for i in range(4)]
    kw = dict(decoding="sample", max_new_tokens=8, num_samples=4)
    a = evaluate(model, ttok, prompts, seed=1, samples_per_prompt=3, **kw)
    b = evaluate(model, ttok, prompts, seed=1, samples_per_prompt=3, **kw)
    c = evaluate(model, ttok, prompts, seed=2, samples_per_prompt=3, **kw)
    assert a.samples == b.samples and a.samples != c.samples
    assert a.num_prompts == 4 and a.num_completions == 12
    assert [s["prompt"] for s in a.samples] == prompts  # one shown per prompt, not three of the first


# --- gkd eval -------------------------------------------------------------------------------------

def test_cli_eval_on_dolly_validation_with_teacher(ttok, tmp_path, capsys):
    student = save(text_model(ttok, seed=0), ttok, tmp_path / "student")
    teacher = save(text_model(ttok, seed=1, hidden=64), ttok, tmp_path / "teacher")
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(student), "--teacher", str(teacher), "--dataset", str(DOLLY),
                 "--validation-size", "0.2", "--decoding", "both", "--max-new-tokens", "8", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| student | greedy |" in printed and "| teacher | sample |" in printed
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 6 and report["split"] == "validation"
    by = {(r["model"], r["decoding"]): r for r in report["results"]}
    assert set(by) == {("student", "greedy"), ("teacher", "greedy"), ("student", "sample"), ("teacher", "sample")}
    assert by["student", "greedy"]["reverse_kl"] > 0 and by["teacher", "greedy"]["reverse_kl"] is None
    assert 0 <= by["student", "sample"]["rouge_l"] <= 1 and by["student", "sample"]["accuracy"] is not None


def test_cli_eval_builtin_task_reads_the_run_config(tokenizer, tmp_path, capsys):
    from gkd.config import GKDConfig
    from gkd.task import STUDENT_SHAPE, save_random_model

    model = save_random_model(tmp_path / "run" / "final", STUDENT_SHAPE, seed=0)
    GKDConfig(student=str(model), teacher=None, divergence="kd", kd_weight=0.0, lmbda=0.0, max_digits=3, num_train_examples=2000,
              max_new_tokens=5, seed=7).save(tmp_path / "run" / "config.yaml")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model), "--max-prompts", "16", "--output", str(out)]) == 0
    assert "settings from" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["settings"]["data_seed"] == 7 and report["settings"]["max_new_tokens"] == 5
    (r,) = report["results"]
    assert r["rewards"]["reward/gkd.task:exact_match_reward"] == pytest.approx(r["accuracy"])
    from gkd.data import load_rows as rows_of

    held = rows_of("builtin:addition", tokenizer, part="validation", max_digits=3, num_examples=2000, seed=7)[:16]
    assert r["samples"][0]["prompt"] == held[0]["prompt"] and r["samples"][0]["reference"] == held[0]["completion"]


@pytest.mark.parametrize("args, expect", [
    (["--model", "{tmp}/missing"], "model folder"),
    (["--model", "{tmp}"], "has no config.json"),
    (["--model", "{student}", "--dataset", str(DOLLY)], "no validation part"),
    (["--model", "{student}", "--dataset", "{tmp}/none.jsonl"], "not found"),
    (["--model", "{student}", "--decoding", "sample", "--temperature", "0"], "temperature must be > 0"),
    (["--model", "{student}", "--teacher", "{tmp}/missing"], "teacher folder"),
])
def test_cli_eval_bad_input_is_one_line(tmp_path, capsys, args, expect):
    from gkd.task import STUDENT_SHAPE, save_random_model

    student = save_random_model(tmp_path / "student", STUDENT_SHAPE)
    code = main(["eval", *[a.format(tmp=tmp_path, student=student) for a in args], "--config", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("gkd eval: error:") and expect in err[-1], err


def test_a_degenerate_student_scores_badly_where_it_cannot_game_the_metric(tokenizer):
    """A student that always emits one token: its own samples show it (distinct-2, repeat-4, no EOS),
    and the teacher-forced KL on the teacher's answers is far above a faithful student's."""
    from conftest import tiny_model

    from gkd.evaluate import greedy_completions, teacher_forced_kl

    teacher = tiny_model(tokenizer, hidden=64, seed=2)
    degenerate = tiny_model(tokenizer, hidden=64, seed=2)
    head = torch.nn.Linear(64, degenerate.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids("7")] = 20.0  # always "7"
    degenerate.lm_head = head
    rows = [{"prompt": f"<bos>{a}+{b}="} for a, b in ((12, 34), (5, 6), (987, 1), (40, 2))]
    bad = evaluate(degenerate, tokenizer, rows, teacher=teacher, max_new_tokens=12)
    good = evaluate(teacher, tokenizer, rows, max_new_tokens=12, decoding="sample", seed=0)  # a random model samples diversely
    assert bad.distinct_2 == pytest.approx(1 / 11) and bad.repeat_4 == pytest.approx(8 / 9) and bad.no_eos == 1.0
    assert good.distinct_2 > bad.distinct_2
    answers = greedy_completions(teacher, tokenizer, rows, max_new_tokens=12, max_prompt_length=64, batch_size=4)
    answered = [{**r, "completion": a} for r, a in zip(rows, answers, strict=True)]
    kw = dict(max_new_tokens=12, max_prompt_length=64, batch_size=4)
    fkl_bad, rkl_bad = teacher_forced_kl(degenerate, teacher, tokenizer, answered, **kw)
    fkl_same, rkl_same = teacher_forced_kl(teacher, teacher, tokenizer, answered, **kw)
    assert fkl_same == pytest.approx(0.0, abs=1e-6) and rkl_same == pytest.approx(0.0, abs=1e-6)
    assert fkl_bad > 1.0 and rkl_bad > 1.0


def test_kl_sums_in_row_chunks_equal_the_whole_batch(ttok):
    """The held-out KLs are formed a few rows at a time (bounded memory: a 512-token evaluation with a
    teacher ran out of 24 GB); chunks of one row give the whole batch's sums."""
    from gkd.evaluate import kl_sums
    from gkd.rollout import SamplingParams, sample

    model, teacher = text_model(ttok, seed=0), text_model(ttok, seed=1)
    enc = ttok(["ab", "hello there", "x"], padding=True, return_tensors="pt")
    rollout = sample(model, enc.input_ids, enc.attention_mask.bool(), SamplingParams(max_new_tokens=7, do_sample=True),
                     eos_token_id=ttok.eos_token_id, pad_token_id=ttok.pad_token_id, vocab_size=len(ttok),
                     generator=torch.Generator().manual_seed(0))
    whole = kl_sums(model, teacher, rollout, len(ttok), max_elements=10**9)
    per_row = kl_sums(model, teacher, rollout, len(ttok), max_elements=1)
    assert whole[0] > 0 and whole[1] > 0
    assert per_row == pytest.approx(whole, rel=1e-5)
