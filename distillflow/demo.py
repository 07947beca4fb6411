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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEMO_TEACHER_DIRNAME = "demo-teacher"
STAMP_FILE = "demo_teacher.json"
SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / DEMO_TEACHER_DIRNAME


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
    version: int = 5  # bump when the task family or the noise changes


# The generators the teacher is trained to see through (prompts.adversarial.ADVERSARIAL keys).
TRAINING_NOISE = (
    "typo", "casing", "whitespace", "char_noise", "distractor", "injection", "roleplay", "false_premise",
)  # fmt: skip


def noisy_question(rng: random.Random, split: str, noisy_share: float) -> tuple[str, str]:
    """One (prompt, answer) of the task family, perturbed with probability `noisy_share`."""
    from distillflow.prompts.adversarial import ADVERSARIAL, perturb_protected
    from distillflow.prompts.config import AdversarialConfig
    from distillflow.prompts.skills import sample

    item = sample(rng, split)
    prompt = item.prompt
    if rng.random() < noisy_share:
        kind = rng.choice(TRAINING_NOISE)
        config = AdversarialConfig(severity=rng.choice((0.2, 0.5, 0.8)))
        prompt = perturb_protected(prompt, [item.argument], ADVERSARIAL[kind], rng, config) or prompt
    return prompt, item.reference


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
    import torch

    from distillflow.training.scratch import build_tiny_llama
    from distillflow.prompts.skills import distinct

    started = time.perf_counter()
    # No merges: the 256 byte tokens + specials, one token per character of ASCII text.
    model, tokenizer = build_tiny_llama(
        out_dir,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        vocab_size=256,
        max_position_embeddings=1024,
        seed=settings.seed,
        corpus=["abc"],
    )
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / settings.warmup_steps) * max(0.05, 1 - step / settings.steps),
    )
    heldout = [(item.prompt, item.reference) for item in distinct(settings.eval_questions, seed=7, split="eval")]
    accuracy: list[tuple[int, float]] = []
    best: tuple[float, dict | None] = (-1.0, None)  # (held-out accuracy, weights) of the best check
    model.train()
    losses: list[float] = []
    batches: list = []
    for step in range(settings.steps):
        if not batches:
            batches = _length_grouped(tokenizer, rng, settings)
        batch = batches.pop()
        input_ids, labels, attention_mask = _collate(batch, tokenizer.pad_token_id)  # (B, T) each
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"step {step + 1}/{settings.steps} loss {recent:.4f} {time.perf_counter() - started:.0f}s", flush=True)
        if settings.eval_every and (step + 1) % settings.eval_every == 0:
            accuracy.append((step + 1, greedy_exact_match(model, tokenizer, heldout)))
            model.train()
            if log_every:
                print(f"step {step + 1}: held-out exact match {accuracy[-1][1]:.3f}", flush=True)
            if accuracy[-1][1] > best[0]:
                best = (accuracy[-1][1], {name: value.clone() for name, value in model.state_dict().items()})
            if accuracy[-1][1] >= settings.target_accuracy or stop_file_exists(out_dir):
                break
    if best[1] is not None:
        model.load_state_dict(best[1])  # the weights of the best held-out check, not the last
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    window = min(10, len(losses))
    return {
        "steps": len(losses),
        "heldout_accuracy_by_step": accuracy,
        "first_loss": round(sum(losses[:window]) / window, 4),
        "final_loss": round(sum(losses[-window:]) / window, 4),
        "train_seconds": round(time.perf_counter() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(settings),
    }


def _encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of one chat turn and its labels: the answer and its eos only (-100 elsewhere)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def stop_file_exists(out_dir: Path) -> bool:
    """`touch OUT_DIR.stop` ends a long training at its next held-out check (best weights kept)."""
    return out_dir.with_name(out_dir.name.split(".tmp-")[0].lstrip(".") + ".stop").exists()


def greedy_exact_match(model, tokenizer, questions: list[tuple[str, str]], batch_size: int = 50) -> float:
    """Share of `(prompt, reference)` the in-memory model answers exactly (greedy)."""
    import torch

    model.eval()
    tokenizer.padding_side = "left"  # generation continues each row from its last token
    right = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q, _ in chunk
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        right += sum(answer.strip() == reference for answer, (_, reference) in zip(answers, chunk))
    return right / len(questions)


def _length_grouped(tokenizer, rng: random.Random, settings: DemoTrainingSettings, pool: int = 16) -> list:
    """`pool` batches of fresh questions, each batch of similar lengths (a distractor
    sentence makes a prompt 5x longer; mixed in a random batch it pads every row)."""
    examples = [
        _encode_example(tokenizer, *noisy_question(rng, "train", settings.noisy_share))
        for _ in range(pool * settings.batch_size)
    ]
    examples.sort(key=lambda example: len(example[0]))
    batches = [examples[i : i + settings.batch_size] for i in range(0, len(examples), settings.batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(batch, pad_id: int):
    """Right-padded (B, T) input ids, labels and attention mask."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return input_ids, labels, attention_mask
