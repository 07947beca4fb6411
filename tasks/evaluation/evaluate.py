"""`distill eval`: the logic, as plain functions (flows/evaluate.py only wires them).

1. `load_eval_run` reads the config (a full distillflow config, or one with `evaluation:`
   plus the `teacher:` / `output_dir:` it refers to) and checks every file it names.
2. `prepare_items` reads the eval sets, adds the perturbed copies (robustness) and the
   held-out rows of the dataset: one `EvalItem` per prompt a model must answer.
3. `evaluate_model` asks one model every item and scores it: one record per (model, eval
   set, perturbation, prompt), plus speed, size and parameter count.
4. `judge_models` (optional) compares each model's answers with the reference model's.
5. `build_report` computes every figure of the report from the records alone, so anyone
   can recompute them from `records.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field, ValidationError, model_validator

from distillflow.base_config import StrictModel
from distillflow.config import (
    ConfigError,
    DistillConfig,
    GenerationConfig,
    TeacherConfig,
    format_validation_error,
    parse_config,
    read_yaml,
)
from distillflow.progress import artifact_key_for, progress
from distillflow.prompts.adversarial import ADVERSARIAL, perturb_protected
from distillflow.prompts.config import AdversarialConfig, EdgeCaseConfig
from distillflow.prompts.edge_cases import EDGE_CASES
from distillflow.records import content_id
from distillflow.runs import get_run_logger
from distillflow.storage.dataset import is_heldout
from distillflow.storage.ledger import LEDGER_DIR, TEACHER_LEDGER, Ledger
from distillflow.tasks.evaluation.checks import CHECKS, ONE_OF_SEPARATOR, exact_match, is_correct, rouge_l, token_f1
from distillflow.tasks.evaluation.config import EvalConfig, EvalModel, RobustnessConfig
from distillflow.tasks.evaluation.report import (
    TABLE_COLUMNS,
    report_markdown,
    table_cells,
    write_report_files,
)
from distillflow.tasks.teacher.errors import TeacherFatalError

CLEAN = "clean"
HELDOUT = "heldout"


# -- config -----------------------------------------------------------------------------


class EvalOnlyConfig(StrictModel):
    """A config file for `distill eval` alone: `evaluation:` and what it refers to."""

    name: str | None = Field(None, description="Run name (unused by eval; allowed for symmetry).")
    output_dir: Path | None = Field(None, description="The dataset (held-out rows) and the teacher's ledger.")
    teacher: TeacherConfig | None = Field(None, description="The teacher that `teacher: true` models refer to.")
    evaluation: EvalConfig

    @model_validator(mode="after")
    def _references_resolve(self) -> EvalOnlyConfig:
        """`teacher: true` needs a teacher (an endpoint one, its ledger); heldout needs a dataset."""
        for index, model in enumerate(self.evaluation.models):
            key = f"evaluation.models.{index}"
            if model.teacher and self.teacher is None:
                raise ValueError(f"{key} says `teacher: true` but the config has no `teacher:` section; add one")
            if model.teacher and self.teacher is not None and self.teacher.backend == "openai" and self.output_dir is None:
                raise ValueError(f"{key}: an openai teacher needs the config's `output_dir` (its ledger)")
        heldout = self.evaluation.heldout
        if heldout is not None and heldout.dataset_dir is None and self.output_dir is None:
            raise ValueError("evaluation.heldout needs `dataset_dir` (or a top-level `output_dir`)")
        return self


@dataclass
class EvalRun:
    """A validated eval config with what it refers to resolved."""

    config: EvalConfig
    teacher: TeacherConfig | None
    dataset_dir: Path | None  # held-out rows come from here
    teacher_ledger: Path | None  # the build's ledger, for `teacher: true` with backend openai
    source: str = "<config>"


EVAL_ONLY_KEYS = {"name", "output_dir", "teacher", "evaluation"}


def load_eval_run(path: str | Path) -> EvalRun:
    """Read and validate the config of `distill eval`; every file it names must exist."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict) or not data.get("evaluation"):
        raise ConfigError(f"{path}: no `evaluation:` section; add one (see docs/evaluation.md)")
    if set(data) - EVAL_ONLY_KEYS:
        full: DistillConfig = parse_config(data, path)
        run = eval_run_from_config(full, str(path))
    else:
        try:
            small = EvalOnlyConfig.model_validate(data)
        except ValidationError as error:
            raise ConfigError(format_validation_error(path, error)) from None
        heldout = small.evaluation.heldout
        dataset_dir = (heldout.dataset_dir if heldout else None) or small.output_dir
        ledger = small.output_dir / TEACHER_LEDGER if small.output_dir is not None else None
        run = EvalRun(small.evaluation, small.teacher, dataset_dir, ledger, str(path))
    check_eval_run(run)
    return run


