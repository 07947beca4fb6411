"""The one typed config of a distillflow run (YAML → pydantic), validated once, up front.

Relative paths in a config resolve against the current working directory, like every
other path given on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from distillflow.base_config import StrictModel
from distillflow.prompts.config import DOMAIN_PACKS, FAMILIES, PromptsConfig
from distillflow.schedule_config import ScheduleConfig
from distillflow.tasks.capture.config import CaptureConfig
from distillflow.tasks.evaluation.config import EvalConfig
from distillflow.tasks.filters.config import FiltersConfig
from distillflow.tasks.mining.config import MiningConfig
from distillflow.tasks.sweep.config import SweepConfig, point_problems
from distillflow.training.chat_template import turn_stops
from distillflow.training.config import (
    CHAT_TEMPLATE_STOP_HELP,
    ChatTemplateSetting,
    StopStrings,
    TrainingConfig,
    check_sampled_capture,
    check_stops_have_a_template,
)

SectionModel = TypeVar("SectionModel", bound=BaseModel)


class ConfigError(ValueError):
    """A config or input problem, with a message that names the file, the key and the fix."""


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
    stop: StopStrings = Field(
        None,
        description="Strings that end an answer (the server stops before them), besides the chat template's "
        "turn end (chat_template_stop).",
    )


class PricingConfig(StrictModel):
    """The teacher's price table, for the cost in the manifest, the dry run and the budget."""

    input_per_mtok: float = Field(..., ge=0, description="USD per million input (prompt) tokens.")
    output_per_mtok: float = Field(..., ge=0, description="USD per million output (completion) tokens.")
    batch_discount: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Fraction taken off both prices for requests sent through the Batch API "
        "(teacher.mode: batch); OpenAI's is 0.5.",
    )

    def cost_usd(self, input_tokens: float, output_tokens: float, batch: bool = False) -> float:
        """What `input_tokens` in and `output_tokens` out cost, in USD."""
        full = (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6
        return full * (1.0 - self.batch_discount) if batch else full


class BatchModeConfig(StrictModel):
    """teacher.mode: batch — the OpenAI Batch API (files + batches, results within 24 h)."""

    max_requests_per_file: int = Field(
        50_000, ge=1, le=50_000, description="Requests per uploaded JSONL file (the API allows 50,000)."
    )
    max_file_mb: float = Field(
        190.0, gt=0, le=200.0, description="Size cap of one uploaded JSONL file in MB (the API allows 200)."
    )
    poll_interval_s: float = Field(30.0, gt=0, description="Seconds between two status checks of a batch.")
    max_wait_s: float = Field(
        26 * 3600.0,
        gt=0,
        description="Stop waiting for batches after this long (the run fails naming them; a rerun resumes "
        "polling the same batches, recorded in the ledger).",
    )
    max_resubmits: int = Field(
        2, ge=0, le=20, description="Rounds of new batches for requests that failed (5xx, expired) in a batch."
    )


class TeacherConfig(StrictModel):
    """The teacher that answers the prompts: an OpenAI-compatible server (vLLM, a
    commercial API) or a model directory run in-process; how hard to drive it and when
    to give up."""

    backend: Literal["openai", "local"] = Field(
        "openai", description="openai: any OpenAI-compatible URL; local: in-process transformers."
    )
    base_url: str | None = Field(
        "http://127.0.0.1:8000/v1",
        description="OpenAI-compatible base URL. A list of URLs (replicas serving the same model) is "
        "accepted: the first becomes base_url, the others `replicas`.",
    )
    replicas: list[str] = Field(
        default_factory=list,
        description="More base URLs serving the same model: a build spreads its requests over base_url "
        "and these (max_concurrency each), takes a replica that keeps failing out of rotation with a "
        "warning, and stops only when every replica is dead (docs/scaling.md).",
    )
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
        "when the teacher answers faster than one core can ask (~1,000 requests/s per process on a fast "
        "server). With 1, a build of 4,096 prompts or more issues them from one process of its own, "
        "smaller builds from the flow's process.",
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
    chat_template_stop: StopStrings = Field(
        None,
        description=CHAT_TEMPLATE_STOP_HELP + " backend openai: where a turn of the template the server applies "
        "ends (sent as `stop` with generation.stop). Answers already in the ledger are cut at these too, never "
        "asked again.",
    )
    batch_size: int = Field(
        2000,
        ge=1,
        description="Prompts per Prefect task (async I/O inside; a few tasks are in flight, so concurrency "
        "never drains between them). Each task run is bookkeeping on the Prefect server: larger batches "
        "leave more CPU to the requests. The online build's first batch is smaller (256 prompts, at least "
        "max_concurrency), so the first requests go out at once.",
    )
    local_batch_size: int = Field(8, ge=1, description="Sequences per forward pass (local backend).")
    device: str = Field("auto", description="local backend: auto, cpu, cuda, cuda:N.")
    pricing: PricingConfig | None = Field(
        None,
        description="Price table (input_per_mtok, output_per_mtok, batch_discount): the manifest's cost, "
        "`distill build --dry-run`'s estimate and max_budget_usd use it.",
    )
    max_budget_usd: float | None = Field(
        None,
        gt=0,
        description="Most this run may pay the teacher (needs pricing). Before each request its worst case "
        "(prompt + max_tokens) is reserved; a request that would pass the budget is not sent and the run "
        "stops cleanly (manifest: stopped_by: budget). Answers from the ledger cost nothing.",
    )
    max_total_tokens: int | None = Field(
        None,
        ge=1,
        description="Most input + output tokens this run may use, checked like max_budget_usd.",
    )
    tokenizer: str | None = Field(
        None,
        description="A tokenizer directory (or a name in the local Hugging Face cache) for the dry run's "
        "token counts; default: the model directory of a local teacher, else about 4 characters a token.",
    )
    mode: Literal["online", "batch"] = Field(
        "online",
        description="online: one chat request per prompt; batch: the OpenAI Batch API (cheaper, results "
        "within 24 h; settings under teacher.batch).",
    )
    batch: BatchModeConfig = Field(BatchModeConfig(), description="Settings of mode: batch.")
    adaptive_rate_limit: bool = Field(
        True,
        description="Read the x-ratelimit-remaining/-reset and Retry-After headers of every answer and slow "
        "every worker down before the API refuses (docs/teachers.md).",
    )
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="before")
    @classmethod
    def _base_url_list(cls, data: Any) -> Any:
        """`base_url: [url, ...]`: the first is base_url, the rest are replicas."""
        if isinstance(data, dict) and isinstance(data.get("base_url"), list):
            urls = [str(url) for url in data["base_url"]]
            if not urls:
                raise ValueError("teacher.base_url: an empty list; give one URL or a list of replica URLs")
            data = {**data, "base_url": urls[0], "replicas": urls[1:] + list(data.get("replicas") or [])}
        return data

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
        if self.max_budget_usd is not None and self.pricing is None:
            raise ValueError(
                "teacher.max_budget_usd needs teacher.pricing (input_per_mtok, output_per_mtok) to know what "
                "a request costs; add the price table, or use teacher.max_total_tokens"
            )
        if self.mode == "batch" and (self.backend != "openai" or self.client_processes > 1):
            raise ValueError(
                "teacher.mode: batch needs backend: openai and client_processes: 1 (a batch is one upload)"
            )
        if self.backend == "openai" and self.chat_template is not None:
            raise ValueError(
                "teacher.chat_template applies to backend: local; an OpenAI-compatible server applies "
                "its own template (vLLM: --chat-template FILE), so remove it here"
            )
        return self

    @property
    def is_local(self) -> bool:
        return self.backend == "local"

    @property
    def stops(self) -> list[str]:
        """Where an answer ends: the chat template's turn end (chat_template_stop, else its
        preset's), then generation.stop; each once. Empty for an instruct model's own template."""
        stops = [*turn_stops(self.chat_template, self.chat_template_stop), *(self.generation.stop or [])]
        return list(dict.fromkeys(stops))


