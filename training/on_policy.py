"""On-policy distillation: the student answers the dataset's prompts itself, the teacher scores
the student's own tokens, and the loss is the per-token divergence on them.

One optimizer step, per process: each micro-batch m of step s is, with probability `lmbda`
(decided by a generator seeded from (seed, s, m), so every process agrees and a resumed run
decides the same), replaced by student answers: the prompts are kept, the dataset's answers
dropped, and the student samples new ones (`sampling_temperature`, at most `max_new_tokens`,
stopping at eos or where the template's next turn starts) from a generator seeded from
(seed, s, m, rank). The other micro-batches keep the dataset's teacher answers. Either way
the teacher scores every answer token: in process (its full logits, through the loss of
kd_logits), or through a server's prompt logprobs (`ServerTeacher`: top-k + tail bucket
targets, as kd_topk), every request recorded in a ledger.

A student-sampled micro-batch is trained on the divergence alone (alpha = 1): cross-entropy on
the student's own samples would reinforce whatever it sampled, mistakes included.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillflow.records import TeacherAnswer
from distillflow.storage.ledger import LEDGER_DIR, Ledger, request_key
from distillflow.training.chat_template import cut_at_stop
from distillflow.training.config import TeacherServerConfig
from distillflow.training.data import IGNORE_INDEX, Batch, collate
from distillflow.training.prompt_logprobs import TopK, prompt_logprobs_to_topk, request_prompt_logprobs

# Ledger of the teacher server's scores, under the run's output_dir.
ON_POLICY_LEDGER = LEDGER_DIR / "on_policy_teacher.sqlite"


# --------------------------------------------------------------------------------------
# Which micro-batches, and their random streams (pure functions of the step)
# --------------------------------------------------------------------------------------


def student_answers_wanted(seed: int, step: int, micro_step: int, lmbda: float) -> bool:
    """Whether micro-batch `micro_step` of optimizer step `step` uses student-sampled answers.

    The same on every process (no rank in the seed), so a step's micro-batches take the same
    path everywhere, and the same after a resume."""
    if lmbda <= 0.0:
        return False
    if lmbda >= 1.0:
        return True
    return bool(np.random.default_rng([seed, step, micro_step, 0x0F0]).random() < lmbda)


def sampling_generator(seed: int, step: int, micro_step: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch's sampling: a resumed run samples the same tokens."""
    entropy = np.random.SeedSequence([seed, step, micro_step, rank, 0x5A]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
    return generator


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def prompt_ids(row: dict[str, Any]) -> np.ndarray:
    """The tokens before the first supervised one: the chat template's prompt and generation
    prompt, exactly as the dataset row was encoded. (P,) int64."""
    supervised = np.flatnonzero(row["labels"] != IGNORE_INDEX)
    if len(supervised) == 0 or supervised[0] == 0:
        raise ValueError("an on_policy row needs a prompt before its answer (no supervised first token)")
    return row["input_ids"][: supervised[0]]


class TurnEnd:
    """Where a sampled answer's turn ends in text (a template's turn stops, `chat_template_stop`):
    a base-model student runs on into the next "\nUser:" turn unless its answers are cut there."""

    def __init__(self, stops: Sequence[str], decode: Any, end_id: int) -> None:
        self.stops, self.decode, self.end_id = tuple(stops), decode, end_id

    def cut(self, answer: list[int]) -> list[int] | None:
        """The answer up to where a stop starts, plus the end token; None when no stop is in it."""
        before, found = cut_at_stop(self.decode(answer), self.stops)
        if not found:
            return None
        kept = len(answer)
        while kept > 0 and len(self.decode(answer[:kept])) > len(before):  # tokens before the stop
            kept -= 1
        return [*answer[:kept], self.end_id]


@torch.no_grad()
def sample_answers(
    model: torch.nn.Module,
    prompts: Sequence[np.ndarray],
    max_new_tokens: int,
    temperature: float,
    stop_ids: set[int],
    pad_id: int,
    generator: torch.Generator,
    vocab_size: int | None = None,
    turn_end: TurnEnd | None = None,
) -> list[list[int]]:
    """Sample one answer per prompt from `model` (a causal LM), with a KV cache.

    Prompts are left-padded; position ids count real tokens only. Each answer ends at its first
    token in `stop_ids` (kept) or after `max_new_tokens`; with `turn_end` (a template whose turn
    ends in text, e.g. `plain`'s "\nUser:"), also where its text starts a new turn: it is cut
    there and ends in the template's end token instead. Tokens ≥ vocab_size (padded embedding
    rows) are never drawn. Sampling is plain softmax(logits / temperature): no top-k, top-p or
    penalties, so the answers follow the student's own distribution.
    """
    rows, width = len(prompts), max(len(prompt) for prompt in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)  # (B, P)
    for index, prompt in enumerate(prompts):
        input_ids[index, width - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[index, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, P)
    answers: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    cache = None
    for _ in range(max_new_tokens):
        outputs = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        cache = outputs.cache  # keys and values of every token so far
        logits = outputs.logits[:, -1].float()  # (B, V)
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        probs = torch.softmax(logits / temperature, dim=-1).cpu()  # (B, V)
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
        for index, token in enumerate(drawn.tolist()):
            if not finished[index]:
                answers[index].append(token)
                finished[index] = token in stop_ids
                if not finished[index] and turn_end is not None:
                    cut = turn_end.cut(answers[index])
                    if cut is not None:
                        answers[index], finished[index] = cut, True
        if all(finished):
            break
        input_ids = drawn[:, None].to(device)  # (B, 1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return answers


def answer_rows(prompts: Sequence[np.ndarray], answers: Sequence[list[int]]) -> list[dict[str, np.ndarray]]:
    """Training rows of (prompt, sampled answer): the answer's tokens are the supervised ones."""
    rows = []
    for prompt, answer in zip(prompts, answers):
        answer_ids = np.asarray(answer, dtype=np.int64)
        rows.append(
            {
                "input_ids": np.concatenate([prompt, answer_ids]),
                "labels": np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int64), answer_ids]),
            }
        )
    return rows