def eval_run_from_config(config: DistillConfig, source: str = "<config>") -> EvalRun:
    if config.evaluation is None:
        raise ConfigError(f"{source}: no `evaluation:` section; add one (see docs/evaluation.md)")
    heldout = config.evaluation.heldout
    dataset_dir = (heldout.dataset_dir if heldout else None) or config.output_dir
    return EvalRun(config.evaluation, config.teacher, dataset_dir, config.output_dir / TEACHER_LEDGER, source)


def check_eval_run(run: EvalRun) -> None:
    """Every file and key the run refers to exists, before any work (the config's own rules
    were checked when it loaded)."""
    where = run.source
    for index, model in enumerate(run.config.models):
        key = f"evaluation.models.{index}"
        if model.path is not None and not (model.path / "config.json").is_file():
            raise ConfigError(
                f"{where}: {key}.path: {model.path} is not a Hugging Face model directory (no config.json); "
                "point it at a directory written by save_pretrained (e.g. a training run's final/)"
            )
        teacher = run.teacher if model.teacher else None
        if teacher is not None and teacher.is_local and not (Path(teacher.model) / "config.json").is_file():
            raise ConfigError(f"{where}: teacher.model {teacher.model} is not a model directory (no config.json)")
    for index, item in enumerate(run.config.eval_sets):
        if not item.path.is_file():
            raise ConfigError(
                f"{where}: evaluation.eval_sets.{index}.path: {item.path} does not exist "
                f"(relative paths resolve against {Path.cwd()}); fix the path"
            )
    keys = [(f"evaluation.models.{i}.api_key_env", m.api_key_env) for i, m in enumerate(run.config.models) if m.base_url]
    if any(m.teacher for m in run.config.models) and run.teacher is not None and run.teacher.backend == "openai":
        keys.append(("teacher.api_key_env", run.teacher.api_key_env))
    if run.config.judge is not None:
        keys.append(("evaluation.judge.api_key_env", run.config.judge.api_key_env))
    for key, env_name in keys:
        if env_name is not None and not env_name.startswith("prefect-secret:") and not os.environ.get(env_name):
            raise ConfigError(
                f"{where}: {key}: environment variable {env_name} is not set; export {env_name}=<your key> "
                "(or set it to null for a server without auth)"
            )
    if run.config.heldout is not None:
        if not any((Path(run.dataset_dir) / "data").glob("*.parquet")):
            raise ConfigError(
                f"{where}: evaluation.heldout: {run.dataset_dir}/data has no Parquet shards; build the dataset "
                "first (`distill build`) or point evaluation.heldout.dataset_dir at one"
            )


# -- items ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvalItem:
    """One prompt a model must answer. `prompt_id` names the clean prompt it comes from."""

    eval_set: str
    perturbation: str  # "clean" or a perturbation name
    variant: int  # 0..per_prompt-1 for perturbed copies
    prompt_id: str
    prompt: str
    reference: str | None
    check: str | None
    protect: tuple[str, ...] = ()
    family: str | None = None  # the row's `family` (or `skill`) column: accuracy is reported per value


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ConfigError(f"{path}:{number}: not valid JSON ({error}); fix the line") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object with a `prompt`")
        rows.append(row)
    return rows


def load_eval_set(path: Path, label: str, limit: int | None, default_check: str | None) -> list[EvalItem]:
    """The clean items of one eval set; bad rows are errors that name the file and line."""
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    items = []
    for number, row in enumerate(rows, 1):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"{path}: row {number} has no `prompt` string; every row needs one")
        reference = row.get("reference")
        reference = None if reference is None else str(reference)
        check = row.get("check") or default_check or ("exact" if reference is not None else None)
        if check is not None and check not in CHECKS:
            raise ConfigError(f"{path}: row {number}: unknown check {check!r}; use one of {sorted(CHECKS)}")
        if check is not None and reference is None:
            raise ConfigError(f"{path}: row {number}: check {check!r} needs a `reference`")
        protect = row.get("protect") or []
        if isinstance(protect, str) or not all(isinstance(span, str) for span in protect):
            raise ConfigError(f"{path}: row {number}: `protect` must be a list of strings")
        prompt_id = f"{label}:{number - 1}"
        family = row.get("family") or row.get("skill")
        items.append(
            EvalItem(label, CLEAN, 0, prompt_id, prompt, reference, check, tuple(protect), None if family is None else str(family))
        )
    if not items:
        raise ConfigError(f"{path}: no rows; an eval set needs at least one prompt")
    return items


