"""The demo's task family: short string and number skills with exactly checkable answers.

Every prompt asks one of a few skills about one argument (a made-up word, a number or a
list of digits) in one of several phrasings, and has exactly one right answer:

    first     What is the first letter of "plimo"?   → p
    last      What is the last letter of "plimo"?    → o
    length    How many letters are in "plimo"?       → 5
    parity    Is 479 even or odd?                    → odd
    max       What is the largest of 3, 8, 5?        → 8

The skills are the ones a small character-level model can learn from scratch on a CPU in
minutes and get right on arguments it never saw (a lookup next to a landmark, counting,
comparing); skills that copy a whole word (reverse, upper-case) need far longer training
at this size and were left out.

Arguments are split in two by a stable hash: the teacher and the dataset's seed prompts
only ever see the `train` half; the eval set uses the `eval` half, so accuracy on it is
accuracy on words and numbers the models never saw. Seeds, eval set and the teacher's
training text all come from here, so the teacher is good at exactly what it is asked.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "eval")
EVAL_SHARE = 0.2  # share of words / numbers reserved for evaluation


@dataclass(frozen=True)
class SkillPrompt:
    """One question of the family: its text, the right answer and what to keep verbatim."""

    skill: str
    prompt: str
    reference: str
    argument: str  # the span a robustness perturbation must not change (it changes the answer)

    def record(self) -> dict[str, object]:
        """The row of a seed / eval-set file (`protect`: spans perturbations keep)."""
        return {
            "prompt": self.prompt,
            "reference": self.reference,
            "check": "exact",
            "skill": self.skill,
            "protect": [self.argument],
        }


TEMPLATES: dict[str, tuple[str, ...]] = {
    "first": (
        'What is the first letter of "{arg}"?',
        'Which letter does "{arg}" start with?',
        'Give the first letter of the word "{arg}".',
    ),
    "last": (
        'What is the last letter of "{arg}"?',
        'Which letter does "{arg}" end with?',
        'Give the last letter of the word "{arg}".',
    ),
    "length": (
        'How many letters are in "{arg}"?',
        'Count the letters of "{arg}".',
        'What is the length of the word "{arg}"?',
    ),
    "parity": (
        "Is {arg} even or odd?",
        "Is the number {arg} odd or even?",
        "Tell me if {arg} is even or odd.",
    ),
    "max": (
        "What is the largest of {arg}?",
        "Which is the biggest number: {arg}?",
        "Give the maximum of {arg}.",
    ),
}
SKILLS = tuple(TEMPLATES)


def split_of(argument: str) -> str:
    """`train` or `eval`, a pure function of the argument's text (about EVAL_SHARE eval)."""
    digest = hashlib.sha256(f"skills-split:{argument}".encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") < EVAL_SHARE * 2**32 else "train"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _digits(rng: random.Random) -> str:
    values = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
    return ", ".join(values)


def _argument(skill: str, rng: random.Random) -> str:
    if skill in ("first", "last", "length"):
        return _word(rng)
    if skill == "parity":
        return str(rng.randint(0, 9999))
    return _digits(rng)


ANSWERS: dict[str, Callable[[str], str]] = {
    "first": lambda arg: arg[0],
    "last": lambda arg: arg[-1],
    "length": lambda arg: str(len(arg)),
    "parity": lambda arg: "odd" if int(arg) % 2 else "even",
    "max": lambda arg: max(arg.split(", "), key=int),
}


def sample(rng: random.Random, split: str, skills: tuple[str, ...] = SKILLS) -> SkillPrompt:
    """One random question whose argument belongs to `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    skill = rng.choice(skills)
    while True:
        argument = _argument(skill, rng)
        if split_of(argument) == split:
            break
    template = rng.choice(TEMPLATES[skill])
    return SkillPrompt(skill, template.format(arg=argument), ANSWERS[skill](argument), argument)


def stream(seed: int, split: str) -> Iterator[SkillPrompt]:
    """An endless, deterministic stream of questions of one split."""
    rng = random.Random(f"{seed}:{split}")
    while True:
        yield sample(rng, split)


def distinct(count: int, seed: int, split: str) -> list[SkillPrompt]:
    """`count` questions with distinct prompts, balanced over the skills, deterministic."""
    rng = random.Random(f"distinct:{seed}:{split}")
    seen: set[str] = set()
    out: list[SkillPrompt] = []
    per_skill = -(-count // len(SKILLS))
    for skill in SKILLS:
        taken = 0
        while taken < per_skill and len(out) < count:
            item = sample(rng, split, (skill,))
            if item.prompt not in seen:
                seen.add(item.prompt)
                out.append(item)
                taken += 1
    rng.shuffle(out)
    return out
