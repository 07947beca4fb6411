"""The one typed config of a distillflow run (YAML → pydantic), validated once, up front.

Relative paths in a config resolve against the current working directory, like every
other path given on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillflow.prompts.config import PromptsConfig
from distillflow.tasks.capture_config import CaptureConfig
from distillflow.tasks.eval_config import EvalConfig
from distillflow.tasks.filter_config import FiltersConfig
from distillflow.tasks.mining_config import MiningConfig
from distillflow.tasks.sweep_config import SweepConfig
from distillflow.training.config import ChatTemplateSetting, TrainingConfig


class ConfigError(ValueError):
    """A config or input problem, with a message that names the file, the key and the fix."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SEED_FORMATS = ("jsonl", "json", "parquet", "csv", "hf_disk")


class SeedSource(StrictModel):
    """One file of seed prompts (`seeds:` is a list of these, read in order)."""

    path: Path = Field(description="A .jsonl/.json/.parquet/.csv file or a datasets.save_to_disk directory.")
    prompt_column: str = Field("prompt", description="Column holding the prompt text.")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "hf_disk"] = Field(
        "auto", description="File format; `auto` decides from the suffix (or a directory → hf_disk)."
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many rows from this file.")


class GenerationConfig(StrictModel):
    """Sampling settings sent with every teacher request."""

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest token set with this much probability.")
    max_tokens: int = Field(512, ge=1, description="Completion token budget per answer.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Capture top-k logprobs per token (0 = off).")
    seed: int | None = Field(None, description="Per-request sampling seed, if the server supports it.")
    stop: list[str] | None = Field(None, description="Strings that end an answer (the server stops before them).")


class TeacherConfig(StrictModel):
    """The teacher that answers the prompts: an OpenAI-compatible server (vLLM, a
    commercial API) or a model directory run in-process; how hard to drive it and when
    to give up."""

    backend: Literal["openai", "local"] = Field(
        "openai", description="openai: any OpenAI-compatible URL; local: in-process transformers."
    )
    base_url: str | None = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible base URL.")
    model: str = Field(..., description="Served model name (openai) or a model directory (local).")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="NAME of the env var (or `prefect-secret:BLOCK`) holding the key — never the key.",
    )
    max_concurrency: int = Field(32, ge=1, le=4096, description="Requests in flight at once (over all client processes).")
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side request rate limit (null = none).")
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Client-side limit on prompt + max_tokens per minute (null = none)."
    )
    max_retries: int = Field(
        6,
        ge=0,
        le=50,
        description="Retries per request after a timeout, connection error, 429 or 5xx "
        "(exponential backoff; Retry-After is honoured).",
    )
    timeout_s: float = Field(120.0, gt=0, description="Seconds one request may take before it is retried.")
    first_contact_s: float = Field(
        20.0,
        gt=0,
        description="Until the teacher has answered once, its first prompt retries for at most this "
        "long; if a second prompt fails too (or the first timed out) the run stops with an error "
        "naming the URL and the fix (see docs/reliability.md).",
    )
    max_error_rate: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Largest fraction of the prompts the teacher may fail to answer (after retries: "
        "connection, timeout, 429, 5xx, malformed) before the run stops; below it the manifest's "
        "`teacher_failures` says how many failed and why. 1.0 = never stop for failures.",
    )
    client_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes issuing teacher requests (each with max_concurrency/N in flight): raise it "
        "when the teacher answers faster than one core can ask (~500 requests/s per process).",
    )
    http_backend: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="HTTP transport under the openai client: aiohttp (the SDK's high-concurrency "
        "transport, about 1.5x less CPU per request) or httpx (the SDK's default).",
    )
    system_prompt: str | None = Field(None, description="System message sent before every prompt (null = none).")
    chat_template: ChatTemplateSetting = Field(
        None,
        description="backend local: the chat template the model answers with (a preset: plain; a Jinja "
        "string; or a file). Default: the top-level chat_template, else the tokenizer's own. A base "
        "model has none and needs one (docs/base_models.md). backend openai: the server applies its "
        "own (vLLM: --chat-template).",
    )
    batch_size: int = Field(512, ge=1, description="Prompts per Prefect task (async I/O inside).")
    local_batch_size: int = Field(8, ge=1, description="Sequences per forward pass (local backend).")
    device: str = Field("auto", description="local backend: auto, cpu, cuda, cuda:N.")
    price_per_million_prompt_tokens: float | None = Field(None, ge=0, description="For the cost estimate.")
    price_per_million_completion_tokens: float | None = Field(None, ge=0, description="For the cost estimate.")
    generation: GenerationConfig = GenerationConfig()

    @field_validator("api_key_env")
    @classmethod
    def _looks_like_a_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith(("sk-", "sk_")) or len(value) > 64 or " " in value:
            raise ValueError(
                "api_key_env takes the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                "not the key itself; export the key and put the variable's name here"
            )
        return value

    @model_validator(mode="after")
    def _base_url_for_openai(self) -> TeacherConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("teacher.base_url is required when teacher.backend is 'openai'")
        if self.backend == "openai" and self.chat_template is not None:
            raise ValueError(
                "teacher.chat_template applies to backend: local; an OpenAI-compatible server applies "
                "its own template (vLLM: --chat-template FILE), so remove it here"
            )
        return self

    @property
    def is_local(self) -> bool:
        return self.backend == "local"


