"""`distill build --dry-run`: what a build would ask the teacher and what it would cost,
without asking anything.

The prompt set is made exactly as the build makes it (seeds, rule-based strategies,
prompt filters). Teacher-driven strategies (evolve, self_instruct) need the teacher's
answers to make their prompts: those already in the ledger are used; for the rest the
dry run counts their generation requests as the build would pay them, and estimates the
prompts they would add (one per request, at most the family's quota, each the mean size
of the known prompts). Prompts whose answer is already in the ledger cost nothing.

Input tokens are counted with the teacher's tokenizer where one is known
(`teacher.tokenizer`, or a local teacher's model directory), else estimated at 4
characters a token; each message adds 4 tokens and each request 3 (the chat format).
Output tokens: the upper bound is `max_tokens` per request; the expected value is the
mean completion length of the answers already in the ledger, else half of `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillflow.config import ConfigError, DistillConfig
from distillflow.records import PromptRecord, TeacherAnswer
from distillflow.storage.ledger import TEACHER_LEDGER, Ledger, request_key
from distillflow.storage.seeds import split_repeated_seeds
from distillflow.tasks.teacher.protocol import build_messages, estimate_tokens
from distillflow.tasks.teacher.recording import teacher_params_for_key

Messages = list[dict[str, Any]]
NOT_ASKED = "not_asked:dry_run"
TEACHER_FAMILIES = ("evolve", "self_instruct")
EXPECTED_FRACTION_WITHOUT_HISTORY = 0.5


def token_counter(config: DistillConfig) -> tuple[Callable[[Messages], int], str]:
    """A function counting a request's prompt tokens, and how it counts (for the report)."""
    teacher = config.teacher
    source = teacher.tokenizer or (teacher.model if teacher.is_local else None)
    if source is None:
        return estimate_tokens, "estimated at 4 characters a token (set teacher.tokenizer for exact counts)"
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        field = "teacher.tokenizer" if teacher.tokenizer else "teacher.model"
        raise ConfigError(
            f"{field}: cannot load a tokenizer from {source!r} ({type(error).__name__}: {str(error)[:200]}); "
            "give a local tokenizer directory (or a model in the Hugging Face cache), or remove teacher.tokenizer "
            "to estimate at 4 characters a token"
        ) from None

    def count(messages: Messages) -> int:
        contents = [message.get("content") or "" for message in messages]
        encoded = tokenizer(contents, add_special_tokens=False)["input_ids"] if contents else []
        return sum(len(ids) for ids in encoded) + 4 * len(messages) + 3

    return count, f"counted with the tokenizer of {source}"


def estimate_build(config: DistillConfig, seeds: list[PromptRecord]) -> dict[str, Any]:
    """Prompt count, tokens and cost of building `config` from `seeds`; sends nothing and
    writes nothing (the ledger, when there is one, is only read)."""
    from distillflow.prompts.generate import generate_prompts
    from distillflow.tasks.filters.passes import filter_prompts

    ledger_path = config.output_dir / TEACHER_LEDGER
    ledger = Ledger(ledger_path) if ledger_path.is_file() else None
    teacher = config.teacher
    params = teacher_params_for_key(teacher)
    count_tokens, token_method = token_counter(config)
    try:
        unique_seeds, _ = split_repeated_seeds(seeds)
        unanswered_generation: list[Messages] = []

        def complete(messages_list: list[Messages]) -> list[TeacherAnswer]:
            keys = [request_key(messages, teacher.model, params) for messages in messages_list]
            found = ledger.get_many(set(keys)) if ledger is not None else {}
            answers = []
            for key, messages in zip(keys, messages_list):
                if key in found:
                    answers.append(found[key][0])
                else:
                    unanswered_generation.append(messages)
                    answers.append(TeacherAnswer(None, None, teacher.model, error=NOT_ASKED))
            return answers

        prompts, generation_rejects, report = generate_prompts(
            unique_seeds, config.prompts, complete if config.prompts.uses_teacher() else None
        )
        kept, _ = filter_prompts(prompts, config.filters)

        requests = [build_messages(record.prompt, teacher.system_prompt) for record in kept]
        keys = [request_key(messages, teacher.model, params) for messages in requests]
        in_ledger = ledger.get_many(set(keys)) if ledger is not None else {}
        to_ask = [messages for key, messages in zip(keys, requests) if key not in in_ledger]
        history = [answer.completion_tokens for answer, _ in in_ledger.values() if answer.ok]
    finally:
        if ledger is not None:
            ledger.close()

    # Teacher-driven prompts the dry run could not make: one per unanswered request, at most
    # what the family's quota leaves, each the mean size of the prompts it knows.
    allocation = report.get("allocation", {})
    made = sum(1 for record in prompts if record.strategy.split(":")[0] in TEACHER_FAMILIES)
    settled = sum(
        1
        for reject in generation_rejects
        if reject.strategy.split(":")[0] in TEACHER_FAMILIES and reject.reason != NOT_ASKED
    )
    teacher_quota = sum(allocation.get(family, 0) for family in TEACHER_FAMILIES)
    estimated_generation_requests = max(0, teacher_quota - made - settled) if unanswered_generation else 0
    mean_generation_tokens = (
        sum(count_tokens(m) for m in unanswered_generation) / len(unanswered_generation) if unanswered_generation else 0.0
    )
    answer_tokens = [count_tokens(messages) for messages in to_ask]
    known_sizes = [count_tokens(messages) for messages in requests] or [0]
    mean_prompt_tokens = sum(known_sizes) / len(known_sizes)

    max_tokens = teacher.generation.max_tokens
    expected_per_answer = sum(history) / len(history) if history else max_tokens * EXPECTED_FRACTION_WITHOUT_HISTORY
    expected_basis = (
        f"the mean completion of the {len(history)} answers already in the ledger"
        if history
        else f"{EXPECTED_FRACTION_WITHOUT_HISTORY:g} x max_tokens (no earlier answers to go by)"
    )
    requests_to_pay = len(to_ask) + 2 * estimated_generation_requests  # a generated prompt is asked, then answered
    input_tokens = (
        sum(answer_tokens)
        + estimated_generation_requests * mean_generation_tokens
        + estimated_generation_requests * mean_prompt_tokens
    )
    output_upper = requests_to_pay * max_tokens
    output_expected = requests_to_pay * expected_per_answer
    batch = teacher.mode == "batch"
    estimate: dict[str, Any] = {
        "prompts_generated": len(prompts),
        "prompts_after_filters": len(kept),
        "prompts_answered_in_ledger": len(in_ledger),
        "prompts_to_ask": len(to_ask),
        "teacher_driven": {
            "generation_requests_not_in_ledger": estimated_generation_requests,
            "estimated_extra_prompts": estimated_generation_requests,
        },
        "requests_to_pay": requests_to_pay,
        "input_tokens": round(input_tokens),
        "input_tokens_method": token_method,
        "output_tokens_upper_bound": round(output_upper),
        "output_tokens_expected": round(output_expected),
        "output_tokens_expected_basis": expected_basis,
        "mode": teacher.mode,
        "cost_usd_expected": None,
        "cost_usd_upper_bound": None,
        "max_budget_usd": teacher.max_budget_usd,
        "max_total_tokens": teacher.max_total_tokens,
    }
    if teacher.pricing is not None:
        estimate["cost_usd_expected"] = round(teacher.pricing.cost_usd(input_tokens, output_expected, batch), 6)
        estimate["cost_usd_upper_bound"] = round(teacher.pricing.cost_usd(input_tokens, output_upper, batch), 6)
    return estimate


