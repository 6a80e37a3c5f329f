"""Write ``instructions.jsonl``: a few hundred short, varied instructions as prompt-only chat rows
(``{"messages": [{"role": "user", "content": ...}]}``), made from templates with a fixed seed, for
the real-model recipes (``recipes/smollm2-135m-heal.yaml``). No references: on-policy training and
``gkd eval`` (Rouge-L against the teacher's own answer) need prompts only.

Close to half of the rows (214 of 480) carry **verifiable instructions** in IFEval's format: the prompt ends
with one or two constraints that a program checks (lowercase only, exactly N bullet points, a closing
phrase, keywords to use or avoid, no commas, a <<title>>, JSON, word / sentence counts, …), and the
row holds their ``instruction_id_list`` and ``kwargs`` for IFEval's checker registry (the
``if-verifiable`` package; ``gkd eval`` scores such rows on any dataset, training ignores the columns).
The wording is ours; the instruction ids and argument names are IFEval's. Lengths are sized for
answers of ~128 tokens.

It also writes ``verifiable_eval.jsonl``: 100 more constrained prompts, none of them in the training
file, in IFEval's published format (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``), for
``gkd eval --benchmark ifeval --benchmark-data recipes/data/verifiable_eval.jsonl``.

    python recipes/data/make_instructions.py   # rewrites instructions.jsonl and verifiable_eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya", "Mexico", "Norway",
             "Peru", "Spain", "Germany", "Australia", "China", "Greece", "Turkey", "Chile", "Sweden", "Vietnam"]
TOPICS = ["the ocean", "autumn leaves", "a rainy day", "the moon", "a lost cat", "coffee", "mountains", "friendship",
          "the city at night", "a garden", "snow", "the desert", "a train journey", "old books", "the stars",
          "a thunderstorm", "a lighthouse", "spring", "the river", "a bicycle"]
CONCEPTS = ["photosynthesis", "gravity", "inflation", "a black hole", "democracy", "evolution", "the internet",
            "a vaccine", "renewable energy", "machine learning", "the water cycle", "an earthquake", "a volcano",
            "compound interest", "electricity", "the immune system", "climate change", "a computer virus",
            "the stock market", "recycling"]
ACTIVITIES = ["learning a new language", "running a marathon", "saving money", "sleeping better", "studying for exams",
              "cooking pasta", "growing tomatoes", "writing an essay", "staying focused", "travelling on a budget",
              "starting a podcast", "keeping a plant alive", "making friends", "public speaking", "learning to swim"]
THINGS = ["fruits", "colors", "planets", "musical instruments", "animals that live in the sea", "programming languages",
          "countries in Europe", "vegetables", "sports played with a ball", "kitchen tools", "birds", "board games"]
PHRASES = ["good morning", "thank you very much", "where is the station", "I like to read", "see you tomorrow",
           "the weather is nice", "how are you", "I am hungry", "happy birthday", "what time is it"]
LANGUAGES = ["French", "Spanish", "German", "Italian"]
WORDS = ["happy", "big", "fast", "cold", "bright", "quiet", "strong", "old", "easy", "small"]
ANIMALS = ["dog", "cat", "elephant", "owl", "dolphin", "fox", "penguin", "horse", "bee", "turtle"]

def _article(text: str) -> str:
    """'a' → 'an' before a vowel."""
    words = text.split()
    return " ".join("an" if w == "a" and nxt[:1] in "aeiou" else w for w, nxt in zip(words, [*words[1:], ""], strict=True))


TEMPLATES = [
    lambda r: f"What is the capital of {r.choice(COUNTRIES)}?",
    lambda r: f"Write a short poem about {r.choice(TOPICS)}.",
    lambda r: f"Explain {r.choice(CONCEPTS)} in one or two sentences.",
    lambda r: f"Give three tips for {r.choice(ACTIVITIES)}.",
    lambda r: f"Name five {r.choice(THINGS)}.",
    lambda r: f"Translate \"{r.choice(PHRASES)}\" into {r.choice(LANGUAGES)}.",
    lambda r: f"What is {r.randint(2, 99)} + {r.randint(2, 99)}?",
    lambda r: f"What is {r.randint(2, 12)} times {r.randint(2, 12)}?",
    lambda r: f"Give a synonym and an antonym of the word \"{r.choice(WORDS)}\".",
    lambda r: _article(f"Describe a {r.choice(ANIMALS)} to a child."),
    lambda r: f"Write one sentence that uses the word \"{r.choice(WORDS)}\".",
    lambda r: f"Why is {r.choice(CONCEPTS)} important?",
    lambda r: f"Write a haiku about {r.choice(TOPICS)}.",
    lambda r: f"What should I pack for a trip to {r.choice(COUNTRIES)}?",
    lambda r: f"Tell me one interesting fact about {r.choice(COUNTRIES)}.",
    lambda r: _article(f"Is a {r.choice(ANIMALS)} a mammal? Answer briefly."),
    lambda r: f"Write a friendly email subject line about {r.choice(ACTIVITIES)}.",
    lambda r: f"Summarize the idea of {r.choice(CONCEPTS)} for a ten-year-old.",
]


#: Open-ended requests that leave room for a constraint (a capital or a sum has one right answer).
OPEN_TEMPLATES = [
    lambda r: f"Write a short poem about {r.choice(TOPICS)}.",
    lambda r: f"Explain {r.choice(CONCEPTS)}.",
    lambda r: f"Give some tips for {r.choice(ACTIVITIES)}.",
    lambda r: _article(f"Describe a {r.choice(ANIMALS)} to a child."),
    lambda r: f"Why is {r.choice(CONCEPTS)} important?",
    lambda r: f"What should I pack for a trip to {r.choice(COUNTRIES)}?",
    lambda r: f"Tell me about {r.choice(COUNTRIES)}.",
    lambda r: f"Write a short story about {r.choice(TOPICS)}.",
    lambda r: f"Write a note to a friend about {r.choice(ACTIVITIES)}.",
    lambda r: f"Summarize the idea of {r.choice(CONCEPTS)} for a ten-year-old.",
]
KEYWORDS = ["water", "light", "simple", "family", "morning", "energy", "color", "time", "home", "music", "green",
            "quiet", "road", "window", "bread", "paper"]
END_PHRASES = ["Have a nice day.", "That is all.", "Thank you for reading.", "Hope this helps."]


def _words(r: random.Random, k: int) -> list[str]:
    return r.sample(KEYWORDS, k)


#: (instruction id, groups it conflicts with, maker: rng -> (sentence added to the prompt, kwargs)).
#: A prompt gets at most one constraint per group (two length rules, or JSON plus a title, would clash).
CONSTRAINTS = [
    ("change_case:english_lowercase", {"case"},
     lambda r: ("Your entire answer must be in lowercase letters; no capital letters at all.", {})),
    ("change_case:english_capital", {"case"},
     lambda r: ("Write your entire answer in English using only capital letters.", {})),
    ("detectable_format:number_bullet_lists", {"shape"},
     lambda r: (lambda n: (f"Answer with exactly {n} bullet points, written in markdown like:\n* first point\n"
                           "* second point", {"num_bullets": n}))(r.randint(2, 4))),
    ("startend:end_checker", {"end"},
     lambda r: (lambda p: (f"Finish your answer with the exact phrase \"{p}\" and write nothing after it.",
                           {"end_phrase": p}))(r.choice(END_PHRASES))),
    ("keywords:existence", {"words"},
     lambda r: (lambda w: (f"Use the words \"{w[0]}\" and \"{w[1]}\" in your answer.", {"keywords": w}))(_words(r, 2))),
    ("keywords:forbidden_words", {"words"},
     lambda r: (lambda w: (f"Do not use the words \"{w[0]}\" or \"{w[1]}\" anywhere in your answer.",
                           {"forbidden_words": w}))(_words(r, 2))),
    ("keywords:frequency", {"words"},
     lambda r: (lambda w, n: (f"Use the word \"{w}\" at least {n} times.",
                              {"keyword": w, "frequency": n, "relation": "at least"}))(r.choice(KEYWORDS), r.randint(2, 3))),
    ("punctuation:no_comma", {"comma"},
     lambda r: ("Do not use any commas in your answer.", {})),
    ("detectable_format:title", {"title"},
     lambda r: ("Give your answer a title wrapped in double angular brackets, such as <<my title>>.", {})),
    ("detectable_format:json_format", {"shape", "title", "end", "quote", "postscript"},
     lambda r: ("Format your entire answer as JSON; you may wrap it in markdown ``` ticks.", {})),
    ("length_constraints:number_words", {"length"},
     lambda r: (lambda rel, n: (f"Answer in {'fewer than' if rel == 'less than' else 'at least'} {n} words.",
                                {"num_words": n, "relation": rel}))(*r.choice([("less than", r.choice([20, 30, 40])),
                                                                                ("at least", r.choice([30, 50, 60]))]))),
    ("length_constraints:number_sentences", {"length"},
     lambda r: (lambda rel, n: (f"Your answer must have {'fewer than' if rel == 'less than' else 'at least'} {n} sentences.",
                                {"num_sentences": n, "relation": rel}))(*r.choice([("less than", r.choice([3, 4])),
                                                                                    ("at least", r.choice([3, 4, 5]))]))),
    ("startend:quotation", {"quote", "title"},
     lambda r: ("Wrap your entire answer in double quotation marks.", {})),
    ("detectable_content:postscript", {"postscript", "end"},
     lambda r: ("At the end of your answer, add a postscript that starts with P.S.", {"postscript_marker": "P.S."})),
]


def constrained_row(rng: random.Random) -> dict:
    """One open-ended request with one or two non-conflicting constraints, in IFEval's row format."""
    text = rng.choice(OPEN_TEMPLATES)(rng)
    ids, kwargs, used = [], [], set()
    for _ in range(1 if rng.random() < 0.6 else 2):
        choices = [c for c in CONSTRAINTS if not (c[1] & used)]
        instruction_id, groups, maker = rng.choice(choices)
        sentence, kw = maker(rng)
        text += " " + sentence
        ids.append(instruction_id)
        kwargs.append(kw)
        used |= groups
    return {"messages": [{"role": "user", "content": text}], "instruction_id_list": ids, "kwargs": kwargs}


