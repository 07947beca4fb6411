"""Write a finished dataset: shards into a staging area, swap into place, card, manifest last.

Layout (see DESIGN.md): `data/part-*.parquet`, `rejects/part-*.parquet`, `README.md`,
`manifest.json`. The manifest is removed before anything is rewritten and written after
everything else, so a directory with a manifest is always complete and consistent.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from distillflow.storage.card import write_card
from distillflow.storage.manifest import remove_manifest, write_manifest
from distillflow.storage.parquet import REJECT_SCHEMA, AnsweredRow, ShardWriter, accepted_schema

STAGING = ".staging"


def swap_in_staged(output_dir: Path, staging: Path, parts: tuple[str, ...] = ("data", "rejects")) -> None:
    """Move finished `staging/<part>` directories (or files) over `output_dir/<part>`, then
    drop staging."""

    def remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    for part in parts:
        target, old = output_dir / part, output_dir / f".old-{part}"
        remove(old)
        if target.exists():
            target.rename(old)
        (staging / part).rename(target)
        remove(old)
    shutil.rmtree(staging, ignore_errors=True)


def _secret_free(value: Any, secrets: list[str]) -> Any:
    """Replace any occurrence of a secret value with `***` (defence in depth)."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            if secret and len(secret) >= 6 and secret in value:
                value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: _secret_free(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_secret_free(v, secrets) for v in value]
    return value


def write_dataset(
    output_dir: str | Path,
    rows: list[AnsweredRow],
    reject_rows: list[dict[str, Any]],
    manifest: dict[str, Any],
    card: str,
    with_top_logprobs: bool = False,
    rows_per_shard: int = 100_000,
    secrets: list[str] | None = None,
) -> dict[str, Any]:
    """Write rows and rejects as shards, the card, and the manifest (last). Returns the manifest."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_manifest(output_dir)
    staging = output_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)

    data_writer = ShardWriter(staging / "data", accepted_schema(with_top_logprobs), rows_per_shard, root=staging)
    data_writer.write(rows)
    reject_writer = ShardWriter(staging / "rejects", REJECT_SCHEMA, rows_per_shard, root=staging)
    reject_writer.write(reject_rows)
    shards = {"data": [s.to_dict() for s in data_writer.close()], "rejects": [s.to_dict() for s in reject_writer.close()]}
    return finish_dataset(output_dir, staging, shards, manifest, card, secrets)


def finish_dataset(
    output_dir: str | Path,
    staging: str | Path,
    shards: dict[str, list[dict[str, Any]]],
    manifest: dict[str, Any],
    card: str,
    secrets: list[str] | None = None,
    parts: tuple[str, ...] = ("data", "rejects"),
) -> dict[str, Any]:
    """The one dataset finisher: make what was written under `staging` (`parts`: `data/`,
    `rejects/`, ...) the dataset: mark `output_dir` incomplete, swap them in, write the
    card, then the manifest (last), both free of `secrets`. Returns the manifest as written."""
    output_dir = Path(output_dir)
    remove_manifest(output_dir)
    swap_in_staged(output_dir, Path(staging), parts=parts)
    manifest = dict(manifest)
    manifest["shards"] = shards
    manifest = _secret_free(manifest, secrets or [])
    write_card(output_dir, _secret_free(card, secrets or []), manifest)
    write_manifest(output_dir, manifest)
    return manifest


def logprob_coverage(data_dir: str | Path, requested: int) -> dict[str, Any]:
    """What the stored `top_logprobs` (teacher.generation.top_logprobs: the API's alternatives
    per answer token) give grey-box KD: rows and answer tokens that carry a teacher
    distribution, and how many alternatives per token (`requested`: what was asked for)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from distillflow.storage.parquet import list_shards

    rows = rows_with = tokens = tokens_with = alternatives = 0
    fewest: int | None = None
    for path in list_shards(Path(data_dir)):
        column = pq.read_table(path, columns=["top_logprobs"]).column("top_logprobs").combine_chunks()
        rows += len(column)
        lengths = pc.fill_null(pc.list_value_length(column), 0)
        rows_with += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
        entries = pc.list_flatten(column)
        tokens += len(entries)
        if len(entries):
            per_token = pc.fill_null(pc.list_value_length(pc.struct_field(entries, "top")), 0)
            carrying = pc.filter(per_token, pc.greater(per_token, 0))
            tokens_with += len(carrying)
            alternatives += int(pc.sum(carrying).as_py() or 0)
            if len(carrying):
                least = int(pc.min(carrying).as_py())
                fewest = least if fewest is None else min(fewest, least)
    return {
        "requested_alternatives": requested,
        "rows": rows,
        "rows_with_logprobs": rows_with,
        "answer_tokens": tokens,
        "tokens_with_alternatives": tokens_with,
        "token_share": round(tokens_with / tokens, 4) if tokens else 0.0,
        "mean_alternatives": round(alternatives / tokens_with, 2) if tokens_with else 0.0,
        "fewest_alternatives": fewest,
    }