def perturbation_rng(seed: int, name: str, variant: int, prompt: str) -> random.Random:
    """The draw of one perturbed copy: a pure function of seed, perturbation, variant and prompt."""
    return random.Random(f"eval-robustness:{seed}:{name}:{variant}:{content_id(prompt)}")


def perturb_items(items: list[EvalItem], robustness: RobustnessConfig) -> tuple[list[EvalItem], dict[str, int]]:
    """`per_prompt` perturbed copies of each clean item per perturbation, protected spans kept
    verbatim; also how many copies each perturbation could not make (skipped)."""
    adversarial = AdversarialConfig(severity=robustness.severity)
    edge = EdgeCaseConfig()
    out: list[EvalItem] = []
    skipped: dict[str, int] = defaultdict(int)
    for name in robustness.perturbations:
        function, config = (ADVERSARIAL[name], adversarial) if name in ADVERSARIAL else (EDGE_CASES[name], edge)
        for item in items:
            for variant in range(robustness.per_prompt):
                rng = perturbation_rng(robustness.seed, name, variant, item.prompt)
                perturbed = perturb_protected(item.prompt, list(item.protect), function, rng, config)  # type: ignore[arg-type]
                if perturbed is None or not perturbed.strip():
                    skipped[name] += 1
                    continue
                out.append(
                    EvalItem(item.eval_set, name, variant, item.prompt_id, perturbed, item.reference, item.check, item.protect)
                )
    return out, dict(skipped)


def heldout_items(dataset_dir: Path, fraction: float, max_rows: int | None) -> list[EvalItem]:
    """Rows of the built dataset in the held-out split; the teacher's answer is the reference."""
    from distillflow.storage.parquet import read_table

    table = read_table(Path(dataset_dir) / "data", columns=["id", "prompt", "response"])
    items = []
    for row in table.to_pylist():
        if row["response"] is None or not is_heldout(str(row["id"]), fraction):
            continue
        items.append(EvalItem(HELDOUT, CLEAN, 0, str(row["id"]), row["prompt"], row["response"], None))
        if max_rows is not None and len(items) >= max_rows:
            break
    return items


@dataclass
class PreparedItems:
    items: list[EvalItem]
    skipped_perturbations: dict[str, int] = field(default_factory=dict)


def prepare_items(run: EvalRun) -> PreparedItems:
    config = run.config
    clean: list[EvalItem] = []
    for eval_set in config.eval_sets:
        clean += load_eval_set(eval_set.path, eval_set.label, eval_set.limit, eval_set.check)
    perturbed, skipped = perturb_items(clean, config.robustness) if config.robustness else ([], {})
    heldout: list[EvalItem] = []
    if config.heldout is not None and run.dataset_dir is not None:
        heldout = heldout_items(run.dataset_dir, config.heldout.fraction, config.heldout.max_rows)
    return PreparedItems(clean + perturbed + heldout, skipped)


# -- one model --------------------------------------------------------------------------


def open_model(run: EvalRun, model: EvalModel) -> Any:
    """The runner of one model entry (in-process or endpoint); load errors name the entry."""
    from distillflow.tasks.evaluation.models import EndpointModel, InProcessModel

    generation = run.config.generation
    if model.kind == "path" or (model.kind == "teacher" and run.teacher.backend == "local"):  # type: ignore[union-attr]
        if model.kind == "path":
            path, system_prompt, device = model.path, model.system_prompt, generation.device
            chat_template, chat_template_stop, stop = model.chat_template, model.chat_template_stop, None
        else:
            path, system_prompt = Path(run.teacher.model), model.system_prompt or run.teacher.system_prompt  # type: ignore[union-attr]
            device = generation.device if generation.device != "auto" else run.teacher.device  # type: ignore[union-attr]
            chat_template, chat_template_stop = run.teacher.chat_template, run.teacher.chat_template_stop  # type: ignore[union-attr]
            stop = run.teacher.generation.stop  # type: ignore[union-attr]
        return InProcessModel(
            path, generation.max_tokens, generation.batch_size, device, system_prompt, chat_template, chat_template_stop, stop
        )
    if model.kind == "teacher":
        # The build's teacher, its generation settings and its ledger: the same request keys.
        return EndpointModel(run.teacher, run.teacher_ledger, run.teacher.system_prompt)  # type: ignore[arg-type]
    endpoint = TeacherConfig(
        backend="openai",
        base_url=model.base_url,
        model=model.model,  # type: ignore[arg-type]
        api_key_env=model.api_key_env,
        max_concurrency=model.max_concurrency,
        generation=GenerationConfig(temperature=0.0, max_tokens=generation.max_tokens),
    )
    return EndpointModel(endpoint, run.config.output_dir / LEDGER_DIR / "endpoints.sqlite", model.system_prompt)