def make(n: int = 400, seed: int = 0, constrained_share: float = 1 / 3) -> list[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        if rng.random() < constrained_share:
            row = constrained_row(rng)
        else:
            row = {"messages": [{"role": "user", "content": rng.choice(TEMPLATES)(rng)}]}
        text = row["messages"][0]["content"]
        if text not in seen:
            seen.add(text)
            rows.append(row)
    return rows


def make_benchmark(n: int = 100, seed: int = 1, exclude: list[dict] | None = None) -> list[dict]:
    """``n`` constrained prompts in IFEval's published format (``key``, ``prompt``,
    ``instruction_id_list``, ``kwargs``) for ``gkd eval --benchmark ifeval``, none of them in ``exclude``
    (the training rows): a held-out verifiable-instruction set of our own."""
    rng = random.Random(seed)
    seen = {r["messages"][0]["content"] for r in exclude or []}
    rows = []
    while len(rows) < n:
        row = constrained_row(rng)
        text = row["messages"][0]["content"]
        if text not in seen:
            seen.add(text)
            rows.append({"key": 1000 + len(rows), "prompt": text, "instruction_id_list": row["instruction_id_list"],
                         "kwargs": row["kwargs"]})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("instructions.jsonl")
    rows = make(480)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{sum('instruction_id_list' in r for r in rows)} of {len(rows)} rows carry verifiable instructions")
    bench = out.with_name("verifiable_eval.jsonl")
    bench.write_text("".join(json.dumps(row) + "\n" for row in make_benchmark(100, exclude=rows)))
    print(f"wrote {bench}: 100 held-out constrained prompts in IFEval's format (gkd eval --benchmark ifeval)")
    print(f"wrote {out}")