def format_estimate(config: DistillConfig, estimate: dict[str, Any], config_path: str | Path) -> str:
    """The dry run's report, for a person."""
    teacher = config.teacher
    lines = [f"{config.name}: dry run of {config_path} (no request sent, nothing written)"]
    lines.append(
        f"  prompts: {estimate['prompts_generated']} generated, {estimate['prompts_after_filters']} after prompt "
        f"filters; {estimate['prompts_answered_in_ledger']} already answered in the ledger (free), "
        f"{estimate['prompts_to_ask']} to ask"
    )
    driven = estimate["teacher_driven"]
    if driven["generation_requests_not_in_ledger"]:
        lines.append(
            f"  teacher-driven strategies (evolve/self_instruct): about {driven['generation_requests_not_in_ledger']} "
            f"generation requests and up to {driven['estimated_extra_prompts']} more prompts, estimated (their "
            "prompts come from answers the dry run does not ask for)"
        )
    lines.append(f"  requests to pay: {estimate['requests_to_pay']} (mode: {estimate['mode']})")
    lines.append(f"  input tokens: {estimate['input_tokens']:,} ({estimate['input_tokens_method']})")
    lines.append(
        f"  output tokens: up to {estimate['output_tokens_upper_bound']:,} (max_tokens={teacher.generation.max_tokens} "
        f"each); expected {estimate['output_tokens_expected']:,} ({estimate['output_tokens_expected_basis']})"
    )
    if teacher.pricing is None:
        lines.append("  cost: unknown (set teacher.pricing: {input_per_mtok, output_per_mtok} to see it)")
    else:
        pricing = teacher.pricing
        discount = f", batch discount {pricing.batch_discount:g}" if teacher.mode == "batch" else ""
        lines.append(
            f"  cost: about ${estimate['cost_usd_expected']:.4f} expected, at most ${estimate['cost_usd_upper_bound']:.4f} "
            f"(${pricing.input_per_mtok:g} / ${pricing.output_per_mtok:g} per million input / output tokens{discount})"
        )
    if teacher.max_budget_usd is not None and estimate["cost_usd_upper_bound"] is not None:
        upper, expected = estimate["cost_usd_upper_bound"], estimate["cost_usd_expected"]
        if upper <= teacher.max_budget_usd:
            verdict = "fits even at the upper bound"
        elif expected <= teacher.max_budget_usd:
            verdict = "fits the expected cost, not the upper bound: the run may stop early"
        else:
            verdict = "is below the expected cost: the run will stop early (rerun with more to continue)"
        lines.append(f"  budget: teacher.max_budget_usd={teacher.max_budget_usd:g} {verdict}")
    if teacher.max_total_tokens is not None:
        total = estimate["input_tokens"] + estimate["output_tokens_upper_bound"]
        fits = "fits" if total <= teacher.max_total_tokens else "may stop the run early"
        lines.append(f"  token cap: teacher.max_total_tokens={teacher.max_total_tokens:,} {fits} (up to {total:,})")
    return "\n".join(lines)
