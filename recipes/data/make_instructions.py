"""Write ``instructions.jsonl``: a few hundred short, varied instructions as prompt-only chat rows
(``{"messages": [{"role": "user", "content": ...}]}``), made from templates with a fixed seed, for
the real-model recipes (``recipes/smollm2-135m-heal.yaml``). No references: on-policy training and
``gkd eval`` (Rouge-L against the teacher's own answer) need prompts only.

    python recipes/data/make_instructions.py   # rewrites recipes/data/instructions.jsonl
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


def make(n: int = 400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        text = rng.choice(TEMPLATES)(rng)
        if text not in seen:
            seen.add(text)
            rows.append({"messages": [{"role": "user", "content": text}]})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("instructions.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in make()))
    print(f"wrote {out}")
