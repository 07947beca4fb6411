"""Grey-box alignment (training/token_align.py) on hand-made token sequences, and the
kd_greybox rows of the sparse loss (training/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from distillflow.training.losses import KDSettings, sparse_chunk_sums_, uld_from_logprobs
from distillflow.training.token_align import (
    EXACT,
    MERGED,
    NONE,
    ULD,
    TeacherToken,
    align_answer,
    char_to_byte_spans,
    teacher_spans,
    teacher_tokens_from_rows,
    token_bytes,
)

LN = math.log


def pieces_of(vocab: dict[str, int]):
    """A student that tokenises greedily by longest match over `vocab` (a stand-in for BPE)."""

    def first_piece(text: bytes):
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:
            return None
        count, rest, first = 0, decoded, None
        while rest:
            match = next((rest[:n] for n in range(len(rest), 0, -1) if rest[:n] in vocab), None)
            if match is None:
                return None if first is None else (first, False)
            first = vocab[match] if first is None else first
            rest, count = rest[len(match):], count + 1
        return first, count == 1

    return first_piece


def spans_of(pieces: list[str]) -> list[tuple[int, int]]:
    spans, at = [], 0
    for piece in pieces:
        size = len(piece.encode("utf-8"))
        spans.append((at, at + size))
        at += size
    return spans


def probs(target) -> dict[int, float]:
    return {i: round(math.exp(lp), 6) for i, lp in zip(target.ids, target.logprobs)}


def test_same_tokenisation_gives_the_teachers_distribution_exactly():
    vocab = {"The": 0, " cat": 1, " dog": 2, " sat": 3, " ran": 4, "A": 5}
    tokens = [
        TeacherToken(b"The", LN(0.7), ((b"The", LN(0.7)), (b"A", LN(0.2)))),
        TeacherToken(b" cat", LN(0.6), ((b" cat", LN(0.6)), (b" dog", LN(0.3)))),
        TeacherToken(b" sat", LN(0.5), ((b" sat", LN(0.5)), (b" ran", LN(0.5)))),
    ]
    targets, coverage = align_answer(tokens, b"The cat sat", [0, 1, 3], spans_of(["The", " cat", " sat"]), pieces_of(vocab))
    assert [t.kind for t in targets] == [EXACT, EXACT, EXACT]
    assert probs(targets[0]) == {0: 0.7, 5: 0.2}  # the tail (0.1) is left to the loss's tail bucket
    assert probs(targets[1]) == {1: 0.6, 2: 0.3}
    assert probs(targets[2]) == {3: 0.5, 4: 0.5}
    assert coverage.positions == [0, 3, 0, 0] and coverage.covered_share == 1.0
    assert coverage.mass_dropped == 0.0 and coverage.mass_first_piece == 0.0


def test_student_merges_teacher_tokens_with_the_chain_rule():
    # teacher: "hel" + "lo"; student: "hello" (one token over both)
    vocab = {"hello": 0, "hel": 1, "hi": 2, "lo": 3}
    tokens = [
        TeacherToken(b"hel", LN(0.8), ((b"hel", LN(0.8)), (b"hi", LN(0.15)))),
        TeacherToken(b"lo", LN(0.5), ((b"lo", LN(0.5)), (b"p", LN(0.4)))),
    ]
    targets, _ = align_answer(tokens, b"hello", [0], [(0, 5)], pieces_of(vocab))
    assert targets[0].kind == MERGED
    # P(student writes "hello") = P("hel") * P("lo" | "hel"); "hi" keeps its own mass
    assert probs(targets[0]) == {0: 0.4, 2: 0.15}


def test_student_splits_a_teacher_token_and_is_conditioned_on_what_it_wrote():
    # teacher: "hello" (one token); student: "hel" + "lo"
    vocab = {"hel": 0, "lo": 1, "p": 2, "hi": 3}
    tokens = [TeacherToken(b"hello", LN(0.6), ((b"hello", LN(0.6)), (b"help", LN(0.2)), (b"hi", LN(0.1))))]
    targets, _ = align_answer(tokens, b"hello", [0, 1], [(0, 3), (3, 5)], pieces_of(vocab))
    assert [t.kind for t in targets] == [MERGED, MERGED]
    # first piece: "hello" and "help" both start with the student's "hel"
    assert probs(targets[0]) == {0: 0.8, 3: 0.1}
    # second piece, given "hel": only "hello" (0.6) and "help" (0.2) are consistent
    assert probs(targets[1]) == {1: 0.75, 2: 0.25}


def test_crossing_boundaries_take_the_teacher_token_that_holds_the_start():
    # teacher "ab" | "cd", student "a" | "bc" | "d"
    vocab = {"a": 0, "bc": 1, "d": 2, "b": 3, "x": 4}
    tokens = [
        TeacherToken(b"ab", LN(0.9), ((b"ab", LN(0.9)), (b"x", LN(0.1)))),
        TeacherToken(b"cd", LN(0.5), ((b"cd", LN(0.5)), (b"dd", LN(0.5)))),
    ]
    targets, _ = align_answer(tokens, b"abcd", [0, 1, 2], [(0, 1), (1, 3), (3, 4)], pieces_of(vocab))
    assert [t.kind for t in targets] == [MERGED, MERGED, MERGED]
    assert probs(targets[0]) == {0: 0.9, 4: 0.1}
    assert probs(targets[1]) == {1: 0.5}  # given "a": "ab" (0.9 of 0.9), then "c" from "cd" (0.5)
    assert probs(targets[2]) == {2: 1.0}  # given "c": only "cd" is consistent


def test_unicode_characters_are_aligned_on_bytes():
    text = "día 日本"
    offsets = [(0, 1), (1, 3), (3, 4), (4, 6)]  # "d", "ía", " ", "日本" (character offsets)
    spans = char_to_byte_spans(text, offsets, [1, 3, 1, 6])
    assert spans == [(0, 1), (1, 4), (4, 5), (5, 11)]
    tokens = [TeacherToken("día".encode(), LN(0.9), (("día".encode(), LN(0.9)),)), TeacherToken(" 日本".encode(), LN(0.7), ())]
    vocab = {"d": 0, "ía": 1, " ": 2, "日本": 3, "día": 4}
    targets, coverage = align_answer(tokens, text.encode(), [0, 1, 2, 3], spans, pieces_of(vocab))
    assert [t.kind for t in targets] == [MERGED, MERGED, MERGED, MERGED]
    assert probs(targets[0]) == {0: 0.9} and probs(targets[1]) == {1: 1.0}
    assert probs(targets[2]) == {2: 0.7}  # fewer than k alternatives: the actual token's logprob alone
    assert coverage.covered_share == 1.0


def test_offsets_trimmed_of_their_leading_space_still_tile_the_answer():
    # " cat" reported at (4, 7) instead of (3, 7) by a tokenizer that trims offsets
    assert char_to_byte_spans("The cat", [(0, 3), (4, 7)], [3, 4]) == [(0, 3), (3, 7)]


def test_byte_fallback_tokens_of_one_character_get_one_byte_each():
    # "—" is 3 UTF-8 bytes; a byte-fallback student writes it as <0xE2><0x80><0x94>, all with the
    # character's offsets; a teacher that splits it reports escaped partial bytes.
    text = "a—"
    spans = char_to_byte_spans(text, [(0, 1), (1, 2), (1, 2), (1, 2)], [1, 1, 1, 1])
    assert spans == [(0, 1), (1, 2), (2, 3), (3, 4)]
    rows = [
        {"token": "a", "logprob": -0.1, "top": [{"token": "a", "logprob": -0.1}]},
        {"token": "\\xe2\\x80", "logprob": -0.2, "top": [{"token": "\\xe2\\x80", "logprob": -0.2}]},
        {"token": "\\x94", "logprob": -0.3, "top": [{"token": "\\x94", "logprob": -0.3}, {"token": "\\x93", "logprob": -1.5}]},
    ]
    tokens = teacher_tokens_from_rows(rows)
    assert tokens[1].text == b"\xe2\x80" and tokens[2].alternatives[1][0] == b"\x93"
    single = {b"a": 0, b"\xe2": 1, b"\x80": 2, b"\x94": 3, b"\x93": 4}
    targets, coverage = align_answer(tokens, text.encode(), [0, 1, 2, 3], spans, lambda raw: (single[raw], True) if raw in single else None)
    assert [t.kind for t in targets] == [EXACT, MERGED, MERGED, EXACT]
    assert probs(targets[3]) == {3: round(math.exp(-0.3), 6), 4: round(math.exp(-1.5), 6)}
    # <0xE2> ends inside the teacher's "\xe2\x80": no chain; <0x80> is then all that token can continue with
    assert probs(targets[1]) == {1: round(math.exp(-0.2), 6)} and probs(targets[2]) == {2: 1.0}
    assert coverage.covered_share == 1.0


def test_token_bytes_reads_the_api_conventions():
    assert token_bytes("é") == "é".encode()
    assert token_bytes("\\xf0\\x9f\\x8c") == b"\xf0\x9f\x8c"  # escaped partial character (OpenAI, DeepSeek)
    assert token_bytes("a\\x41") == b"a\\x41"  # the escapes spell valid text: the token is literal
    assert token_bytes("\ufffd") is None  # vLLM's replacement character: bytes unknown
    assert token_bytes("\ufffd", [240, 159]) == b"\xf0\x9f"  # the API's bytes field wins


def test_unknown_bytes_fall_back_to_uld_and_missing_logprobs_to_none():
    # "x😀y": the provider sent the emoji as two U+FFFD tokens (vLLM) and no logprobs for "y"
    answer = "x😀y".encode()
    rows = [
        {"token": "x", "logprob": -0.1, "top": [{"token": "x", "logprob": -0.1}]},
        {"token": "\ufffd", "logprob": -0.4, "top": [{"token": "\ufffd", "logprob": -0.4}, {"token": "\ufffd", "logprob": -1.2}]},
        {"token": "\ufffd", "logprob": -0.05, "top": []},
        {"token": "y", "logprob": None, "top": []},
    ]
    tokens = teacher_tokens_from_rows(rows)
    assert teacher_spans(tokens, answer) == [(0, 1, False), (1, 5, True), None, (5, 6, False)]
    vocab = {"x": 0, "😀": 1, "y": 2}
    targets, coverage = align_answer(tokens, answer, [0, 1, 2], spans_of(["x", "😀", "y"]), pieces_of(vocab))
    assert [t.kind for t in targets] == [EXACT, ULD, NONE]
    assert targets[1].ids == [] and [round(lp, 6) for lp in targets[1].logprobs] == [-0.4, -1.2]  # sorted, no ids
    assert coverage.positions == [1, 1, 0, 1]
    assert coverage.to_dict()["covered_share"] == pytest.approx(2 / 3, abs=1e-6)


def test_unknown_logprobs_and_text_past_the_answer_carry_no_distribution():
    # OpenAI's -9999 for a chosen token outside the top 20; the student's end-of-turn token,
    # even where the teacher reported a token after its answer (an in-process teacher's eos)
    rows = [
        {"token": "Hi", "logprob": -9999.0, "top": []},
        {"token": "!", "logprob": -0.3, "top": [{"token": "!", "logprob": -0.3}, {"token": ".", "logprob": -1.4}]},
        {"token": "<|end|>", "logprob": -0.1, "top": [{"token": "<|end|>", "logprob": -0.1}]},
    ]
    tokens = teacher_tokens_from_rows(rows)
    assert tokens[0].logprob is None and not tokens[0].has_distribution
    vocab = {"Hi": 0, "!": 1, ".": 2}
    targets, coverage = align_answer(tokens, b"Hi!", [0, 1, 9], [(0, 2), (2, 3), (3, 10)], pieces_of(vocab))
    assert [t.kind for t in targets] == [NONE, EXACT, NONE]
    assert coverage.positions == [2, 1, 0, 0]


def test_alternatives_no_student_token_names_are_dropped_and_counted():
    vocab = {"ok": 0, "o": 1, "k": 2}
    tokens = [TeacherToken(b"ok", LN(0.5), ((b"ok", LN(0.5)), ("ü".encode(), LN(0.3)), (b"kk", LN(0.1))))]
    targets, coverage = align_answer(tokens, b"ok", [0], [(0, 2)], pieces_of(vocab))
    assert probs(targets[0]) == {0: 0.5, 2: 0.1}  # "kk" → its first piece "k"; "ü" has no student token
    assert coverage.mass_dropped == pytest.approx(0.3) and coverage.mass_first_piece == pytest.approx(0.1)
    assert coverage.mass_direct == pytest.approx(0.5)


# --------------------------------------------------------------------------------------
# The loss on grey-box rows
# --------------------------------------------------------------------------------------


def _reference(logits, targets, ids, logprobs, valid, kinds, alpha, temperature):
    """Plain autograd over the full softmax: the per-row definition of the kd_greybox loss."""
    total = logits.new_zeros(())
    log_p = torch.log_softmax(logits, -1)
    log_pt = torch.log_softmax(logits / temperature, -1)
    for row in range(logits.shape[0]):
        ce = -log_p[row, targets[row]]
        if kinds[row] == 0:
            total = total + ce
            continue
        keep = valid[row]
        if kinds[row] == 3:
            student_sorted = log_pt[row].exp().sort(descending=True).values[: int(keep.sum())]
        else:
            student_sorted = log_pt[row, ids[row][keep]].exp()
        teacher = logprobs[row][keep].double().exp()
        tail = (1 - teacher.sum()).clamp_min(0.0)
        tail_t = (tail ** (1 / temperature) - 1e-4 ** (1 / temperature)).clamp_min(0.0)
        teacher_t = torch.cat([teacher ** (1 / temperature), tail_t[None]])
        teacher_t = (teacher_t / teacher_t.sum()).float()
        student = torch.cat([student_sorted, (1 - student_sorted.double().sum()).float()[None]])
        if kinds[row] == 3:
            kd = (student - teacher_t).abs().sum()
        else:
            kd = (teacher_t * (teacher_t.clamp_min(1e-30).log() - student.log())).sum()
        total = total + alpha * temperature**2 * kd + (1 - alpha) * ce
    return total


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_greybox_rows_match_a_full_softmax_reference(temperature):
    torch.manual_seed(0)
    vocab, k = 12, 3
    logits = torch.randn(4, vocab, dtype=torch.float64).float()
    targets = torch.tensor([1, 2, 3, 4])
    ids = torch.tensor([[1, 5, 0], [2, 0, 0], [0, 0, 0], [0, 0, 0]])
    logprobs = torch.tensor([[LN(0.6), LN(0.3), 0.0], [LN(0.9), 0.0, 0.0], [0.0, 0.0, 0.0], [LN(0.7), LN(0.2), 0.0]])
    valid = torch.tensor([[True, True, False], [True, False, False], [False] * 3, [True, True, False]])
    kinds = torch.tensor([1, 2, 0, 3], dtype=torch.int8)  # exact, merged, none, uld
    settings = KDSettings("forward_kl", 0.5, temperature, 0.5)
    sums, grad = sparse_chunk_sums_(logits.clone(), targets, ids, logprobs, settings, True, topk_valid=valid, row_kind=kinds)
    reference_logits = logits.clone().requires_grad_(True)
    reference = _reference(reference_logits, targets, ids, logprobs, valid, kinds, 0.5, temperature)
    reference.backward()
    assert sums[0].item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-4)
    assert torch.allclose(grad, reference_logits.grad, atol=1e-4)


def test_uld_is_zero_for_equal_sorted_vectors_whatever_the_order():
    student = torch.tensor([[0.5, 0.3, 0.2]]).log()
    teacher = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert uld_from_logprobs(student, teacher).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.tensor([[0.6, 0.3, 0.1]]).log()
    assert uld_from_logprobs(other, teacher).item() == pytest.approx(0.2, abs=1e-6)


def test_a_local_teachers_byte_level_vocabulary_entries_are_read_as_bytes():
    # an in-process teacher stores vocabulary entries ("Ġ" = a space, "Ã©" = the bytes of "é")
    from distillflow.training.token_align import teacher_tokens_for_answer

    rows = [
        {"token": "Hello", "logprob": -0.1, "top": [{"token": "Hello", "logprob": -0.1}, {"token": "Hi", "logprob": -2.0}]},
        {"token": "ĠwÃ©", "logprob": -0.2, "top": [{"token": "ĠwÃ©", "logprob": -0.2}, {"token": "Ġthe", "logprob": -1.9}]},
        {"token": "<|end|>", "logprob": -0.01, "top": []},
    ]
    tokens = teacher_tokens_for_answer(rows, "Hello wé".encode())
    assert [t.text for t in tokens] == [b"Hello", " wé".encode(), b"<|end|>"]
    assert tokens[1].alternatives[1][0] == b" the"
    # text that spells the answer as it is stays text
    plain = teacher_tokens_for_answer([{"token": "Ġx", "logprob": -0.1, "top": []}], "Ġx".encode())
    assert plain[0].text == "Ġx".encode()
