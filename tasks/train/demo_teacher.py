"""The demo teacher: a small character-level Llama that is good at the demo's task family.

`prompts/skills.py` defines the task family (the last and second-to-last letter of a
made-up word, the last two digits and the parity of a number); every prompt has one right
answer.
The teacher is trained on an endless stream of those questions (arguments from the
`train` half only), a share of them perturbed by the project's own adversarial
generators (typos, casing, whitespace, distractor sentences, injected instructions, role
play, false premises — the argument itself kept verbatim), so it also answers the edge and
adversarial variants the pipeline makes. Its tokenizer is byte-level with no merges: one
token per character, so it can spell words it never saw.

The trained weights ship with the package (`distillflow/assets/demo-teacher`, made by
`python scripts/train_demo_teacher.py`; its card says how). `ensure_demo_teacher(cache)`
returns that directory when its stamp matches the current settings and otherwise trains
one into the cache (the script's settings take about 10 minutes on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distillflow.resources import packaged

if TYPE_CHECKING:
    from distillflow.prompts.skills import SkillPrompt

DEMO_TEACHER_DIRNAME = "demo-teacher"
STAMP_FILE = "demo_teacher.json"
SHIPPED_TEACHER = packaged("distillflow/assets") / DEMO_TEACHER_DIRNAME


@dataclass(frozen=True)
class DemoTrainingSettings:
    hidden_size: int = 128
    num_layers: int = 8  # deep and narrow: slow at batch 1, which a 2-layer student beats
    num_heads: int = 4  # head_dim 32: the smallest vLLM's CPU attention accepts
    intermediate_size: int = 384
    steps: int = 4000  # at most; training stops early once held-out accuracy reaches target
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    noisy_share: float = 0.2  # share of training questions perturbed by a generator
    eval_every: int = 250  # greedy exact match on held-out questions every N steps
    eval_questions: int = 200
    target_accuracy: float = 0.96  # stop once held-out clean exact match reaches this
    seed: int = 0
    version: int = 6  # bump when the task family or the noise changes


# The generators the teacher is trained to see through (prompts.adversarial.ADVERSARIAL keys).
TRAINING_NOISE = (
    "typo", "casing", "whitespace", "char_noise", "distractor", "injection", "roleplay", "false_premise",
)  # fmt: skip


def noisy_item(rng: random.Random, split: str, noisy_share: float) -> tuple[str, SkillPrompt]:
    """One question of the task families, its prompt perturbed with probability `noisy_share`."""
    from distillflow.prompts.adversarial import ADVERSARIAL, perturb_protected
    from distillflow.prompts.config import AdversarialConfig
    from distillflow.prompts.skills import sample

    item = sample(rng, split)
    prompt = item.prompt
    if rng.random() < noisy_share:
        kind = rng.choice(TRAINING_NOISE)
        config = AdversarialConfig(severity=rng.choice((0.2, 0.5, 0.8)))
        prompt = perturb_protected(prompt, [item.argument], ADVERSARIAL[kind], rng, config) or prompt
    return prompt, item


def noisy_question(rng: random.Random, split: str, noisy_share: float) -> tuple[str, str]:
    """One (prompt, answer) to train on: `noisy_item`, with a uniformly drawn right answer."""
    prompt, item = noisy_item(rng, split, noisy_share)
    return prompt, item.training_answer(rng)


# -- build + train ----------------------------------------------------------------------------


def version_key(settings: DemoTrainingSettings) -> str:
    """Changes with the settings and with the task family's first questions."""
    probe = [noisy_question(random.Random(settings.seed), "train", 1.0) for _ in range(1)]
    payload = json.dumps({"settings": asdict(settings), "probe": probe}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _read_stamp(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_demo_teacher(cache_dir: str | Path, settings: DemoTrainingSettings | None = None) -> Path:
    """The demo teacher's model directory.

    The shipped weights when their stamp matches `settings` (the default settings: it
    does); else `cache_dir/demo-teacher` when it matches; else trains one there first.
    """
    settings = settings or DemoTrainingSettings()
    key = version_key(settings)
    for candidate in (SHIPPED_TEACHER, Path(cache_dir) / DEMO_TEACHER_DIRNAME):
        stamp = _read_stamp(candidate)
        if stamp is not None and stamp.get("version_key") == key:
            return candidate
    return train_into(Path(cache_dir) / DEMO_TEACHER_DIRNAME, settings)


def train_into(target: Path, settings: DemoTrainingSettings, log_every: int = 0) -> Path:
    """Train a teacher with `settings` and swap it into `target` atomically."""
    key = version_key(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    report = train_demo_teacher(staging, settings, log_every=log_every)
    (staging / STAMP_FILE).write_text(json.dumps({"version_key": key, **report}, indent=2) + "\n", encoding="utf-8")

    # The stamp is written last inside the staging dir, and the dir is renamed in one step,
    # so a directory with a matching stamp is always complete.
    if target.exists():
        current = _read_stamp(target)
        if current is not None and current.get("version_key") == key:  # a concurrent build won
            shutil.rmtree(staging, ignore_errors=True)
            return target
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def train_demo_teacher(out_dir: Path, settings: DemoTrainingSettings, log_every: int = 0) -> dict:
    """Build the tokenizer + model in `out_dir`, train on the task family, save. Returns stats."""
    from distillflow.prompts.skills import distinct
    from distillflow.training.scratch import train_from_scratch

    heldout = [(item.prompt, item.valid_answers) for item in distinct(settings.eval_questions, seed=7, split="eval")]
    return train_from_scratch(
        out_dir,
        settings,
        lambda rng: noisy_question(rng, "train", settings.noisy_share),
        heldout,
        log_every=log_every,
    )