class DatasetConfig(StrictModel):
    """How a build is cut into shards and spread over worker processes."""

    shard_rows: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="Prompts per shard of a build: each shard goes through the teacher and the response "
        "filters and is written (data/part-N.parquet, its rejects) as soon as it is done, so memory is "
        "bounded by one shard; a crashed build resumes at the first unfinished shard (docs/scaling.md).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=1024,
        description="Processes that answer shards in parallel, each with its own teacher client, "
        "through Prefect's Dask task runner (a local cluster, or `dask_address`); 1 = in this "
        "process (docs/scaling.md).",
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler address of an existing Dask cluster (tcp://host:8786) for `workers` > 1; "
        "null = a local cluster of `workers` processes. Every worker must see output_dir.",
    )
    work_pool: str | None = Field(
        None,
        min_length=1,
        description="A Prefect work pool whose workers answer the shards: each shard is one `build-shard` "
        "flow run, `workers` of them in flight (start workers with `prefect worker start --pool NAME --type "
        "process`). Needs a Prefect server (PREFECT_API_URL); every worker must see output_dir at the same path "
        "and have the teacher key's env var. null = this process, or Dask when `workers` > 1.",
    )
    worker_wait_s: float = Field(
        600.0,
        gt=0,
        description="How long a shard run may wait on `work_pool` for a worker to pick it up before the build "
        "fails, naming the pool and how to start a worker.",
    )

    @model_validator(mode="after")
    def _one_fan_out(self) -> DatasetConfig:
        if self.work_pool is not None and self.dask_address is not None:
            raise ValueError(
                "dataset.work_pool and dataset.dask_address both say where shards run; set one of them"
            )
        return self

    @property
    def fans_out(self) -> bool:
        """Whether shards are answered by other processes (Dask workers or a work pool)."""
        return self.workers > 1 or self.work_pool is not None


