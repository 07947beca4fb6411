"""Rule-based prompt generation: each strategy makes what its name says, deterministically."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from distillflow.records import PromptRecord, TeacherAnswer
from distillflow.prompts import generate_prompts, prompt_diversity_summary, report_markdown, report_table
from distillflow.prompts.adversarial import (
    ADVERSARIAL,
    DISTRACTORS,
    FALSE_PREMISES,
    INJECTIONS_BY_SEVERITY,
    NEGATION_FLIPS,
    max_edits,
)
from distillflow.prompts.config import ADVERSARIAL_KINDS, EDGE_CASE_KINDS, AdversarialConfig, PromptsConfig
from distillflow.prompts.diversity import distinct_n, distinct_orders, length_histogram, percentiles
from distillflow.prompts.domains import DOMAIN_EDGE_CASES, arithmetic, code
from distillflow.prompts.edge_cases import (
    BOUNDARY_NUMBERS,
    CONTRADICTIONS,
    EDGE_CASES,
    MIXED_LANGUAGE_PHRASES,
    SIDE_QUESTIONS,
)
from distillflow.prompts.generate import allocate

ROOT = Path(__file__).resolve().parents[1]
GENERAL_SEEDS = ROOT / "prompts" / "seeds" / "general.jsonl"


def load_general_seeds() -> list[PromptRecord]:
    lines = GENERAL_SEEDS.read_text(encoding="utf-8").splitlines()
    return [PromptRecord.make(json.loads(line)["prompt"], "seed") for line in lines]


SEEDS = load_general_seeds()
BY_ID = {seed.id: seed for seed in SEEDS}


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def only(family: str, kinds: list[str] | None = None, n: int = 120, **settings) -> PromptsConfig:
    """A config that makes `n` prompts of one family (optionally some kinds of it)."""
    config = {"num_prompts": n, "strategies": {family: 1.0}, **settings}
    if kinds is not None:
        config[family] = {**config.get(family, {}), "kinds": kinds}
    return PromptsConfig.model_validate(config)


def rows_of(config: PromptsConfig, seeds=SEEDS) -> list[PromptRecord]:
    rows, rejects, _ = generate_prompts(seeds, config)
    assert rejects == []
    return rows


# ── the seed file ────────────────────────────────────────────────────────────────────


def test_general_seed_file_is_jsonl_with_a_prompt_per_line():
    assert 35 <= len(SEEDS) <= 60
    assert len({seed.id for seed in SEEDS}) == len(SEEDS)
    assert all(seed.prompt.strip() for seed in SEEDS)


# ── edge cases ───────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kind", EDGE_CASE_KINDS)
def test_every_edge_case_kind_makes_new_prompts_from_seeds(kind):
    rows = rows_of(only("edge_case", [kind], n=30))
    assert len(rows) == 30
    for row in rows:
        assert row.strategy == f"edge_case:{kind}"
        assert row.prompt != BY_ID[row.parent_id].prompt
        assert row.id == PromptRecord.make(row.prompt, row.strategy).id


def test_empty_is_empty_or_whitespace_only():
    rows = rows_of(only("edge_case", ["empty"], n=40))
    assert all(row.prompt.strip() == "" for row in rows)
    assert "" in {row.prompt for row in rows}
    assert any(row.prompt for row in rows)


@pytest.mark.parametrize("budget", [256, 2048])
def test_long_inputs_land_near_the_token_budget(budget):
    config = only(
        "edge_case", ["long"], n=20, edge_case={"kinds": ["long"], "long_input_tokens": budget}
    )
    for row in rows_of(config):
        tokens = len(row.prompt) / config.edge_case.chars_per_token
        assert 0.9 * budget <= tokens <= budget
        assert BY_ID[row.parent_id].prompt in row.prompt


def test_numbers_brings_in_a_boundary_value():
    for row in rows_of(only("edge_case", ["numbers"], n=40)):
        assert any(value in row.prompt for value in BOUNDARY_NUMBERS)


def test_unicode_rows_contain_non_ascii_characters():
    rows = rows_of(only("edge_case", ["unicode"], n=60))
    assert all(not row.prompt.isascii() for row in rows)
    text = "".join(row.prompt for row in rows)
    assert re.search("[\u200b-\u200d\u2060\ufeff]", text), "zero-width characters"
    assert re.search("[\u0300-\u036f]", text), "combining marks"
    assert re.search("[\u0590-\u06ff]", text), "right-to-left script"
    assert re.search("[\u4e00-\u9fff\u3040-\u30ff\uac00-\ud7af]", text), "CJK"
    assert re.search("[\u0400-\u04ff\u0370-\u03ff]", text), "homoglyphs"


def test_mixed_language_adds_sentences_in_other_languages():
    phrases = [phrase for phrase, _ in MIXED_LANGUAGE_PHRASES]
    for row in rows_of(only("edge_case", ["mixed_language"], n=30)):
        assert BY_ID[row.parent_id].prompt in row.prompt
        assert any(phrase in row.prompt for phrase in phrases)


def test_malformed_structures_do_not_parse():
    rows = rows_of(only("edge_case", ["malformed"], n=40))
    json_like = [row for row in rows if row.prompt.startswith("{")]
    assert json_like
    for row in json_like:
        with pytest.raises(json.JSONDecodeError):
            json.loads(row.prompt)
    assert any(row.prompt.startswith("```") and row.prompt.count("```") == 1 for row in rows)


def test_contradictory_multi_question_and_format_constraints():
    for row in rows_of(only("edge_case", ["contradictory"], n=20)):
        assert any(instruction in row.prompt for instruction in CONTRADICTIONS)
    for row in rows_of(only("edge_case", ["multi_question"], n=20)):
        assert BY_ID[row.parent_id].prompt.strip() in row.prompt
        assert sum(question in row.prompt for question in SIDE_QUESTIONS) >= 1
    constraint = re.compile(
        r"exactly \d+|JSON only|no more than \d+|lowercase|letter 'e'|yes or no|Markdown table|YAML"
    )
    for row in rows_of(only("edge_case", ["format_constraint"], n=30)):
        assert row.prompt.startswith(BY_ID[row.parent_id].prompt.rstrip())
        assert constraint.search(row.prompt.rsplit("\n\n", 1)[1])


# ── adversarial ──────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kind", ADVERSARIAL_KINDS)
def test_every_adversarial_kind_makes_new_prompts_from_seeds(kind):
    rows = rows_of(only("adversarial", [kind], n=30))
    assert len(rows) == 30
    assert all(
        row.strategy == f"adversarial:{kind}" and row.prompt != BY_ID[row.parent_id].prompt
        for row in rows
    )


@pytest.mark.parametrize("kind", ["typo", "char_noise"])
@pytest.mark.parametrize("severity", [0.0, 0.5, 1.0])
def test_typos_and_noise_stay_within_the_configured_edit_distance(kind, severity):
    config = only(
        "adversarial",
        n=40,
        adversarial={"kinds": [kind], "severity": severity, "max_typo_edits": 4},
    )
    for row in rows_of(config):
        parent = BY_ID[row.parent_id].prompt
        assert 1 <= levenshtein(parent, row.prompt) <= max_edits(parent, config.adversarial)
    assert max_edits(
        "a long enough sentence", AdversarialConfig(severity=severity, max_typo_edits=4)
    ) == max(1, round(4 * severity))


def test_casing_whitespace_and_word_swaps_change_only_what_they_say():
    for row in rows_of(only("adversarial", ["casing"], n=30)):
        assert row.prompt.lower() == BY_ID[row.parent_id].prompt.lower()
    for row in rows_of(only("adversarial", ["whitespace"], n=30)):
        assert re.sub(r"\s", "", row.prompt) == re.sub(r"\s", "", BY_ID[row.parent_id].prompt)
    for row in rows_of(only("adversarial", ["word_swap"], n=30)):
        assert sorted(row.prompt.split(" ")) == sorted(BY_ID[row.parent_id].prompt.split(" "))


def test_distractors_grow_with_severity():
    def distractors_per_row(severity):
        config = only(
            "adversarial", n=20, adversarial={"kinds": ["distractor"], "severity": severity}
        )
        rows = rows_of(config)
        assert all(BY_ID[row.parent_id].prompt in row.prompt for row in rows)
        return {sum(sentence in row.prompt for sentence in DISTRACTORS) for row in rows}

    assert distractors_per_row(0.0) == {1}
    assert distractors_per_row(1.0) == {5}


def test_false_premise_injection_negation_and_roleplay():
    for row in rows_of(only("adversarial", ["false_premise"], n=20)):
        assert any(row.prompt.startswith(premise) for premise in FALSE_PREMISES)
    injections = [text for level in INJECTIONS_BY_SEVERITY for text in level]
    for row in rows_of(only("adversarial", ["injection"], n=20)):
        assert any(injection in row.prompt for injection in injections)
    flipped = re.compile(
        r"\b(" + "|".join(re.escape(new) for _, new in NEGATION_FLIPS) + r"|NOT)\b", re.IGNORECASE
    )
    for row in rows_of(only("adversarial", ["negation"], n=30)):
        assert flipped.search(row.prompt)
    for row in rows_of(only("adversarial", ["roleplay"], n=20)):
        assert BY_ID[row.parent_id].prompt in row.prompt and len(row.prompt) > len(
            BY_ID[row.parent_id].prompt
        )


def test_negation_flips_polar_words():
    config = only(
        "adversarial", ["negation"], n=1, adversarial={"kinds": ["negation"], "severity": 1.0}
    )
    seed = PromptRecord.make("Is the largest planet always visible?", "seed")
    (row,) = rows_of(config, [seed])
    assert row.prompt == "Is not the smallest planet never visible?"


# ── domain packs ─────────────────────────────────────────────────────────────────────


def test_arithmetic_pack_rewrites_numbers_and_skips_seeds_without_any():
    rng = random.Random(0)
    settings = PromptsConfig().edge_case
    assert arithmetic.carries("Explain why the sky is blue.", rng, settings) is None
    assert re.fullmatch(
        r"What is 9{3,12} \+ (1|9{3,12})\?|What is 10{3,12} \+ 1\?",
        arithmetic.carries("What is 23 + 19?", rng, settings),
    )
    assert arithmetic.empty_collection(
        "Compute the average of 4, 8, 15 and 42.", rng, settings
    ) in {
        f"Compute the average of {empty}."
        for empty in ("an empty list of numbers", "[]", "no numbers at all", "(an empty set)")
    }
    overflowed = arithmetic.overflow("What is 23 + 19?", rng, settings)
    assert any(
        str(limit) in overflowed for limit in (2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64)
    )


def test_domain_packs_join_the_edge_case_family_with_dotted_names():
    config = only("edge_case", ["unicode"], n=60, domains=["arithmetic", "code"])
    rows = rows_of(config)
    strategies = {row.strategy for row in rows}
    assert {f"edge_case:arithmetic.{name}" for name in arithmetic.EDGE_CASES} <= strategies
    assert {f"edge_case:code.{name}" for name in code.EDGE_CASES} <= strategies
    for row in rows:
        parent = BY_ID[row.parent_id].prompt
        if row.strategy.startswith("edge_case:arithmetic."):
            assert re.search(r"\d", parent)
        if row.strategy.startswith("edge_case:code."):
            assert code.is_code_task(parent)


def test_unknown_domain_pack_is_a_config_error_naming_the_available_ones():
    with pytest.raises(ValidationError, match="available: \\['arithmetic', 'code'\\]"):
        PromptsConfig(domains=["chemistry"])


# ── the mix, determinism, reporting ──────────────────────────────────────────────────


def test_allocation_follows_the_weights_and_caps_the_seed_family():
    assert allocate(10, {"seed": 1.0, "edge_case": 1.0, "adversarial": 0.5}) == {
        "seed": 4,
        "edge_case": 4,
        "adversarial": 2,
    }
    # 40 seeds can fill at most 40 seed rows; the rest goes to the other families by weight.
    assert allocate(200, {"seed": 1.0, "edge_case": 0.5, "adversarial": 0.5}, {"seed": 40}) == {
        "seed": 40,
        "edge_case": 80,
        "adversarial": 80,
    }
    assert allocate(7, {"seed": 1.0, "evolve": 0.0}, {"seed": 5}) == {"seed": 5}


def test_the_mix_hits_the_target_with_each_row_once():
    config = PromptsConfig(
        num_prompts=400, strategies={"seed": 1.0, "edge_case": 0.3, "adversarial": 0.3}
    )
    rows, rejects, report = generate_prompts(SEEDS, config)
    assert len(rows) == 400 and rejects == []
    assert len({row.id for row in rows}) == 400
    # Every seed once; the remaining rows split 0.3 : 0.3.
    half = (400 - len(SEEDS)) // 2
    assert report["per_family"] == {
        "seed": len(SEEDS),
        "edge_case": half,
        "adversarial": 400 - len(SEEDS) - half,
    }
    assert sum(report["per_strategy"].values()) == 400
    assert report["shortfall"] == 0
    seed_rows = [row for row in rows if row.strategy == "seed"]
    assert {row.id for row in seed_rows} == {seed.id for seed in SEEDS}
    assert all(row.parent_id is None for row in seed_rows)
    assert all(row.parent_id in BY_ID for row in rows if row.strategy != "seed")
    # The kinds of a family take turns: their counts differ by at most one.
    edge_counts = [n for name, n in report["per_strategy"].items() if name.startswith("edge_case:")]
    assert max(edge_counts) - min(edge_counts) <= 1


def test_only_seeds_gives_each_seed_once_and_reports_the_shortfall():
    rows, _, report = generate_prompts(
        SEEDS, PromptsConfig(num_prompts=100, strategies={"seed": 1.0})
    )
    assert len(rows) == len(SEEDS)
    assert report["shortfall"] == 100 - len(SEEDS)


def _serialized(rows) -> bytes:
    return json.dumps(
        [[r.id, r.prompt, r.strategy, r.parent_id] for r in rows], ensure_ascii=False
    ).encode()


def test_same_config_gives_a_byte_identical_set_whatever_the_seed_order():
    config = PromptsConfig(
        num_prompts=300,
        strategies={"seed": 1, "edge_case": 1, "adversarial": 1},
        domains=["arithmetic"],
    )
    first, _, report_first = generate_prompts(SEEDS, config)
    shuffled = list(SEEDS)
    random.Random(1).shuffle(shuffled)
    second, _, report_second = generate_prompts(shuffled, config)
    assert _serialized(first) == _serialized(second)
    assert report_first == report_second
    other, _, _ = generate_prompts(SEEDS, config.model_copy(update={"random_seed": 1}))
    assert _serialized(other) != _serialized(first)


def test_same_config_gives_the_same_bytes_in_another_process():
    script = (
        "import json, sys\n"
        "from distillflow.records import PromptRecord\n"
        "from prompts import generate_prompts\n"
        "from prompts.config import PromptsConfig\n"
        "seeds = [PromptRecord.make(json.loads(l)['prompt'], 'seed') for l in open(sys.argv[1], encoding='utf-8')]\n"
        "config = PromptsConfig(num_prompts=200, strategies={'seed': 1, 'edge_case': 1, 'adversarial': 1}, random_seed=7)\n"
        "rows, _, _ = generate_prompts(seeds, config)\n"
        "sys.stdout.buffer.write(json.dumps([[r.id, r.prompt, r.strategy, r.parent_id] for r in rows]).encode())\n"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script, str(GENERAL_SEEDS)],
            capture_output=True,
            check=True,
            cwd=ROOT,
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
        ).stdout
        for hash_seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
    config = PromptsConfig(
        num_prompts=200, strategies={"seed": 1, "edge_case": 1, "adversarial": 1}, random_seed=7
    )
    rows, _, _ = generate_prompts(load_general_seeds(), config)
    assert json.loads(outputs[0]) == [[r.id, r.prompt, r.strategy, r.parent_id] for r in rows]


def test_a_row_depends_only_on_its_parent_strategy_and_random_seed():
    config = only("adversarial", ["typo", "distractor"], n=8)
    small = rows_of(config, SEEDS[:4])
    large = rows_of(config.model_copy(update={"num_prompts": 80}), SEEDS)
    by_key = {(row.parent_id, row.strategy): row.prompt for row in large}
    for row in small:
        assert by_key[(row.parent_id, row.strategy)] == row.prompt


def test_report_has_counts_and_a_diversity_summary():
    _, _, report = generate_prompts(SEEDS, PromptsConfig(num_prompts=100))
    diversity = report["diversity"]
    assert diversity["count"] == report["generated"] == 100
    assert set(diversity) >= {
        "distinct_1",
        "distinct_2",
        "distinct_3",
        "chars",
        "words",
        "char_length_histogram",
    }
    assert sum(diversity["char_length_histogram"].values()) == 100
    assert 0 < diversity["distinct_1"] <= diversity["distinct_2"] <= 1
    json.dumps(report)  # JSON-able, for the manifest and the flow's artifacts


def test_report_summary_covers_every_family_not_only_the_last():
    _, _, report = generate_prompts(SEEDS, PromptsConfig(num_prompts=100))
    rows, _, _ = generate_prompts(SEEDS, PromptsConfig(num_prompts=100))
    assert len(report["diversity_per_family"]) >= 2
    assert report["diversity"] == prompt_diversity_summary(rows)


def test_distinct_n_percentiles_and_histogram_on_known_inputs():
    assert distinct_n(["a b", "a b"], 1) == 0.5
    assert distinct_n(["a b", "a b"], 2) == 0.5
    assert distinct_n(["a b c", "d e f"], 2) == 1.0
    assert distinct_n([""], 1) == 0.0
    assert percentiles([1, 2, 3, 4], (0, 50, 100)) == {"p0": 1, "p50": 2, "p100": 4}
    histogram = length_histogram([0, 1, 16, 17, 20000])
    assert (histogram["0"], histogram["1-16"], histogram["17-32"], histogram["16385+"]) == (
        1,
        2,
        1,
        1,
    )
    summary = prompt_diversity_summary(["hello world", "hello there"])
    assert summary["distinct_1"] == 0.75 and summary["unique_prompts"] == 2


# ── config validation ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategies": {"seeds": 1.0}}, "unknown strategy families"),
        ({"strategies": {"seed": -1.0, "edge_case": 1.0}}, "must be >= 0"),
        ({"strategies": {"seed": 0.0}}, "at least one strategy weight"),
        ({"edge_case": {"kinds": ["unicode", "unicode"]}}, "more than once"),
        ({"edge_case": {"kinds": []}}, "is empty"),
        ({"adversarial": {"severity": 1.5}}, "less than or equal to 1"),
        ({"adversarial": {"kinds": ["typos"]}}, "Input should be"),
        ({"evolve": {"operations": ["deepen", "widen"]}}, "Input should be"),
        ({"self_instruct": {"num_examples": 0}}, "greater than or equal to 1"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_prompts_config_is_rejected_with_the_reason(settings, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        PromptsConfig.model_validate(settings)


def test_teacher_driven_weights_without_a_teacher_are_a_clear_error():
    config = PromptsConfig(strategies={"seed": 1.0, "evolve": 0.5})
    with pytest.raises(ValueError, match="needs the teacher: pass `complete`"):
        generate_prompts(SEEDS, config)


def test_no_seeds_is_a_clear_error():
    with pytest.raises(ValueError, match="no seed prompts"):
        generate_prompts([], PromptsConfig())


ODD_SEEDS = [
    "",
    " ",
    "\n\t",
    "🚀",
    "123",
    "a",
    "x" * 50_000,
    "What is -5.5 + 1,000?",
    "שלום",
    '{"a": 1}',
    "is is is",
]


@pytest.mark.parametrize("severity", [0.0, 1.0])
def test_every_generator_copes_with_odd_seeds(severity):
    """Empty, one-character, huge, digit-only or caseless seeds give a string or None, never an error."""
    config = PromptsConfig(adversarial={"severity": severity})
    generators = [(function, config.edge_case) for function in EDGE_CASES.values()]
    generators += [(function, config.adversarial) for function in ADVERSARIAL.values()]
    generators += [
        (function, config.edge_case)
        for pack in DOMAIN_EDGE_CASES.values()
        for function in pack.values()
    ]
    for (function, settings), text in itertools.product(generators, ODD_SEEDS):
        result = function(text, random.Random(0), settings)
        assert result is None or isinstance(result, str)


def test_report_table_and_markdown_for_artifacts():
    def script(requests):
        return [TeacherAnswer("no prompt block here", "stop", "m") for _ in requests]

    config = PromptsConfig(num_prompts=60, strategies={"seed": 1, "edge_case": 1, "evolve": 0.5})
    rows, rejects, report = generate_prompts(SEEDS, config, script)
    table = report_table(report)
    assert sum(row["generated"] for row in table) == len(rows)
    assert sum(row["rejected"] for row in table) == len(rejects) == report["allocation"]["evolve"]
    assert {row["family"] for row in table} == {"seed", "edge_case", "evolve"}
    markdown = report_markdown(report)
    assert markdown.startswith(f"**{len(rows)}** prompts generated, **{len(rejects)}** rejected")
    assert "| edge_case:unicode |" in markdown and "unparseable: " in markdown
    assert set(report["diversity_per_family"]) == {"seed", "edge_case"}


def test_a_new_domain_pack_is_one_dict_of_functions(monkeypatch):
    date = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")

    def leap_day(text, rng, config):
        if not date.search(text):
            return None
        return date.sub(rng.choice(["2024-02-29", "2100-02-29"]), text, count=1)

    monkeypatch.setitem(DOMAIN_EDGE_CASES, "dates", {"leap_day": leap_day})
    seeds = [*SEEDS, PromptRecord.make("What weekday is 2023-03-01?", "seed")]
    config = only("edge_case", ["empty"], n=4, domains=["dates"])
    rows = rows_of(config, seeds)
    leap = [row for row in rows if row.strategy == "edge_case:dates.leap_day"]
    assert len(leap) == 2
    assert {row.prompt for row in leap} <= {
        "What weekday is 2024-02-29?",
        "What weekday is 2100-02-29?",
    }


def test_fast_distinct_n_matches_counting_tuples():
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(30)]
    token_lists = [[rng.choice(vocabulary) for _ in range(rng.randint(0, 12))] for _ in range(300)]
    fast = distinct_orders(token_lists, (1, 2, 3, 4))
    for n in (1, 2, 3, 4):
        grams = [
            tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)
        ]
        assert fast[n] == pytest.approx(len(set(grams)) / len(grams))