def score_item(item: EvalItem, answer: Any) -> dict[str, Any]:
    """The record of one answered item (see docs/evaluation.md for the fields)."""
    text = answer.text
    record: dict[str, Any] = {
        "eval_set": item.eval_set,
        "perturbation": item.perturbation,
        "variant": item.variant,
        "prompt_id": item.prompt_id,
        "prompt": item.prompt,
        "answer": text,
        "reference": item.reference,
        "check": item.check,
        "family": item.family,
        "correct": None,
        "latency_s": answer.latency_s,
        "completion_tokens": answer.completion_tokens,
        "finish_reason": answer.finish_reason,
        "error": answer.error,
        "from_ledger": answer.from_ledger,
    }
    if item.eval_set == HELDOUT:
        reference = item.reference or ""
        answered = text or ""
        record.update(
            check="agreement",
            exact=exact_match(answered, reference),
            token_f1=token_f1(answered, reference),
            rouge_l=rouge_l(answered, reference),
        )
        record["correct"] = record["exact"] == 1.0
    elif item.check is not None and item.reference is not None:
        record["correct"] = is_correct(item.check, text, item.reference)
    return record


def speed_prompts(items: list[EvalItem]) -> list[str]:
    clean = [item.prompt for item in items if item.perturbation == CLEAN]
    return clean or ["Hello!"]


def evaluate_model(run: EvalRun, model: EvalModel, items: list[EvalItem], log: Any = print) -> dict[str, Any]:
    """Ask one model every item; its records, speed, size and parameters."""
    began = time.perf_counter()
    runner = open_model(run, model)
    try:
        key = artifact_key_for("eval", model.name, "progress")
        with progress(f"eval {model.name}", total=len(items), unit="answers", artifact_key=key) as bar:
            answers = runner.answer([item.prompt for item in items], progress=bar)
        records = [{"model": model.name, **score_item(item, answer)} for item, answer in zip(items, answers)]
        if records and all(record["error"] for record in records):
            # Nothing came back: a 0 % row would blame the model for a dead endpoint.
            raise TeacherFatalError(
                f"evaluation model {model.name!r} answered none of its {len(records)} prompts "
                f"(last error: {records[-1]['error']}); check that it is reachable "
                f"({model.base_url or model.path or 'the config teacher'}) and rerun"
            )
        info: dict[str, Any] = {"name": model.name, "kind": runner.kind, "entry": model.model_dump(mode="json")}
        heldout = [(index, item) for index, item in enumerate(items) if item.eval_set == HELDOUT]
        if runner.kind == "in_process":
            info["parameters"] = runner.parameters
            info["size_mb"] = runner.size_bytes / 2**20
            info["weights_memory_mb"] = runner.weights_memory_bytes / 2**20
            info["source"] = str(runner.path)
            if heldout:
                scores = runner.cross_entropy(
                    [(item.prompt, item.reference or "") for _, item in heldout], run.config.generation.max_length
                )
                for (index, _), (nll, tokens) in zip(heldout, scores):
                    records[index]["nll"] = nll
                    records[index]["target_tokens"] = tokens
            if run.config.spread is not None:
                info["spread"] = sample_spread(runner, items, run.config.spread, log, model.name)
            info["speed"] = None  # timed afterwards, every in-process model in turn (`measure_speed`)
        else:
            info["parameters"] = None
            info["size_mb"] = None
            info["source"] = f"{runner.config.base_url} ({runner.config.model})"
            info["speed"] = runner.speed()
            info["usage"] = runner.usage()
    finally:
        info_memory = runner.close()
    info.update(info_memory)
    info["seconds"] = round(time.perf_counter() - began, 3)  # loading, answering, scoring and timing
    return {"records": records, "info": info}


