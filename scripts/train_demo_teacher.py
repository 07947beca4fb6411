"""Train the demo teacher and ship it: `python scripts/train_demo_teacher.py`.

Trains `tasks.train.demo_teacher.DemoTrainingSettings()` (about 10 minutes on 2 CPU cores, one thread), measures greedy exact match on held-out questions (arguments the teacher never
saw) clean and perturbed, and writes the model, its stamp and a card (README.md) to
`distillflow/assets/demo-teacher` — the directory `distill demo` uses. Weights are saved
in float16 to keep the package small; they load as float32.

`--steps N --out DIR` trains a smaller run elsewhere (the test suite runs it at a tiny size).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def exact_match(model_dir: Path, questions: list[tuple[str, tuple[str, ...]]], batch_size: int = 32) -> float:
    """Share of `(prompt, right answers)` answered with one of them exactly (greedy, in-process teacher path)."""
    from distillflow.config import TeacherConfig
    from distillflow.tasks.teacher.local import LocalTeacher

    config = TeacherConfig(
        backend="local", model=str(model_dir), device="cpu", local_batch_size=batch_size,
        generation={"temperature": 0.0, "max_tokens": 16},
    )  # fmt: skip
    teacher = LocalTeacher(config)
    right = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        answers = teacher.answer_batch([[{"role": "user", "content": prompt}] for prompt, _ in chunk])
        right += sum(answer.content.strip() in valid for answer, (_, valid) in zip(answers, chunk))
    return right / len(questions)


def main() -> None:
    import torch

    from distillflow.tasks.train.demo_teacher import SHIPPED_TEACHER, STAMP_FILE, DemoTrainingSettings, noisy_item, train_into
    from distillflow.prompts.skills import distinct

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED_TEACHER)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-questions", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: as fast as two on this model, and steady on a shared machine

    settings = DemoTrainingSettings()
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    target = train_into(args.out, settings, log_every=args.log_every)

    # Half-precision weights: half the bytes in the package, same answers (checked below).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    model.to(torch.float16).save_pretrained(str(target))

    clean = [(item.prompt, item.valid_answers) for item in distinct(args.eval_questions, seed=1, split="eval")]
    rng = random.Random(2)
    noisy = [(prompt, item.valid_answers) for prompt, item in (noisy_item(rng, "eval", 1.0) for _ in range(args.eval_questions))]
    scores = {"clean_exact_match": exact_match(target, clean), "perturbed_exact_match": exact_match(target, noisy)}
    stamp_path = target / STAMP_FILE
    stamp = json.loads(stamp_path.read_text())
    stamp.update({key: round(value, 4) for key, value in scores.items()})
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    (target / "README.md").write_text(card(stamp, args.eval_questions))
    print(json.dumps(stamp, indent=2))


def card(stamp: dict, questions: int) -> str:
    settings = stamp["settings"]
    checks = stamp.get("heldout_accuracy_by_step") or []
    stopped = f" (of {len(checks)} checks, every {settings['eval_every']} steps)" if checks else ""
    return f"""# demo-teacher

The teacher of `distill demo`: a Llama of {settings['num_layers']} layers (hidden {settings['hidden_size']},
{settings['num_heads']} heads, {stamp['parameters']:,} parameters) with a byte-level tokenizer
without merges (one token per character), trained from scratch by
`python scripts/train_demo_teacher.py` on the task families of `prompts/skills.py`.

- Data: an endless stream of questions whose arguments (made-up words, numbers) come
  from the `train` half of a hash split; {settings['noisy_share']:.0%} of them perturbed by the
  project's adversarial generators (the argument kept verbatim). Where several answers are
  right (a letter or digit that occurs in the argument), the answer trained on is drawn
  uniformly among them, so the teacher's distribution spreads over all of them.
- Training: {stamp['steps']} AdamW steps of {settings['batch_size']} questions, learning rate
  {settings['learning_rate']} with {settings['warmup_steps']} warm-up steps and linear decay, on CPU,
  seed {settings['seed']}; loss {stamp['first_loss']} → {stamp['final_loss']} in
  {stamp['train_seconds']:.0f} s. Weights stored in float16.
- Held-out greedy accuracy ({questions} questions on `eval`-half arguments it never saw; any
  right answer counts): clean {stamp['clean_exact_match']:.1%}, perturbed {stamp['perturbed_exact_match']:.1%}.
  Training stopped at the best held-out check{stopped}.

It knows nothing outside these task families.
"""


if __name__ == "__main__":
    main()
