"""Verifiable instruction following (gkd.verifiable, `gkd eval --benchmark ifeval`): IFEval's checkers from
if-verifiable on verdicts known by construction, the NLTK-free fallback, bad rows, and the CLI end to end
on tiny models with the generations written before scoring."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable", reason="needs the eval extra: pip install 'gkd[eval]'")

from gkd import verifiable  # noqa: E402
from gkd.cli import main  # noqa: E402
from gkd.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "tests" / "data" / "ifeval_small.jsonl"


def _make_instructions():
    spec = importlib.util.spec_from_file_location("make_instructions", ROOT / "recipes" / "data" / "make_instructions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: For every instruction id the prompt generator uses: (kwargs, a completion that follows it, one that does not).
#: Each verdict is known by construction (read the completion).
KNOWN = {
    "change_case:english_lowercase": ({}, "the sea is calm and blue today.", "The sea is calm and blue today."),
    "change_case:english_capital": ({}, "THE SEA IS CALM AND BLUE TODAY.", "THE SEA IS calm AND BLUE TODAY."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 3}, "* bread\n* cheese\n* apples", "* bread\n* cheese"),
    "startend:end_checker": ({"end_phrase": "That is all."}, "Rain falls down. That is all.",
                             "That is all. Rain falls down."),
    "keywords:existence": ({"keywords": ["water", "light"]}, "Water reflects light.", "Water is wet."),
    "keywords:forbidden_words": ({"forbidden_words": ["family", "home"]}, "We walked to the park.",
                                 "We walked home together."),
    "keywords:frequency": ({"keyword": "road", "frequency": 2, "relation": "at least"},
                           "The road was long and the road was dark.", "The road was long."),
    "punctuation:no_comma": ({}, "Apples and pears are fruit.", "Apples, pears and plums are fruit."),
    "detectable_format:title": ({}, "<<The Moon>>\nThe moon is bright.", "The Moon\nThe moon is bright."),
    "detectable_format:json_format": ({}, '```json\n{"dish": "soup"}\n```', "dish: soup"),
    "length_constraints:number_words": ({"num_words": 5, "relation": "less than"}, "Cats sleep a lot.",
                                        "Cats sleep a lot during the day."),
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": "at least"},
                                            "It rained. We stayed in. We read books.", "It rained. We stayed in."),
    "startend:quotation": ({}, '"The sea is blue."', "The sea is blue."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "See you soon.\nP.S. Bring a hat.",
                                      "See you soon. Bring a hat."),
}


def test_every_generated_constraint_type_has_a_known_verdict():
    generated = {c[0] for c in _make_instructions().CONSTRAINTS}
    assert generated == set(KNOWN), "a constraint type without a known-verdict case below"


@pytest.mark.parametrize("instruction_id", sorted(KNOWN))
def test_checker_verdicts_known_by_construction(instruction_id):
    kwargs, good, bad = KNOWN[instruction_id]
    row = {"prompt": "p", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    assert verifiable.check_rows([row]) == 1
    counts = verifiable.score_rows([row, row], [good, bad])
    assert counts.per_id[instruction_id] == [2, 1, 1], (instruction_id, counts.per_id)
    assert (counts.prompt_strict, counts.instruction_strict) == (1, 1)


def test_prompt_and_instruction_level_aggregation_strict_and_loose():
    lower = "change_case:english_lowercase"
    comma = "punctuation:no_comma"
    rows = [{"prompt": "a", "instruction_id_list": [lower, comma], "kwargs": [{}, {}]},
            {"prompt": "b", "instruction_id_list": [lower], "kwargs": [{}]},
            {"prompt": "c"},  # no constraints: not scored
            {"prompt": "d", "instruction_id_list": [comma], "kwargs": [{}]},
            {"prompt": "e", "instruction_id_list": [lower, comma], "kwargs": [{}, {}]}]
    # row 1: both pass; row 2: fails strict, passes loose (IFEval's loose drops the first line);
    # row 4: an empty answer follows nothing; row 5: one of two passes (the prompt fails)
    completions = ["all lowercase and no commas here.", "Intro Line\nthe rest is lowercase.", "x", "",
                   "lowercase, with a comma."]
    s = verifiable.score_rows(rows, completions).summary()
    assert (s["num_prompts"], s["num_instructions"]) == (4, 6)
    assert s["prompt_strict"] == pytest.approx(1 / 4) and s["prompt_loose"] == pytest.approx(2 / 4)
    assert s["instruction_strict"] == pytest.approx(3 / 6) and s["instruction_loose"] == pytest.approx(4 / 6)
    assert s["per_instruction"][lower] == {"n": 3, "strict": pytest.approx(2 / 3), "loose": 1.0}
    assert s["per_instruction"][comma] == {"n": 3, "strict": pytest.approx(1 / 3), "loose": pytest.approx(1 / 3)}


def test_generated_prompts_carry_valid_constraints_and_the_heal_split_holds_some():
    module = _make_instructions()
    rows = module.make(480)
    constrained = [r for r in rows if verifiable.constrained(r)]
    assert 0.3 * len(rows) < len(constrained) < 0.6 * len(rows)
    assert verifiable.check_rows(rows) == len(constrained)
    shipped = [json.loads(line) for line in (ROOT / "recipes" / "data" / "instructions.jsonl").open()]
    assert shipped == rows, "recipes/data/instructions.jsonl is stale: run recipes/data/make_instructions.py"
    from gkd.data import split_rows

    _, held = split_rows(shipped, 64, seed=0)  # the heal recipe's validation_size / split_seed
    assert sum(verifiable.constrained(r) for r in held) >= 20


@pytest.mark.parametrize("row, message", [
    ({"key": 7, "prompt": "p", "instruction_id_list": ["detectable_format:sonnet"], "kwargs": [{}]},
     "key=7: unknown instruction id 'detectable_format:sonnet'"),
    ({"key": 8, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]},
     "'kwargs' has 2 entries for 1 instruction ids"),
    ({"key": 9, "prompt": "p", "instruction_id_list": ["keywords:existence"], "kwargs": [{}]},
     "missing ['keywords']"),
    ({"key": 10, "prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 5, "relation": "about"}]}, "are not valid"),
    ({"key": 11, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": 3}]},
     "unexpected ['num_words']"),
    ({"key": 12, "prompt": "p", "instruction_id_list": "punctuation:no_comma"}, "must be a list"),
])
def test_bad_rows_are_one_line_errors_naming_the_row(row, message):
    with pytest.raises(InputError) as e:
        verifiable.check_rows([row], "bench.jsonl")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fallback_splitters_when_nltk_data_is_missing():
    """Offline NLTK raises LookupError for punkt: the checkers then count with regex splitters."""
    calls = []

    def count_sentences(text):
        raise LookupError("Resource punkt_tab not found")

    util = types.SimpleNamespace(count_sentences=count_sentences,
                                 split_into_sentences=lambda t: calls.append(t) or ["a", "b", "c"], nltk=object())
    import nltk

    verifiable._install_fallbacks(util)
    try:
        assert util.count_sentences("One. Two. Three.") == 3 and calls == ["One. Two. Three."]
        assert util.nltk.word_tokenize("HELLO big WORLD, it's fine.") == ["HELLO", "big", "WORLD", ",", "it's", "fine", "."]
        assert util.nltk.tokenize is nltk.tokenize  # everything else is NLTK's own
        assert verifiable._SPLITTER["name"].startswith("regex fallback")
    finally:
        verifiable.registry.cache_clear()
        verifiable.registry()  # back to the real module's state for the other tests


def test_missing_extra_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    verifiable.registry.cache_clear()
    monkeypatch.setitem(sys.modules, "if_verifiable.ifeval.instructions_registry", None)  # import fails
    try:
        code = main(["eval", "--model", "builtin:tiny-student", "--benchmark", "ifeval", "--benchmark-data", str(SMALL),
                     "--config", "none"])
    finally:
        verifiable.registry.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "pip install 'gkd[eval]'" in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("content, message", [
    ('{"key": 1, "prompt": "hi", "instruction_id_list": ["made:up"], "kwargs": [{}]}\n', "unknown instruction id 'made:up'"),
    ('{"key": 1, "prompt": "", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}\n', "'prompt' must be"),
    ('{"key": 1, "prompt": "hi", "kwargs": [{}]}\n', "no 'instruction_id_list'"),
    ('{"key": 1, "prompt": "hi", "instruction_id_list": ["punctuation:no_comma"]\n', "not valid JSON"),
])
def test_cli_bad_benchmark_file_is_exit_2(tmp_path, capsys, content, message):
    bad = tmp_path / "bench.jsonl"
    bad.write_text(content)
    code = main(["eval", "--model", "builtin:tiny-student", "--benchmark", "ifeval", "--benchmark-data", str(bad),
                 "--config", "none", "--generations", "none"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_benchmark_needs_data_and_data_needs_benchmark(capsys):
    assert main(["eval", "--model", "builtin:tiny-student", "--benchmark", "ifeval", "--config", "none"]) == 2
    assert "needs --benchmark-data" in capsys.readouterr().err
    assert main(["eval", "--model", "builtin:tiny-student", "--benchmark-data", str(SMALL), "--config", "none"]) == 2
    assert "needs --benchmark" in capsys.readouterr().err


def _chat_model(tmp_path: Path, name: str, seed: int) -> Path:
    """A tiny random model with the character tokenizer of test_eval and a chat template."""
    from test_eval import save, text_model, text_tokenizer

    tok = text_tokenizer()
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
                         "{% if add_generation_prompt %}<bos>assistant\n{% endif %}")
    return save(text_model(tok, seed=seed), tok, tmp_path / name)


def test_cli_benchmark_end_to_end_generations_written_before_scoring(tmp_path, capsys, monkeypatch):
    student, teacher = _chat_model(tmp_path, "student", 0), _chat_model(tmp_path, "teacher", 1)
    out = tmp_path / "ifeval.json"
    args = ["eval", "--model", str(student), "--teacher", str(teacher), "--benchmark", "ifeval", "--benchmark-data",
            str(SMALL), "--max-new-tokens", "12", "--decoding", "both", "--samples-per-prompt", "2", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    generations = [json.loads(line) for line in Path(report["generations"]).open()]
    assert report["generations"] == str(tmp_path / "ifeval.generations.jsonl")
    rows = [json.loads(line) for line in SMALL.open()]
    # 6 prompts: student greedy 6 + sampled 12, teacher greedy 6 + sampled 12
    kinds = [(g["model"], g["decoding"]) for g in generations]
    assert {k: kinds.count(k) for k in set(kinds)} == {("student", "greedy"): 6, ("student", "sample"): 12,
                                                       ("teacher", "greedy"): 6, ("teacher", "sample"): 12}
    assert "Verifiable instructions" in printed and "Greedy looping" in printed
    # each entry's scores equal IFEval's checkers applied to its own completions, read back from the file
    for entry in report["results"]:
        mine = [g for g in generations if (g["model"], g["decoding"]) == (entry["model"], entry["decoding"])]
        assert [g["key"] for g in mine] == [r["key"] for r in rows for _ in range(len(mine) // len(rows))]
        expect = verifiable.score_rows([rows[[r["key"] for r in rows].index(g["key"])] for g in mine],
                                       [g["completion"] for g in mine]).summary()
        assert entry["verifiable"]["instruction_loose"] == expect["instruction_loose"]
        assert entry["verifiable"]["num_prompts"] == len(mine)
    loop = report["looping"]
    assert loop["student_repeat_4"] == next(r["repeat_4"] for r in report["results"]
                                            if (r["model"], r["decoding"]) == ("student", "greedy"))

    # the generations file scores again without any model, to the same numbers
    rescored = tmp_path / "rescored.json"
    assert main(["eval", "--rescore", report["generations"], "--benchmark", "ifeval", "--benchmark-data", str(SMALL),
                 "--output", str(rescored)]) == 0
    again = {(r["model"], r["decoding"]): r for r in json.loads(rescored.read_text())["results"]}
    for entry in report["results"]:
        same = again[(entry["model"], entry["decoding"])]
        assert same["verifiable"] == entry["verifiable"] and same["no_eos"] == pytest.approx(entry["no_eos"])
    other = tmp_path / "other.jsonl"  # generations of other data: refused
    other.write_text(SMALL.read_text().replace('"key": 1,', '"key": 99,'))
    capsys.readouterr()
    assert main(["eval", "--rescore", report["generations"], "--benchmark", "ifeval", "--benchmark-data", str(other)]) == 2
    assert "made on other data" in capsys.readouterr().err

    # scoring fails after decoding: every generation of the first decoding is on disk already
    def boom(*a, **k):
        raise RuntimeError("checker crashed")

    monkeypatch.setattr(verifiable, "score_rows", boom)
    with pytest.raises(RuntimeError):
        main(["eval", "--model", str(student), "--benchmark", "ifeval", "--benchmark-data", str(SMALL),
              "--max-new-tokens", "12", "--generations", str(tmp_path / "kept.jsonl")])
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").open()]
    assert len(kept) == 6 and all(isinstance(g["completion"], str) for g in kept)


def test_shipped_benchmark_file_is_current_and_held_out():
    module = _make_instructions()
    train = module.make(480)
    shipped = [json.loads(line) for line in (ROOT / "recipes" / "data" / "verifiable_eval.jsonl").open()]
    assert shipped == module.make_benchmark(100, exclude=train), "run recipes/data/make_instructions.py"
    assert not {r["prompt"] for r in shipped} & {r["messages"][0]["content"] for r in train}
    assert verifiable.check_rows(shipped) == 100


def test_eval_steps_scores_held_out_constrained_rows(tmp_path):
    """eval_steps logs eval_ifeval_* equal to IFEval's checkers on the final student's own greedy answers."""
    from test_eval import text_model, text_tokenizer

    from gkd.config import GKDConfig
    from gkd.evaluate import model_completions
    from gkd.trainer import GKDTrainer

    tok = text_tokenizer()
    train = [{"prompt": f"say {w}:", "completion": w} for w in ("sun", "sea", "sky", "tree")]
    held = [{"prompt": "no commas please:", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"prompt": "write words:", "instruction_id_list": ["keywords:existence", "punctuation:no_comma"],
             "kwargs": [{"keywords": ["banana"]}, {}]},  # a random model never writes "banana"
            {"prompt": "plain row:", "completion": "x"}]
    cfg = GKDConfig(teacher="unused", student="unused", dataset="unused", lmbda=1.0, per_device_batch_size=2,
                    max_steps=2, eval_steps=2, max_new_tokens=10, output_dir=str(tmp_path / "run"),
                    progress_bar=False, save_final_model=False)
    trainer = GKDTrainer(cfg, student=text_model(tok, seed=3), teacher=text_model(tok, seed=4), tokenizer=tok,
                         train_rows=train, eval_rows=held)
    logged = trainer.train()[-1]
    student = trainer.accelerator.unwrap_model(trainer.student)
    answers = model_completions(student, tok, held, max_new_tokens=10, max_prompt_length=cfg.max_prompt_length,
                                batch_size=len(held))
    expect = verifiable.score_rows(held, answers).summary()
    assert (expect["prompt_strict"], expect["instruction_strict"]) == (0.5, 2 / 3)  # prompt ≠ instruction level
    assert logged["eval_ifeval_prompts"] == 2
    for k in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        assert logged[f"eval_ifeval_{k}"] == pytest.approx(expect[k]), k
