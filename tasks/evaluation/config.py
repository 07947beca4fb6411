"""Config of `distill eval` (the `evaluation:` section): one strict pydantic model.

Every key is documented in docs/evaluation.md; unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distillflow.base_config import StrictModel
from distillflow.prompts.config import ADVERSARIAL_KINDS, EDGE_CASE_KINDS
from distillflow.training.config import CHAT_TEMPLATE_STOP_HELP, ChatTemplateSetting, StopStrings

CheckName = Literal["exact", "contains", "numeric", "regex", "choice", "json", "one_of"]

# Perturbations a robustness test can use: the project's own prompt generators.
PERTURBATION_NAMES: tuple[str, ...] = (*ADVERSARIAL_KINDS, *EDGE_CASE_KINDS)


def _env_name(value: str | None) -> str | None:
    if value is not None and (value.startswith(("sk-", "sk_")) or len(value) > 64 or " " in value):
        raise ValueError(
            "api_key_env takes the NAME of an environment variable (e.g. OPENAI_API_KEY), "
            "not the key itself; export the key and put the variable's name here"
        )
    return value


class EvalModel(StrictModel):
    """One model to evaluate: exactly one of `path`, `teacher: true` or `base_url` + `model`."""

    name: str = Field(..., min_length=1, description="Label of the model in the records, report and table.")
    path: Path | None = Field(
        None, description="A Hugging Face model directory (with its tokenizer), run in-process, greedy."
    )
    teacher: bool = Field(
        False,
        description="Evaluate the config's own `teacher:` (backend openai: through the build's client and "
        "ledger, with the teacher's own generation settings, so no answer is paid twice; backend local: "
        "in-process, greedy).",
    )
    base_url: str | None = Field(None, description="An OpenAI-compatible endpoint (e.g. http://host:8000/v1).")
    model: str | None = Field(None, description="Served model name at `base_url`.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="NAME of the env var (or `prefect-secret:BLOCK`) holding the endpoint's key; null for a "
        "server without auth.",
    )
    max_concurrency: int = Field(16, ge=1, le=4096, description="Requests in flight to the endpoint.")
    system_prompt: str | None = Field(
        None, description="System message before every prompt (in-process and endpoint models)."
    )
    chat_template: ChatTemplateSetting = Field(
        None,
        description="`path` models: chat template (preset, Jinja string or file). Default: the top-level "
        "chat_template, else the tokenizer's own (a trained student carries the one it was trained with).",
    )
    chat_template_stop: StopStrings = Field(
        None,
        description="`path` models. " + CHAT_TEMPLATE_STOP_HELP + " A model whose own template is a preset's "
        "(a student trained with one) stops at the preset's.",
    )

    @field_validator("api_key_env")
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        return _env_name(value)

    @model_validator(mode="after")
    def _one_kind(self) -> EvalModel:
        kinds = [self.path is not None, self.teacher, self.base_url is not None]
        if sum(kinds) != 1:
            raise ValueError(
                f"model {self.name!r}: give exactly one of `path` (a model directory), `teacher: true` "
                "or `base_url` + `model` (an OpenAI-compatible endpoint)"
            )
        if self.base_url is not None and not self.model:
            raise ValueError(f"model {self.name!r}: an endpoint needs `model` (the served model name)")
        if self.base_url is None and self.model is not None:
            raise ValueError(f"model {self.name!r}: `model` goes with `base_url`; for a directory use `path`")
        return self

    @property
    def kind(self) -> Literal["path", "teacher", "endpoint"]:
        if self.path is not None:
            return "path"
        return "teacher" if self.teacher else "endpoint"


class EvalSet(StrictModel):
    """One file of evaluation questions with their expected answers and how an answer
    is checked."""

    path: Path = Field(
        ...,
        description="A .jsonl or .parquet file with a `prompt` column and optional `reference`, `check` "
        "and `protect` (list of substrings perturbations keep verbatim).",
    )
    name: str | None = Field(None, description="Label in the records and report (default: the file's stem).")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")
    check: CheckName | None = Field(
        None, description="Check of rows without a `check` column value (default: exact when a reference is given)."
    )

    @field_validator("path")
    @classmethod
    def _readable_kind(cls, value: Path) -> Path:
        if value.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"{value}: use a .jsonl or .parquet file")
        return value

    @property
    def label(self) -> str:
        return self.name or self.path.stem


class HeldoutConfig(StrictModel):
    """Rows of the training dataset held out by a hash of their id: training skips
    them, evaluation compares the student's answers with the teacher's."""

    dataset_dir: Path | None = Field(
        None, description="Dataset written by `distill build` (default: the config's output_dir)."
    )
    fraction: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="Share of rows held out, chosen by a stable hash of the row `id` "
        "(storage.dataset.is_heldout); training skips the same rows (training.holdout_fraction).",
    )
    max_rows: int | None = Field(256, ge=1, description="Evaluate at most this many held-out rows (null: all).")


class RobustnessConfig(StrictModel):
    """The eval questions again, perturbed by the project's adversarial and edge-case
    generators (the answer-bearing spans kept verbatim)."""

    perturbations: list[str] = Field(
        default_factory=lambda: ["typo", "whitespace", "casing", "distractor"],
        description=f"Perturbations applied to every eval-set prompt, by name: {', '.join(PERTURBATION_NAMES)}.",
    )
    severity: float = Field(0.5, ge=0.0, le=1.0, description="0 = lightest, 1 = heaviest perturbation of each kind.")
    seed: int = Field(0, description="Seed of the perturbations (the same seed gives the same perturbed prompts).")
    per_prompt: int = Field(1, ge=1, le=100, description="Perturbed variants per prompt and perturbation.")

    @field_validator("perturbations")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in PERTURBATION_NAMES]
        if unknown:
            raise ValueError(f"unknown perturbation(s) {unknown}; choose from {list(PERTURBATION_NAMES)}")
        if len(set(value)) != len(value):
            raise ValueError("a perturbation is listed twice; list each once")
        return value


class JudgeConfig(StrictModel):
    """A pairwise judge (any OpenAI-compatible model) comparing each model's answer with
    the reference model's, in both orders."""

    base_url: str = Field(..., description="OpenAI-compatible endpoint of the judge model.")
    model: str = Field(..., description="Served name of the judge model.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="NAME of the env var holding the judge's key; null for no auth."
    )
    max_prompts: int = Field(50, ge=1, description="Judge at most this many prompts per model (clean eval sets first).")
    reference_model: str | None = Field(
        None,
        description="The model entry every other model is compared with (default: evaluation.reference_model).",
    )
    max_concurrency: int = Field(8, ge=1, le=1024, description="Judge requests in flight.")
    max_tokens: int = Field(8, ge=1, description="Completion budget of a verdict (A, B or TIE).")
    price_per_million_prompt_tokens: float | None = Field(None, ge=0, description="For the judge's cost estimate.")
    price_per_million_completion_tokens: float | None = Field(None, ge=0, description="For the judge's cost estimate.")

    @field_validator("api_key_env")
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        return _env_name(value)


