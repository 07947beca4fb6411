"""Teacher-driven prompt strategies (evolve, self_instruct): strict parsing, rejects, determinism.

First against a plain-Python `complete` function, then through the real teacher client,
ledger and retries against the project's OpenAI-compatible test server.
"""

from __future__ import annotations

import re

import pytest

import distillflow.tasks.teacher.openai_client as teacher_module
from distillflow.config import TeacherConfig
from distillflow.records import PromptRecord, TeacherAnswer
from distillflow.prompts import generate_prompts
from distillflow.prompts.config import PromptsConfig
from distillflow.prompts.teacher_driven import parse_generated_prompt, rouge_l
from distillflow.storage.ledger import Ledger
from distillflow.tasks.teacher import OpenAITeacher, answer_requests
from tests.openai_server import FaultyOpenAIServer, ServerThread

ORIGINAL = re.compile(r"<original>\n(.*)\n</original>", re.DOTALL)


def ok(content: str, finish_reason: str = "stop") -> TeacherAnswer:
    return TeacherAnswer(content=content, finish_reason=finish_reason, model="scripted")


def parent_of(messages: list[dict]) -> str:
    return ORIGINAL.search(messages[-1]["content"]).group(1)


# ── parsing ──────────────────────────────────────────────────────────────────────────

PARENT = "Explain why the sky is blue."


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            TeacherAnswer(None, None, "m", error="teacher_error:400", error_detail="flagged"),
            "teacher_error:400",
        ),
        (
            ok(
                "<prompt>Explain why the sky is blue at noon but red at sunset in Lisbon.", "length"
            ),
            "truncated",
        ),
        (ok(""), "empty"),
        (ok("   \n"), "empty"),
        (ok("<prompt>\n  \n</prompt>"), "empty"),
        (ok("lorem ipsum ### ??? ### lorem"), "unparseable"),
        (ok("Explain why the sky is blue, including Rayleigh scattering."), "unparseable"),
        (
            ok("<prompt>Why is the sky blue?</prompt>\n<prompt>Why is grass green?</prompt>"),
            "unparseable",
        ),
        (ok("I'm sorry, but I can't help with rewriting this prompt."), "refusal"),
        (ok("<prompt>I cannot help with that request.</prompt>"), "refusal"),
        (ok("<prompt>(the new prompt)</prompt>"), "template_leak"),
        (
            ok("<prompt>Rewritten prompt: explain why the sky is blue in detail.</prompt>"),
            "template_leak",
        ),
        (ok("<prompt>explain WHY the sky is blue!!</prompt>"), "copy_of_parent"),
        (ok("<prompt>Explain why the sky is blue. Explain why.</prompt>"), "no_new_information"),
        (ok("<prompt>?!?</prompt>"), "no_new_information"),
        (
            ok("<prompt>" + "Explain scattering of light in detail. " * 300 + "</prompt>"),
            "too_long",
        ),
    ],
)
def test_unusable_answers_become_rejects_with_a_reason(answer, reason):
    parsed = parse_generated_prompt(answer, [PARENT], max_chars=8000, require_new_words=True)
    assert parsed.reason == reason


def test_a_good_answer_is_parsed_strictly_from_its_block():
    answer = ok(
        "Sure! Here it is:\n<prompt>\nExplain why the sky is blue at noon but red at sunset, "
        "using Rayleigh scattering.\n</prompt>\nHope this helps."
    )
    parsed = parse_generated_prompt(answer, [PARENT], max_chars=8000, require_new_words=True)
    assert parsed.reason is None
    assert (
        parsed.prompt
        == "Explain why the sky is blue at noon but red at sunset, using Rayleigh scattering."
    )


def test_rouge_l_on_known_pairs():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "e f") == 0.0
    # LCS("a b c d", "a x c") = 2 → P = 2/4, R = 2/3, F1 = 4/7.
    assert rouge_l("a b c d", "a x c") == pytest.approx(4 / 7)
    assert rouge_l("", "a") == 0.0


def test_a_new_prompt_too_close_to_its_source_is_too_similar():
    answer = ok("<prompt>Explain briefly why the sky is blue.</prompt>")
    parsed = parse_generated_prompt(answer, [PARENT], 8000, False, max_similarity=0.7)
    assert parsed.reason == "too_similar"
    assert parse_generated_prompt(answer, [PARENT], 8000, False, max_similarity=1.0).reason is None
    different = ok("<prompt>Why do sunsets on Mars look blue rather than red?</prompt>")
    assert (
        parse_generated_prompt(different, [PARENT], 8000, False, max_similarity=0.7).reason is None
    )


def test_a_user_style_prompt_that_starts_with_i_cannot_is_not_a_refusal():
    answer = ok(
        "<prompt>I cannot get my Python loop to stop; why does `while x > 0: x += 1` never end?</prompt>"
    )
    assert parse_generated_prompt(answer, [PARENT], 8000, require_new_words=False).reason is None


