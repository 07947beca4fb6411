"""`generate_prompts`: seeds → a mixed, deterministic prompt set.

The mix follows `prompts.strategies`: each family (seed, edge_case, adversarial, evolve,
self_instruct) gets `weight / sum(weights)` of `num_prompts`; without `num_prompts`, the
set is sized from the seeds (`quotas_from_seeds`: every seed once, `weight / seed weight`
prompts per seed for each other family). Inside a family the sub-strategies take turns
(round-robin, in config order) until the family's share is met.

Determinism: which seeds a sub-strategy uses, and in what order, comes from a hash of
(`random_seed`, strategy, seed id), not from the input order; each row's randomness comes
from its own `random.Random(f"{random_seed}:{parent_id}:{strategy}")` (with `:{k}` added for
the k-th reuse of a parent). So the same config and seeds give a byte-identical prompt set,
and teacher-driven rows are identical given the same teacher answers (the ledger).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from distillflow.records import PromptRecord, Reject
from distillflow.prompts.adversarial import ADVERSARIAL
from distillflow.prompts.config import FAMILIES, PromptsConfig
from distillflow.prompts.domains import DOMAIN_EDGE_CASES
from distillflow.prompts.edge_cases import EDGE_CASES
from distillflow.prompts.report import generation_report
from distillflow.prompts.teacher_driven import (
    IN_DEPTH_OPERATIONS,
    CompleteFn,
    Messages,
    call_teacher,
    evolve_messages,
    parse_generated_prompt,
    reject_for,
    request_id,
    self_instruct_messages,
)

RuleFn = Callable[[str, random.Random, Any], "str | None"]

# A rule-based sub-strategy that brought no new prompt for this many rounds in a row is done.
DRY_ROUNDS = 3
# More generated prompts per seed than this (on average) is worth a warning: the set is
# then mostly rewrites of a few questions.
VARIANTS_PER_SEED_WARNING = 3.0


def _order_key(*parts: object) -> str:
    return hashlib.sha256(":".join(str(part) for part in parts).encode("utf-8")).hexdigest()


def row_rng(random_seed: int, parent_id: str | None, strategy: str, k: int = 0) -> random.Random:
    """The random generator of one row: depends only on these four values."""
    key = (
        f"{random_seed}:{parent_id}:{strategy}"
        if k == 0
        else f"{random_seed}:{parent_id}:{strategy}:{k}"
    )
    return random.Random(key)


def ordered_parents(
    parents: Sequence[PromptRecord], random_seed: int, strategy: str
) -> list[PromptRecord]:
    """The parents in a pseudo-random order that depends on their ids, not on input order.

    Sorted by the sha256 of (random_seed, strategy, id): the raw digest orders exactly as
    its hex form, at half the memory per parent."""
    prefix = f"{random_seed}:{strategy}:"
    return sorted(parents, key=lambda record: hashlib.sha256((prefix + record.id).encode("utf-8")).digest())


def allocate(
    total: int, weights: dict[str, float], capacity: dict[str, int] | None = None
) -> dict[str, int]:
    """Split `total` across families by weight (largest remainder, ties in FAMILIES order).

    A family with a `capacity` never gets more than it; its excess goes to the others by
    weight. What nobody can take is left unallocated (the caller reports the shortfall).
    """
    capacity = capacity or {}
    quotas = {family: 0 for family in FAMILIES if weights.get(family, 0.0) > 0}
    remaining = total
    open_families = list(quotas)
    while remaining > 0 and open_families:
        weight_sum = sum(weights[family] for family in open_families)
        shares = {family: remaining * weights[family] / weight_sum for family in open_families}
        given = {family: math.floor(share) for family, share in shares.items()}
        leftover = remaining - sum(given.values())
        by_remainder = sorted(
            open_families, key=lambda f: (-(shares[f] - given[f]), FAMILIES.index(f))
        )
        for family in by_remainder[:leftover]:
            given[family] += 1
        remaining = 0
        for family in open_families:
            room = capacity.get(family, total) - quotas[family]
            taken = min(given[family], room)
            quotas[family] += taken
            remaining += given[family] - taken
        open_families = [f for f in open_families if quotas[f] < capacity.get(f, total)]
    return quotas


def quotas_from_seeds(num_seeds: int, weights: dict[str, float]) -> dict[str, int]:
    """Family quotas when `num_prompts` is not set: the seed family takes every seed once and
    each other family `num_seeds * weight / seed weight` (rounded half up); with no seed
    family, the heaviest family takes one prompt per seed and the others in proportion."""
    unit = weights.get("seed", 0.0) or max(weights.values())
    return {
        family: math.floor(num_seeds * weights[family] / unit + 0.5)
        for family in FAMILIES
        if weights.get(family, 0.0) > 0
    }


def seed_warnings(
    config: PromptsConfig, quotas: dict[str, int], num_seeds: int, seeds_unused: int
) -> list[str]:
    """What a user should hear about how the seeds are used: seeds left out by a small
    `num_prompts`, and a set made mostly of variants of few seeds."""
    warnings = []
    seed_quota = quotas.get("seed", 0)
    if config.strategies.get("seed", 0) > 0 and seed_quota < num_seeds:
        warnings.append(
            f"prompts.num_prompts={config.num_prompts} leaves room for {seed_quota} of the {num_seeds} "
            f"seed prompts; {seeds_unused} {'seed is' if seeds_unused == 1 else 'seeds are'} not used in any form "
            "(manifest: seeds_unused). "
            "Leave num_prompts out to use every seed once, or raise it."
        )
    variants = sum(count for family, count in quotas.items() if family != "seed")
    if variants > VARIANTS_PER_SEED_WARNING * num_seeds:
        warnings.append(
            f"prompts: {variants} generated variants from {num_seeds} seed prompts "
            f"({variants / num_seeds:.0f} per seed): the set will be mostly rewrites of the same few "
            "questions. Add seeds, lower prompts.num_prompts, or leave it out to size the set from the seeds."
        )
    return warnings


def _rule_candidates(
    strategy: str,
    function: RuleFn,
    settings: Any,
    parents: Sequence[PromptRecord],
    random_seed: int,
    max_rounds: int,
    seen: set[str],
) -> Iterator[PromptRecord]:
    """New rows of one rule-based sub-strategy: each parent once per round, `max_rounds` rounds.

    Skips rows already in the set (`seen` ids). Stops early after a round in which the
    strategy fit no seed, or after `DRY_ROUNDS` rounds in a row that brought nothing new
    (no variety left).
    """
    order = ordered_parents(parents, random_seed, strategy)
    dry_rounds = 0
    for k in range(max_rounds):
        fits = produced = False
        for parent in order:
            text = function(parent.prompt, row_rng(random_seed, parent.id, strategy, k), settings)
            if text is None or text == parent.prompt:
                continue
            fits = True
            row = PromptRecord.make(text, strategy, parent.id)
            if row.id in seen:
                continue
            produced = True
            yield row
        dry_rounds = 0 if produced else dry_rounds + 1
        if not fits or dry_rounds >= DRY_ROUNDS:
            return


def round_robin(
    streams: dict[str, Iterator[PromptRecord]], quota: int, seen: set[str]
) -> list[PromptRecord]:
    """Take one new row from each stream in turn until `quota` rows or all streams run dry."""
    rows: list[PromptRecord] = []
    active = list(streams)
    while len(rows) < quota and active:
        for name in list(active):
            if len(rows) >= quota:
                break
            # A stream checks `seen` when it yields, but another stream may have added the
            # same prompt since.
            row = next((candidate for candidate in streams[name] if candidate.id not in seen), None)
            if row is None:
                active.remove(name)
                continue
            seen.add(row.id)
            rows.append(row)
    return rows


def _rule_family(
    family: str,
    functions: dict[str, RuleFn],
    settings: Any,
    quota: int,
    seeds: Sequence[PromptRecord],
    random_seed: int,
    seen: set[str],
) -> list[PromptRecord]:
    max_rounds = math.ceil(quota / len(seeds)) + 2
    streams = {
        name: _rule_candidates(
            f"{family}:{name}", function, settings, seeds, random_seed, max_rounds, seen
        )
        for name, function in functions.items()
    }
    return round_robin(streams, quota, seen)


def edge_case_functions(config: PromptsConfig) -> dict[str, RuleFn]:
    """The enabled edge-case generators: built-in kinds, then `<domain>.<name>` per pack."""
    functions: dict[str, RuleFn] = {kind: EDGE_CASES[kind] for kind in config.edge_case.kinds}
    for domain in config.domains:
        for name, function in DOMAIN_EDGE_CASES[domain].items():
            functions[f"{domain}.{name}"] = function
    return functions


def _evolve_family(
    quota: int,
    seeds: Sequence[PromptRecord],
    config: PromptsConfig,
    complete: CompleteFn,
    seen: set[str],
) -> tuple[list[PromptRecord], list[Reject], int]:
    """Evol-Instruct: round 1 rewrites seeds; round k rewrites round k-1's accepted rows.

    Every request counts against the quota, accepted or not (each ends as a row or a
    reject). Returns rows, rejects and the number of teacher requests.
    """
    settings = config.evolve
    rows: list[PromptRecord] = []
    rejects: list[Reject] = []
    requests_sent = 0
    parents = list(seeds)
    for _ in range(settings.max_rounds):
        budget = quota - requests_sent
        if budget <= 0 or not parents:
            break
        # Round-robin over operations, each walking its own ordering of the parents.
        queues = {
            op: iter(ordered_parents(parents, config.random_seed, f"evolve:{op}"))
            for op in settings.operations
        }
        plan: list[tuple[str, PromptRecord]] = []
        active = list(queues)
        while len(plan) < budget and active:
            for op in list(active):
                if len(plan) >= budget:
                    break
                parent = next(queues[op], None)
                if parent is None:
                    active.remove(op)
                else:
                    plan.append((op, parent))
        requests = [evolve_messages(op, parent.prompt) for op, parent in plan]
        answers = call_teacher(complete, requests)
        requests_sent += len(requests)
        accepted_this_round: list[PromptRecord] = []
        for (op, parent), messages, answer in zip(plan, requests, answers):
            strategy = f"evolve:{op}"
            parsed = parse_generated_prompt(
                answer,
                [parent.prompt],
                settings.max_prompt_chars,
                require_new_words=op in IN_DEPTH_OPERATIONS,
                max_similarity=settings.breadth_max_similarity if op == "breadth" else 1.0,
            )
            if parsed.reason is not None:
                rejects.append(reject_for(messages, strategy, parent.id, parsed, answer))
                continue
            row = PromptRecord.make(parsed.prompt, strategy, parent.id)
            if row.id in seen:
                rejects.append(
                    reject_for(messages, strategy, parent.id, parsed, answer, duplicate_of=row.id)
                )
                continue
            seen.add(row.id)
            rows.append(row)
            accepted_this_round.append(row)
        parents = accepted_this_round
    return rows, rejects, requests_sent


def _self_instruct_family(
    quota: int,
    seeds: Sequence[PromptRecord],
    config: PromptsConfig,
    complete: CompleteFn,
    seen: set[str],
) -> tuple[list[PromptRecord], list[Reject], int]:
    """Self-Instruct: each request shows `num_examples` seeds; parent_id = the first one."""
    settings = config.self_instruct
    pool = sorted(seeds, key=lambda record: record.id)
    size = min(settings.num_examples, len(pool))
    plan: list[tuple[list[PromptRecord], Messages]] = []
    planned: set[str] = set()
    for k in range(quota * 3 + 10):
        if len(plan) >= quota:
            break
        rng = row_rng(config.random_seed, None, "self_instruct", k)
        examples = rng.sample(pool, size)
        messages = self_instruct_messages([example.prompt for example in examples])
        key = request_id(messages)
        if key in planned:  # the same examples in the same order: the same request
            continue
        planned.add(key)
        plan.append((examples, messages))
    answers = call_teacher(complete, [messages for _, messages in plan])
    rows: list[PromptRecord] = []
    rejects: list[Reject] = []
    for (examples, messages), answer in zip(plan, answers):
        parent_id = examples[0].id
        parsed = parse_generated_prompt(
            answer,
            [example.prompt for example in examples],
            settings.max_prompt_chars,
            require_new_words=False,
            max_similarity=settings.max_similarity,
        )
        if parsed.reason is not None:
            rejects.append(reject_for(messages, "self_instruct", parent_id, parsed, answer))
            continue
        row = PromptRecord.make(parsed.prompt, "self_instruct", parent_id)
        if row.id in seen:
            rejects.append(
                reject_for(
                    messages, "self_instruct", parent_id, parsed, answer, duplicate_of=row.id
                )
            )
            continue
        seen.add(row.id)
        rows.append(row)
    return rows, rejects, len(plan)


def generate_prompts(
    seeds: list[PromptRecord],
    config: PromptsConfig,
    complete: CompleteFn | None = None,
) -> tuple[list[PromptRecord], list[Reject], dict[str, Any]]:
    """Build the prompt set from `seeds` by the mix in `config.strategies`.

    `complete` sends a batch of chat requests to the teacher and returns one
    `TeacherAnswer` per request, in order (needed only for evolve / self_instruct).
    Returns (prompt rows in a deterministic order, rejects of teacher-driven attempts,
    report with per-strategy counts and a diversity summary).
    """
    if config.uses_teacher() and complete is None:
        families = [f for f in ("evolve", "self_instruct") if config.strategies.get(f, 0) > 0]
        raise ValueError(
            f"prompts.strategies gives {families} a weight > 0, which needs the teacher: pass "
            "`complete` to generate_prompts, or set those weights to 0"
        )
    unique: dict[str, PromptRecord] = {}
    for seed in seeds:
        unique.setdefault(seed.id, seed)
    seed_rows = list(unique.values())
    if not seed_rows:
        raise ValueError("no seed prompts: every family derives prompts from seeds; add seed rows")

    random_seed = config.random_seed
    if config.num_prompts is None:
        quotas = quotas_from_seeds(len(seed_rows), config.strategies)
    else:
        quotas = allocate(config.num_prompts, config.strategies, capacity={"seed": len(seed_rows)})
    target = sum(quotas.values()) if config.num_prompts is None else config.num_prompts
    seen: set[str] = set()
    rows: list[PromptRecord] = []
    rejects: list[Reject] = []
    teacher_requests = 0

    # A generated prompt equal to a seed is never new, whether or not that seed is in the set.
    seen.update(seed.id for seed in seed_rows)
    if quotas.get("seed", 0):
        for seed in ordered_parents(seed_rows, random_seed, "seed")[: quotas["seed"]]:
            plain = seed.strategy == "seed" and seed.parent_id is None  # (records are frozen: share it)
            rows.append(seed if plain else PromptRecord(id=seed.id, prompt=seed.prompt, strategy="seed", parent_id=None))
    if quotas.get("edge_case", 0):
        functions = edge_case_functions(config)
        rows += _rule_family(
            "edge_case",
            functions,
            config.edge_case,
            quotas["edge_case"],
            seed_rows,
            random_seed,
            seen,
        )
    if quotas.get("adversarial", 0):
        functions = {kind: ADVERSARIAL[kind] for kind in config.adversarial.kinds}
        rows += _rule_family(
            "adversarial",
            functions,
            config.adversarial,
            quotas["adversarial"],
            seed_rows,
            random_seed,
            seen,
        )
    if quotas.get("evolve", 0):
        evolved, evolve_rejects, sent = _evolve_family(
            quotas["evolve"], seed_rows, config, complete, seen
        )
        rows += evolved
        rejects += evolve_rejects
        teacher_requests += sent
    if quotas.get("self_instruct", 0):
        made, si_rejects, sent = _self_instruct_family(
            quotas["self_instruct"], seed_rows, config, complete, seen
        )
        rows += made
        rejects += si_rejects
        teacher_requests += sent

    # A seed reaches the set as a `seed` row or as the parent of a generated prompt (or
    # reject); the others are counted, since they appear nowhere else.
    used = {row.id for row in rows if row.strategy == "seed"}
    used |= {record.parent_id for record in [*rows, *rejects] if record.parent_id is not None}
    seeds_unused = sum(1 for seed in seed_rows if seed.id not in used)
    report = generation_report(
        config,
        quotas,
        rows,
        rejects,
        teacher_requests,
        len(seed_rows),
        target=target,
        seeds_unused=seeds_unused,
        warnings=seed_warnings(config, quotas, len(seed_rows), seeds_unused),
    )
    return rows, rejects, report
