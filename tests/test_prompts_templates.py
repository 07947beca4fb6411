"""Every teacher-request template, rendered, compared with the exact expected text."""

from __future__ import annotations

import jinja2
import pytest

from distillflow.prompts.config import EVOLVE_OPERATIONS
from distillflow.prompts.teacher_driven import (
    TEMPLATES_DIR,
    evolve_messages,
    render_template,
    self_instruct_messages,
)

OUTPUT_FORMAT = (
    "Reply with the new prompt only, written between a line <prompt> and a line </prompt>:\n"
    "<prompt>\n"
    "(the new prompt)\n"
    "</prompt>"
)

PARENT = "Explain why the sky is blue."


def in_depth(method: str) -> str:
    return (
        "You rewrite prompts for an AI assistant to make them more demanding, while keeping them "
        "reasonable and answerable by a human expert.\n"
        "\n"
        f"Method: {method}\n"
        "\n"
        "Rules:\n"
        "- Keep the task and the domain of the original prompt.\n"
        "- Add no more than 10 to 40 words; no filler.\n"
        '- Do not answer the prompt, and do not mention "original prompt" or "rewritten prompt".\n'
        "- Keep any code, tables or data the original contains unless the method says otherwise.\n"
        "\n"
        "Original prompt:\n"
        "<original>\n"
        "Explain why the sky is blue.\n"
        "</original>\n"
        "\n" + OUTPUT_FORMAT
    )


EXPECTED = {
    "evolve_add_constraints": in_depth(
        "add one more constraint or requirement that the answer must satisfy."
    ),
    "evolve_deepen": in_depth(
        "increase the depth and breadth of the inquiry: ask about causes, trade-offs or consequences "
        "of the specific issue it raises."
    ),
    "evolve_concretize": in_depth(
        "replace general concepts with more specific ones (named entities, concrete numbers, a particular setting)."
    ),
    "evolve_reasoning": in_depth(
        "if it can be solved with one or two simple thinking steps, rewrite it so that it explicitly "
        "requires several steps of reasoning."
    ),
    "evolve_complicate_input": in_depth(
        "add input data the task must work with (a small table, a code snippet, a JSON object, a "
        "formula or a short passage) and make the prompt refer to it."
    ),
    "evolve_breadth": (
        "You write new prompts for an AI assistant.\n"
        "\n"
        "Draw inspiration from the prompt below and write a brand-new prompt in the same domain, about "
        "a rarer topic or a different task. It should be of similar length and difficulty, "
        "self-contained, and answerable by a human expert.\n"
        "\n"
        "Rules:\n"
        "- Do not copy or paraphrase the given prompt; the new prompt must ask for something different.\n"
        '- Do not answer either prompt, and do not mention "given prompt" or "new prompt".\n'
        "\n"
        "Given prompt:\n"
        "<original>\n"
        "Explain why the sky is blue.\n"
        "</original>\n"
        "\n" + OUTPUT_FORMAT
    ),
    "evolve_tricky_edge_case": (
        "You write test prompts that probe the weak spots of an AI assistant.\n"
        "\n"
        "Write a tricky edge-case variant of the task below: the same kind of task, but with an input "
        "at the boundary of what it covers (empty or extreme values, unusual formats, ambiguous "
        "wording, a corner case that a hasty answer gets wrong). It must still be a fair question "
        "with a correct answer.\n"
        "\n"
        "Rules:\n"
        "- Do not answer the task, and do not explain what makes the variant tricky.\n"
        "- The variant must be self-contained: include any input data it needs.\n"
        "\n"
        "Task:\n"
        "<original>\n"
        "Explain why the sky is blue.\n"
        "</original>\n"
        "\n" + OUTPUT_FORMAT
    ),
    "evolve_tricky_adversarial": (
        "You write test prompts that probe the weak spots of an AI assistant.\n"
        "\n"
        "Write an adversarial variant of the task below that tempts an assistant into a wrong answer: "
        "a misleading premise, a distracting detail, an instruction hidden in the data, or a trap "
        "that looks like the original task. A careful assistant must still be able to answer it "
        "correctly.\n"
        "\n"
        "Rules:\n"
        "- Do not answer the task, and do not explain the trap.\n"
        "- The variant must be self-contained: include any input data it needs.\n"
        "\n"
        "Task:\n"
        "<original>\n"
        "Explain why the sky is blue.\n"
        "</original>\n"
        "\n" + OUTPUT_FORMAT
    ),
}

SELF_INSTRUCT_EXPECTED = (
    "You write new tasks for an AI assistant. Here are some example tasks that users gave it:\n"
    "\n"
    "Example 1:\n"
    "<example>\n"
    "Explain why the sky is blue.\n"
    "</example>\n"
    "\n"
    "Example 2:\n"
    "<example>\n"
    "What is 23 + 19?\n"
    "</example>\n"
    "\n"
    "Write one new task that differs from every example in topic and wording but matches their "
    "style and difficulty. It must be self-contained: include any input data it needs. Do not "
    "answer it.\n"
    "\n" + OUTPUT_FORMAT
)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_evolve_template_renders_exactly(name):
    assert render_template(name, prompt=PARENT) == EXPECTED[name]


def test_self_instruct_template_renders_exactly():
    assert (
        render_template("self_instruct", examples=[PARENT, "What is 23 + 19?"])
        == SELF_INSTRUCT_EXPECTED
    )


def test_every_operation_and_every_template_file_is_covered():
    assert {f"evolve_{op}" for op in EVOLVE_OPERATIONS} == set(EXPECTED)
    files = {path.stem for path in TEMPLATES_DIR.glob("*.jinja") if not path.stem.startswith("_")}
    assert files == set(EXPECTED) | {"self_instruct"}


def test_requests_are_one_user_message_with_the_rendered_template():
    assert evolve_messages("deepen", PARENT) == [
        {"role": "user", "content": EXPECTED["evolve_deepen"]}
    ]
    assert self_instruct_messages([PARENT, "What is 23 + 19?"]) == [
        {"role": "user", "content": SELF_INSTRUCT_EXPECTED}
    ]


def test_parent_text_is_inserted_verbatim_not_escaped_or_interpreted():
    tricky = 'Use <b>bold</b> & "quotes" {{ not_a_variable }} {% raw %}'
    assert f"<original>\n{tricky}\n</original>" in render_template("evolve_deepen", prompt=tricky)


def test_a_missing_template_variable_is_an_error():
    with pytest.raises(jinja2.UndefinedError):
        render_template("evolve_deepen")