# ── generate_prompts with a plain-Python teacher ─────────────────────────────────────

SEEDS = [
    PromptRecord.make(text, "seed")
    for text in (
        "Explain why the sky is blue.",
        "What is 23 + 19?",
        "Write a haiku about autumn rain.",
        "List the planets of the solar system.",
    )
]


def scripted_teacher(script):
    """A `complete` that answers each request with `script(parent_or_examples, content)`."""
    calls: list[list[list[dict]]] = []

    def complete(requests: list[list[dict]]) -> list[TeacherAnswer]:
        calls.append(requests)
        return [script(request[-1]["content"]) for request in requests]

    complete.calls = calls
    return complete


def rewrite_with_new_detail(content: str) -> TeacherAnswer:
    """Appends a detail named after the operation and the request, so every rewrite adds words."""
    parent = ORIGINAL.search(content).group(1)
    operation = "constraint" if "add one more constraint" in content else "depth"
    return ok(f"<prompt>{parent} Add {operation} {len(content)}.</prompt>")


def test_evolve_rows_carry_operation_and_parent_and_chain_over_rounds():
    config = PromptsConfig(
        num_prompts=12,
        strategies={"evolve": 1.0},
        evolve={"operations": ["deepen", "add_constraints"], "max_rounds": 2},
    )
    complete = scripted_teacher(rewrite_with_new_detail)
    rows, rejects, report = generate_prompts(SEEDS, config, complete)
    # Round 1: 4 seeds x 2 operations = 8 requests; round 2: 4 of the 8 new prompts.
    assert [len(batch) for batch in complete.calls] == [8, 4]
    assert len(rows) == 12 and rejects == []
    seed_ids = {seed.id for seed in SEEDS}
    first_round, second_round = rows[:8], rows[8:]
    assert {row.strategy for row in rows} == {"evolve:deepen", "evolve:add_constraints"}
    assert all(row.parent_id in seed_ids for row in first_round)
    assert all(row.parent_id in {r.id for r in first_round} for row in second_round)
    by_id = {row.id: row for row in [*SEEDS, *rows]}
    assert all(row.prompt.startswith(by_id[row.parent_id].prompt) for row in rows)
    assert report["teacher_requests"] == 12
    assert report["per_strategy"] == {"evolve:add_constraints": 6, "evolve:deepen": 6}


def test_garbage_answers_become_rejects_with_strategy_parent_and_reason():
    answers = {
        "Explain why the sky is blue.": ok("lorem ipsum ### ??? ### lorem"),
        "What is 23 + 19?": TeacherAnswer(
            None, None, "m", error="teacher_error:400", error_detail="bad"
        ),
        "Write a haiku about autumn rain.": ok("<prompt>write a HAIKU about autumn rain</prompt>"),
        "List the planets of the solar system.": ok(
            "<prompt>Which moon has the thickest atmosphere, and why?</prompt>"
        ),
    }
    config = PromptsConfig(
        num_prompts=4,
        strategies={"evolve": 1.0},
        evolve={"operations": ["breadth"], "max_rounds": 1},
    )
    complete = scripted_teacher(lambda content: answers[ORIGINAL.search(content).group(1)])
    rows, rejects, report = generate_prompts(SEEDS, config, complete)
    assert [row.prompt for row in rows] == ["Which moon has the thickest atmosphere, and why?"]
    by_parent = {reject.parent_id: reject for reject in rejects}
    seed_id = {seed.prompt: seed.id for seed in SEEDS}
    assert by_parent[seed_id["Explain why the sky is blue."]].reason == "unparseable"
    assert by_parent[seed_id["What is 23 + 19?"]].reason == "teacher_error:400"
    assert by_parent[seed_id["Write a haiku about autumn rain."]].reason == "copy_of_parent"
    assert (
        by_parent[seed_id["Explain why the sky is blue."]].response
        == "lorem ipsum ### ??? ### lorem"
    )
    assert all(reject.strategy == "evolve:breadth" for reject in rejects)
    assert len({reject.id for reject in rejects} | {row.id for row in rows}) == 4
    assert report["rejects_per_reason"] == {
        "copy_of_parent": 1,
        "teacher_error:400": 1,
        "unparseable": 1,
    }
    assert report["generated"] + report["rejected"] == report["target"]


def test_a_generated_prompt_that_already_exists_is_a_duplicate_reject():
    same = ok("<prompt>Describe how rainbows form after a storm.</prompt>")
    config = PromptsConfig(
        num_prompts=4,
        strategies={"evolve": 1.0},
        evolve={"operations": ["breadth"], "max_rounds": 1},
    )
    rows, rejects, _ = generate_prompts(SEEDS, config, scripted_teacher(lambda content: same))
    assert len(rows) == 1
    assert [reject.reason for reject in rejects] == ["duplicate_prompt"] * 3
    assert all(reject.duplicate_of == rows[0].id for reject in rejects)