def logprob_coverage_lines(coverage: dict[str, Any]) -> list[str]:
    """The coverage as sentences (the dataset card, `distill inspect`)."""
    rows, tokens = coverage["rows"], coverage["answer_tokens"]
    return [
        f"rows with teacher logprobs: {coverage['rows_with_logprobs']} of {rows}"
        + (f" ({coverage['rows_with_logprobs'] / rows:.1%})" if rows else ""),
        f"answer tokens with alternatives: {coverage['tokens_with_alternatives']} of {tokens}"
        + (f" ({coverage['token_share']:.1%})" if tokens else ""),
        f"alternatives per token: mean {coverage['mean_alternatives']}, fewest {coverage['fewest_alternatives']} "
        f"(asked for {coverage['requested_alternatives']})",
        "positions a student can use depend on its tokenizer: `distill train` with `objective: "
        "kd_greybox` logs the aligned-position coverage",
    ]


def dataset_card(manifest: dict[str, Any]) -> str:
    """A Markdown dataset card from the manifest's counts."""
    counts = manifest.get("counts", {})
    reasons = manifest.get("reject_reasons", {})
    strategies = manifest.get("accepted_per_strategy", {})
    usage = manifest.get("teacher_usage", {})
    teacher = manifest.get("config", {}).get("teacher", {})
    coverage = manifest.get("teacher_logprobs")  # a build that stored the API's top_logprobs
    lines = [
        f"# {manifest.get('name', 'dataset')}",
        "",
        f"Teacher answers from `{teacher.get('model')}` ({teacher.get('backend')} backend), built by "
        f"distillflow {manifest.get('distillflow_version', '')} at {manifest.get('created_at', '')}.",
        "",
        "## Counts",
        "",
        "| stage | rows |",
        "|---|---:|",
        *[f"| {stage} | {value} |" for stage, value in counts.items()],
        "",
        "## Accepted rows per strategy",
        "",
        "| strategy | rows |",
        "|---|---:|",
        *[f"| {name} | {value} |" for name, value in sorted(strategies.items())],
        "",
        "## Rejects per reason",
        "",
        "| reason | rows |",
        "|---|---:|",
        *[f"| {name} | {value} |" for name, value in sorted(reasons.items())],
        "",
        "## Teacher usage",
        "",
        *[f"- {key}: {value}" for key, value in usage.items() if not isinstance(value, dict)],
        "",
        *(["## Teacher logprobs (grey-box KD)", "", *[f"- {line}" for line in logprob_coverage_lines(coverage)], ""]
          if coverage else []),
        "## Load it",
        "",
        "```python",
        "import datasets",
        'ds = datasets.load_dataset("<this directory>", split="train")  # the accepted rows (data/)',
        "```",
        "",
        "Rejected prompts, with their reason, are in `rejects/` (not loaded as data).",
        "",
    ]
    return "\n".join(lines)


def count_by(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    return dict(sorted(Counter(str(row.get(key)) for row in rows).items()))


def is_heldout(row_id: str, fraction: float) -> bool:
    """Whether the row with this `id` belongs to the held-out split (about `fraction` of rows).

    A pure function of the id (sha256, not Python's salted `hash`), so training and
    evaluation agree on the split in every process and on every rerun; raising `fraction`
    only adds rows to the split, it never moves one out.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0:
        return False
    digest = hashlib.sha256(f"heldout:{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64
