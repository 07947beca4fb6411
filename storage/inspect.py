"""`distill inspect DIR`: what a dataset holds, read from its manifest and shards."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
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


@dataclass
class DatasetView:
    """What `distill inspect` shows, read once; rendered as text (`render_text`) or as an
    HTML page (`storage.report`)."""

    directory: Path
    manifest: dict[str, Any] | None
    data: pa.Table | None
    rejects: pa.Table | None
    warnings: list[str] = field(default_factory=list)  # the build's own warnings
    seeds_note: str | None = None  # seeds that reached the dataset in no form
    teacher_failures: str | None = None  # teacher errors within the failure budget

    @property
    def counts(self) -> dict[str, Any]:
        return (self.manifest or {}).get("counts", {})

    @property
    def usage(self) -> dict[str, Any]:
        """Teacher usage (tokens, requests, cost) as flat key → value."""
        usage = (self.manifest or {}).get("teacher_usage") or {}
        return {key: value for key, value in usage.items() if not isinstance(value, dict)}

    def strategies(self) -> dict[str, int]:
        return dict(sorted(Counter(self.data.column("strategy").to_pylist()).items())) if self.data is not None else {}

    def finish_reasons(self) -> dict[str, int]:
        """Accepted rows per finish_reason: `stop` (eos or a stop string), `length` (max_tokens ran out)."""
        if self.data is None or "finish_reason" not in self.data.column_names:
            return {}
        counts = Counter(str(reason) for reason in self.data.column("finish_reason").to_pylist())
        return dict(sorted(counts.items()))

    def reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(self.rejects.column("reason").to_pylist()).items())) if self.rejects is not None else {}

    def lengths(self, column: str) -> list[int]:
        if self.data is None or not self.data.num_rows:
            return []
        return pc.utf8_length(self.data.column(column)).to_pylist()

    def sample(self, table: pa.Table | None, count: int, seed: int) -> list[dict[str, Any]]:
        if table is None or not table.num_rows:
            return []
        picks = sorted(random.Random(seed).sample(range(table.num_rows), min(count, table.num_rows)))
        return [table.slice(index, 1).to_pylist()[0] for index in picks]


def load_view(directory: str | Path) -> DatasetView:
    """Read a dataset directory's manifest (if any), data and rejects."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such dataset directory")
    manifest = read_manifest(directory) if (directory / MANIFEST_NAME).exists() else None
    data = read_table(directory / "data") if list_shards(directory / "data") else None
    rejects = read_table(directory / "rejects") if list_shards(directory / "rejects") else None
    view = DatasetView(directory, manifest, data, rejects)
    if manifest is None:
        view.warnings.append(f"no {MANIFEST_NAME}: the build did not finish (or is running)")
        return view
    counts = view.counts
    if counts.get("seeds_unused"):
        view.seeds_note = (
            f"{counts['seeds_unused']} of {counts.get('seeds')} seeds are in the dataset in no form: "
            "see prompts.num_prompts"
        )
    view.warnings += (manifest.get("prompt_report") or {}).get("warnings", [])
    failures = manifest.get("teacher_failures") or {}
    if failures.get("failed"):
        reasons = ", ".join(f"{reason} x{n}" for reason, n in failures.get("reasons", {}).items())
        view.teacher_failures = (
            f"teacher failed {failures['failed']} of {failures.get('of')} prompts "
            f"(max_error_rate {failures.get('max_error_rate')}): {reasons}"
        )
    return view


def header_lines(view: DatasetView) -> list[tuple[str, str]]:
    """(label, value) pairs that open the view."""
    if view.manifest is None:
        return [("dataset", str(view.directory))]
    manifest = view.manifest
    teacher = manifest.get("config", {}).get("teacher", {})
    return [
        ("dataset", f"{manifest.get('name')}  ({view.directory})"),
        ("built", f"{manifest.get('created_at')}  by distillflow {manifest.get('distillflow_version')}"),
        ("teacher", f"{teacher.get('model')} ({teacher.get('backend')})"),
    ]


def render_text(view: DatasetView, samples: int = 3, seed: int = 0) -> str:
    """The terminal view of `distill inspect`."""
    lines = [f"{label:<8} {value}" for label, value in header_lines(view)]
    if view.manifest is None:
        lines += [f"WARNING: {warning}" for warning in view.warnings]
    else:
        lines += ["", "counts:", *[f"  {key:<22} {value}" for key, value in view.counts.items()]]
        if view.seeds_note:
            lines.append(f"  ({view.seeds_note})")
        lines += [f"WARNING: {warning}" for warning in view.warnings]
        if view.teacher_failures:
            lines.append(view.teacher_failures)
        if view.usage:
            lines += ["", "teacher usage:", *[f"  {k:<22} {v}" for k, v in view.usage.items()]]
        capture = view.manifest.get("capture") or {}
        if capture:
            lines += ["", "captured teacher top-k (--html: the probability mass it covers):"]
            lines += [
                f"  {key:<22} {capture[key]}"
                for key in ("k", "model", "rows", "positions", "stored_bytes_per_token")
                if key in capture
            ]
    if view.data is not None:
        lines += ["", f"accepted rows per strategy ({view.data.num_rows} rows):"]
        lines += [f"  {name:<32} {count}" for name, count in view.strategies().items()]
        if view.finish_reasons():
            lines += ["", "accepted rows per finish reason (stop: eos or a stop string; length: max_tokens):"]
            lines += [f"  {name:<32} {count}" for name, count in view.finish_reasons().items()]
    if view.rejects is not None:
        lines += ["", f"rejects per reason ({view.rejects.num_rows} rows):"]
        lines += [f"  {name:<32} {count}" for name, count in view.reasons().items()]
    if view.data is not None and view.data.num_rows:
        lines += ["", "prompt length (chars):", *length_histogram(view.lengths("prompt"))]
        lines += ["", "response length (chars):", *length_histogram(view.lengths("response"))]
        lines += ["", "samples:"]
        for row in view.sample(view.data, samples, seed):
            lines += [
                f"  [{row['strategy']}] {row['id']}",
                f"    prompt:   {_clip(row['prompt'])}",
                f"    response: {_clip(row['response'])}",
            ]
    if view.rejects is not None and view.rejects.num_rows:
        lines += ["", "reject samples:"]
        for row in view.sample(view.rejects, samples, seed + 1):
            lines += [f"  [{row['reason']}] {_clip(row['prompt'], 100)}  — {_clip(row['detail'], 80)}"]
    return "\n".join(lines)


def inspect_dataset(directory: str | Path, samples: int = 3, seed: int = 0) -> str:
    """The terminal view of the dataset in `directory`."""
    return render_text(load_view(directory), samples=samples, seed=seed)