def spread_of(answers_per_prompt: list[list[str | None]], valid_per_prompt: list[tuple[str, ...]]) -> dict[str, Any]:
    """Validity and spread of sampled answers to questions with several right answers.

    validity: share of all samples that are right. spread: per prompt, the distinct right
    answers among its samples over the most it could show (min(samples, right answers)),
    averaged over prompts: 1.0 when the samples cover the right answers as evenly as they
    can, 1 / min(...) for a model that always gives the same right answer.
    """
    samples = right = 0
    coverage: list[float] = []
    for answers, valid in zip(answers_per_prompt, valid_per_prompt):
        hits = [answer.strip() for answer in answers if answer is not None and answer.strip() in valid]
        samples += len(answers)
        right += len(hits)
        coverage.append(len(set(hits)) / min(len(answers), len(valid)))
    return {
        "prompts": len(coverage),
        "samples_per_prompt": len(answers_per_prompt[0]) if answers_per_prompt else 0,
        "validity": right / samples if samples else None,
        "spread": _mean(coverage),
    }


def sample_spread(runner: Any, items: list[EvalItem], config: Any, log: Any, name: str) -> dict[str, Any]:
    """`config.samples` sampled answers (at `config.temperature`) to each clean `one_of` item,
    scored per family by `spread_of`. In-process models only (the sampling seed is the sample's index)."""
    chosen = [item for item in items if item.perturbation == CLEAN and item.check == "one_of" and item.reference]
    if not chosen:
        return {}
    log(f"{name}: sampling {config.samples} answers to each of {len(chosen)} questions with several right answers")
    answers = runner.sample([item.prompt for item in chosen], config.samples, config.temperature)  # (prompts, samples)
    valid = [tuple(option.strip() for option in (item.reference or "").split(ONE_OF_SEPARATOR)) for item in chosen]
    families: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(chosen):
        families[item.family or item.eval_set].append(index)
    return {
        family: spread_of([answers[i] for i in indices], [valid[i] for i in indices])
        for family, indices in sorted(families.items())
    }