_STRATEGIES = PromptsConfig.model_fields["strategies"]
_DOMAINS = PromptsConfig.model_fields["domains"]


class PromptsSection(PromptsConfig):
    """How the prompt set is made from the seeds: the seeds themselves plus edge-case,
    adversarial, evolved and self-instruct variants, mixed by weight."""

    # The same checks as PromptsConfig's; the schema also names the allowed values, so that a
    # deployment's form offers them and the server refuses another before a run starts.
    strategies: dict[str, float] = Field(
        default_factory=_STRATEGIES.default_factory,  # type: ignore[arg-type]
        description=_STRATEGIES.description,
        json_schema_extra={"propertyNames": {"enum": list(FAMILIES)}, "additionalProperties": {"type": "number", "minimum": 0}},
    )
    domains: list[str] = Field(
        default_factory=_DOMAINS.default_factory,  # type: ignore[arg-type]
        description=_DOMAINS.description,
        json_schema_extra={"items": {"type": "string", "enum": sorted(DOMAIN_PACKS)}, "uniqueItems": True},
    )


class PipelineTrainingConfig(TrainingConfig):
    """How the student is trained with DeepSpeed ZeRO: the data (by default the dataset this
    config writes), the student (a model directory or derived from the teacher), the objective
    (sft, kd_topk, kd_logits, hidden-state matching, on-policy) and its loss weights, the
    optimiser, and checkpoints."""

    dataset_dir: Path | None = Field(  # type: ignore[assignment]
        None,
        description="A distillflow dataset directory; its `data/*.parquet` shards are read. Default: the "
        "dataset this config writes (capture.output_dir when a capture step feeds kd_topk training, else "
        "output_dir), so an edited output_dir carries into training.",
    )


@dataclass(frozen=True)
class StageDirs:
    """The directory each stage reads and writes. One rule for every stage: an explicit key
    wins, else the output of the stage before it, which starts at the config's output_dir."""

    dataset: Path  # output_dir: what the build writes
    capture_input: Path  # capture.input_dir, else output_dir
    capture_output: Path  # capture.output_dir, else capture_input (the columns are added in place)
    training_dataset: Path  # training.dataset_dir, else capture_output before kd_topk, else output_dir


