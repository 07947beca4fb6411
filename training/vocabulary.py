"""Tokenizers without torch: loading a model directory's tokenizer and comparing two vocabularies.

transformers' AutoTokenizer resolves a tokenizer's class through AutoConfig, whose import
brings in torch (~2 s); the class named in tokenizer_config.json is importable on its own.
So a `distill` command checks tokenizers and vocabularies (tasks/preflight.py) before it
imports torch, or without importing it at all when a child process does the training.
"""

from __future__ import annotations

import json
from pathlib import Path


class VocabularyMismatch(ValueError):
    """Teacher and student tokenizers disagree on token ids."""


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model directory: the class its tokenizer_config.json names
    (imported alone, without torch), else whatever AutoTokenizer resolves."""
    import transformers

    path = Path(path)
    settings = path / "tokenizer_config.json"
    name = None
    if settings.is_file():
        try:
            loaded = json.loads(settings.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            loaded = None
        if isinstance(loaded, dict) and not loaded.get("auto_map"):
            name = loaded.get("tokenizer_class")
    try:
        named = getattr(transformers, name, None) if isinstance(name, str) else None
    except (ImportError, RuntimeError):  # a class whose module needs a package not installed here
        named = None
    if named is not None and hasattr(named, "from_pretrained"):
        return named.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


def vocabulary_preflight(
    teacher_tokenizer, student_tokenizer, teacher_rows: int, student_rows: int
) -> int:
    """Check that teacher and student share token ids; return the vocabulary size to keep.

    teacher_rows / student_rows are the models' output-embedding rows, often padded past the
    tokenizer (e.g. 151936 vs 152064 for one Qwen vocabulary): logits of rows ≥ the returned
    size are trimmed from both models before any softmax. A real mismatch is an error.
    """
    teacher_name = getattr(teacher_tokenizer, "name_or_path", "teacher")
    student_name = getattr(student_tokenizer, "name_or_path", "student")
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        only_teacher = len(teacher_vocab.keys() - student_vocab.keys())
        only_student = len(student_vocab.keys() - teacher_vocab.keys())
        moved = sum(1 for token, index in teacher_vocab.items() if student_vocab.get(token, index) != index)
        raise VocabularyMismatch(
            f"teacher tokenizer {teacher_name!r} ({len(teacher_vocab)} tokens) and student "
            f"tokenizer {student_name!r} ({len(student_vocab)} tokens) differ: "
            f"{only_teacher} tokens only in the teacher, {only_student} only in the student, "
            f"{moved} with different ids. White-box objectives compare distributions token by "
            "token and need one vocabulary: pick a student from the teacher's family, derive it "
            "from the teacher (training.derive_student), or set training.objective: kd_greybox, which "
            "aligns the two tokenisations on bytes and needs the teacher's top-k in the dataset: "
            "`distill capture-logits` with a teacher you run (leave capture.tokenizer unset: the teacher "
            "tokenises the rows itself) or `distill build` with teacher.generation.top_logprobs; "
            "or sft, which needs neither"
        )
    size = len(teacher_tokenizer)
    smallest_rows = min(teacher_rows, student_rows)
    if smallest_rows < size:
        raise VocabularyMismatch(
            f"the tokenizer has {size} tokens but a model has only {smallest_rows} output rows "
            f"(teacher {teacher_rows}, student {student_rows}); the model and tokenizer "
            "directories do not belong together"
        )
    return size


def topk_preflight(topk_ids_max: int, vocab_size: int) -> None:
    if topk_ids_max >= vocab_size:
        raise VocabularyMismatch(
            f"the dataset's teacher top-k holds token id {topk_ids_max}, outside the student's "
            f"vocabulary of {vocab_size}; the logprobs were captured with another tokenizer"
        )