def median_speed(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per batch size, the median over rounds of tokens/s and of the latency percentiles."""
    out: dict[str, Any] = {}
    for size in rounds[0]:
        runs = [entry[size] for entry in rounds]
        out[size] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "latency_p50_s": statistics.median(r["latency_p50_s"] for r in runs),
            "latency_p95_s": statistics.median(r["latency_p95_s"] for r in runs),
            "batches": sum(r["batches"] for r in runs),
            "new_tokens_per_prompt": runs[0]["new_tokens_per_prompt"],
            "rounds": len(runs),
            "tokens_per_s_by_round": [round(r["tokens_per_s"], 1) for r in runs],
        }
    return out


def measure_speed(run: EvalRun, items: list[EvalItem], log: Any = print) -> dict[str, dict[str, Any]]:
    """Tokens/s of every in-process model, timed in interleaved rounds; the median per model.

    All in-process models are loaded together and timed in turn, `speed.repeats` rounds: a
    slow spell of a shared machine then slows every model alike instead of one of them, and
    the median drops the odd outlier (two models of the same size should agree within ~10 %).
    """
    speed = run.config.speed
    if speed is None:
        return {}
    prompts = speed_prompts(items)
    prompts = [prompts[i % len(prompts)] for i in range(speed.prompts)]
    runners: dict[str, Any] = {}
    try:
        for model in run.config.models:
            runner = open_model(run, model)
            if runner.kind != "in_process":
                runner.close()
                continue
            runners[model.name] = runner
        if not runners:
            return {}
        log(f"timing generation of {len(runners)} models, {speed.repeats} interleaved rounds, batch sizes {speed.batch_sizes}")
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
        for round_index in range(speed.repeats):
            for name, runner in runners.items():
                warmup = speed.warmup if round_index == 0 else 0
                rounds[name].append(runner.time_generation(prompts, speed.batch_sizes, speed.max_new_tokens, warmup))
        return {name: median_speed(results) for name, results in rounds.items()}
    finally:
        for runner in runners.values():
            runner.close()


# -- judge ------------------------------------------------------------------------------

JUDGE_TEMPLATE = """You compare two answers to the same question.

Question:
{prompt}

Answer A:
{answer_a}

Answer B:
{answer_b}

Which answer is better: correct, complete and doing what the question asks? Reply with exactly one word: A, B or TIE."""


def parse_verdict(text: str | None) -> str:
    """`A`, `B` or `TIE` from the judge's reply; anything else is `invalid` (counted as a tie)."""
    if not text:
        return "invalid"
    word = text.strip().split()[0].strip(".:!*\"'()").upper() if text.strip() else ""
    return word if word in ("A", "B", "TIE") else "invalid"


def combine_verdicts(model_first: str, reference_first: str) -> str:
    """Both orders: +1 per order that prefers the model, -1 per order that prefers the
    reference; the sign is win / loss, 0 is a tie (position bias cancels out)."""
    score = {"A": 1, "B": -1}.get(model_first, 0) + {"B": 1, "A": -1}.get(reference_first, 0)
    return "win" if score > 0 else "loss" if score < 0 else "tie"


def judge_models(run: EvalRun, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairwise verdicts of each model against the reference model, both orders, ledger-cached."""
    from distillflow.tasks.teacher.choose import make_teacher
    from distillflow.tasks.teacher.protocol import build_messages
    from distillflow.tasks.teacher.recording import answer_requests

    judge = run.config.judge
    reference_name = run.config.judge_reference
    assert judge is not None and reference_name is not None
    clean = [r for r in records if r["perturbation"] == CLEAN and r["eval_set"] != HELDOUT]
    clean += [r for r in records if r["eval_set"] == HELDOUT]
    reference_answers = {r["prompt_id"]: r for r in clean if r["model"] == reference_name}
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    per_model_count: dict[str, int] = defaultdict(int)
    for record in clean:
        reference = reference_answers.get(record["prompt_id"])
        if record["model"] == reference_name or reference is None:
            continue
        if record["answer"] is None or reference["answer"] is None or per_model_count[record["model"]] >= judge.max_prompts:
            continue
        per_model_count[record["model"]] += 1
        pairs.append((record, reference))
    messages = []
    for record, reference in pairs:
        for first, second in ((record, reference), (reference, record)):
            text = JUDGE_TEMPLATE.format(prompt=record["prompt"], answer_a=first["answer"], answer_b=second["answer"])
            messages.append(build_messages(text, None))
    config = TeacherConfig(
        backend="openai",
        base_url=judge.base_url,
        model=judge.model,
        api_key_env=judge.api_key_env,
        max_concurrency=judge.max_concurrency,
        generation=GenerationConfig(temperature=0.0, max_tokens=judge.max_tokens),
    )
    client = make_teacher(config)
    ledger = Ledger(run.config.output_dir / LEDGER_DIR / "judge.sqlite")
    try:
        answers = answer_requests(client, ledger, messages) if messages else []
    finally:
        client.close()
        ledger.close()
    judge_records = []
    for index, (record, reference) in enumerate(pairs):
        model_first, reference_first = answers[2 * index][0], answers[2 * index + 1][0]
        verdicts = parse_verdict(model_first.content), parse_verdict(reference_first.content)
        judge_records.append(
            {
                "model": record["model"],
                "reference_model": reference_name,
                "eval_set": record["eval_set"],
                "prompt_id": record["prompt_id"],
                "verdict_model_first": verdicts[0],
                "verdict_reference_first": verdicts[1],
                "outcome": combine_verdicts(*verdicts),
            }
        )
    usage = client.stats.to_dict()
    prompt_tokens = sum(a.prompt_tokens for a, _ in answers)
    completion_tokens = sum(a.completion_tokens for a, _ in answers)
    cost = None
    if judge.price_per_million_prompt_tokens is not None or judge.price_per_million_completion_tokens is not None:
        paid_prompt, paid_completion = usage["prompt_tokens"], usage["completion_tokens"]
        cost = (
            paid_prompt * (judge.price_per_million_prompt_tokens or 0.0)
            + paid_completion * (judge.price_per_million_completion_tokens or 0.0)
        ) / 1e6
    summary = {
        "model": judge.model,
        "reference_model": reference_name,
        "requests": len(messages),
        "requests_sent": usage["requests_sent"],
        "ledger_hits": usage["ledger_hits"],
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "paid_prompt_tokens": usage["prompt_tokens"],
        "paid_completion_tokens": usage["completion_tokens"],
        "estimated_cost_usd": cost,
    }
    return {"records": judge_records, "summary": summary}


# -- report -----------------------------------------------------------------------------


def _rate(correct: int, total: int) -> float | None:
    return correct / total if total else None


def _accuracy(records: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in records if r["correct"] is not None]
    correct = sum(1 for r in scored if r["correct"])
    return {"accuracy": _rate(correct, len(scored)), "correct": correct, "total": len(scored)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def model_report(records: list[dict[str, Any]], judge_records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of one model from its records (and its judge verdicts)."""
    sets = [r for r in records if r["eval_set"] != HELDOUT]
    clean = [r for r in sets if r["perturbation"] == CLEAN]
    perturbed = [r for r in sets if r["perturbation"] != CLEAN]
    per_set: dict[str, list] = defaultdict(list)
    per_check: dict[str, list] = defaultdict(list)
    per_family: dict[str, list] = defaultdict(list)
    for record in clean:
        per_set[record["eval_set"]].append(record)
        if record["check"] is not None:
            per_check[record["check"]].append(record)
        if record.get("family") is not None:
            per_family[record["family"]].append(record)
    report: dict[str, Any] = {
        "accuracy": {
            **_accuracy(clean),
            "per_eval_set": {name: _accuracy(rows) for name, rows in sorted(per_set.items())},
            "per_check": {name: _accuracy(rows) for name, rows in sorted(per_check.items())},
            "per_family": {name: _accuracy(rows) for name, rows in sorted(per_family.items())},
        }
    }
    if perturbed:
        clean_by_id = {r["prompt_id"]: r for r in clean if r["correct"] is not None}
        per_perturbation: dict[str, list] = defaultdict(list)
        for record in perturbed:
            per_perturbation[record["perturbation"]].append(record)
        entries = {}
        for name, rows in per_perturbation.items():
            scored = _accuracy(rows)
            # The clean accuracy of the same prompts (a perturbation may skip some).
            paired = _accuracy([clean_by_id[r["prompt_id"]] for r in rows if r["prompt_id"] in clean_by_id])
            gap = None if scored["accuracy"] is None or paired["accuracy"] is None else paired["accuracy"] - scored["accuracy"]
            entries[name] = {**scored, "clean_accuracy": paired["accuracy"], "gap": gap}
        overall = _accuracy(perturbed)
        clean_accuracy = report["accuracy"]["accuracy"]
        report["robustness"] = {
            "clean_accuracy": clean_accuracy,
            "robust_accuracy": overall["accuracy"],
            "correct": overall["correct"],
            "total": overall["total"],
            "gap": None if overall["accuracy"] is None or clean_accuracy is None else clean_accuracy - overall["accuracy"],
            "per_perturbation": entries,
        }
    heldout = [r for r in records if r["eval_set"] == HELDOUT]
    if heldout:
        entry: dict[str, Any] = {
            "rows": len(heldout),
            "exact": _mean([r["exact"] for r in heldout]),
            "token_f1": _mean([r["token_f1"] for r in heldout]),
            "rouge_l": _mean([r["rouge_l"] for r in heldout]),
            "cross_entropy": None,
            "perplexity": None,
            "target_tokens": None,
        }
        tokens = sum(r.get("target_tokens") or 0 for r in heldout)
        if tokens and all("nll" in r for r in heldout):
            entry["cross_entropy"] = sum(r["nll"] for r in heldout) / tokens  # nats per answer token
            entry["perplexity"] = math.exp(entry["cross_entropy"])
            entry["target_tokens"] = tokens
        report["heldout"] = entry
    if judge_records:
        outcomes = [r["outcome"] for r in judge_records]
        wins, ties, losses = (outcomes.count(kind) for kind in ("win", "tie", "loss"))
        report["judge"] = {
            "wins": wins,
            "ties": ties,
            "losses": losses,
            "prompts": len(outcomes),
            "win_rate": (wins + 0.5 * ties) / len(outcomes),
            "invalid_verdicts": sum(
                (r["verdict_model_first"] == "invalid") + (r["verdict_reference_first"] == "invalid") for r in judge_records
            ),
        }
    return report


def tokens_per_s_at(info: dict[str, Any], batch: str = "1") -> float | None:
    speed = info.get("speed") or {}
    return (speed.get(batch) or {}).get("tokens_per_s")


def build_report(
    run: EvalRun,
    records: list[dict[str, Any]],
    infos: list[dict[str, Any]],
    judge: dict[str, Any] | None = None,
    skipped_perturbations: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The whole report: per model, figures from its records; the comparison table."""
    judge_records = (judge or {}).get("records", [])
    models: dict[str, Any] = {}
    for info in infos:
        name = info["name"]
        own = [r for r in records if r["model"] == name]
        models[name] = {
            "kind": info["kind"],
            "source": info.get("source"),
            "parameters": info.get("parameters"),
            "size_mb": info.get("size_mb"),
            "weights_memory_mb": info.get("weights_memory_mb"),
            "peak_memory_mb": info.get("peak_memory_mb"),
            "peak_memory_kind": info.get("peak_memory_kind"),
            "speed": info.get("speed"),
            "spread": info.get("spread"),
            "usage": info.get("usage"),
            "seconds": info.get("seconds"),
            **model_report(own, [r for r in judge_records if r["model"] == name]),
        }
    baseline = run.config.baseline_name
    report = {
        "output_dir": str(run.config.output_dir),
        "reference_model": baseline,
        "models": models,
        "eval_sets": sorted({r["eval_set"] for r in records}),
        "perturbations": list(run.config.robustness.perturbations) if run.config.robustness else [],
        "skipped_perturbations": skipped_perturbations or {},
        "judge": (judge or {}).get("summary"),
        "files": {
            "records": "records.jsonl",
            "judge_records": "judge.jsonl" if judge else None,
            "report_md": "report.md",
            "chart": "chart.png",
        },
    }
    report["table"] = comparison_rows(report)
    return report


def comparison_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model: params, clean acc, robust acc, gap, agreement, ppl, tok/s@1, speed-up."""
    models = report["models"]
    baseline = report.get("reference_model")
    baseline_speed = tokens_per_s_at(models[baseline]) if baseline in models else None
    rows = []
    for name, entry in models.items():
        robustness = entry.get("robustness") or {}
        heldout = entry.get("heldout") or {}
        speed = tokens_per_s_at(entry)
        rows.append(
            {
                "model": name,
                "params": entry.get("parameters"),
                "clean_acc": entry["accuracy"]["accuracy"],
                "robust_acc": robustness.get("robust_accuracy"),
                "gap": robustness.get("gap"),
                "agreement": heldout.get("exact"),
                "ppl": heldout.get("perplexity"),
                "tok_s_at_1": speed,
                "speedup_vs_teacher": speed / baseline_speed if speed and baseline_speed else None,
            }
        )
    return rows


def records_to_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def item_dicts(items: list[EvalItem]) -> list[dict[str, Any]]:
    return [asdict(item) for item in items]


# -- Prefect tasks (wired by flows/) --------------------------------------------------------


@task(name="eval-prepare", cache_policy=NO_CACHE)
def prepare_task(run: EvalRun) -> PreparedItems:
    return prepare_items(run)


@task(name="eval-model", cache_policy=NO_CACHE, task_run_name="eval-{model.name}")
def evaluate_model_task(run: EvalRun, model: EvalModel, items: list[EvalItem]) -> dict[str, Any]:
    logger = get_run_logger()
    logger.info("%s: answering %d prompts", model.name, len(items))
    return evaluate_model(run, model, items, log=logger.info)


@task(name="measure-speed", cache_policy=NO_CACHE)
def speed_task(run: EvalRun, items: list[EvalItem]) -> dict[str, dict[str, Any]]:
    return measure_speed(run, items, get_run_logger().info)


@task(name="eval-judge", cache_policy=NO_CACHE)
def judge_task(run: EvalRun, records: list[dict[str, Any]]) -> dict[str, Any]:
    return judge_models(run, records)


@task(name="eval-report", cache_policy=NO_CACHE)
def report_task(
    run: EvalRun, records: list[dict[str, Any]], infos: list[dict[str, Any]], judge: dict[str, Any] | None, skipped: dict[str, int]
) -> dict[str, Any]:
    report = build_report(run, records, infos, judge, skipped)
    judge_jsonl = records_to_jsonl(judge["records"]) if judge else None
    write_report_files(Path(run.config.output_dir), report, records_to_jsonl(records), judge_jsonl)
    key = _artifact_key(Path(run.config.output_dir).name)
    header = [title for _, title in TABLE_COLUMNS]
    create_table_artifact(
        key=f"{key}-eval-table",
        table=[dict(zip(header, row)) for row in table_cells(report["table"])],
        description="distill eval: one row per model",
    )
    markdown = report_markdown(report)
    chart = Path(run.config.output_dir) / "chart.png"
    if chart.is_file():  # accuracy vs size and per-set accuracy, inline
        from distillflow.tasks.artifact_charts import png_data_uri

        markdown += f"\n\n![accuracy vs size]({png_data_uri(chart.read_bytes())})\n"
    create_markdown_artifact(key=f"{key}-eval-report", markdown=markdown, description="distill eval report")
    return report


def _artifact_key(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "eval"