def stage_dirs(config: DistillConfig) -> StageDirs:
    """The directories of `config`'s stages (see StageDirs for the rule)."""
    dataset = Path(config.output_dir)
    capture, training = config.capture, config.training
    capture_input = Path(capture.input_dir) if capture is not None and capture.input_dir else dataset
    capture_output = Path(capture.output_dir) if capture is not None and capture.output_dir else capture_input
    captured = capture is not None and training is not None and training.objective == "kd_topk"
    if training is not None and training.dataset_dir:
        training_dataset = Path(training.dataset_dir)
    else:
        training_dataset = capture_output if captured else dataset
    return StageDirs(dataset, capture_input, capture_output, training_dataset)


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
    seeds: list[SeedSource] = Field(
        [],
        description="The seed prompt files, read in order. Required by the stages that make prompts "
        "(`distill build`, `distill run`); a config that only captures, trains, evaluates or mines "
        "may leave it out.",
    )
    prompts: PromptsSection = PromptsSection()
    teacher: TeacherConfig
    chat_template: ChatTemplateSetting = Field(
        None,
        description="The chat template of every model this run loads in-process (local teacher, logit "
        "capture, training, evaluated model directories), unless its section sets its own: a preset "
        "(plain), a Jinja string or a file. Default: each tokenizer's own. One setting, so that the "
        "captured teacher logits line up with the tokens the student is trained on.",
    )
    chat_template_stop: StopStrings = Field(None, description=CHAT_TEMPLATE_STOP_HELP)
    filters: FiltersConfig = FiltersConfig()
    dataset: DatasetConfig = DatasetConfig()
    training: PipelineTrainingConfig | None = None
    evaluation: EvalConfig | None = None
    capture: CaptureConfig | None = None
    sweep: SweepConfig | None = None
    mining: MiningConfig | None = None
    schedule: ScheduleConfig | None = Field(
        None,
        description="When each Prefect deployment of this config runs by itself (`distill serve` / "
        "`distill deploy`): per deployment a cron or interval, a time zone and an active flag.",
    )

    def deployment_names(self) -> list[str]:
        """The deployments `distill serve` / `distill deploy` register for this config: build and
        run when it has seeds, each other stage when its section is present."""
        present = {
            "build": bool(self.seeds),
            "run": bool(self.seeds),
            "capture": self.capture is not None,
            "train": self.training is not None,
            "eval": self.evaluation is not None,
            "sweep": self.sweep is not None,
            "mine": self.mining is not None,
        }
        return [name for name in ("build", "capture", "train", "eval", "sweep", "mine", "run") if present[name]]

    @model_validator(mode="after")
    def _schedules_have_a_deployment(self) -> DistillConfig:
        if self.schedule is None:
            return self
        sections = {"build": "seeds", "run": "seeds", "capture": "capture", "train": "training", "eval": "evaluation",
                    "sweep": "sweep", "mine": "mining"}
        for name in self.schedule.entries():
            if name not in self.deployment_names():
                raise ValueError(
                    f"schedule.{name}: this config has no `{sections[name]}:` section, so there is no "
                    f"{name} deployment to schedule; add the section or remove schedule.{name}"
                )
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> DistillConfig:
        """A budget is kept by one process; shard workers would each spend the whole of it."""
        teacher = self.teacher
        limited = teacher.max_budget_usd is not None or teacher.max_total_tokens is not None
        if limited and teacher.replicas and teacher.client_processes > 1:
            raise ValueError(
                "teacher.max_budget_usd / max_total_tokens with teacher.replicas and client_processes > 1: "
                "each replica's client processes would hold a share of the whole budget. Use "
                "client_processes: 1 with replicas (the replicas share one budget)"
            )
        if self.dataset.fans_out and (limited or teacher.mode == "batch"):
            what = "teacher.mode: batch" if teacher.mode == "batch" else "teacher.max_budget_usd / max_total_tokens"
            where = (
                f"dataset.work_pool={self.dataset.work_pool!r}" if self.dataset.work_pool is not None
                else f"dataset.workers={self.dataset.workers}"
            )
            raise ValueError(
                f"{where} cannot be combined with {what}: the budget and the Batch API jobs are kept by one "
                "process. Use dataset.workers: 1 and no work_pool (teacher.client_processes spreads requests "
                "over processes and shares the budget)"
            )
        if self.dataset.work_pool is not None and teacher.is_local:
            raise ValueError(
                "dataset.work_pool with teacher.backend: local: an in-process model answers one batch at a time "
                "in this process; serve it (vLLM) and use backend: openai to spread shards over workers"
            )
        return self

    @model_validator(mode="after")
    def _chat_template_shared(self) -> DistillConfig:
        """Each section's template (its own, else the top-level one) has its declared turn end."""
        check_stops_have_a_template("", self.chat_template, self.chat_template_stop)
        for prefix, section in template_sections(self):
            template, stops = shared_chat_template(section, self.chat_template, self.chat_template_stop)
            check_stops_have_a_template(prefix, template, stops)
        return self

    @model_validator(mode="after")
    def _sampled_capture_trains_at_t1(self) -> DistillConfig:
        """kd_topk on the dataset this config's capture writes with method: sampled needs
        temperature 1 and forward_kl (training.config.check_sampled_capture)."""
        capture, training = self.capture, self.training
        if capture is None or training is None or capture.method != "sampled" or training.objective != "kd_topk":
            return self
        dirs = stage_dirs(self)
        if dirs.capture_output.resolve() == dirs.training_dataset.resolve():
            check_sampled_capture(training.temperature, training.divergence)
        return self

    @model_validator(mode="after")
    def _holdout_agrees(self) -> DistillConfig:
        """Training skips the rows evaluation holds out: a training.holdout_fraction that is set
        must be evaluation.heldout.fraction when the held-out split is taken from the training data."""
        fraction = heldout_fraction_of_training(self)
        training = self.training
        if training is None or fraction is None or training.holdout_fraction in (None, fraction):
            return self
        raise ValueError(
            f"training.holdout_fraction ({training.holdout_fraction}) differs from "
            f"evaluation.heldout.fraction ({fraction}) on the same dataset, so the student "
            "would train on rows it is evaluated on (or skip rows for nothing); set both to the "
            "same value, or remove training.holdout_fraction"
        )

    @model_validator(mode="after")
    def _capture_lines_up(self) -> DistillConfig:
        """Captured positions must be the ones training reads: same template, same max_length,
        and a tokenizer and a server to score them with."""
        capture, training = self.capture, self.training
        if capture is None:
            return self
        # kd_greybox aligns the teacher's own tokenisation with the student's on bytes at train
        # time (training.greybox): its positions need not line up.
        if training is not None and training.objective != "kd_greybox":
            training_template = shared_chat_template(training, self.chat_template, self.chat_template_stop)[0]
            if capture.chat_template is not None and capture.chat_template != training_template:
                raise ValueError(
                    f"capture.chat_template ({capture.chat_template!r}) differs from training.chat_template "
                    f"({training_template!r}); the captured positions would not line up with the "
                    "student's tokens, so use one setting (the top-level chat_template)"
                )
            if capture.max_length is not None and capture.max_length != training.max_length:
                raise ValueError(
                    f"capture.max_length ({capture.max_length}) differs from training.max_length "
                    f"({training.max_length}); positions would not line up, use the same value"
                )
        if capture.source == "vllm":
            known = training is not None and (training.teacher is not None or (
                training.student is not None and training.objective != "kd_greybox"))  # kd_greybox: the teacher's own
            if capture.tokenizer is None and not known:
                raise ValueError(
                    "capture.tokenizer is required with source: vllm (set it to the directory of "
                    "the tokenizer that teacher and student share; with kd_greybox, the teacher's)"
                )
            if not (capture.base_url or self.teacher.base_url):
                raise ValueError("capture.base_url (or teacher.base_url) is required with source: vllm")
        return self

    @model_validator(mode="after")
    def _mining_can_run(self) -> DistillConfig:
        """What `distill mine` needs from the rest of the config."""
        if self.mining is None:
            return self
        mining, training = self.mining, self.training
        dataset_dir, output_dir = mining_dirs(self)
        rules = [  # (broken, what to say), checked in order
            (output_dir.resolve() == dataset_dir.resolve(),
             "mining.output_dir is the dataset itself; the mined version needs its own directory"),
            (mining.student is None and training is None,
             "mining.student is not set and there is no `training:` section to find it in"),
            (mining.score == "kl" and not self.teacher.is_local,
             "mining.score kl needs the teacher's logits, so an in-process teacher (teacher.backend: local); "
             "use ce or disagreement with an endpoint teacher"),
            (mining.retrain != "none" and training is None,
             f"mining.retrain {mining.retrain} needs a `training:` section (or set retrain: none)"),
        ]
        for broken, message in rules:
            if broken:
                raise ValueError(message)
        return self

    @model_validator(mode="after")
    def _sweep_can_run(self) -> DistillConfig:
        """What `distill sweep` needs from the rest of the config."""
        sweep, training, evaluation = self.sweep, self.training, self.evaluation
        if sweep is None:
            return self
        if training is None:
            raise ValueError("`sweep:` needs a `training:` section (the settings each point starts from)")
        if evaluation is None:
            raise ValueError("`sweep:` needs an `evaluation:` section (how each point is scored)")
        if sweep.metric == "judge_win_rate" and evaluation.judge is None:
            raise ValueError("sweep.metric judge_win_rate needs evaluation.judge; add a judge or rank by clean_acc")
        if sweep.metric == "agreement" and evaluation.heldout is None:
            raise ValueError("sweep.metric agreement needs evaluation.heldout; add it or rank by clean_acc")
        problems = point_problems(training.model_copy(update={"dataset_dir": stage_dirs(self).training_dataset}), sweep)
        if problems is not None:
            raise ValueError(f"{problems}; change the value in sweep.grid or sweep.points")
        return self

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-able data; holds no secret (keys are only env var names)."""
        return self.model_dump(mode="json")


def template_sections(config: DistillConfig) -> list[tuple[str, Any]]:
    """(key prefix, section) of every section that loads a model with a chat template."""
    sections: list[tuple[str, Any]] = [("teacher.", config.teacher)] if config.teacher.is_local else []
    if config.training is not None:
        sections.append(("training.", config.training))
    if config.evaluation is not None:
        models = config.evaluation.models
        sections += [(f"evaluation.models.{i}.", model) for i, model in enumerate(models) if model.path is not None]
    return sections


def shared_chat_template(section: Any, shared: str | None, shared_stops: list[str] | None) -> tuple[str | None, list[str] | None]:
    """(chat_template, chat_template_stop) of a section: its own, else the top-level ones."""
    if shared is None or section.chat_template is not None:
        return section.chat_template, section.chat_template_stop
    stops = section.chat_template_stop if section.chat_template_stop is not None else shared_stops
    return shared, stops


def heldout_fraction_of_training(config: DistillConfig) -> float | None:
    """evaluation.heldout.fraction when the held-out rows come from the training dataset, else None."""
    heldout = config.evaluation.heldout if config.evaluation is not None else None
    if config.training is None or heldout is None:
        return None
    heldout_dir = heldout.dataset_dir or config.output_dir
    same = Path(heldout_dir).resolve() == stage_dirs(config).training_dataset.resolve()
    return heldout.fraction if same else None


def mining_dirs(config: DistillConfig) -> tuple[Path, Path]:
    """(the dataset mined around, the new version's directory) of the `mining:` section."""
    mining = config.mining
    assert mining is not None
    dataset_dir = Path(mining.dataset_dir) if mining.dataset_dir else stage_dirs(config).training_dataset
    return dataset_dir, Path(mining.output_dir or f"{dataset_dir}-mined")


def with_shared_settings(config: DistillConfig) -> DistillConfig:
    """A copy of a validated config with the settings one section takes from another filled in:
    the top-level chat_template (and its stop) in every section without its own, and
    training.holdout_fraction from evaluation.heldout when both read the same dataset."""
    shared, stops = config.chat_template, config.chat_template_stop
    sections: dict[str, Any] = {}

    def filled(section: Any) -> Any:
        template, template_stops = shared_chat_template(section, shared, stops)
        return section.model_copy(update={"chat_template": template, "chat_template_stop": template_stops})

    if config.teacher.is_local:
        sections["teacher"] = filled(config.teacher)
    if config.training is not None:
        training = filled(config.training).model_copy(update={"dataset_dir": stage_dirs(config).training_dataset})
        fraction = heldout_fraction_of_training(config)
        if training.holdout_fraction is None and fraction is not None:
            training = training.model_copy(update={"holdout_fraction": fraction})
        sections["training"] = training
    if config.evaluation is not None:
        models = [filled(model) if model.path is not None else model for model in config.evaluation.models]
        sections["evaluation"] = config.evaluation.model_copy(update={"models": models})
    return config.model_copy(update=sections)


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
        elif not item["loc"]:  # a rule across sections: its message names the keys, the input is the whole file
            lines.append(f"  - {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: Path | str = "<config>") -> DistillConfig:
    """The validated config, with the settings sections share filled in (`with_shared_settings`)."""
    try:
        config = DistillConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None
    return with_shared_settings(config)


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
        files = [(f"seeds.{index}.path", seed.path) for index, seed in enumerate(config.seeds)]
        files += [
            (f"filters.decontamination.eval_files.{index}", Path(eval_file))
            for index, eval_file in enumerate(config.filters.decontamination.eval_files)
        ]
        for key, file in files:  # before anything runs: a missing file must not cost teacher calls
            if not file.exists():
                raise ConfigError(
                    f"{path}: {key}: {file} does not exist "
                    f"(relative paths resolve against {Path.cwd()}); fix the path"
                )
    return config


def config_as_written(path: str | Path) -> dict[str, Any]:
    """The config of a file that `load_config` accepted, as JSON-able data, with nothing that
    derives from another key filled in (training.dataset_dir, the shared chat_template): a
    deployment's form starts from it, so that an edited output_dir carries into every stage."""
    return DistillConfig.model_validate(read_yaml(Path(path))).model_dump(mode="json")


def load_section(path: str | Path, name: str, model: type[SectionModel]) -> SectionModel:
    """One section (`training`, `filters`, ...) of a distillflow YAML, or a YAML that is only
    that section's keys.

    A full config (with `seeds:`) is validated as a whole, so the section is what every
    other command sees (e.g. training.holdout_fraction filled in from evaluation.heldout).
    """
    path = Path(path)
    data = read_yaml(path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with a `{name}:` section")
    if "seeds" in data:
        section = getattr(parse_config(data, path), name)
    else:
        section = data[name] if name in data else data
        if section is not None:
            try:
                section = model.model_validate(section)
            except ValidationError as error:
                raise ConfigError(format_validation_error(path, error, section=name)) from None
    if section is None:
        raise ConfigError(f"{path}: the `{name}:` section is empty; fill it in (see configs/ for examples)")
    return section


def load_training_config(path: str | Path) -> TrainingConfig:
    """The `training:` section of a distillflow YAML, or a YAML that is only that section."""
    return load_section(path, "training", TrainingConfig)


def load_filters_config(path: str | Path) -> FiltersConfig:
    """The `filters:` section of a distillflow YAML, or a YAML that is only that section."""
    return load_section(path, "filters", FiltersConfig)
