"""The models `distill eval` asks: in-process Hugging Face models and OpenAI-compatible endpoints.

Both answer a list of prompts with `Answer`s (text, seconds, tokens); in-process models also
score a teacher's answers (per-token cross-entropy) and time generation at fixed batch sizes.

- `InProcessModel` loads a model directory once (through `LocalTeacher`, so chat template,
  its turn stops, left padding and greedy decoding are the build's) and frees it on `close`.
- `EndpointModel` sends requests through the build's teacher client (`make_teacher`) with a `Ledger` in front, so an
  answer already received (by a build or an earlier eval) is not paid for again.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillflow.config import GenerationConfig, TeacherConfig
from distillflow.records import stopped_answer
from distillflow.storage.ledger import Ledger
from distillflow.tasks.teacher.choose import make_teacher
from distillflow.tasks.teacher.protocol import build_messages
from distillflow.tasks.teacher.recording import answer_requests

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(slots=True)
class Answer:
    """One model answer. `latency_s`: seconds of the generate call (in-process, shared by its
    batch) or from submitting the request batch to this answer's arrival (endpoint); None for
    an answer taken from a ledger."""

    text: str | None
    latency_s: float | None
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    from_ledger: bool = False


def percentile(values: list[float], share: float) -> float:
    """Linear-interpolated percentile (share in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * share
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def weights_size_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files in a model directory (what a deployment downloads)."""
    return sum(
        path.stat().st_size for path in Path(model_dir).rglob("*") if path.is_file() and path.suffix in WEIGHT_SUFFIXES
    )


class PeakMemory:
    """Peak memory while a model is loaded and used: CUDA's max allocated bytes on a GPU,
    else the process RSS sampled every 20 ms, minus the RSS before the model was loaded."""

    def __init__(self, device: str) -> None:
        import psutil
        import torch

        self.cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        self.process = psutil.Process()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True, name="eval-rss")
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> dict[str, Any]:
        import torch

        if self.cuda:
            return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "peak_memory_kind": "cuda_max_allocated"}
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        self.peak = max(self.peak, self.process.memory_info().rss)
        return {"peak_memory_mb": (self.peak - self.baseline) / 2**20, "peak_memory_kind": "process_rss_increase"}


class InProcessModel:
    """A Hugging Face model directory, loaded once, greedy."""

    kind = "in_process"

    def __init__(
        self,
        path: str | Path,
        max_tokens: int,
        batch_size: int,
        device: str,
        system_prompt: str | None,
        chat_template: str | None = None,
        chat_template_stop: list[str] | None = None,
        stop: list[str] | None = None,
    ) -> None:
        from distillflow.tasks.teacher.local import LocalTeacher

        self.path = Path(path)
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.memory = PeakMemory(device)
        config = TeacherConfig(
            backend="local",
            base_url=None,
            model=str(self.path),
            api_key_env=None,
            local_batch_size=batch_size,
            device=device,
            system_prompt=system_prompt,
            chat_template=chat_template,
            chat_template_stop=chat_template_stop,
            generation=GenerationConfig(temperature=0.0, max_tokens=max_tokens, stop=stop),
        )
        self.runner = LocalTeacher(config)
        self.model, self.tokenizer, self.device = self.runner.model, self.runner.tokenizer, self.runner.device

    @property
    def parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    @property
    def weights_memory_bytes(self) -> int:
        """Bytes the parameters and buffers take in memory (at the dtype they were loaded in)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    @property
    def size_bytes(self) -> int:
        return weights_size_bytes(self.path)

    def answer(self, prompts: list[str], progress: Callable[[int], None] | None = None) -> list[Answer]:
        """Greedy answers, `batch_size` prompts per generate call, each timed; `progress(n)`
        after each call."""
        answers: list[Answer] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [[{"role": "user", "content": prompt}] for prompt in prompts[start : start + self.batch_size]]
            began = time.perf_counter()
            results = self.runner.answer_batch(chunk)
            self._synchronize()
            seconds = time.perf_counter() - began
            answers.extend(
                Answer(r.content, seconds, r.completion_tokens, r.finish_reason, r.error) for r in results
            )
            if progress is not None:
                progress(len(results))
        return answers

    def sample(self, prompts: list[str], samples: int, temperature: float) -> list[list[str | None]]:
        """`samples` answers per prompt at `temperature` (sample i seeded by i): (prompts, samples)."""
        greedy = self.runner.generation
        out: list[list[str | None]] = [[] for _ in prompts]
        try:
            for index in range(samples):
                self.runner.generation = greedy.model_copy(update={"temperature": temperature, "top_p": 1.0, "seed": index})
                for start in range(0, len(prompts), self.batch_size):
                    chunk = [[{"role": "user", "content": p}] for p in prompts[start : start + self.batch_size]]
                    for offset, result in enumerate(self.runner.answer_batch(chunk)):
                        out[start + offset].append(None if result.error else result.content)
        finally:
            self.runner.generation = greedy
        return out

    def _synchronize(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def cross_entropy(self, pairs: list[tuple[str, str]], max_length: int, batch_size: int = 8) -> list[tuple[float, int]]:
        """(summed negative log-likelihood in nats, answer tokens) of each (prompt, answer) pair,
        tokenised exactly as training does (`training.data.encode_example`)."""
        import torch

        from distillflow.training.data import IGNORE_INDEX, encode_example, right_padded

        limit = min(max_length, getattr(self.model.config, "max_position_embeddings", None) or max_length)
        encoded = [encode_example(self.tokenizer, p, r, self.system_prompt, limit) for p, r in pairs]
        results: list[tuple[float, int]] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with torch.inference_mode():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                input_ids, labels, mask = right_padded(chunk, pad)
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits.float()  # (B, L, V)
                targets = labels[:, 1:].to(self.device)  # (B, L-1): the output at t-1 predicts labels[t]
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="none",
                ).view(targets.shape)  # (B, L-1)
                counted = targets != IGNORE_INDEX
                for row in range(len(chunk)):
                    results.append((float(nll[row][counted[row]].sum()), int(counted[row].sum())))
        return results

    def time_generation(self, prompts: list[str], batch_sizes: list[int], max_new_tokens: int, warmup: int) -> dict[str, Any]:
        """Tokens/s and batch latency at each batch size, generating exactly `max_new_tokens`
        per prompt (end-of-sequence ignored, so short answers do not flatter a model)."""
        import torch

        messages = [self.runner._with_system_prompt([{"role": "user", "content": p}]) for p in prompts]
        token_ids = [self.runner._encode(item) for item in messages]
        per_batch: dict[str, Any] = {}
        for size in batch_sizes:
            batches = [
                [token_ids[(start + offset) % len(token_ids)] for offset in range(size)]
                for start in range(0, max(len(prompts), size), size)
            ]
            walls: list[float] = []
            for index, batch in enumerate([*batches[:1] * warmup, *batches]):
                encoded = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt").to(self.device)
                began = time.perf_counter()
                with torch.inference_mode():
                    self.model.generate(
                        **encoded,
                        do_sample=False,
                        max_new_tokens=max_new_tokens,
                        min_new_tokens=max_new_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                self._synchronize()
                if index >= warmup:
                    walls.append(time.perf_counter() - began)
            tokens = size * max_new_tokens * len(walls)
            per_batch[str(size)] = {
                "tokens_per_s": tokens / sum(walls),
                "latency_p50_s": percentile(walls, 0.5),
                "latency_p95_s": percentile(walls, 0.95),
                "batches": len(walls),
                "new_tokens_per_prompt": max_new_tokens,
            }
        return per_batch

    def close(self) -> dict[str, Any]:
        """Free the model; the peak memory it used."""
        memory = self.memory.stop()
        del self.runner, self.model
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
        return memory


class EndpointModel:
    """An OpenAI-compatible endpoint behind a ledger (no answer paid for twice)."""

    kind = "endpoint"

    def __init__(self, teacher_config: TeacherConfig, ledger_path: str | Path, system_prompt: str | None) -> None:
        self.config = teacher_config
        self.system_prompt = system_prompt
        self.client = make_teacher(teacher_config)
        self.ledger = Ledger(ledger_path)
        self.fresh_seconds: list[float] = []
        self.fresh_tokens = 0
        self.wall_s = 0.0

    def answer(self, prompts: list[str], progress: Callable[[int], None] | None = None) -> list[Answer]:
        messages = [build_messages(prompt, self.system_prompt) for prompt in prompts]
        began_wall, began = time.time(), time.perf_counter()
        results = answer_requests(self.client, self.ledger, messages, progress=progress)
        self.wall_s += time.perf_counter() - began
        answers = []
        for result, created_at in results:
            result = stopped_answer(result, self.config.stops)  # an answer recorded before a stop was declared
            latency = None if result.from_ledger else max(0.0, created_at - began_wall)
            if latency is not None and result.ok:
                self.fresh_seconds.append(latency)
                self.fresh_tokens += result.completion_tokens
            answers.append(
                Answer(result.content, latency, result.completion_tokens, result.finish_reason, result.error, result.from_ledger)
            )
        return answers

    def speed(self) -> dict[str, Any] | None:
        """Latency and tokens/s of the requests this run sent (none: all came from the ledger)."""
        if not self.fresh_seconds:
            return None
        return {
            "concurrent": {
                "tokens_per_s": self.fresh_tokens / self.wall_s if self.wall_s else None,
                "latency_p50_s": percentile(self.fresh_seconds, 0.5),
                "latency_p95_s": percentile(self.fresh_seconds, 0.95),
                "requests": len(self.fresh_seconds),
                "max_concurrency": self.config.max_concurrency,
                "note": "from this run's requests (ledger hits excluded); latency counts queueing",
            }
        }

    def usage(self) -> dict[str, Any]:
        return self.client.stats.to_dict()

    def close(self) -> dict[str, Any]:
        self.client.close()
        self.ledger.close()
        return {}
