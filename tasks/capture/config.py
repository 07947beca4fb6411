"""Config of teacher logit capture (the `capture:` section), for the kd_topk objective.

`distill capture-logits CONFIG` adds the teacher's top-k logprobs of every supervised
response token to an existing dataset. Positions come from `training.data.encode_example`,
so `system_prompt` and `max_length` must be the ones training uses: left unset, they are
taken from the `training:` section (then from `teacher.system_prompt`, and 2048).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distillflow.base_config import StrictModel
from distillflow.training.config import ChatTemplateSetting


class CaptureConfig(StrictModel):
    """Capture the teacher's top-k logprobs for every answer token of a dataset (in
    process with transformers, or from a vLLM server), for white-box training."""

    source: Literal["local", "vllm"] = Field(
        "local",
        description="local: forward passes of a Hugging Face model directory in this process; "
        "vllm: an OpenAI-compatible vLLM server scoring the token ids (`prompt_logprobs`).",
    )
    model: str | None = Field(
        None,
        description="local: the teacher model directory; vllm: the served model name. "
        "Default: teacher.model.",
    )
    tokenizer: Path | None = Field(
        None,
        description="Tokenizer directory that turns rows into token ids (the student's; teacher "
        "and student must share a vocabulary). Default: training.student, else the model "
        "directory (local) or training.teacher (vllm); with training.objective kd_greybox the "
        "teacher's own (the student may have any vocabulary).",
    )
    k: int = Field(20, ge=1, le=1024, description="Logprobs kept per position (vLLM caps it at --max-logprobs).")
    method: Literal["topk", "sampled"] = Field(
        "topk",
        description="topk: the teacher's k most likely tokens and their logprobs (kd_topk adds the "
        "rest as a tail bucket). sampled: k tokens drawn from the teacher's full distribution at "
        "each position, stored as the distinct ids with log(draw count / k), an unbiased estimate "
        "of the teacher (Anshumann et al., ACL 2025) in the same bytes per token; trains with "
        "kd_topk at training.temperature 1 and forward_kl. Needs source: local.",
    )
    seed: int = Field(
        0, ge=0, description="sampled: seed of the draws, mixed with each row's id and position "
        "(a rerun draws the same tokens).",
    )
    input_dir: Path | None = Field(
        None, description="Dataset to read (its data/*.parquet). Default: output_dir of the config."
    )
    output_dir: Path | None = Field(
        None,
        description="Where the dataset with the extra columns is written. Default: input_dir "
        "(in place: each shard is replaced atomically, the manifest rewritten last).",
    )
    system_prompt: str | None = Field(
        None, description="System message of every example. Default: training.system_prompt."
    )
    chat_template: ChatTemplateSetting = Field(
        None,
        description="Chat template of the tokenisation (must be training's). Default: training.chat_template, "
        "then the top-level chat_template, then the tokenizer's own.",
    )
    max_length: int | None = Field(
        None, ge=8, description="Tokens per example (truncation). Default: training.max_length."
    )
    batch_size: int = Field(
        8, ge=1, description="Sequences per forward pass (local) or per request (vllm)."
    )
    rows_per_read: int = Field(
        256, ge=1, description="Rows read from a shard at a time (bounds memory)."
    )
    device: str = Field("auto", description="local: auto, cpu, cuda, cuda:N.")
    base_url: str | None = Field(
        None, description="vllm: the server's /v1 URL. Default: teacher.base_url."
    )
    api_key_env: str | None = Field(
        None, description="vllm: NAME of the env var holding the key. Default: teacher.api_key_env."
    )
    max_concurrency: int = Field(8, ge=1, le=1024, description="vllm: requests in flight.")
    timeout_s: float = Field(300.0, gt=0, description="vllm: per-request timeout.")
    max_retries: int = Field(4, ge=0, le=50, description="vllm: retries of a failed request.")

    @model_validator(mode="after")
    def _check(self) -> CaptureConfig:
        if self.source == "vllm" and self.device != "auto":
            raise ValueError("capture.device applies to source: local only; remove it")
        if self.method == "sampled" and self.source != "local":
            raise ValueError(
                "capture.method: sampled draws from the teacher's full distribution, which a vLLM "
                "server does not return (prompt_logprobs gives its top-k only); use source: local "
                "with the teacher's model directory, or method: topk"
            )
        return self