def test_self_instruct_shows_examples_and_rejects_copies_of_them():
    def script(content: str) -> TeacherAnswer:
        examples = re.findall(r"<example>\n(.*?)\n</example>", content, re.DOTALL)
        assert len(examples) == 2
        if "What is 23 + 19?" in examples:
            return ok("<prompt>What is 23 + 19?</prompt>")  # copies an example
        return ok(f"<prompt>Design a quiz question about {len(content)} different birds.</prompt>")

    config = PromptsConfig(
        num_prompts=5, strategies={"self_instruct": 1.0}, self_instruct={"num_examples": 2}
    )
    rows, rejects, _ = generate_prompts(SEEDS, config, scripted_teacher(script))
    assert len(rows) + len(rejects) == 5
    assert all(row.strategy == "self_instruct" for row in rows)
    assert {row.parent_id for row in rows} <= {seed.id for seed in SEEDS}
    assert {reject.reason for reject in rejects} <= {"copy_of_parent", "duplicate_prompt"}
    assert "copy_of_parent" in {reject.reason for reject in rejects}


def test_teacher_strategies_are_deterministic_given_the_same_answers():
    config = PromptsConfig(
        num_prompts=40,
        strategies={"seed": 1, "edge_case": 1, "evolve": 1, "self_instruct": 0.5},
        random_seed=3,
    )

    def script(content: str) -> TeacherAnswer:
        return ok(
            f"<prompt>Take this further, step {len(content)}: compare options and justify.</prompt>"
        )

    first = generate_prompts(SEEDS, config, scripted_teacher(script))
    second = generate_prompts(list(reversed(SEEDS)), config, scripted_teacher(script))
    assert first == second


def test_complete_must_answer_every_request():
    config = PromptsConfig(num_prompts=4, strategies={"evolve": 1.0})
    with pytest.raises(ValueError, match="exactly one TeacherAnswer per request"):
        generate_prompts(SEEDS, config, lambda requests: [])


# ── through the teacher client, ledger and retries, against the test server ──────────


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_module, "BACKOFF_BASE_S", 0.01)
    teacher_module._verified_endpoints.clear()


def test_evolve_through_the_test_server_with_faults_and_the_ledger(port, tmp_path, fast_backoff):
    new_prompt = "Why do sunsets on Mars look blue rather than red?"
    seeds = [
        PromptRecord.make(text, "seed")
        for text in (
            f"Explain why the sky is blue. [[say:<prompt>{new_prompt}</prompt>]]",
            "Transient failure first. [[500x1]] [[say:<prompt>Name three rivers longer than 5000 km.</prompt>]]",
            "Nonsense comes back. [[garbage]]",
            "Nothing comes back. [[empty]]",
            "Cut off. [[truncate]]",
            "Flagged. [[400]]",
            "Refused. [[say:I'm sorry, but I can't help with that.]]",
            "An ordinary answer with no prompt block.",
        )
    ]
    # `breadth`: the scripted new prompt sits inside its parent, so an in-depth rewrite would
    # (rightly) be rejected for adding no new words.
    config = PromptsConfig(
        num_prompts=8,
        strategies={"evolve": 1.0},
        evolve={"operations": ["breadth"], "max_rounds": 1},
    )
    fake = FaultyOpenAIServer(api_key="k")
    with ServerThread(fake, port) as server:
        teacher_config = TeacherConfig(
            base_url=server.base_url,
            model="test-teacher",
            api_key_env=None,
            timeout_s=5.0,
            max_retries=3,
        )

        def run():
            teacher = OpenAITeacher(teacher_config, api_key="k")
            with Ledger(tmp_path / "ledger.sqlite") as ledger:

                def complete(requests):
                    return [answer for answer, _ in answer_requests(teacher, ledger, requests)]

                return generate_prompts(seeds, config, complete)

        rows, rejects, report = run()
        requests_first_run = fake.total_requests
        again = run()

    assert {row.prompt for row in rows} == {new_prompt, "Name three rivers longer than 5000 km."}
    assert all(row.strategy == "evolve:breadth" for row in rows)
    by_parent = {reject.parent_id: reject.reason for reject in rejects}
    seed_ids = {seed.prompt.split(".")[0]: seed.id for seed in seeds}
    assert by_parent[seed_ids["Nonsense comes back"]] == "unparseable"
    assert by_parent[seed_ids["Nothing comes back"]] == "empty"
    assert by_parent[seed_ids["Cut off"]] == "truncated"
    assert by_parent[seed_ids["Flagged"]] == "teacher_error:400"
    assert by_parent[seed_ids["Refused"]] == "refusal"
    assert by_parent[seed_ids["An ordinary answer with no prompt block"]] == "unparseable"
    assert len(rejects) == 6 and report["rejected"] == 6 and report["generated"] == 2
    # A second run with the same ledger pays for nothing and gives the same result.
    assert fake.total_requests == requests_first_run
    assert again == (rows, rejects, report)
