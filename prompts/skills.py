"""The demo's task family: short string and number skills with exactly checkable answers.

Every prompt asks one of a few skills about one argument (a made-up word, a number or a
list of digits) in one of several phrasings, and has exactly one right answer:

    reverse   Reverse the word "plimo".            → omilp
    upper     Write "plimo" in capital letters.    → PLIMO
    length    How many letters are in "plimo"?     → 5
    next      What number comes after 479?         → 480
    max       What is the largest of 3, 8, 5?      → 8

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
    "reverse": (
        'Reverse the word "{arg}".',
        'Spell "{arg}" backwards.',
        'What is "{arg}" written in reverse?',
    ),
    "upper": (
        'Write "{arg}" in capital letters.',
        'Uppercase the word "{arg}".',
        'What is "{arg}" in upper case?',
    ),
    "length": (
        'How many letters are in "{arg}"?',
        'Count the letters of "{arg}".',
        'What is the length of the word "{arg}"?',
    ),
    "next": (
        "What number comes after {arg}?",
        "Add one to {arg}.",
        "What is {arg} plus 1?",
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
    if skill in ("reverse", "upper", "length"):
        return _word(rng)
    if skill == "next":
        return str(rng.randint(0, 998))
    return _digits(rng)


ANSWERS: dict[str, Callable[[str], str]] = {
    "reverse": lambda arg: arg[::-1],
    "upper": lambda arg: arg.upper(),
    "length": lambda arg: str(len(arg)),
    "next": lambda arg: str(int(arg) + 1),
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
