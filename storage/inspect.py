"""`distill inspect DIR`: what a dataset holds, read from its manifest and shards."""

from __future__ import annotations

import random
import re
import textwrap
from collections import Counter
from itertools import zip_longest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillflow.storage.dataset import logprob_coverage_lines
from distillflow.storage.manifest import MANIFEST_NAME, read_manifest
from distillflow.storage.parquet import list_shards, read_table

BAR_WIDTH = 40
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate", "semantic_duplicate")
DUPLICATE_PAIRS_SHOWN = 10  # duplicates shown next to the row they duplicate
DIVERSITY_ROWS = 2_000  # rows per strategy that distinct-n and the spread are computed over
EMBEDDING_COLUMNS = ("prompt_embedding", "embedding")  # list<float> columns read as prompt embeddings

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# Whitespace a reader cannot tell apart: line breaks, tabs, and the other unicode spaces.
_INVISIBLE = {"\n": "⏎", "\r": "␍", "\t": "→", "\u00a0": "⍽", "\u200b": "⍽", "\ufeff": "⍽", "\u3000": "⍽"}
_SPACE_RUN = re.compile(r"^ +| +$| {2,}")


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """`1 seed`, `2 seeds` (or `plural_form`)."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def visible_whitespace(text: str | None, keep_newlines: bool = False) -> str:
    """`text` with the whitespace a reader cannot see made visible: ⏎ a line break, → a tab,
    ␍ a carriage return, ⍽ a non-breaking or zero-width space, · each space at either end or in
    a run of two or more; `∅ (empty)` for an empty text. `keep_newlines`: ⏎ is followed by the
    line break itself (for multi-line displays)."""
    if not text:
        return "∅ (empty)"
    text = _SPACE_RUN.sub(lambda match: "·" * len(match.group()), text)
    out = []
    for char in text:
        mark = _INVISIBLE.get(char)
        if mark is None and char.isspace() and char != " ":
            mark = "⍽"
        out.append(char if mark is None else mark + ("\n" if keep_newlines and char == "\n" else ""))
    return "".join(out)


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
    text = visible_whitespace(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def distinct_n(texts: list[str], orders: tuple[int, ...] = (1, 2, 3)) -> dict[int, float]:
    """Unique word n-grams / all word n-grams over `texts`, for each n (0.0 when none)."""
    token_lists = [_WORD.findall(text.lower()) for text in texts]
    out = {}
    for n in orders:
        seen: set = set()
        total = 0
        for tokens in token_lists:
            seen.update(tokens if n == 1 else zip(*(tokens[i:] for i in range(n))))
            total += max(len(tokens) - n + 1, 0)
        out[n] = len(seen) / total if total else 0.0
    return out


def embedding_column(table: pa.Table | None) -> str | None:
    """The first column of EMBEDDING_COLUMNS that holds lists of floats, or None."""
    for name in EMBEDDING_COLUMNS:
        if table is not None and name in table.column_names:
            kind = table.schema.field(name).type
            if (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind)) \
                    and pa.types.is_floating(kind.value_type):
                return name
    return None


def embedding_matrix(table: pa.Table, column: str, rows: np.ndarray | None = None) -> np.ndarray:
    """(N, D) float32 embeddings of `rows` (all when None); rows without one are zeros."""
    values = table.column(column).to_pylist() if rows is None else table.column(column).take(pa.array(rows)).to_pylist()
    width = max((len(value) for value in values if value is not None), default=0)
    matrix = np.zeros((len(values), width), dtype=np.float32)
    for index, value in enumerate(values):
        if value is not None and len(value) == width:
            matrix[index] = value
    return matrix


def embedding_spread(matrix: np.ndarray) -> float:
    """Mean cosine distance of each (L2-normalised) embedding to the set's mean direction:
    0 when every prompt points the same way, larger for a more spread-out set."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit = matrix[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    if not len(unit):
        return 0.0
    centre = unit.mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    return float(1.0 - (unit @ centre).mean())


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
    def paid(self) -> bool:
        """Whether the teacher is paid per request (an API), not a model run in-process."""
        teacher = ((self.manifest or {}).get("config") or {}).get("teacher") or {}
        return teacher.get("backend") != "local"

    @property
    def usage(self) -> dict[str, Any]:
        """Teacher usage (tokens, requests, cost) as flat key → value; `paid_requests` and
        the cost only for a teacher that is paid (not `backend: local`)."""
        usage = (self.manifest or {}).get("teacher_usage") or {}
        return {
            key: value for key, value in usage.items()
            if not isinstance(value, dict) and (self.paid or key not in PAID_KEYS)
        }

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

    def diversity(self, limit: int = DIVERSITY_ROWS) -> list[dict[str, Any]]:
        """Per strategy of the accepted rows: distinct-1/2/3 of the prompts, distinct-1/2 of the
        answers and, where rows carry embeddings (EMBEDDING_COLUMNS), their spread; each over
        up to `limit` rows of the strategy (a fixed-seed sample beyond)."""
        if self.data is None or not self.data.num_rows:
            return []
        strategy_of = np.asarray(self.data.column("strategy").to_pylist(), dtype=object)
        column = embedding_column(self.data)
        out = []
        for strategy in sorted(set(strategy_of)):
            rows = np.flatnonzero(strategy_of == strategy)
            total = len(rows)
            if total > limit:
                rows = np.sort(np.random.default_rng(0).choice(rows, limit, replace=False))
            taken = self.data.select(["prompt", "response"]).take(pa.array(rows))
            entry = {
                "strategy": strategy,
                "rows": total,
                "measured": len(rows),
                "prompt": distinct_n(taken.column("prompt").to_pylist()),
                "response": distinct_n(taken.column("response").to_pylist(), (1, 2)),
            }
            if column is not None:
                entry["embedding_spread"] = embedding_spread(embedding_matrix(self.data, column, rows))
            out.append(entry)
        return out

    def duplicate_pairs(self) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Each duplicate reject (`exact_duplicate`, `near_duplicate`, `semantic_duplicate`)
        with the row it duplicates: from data/, else from rejects/ (rejected later by another
        filter), else None."""
        if self.rejects is None or "duplicate_of" not in self.rejects.column_names:
            return []
        mask = pc.and_(pc.is_in(self.rejects.column("reason"), pa.array(DUPLICATE_REASONS)),
                       pc.is_valid(self.rejects.column("duplicate_of")))
        duplicates = self.rejects.filter(mask).to_pylist()
        wanted = pa.array(sorted({row["duplicate_of"] for row in duplicates}), pa.string())
        kept: dict[str, dict[str, Any]] = {}
        for table in (self.rejects, self.data):  # data/ last: its row wins
            if table is not None and len(wanted):
                kept |= {row["id"]: row for row in table.filter(pc.is_in(table.column("id"), wanted)).to_pylist()}
        return [(row, kept.get(row["duplicate_of"])) for row in duplicates]


PAID_KEYS = ("paid_requests", "estimated_cost_usd")


def _seeds_note(manifest: dict[str, Any]) -> str | None:
    """One sentence on the seeds that reached the dataset in no form (and why), or None."""
    counts = manifest.get("counts", {})
    unused = counts.get("seeds_unused")
    if not unused:
        return None
    note = f"{unused} of {plural(counts.get('seeds', 0), 'seed')} {'is' if unused == 1 else 'are'} in the dataset in no form"
    num_prompts = ((manifest.get("config") or {}).get("prompts") or {}).get("num_prompts")
    room = ((manifest.get("prompt_report") or {}).get("allocation") or {}).get("seed")
    if num_prompts is not None and room is not None:
        note += f": prompts.num_prompts={num_prompts} leaves room for {room} of them"
    return note + ". Leave prompts.num_prompts out to use every seed once, or raise it."


# Columns the terminal view never reads: per-token teacher logprobs (the bulk of a white-box shard).
TOKEN_COLUMNS = ("top_logprobs", "teacher_topk")


def _read(directory: Path, left_out: tuple[str, ...]) -> pa.Table | None:
    shards = list_shards(directory)
    if not shards:
        return None
    names = dict.fromkeys(name for shard in shards for name in pq.read_schema(shard).names)
    return read_table(directory, columns=[name for name in names if name not in left_out])


def load_view(directory: str | Path, left_out: tuple[str, ...] = ()) -> DatasetView:
    """Read a dataset directory's manifest (if any), data and rejects (without the columns
    `left_out`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such dataset directory")
    manifest = read_manifest(directory) if (directory / MANIFEST_NAME).exists() else None
    data = _read(directory / "data", left_out)
    rejects = _read(directory / "rejects", left_out)
    view = DatasetView(directory, manifest, data, rejects)
    if manifest is None:
        view.warnings.append(f"no {MANIFEST_NAME}: the build did not finish (or is running)")
        return view
    view.seeds_note = _seeds_note(manifest)
    build_warnings = (manifest.get("prompt_report") or {}).get("warnings", [])
    if view.seeds_note:  # the build's own sentence on unused seeds says the same: shown once
        build_warnings = [warning for warning in build_warnings if "seeds_unused" not in warning]
    view.warnings += list(dict.fromkeys(build_warnings))
    failures = manifest.get("teacher_failures") or {}
    if failures.get("failed"):
        reasons = ", ".join(f"{reason} x{n}" for reason, n in failures.get("reasons", {}).items())
        view.teacher_failures = (
            f"teacher failed {failures['failed']} of {plural(failures.get('of', 0), 'prompt')} "
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


def side_by_side(left: str, right: str, width: int = 56, indent: str = "    ") -> list[str]:
    """Two texts wrapped into columns `width` wide, separated by │."""
    lefts, rights = textwrap.wrap(left, width) or [""], textwrap.wrap(right, width) or [""]
    return [f"{indent}{a:<{width}} │ {b}".rstrip() for a, b in zip_longest(lefts, rights, fillvalue="")]


def duplicate_lines(view: DatasetView, shown: int = DUPLICATE_PAIRS_SHOWN) -> list[str]:
    """Each duplicate reject next to the row it duplicates (up to `shown` of them)."""
    pairs = view.duplicate_pairs()
    if not pairs:
        return []
    lines = ["", f"duplicates, each next to the row it duplicates ({min(shown, len(pairs))} of {len(pairs)}):"]
    for reject, kept in pairs[:shown]:
        where = "not in data/ or rejects/" if kept is None else ("accepted" if "reason" not in kept else f"rejected: {kept['reason']}")
        lines.append(f"  [{reject['reason']}] {_clip(reject.get('detail'), 100)}")
        lines += side_by_side(f"rejected {reject['id']}", f"duplicates {reject['duplicate_of']} ({where})")
        lines += side_by_side(_clip(reject["prompt"], 300), _clip(kept["prompt"], 300) if kept else "")
    if len(pairs) > shown:
        lines.append(f"  … {len(pairs) - shown} more: --sql \"SELECT r.prompt, d.prompt AS kept FROM rejects r "
                     "JOIN data d ON r.duplicate_of = d.id\"")
    return lines


def diversity_lines(view: DatasetView) -> list[str]:
    """distinct-n per strategy (and the embedding spread where rows carry embeddings)."""
    rows = view.diversity()
    if not rows:
        return []
    spread = "embedding_spread" in rows[0]
    lines = ["", f"diversity per strategy (distinct-n: unique / all word n-grams, up to {DIVERSITY_ROWS} rows each"
             + ("; spread: mean cosine distance of the prompt embeddings to their mean" if spread else "") + "):",
             f"  {'strategy':<32} {'rows':>7}  prompt d-1   d-2   d-3  answer d-1   d-2" + ("  spread" if spread else "")]
    for row in rows:
        prompt, answer = row["prompt"], row["response"]
        line = (f"  {row['strategy']:<32} {row['rows']:>7}  {prompt[1]:>10.3f} {prompt[2]:>5.3f} {prompt[3]:>5.3f}"
                f"  {answer[1]:>10.3f} {answer[2]:>5.3f}")
        lines.append(line + (f"  {row['embedding_spread']:>6.3f}" if spread else ""))
    return lines


def render_text(view: DatasetView, samples: int = 3, seed: int = 0) -> str:
    """The terminal view of `distill inspect`."""
    lines = [f"{label:<8} {value}" for label, value in header_lines(view)]
    if view.manifest is None:
        lines += [f"WARNING: {warning}" for warning in view.warnings]
    else:
        lines += ["", "counts:", *[f"  {key:<22} {value}" for key, value in view.counts.items()]]
        lines += [f"WARNING: {warning}" for warning in ([view.seeds_note] if view.seeds_note else []) + view.warnings]
        if view.teacher_failures:
            lines.append(view.teacher_failures)
        if view.usage:
            title = "teacher usage:" if view.paid else "teacher usage (backend local: nothing paid):"
            lines += ["", title, *[f"  {k:<22} {v}" for k, v in view.usage.items()]]
        coverage = view.manifest.get("teacher_logprobs")
        if coverage:
            lines += ["", "teacher logprobs (teacher.generation.top_logprobs, for kd_greybox):"]
            lines += [f"  {line}" for line in logprob_coverage_lines(coverage)]
        capture = view.manifest.get("capture") or {}
        if capture:
            lines += ["", "captured teacher top-k (--html: the probability mass it covers):"]
            lines += [
                f"  {key:<22} {capture[key]}"
                for key in ("k", "model", "rows", "positions", "stored_bytes_per_token")
                if key in capture
            ]
    if view.data is not None:
        lines += ["", f"accepted rows per strategy ({plural(view.data.num_rows, 'row')}):"]
        lines += [f"  {name:<32} {count}" for name, count in view.strategies().items()]
        if view.finish_reasons():
            lines += ["", "accepted rows per finish reason (stop: eos or a stop string; length: max_tokens):"]
            lines += [f"  {name:<32} {count}" for name, count in view.finish_reasons().items()]
    if view.rejects is not None:
        lines += ["", f"rejects per reason ({plural(view.rejects.num_rows, 'row')}):"]
        lines += [f"  {name:<32} {count}" for name, count in view.reasons().items()]
    lines += diversity_lines(view)
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
    lines += duplicate_lines(view)
    if view.rejects is not None and view.rejects.num_rows:
        lines += ["", "reject samples:"]
        for row in view.sample(view.rejects, samples, seed + 1):
            lines += [f"  [{row['reason']}] {_clip(row['prompt'], 100)}  — {_clip(row['detail'], 80)}"]
            if row.get("duplicate_of"):
                lines.append(f"    duplicate of {row['duplicate_of']} (see duplicates above)")
            if row.get("response") is not None:
                lines.append(f"    response: {_clip(row['response'], 100)}")
    return "\n".join(lines)


def inspect_dataset(directory: str | Path, samples: int = 3, seed: int = 0) -> str:
    """The terminal view of the dataset in `directory`."""
    return render_text(load_view(directory, left_out=TOKEN_COLUMNS), samples=samples, seed=seed)
