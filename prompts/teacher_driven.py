"""Teacher-driven prompt generation: Evol-Instruct rewrites and Self-Instruct.

The request text comes from the Jinja2 templates in `prompts/templates/`; the teacher must
answer with exactly one `<prompt>...</prompt>` block. Anything else (an error, an empty or
truncated answer, a refusal, a copy of the parent, a rewrite with nothing new) becomes a
`Reject` with a reason code, never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from distillflow.records import PromptRecord, Reject, TeacherAnswer, content_id
from distillflow.text import REFUSAL_OPENING, is_refusal, normalize_text

TEMPLATES_DIR = Path(__file__).parent / "templates"

Messages = list[dict[str, Any]]
CompleteFn = Callable[[list[Messages]], list[TeacherAnswer]]

# Evol-Instruct operations: in-depth rewrites, in-breadth, and tricky variants.
IN_DEPTH_OPERATIONS = ("add_constraints", "deepen", "concretize", "reasoning", "complicate_input")


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
    )


def render_template(name: str, **variables: Any) -> str:
    """Render `prompts/templates/<name>.jinja`; a missing variable is an error."""
    return _environment().get_template(f"{name}.jinja").render(**variables)


def evolve_messages(operation: str, prompt: str) -> Messages:
    """The chat request asking the teacher to apply one evolve operation to `prompt`."""
    return [{"role": "user", "content": render_template(f"evolve_{operation}", prompt=prompt)}]


def self_instruct_messages(examples: Sequence[str]) -> Messages:
    """The chat request asking the teacher for one new task in the style of `examples`."""
    return [{"role": "user", "content": render_template("self_instruct", examples=list(examples))}]


def request_id(messages: Messages) -> str:
    """Stable id of one generation request (used as the id of its reject, if any)."""
    return content_id(json.dumps(messages, ensure_ascii=False, sort_keys=True))


# ── parsing ──────────────────────────────────────────────────────────────────────────

_PROMPT_BLOCK = re.compile(r"<prompt>(.*?)</prompt>", re.DOTALL)
# Words that show the teacher echoed the instructions instead of writing a prompt.
_TEMPLATE_LEAKS = (
    "<prompt>",
    "</prompt>",
    "<original>",
    "</original>",
    "<example>",
    "(the new prompt)",
    "rewritten prompt",
    "original prompt",
    "given prompt",
    "new prompt:",
    "{{",
    "}}",
)
_STOPWORDS = frozenset(
    (  # noqa: SIM905
        "a an the and or but of to in on at for with by from is are was were be been it this "
        "that these those as please can you your me my i we our do does"
    ).split()
)


def content_words(text: str) -> set[str]:
    return {word for word in normalize_text(text, words_only=True).split() if word not in _STOPWORDS}


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over normalized words: 2PR/(P+R) from the longest common subsequence."""
    a, b = normalize_text(candidate, words_only=True).split(), normalize_text(reference, words_only=True).split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)  # LCS lengths of a[:i] with every prefix of b
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True, slots=True)
class Parsed:
    """The outcome of parsing one teacher answer: a prompt, or a reject reason + detail."""

    prompt: str | None
    reason: str | None = None
    detail: str = ""


def parse_generated_prompt(
    answer: TeacherAnswer,
    parents: Sequence[str],
    max_chars: int,
    require_new_words: bool,
    max_similarity: float = 1.0,
) -> Parsed:
    """Extract the new prompt from a teacher answer, strictly.

    `parents`: the prompt(s) it was made from (a copy of any is `copy_of_parent`);
    `require_new_words`: in-depth rewrites must add at least one content word;
    `max_similarity`: reject when ROUGE-L F1 with any parent is above it (1.0 = off).
    """
    if answer.error is not None:
        return Parsed(None, answer.error, answer.error_detail or "")
    content = answer.content or ""
    if answer.finish_reason == "length":
        return Parsed(None, "truncated", "the teacher hit max_tokens before closing </prompt>")
    if not content.strip():
        return Parsed(None, "empty", "the teacher returned no text")
    blocks = _PROMPT_BLOCK.findall(content)
    if not blocks:
        if is_refusal(content, REFUSAL_OPENING):
            return Parsed(None, "refusal", content.strip()[:200])
        return Parsed(None, "unparseable", "no <prompt>...</prompt> block in the answer")
    if len(blocks) > 1:
        return Parsed(None, "unparseable", f"{len(blocks)} <prompt> blocks; expected exactly one")
    prompt = blocks[0].strip()
    if not prompt:
        return Parsed(None, "empty", "the <prompt> block is empty")
    if is_refusal(prompt, REFUSAL_OPENING):
        return Parsed(prompt, "refusal", prompt[:200])
    lowered = prompt.lower()
    leaks = [marker for marker in _TEMPLATE_LEAKS if marker in lowered]
    if leaks:
        return Parsed(prompt, "template_leak", f"contains {leaks[0]!r} from the instructions")
    if len(prompt) > max_chars:
        return Parsed(
            prompt, "too_long", f"{len(prompt)} characters > max_prompt_chars={max_chars}"
        )
    normalized = normalize_text(prompt, words_only=True)
    if not normalized:
        return Parsed(prompt, "no_new_information", "only punctuation or symbols")
    for parent in parents:
        if normalized == normalize_text(parent, words_only=True):
            return Parsed(prompt, "copy_of_parent", "same words as the prompt it was made from")
    if require_new_words and parents and content_words(prompt) <= content_words(parents[0]):
        return Parsed(
            prompt, "no_new_information", "adds no content word to the prompt it rewrites"
        )
    if max_similarity < 1.0:
        for parent in parents:
            similarity = rouge_l(prompt, parent)
            if similarity > max_similarity:
                detail = f"ROUGE-L {similarity:.2f} > {max_similarity} with its source"
                return Parsed(prompt, "too_similar", detail)
    return Parsed(prompt)


def reject_for(
    messages: Messages,
    strategy: str,
    parent_id: str | None,
    parsed: Parsed,
    answer: TeacherAnswer,
    duplicate_of: str | None = None,
) -> Reject:
    """A generation reject; its id is the request's id, so it never collides with a row."""
    return Reject(
        id=request_id(messages),
        prompt=parsed.prompt or "",
        strategy=strategy,
        reason=parsed.reason or "duplicate_prompt",
        detail=parsed.detail
        or (f"already in the prompt set as {duplicate_of}" if duplicate_of else ""),
        parent_id=parent_id,
        duplicate_of=duplicate_of,
        response=answer.content,
    )


def call_teacher(complete: CompleteFn, requests: list[Messages]) -> list[TeacherAnswer]:
    """One batch through the caller's teacher client (ledger, retries and limits are its job)."""
    if not requests:
        return []
    answers = complete(requests)
    if len(answers) != len(requests):
        raise ValueError(
            f"complete() returned {len(answers)} answers for {len(requests)} requests; "
            "it must return exactly one TeacherAnswer per request, in order"
        )
    return answers


def make_record(prompt: str, strategy: str, parent_id: str | None) -> PromptRecord:
    return PromptRecord.make(prompt, strategy, parent_id)
