"""Config of prompt generation (the `prompts:` section).

`strategies` gives the mix: each family's weight is its share of `num_prompts`. Each
family has its own sub-section that picks which of its sub-strategies run and how hard.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from distillflow.base_config import StrictModel

FAMILIES = ("seed", "edge_case", "adversarial", "evolve", "self_instruct")
TEACHER_FAMILIES = ("evolve", "self_instruct")

EdgeCaseKind = Literal[
    "empty",
    "long",
    "numbers",
    "unicode",
    "mixed_language",
    "malformed",
    "contradictory",
    "multi_question",
    "format_constraint",
]
EDGE_CASE_KINDS: tuple[str, ...] = EdgeCaseKind.__args__

AdversarialKind = Literal[
    "typo",
    "char_noise",
    "casing",
    "whitespace",
    "word_swap",
    "distractor",
    "false_premise",
    "injection",
    "negation",
    "roleplay",
]
ADVERSARIAL_KINDS: tuple[str, ...] = AdversarialKind.__args__

# The domain packs under prompts/domains/ (prompts.domains.DOMAIN_EDGE_CASES has one entry
# per name; a test keeps the two in step). Named here so that validating a config does not
# import the generators.
DOMAIN_PACKS: tuple[str, ...] = ("arithmetic", "code")

EvolveOperation = Literal[
    "add_constraints",
    "deepen",
    "concretize",
    "reasoning",
    "complicate_input",
    "breadth",
    "tricky_edge_case",
    "tricky_adversarial",
]
EVOLVE_OPERATIONS: tuple[str, ...] = EvolveOperation.__args__


def _no_repeats(values: list[str], key: str) -> list[str]:
    if not values:
        raise ValueError(f"{key} is empty; list at least one, or set the family's weight to 0")
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{key} lists {repeated} more than once; list each once")
    return values


class EdgeCaseConfig(StrictModel):
    """Edge-case variants of seed prompts (empty input, very long input, unicode, format
    demands, ...), each kept with the seed it came from."""

    kinds: list[EdgeCaseKind] = Field(
        default_factory=lambda: list(EDGE_CASE_KINDS),
        description="Rule-based edge-case generators to run, in this order (round-robin).",
    )
    long_input_tokens: int = Field(
        2048,
        ge=16,
        le=1_000_000,
        description="Token budget that `long` prompts approach (they land at 90-100% of it).",
    )
    chars_per_token: float = Field(
        4.0,
        gt=0.5,
        le=16.0,
        description="Characters per token used to estimate token counts (no tokenizer needed).",
    )

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        return _no_repeats(value, "edge_case.kinds")


class AdversarialConfig(StrictModel):
    """Adversarial variants of seed prompts (typos, casing, distractors, injected
    instructions, role play, false premises), with protected spans kept verbatim."""

    kinds: list[AdversarialKind] = Field(
        default_factory=lambda: list(ADVERSARIAL_KINDS),
        description="Rule-based perturbations to run, in this order (round-robin).",
    )
    severity: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="0 = the lightest perturbation of each kind, 1 = the heaviest.",
    )
    max_typo_edits: int = Field(
        6,
        ge=1,
        le=100,
        description="`typo` and `char_noise` stay within this Levenshtein distance at "
        "severity 1 (scaled down by severity, at least 1 edit).",
    )

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        return _no_repeats(value, "adversarial.kinds")


class EvolveConfig(StrictModel):
    """Evol-Instruct style rewrites of seed prompts by the teacher (deeper, broader,
    more constrained); a too-long rewrite, or an in-breadth one too close to its parent, is
    dropped."""

    operations: list[EvolveOperation] = Field(
        default_factory=lambda: list(EVOLVE_OPERATIONS),
        description="Teacher-driven rewrites to run: Evol-Instruct in-depth (add_constraints, "
        "deepen, concretize, reasoning, complicate_input), in-breadth (breadth), and "
        "tricky_edge_case / tricky_adversarial variants.",
    )
    max_rounds: int = Field(
        3,
        ge=1,
        le=20,
        description="Evolution rounds: round 1 rewrites seeds, round k rewrites the prompts "
        "accepted in round k-1, until the evolve share of num_prompts is used up.",
    )
    max_prompt_chars: int = Field(
        8000, ge=16, description="A rewritten prompt longer than this is rejected (`too_long`)."
    )
    breadth_max_similarity: float = Field(
        0.7,
        gt=0.0,
        le=1.0,
        description="A `breadth` prompt whose ROUGE-L F1 with its parent is above this is "
        "rejected (`too_similar`): in-breadth must ask something new; 1.0 turns it off.",
    )

    @field_validator("operations")
    @classmethod
    def _operations(cls, value: list[str]) -> list[str]:
        return _no_repeats(value, "evolve.operations")


class SelfInstructConfig(StrictModel):
    """New prompts written by the teacher from a few seed examples (self-instruct); near
    copies of existing prompts are dropped."""

    num_examples: int = Field(
        3, ge=1, le=16, description="Seed prompts shown to the teacher as examples per request."
    )
    max_prompt_chars: int = Field(
        8000, ge=16, description="A new prompt longer than this is rejected (`too_long`)."
    )
    max_similarity: float = Field(
        0.7,
        gt=0.0,
        le=1.0,
        description="A new prompt whose ROUGE-L F1 with any example is above this is rejected "
        "(`too_similar`), as in Self-Instruct; 1.0 turns the check off.",
    )


class PromptsConfig(StrictModel):
    """How the prompt set is made from the seeds: the seeds themselves plus edge-case,
    adversarial, evolved and self-instruct variants, mixed by weight."""

    num_prompts: int | None = Field(
        None,
        ge=1,
        description="Target prompt count after generation, before filtering. null (the default) = "
        "sized from the seeds: every seed once, and seeds x weight / seed weight prompts of each "
        "other family (with no seed family: one prompt per seed for the heaviest family).",
    )
    strategies: dict[str, float] = Field(
        default_factory=lambda: {"seed": 1.0, "edge_case": 0.3, "adversarial": 0.3, "evolve": 0.0},
        description="Mix weights per strategy family (seed, edge_case, adversarial, evolve, "
        "self_instruct): each family gets weight / sum(weights) of num_prompts. `seed` = the "
        "seed prompts themselves, each at most once.",
    )
    random_seed: int = Field(
        0, description="Same config + same random_seed = byte-identical prompt set."
    )
    edge_case: EdgeCaseConfig = EdgeCaseConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    evolve: EvolveConfig = EvolveConfig()
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    domains: list[str] = Field(
        default_factory=list,
        description="Domain packs whose edge-case generators join the edge_case family "
        "(see prompts/domains/, e.g. `arithmetic`, `code`).",
    )

    @field_validator("strategies")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown strategy families {unknown}; use some of {list(FAMILIES)}")
        negative = sorted(name for name, weight in value.items() if not weight >= 0)
        if negative:
            raise ValueError(f"weights of {negative} must be >= 0")
        if not any(weight > 0 for weight in value.values()):
            raise ValueError("at least one strategy weight must be > 0 (e.g. seed: 1.0)")
        return value

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in DOMAIN_PACKS]
        if unknown:
            raise ValueError(
                f"unknown domain packs {unknown}; available: {sorted(DOMAIN_PACKS)} "
                "(add a module under prompts/domains/ and its name to DOMAIN_PACKS to create one)"
            )
        if len(set(value)) != len(value):
            raise ValueError("domains lists a pack more than once; list each once")
        return value

    def uses_teacher(self) -> bool:
        """Whether a teacher-driven family (evolve, self_instruct) has a weight > 0."""
        return any(self.strategies.get(family, 0.0) > 0 for family in TEACHER_FAMILIES)
