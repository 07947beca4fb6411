"""The generation report: counts per strategy and reason, and the diversity of the set.

`generation_report` is what `generate_prompts` returns as its third value (it goes into the
manifest); `report_table` and `report_markdown` turn it into rows / Markdown for a flow's
artifacts or a CLI summary.
"""

from __future__ import annotations

from array import array
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from distillflow.prompts.config import FAMILIES, PromptsConfig
from distillflow.prompts.diversity import (
    distinct_of,
    per_strategy_counts,
    prompt_diversity_summary,
    word_counts,
)
from distillflow.records import PromptRecord, Reject


def family_of(strategy: str) -> str:
    """`edge_case:unicode` → `edge_case`; `seed` → `seed`."""
    return strategy.split(":", 1)[0]


def generation_report(
    config: PromptsConfig,
    quotas: dict[str, int],
    rows: Sequence[PromptRecord],
    rejects: Sequence[Reject],
    teacher_requests: int,
    num_seeds: int,
    target: int | None = None,
    seeds_unused: int = 0,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Counts per strategy and family, reject reasons, and the diversity of the set.

    `target`: the prompt count aimed at (default `num_prompts`). `shortfall`: how far rows +
    rejects fall short of it (e.g. fewer seeds than the seed share, or strategies that ran
    out of new prompts). `seeds_unused`: seeds that are neither a `seed` row nor the parent
    of a generated prompt (they reach the dataset in no form).
    """
    target = config.num_prompts if target is None else target
    families = Counter(family_of(row.strategy) for row in rows)
    word_lengths = word_counts(row.prompt for row in rows)
    diversity = prompt_diversity_summary(rows, word_lengths)
    members: dict[str, array] = defaultdict(lambda: array("q"))
    for index, row in enumerate(rows):
        members[family_of(row.strategy)].append(index)
    family_diversity = {}
    for family in FAMILIES:
        if family in members:
            indices = np.frombuffer(members[family], dtype=np.int64)
            lengths = np.sort(word_lengths[indices])
            distinct_2 = (
                diversity["distinct_2"]  # one family: the whole set
                if len(indices) == len(rows)
                else round(distinct_of([rows[i].prompt for i in indices.tolist()], (2,))[2], 6)
            )
            family_diversity[family] = {"distinct_2": distinct_2, "median_words": int(lengths[(len(lengths) - 1) // 2])}
    produced = len(rows) + len(rejects)
    return {
        "target": target,
        "num_seeds": num_seeds,
        "seeds_unused": seeds_unused,
        "allocation": dict(quotas),
        "generated": len(rows),
        "rejected": len(rejects),
        "shortfall": max(0, target - produced),
        "teacher_requests": teacher_requests,
        "per_family": {family: families.get(family, 0) for family in FAMILIES if family in quotas},
        "per_strategy": per_strategy_counts(rows),
        "rejects_per_strategy": dict(sorted(Counter(r.strategy for r in rejects).items())),
        "rejects_per_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
        "diversity": diversity,
        "diversity_per_family": family_diversity,
        "warnings": list(warnings),
    }


def report_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per strategy: `strategy`, `family`, `generated`, `rejected` (sorted by name)."""
    generated = report["per_strategy"]
    rejected = report["rejects_per_strategy"]
    return [
        {
            "strategy": strategy,
            "family": family_of(strategy),
            "generated": generated.get(strategy, 0),
            "rejected": rejected.get(strategy, 0),
        }
        for strategy in sorted(set(generated) | set(rejected))
    ]


def report_markdown(report: dict[str, Any]) -> str:
    """A short Markdown summary: totals, the per-strategy table, diversity, reject reasons."""
    diversity = report["diversity"]
    chars = diversity["chars"]
    totals = (
        f"**{report['generated']}** prompts generated, **{report['rejected']}** rejected "
        f"(target {report['target']}, shortfall {report['shortfall']}, "
        f"{report['teacher_requests']} teacher requests, {report['num_seeds']} seeds, "
        f"{report.get('seeds_unused', 0)} of them unused)."
    )
    spread = (
        f"distinct-1/2/3: {diversity['distinct_1']:.3f} / {diversity['distinct_2']:.3f} / "
        f"{diversity['distinct_3']:.3f}; characters p10/p50/p90: "
        f"{chars.get('p10', 0)} / {chars.get('p50', 0)} / {chars.get('p90', 0)}"
    )
    lines = [totals, "", "| strategy | generated | rejected |", "|---|---:|---:|"]
    lines += [
        f"| {r['strategy']} | {r['generated']} | {r['rejected']} |" for r in report_table(report)
    ]
    lines += ["", spread]
    for warning in report.get("warnings", []):
        lines += ["", f"**Warning:** {warning}"]
    if report["rejects_per_reason"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in report["rejects_per_reason"].items())
        lines += ["", f"reject reasons: {reasons}"]
    return "\n".join(lines) + "\n"