class SpeedConfig(StrictModel):
    """Inference speed: tokens per second and latency percentiles at each batch size."""

    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 32], min_length=1, description="Batch sizes at which generation is timed."
    )
    prompts: int = Field(32, ge=1, description="Prompts generated per batch size (eval-set prompts, repeated).")
    max_new_tokens: int = Field(
        32, ge=1, description="Tokens generated per prompt (end-of-sequence ignored, so every run makes this many)."
    )
    warmup: int = Field(1, ge=0, description="Untimed batches before the timed ones, per batch size (first round).")
    repeats: int = Field(
        5, ge=1, le=100,
        description="Rounds; each times every in-process model in turn, and each model's figure is the median over rounds.",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError("batch sizes must be >= 1")
        return sorted(set(value))


class SpreadConfig(StrictModel):
    """Questions with several right answers (check `one_of`): sample each in-process model
    several times and report, per family, the share of right samples (validity) and how many
    of the right answers its samples cover (spread)."""

    samples: int = Field(8, ge=2, le=256, description="Sampled answers per question.")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature (1.0: the model's own distribution).")


class EvalGenerationConfig(StrictModel):
    """How evaluated model directories generate their answers (greedy)."""

    max_tokens: int = Field(64, ge=1, description="Answer token budget (greedy decoding).")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call of an in-process model.")
    device: str = Field("auto", description="In-process models: auto, cpu, cuda, cuda:N.")
    max_length: int = Field(2048, ge=8, description="Token limit of (prompt + answer) for cross-entropy.")


class EvalConfig(StrictModel):
    """What `distill eval` measures: which models, on which questions (eval sets, the
    held-out split), robustness to adversarial variants, a pairwise judge, and speed."""

    output_dir: Path = Field(..., description="Where records.jsonl, report.json, report.md and chart.png go.")
    models: list[EvalModel] = Field(..., min_length=1, description="The models to evaluate, in table order.")
    eval_sets: list[EvalSet] = Field(default_factory=list, description="Prompt files with references.")
    heldout: HeldoutConfig | None = Field(
        None, description="Held-out split of the built dataset; the teacher's answers are the references."
    )
    robustness: RobustnessConfig | None = Field(
        None, description="Perturbed copies of every eval-set prompt (null: none)."
    )
    judge: JudgeConfig | None = Field(None, description="Pairwise judge of each model against the reference model.")
    speed: SpeedConfig | None = Field(
        default_factory=SpeedConfig, description="Tokens/s and latency of in-process models (null: skip)."
    )
    generation: EvalGenerationConfig = Field(
        default_factory=EvalGenerationConfig, description="Greedy answer generation."
    )
    spread: SpreadConfig | None = Field(
        None, description="Validity and spread of sampled answers to `one_of` questions (null: skip)."
    )
    reference_model: str | None = Field(
        None,
        description="The teacher among `models` (speed-up and judge baseline); default: the `teacher: true` entry.",
    )

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        names = [model.name for model in self.models]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"models: names {repeated} are used twice; give every model its own name")
        if not self.eval_sets and self.heldout is None:
            raise ValueError("nothing to evaluate: add `eval_sets` and/or `heldout`")
        labels = [item.label for item in self.eval_sets]
        if len(set(labels)) != len(labels) or "heldout" in labels:
            raise ValueError("eval_sets: every set needs its own `name` (and `heldout` is reserved)")
        if self.reference_model is not None and self.reference_model not in names:
            raise ValueError(f"reference_model {self.reference_model!r} is not one of the models {names}")
        if self.judge is not None:
            reference = self.judge.reference_model or self.baseline_name
            if reference is None:
                raise ValueError("judge needs a reference: set judge.reference_model (or a `teacher: true` model)")
            if reference not in names:
                raise ValueError(f"judge.reference_model {reference!r} is not one of the models {names}")
        return self

    @property
    def baseline_name(self) -> str | None:
        """The teacher among the models: `reference_model`, else the `teacher: true` entry."""
        if self.reference_model is not None:
            return self.reference_model
        return next((model.name for model in self.models if model.teacher), None)

    @property
    def judge_reference(self) -> str | None:
        if self.judge is None:
            return None
        return self.judge.reference_model or self.baseline_name
