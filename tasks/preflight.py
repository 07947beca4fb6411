"""Checks run by every `distill` command before its first flow starts (and before any teacher call).

For every model directory a stage loads in-process: its config.json and tokenizer load; it
has a chat template, or the config gives one (`chat_template`, training/chat_template.py),
and the template renders; the model's context (`max_position_embeddings`) holds what the
stage asks of it. White-box training also compares the teacher's and the student's
vocabularies (`training.model.vocabulary_preflight`, the check training itself runs);
grey-box training (kd_greybox) needs the build's stored logprobs instead.

Each failure is a `PreflightError`: one paragraph naming the config file, the key and the
fix. Nothing here loads weights or calls a teacher.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillflow.config import ConfigError, DistillConfig
from distillflow.training.chat_template import PRESETS, check_renders, effective_chat_template
from distillflow.training.config import TrainingConfig


class PreflightError(ConfigError):
    """A problem found before the run started; the message names the file, the key and the fix."""


@dataclass
class ModelDir:
    path: Path
    key: str  # the config key that names it, e.g. teacher.model
    config: dict[str, Any] | None  # config.json, read as JSON (None: a tokenizer-only directory)
    tokenizer: Any

    def setting(self, name: str) -> int | None:
        """An integer of config.json, or of its text_config (a multimodal model's language part)."""
        for section in (self.config or {}, (self.config or {}).get("text_config") or {}):
            value = section.get(name) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    @property
    def context(self) -> int | None:
        """Positions the model was built for (None when its config does not say)."""
        return self.setting("max_position_embeddings")

    @property
    def output_rows(self) -> int | None:
        return self.setting("vocab_size")


def model_settings(file: Path, key: str, source: str) -> dict[str, Any]:
    """A model's config.json as a dict: read as JSON, because transformers' AutoConfig imports
    torch (~2 s), which `distill train` would pay twice (its trainer process loads the model)."""
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PreflightError(
            f"{source}: {key}: {file} does not load ({type(error).__name__}: {error}); "
            "re-save the model with save_pretrained"
        ) from None
    if not isinstance(settings, dict) or not isinstance(settings.get("model_type", ""), str):
        raise PreflightError(
            f"{source}: {key}: {file} is not a model config (a JSON object with model_type); "
            "re-save the model with save_pretrained"
        )
    return settings


def load_model_dir(path: str | Path, key: str, source: str, tokenizer_only: bool = False) -> ModelDir:
    """Config and tokenizer of a model directory (no weights, no torch)."""
    from distillflow.training.vocabulary import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise PreflightError(f"{source}: {key}: {path} is not a directory; point it at a model directory written by save_pretrained")
    config = None
    if not tokenizer_only or (path / "config.json").is_file():
        if not (path / "config.json").is_file():
            raise PreflightError(
                f"{source}: {key}: {path} has no config.json, so it is not a Hugging Face model directory; "
                "point it at a directory written by save_pretrained"
            )
        config = model_settings(path / "config.json", key, source)
    try:
        tokenizer = load_tokenizer(path)
    except Exception as error:  # noqa: BLE001
        raise PreflightError(
            f"{source}: {key}: the tokenizer in {path} does not load ({type(error).__name__}: {error}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained(path))"
        ) from None
    return ModelDir(path, key, config, tokenizer)


def require_chat_template(
    model: ModelDir, setting: str | None, setting_key: str, source: str, for_training: bool = False
) -> str:
    """The template `model` is used with (the setting's, else its own); a clear error when there
    is none or it cannot work (`for_training`: answers must be locatable in the tokens)."""
    template = effective_chat_template(model.tokenizer, setting)
    if template is None:
        raise PreflightError(
            f"{source}: {model.key}: the tokenizer in {model.path} has no chat template "
            f"({model.path / 'tokenizer_config.json'} has no `chat_template`: a base model?) and the config "
            f"gives none; set `chat_template: plain` at the top level of the config (teacher, capture and "
            f"training share it) or {setting_key} to a preset ({', '.join(PRESETS)}), a Jinja string or a "
            "file (see docs/base_models.md)"
        )
    try:
        check_renders(model.tokenizer, template, for_training)
    except ValueError as error:
        named = f"{setting_key} ({setting!r})" if setting else f"the chat template of {model.path}"
        raise PreflightError(f"{source}: {named} cannot be used with {model.key}: {error}") from None
    return template


def prompt_tokens(model: ModelDir, template: str, prompts: Sequence[str], system_prompt: str | None) -> int:
    """Tokens of the longest prompt rendered with the template (checks the 5 longest by characters)."""
    longest = sorted(prompts, key=len, reverse=True)[:5]
    counts = []
    for prompt in longest:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        text = model.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        counts.append(len(model.tokenizer(text, add_special_tokens=False)["input_ids"]))
    return max(counts, default=0)


def check_context(model: ModelDir, needed: int, what: str, fix: str, source: str) -> None:
    context = model.context
    if context is not None and needed > context:
        raise PreflightError(
            f"{source}: {what} = {needed} tokens, more than the {context} positions of {model.key} "
            f"({model.path / 'config.json'}: max_position_embeddings); {fix}"
        )


# -- per stage ------------------------------------------------------------------------------


def preflight_build(config: DistillConfig, source: str, prompts: Sequence[str]) -> None:
    """A local teacher: loads, has a template, and its context holds max_tokens + the longest prompt."""
    teacher = config.teacher
    if not teacher.is_local:
        return  # an OpenAI-compatible server: checked on first contact (tasks/teacher/openai_client.py)
    model = load_model_dir(teacher.model, "teacher.model", source)
    template = require_chat_template(model, teacher.chat_template, "teacher.chat_template", source)
    longest = prompt_tokens(model, template, prompts, teacher.system_prompt)
    max_tokens = teacher.generation.max_tokens
    room = (model.context or 0) - longest
    check_context(
        model,
        max_tokens + longest,
        f"teacher.generation.max_tokens ({max_tokens}) + the longest seed prompt (~{longest} tokens with the chat template)",
        f"lower teacher.generation.max_tokens to {room} or less, or shorten the longest seeds"
        if room > 0
        else "shorten the longest seeds (seeds.*.limit, or a shorter prompt column)",
        source,
    )


def preflight_capture(config: DistillConfig, source: str) -> None:
    """Local capture: the teacher loads, the tokenizer that makes the positions has a template,
    its vocabulary is the teacher's, and the teacher's context holds max_length."""
    from distillflow.tasks.capture.logits import resolve_capture_settings

    settings = resolve_capture_settings(config)
    training = config.training
    tokenizer_key = "capture.tokenizer" if config.capture and config.capture.tokenizer else (
        "capture.model" if Path(settings.tokenizer) == Path(settings.model)
        else "training.student" if training is not None and Path(settings.tokenizer) == Path(str(training.student))
        else "training.teacher"
    )
    positions = load_model_dir(settings.tokenizer, tokenizer_key, source, tokenizer_only=True)
    require_chat_template(positions, settings.chat_template, "chat_template", source, for_training=True)
    if settings.source != "local":
        return
    teacher = load_model_dir(settings.model, "capture.model" if config.capture.model else "teacher.model", source)  # type: ignore[union-attr]
    if Path(settings.tokenizer).resolve() != Path(settings.model).resolve():
        _same_vocabulary(teacher, positions, source)
    check_context(
        teacher, settings.max_length, f"capture.max_length ({settings.max_length})",
        f"set training.max_length (and capture.max_length) to {teacher.context} or less", source,
    )


def preflight_training(training: TrainingConfig, source: str, captured_first: bool = False) -> None:
    """The student (or the teacher it is derived from) loads and has a template; white-box
    objectives compare the vocabularies; the student's context holds max_length.
    `captured_first`: `distill run` captures the teacher's top-k before training (kd_greybox
    then needs no logprobs in the dataset as it stands)."""
    teacher = None
    if training.teacher is not None:
        # kd_topk and on_policy with a teacher server need only the teacher's tokenizer, unless
        # the student is derived from its weights.
        tokenizer_only = (
            training.objective in ("kd_topk", "kd_greybox", "on_policy") and not training.teacher_in_process
            and training.derive_student is None
        )
        teacher = load_model_dir(training.teacher, "training.teacher", source, tokenizer_only=tokenizer_only)
    student = load_model_dir(training.student, "training.student", source) if training.student else teacher
    assert student is not None  # TrainingConfig requires student or derive_student (with teacher)
    require_chat_template(student, training.chat_template, "training.chat_template", source, for_training=True)
    if training.is_white_box and teacher is not None and student is not teacher:
        _same_vocabulary(teacher, student, source)
    if training.objective == "kd_greybox" and not captured_first and (Path(training.dataset_dir) / "data").is_dir():
        _has_teacher_logprobs(training, source)
    check_context(
        student, training.max_length, f"training.max_length ({training.max_length})",
        f"set training.max_length to {student.context} or less", source,
    )


def preflight_eval(run: Any, only_existing: bool = False) -> None:
    """Every in-process model of `distill eval` (an EvalRun) loads and has a template.
    `only_existing`: skip model directories not written yet (a `distill run` trains them)."""
    for index, model in enumerate(run.config.models):
        if model.kind == "path":
            if only_existing and not Path(model.path).exists():
                continue
            loaded = load_model_dir(model.path, f"evaluation.models.{index}.path", run.source)
            require_chat_template(loaded, model.chat_template, f"evaluation.models.{index}.chat_template", run.source)
        elif model.kind == "teacher" and run.teacher is not None and run.teacher.is_local:
            loaded = load_model_dir(run.teacher.model, "teacher.model", run.source)
            require_chat_template(loaded, run.teacher.chat_template, "teacher.chat_template", run.source)


def preflight_run(config: DistillConfig, source: str, prompts: Sequence[str]) -> None:
    """`distill run`: every stage the config asks for, before the build starts."""
    preflight_build(config, source, prompts)
    training = config.training
    if training is not None:
        captures = config.capture is not None and training.objective in ("kd_topk", "kd_greybox")
        if training.objective == "kd_greybox" and not config.teacher.generation.top_logprobs and not captures:
            raise PreflightError(
                f"{source}: training.objective is kd_greybox, which trains from the teacher's top-k "
                "logprobs stored by the build, but teacher.generation.top_logprobs is 0, so the build "
                "would store none. Set teacher.generation.top_logprobs (e.g. 20, the most an "
                "OpenAI-compatible API returns), add a `capture:` section to capture a teacher you run "
                "yourself (any vocabulary), or train with objective: sft"
            )
        if captures:
            preflight_capture(config, source)
        preflight_training(training, source, captured_first=captures)
    if config.evaluation is not None:
        from distillflow.tasks.evaluation.evaluate import eval_run_from_config

        preflight_eval(eval_run_from_config(config, source), only_existing=True)


def _has_teacher_logprobs(training: TrainingConfig, source: str) -> None:
    from distillflow.training.greybox import NoTeacherLogprobs, check_greybox_dataset

    try:
        check_greybox_dataset(training.dataset_dir)
    except NoTeacherLogprobs as error:
        raise PreflightError(f"{source}: training.dataset_dir: {error}") from None


def _same_vocabulary(teacher: ModelDir, student: ModelDir, source: str) -> None:
    from distillflow.training.vocabulary import VocabularyMismatch, vocabulary_preflight

    student_rows = student.output_rows or len(student.tokenizer)
    teacher_rows = teacher.output_rows or student_rows
    try:
        vocabulary_preflight(teacher.tokenizer, student.tokenizer, teacher_rows, student_rows)
    except VocabularyMismatch as error:
        raise PreflightError(f"{source}: {teacher.key} and {student.key}: {error}") from None
