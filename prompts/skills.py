"""The demo's task families: short string and number skills with checkable answers.

Every prompt asks one skill about one argument (a made-up word or a number), which ends
the prompt, in one of several phrasings. Three kinds of family:

one right answer, one token (a lookup at a fixed distance from the end of the prompt):

    last      Last letter of the word: plimo             → o
    before    Second-to-last letter of the word: plimo   → m
    digit     Last digit of the number: 4821             → 1
    tens      Second-to-last digit of the number: 4821   → 2
    parity    Even or odd: 4821                          → odd

several right answers (any one is right; the teacher is trained on a uniformly drawn one,
so its next-token distribution spreads over all of them: what soft targets can teach and
a single greedy answer cannot):

    letter_in A letter that occurs in the word: plimo    → p | l | i | m | o
    digit_in  A digit that occurs in the number: 4821    → 4 | 8 | 2 | 1

one right answer of several tokens, where an early wrong token derails the rest:

    reverse   Reverse the word: plim                     → milp

Perturbations that move the end (a distractor sentence or an injected instruction after
the argument, trailing whitespace) are what makes the task hard, which is what the
robustness columns measure.

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
    reference: str  # the right answer; for several, all of them joined by ONE_OF_SEPARATOR
    argument: str  # the span a robustness perturbation must not change (it changes the answer)

    @property
    def valid_answers(self) -> tuple[str, ...]:
        return tuple(self.reference.split(ONE_OF_SEPARATOR))

    def record(self) -> dict[str, object]:
        """The row of a seed / eval-set file (`protect`: spans perturbations keep)."""
        return {
            "prompt": self.prompt,
            "reference": self.reference,
            "check": "one_of" if self.skill in MULTI_ANSWER else "exact",
            "skill": self.skill,
            "protect": [self.argument],
        }

    def training_answer(self, rng: random.Random) -> str:
        """The answer a teacher is trained on: a uniformly drawn one where several are right."""
        return rng.choice(self.valid_answers)


TEMPLATES: dict[str, tuple[str, ...]] = {
    "last": (
        "Last letter of the word: {arg}",
        "Which letter ends this word: {arg}",
        "Tell me the final letter of: {arg}",
    ),
    "before": (
        "Second-to-last letter of the word: {arg}",
        "Which letter comes just before the last one in: {arg}",
        "Tell me the penultimate letter of: {arg}",
    ),
    "digit": (
        "Last digit of the number: {arg}",
        "Which digit ends this number: {arg}",
        "Tell me the final digit of: {arg}",
    ),
    "tens": (
        "Second-to-last digit of the number: {arg}",
        "Which digit is the tens digit of: {arg}",
        "Tell me the tens digit of: {arg}",
    ),
    "parity": (
        "Even or odd: {arg}",
        "Is this number even or odd: {arg}",
        "Tell me if it is odd or even: {arg}",
    ),
    "letter_in": (
        "A letter that occurs in the word: {arg}",
        "Name any letter of the word: {arg}",
        "Give me one letter from: {arg}",
    ),
    "digit_in": (
        "A digit that occurs in the number: {arg}",
        "Name any digit of the number: {arg}",
        "Give me one digit from: {arg}",
    ),
    "reverse": (
        "Reverse the word: {arg}",
        "Spell this word backwards: {arg}",
        "Write in reverse order: {arg}",
    ),
}
SKILLS = tuple(TEMPLATES)
MULTI_ANSWER = ("letter_in", "digit_in")  # any of several answers is right (check `one_of`)
ONE_OF_SEPARATOR = "|"  # a `one_of` reference lists the right answers: "a|l|m"


def split_of(argument: str) -> str:
    """`train` or `eval`, a pure function of the argument's text (about EVAL_SHARE eval)."""
    digest = hashlib.sha256(f"skills-split:{argument}".encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") < EVAL_SHARE * 2**32 else "train"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _argument(skill: str, rng: random.Random) -> str:
    if skill in ("last", "before", "letter_in"):
        return _word(rng)
    if skill == "reverse":  # short words: every answer token a lookup the model must not lose
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return str(rng.randint(10, 99999))


def _distinct_characters(arg: str) -> str:
    """The argument's characters, each once, in sorted order, joined as a `one_of` reference."""
    return ONE_OF_SEPARATOR.join(sorted(set(arg)))


ANSWERS: dict[str, Callable[[str], str]] = {
    "last": lambda arg: arg[-1],
    "before": lambda arg: arg[-2],
    "digit": lambda arg: arg[-1],
    "tens": lambda arg: arg[-2],
    "parity": lambda arg: "odd" if int(arg) % 2 else "even",
    "letter_in": _distinct_characters,
    "digit_in": _distinct_characters,
    "reverse": lambda arg: arg[::-1],
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
