"""The local teacher backend: a Hugging Face causal LM answering chat prompts in-process.

`LocalTeacher` loads a model directory once (transformers), renders each request with the
config's `chat_template` (training/chat_template.py), else the tokenizer's own, and
generates in left-padded batches. It returns the same `TeacherAnswer` records as the
OpenAI-compatible backend, so the rest of the pipeline cannot tell the two apart.

Decoding:
- temperature == 0: greedy. A batch answers exactly what one-at-a-time calls answer.
- temperature > 0: temperature + top-p sampling with one `torch.Generator` per request,
  seeded from `generation.seed` and the request's messages, so an answer does not depend
  on which other requests shared its batch, nor on their order.

Stops: an answer ends at the eos, or at the first stop string — the chat template's turn
end (`chat_template_stop`, else its preset's: a base model goes on to write the next
"\\nUser:" turn itself) and `generation.stop`. Generation halts there (a stopping
criterion) and the stop text is cut from the answer, whose finish_reason is `stop`;
`length` means max_tokens ran out. A model with its own (instruct) template has no turn stops.

Logprobs (`generation.top_logprobs > 0`): one entry per token of the answer (the eos token
included; a stop string's own tokens are cut with it), in float32, of the model's own next-token distribution — the log-softmax of
the raw logits, before temperature and top-p, which is what vLLM returns by default
(`logprobs_mode=raw_logprobs`). Token strings are the tokenizer's vocabulary pieces
(`convert_ids_to_tokens`), unique per id, so byte-level pieces never collide.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillflow.config import TeacherConfig
from distillflow.records import TeacherAnswer
from distillflow.tasks.teacher.errors import TeacherFatalError
from distillflow.tasks.teacher.protocol import Messages, TeacherStats
from distillflow.tasks.teacher.recording import Recording
from distillflow.training.chat_template import chat_template_text, cut_at_stop, template_stops


def resolve_device(device: str) -> torch.device:
    """`auto` → the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"teacher.device is {device!r} but torch sees no CUDA device "
            f"(torch {torch.__version__}); use device: cpu or install a CUDA build of torch"
        )
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on a GPU that supports it, else float16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def request_seed(base_seed: int | None, messages: Messages) -> int:
    """A 63-bit sampling seed derived from the config seed and the request's content."""
    payload = json.dumps([base_seed or 0, messages], sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16], 16) & (2**63 - 1)


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Sample one token id from `logits` (V,) at `temperature`, keeping the top-p mass."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # keeps ≥ 1 token
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class _PerRequestSampler:
    """A logits processor that samples each row with its own generator.

    It returns scores that are 0 at the sampled token and -inf elsewhere, so `generate`
    in greedy mode picks exactly the sampled token, while `output_logits` still carries
    the raw logits for the logprobs.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = torch.full_like(scores, float("-inf"))  # (B, V)
        for row, generator in enumerate(self.generators):
            token_id = nucleus_sample(scores[row], self.temperature, self.top_p, generator)
            chosen[row, token_id] = 0.0
        return chosen


@dataclass(frozen=True, slots=True)
class _Encoded:
    index: int  # position in the caller's list
    messages: Messages
    token_ids: list[int]


class LocalTeacher:
    """A local Hugging Face model as a teacher; load once, call `answer_batch` many times."""

    def __init__(self, teacher_config: TeacherConfig, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM

        from distillflow.training.vocabulary import load_tokenizer

        self.config = teacher_config
        self.generation = teacher_config.generation
        model_dir = Path(teacher_config.model)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher.model is {teacher_config.model!r}, which is not a model directory "
                "(no config.json); with backend: local it must be a directory saved by "
                "save_pretrained (e.g. the one `distill demo` builds)"
            )
        self.device = resolve_device(teacher_config.device)
        self.dtype = dtype or default_dtype(self.device)
        self.model_name = model_dir.name  # what `teacher_model` records for a local teacher

        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if teacher_config.chat_template is not None:
            self.tokenizer.chat_template = chat_template_text(teacher_config.chat_template)
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"the tokenizer in {model_dir} has no chat template (a base model?); set "
                "`chat_template: plain` (or a Jinja string or file) in the config"
            )
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype)
        except Exception as error:  # noqa: BLE001 - a broken download, a partial copy, a new architecture
            raise ValueError(
                f"the weights in {model_dir} do not load ({type(error).__name__}: {error}); "
                "copy or download the model again (save_pretrained writes a complete directory)"
            ) from error
        self.model.to(self.device).eval()
        self.eos_token_ids = self._eos_token_ids()
        self.stops = self._stops()
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def _eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        ids.add(self.tokenizer.eos_token_id)
        return ids

    def _stops(self) -> list[str]:
        """The template's turn end (declared, else a preset's, recognised by its text), then generation.stop."""
        declared = self.config.chat_template_stop
        own = template_stops(self.tokenizer.chat_template) if declared is None else declared
        return list(dict.fromkeys([*own, *(self.generation.stop or [])]))

    # -- public API -------------------------------------------------------------------

    def answer_batch(self, messages_list: Sequence[Messages]) -> list[TeacherAnswer]:
        """One answer per request, in the order given; a request that cannot be answered
        (prompt longer than the model's context) comes back with `error` set."""
        answers: list[TeacherAnswer | None] = [None] * len(messages_list)
        encoded: list[_Encoded] = []
        for index, messages in enumerate(messages_list):
            messages = self._with_system_prompt(list(messages))
            token_ids = self._encode(messages)
            budget = len(token_ids) + self.generation.max_tokens
            if self.max_positions is not None and budget > self.max_positions:
                answers[index] = TeacherAnswer(
                    content=None,
                    finish_reason=None,
                    model=self.model_name,
                    prompt_tokens=len(token_ids),
                    error="prompt_too_long",
                    error_detail=(
                        f"{len(token_ids)} prompt tokens + max_tokens {self.generation.max_tokens} "
                        f"> the model's {self.max_positions} positions"
                    ),
                )
                continue
            encoded.append(_Encoded(index, messages, token_ids))

        # Similar lengths share a batch (less padding); answers do not depend on batching.
        encoded.sort(key=lambda item: len(item.token_ids))
        size = self.config.local_batch_size
        for start in range(0, len(encoded), size):
            chunk = encoded[start : start + size]
            for item, answer in zip(chunk, self._generate(chunk)):
                answers[item.index] = answer
        return answers  # type: ignore[return-value]

    # -- internals --------------------------------------------------------------------

    def _with_system_prompt(self, messages: Messages) -> Messages:
        if self.config.system_prompt and (not messages or messages[0].get("role") != "system"):
            return [{"role": "system", "content": self.config.system_prompt}, *messages]
        return messages

    def _encode(self, messages: Messages) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _generate(self, chunk: list[_Encoded]) -> list[TeacherAnswer]:
        from transformers import GenerationConfig, LogitsProcessorList

        gen = self.generation
        batch = self.tokenizer.pad(
            {"input_ids": [item.token_ids for item in chunk]}, padding=True, return_tensors="pt"
        ).to(self.device)
        prompt_width = batch["input_ids"].shape[1]

        processors = LogitsProcessorList()
        if gen.temperature > 0:
            generators = []
            for item in chunk:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(request_seed(gen.seed, item.messages))
                generators.append(generator)
            processors.append(_PerRequestSampler(generators, gen.temperature, gen.top_p))

        # Greedy `generate` over our processor; every other knob off, so nothing in the
        # model's saved generation_config.json changes what is sampled.
        generation_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=gen.max_tokens,
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=gen.top_logprobs > 0,
            stop_strings=self.stops or None,
        )
        output = self.model.generate(
            **batch,
            generation_config=generation_config,
            logits_processor=processors,
            tokenizer=self.tokenizer,  # used only to match stop strings
        )
        generated = output.sequences[:, prompt_width:].tolist()  # (B, steps)
        step_logprobs = None
        if gen.top_logprobs > 0:
            # (B, steps, V) in float32: log-softmax of the raw logits at each step.
            step_logprobs = torch.log_softmax(torch.stack(output.logits, dim=1).float(), dim=-1)

        answers = []
        for row, item in enumerate(chunk):
            token_ids, finish_reason = self._trim(generated[row])
            content, stopped = cut_at_stop(self._decode(token_ids), self.stops)
            # Logprobs of the tokens that hold the answer (a stop's own tokens are cut with it).
            kept = self._tokens_holding(token_ids, len(content)) if stopped else token_ids
            top = None
            if step_logprobs is not None:
                top = self._top_logprobs(step_logprobs[row, : len(kept)], kept, gen.top_logprobs)
            answers.append(
                TeacherAnswer(
                    content=content,
                    finish_reason=finish_reason,
                    model=self.model_name,
                    prompt_tokens=len(item.token_ids),
                    completion_tokens=len(token_ids),
                    top_logprobs=top,
                )
            )
        return answers

    def _trim(self, token_ids: list[int]) -> tuple[list[int], str]:
        """Cut a generated row where it ended — its first eos, or the token that completes its
        first stop string (padding follows either) — and say why (`stop` or `length`)."""
        eos = next((position + 1 for position, token_id in enumerate(token_ids) if token_id in self.eos_token_ids), None)
        token_ids = token_ids if eos is None else token_ids[:eos]
        end = self._first_prefix(token_ids, lambda text: any(stop in text for stop in self.stops)) if self.stops else None
        if end is not None:
            return token_ids[:end], "stop"
        return token_ids, "length" if eos is None else "stop"  # length: ran the whole max_tokens budget

    def _tokens_holding(self, token_ids: list[int], chars: int) -> list[int]:
        """The shortest prefix of `token_ids` whose text is at least `chars` long."""
        end = self._first_prefix(token_ids, lambda text: len(text) >= chars)
        return token_ids if end is None else token_ids[:end]

    def _first_prefix(self, token_ids: list[int], holds: Callable[[str], bool]) -> int | None:
        """The smallest `end` with holds(decode(token_ids[:end])), or None: a binary search, as
        a prefix's text only grows with it."""
        if not holds(self._decode(token_ids)):
            return None
        low, high = 0, len(token_ids)
        while low < high:
            middle = (low + high) // 2
            if holds(self._decode(token_ids[:middle])):
                high = middle
            else:
                low = middle + 1
        return low

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _top_logprobs(self, logprobs: torch.Tensor, token_ids: list[int], k: int) -> list[dict[str, Any]]:
        """logprobs (T, V) float32 → one `{"token", "logprob", "top": [...]}` per token."""
        if not token_ids:
            return []
        top_values, top_ids = torch.topk(logprobs, k=min(k, logprobs.shape[-1]), dim=-1)  # (T, k)
        chosen = logprobs.gather(-1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0]
        pieces = self.tokenizer.convert_ids_to_tokens
        entries = []
        for step, token_id in enumerate(token_ids):
            alternatives = pieces(top_ids[step].tolist())
            entries.append(
                {
                    "token": pieces(token_id),
                    "logprob": float(chosen[step]),
                    "top": [
                        {"token": piece, "logprob": float(value)}
                        for piece, value in zip(alternatives, top_values[step].tolist())
                    ],
                }
            )
        return entries