class DistillConfig(StrictModel):
    """One run: where the seeds are, how prompts are made, which teacher answers them, how
    the answers are filtered, and (optionally) how a student is trained, evaluated, swept
    and improved with mined prompts."""

    name: str = Field(..., min_length=1, description="Dataset / run name.")
    output_dir: Path = Field(..., description="Where the dataset (and the ledger) is written.")
    license: str | None = Field(
        None,
        description="License of the dataset, as a Hugging Face Hub license id (e.g. apache-2.0, cc-by-4.0, "
        "other); written into the dataset card's YAML header.",
    )
    seeds: list[SeedSource] = Field(..., min_length=1)
    prompts: PromptsConfig = PromptsConfig()
    teacher: TeacherConfig
    chat_template: ChatTemplateSetting = Field(
        None,
        description="The chat template of every model this run loads in-process (local teacher, logit "
        "capture, training, evaluated model directories), unless its section sets its own: a preset "
        "(plain), a Jinja string or a file. Default: each tokenizer's own. One setting, so that the "
        "captured teacher logits line up with the tokens the student is trained on.",
    )
    filters: FiltersConfig = FiltersConfig()
    training: TrainingConfig | None = None
    evaluation: EvalConfig | None = None
    capture: CaptureConfig | None = None
    sweep: SweepConfig | None = None
    mining: MiningConfig | None = None

    @model_validator(mode="after")
    def _chat_template_shared(self) -> DistillConfig:
        """Sections without their own chat_template take the top-level one (capture then follows
        training, in tasks.capture_logits.resolve_capture_settings)."""
        shared = self.chat_template
        if shared is None:
            return self
        if self.teacher.is_local and self.teacher.chat_template is None:
            self.teacher.chat_template = shared
        if self.training is not None and self.training.chat_template is None:
            self.training.chat_template = shared
        for model in self.evaluation.models if self.evaluation is not None else []:
            if model.path is not None and model.chat_template is None:
                model.chat_template = shared
        return self

    @model_validator(mode="after")
    def _holdout_agrees(self) -> DistillConfig:
        """Training skips the rows evaluation holds out: training.holdout_fraction follows
        evaluation.heldout.fraction when the held-out split is taken from the training data."""
        heldout = self.evaluation.heldout if self.evaluation is not None else None
        if self.training is None or heldout is None:
            return self
        heldout_dir = heldout.dataset_dir or self.output_dir
        if Path(heldout_dir).resolve() != Path(self.training.dataset_dir).resolve():
            return self
        if self.training.holdout_fraction is None:
            self.training.holdout_fraction = heldout.fraction
        elif self.training.holdout_fraction != heldout.fraction:
            raise ValueError(
                f"training.holdout_fraction ({self.training.holdout_fraction}) differs from "
                f"evaluation.heldout.fraction ({heldout.fraction}) on the same dataset, so the student "
                "would train on rows it is evaluated on (or skip rows for nothing); set both to the "
                "same value, or remove training.holdout_fraction"
            )
        return self

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-able data; holds no secret (keys are only env var names)."""
        return self.model_dump(mode="json")


def format_validation_error(path: Path | str, error: ValidationError, section: str | None = None) -> str:
    """One line per problem, each naming the key (prefixed with `section`, if given) and the fix."""
    label = f"invalid {section} config" if section else "invalid config"
    lines = [f"{path}: {label} ({error.error_count()} problem(s)):"]
    for item in error.errors():
        parts = [section] if section else []
        key = ".".join([*parts, *(str(part) for part in item["loc"])]) or "<top level>"
        kind = item["type"]
        if kind == "extra_forbidden":
            lines.append(f"  - {key}: unknown key; remove it or check its spelling")
        elif kind == "missing":
            lines.append(f"  - {key}: required key is missing; add it")
        else:
            lines.append(f"  - {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: Path | str = "<config>") -> DistillConfig:
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None


def read_yaml(path: Path) -> Any:
    """The parsed YAML of a config file; a ConfigError naming the file when it is missing or broken."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass the path of a YAML config")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_config(path: str | Path, check_files: bool = True) -> DistillConfig:
    """Read and validate a YAML config; with `check_files`, also that every seed file exists."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (name, output_dir, seeds, ...)")
    config = parse_config(data, path)
    if check_files:
        for index, seed in enumerate(config.seeds):
            if not seed.path.exists():
                raise ConfigError(
                    f"{path}: seeds.{index}.path: {seed.path} does not exist "
                    f"(relative paths resolve against {Path.cwd()}); fix the path"
                )
    return config


def load_training_config(path: str | Path) -> TrainingConfig:
    """The `training:` section of a distillflow YAML, or a YAML that is only that section.

    A full config (with `seeds:`) is validated as a whole, which fills in
    training.holdout_fraction from evaluation.heldout, as every other command sees it.
    """
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a `training:` section")
    if "training" in data and "seeds" in data:
        training = parse_config(data, path).training
        if training is None:
            raise ConfigError(f"{path}: the `training:` section is empty; fill it in (see configs/ for examples)")
        return training
    section = data["training"] if "training" in data else data
    if section is None:
        raise ConfigError(f"{path}: the `training:` section is empty; fill it in (see configs/ for examples)")
    try:
        return TrainingConfig.model_validate(section)
    except ValidationError as error:
        raise ConfigError(format_validation_error(path, error, section="training")) from None