@contextlib.contextmanager
def generation_weights(engine: Any) -> Iterator[None]:
    """Full student weights on every process while it samples. Under ZeRO-3 they are gathered
    once (a collective: every process enters together) instead of per layer and per token."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def student_answer_rows(
    student: torch.nn.Module,
    rows: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int,
    max_length: int,
    temperature: float,
    stop_ids: set[int],
    pad_id: int,
    generator: torch.Generator,
    vocab_size: int | None,
    turn_end: TurnEnd | None = None,
) -> list[dict[str, np.ndarray]]:
    """The rows with their answers replaced by the student's samples (prompts kept); answers
    are capped so that the longest prompt + answer fits max_length."""
    prompts = [prompt_ids(row) for row in rows]
    budget = max(1, min(max_new_tokens, max_length - max(len(prompt) for prompt in prompts)))
    was_training = student.training
    student.eval()
    try:
        answers = sample_answers(student, prompts, budget, temperature, stop_ids, pad_id, generator, vocab_size, turn_end)
    finally:
        student.train(was_training)
    return answer_rows(prompts, answers)


# --------------------------------------------------------------------------------------
# The teacher behind a server: prompt logprobs → top-k targets, every request in the ledger
# --------------------------------------------------------------------------------------


def supervised_targets(labels: np.ndarray) -> np.ndarray:
    """Indices i ≥ 1 with labels[i] != -100: the tokens a teacher distribution must predict."""
    return np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1


def _encode_topk(ids: np.ndarray, logprobs: np.ndarray) -> list[dict[str, Any]]:
    # TeacherAnswer.top_logprobs format: one entry per scored token, its top-k alternatives.
    return [
        {"token": None, "logprob": None, "top": [{"token": str(i), "logprob": float(v)} for i, v in zip(row_ids, row_lp)]}
        for row_ids, row_lp in zip(ids.tolist(), logprobs.tolist())
    ]


def _decode_topk(entries: list[dict[str, Any]], k: int) -> TopK:
    ids = np.asarray([[int(item["token"]) for item in entry["top"]] for entry in entries], dtype=np.int64)
    logprobs = np.asarray([[item["logprob"] for item in entry["top"]] for entry in entries], dtype=np.float32)
    return ids.reshape(-1, k), logprobs.reshape(-1, k)


class ServerTeacher:
    """Top-k logprobs of token sequences from an OpenAI-compatible server (vLLM prompt_logprobs).

    A request is one sequence: its key is (model, token ids, k); answers already in the ledger
    are read back, the rest are sent (batch_size sequences per HTTP call) and recorded before
    they are used. Only transport errors are retried (by the client, with backoff).
    """

    def __init__(self, settings: TeacherServerConfig, ledger_path: str | Path) -> None:
        from openai import OpenAI

        api_key = os.environ.get(settings.api_key_env or "", "") or "EMPTY"
        self.client = OpenAI(
            base_url=settings.base_url, api_key=api_key, timeout=settings.timeout_s, max_retries=settings.max_retries
        )
        self.settings = settings
        self.ledger = Ledger(ledger_path)
        self.requests_sent = 0  # sequences scored by the server in this process
        self.requests_reused = 0  # sequences read back from the ledger

    def request_key(self, sequence: list[int]) -> str:
        params = {"endpoint": "completions", "prompt_logprobs": self.settings.top_k, "max_tokens": 1}
        return request_key([{"prompt_token_ids": sequence}], self.settings.model, params)

    def topk(self, sequences: list[list[int]], targets: list[np.ndarray]) -> list[TopK]:
        """(T_i, k) ids and logprobs of the teacher at each sequence's target indices."""
        k = self.settings.top_k
        keys = [self.request_key(sequence) for sequence in sequences]
        recorded = self.ledger.get_many(set(keys))
        first_index = {key: index for index, key in reversed(list(enumerate(keys)))}
        missing = [index for key, index in first_index.items() if key not in recorded]  # one per key
        size = self.settings.batch_size
        for start in range(0, len(missing), size):
            chunk = missing[start : start + size]
            scored = request_prompt_logprobs(self.client, self.settings.model, [sequences[i] for i in chunk], k)
            entries = []
            for index, prompt_logprobs in zip(chunk, scored):
                # Every position of the sequence is kept (not only the targets), so the answer
                # read back serves any labelling of the same tokens.
                ids, logprobs = prompt_logprobs_to_topk(prompt_logprobs, np.arange(1, len(sequences[index])), k)
                answer = TeacherAnswer(content=None, finish_reason="stop", model=self.settings.model,
                                       prompt_tokens=len(sequences[index]), top_logprobs=_encode_topk(ids, logprobs))
                entries.append((keys[index], answer, time.time()))
                recorded[keys[index]] = (answer, 0.0)
            self.ledger.put_many(entries)  # durable before the loss uses it
            self.requests_sent += len(chunk)
        self.requests_reused += len(first_index) - len(missing)
        results = []
        for key, target in zip(keys, targets):
            ids, logprobs = _decode_topk(recorded[key][0].top_logprobs or [], k)  # row j predicts token j + 1
            results.append((ids[target - 1], logprobs[target - 1]))
        return results

    def close(self) -> None:
        self.ledger.close()


def attach_server_topk(batch: Batch, rows: Sequence[dict[str, Any]], teacher: ServerTeacher) -> Batch:
    """Fill batch.topk_ids / topk_logprobs (N, k), in the order of `select_supervised`
    (row-major over the batch, shifted by one), from the server teacher's scores of `rows`."""
    sequences = [[int(token) for token in row["input_ids"]] for row in rows]
    targets = [supervised_targets(row["labels"]) for row in rows]
    scored = teacher.topk(sequences, targets)
    batch.topk_ids = torch.from_numpy(np.concatenate([ids for ids, _ in scored]))
    batch.topk_logprobs = torch.from_numpy(np.concatenate([logprobs for _, logprobs in scored]))
    return batch


def micro_batch(
    rows: Sequence[dict[str, Any]], pad_id: int, student_generated: bool, teacher: ServerTeacher | None
) -> Batch:
    """Collate `rows` and, with a server teacher, attach its top-k targets."""
    batch = collate(list(rows), pad_id)
    batch.student_generated = student_generated
    if teacher is not None:
        attach_server_topk(batch, rows, teacher)
    return batch
