"""filter_prompts: every prompt-side stage, reasons and duplicate_of, order and batch invariance."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from distillflow.records import PromptRecord
from distillflow.tasks.filters.config import FiltersConfig
from distillflow.tasks.filters.passes import filter_prompts

from .test_dedup import planted_corpus, random_prompt

PARAPHRASES = [
    ("How do I bake sourdough bread at home?", "What is the way to make sourdough bread at home?"),
    ("Explain quantum entanglement.", "Can you explain quantum entanglement to me?"),
    ("What are the health benefits of green tea?", "Which health benefits does green tea have?"),
]
DISTINCT = [
    "Write a poem about the sea.",
    "How do I reverse a linked list in C?",
    "Summarise the causes of the French Revolution.",
    "What is the boiling point of water on Mount Everest?",
]


@pytest.fixture(scope="session")
def embed():
    """The offline sentence-embedding model, loaded once for the session."""
    from distillflow.tasks.filters.config import SemanticDedupConfig
    from distillflow.tasks.filters.semantic import embed_texts

    config = SemanticDedupConfig()
    embed_texts(["warm up"], config)
    return lambda texts: embed_texts(texts, config)


def records(texts, strategies=None):
    strategies = strategies or ["seed"] * len(texts)
    return [PromptRecord.make(text, strategy) for text, strategy in zip(texts, strategies)]


def test_every_drop_has_a_reason_and_duplicates_point_at_kept_rows():
    texts, _ = planted_corpus()
    texts = texts + [texts[0], "  " + texts[5].lower()]  # plus exact copies
    recs = records(texts)
    kept, rejects = filter_prompts(recs, FiltersConfig(near_dedup={"threshold": 0.7}))
    assert len(kept) + len(rejects) == len(recs)
    kept_ids = {r.id for r in kept}
    assert {r.reason for r in rejects} == {"exact_duplicate", "near_duplicate"}
    for reject in rejects:
        assert reject.detail and reject.duplicate_of in kept_ids
    # kept records keep their input order
    positions = [recs.index(r) for r in kept]
    assert positions == sorted(positions)


@pytest.mark.parametrize("batch_size", [1, 5, 1000])
def test_results_identical_across_batch_sizes(batch_size):
    texts, _ = planted_corpus(seed=2)
    recs = records(texts)
    config = FiltersConfig(near_dedup={"threshold": 0.7})
    reference = filter_prompts(recs, config)
    config.batch_size = batch_size
    kept, rejects = filter_prompts(recs, config)
    assert kept == reference[0]
    assert [(r.id, r.reason, r.duplicate_of) for r in rejects] == [
        (r.id, r.reason, r.duplicate_of) for r in reference[1]
    ]


def test_semantic_paraphrases_are_found_and_distinct_prompts_survive(embed):
    texts = [a for a, _ in PARAPHRASES] + DISTINCT + [b for _, b in PARAPHRASES]
    config = FiltersConfig(semantic_dedup={"enabled": True, "threshold": 0.85})
    kept, rejects = filter_prompts(records(texts), config, embed=embed)
    assert [r.prompt for r in kept] == [a for a, _ in PARAPHRASES] + DISTINCT
    assert [r.reason for r in rejects] == ["semantic_duplicate"] * 3
    by_text = {r.prompt: r.id for r in kept}
    assert [r.duplicate_of for r in rejects] == [by_text[a] for a, _ in PARAPHRASES]
    assert all("cosine" in r.detail for r in rejects)


def test_semantic_dedup_with_the_vector_index(embed, monkeypatch):
    """Above the exact-search size the usearch index finds the same pairs."""
    import distillflow.tasks.filters.semantic as semantic
    monkeypatch.setattr(semantic, "EXACT_SEARCH_MAX_ROWS", 2)
    texts = [a for a, _ in PARAPHRASES] + DISTINCT + [b for _, b in PARAPHRASES]
    config = FiltersConfig(semantic_dedup={"enabled": True, "threshold": 0.85})
    kept, rejects = filter_prompts(records(texts), config, embed=embed)
    assert len(kept) == len(PARAPHRASES) + len(DISTINCT)
    assert [r.reason for r in rejects] == ["semantic_duplicate"] * 3


def test_decontamination_drops_prompts_overlapping_the_eval_set(tmp_path):
    question = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?"
    )
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"question": question}) + "\n" + json.dumps({"question": "Name three primes."}) + "\n")
    texts = [
        "Question: " + question,  # the test item with a prefix
        "Name three primes.",  # a short eval item, verbatim
        "Natalia sold pencils to her classmates; how many did she sell?",  # shares a few words only
        "Write a haiku about autumn leaves.",
    ]
    config = FiltersConfig(decontamination={"eval_files": [str(eval_file)]})
    kept, rejects = filter_prompts(records(texts), config)
    assert [r.prompt for r in kept] == texts[2:]
    assert [r.reason for r in rejects] == ["contaminated", "contaminated"]
    assert "eval set" in rejects[0].detail


def test_decontamination_reports_a_missing_eval_file(tmp_path):
    config = FiltersConfig(decontamination={"eval_files": [str(tmp_path / "missing.jsonl")]})
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        filter_prompts(records(["a prompt"]), config)


def test_diversity_keeps_k_covering_clusters_and_honours_quotas():
    rng = random.Random(0)
    # 4 topics x 10 light variations; edge cases are one small topic
    topics = [random_prompt(rng, 12) for _ in range(4)]
    texts, strategies = [], []
    for topic_index, topic in enumerate(topics):
        for variant in range(10):
            texts.append(f"{topic} variant {variant}")
            strategies.append("edge_case:unicode" if topic_index == 3 else "seed")
    config = FiltersConfig(
        exact_dedup=False, near_dedup={"enabled": False},
        diversity={"keep": 4, "embedding": "hashed"},
    )
    kept, rejects = filter_prompts(records(texts, strategies), config)
    assert len(kept) == 4 and len(rejects) == 36
    assert {texts.index(r.prompt) // 10 for r in kept} == {0, 1, 2, 3}  # one per topic
    assert {r.reason for r in rejects} == {"diversity"}

    config.diversity = {"keep": 4, "embedding": "hashed", "quotas": {"edge_case": 3}}
    kept, _ = filter_prompts(records(texts, strategies), config)
    assert sum(r.strategy.startswith("edge_case") for r in kept) >= 3

    config.diversity = {"keep": 4, "embedding": "hashed", "method": "facility_location"}
    kept, _ = filter_prompts(records(texts, strategies), config)
    assert len(kept) == 4


def test_diversity_on_sentence_embeddings(embed):
    texts = [a for a, _ in PARAPHRASES] + [b for _, b in PARAPHRASES]
    config = FiltersConfig(diversity={"keep": 3})
    kept, rejects = filter_prompts(records(texts), config, embed=embed)
    # one of each paraphrase pair is kept
    pair_of = {t: i for i, pair in enumerate(PARAPHRASES) for t in pair}
    assert sorted(pair_of[r.prompt] for r in kept) == [0, 1, 2]


def test_empty_input():
    assert filter_prompts([], FiltersConfig()) == ([], [])


def test_stage_order_contamination_before_dedup(tmp_path):
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("the quick brown fox jumps over the lazy dog near the river bank\n")
    texts = ["The quick brown fox jumps over the lazy dog near the river bank", "the quick brown fox jumps over the lazy dog near the river bank"]
    config = FiltersConfig(decontamination={"eval_files": [str(eval_file)]})
    kept, rejects = filter_prompts(records(texts), config)
    assert kept == [] and [r.reason for r in rejects] == ["contaminated", "contaminated"]
    assert np.all([r.duplicate_of is None for r in rejects])


def test_rule_based_variants_survive_dedup_against_their_own_parent():
    from distillflow.records import PromptRecord
    from distillflow.tasks.filters.config import FiltersConfig
    from distillflow.tasks.filters.passes import filter_prompts

    seed = PromptRecord.make("What is the capital of France?", "seed")
    casing = PromptRecord.make("wHAT is THE capital OF france?", "adversarial:casing", seed.id)
    spacing = PromptRecord.make("What  is the   capital of France?", "adversarial:whitespace", seed.id)
    other_seed = PromptRecord.make("what is the capital of france?", "seed")  # a true duplicate
    records = [seed, casing, spacing, other_seed]

    kept, rejects = filter_prompts(records, FiltersConfig())
    assert [r.strategy for r in kept] == ["seed", "adversarial:casing", "adversarial:whitespace"]
    assert [(r.reason, r.duplicate_of) for r in rejects] == [("exact_duplicate", seed.id)]

    kept, rejects = filter_prompts(records, FiltersConfig(keep_variants_of_parent=False))
    assert [r.strategy for r in kept] == ["seed"]
    assert len(rejects) == 3