@functools.lru_cache(maxsize=2)
def _cached_teacher(config_json: str) -> LocalTeacher:
    return LocalTeacher(TeacherConfig.model_validate_json(config_json))


def get_local_teacher(teacher_config: TeacherConfig) -> LocalTeacher:
    """The process-wide `LocalTeacher` for this config: loaded on first use, then reused
    (each Prefect task of a build calls this instead of loading the model again)."""
    return _cached_teacher(teacher_config.model_dump_json())


class LocalTeacherClient:
    """The `Teacher` of `teacher.backend: local`: the process-wide `LocalTeacher` answers
    `teacher.local_batch_size` requests per forward pass, one batch at a time."""

    concurrent = False  # one model in this process: batches take turns
    budget = None  # nothing is paid per token

    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        self.stats = TeacherStats()

    @property
    def model(self) -> str:
        return self.config.model

    def answer(self, messages_list: Sequence[Messages], recording: Recording) -> None:
        size = self.config.local_batch_size
        for start in range(0, len(messages_list), size):
            answers = get_local_teacher(self.config).answer_batch(list(messages_list[start : start + size]))
            for offset, answer in enumerate(answers):
                self.stats.requests_sent += 1
                self.stats.answered += 1
                self.stats.prompt_tokens += answer.prompt_tokens
                self.stats.completion_tokens += answer.completion_tokens
                recording.answered(start + offset, answer)

    def abort(self, error: TeacherFatalError) -> None:
        """Nothing to cancel: the model answers in the calling thread, which the signal interrupts."""

    def close(self) -> None:
        """The model stays loaded for the next call in this process."""
