"""Small Llama models and tokenizers built and trained from scratch, offline (no hub): the
demo teacher is made here, and tests and benches build their small models with it.

A tokenizer is a byte-level BPE trained with `tokenizers` on a small corpus, with a chat
template; a model is a Llama built from a config with random weights. Both are saved with
`save_pretrained`, so transformers, vLLM and DeepSpeed all load the same directory.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each message is `<|role|>content<|end|>`; generation starts after `<|assistant|>` and
# stops at `<|end|>` (the eos token).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Explain photosynthesis in one sentence. Plants turn light, water and CO2 into sugar and oxygen.",
    "Write a Python function that adds two numbers. def add(a, b): return a + b",
    "How many legs does a spider have? A spider has eight legs.",
    "Translate 'good morning' to Spanish. Buenos días.",
    "Sum 17 and 25. 17 + 25 = 42.",
    "List three primary colors: red, blue and yellow.",
    "Why is the sky blue? Sunlight scatters off air molecules; blue light scatters most.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" # $ % & @ ^ _ ~ |",
    "The quick brown fox jumps over the lazy dog. ÄÖÜ äöü ß é è ñ ç 日本語 中文 한국어 العربية",
]


def train_tokenizer(out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer with a chat template and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus) if corpus is not None else DEFAULT_CORPUS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    tokenizer_dir: str | Path | None = None,
):
    """Build a random-weight Llama (+ tokenizer) in `out_dir`; returns (model, tokenizer).

    head_dim = hidden_size / num_heads must be ≥ 32 for vLLM's CPU attention backend.
    With `tokenizer_dir`, reuse that tokenizer (teacher and student share a vocabulary).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.save_pretrained(str(out_dir))
    else:
        tokenizer = train_tokenizer(out_dir, corpus, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out_dir))
    return model, tokenizer


def own_vocabulary_student(
    out_dir: str | Path, texts: Iterable[str], vocab_size: int, shape: dict[str, int], seed: int = 0
) -> Path:
    """A fresh student of `shape` (derive_student's num_layers, hidden_size,
    num_attention_heads, intermediate_size) over its own byte-level BPE of `vocab_size`
    tokens, trained on `texts`: a student that does not share the teacher's vocabulary, as
    most students picked off the shelf do not. Written once; an existing one is kept."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    tokenizer_dir = out_dir.with_name(out_dir.name + "-tokenizer")
    train_tokenizer(tokenizer_dir, texts, vocab_size=vocab_size)
    build_tiny_llama(
        out_dir, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
        num_heads=shape["num_attention_heads"], intermediate_size=shape["intermediate_size"], seed=seed,
        tokenizer_dir=tokenizer_dir,
    )
    return out_dir


# -- training from scratch on generated (question, answer) pairs ------------------------------


def train_from_scratch(
    out_dir: Path,
    settings: Any,
    question: Callable[[random.Random], tuple[str, str]],
    heldout: list[tuple[str, tuple[str, ...]]],
    log_every: int = 0,
) -> dict:
    """Build a character-level tokenizer + Llama in `out_dir`, train it on `question(rng)`
    pairs until greedy exact match on `heldout` reaches `settings.target_accuracy` (or
    `settings.steps`), keep the best checked weights, save. Returns stats.

    `settings` has the fields of `tasks.train.demo_teacher.DemoTrainingSettings`: the model's
    shape (hidden_size, num_layers, num_heads, intermediate_size), the optimiser's
    (steps, batch_size, learning_rate, warmup_steps), the checks (eval_every,
    target_accuracy) and seed.
    """
    import torch

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
    accuracy: list[tuple[int, float]] = []
    best: tuple[float, dict | None] = (-1.0, None)  # (held-out accuracy, weights) of the best check
    model.train()
    losses: list[float] = []
    batches: list = []
    for step in range(settings.steps):
        if not batches:
            batches = _length_grouped(tokenizer, rng, settings, question)
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
        "settings": asdict(settings) if is_dataclass(settings) else dict(vars(settings)),
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


def greedy_exact_match(model, tokenizer, questions: list[tuple[str, tuple[str, ...]]], batch_size: int = 50) -> float:
    """Share of `(prompt, right answers)` the in-memory model answers with one of them exactly (greedy)."""
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
        right += sum(answer.strip() in valid for answer, (_, valid) in zip(answers, chunk))
    return right / len(questions)


def _length_grouped(
    tokenizer, rng: random.Random, settings: Any, question: Callable[[random.Random], tuple[str, str]], pool: int = 16
) -> list:
    """`pool` batches of fresh questions, each batch of similar lengths (a distractor
    sentence makes a prompt 5x longer; mixed in a random batch it pads every row)."""
    examples = [
        _encode_example(tokenizer, *question(rng))
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
