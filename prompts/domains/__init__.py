"""Domain packs: domain-specific edge-case generators, one module per domain.

Each module defines `EDGE_CASES`, a dict of `name -> (text, rng, config) -> str | None`
(same signature as `prompts.edge_cases`; None = this seed does not fit the domain).
Enabled packs (`prompts.domains: [arithmetic]`) join the edge_case family with strategy
names `edge_case:<domain>.<name>`. To add a pack, write `prompts/domains/<domain>.py` and
add one line to `DOMAIN_EDGE_CASES` below.
"""

from __future__ import annotations

from distillflow.prompts.domains import arithmetic, code

DOMAIN_EDGE_CASES = {
    "arithmetic": arithmetic.EDGE_CASES,
    "code": code.EDGE_CASES,
}
