"""A tiny teacher/student pair and a white-box dataset, built offline: for tests and benches.

`build_tiny_setup(root)` writes:
  root/teacher   Llama, 4 layers, hidden 64 (random weights) + byte-level BPE chat tokenizer
  root/student   Llama, 2 layers, hidden 64, same tokenizer
  root/dataset   data/part-00000.parquet: id, prompt, response, strategy, teacher_topk
Responses are short canned answers of uneven length; teacher_topk is captured with
`encode_example` alignment: row j of a blob predicts the j-th supervised token.
"""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Sum 17 and 25.",
    "Why is the sky blue?",
    "Translate 'good morning' to Spanish.",
    "List three primary colors.",
    "Explain photosynthesis in one sentence.",
    "Write a Python function that adds two numbers.",
]
ANSWERS = [
    "The capital of France is Paris, a city on the Seine.",
    "A spider has eight legs, unlike insects, which have six.",
    "17 + 25 = 42, because 17 + 3 = 20 and 20 + 22 = 42.",
    "Sunlight scatters off air molecules, and blue light scatters most.",
    "Buenos días is good morning in Spanish.",
    "Red, blue and yellow are the three primary colors.",
    "Plants turn light, water and CO2 into sugar and oxygen.",
    "def add(a, b): return a + b",
]


def teacher_topk_rows(teacher, tokenizer, prompt: str, response: str, k: int, max_length: int = 2048):
    """(ids (S, k), logprobs (S, k)) of the teacher at the supervised positions of one example."""
    from distillflow.training.data import encode_example

    example = encode_example(tokenizer, prompt, response, max_length=max_length)
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(ids).logits[0].float(), dim=-1)  # (L, V)
    positions = [t - 1 for t, label in enumerate(example["labels"]) if label != -100]
    top = logprobs[positions].topk(k, dim=-1)
    return top.indices.numpy(), top.values.numpy()


def build_tiny_setup(
    root: str | Path,
    num_rows: int = 32,
    k: int = 16,
    hidden_size: int = 64,
) -> dict[str, Path]:
    import pyarrow as pa

    from distillflow.training.scratch import build_tiny_llama
    from distillflow.storage.parquet import write_table_atomic
    from distillflow.storage.topk import encode_topk

    root = Path(root)
    teacher, tokenizer = build_tiny_llama(
        root / "teacher", hidden_size=hidden_size, num_layers=4, num_heads=2, seed=1
    )
    build_tiny_llama(
        root / "student", hidden_size=hidden_size, num_layers=2, num_heads=2, seed=2,
        tokenizer_dir=root / "teacher",
    )
    teacher.eval()
    rows = []
    for index in range(num_rows):
        prompt = f"{PROMPTS[index % len(PROMPTS)]} ({index})"
        response = ANSWERS[index % len(ANSWERS)][: 8 + (index * 7) % 40]  # uneven lengths
        top_ids, top_logprobs = teacher_topk_rows(teacher, tokenizer, prompt, response, k)
        rows.append(
            {
                "id": f"row-{index}",
                "prompt": prompt,
                "response": response,
                "strategy": "seed",
                "teacher_topk": encode_topk(top_ids, top_logprobs),
            }
        )
    write_table_atomic(pa.Table.from_pylist(rows), root / "dataset" / "data" / "part-00000.parquet")
    return {"teacher": root / "teacher", "student": root / "student", "dataset": root / "dataset"}


def build_tiny_setup_once(root: str | Path, **kwargs) -> dict[str, Path]:
    """`build_tiny_setup` unless `root` already holds a finished one (marker written last)."""
    root = Path(root)
    marker = root / "READY"
    if not marker.is_file():
        build_tiny_setup(root, **kwargs)
        marker.write_text("ok\n")
    return {"teacher": root / "teacher", "student": root / "student", "dataset": root / "dataset"}
