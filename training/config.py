"""Config of student training (the `training:` section).

One pydantic model, every field documented, ranges checked on construction (unknown keys
are errors). `python -m distillflow.training.train --config CONFIG.yaml` reads it from the `training:`
section of a full distillflow config, or from a YAML file that holds only this section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from distillflow.base_config import StrictModel
from distillflow.resources import packaged
from distillflow.training.chat_template import PRESET_STOPS, check_chat_template_setting, check_stop_strings

# Every `chat_template` key of a config: a preset name, a Jinja string or a file (training/chat_template.py).
ChatTemplateSetting = Annotated[str | None, AfterValidator(check_chat_template_setting)]
# Every list of stop strings (`chat_template_stop`, `generation.stop`): none empty, none repeated.
StopStrings = Annotated[list[str] | None, AfterValidator(check_stop_strings)]
PLAIN_STOPS = ", ".join(repr(stop) for stop in PRESET_STOPS["plain"])
CHAT_TEMPLATE_STOP_HELP = (
    "Where an assistant turn of this section's chat_template ends: generation stops at these strings and "
    f"the answer is cut before them (finish_reason stop). Default: the preset's (plain: {PLAIN_STOPS}); "
    "none for a Jinja string or file. Given, it replaces the preset's ([] = none). Needs a chat_template "
    "(here or inherited); a section that inherits the top-level chat_template inherits this too."
)


def check_stops_have_a_template(section: str, chat_template: str | None, chat_template_stop: list[str] | None) -> None:
    """`chat_template_stop` declares the turn end of a `chat_template`: one without the other is an error."""
    if chat_template_stop is not None and chat_template is None:
        raise ValueError(
            f"{section}chat_template_stop is set but {section}chat_template is not: it declares where a turn of "
            "that template ends. Set the chat_template too, or put the strings in teacher.generation.stop"
        )


Objective = Literal["sft", "kd_logits", "kd_topk", "kd_greybox", "hidden", "on_policy"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]

# configs/deepspeed/ (shipped with the package): the default ZeRO configs live there.
DEEPSPEED_CONFIG_DIR = packaged("configs/deepspeed")


def check_sampled_capture(temperature: float, divergence: str) -> None:
    """A sampled capture holds draw frequencies w with E[w] = p (the teacher at T = 1). Only
    the forward KL is linear in the target, so only it keeps the gradient unbiased, and only
    at T = 1: E[w^(1/T)] is not p^(1/T)."""
    if temperature != 1.0:
        raise ValueError(
            f"training.temperature is {temperature:g}, but the dataset's teacher_topk was captured "
            "with capture.method: sampled, whose weights are draw frequencies of the teacher at "
            "T = 1; re-tempering them is biased. Set training.temperature: 1.0, or capture with "
            "capture.method: topk"
        )
    if divergence != "forward_kl":
        raise ValueError(
            f"training.divergence is {divergence}, but the dataset's teacher_topk was captured with "
            "capture.method: sampled; only forward_kl is unbiased on sampled weights (the others "
            "are not linear in the target). Set training.divergence: forward_kl, or capture with "
            "capture.method: topk"
        )


class DeriveStudentConfig(StrictModel):
    """Build the student from the teacher instead of loading a model directory.

    Layers: every `layer_stride`-th teacher layer is copied (DistilBERT-style), starting at
    layer 0, or `num_layers` evenly spaced layers (first and last included), with the teacher's
    embeddings, final norm and lm_head. `intermediate_size` alone (below the teacher's) prunes
    each copied block's MLP to its most important neurons, measured on evenly spaced training rows
    (Minitron-style width pruning; gated MLPs: Llama, Qwen, Mistral). With `hidden_size` or
    `num_attention_heads` set, the student is a fresh (randomly initialised) model of that
    width and the teacher's depth choice: weights are copied only at the teacher's width.
    """

    layer_stride: int | None = Field(
        2, ge=1, description="Copy teacher layers 0, k, 2k, ... (k = layer_stride)."
    )
    num_layers: int | None = Field(
        None, ge=1, description="Instead of a stride: keep this many evenly spaced teacher layers."
    )
    hidden_size: int | None = Field(None, ge=8, description="Narrower width (random init).")
    intermediate_size: int | None = Field(
        None, ge=8, description="MLP width: of a narrower student (with hidden_size), or alone: "
        "the copied blocks keep this many of their most important MLP neurons (pruned)."
    )
    num_attention_heads: int | None = Field(
        None, ge=1, description="Attention heads of a narrower student (hidden_size must divide)."
    )

    @model_validator(mode="after")
    def _check(self) -> DeriveStudentConfig:
        if self.hidden_size is not None and self.num_attention_heads is not None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; pick a head count that divides it"
                )
        return self

    @property
    def copies_weights(self) -> bool:
        """At the teacher's width (copied blocks), as opposed to a fresh, narrower model."""
        return self.hidden_size is None and self.num_attention_heads is None

    @property
    def prunes_mlp(self) -> bool:
        """Copied blocks whose MLPs keep `intermediate_size` neurons (measured on training rows)."""
        return self.copies_weights and self.intermediate_size is not None


class TeacherServerConfig(StrictModel):
    """The on_policy teacher behind an OpenAI-compatible server that returns prompt logprobs
    (vLLM's completions endpoint with `prompt_logprobs`). Every scoring request is recorded in
    `<output_dir>/.ledger/on_policy_teacher.sqlite`, so a resumed run pays for none twice."""

    base_url: str = Field(
        ..., pattern=r"^https?://", description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."
    )
    model: str = Field(..., min_length=1, description="The served model name (vLLM's --served-model-name).")
    top_k: int = Field(
        20, ge=1, le=1000, description="Logprobs per position (`prompt_logprobs`); the loss compares "
        "k + 1 classes (top-k and a tail bucket). vLLM caps it at its --max-logprobs (default 20)."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (unset: the key 'EMPTY')."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per scoring request.")
    timeout_s: float = Field(120.0, gt=0.0, le=3600.0, description="Seconds per request before a retry.")
    max_retries: int = Field(
        3, ge=0, le=20, description="Retries of connection errors, 408/409/429 and 5xx (with backoff)."
    )


class TrainingConfig(StrictModel):
    """How the student is trained with DeepSpeed ZeRO: the data, the student (a model
    directory or derived from the teacher), the objective (sft, kd_topk, kd_logits,
    hidden-state matching, on-policy) and its loss weights, the optimiser, and checkpoints."""

    # --- data --------------------------------------------------------------------------
    dataset_dir: Path = Field(
        ..., description="A distillflow dataset directory; its `data/*.parquet` shards are read."
    )
    output_dir: Path = Field(
        ...,
        description="Run directory: metrics.jsonl, metrics.json, checkpoints/ and final/ "
        "(the exported student).",
    )
    system_prompt: str | None = Field(
        None, description="System message put before every prompt by the chat template."
    )
    chat_template: ChatTemplateSetting = Field(
        None,
        description="Chat template of the student's tokenisation: a preset (plain), a Jinja string or a "
        "file; it is saved with the exported student. Default: the top-level chat_template, else the "
        "student tokenizer's own (a base model has none: set one).",
    )
    chat_template_stop: StopStrings = Field(None, description=CHAT_TEMPLATE_STOP_HELP + " Used where the student generates (mining, on_policy sampling).")
    max_length: int = Field(
        1024, ge=8, le=1_048_576, description="Tokens per example (prompt + response); longer "
        "examples are truncated (the prompt is cut from the left, then the response)."
    )
    packing: bool = Field(
        False,
        description="Concatenate examples into rows of max_length tokens (attention is kept "
        "inside each example through position ids).",
    )
    tokenized_cache_dir: Path | None = Field(
        None,
        description="Where tokenised datasets are cached (key: tokenizer + data hash + "
        "max_length + system prompt). Default: <output_dir>/tokenized; point several runs "
        "(a sweep) at one directory to share it.",
    )
    topk_column: str = Field(
        "teacher_topk", description="Column with the teacher top-k logprobs (kd_topk)."
    )
    holdout_fraction: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Skip the rows of the held-out split (storage.dataset.is_heldout on the row `id`) "
        "so evaluation measures unseen rows. Unset: evaluation.heldout.fraction when the config "
        "evaluates a held-out split of this dataset, else 0 (train on every row).",
    )

    # --- models ------------------------------------------------------------------------
    student: Path | None = Field(
        None, description="Student: a Hugging Face model directory (with its tokenizer)."
    )
    derive_student: DeriveStudentConfig | None = Field(
        None, description="Or: derive the student from the teacher (needs `teacher`)."
    )
    teacher: Path | None = Field(
        None,
        description="Teacher model directory. Needed by kd_logits and hidden (forward pass) "
        "and by derive_student; for kd_topk its tokenizer (a tokenizer-only directory is "
        "enough) is compared with the student's before training.",
    )
    teacher_zero3_inference: bool = Field(
        False,
        description="Partition the teacher's weights across processes with ZeRO-3 inference "
        "(no optimizer state either way). For teachers that do not fit one process.",
    )
    teacher_deepspeed_config: Path = Field(
        DEEPSPEED_CONFIG_DIR / "zero3_inference.json",
        description="DeepSpeed JSON of the teacher when teacher_zero3_inference is on "
        "(ZeRO-3, no optimizer).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Training precision (bfloat16 also sets bf16 in DeepSpeed)."
    )

    # --- objective ---------------------------------------------------------------------
    objective: Objective = Field(
        "sft",
        description="sft: cross-entropy on the teacher's text (black box, any tokenizer); "
        "kd_logits: KL/JSD to an in-process teacher's logits; kd_topk: KL to the teacher "
        "top-k logprobs stored in the dataset; kd_greybox: KL to the teacher's API top-k logprobs "
        "that `distill build` stored (teacher.generation.top_logprobs), aligned to the student's "
        "tokens on byte spans, for any student tokenizer; hidden: hidden-state matching + a logit loss; "
        "on_policy: a share lmbda of the micro-batches are answers the student samples itself, "
        "scored token by token by the teacher (in process, or teacher_server).",
    )
    divergence: Divergence = Field(
        "forward_kl",
        description="forward_kl = KL(teacher||student) (mode covering), reverse_kl = "
        "KL(student||teacher) (mode seeking), jsd = generalised JSD(beta).",
    )
    beta: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="JSD interpolation: mixture M = beta*teacher + (1-beta)*student. beta=0 "
        "is forward KL, beta=1 is reverse KL (the convention of TRL's GKD).",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Softmax temperature T of both models in the KD "
        "term; the KD term is multiplied by T^2 so its gradients keep their scale."
    )
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="loss = alpha * KD + (1 - alpha) * cross-entropy (KD objectives; sft "
        "is pure cross-entropy)."
    )
    hidden_layer_pairs: list[tuple[int, int]] = Field(
        default_factory=list,
        description="hidden: (teacher_layer, student_layer) pairs of hidden states to match "
        "(0 = embeddings output, i = output of block i). Empty: last layers of both.",
    )
    hidden_loss: Literal["mse", "cosine"] = Field(
        "mse", description="hidden: distance between projected student and teacher states."
    )
    hidden_weight: float = Field(
        1.0, ge=0.0, le=1000.0, description="hidden: weight of the hidden-state term added to "
        "the logit loss (alpha * KD + (1 - alpha) * CE)."
    )
    lmbda: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="on_policy: the share of student-generated answers, i.e. the probability that "
        "a micro-batch's answers are replaced by answers the student samples for the same prompts "
        "(0 = the dataset's teacher answers only, as kd_logits; 1 = always the student's own). "
        "TRL GKD's name.",
    )
    sampling_temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="on_policy: temperature at which the student samples its answers."
    )
    max_new_tokens: int = Field(
        128, ge=1, le=65_536, description="on_policy: most tokens of a sampled answer (it stops "
        "earlier at eos); also capped so that prompt + answer fit max_length."
    )
    teacher_server: TeacherServerConfig | None = Field(
        None,
        description="on_policy: score with an OpenAI-compatible server's prompt logprobs (sparse "
        "top-k targets) instead of an in-process forward pass of `teacher` (full logits); "
        "`teacher` then only needs the tokenizer.",
    )
    loss_chunk_tokens: int = Field(
        128,
        ge=1,
        description="The loss (logits, softmaxes, their gradients) runs over this many tokens "
        "at a time, so the full [tokens x vocab] tensors never all live at once: at 128 the KD "
        "loss peaks at about 0.24x the memory of a plain full-vocabulary KL + cross-entropy "
        "at 1k tokens (0.03x at 8k; bench/kd_memory.py). Larger chunks trade memory for fewer, "
        "larger matmuls (on a GPU with a large vocabulary, 256-1024 can be faster).",
    )

    # --- optimisation ------------------------------------------------------------------
    micro_batch_size: int = Field(4, ge=1, le=65_536, description="Sequences per process per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65_536, description="Micro-steps per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up optimizer steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After warm-up: constant, or cosine decay to 10% at the last step."
    )
    epochs: float = Field(1.0, gt=0.0, le=10_000, description="Passes over the data (if max_steps is unset).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    seed: int = Field(0, description="Seed of initialisation, shuffling and the student derivation.")
    log_every: int = Field(1, ge=1, description="Print a progress line every N optimizer steps.")

    # --- DeepSpeed and processes ---------------------------------------------------------
    deepspeed_config: Path = Field(
        DEEPSPEED_CONFIG_DIR / "zero2.json",
        description="DeepSpeed JSON (see configs/deepspeed/: zero1, zero2, zero3, "
        "zero2_offload_optimizer, zero3_offload). Batch sizes, lr and precision are filled "
        "in from this config; everything else comes from the file.",
    )
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        None, description="Override zero_optimization.stage of the DeepSpeed JSON."
    )
    num_processes: int = Field(1, ge=1, le=4096, description="Processes on this node (torchrun).")
    master_port: int = Field(29511, ge=1024, le=65535, description="Rendezvous port of torchrun.")
    checkpoint_every: int = Field(
        0, ge=0, description="Save a DeepSpeed checkpoint every N optimizer steps (0 = only at the end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the latest N checkpoints.")
    resume: bool = Field(
        True,
        description="Continue from the latest checkpoint in output_dir/checkpoints if there is "
        "one (same data order, same loss curve as an uninterrupted run).",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.student is None and self.derive_student is None:
            raise ValueError(
                "set `student` (a model directory) or `derive_student` (with `teacher`) "
                "to say which student to train"
            )
        if self.student is not None and self.derive_student is not None:
            raise ValueError("set only one of `student` and `derive_student`")
        needs_teacher = self.objective in ("kd_logits", "hidden", "on_policy") or self.derive_student is not None
        if needs_teacher and self.teacher is None:
            raise ValueError(
                f"objective {self.objective!r}"
                + (" with derive_student" if self.derive_student is not None else "")
                + " needs a teacher model directory: set `teacher`"
            )
        if self.teacher_server is not None and self.objective != "on_policy":
            raise ValueError(
                f"teacher_server is read by objective on_policy only (objective is {self.objective!r}); "
                "remove it, or set objective: on_policy"
            )
        if self.objective == "on_policy" and self.packing:
            raise ValueError(
                "objective on_policy samples one answer per prompt, which packed rows cannot hold: "
                "set packing: false"
            )
        if self.objective == "on_policy" and self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be below max_length ({self.max_length}) "
                "so that a prompt fits before the sampled answer; lower max_new_tokens"
            )
        for teacher_layer, student_layer in self.hidden_layer_pairs:
            if teacher_layer < 0 or student_layer < 0:
                raise ValueError("hidden_layer_pairs take non-negative layer indices (0 = embeddings)")
        return self

    @property
    def teacher_in_process(self) -> bool:
        """Objectives that run the teacher's forward pass in the training processes."""
        return self.objective in ("kd_logits", "hidden") or (
            self.objective == "on_policy" and self.teacher_server is None
        )

    @property
    def is_white_box(self) -> bool:
        """Objectives that compare against teacher logits (so need matching vocabularies)."""
        return self.objective not in ("sft", "kd_greybox")
