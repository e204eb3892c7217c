"""Writes the sentiment task of the fine-tuning tests: train.jsonl, valid.jsonl, test.jsonl.

Each line is a chat with one user message, a short product review and nothing else (no
instruction), and one assistant message: exactly "positive" or "negative". SmolLM2-135M-
Instruct answers such a message with a sentence or a reply to the reviewer, never the bare
label, so exact-match accuracy measures whether tuning taught it the task.

Reviews are composed from the fragments below (written for this file): a product, an
opening verdict, a detail and sometimes a closing remark, all of one polarity, with a few
"but" reviews whose last clause decides. The three files share no review text. Run it
again to regenerate them identically: `python tests/data/finetune/make_dataset.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRODUCTS = [
    "blender", "headphones", "backpack", "phone case", "desk lamp", "kettle", "keyboard",
    "running shoes", "water bottle", "air fryer", "umbrella", "office chair", "toaster",
    "power bank", "yoga mat", "coffee grinder", "tent", "webcam", "hair dryer", "frying pan",
    "monitor stand", "rain jacket", "vacuum cleaner", "mouse", "suitcase", "smartwatch",
    "blanket", "drill", "baby monitor", "bike light",
]  # fmt: skip

POSITIVE_OPENINGS = [
    "Love this {p}.", "This {p} is fantastic.", "Best {p} I have owned.",
    "Really happy with the {p}.", "The {p} exceeded my expectations.",
    "Great {p} for the price.", "Five stars for this {p}.", "Very pleased with my new {p}.",
    "This {p} is a joy to use.", "Solid {p}, no complaints.", "What a brilliant {p}.",
    "I would buy this {p} again in a heartbeat.",
]  # fmt: skip

NEGATIVE_OPENINGS = [
    "Hate this {p}.", "This {p} is terrible.", "Worst {p} I have owned.",
    "Really disappointed with the {p}.", "The {p} fell far short of what was promised.",
    "Overpriced {p}, avoid it.", "One star for this {p}.", "Very unhappy with my new {p}.",
    "This {p} is a pain to use.", "Flimsy {p}, nothing but complaints.",
    "What a useless {p}.", "I regret buying this {p}.",
]  # fmt: skip

POSITIVE_DETAILS = [
    "It arrived early and works perfectly.", "Sturdy build and it looks great.",
    "Setup took two minutes.", "The battery lasts for days.", "It is quiet and fast.",
    "Feels premium in the hand.", "My whole family uses it every day.",
    "Still going strong after six months.", "Cleaning it is effortless.",
    "The instructions were clear and simple.", "It does exactly what it says.",
    "Customer service was friendly and quick.", "Light, compact and reliable.",
]  # fmt: skip

NEGATIVE_DETAILS = [
    "It arrived scratched and barely works.", "Cheap plastic that cracked in a week.",
    "Setup took hours and still failed.", "The battery dies within an hour.",
    "It is loud and painfully slow.", "Feels like a toy.", "It broke the second time I used it.",
    "Stopped working after a month.", "Cleaning it is a nightmare.",
    "The instructions made no sense.", "It does nothing it promises.",
    "Customer service never answered.", "Heavy, bulky and unreliable.",
]  # fmt: skip

POSITIVE_CLOSINGS = [
    "Highly recommend.", "Worth every penny.", "Buy it.", "Would gift it to a friend.",
    "Ten out of ten.", "",
]  # fmt: skip

NEGATIVE_CLOSINGS = [
    "Do not buy.", "Waste of money.", "Returning it.", "Would not give it to my worst enemy.",
    "Zero out of ten.", "",
]  # fmt: skip

# "X but Y" reviews: the clause after "but" carries the verdict.
POSITIVE_TURNS = [
    "The box was dented, but the {p} itself is excellent.",
    "Shipping was slow, but I love the {p}.",
    "I doubted it at first, but this {p} won me over.",
]  # fmt: skip

NEGATIVE_TURNS = [
    "The {p} looks nice, but it broke within days.",
    "Delivery was fast, but the {p} is junk.",
    "I wanted to like this {p}, but it keeps failing.",
]  # fmt: skip

SIZES = {"train": 160, "valid": 40, "test": 60}
SEED = 20261201


def review(rng: random.Random, label: str) -> str:
    product = rng.choice(PRODUCTS)
    positive = label == "positive"
    if rng.random() < 0.15:
        text = rng.choice(POSITIVE_TURNS if positive else NEGATIVE_TURNS).format(p=product)
    else:
        opening = rng.choice(POSITIVE_OPENINGS if positive else NEGATIVE_OPENINGS)
        detail = rng.choice(POSITIVE_DETAILS if positive else NEGATIVE_DETAILS)
        closing = rng.choice(POSITIVE_CLOSINGS if positive else NEGATIVE_CLOSINGS)
        parts = [opening.format(p=product), detail, closing]
        if rng.random() < 0.3:
            parts[0], parts[1] = parts[1], parts[0]
        text = " ".join(part for part in parts if part)
    if rng.random() < 0.2:
        text = text.lower()
    return text


def examples(rng: random.Random, count: int, seen: set[str]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while len(out) < count:
        label = "positive" if len(out) % 2 == 0 else "negative"
        text = review(rng, label)
        if text in seen:
            continue
        seen.add(text)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": label},
                ]
            }
        )
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    here = Path(__file__).parent
    for name, count in SIZES.items():
        with (here / f"{name}.jsonl").open("w") as handle:
            for example in examples(rng, count, seen):
                handle.write(json.dumps(example) + "\n")


if __name__ == "__main__":
    main()
