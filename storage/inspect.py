"""`distill inspect DIR`: what a dataset holds, read from its manifest and shards."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from distillflow.storage.manifest import MANIFEST_NAME, read_manifest
from distillflow.storage.parquet import list_shards, read_table

BAR_WIDTH = 40


def length_histogram(lengths: list[int], bins: int = 8) -> list[str]:
    """Text histogram lines `  lo–hi  ████ count` over log-spaced character-length bins."""
    if not lengths:
        return ["  (no rows)"]
    values = np.asarray(lengths, dtype=np.int64)
    top = max(int(values.max()), 1)
    edges = np.unique(np.round(np.geomspace(1, top + 1, bins + 1)).astype(np.int64))
    edges[0] = 0
    counts, _ = np.histogram(values, bins=edges)
    peak = max(int(counts.max()), 1)
    lines = []
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        bar = "█" * int(round(BAR_WIDTH * count / peak))
        lines.append(f"  {low:>7}–{high - 1:<7} {bar} {count}")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    lines.append(f"  p50 {p50:.0f}  p90 {p90:.0f}  p99 {p99:.0f}  max {values.max()}")
    return lines


def _clip(text: str | None, width: int = 160) -> str:
    text = (text or "").replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def inspect_dataset(directory: str | Path, samples: int = 3, seed: int = 0) -> str:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such dataset directory")
    lines: list[str] = []
    manifest = None
    if (directory / MANIFEST_NAME).exists():
        manifest = read_manifest(directory)
        teacher = manifest.get("config", {}).get("teacher", {})
        lines += [
            f"dataset  {manifest.get('name')}  ({directory})",
            f"built    {manifest.get('created_at')}  by distillflow {manifest.get('distillflow_version')}",
            f"teacher  {teacher.get('model')} ({teacher.get('backend')})",
            "",
            "counts:",
            *[f"  {key:<22} {value}" for key, value in manifest.get("counts", {}).items()],
        ]
        counts = manifest.get("counts", {})
        if counts.get("seeds_unused"):
            lines.append(
                f"  ({counts['seeds_unused']} of {counts.get('seeds')} seeds are in the dataset in no form: "
                "see prompts.num_prompts)"
            )
        for warning in (manifest.get("prompt_report") or {}).get("warnings", []):
            lines.append(f"WARNING: {warning}")
        failures = manifest.get("teacher_failures") or {}
        if failures.get("failed"):
            reasons = ", ".join(f"{reason} x{n}" for reason, n in failures.get("reasons", {}).items())
            lines.append(
                f"teacher failed {failures['failed']} of {failures.get('of')} prompts "
                f"(max_error_rate {failures.get('max_error_rate')}): {reasons}"
            )
        usage = manifest.get("teacher_usage") or {}
        if usage:
            lines += ["", "teacher usage:"]
            lines += [f"  {k:<22} {v}" for k, v in usage.items() if not isinstance(v, dict)]
    else:
        lines += [f"dataset  {directory}", f"WARNING: no {MANIFEST_NAME}: the build did not finish (or is running)"]

    data = read_table(directory / "data") if list_shards(directory / "data") else None
    rejects = read_table(directory / "rejects") if list_shards(directory / "rejects") else None
    if data is not None:
        strategies = Counter(data.column("strategy").to_pylist())
        lines += ["", f"accepted rows per strategy ({data.num_rows} rows):"]
        lines += [f"  {name:<32} {count}" for name, count in sorted(strategies.items())]
    if rejects is not None:
        reasons = Counter(rejects.column("reason").to_pylist())
        lines += ["", f"rejects per reason ({rejects.num_rows} rows):"]
        lines += [f"  {name:<32} {count}" for name, count in sorted(reasons.items())]
    if data is not None and data.num_rows:
        lines += ["", "prompt length (chars):"]
        lines += length_histogram(pc.utf8_length(data.column("prompt")).to_pylist())
        lines += ["", "response length (chars):"]
        lines += length_histogram(pc.utf8_length(data.column("response")).to_pylist())
        rng = random.Random(seed)
        picks = sorted(rng.sample(range(data.num_rows), min(samples, data.num_rows)))
        lines += ["", "samples:"]
        for index in picks:
            row = data.slice(index, 1).to_pylist()[0]
            lines += [
                f"  [{row['strategy']}] {row['id']}",
                f"    prompt:   {_clip(row['prompt'])}",
                f"    response: {_clip(row['response'])}",
            ]
    if rejects is not None and rejects.num_rows:
        rng = random.Random(seed + 1)
        picks = sorted(rng.sample(range(rejects.num_rows), min(samples, rejects.num_rows)))
        lines += ["", "reject samples:"]
        for index in picks:
            row = rejects.slice(index, 1).to_pylist()[0]
            lines += [f"  [{row['reason']}] {_clip(row['prompt'], 100)}  — {_clip(row['detail'], 80)}"]
    return "\n".join(lines)
