"""`distill inspect DIR --viewer viewer.html`: the dataset as one interactive, offline page.

The page (`storage.viewer_page`) holds its script, style sheet and data inline and fetches
nothing. It shows:
- a table of accepted rows and rejects: search, filters (accepted/rejected, strategy, reject
  reason), sorting, pages of 50; a duplicate links to the row it duplicates;
- a row view: prompt and answer with their whitespace made visible and, for white-box data
  (the `teacher_topk` column of `distill capture-logits`, or a build's `top_logprobs`), the
  answer's tokens coloured by the teacher's probability, the top-k alternatives on hover;
- a 2-D map of the prompts (PCA of stored embeddings when every shown row has one, else of
  hashed character 3-gram vectors), coloured by strategy or by accepted/rejected; a click on
  a point opens its row.

Limits, so that a large dataset stays a page a browser opens at once: at most `max_rows`
rows are embedded (a fixed-seed sample beyond, said on the page), each prompt and answer up
to TEXT_CHARS characters, tokens for up to TOKEN_ROWS rows (TOKEN_POSITIONS positions,
ALTERNATIVES_SHOWN alternatives each).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distillflow.storage.atomic import write_text_atomic
from distillflow.storage.inspect import DatasetView, embedding_column, embedding_matrix, load_view, plural
from distillflow.storage.report import scrub_secrets
from distillflow.storage.topk import decode_topk
from distillflow.storage.viewer_page import page_html

DEFAULT_MAX_ROWS = 20_000
TEXT_CHARS = 4_000  # characters of a prompt or answer embedded (the row view says when clipped)
TOKEN_ROWS = 1_000  # rows whose answer tokens (with the teacher's top-k) are embedded
TOKEN_POSITIONS = 512  # answer tokens per row
ALTERNATIVES_SHOWN = 10  # top-k alternatives per token
MAP_DIM = 256  # width of the hashed character n-gram vectors
MAP_SCALE = 1000  # map coordinates are embedded as integers in [0, MAP_SCALE]


@dataclass(frozen=True)
class AnswerTokenizer:
    """How the answer of a row splits into the tokens that `teacher_topk` positions predict:
    `supervised_ids(prompt, response)` gives the supervised token ids in order (as
    `training.data.encode_example` makes them) and `text(id)` a token's text."""

    name: str
    supervised_ids: Callable[[str, str], list[int]]
    text: Callable[[int], str]


# -- which rows --------------------------------------------------------------------------------


def sample_indices(total: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of the rows to embed: all of them up to `max_rows`, else `max_rows`
    drawn without replacement with a fixed seed (the same rows every time)."""
    if total <= max_rows:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=max_rows, replace=False))


def _clipped(values: list[str | None]) -> list[str]:
    return [(value or "")[:TEXT_CHARS] for value in values]


def _column(table: pa.Table, name: str, rows: np.ndarray) -> list[Any]:
    if name not in table.column_names:
        return [None] * len(rows)
    return table.column(name).take(pa.array(rows, pa.int64())).to_pylist()


def _lengths(table: pa.Table, name: str, rows: np.ndarray) -> list[int]:
    if name not in table.column_names:
        return [0] * len(rows)
    column = pc.fill_null(table.column(name).take(pa.array(rows, pa.int64())), "")
    return pc.utf8_length(column).to_pylist()


def table_rows(view: DatasetView, max_rows: int, seed: int = 0) -> dict[str, Any]:
    """The embedded rows as columns (accepted rows first, then rejects), with what the page
    needs to say about them: totals, whether they are a sample."""
    tables = [(0, view.data), (1, view.rejects)]
    sizes = [table.num_rows if table is not None else 0 for _, table in tables]
    total = sum(sizes)
    picks = sample_indices(total, max_rows, seed)
    columns: dict[str, list[Any]] = {name: [] for name in (
        "kind", "id", "strategy", "reason", "detail", "prompt", "response", "prompt_chars", "response_chars",
        "finish_reason", "parent_id", "duplicate_of")}
    sources: list[tuple[int, int]] = []  # (table 0/1, row in that table) of each embedded row
    offset = 0
    for (kind, table), size in zip(tables, sizes):
        rows = picks[(picks >= offset) & (picks < offset + size)] - offset
        offset += size
        if table is None or not len(rows):
            continue
        columns["kind"] += [kind] * len(rows)
        for name in ("id", "strategy", "reason", "detail", "finish_reason", "parent_id", "duplicate_of"):
            columns[name] += _column(table, name, rows)
        columns["prompt"] += _clipped(_column(table, "prompt", rows))
        columns["response"] += [None if value is None else value[:TEXT_CHARS] for value in _column(table, "response", rows)]
        columns["prompt_chars"] += _lengths(table, "prompt", rows)
        columns["response_chars"] += _lengths(table, "response", rows)
        sources += [(kind, int(row)) for row in rows]
    # Categories as indices into a list: a 100k-row page repeats few distinct strings.
    strategies = sorted({value for value in columns["strategy"] if value is not None})
    reasons = sorted({value for value in columns["reason"] if value is not None})
    for name, names in (("strategy", strategies), ("reason", reasons)):
        position = {value: index for index, value in enumerate(names)}
        columns[name] = [position.get(value, -1) for value in columns[name]]
    # A duplicate-of link: the row index of the row it duplicates, when that row is embedded.
    row_of_id: dict[str, int] = {}
    for index, (kind, row_id) in enumerate(zip(columns["kind"], columns["id"])):
        if kind == 0 or row_id not in row_of_id:  # an accepted row wins over a reject of the same id
            row_of_id[row_id] = index
    columns["duplicate_row"] = [row_of_id.get(value, -1) if value else -1 for value in columns["duplicate_of"]]
    embedded = len(columns["id"])
    note = None
    if embedded < total:
        note = (f"{embedded:,} of {total:,} rows are shown: a random sample (fixed seed). "
                "Raise --viewer-rows to embed more, or query every row with --sql.")
    return {
        "columns": columns,
        "strategies": strategies,
        "reasons": reasons,
        "total": {"accepted": sizes[0], "rejected": sizes[1]},
        "embedded": embedded,
        "note": note,
        "sources": sources,
    }


# -- the map -----------------------------------------------------------------------------------


def hashed_ngram_vectors(texts: list[str], dim: int = MAP_DIM, n: int = 3) -> np.ndarray:
    """Signed feature hashing of lower-cased character n-grams, L2-normalised, (N, dim).

    All texts are one array of code points (a 0 between texts), so the n-grams of every text
    are hashed in a few vectorised steps; an n-gram that spans two texts is dropped.
    """
    cleaned = [text.lower().replace("\x00", " ") for text in texts]
    lengths = np.fromiter((len(text) for text in cleaned), dtype=np.int64, count=len(cleaned))
    codes = np.frombuffer("\x00".join(cleaned).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    out = np.zeros((len(texts), dim), dtype=np.float64)
    if len(codes) < n:
        return out.astype(np.float32)
    row_of = np.repeat(np.arange(len(texts)), lengths + 1)[: len(codes)]  # (C,) the text of each code point
    windows = len(codes) - n + 1
    gram = np.zeros(windows, dtype=np.uint64)
    valid = np.ones(windows, dtype=bool)
    for offset in range(n):  # gram = c0·P^(n-1) + ... + c(n-1), wrapping mod 2^64
        part = codes[offset : offset + windows]
        gram = gram * np.uint64(1_000_003) + part
        valid &= part != 0
    mixed = gram * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the high bits are well mixed
    column = ((mixed >> np.uint64(40)) % np.uint64(dim)).astype(np.int64)
    sign = np.where((mixed >> np.uint64(63)) == 1, -1.0, 1.0)
    flat = row_of[:windows][valid] * dim + column[valid]
    out = np.bincount(flat, weights=sign[valid], minlength=len(texts) * dim).reshape(len(texts), dim)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """(N, 2) projection of `vectors` (N, D) on their two principal axes (the covariance
    matrix's top eigenvectors; each axis's sign fixed so that its largest loading is positive)."""
    if len(vectors) == 0:
        return np.zeros((0, 2))
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    covariance = centred.T @ centred / max(len(vectors) - 1, 1)  # (D, D)
    _, eigenvectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    axes = eigenvectors[:, ::-1][:, :2]  # (D, ≤2)
    axes = axes * np.sign(axes[np.abs(axes).argmax(axis=0), range(axes.shape[1])])
    projected = centred @ axes
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected


def map_points(view: DatasetView, rows: dict[str, Any]) -> dict[str, Any]:
    """2-D coordinates of the embedded rows' prompts, as integers in [0, MAP_SCALE]."""
    column = embedding_column(view.data)
    rejects_have_them = column is not None and embedding_column(view.rejects) == column
    has_embeddings = column is not None and (rejects_have_them or all(kind == 0 for kind, _ in rows["sources"]))
    if has_embeddings:
        parts = []
        for kind, table in ((0, view.data), (1, view.rejects)):
            picked = np.array([row for source, row in rows["sources"] if source == kind], dtype=np.int64)
            if len(picked):
                parts.append(embedding_matrix(table, column, picked))
        vectors = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
        source = f"PCA of the stored prompt embeddings ({column})"
    else:
        vectors = hashed_ngram_vectors(rows["columns"]["prompt"])
        source = "PCA of hashed character 3-gram vectors of the prompts"
    points = pca_2d(vectors)
    low, high = (points.min(axis=0), points.max(axis=0)) if len(points) else (np.zeros(2), np.ones(2))
    scaled = np.rint((points - low) / np.maximum(high - low, 1e-12) * MAP_SCALE).astype(np.int64)
    return {"x": scaled[:, 0].tolist(), "y": scaled[:, 1].tolist(), "source": source, "scale": MAP_SCALE}


# -- answer tokens -------------------------------------------------------------------------------


def _permille(logprob: float) -> int:
    return int(round(1000 * math.exp(max(float(logprob), -50.0))))


class TokenTable:
    """Answer tokens of the rows that have them: each token's text (an index into `vocab`),
    its probability under the teacher (‰; -1 when it is not in the stored top-k), and the
    top-k alternatives as [text index, ‰, ...]."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.rows: dict[int, dict[str, list]] = {}

    def _index(self, text: str) -> int:
        return self.vocab.setdefault(text, len(self.vocab))

    def add(self, row: int, tokens: list[str], permille: list[int], alternatives: list[list[tuple[str, int]]]) -> None:
        self.rows[row] = {
            "t": [self._index(text) for text in tokens[:TOKEN_POSITIONS]],
            "p": permille[:TOKEN_POSITIONS],
            "a": [[value for text, p in options[:ALTERNATIVES_SHOWN] for value in (self._index(text), p)]
                  for options in alternatives[:TOKEN_POSITIONS]],
        }

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        return {"vocab": list(self.vocab), "rows": {str(row): value for row, value in self.rows.items()}, **extra}


def tokens_from_top_logprobs(entries: list[dict[str, Any]]) -> tuple[list[str], list[int], list[list[tuple[str, int]]]]:
    """(texts, ‰ of each chosen token, alternatives) of a `top_logprobs` cell (API teacher)."""
    texts = [entry.get("token") or "" for entry in entries]
    permille = [_permille(entry["logprob"]) if entry.get("logprob") is not None else -1 for entry in entries]
    alternatives = [[(option.get("token") or "", _permille(option["logprob"])) for option in entry.get("top") or []
                     if option.get("logprob") is not None] for entry in entries]
    return texts, permille, alternatives


def tokens_from_blob(blob: bytes, target_ids: list[int], text: Callable[[int], str]):
    """(texts, ‰ of each answer token, alternatives) from a `teacher_topk` blob and the
    answer's supervised token ids; None when they do not line up (another tokenisation)."""
    ids, logprobs = decode_topk(blob)  # (T, k) each
    if len(ids) != len(target_ids):
        return None
    texts, permille, alternatives = [], [], []
    for target, row_ids, row_logprobs in zip(target_ids, ids.tolist(), logprobs.tolist()):
        texts.append(text(target))
        permille.append(_permille(row_logprobs[row_ids.index(target)]) if target in row_ids else -1)
        alternatives.append([(text(token), _permille(logprob)) for token, logprob in zip(row_ids, row_logprobs)])
    return texts, permille, alternatives


def answer_tokens(view: DatasetView, rows: dict[str, Any], tokenizer: AnswerTokenizer | None,
                  tokenizer_error: str | None = None) -> dict[str, Any] | None:
    """Token data for up to TOKEN_ROWS embedded accepted rows, or None for black-box data."""
    data = view.data
    if data is None:
        return None
    capture = (view.manifest or {}).get("capture") or {}
    if "top_logprobs" in data.column_names:
        kind = "top_logprobs"
        note = "the teacher's logprobs returned with each answer (teacher.generation.top_logprobs)"
    elif "teacher_topk" in data.column_names:
        kind = "teacher_topk"
        note = f"the top-{capture.get('k', '?')} captured by distill capture-logits"
        if capture.get("method") == "sampled":
            note += " (method sampled: probabilities are draw frequencies of k samples)"
        if tokenizer is None:
            return {"vocab": [], "rows": {}, "note": note, "missing": (
                f"tokens are not shown: the capture's tokenizer could not be loaded ({tokenizer_error or 'none recorded'})")}
        note += f", tokenised with {tokenizer.name}"
    else:
        return None
    table = TokenTable()
    mismatched = 0
    accepted = [(index, row) for index, (kind_of, row) in enumerate(rows["sources"]) if kind_of == 0][:TOKEN_ROWS]
    picked = pa.array([row for _, row in accepted], pa.int64())
    cells = data.column(kind).take(picked).to_pylist()
    prompts = data.column("prompt").take(picked).to_pylist() if kind == "teacher_topk" else []
    responses = data.column("response").take(picked).to_pylist() if kind == "teacher_topk" else []
    for position, ((index, _), cell) in enumerate(zip(accepted, cells)):
        if not cell:
            continue
        if kind == "top_logprobs":
            table.add(index, *tokens_from_top_logprobs(cell))
            continue
        try:
            target_ids = tokenizer.supervised_ids(prompts[position], responses[position])
        except ValueError:  # the chat template cannot encode this row: shown without tokens
            target_ids = []
        found = tokens_from_blob(cell, target_ids, tokenizer.text)
        if found is None:
            mismatched += 1
        elif found[0]:
            table.add(index, *found)
    extra = {"note": note, "rows_with_tokens": len(table.rows)}
    if mismatched:
        extra["missing"] = (f"{plural(mismatched, 'row')} not shown as tokens: the stored positions do not line up "
                            "with the tokenizer's (another tokenizer or max_length?)")
    return table.to_dict(**extra)


# -- the page ----------------------------------------------------------------------------------


def viewer_payload(view: DatasetView, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0,
                   tokenizer: AnswerTokenizer | None = None, tokenizer_error: str | None = None) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict."""
    rows = table_rows(view, max_rows, seed)
    payload = {key: value for key, value in rows.items() if key != "sources"}
    payload["name"] = (view.manifest or {}).get("name") or view.directory.name
    payload["directory"] = str(view.directory)
    payload["warnings"] = ([view.seeds_note] if view.seeds_note else []) + view.warnings
    payload["map"] = map_points(view, rows)
    payload["tokens"] = answer_tokens(view, rows, tokenizer, tokenizer_error)
    payload["limits"] = {"text_chars": TEXT_CHARS, "token_rows": TOKEN_ROWS, "token_positions": TOKEN_POSITIONS}
    return payload


def json_for_script(value: Any) -> str:
    """JSON that is safe inside <script type="application/json">: no `<`, `>` or `&` appear
    literally, so no text in the data can close the element."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_viewer(view: DatasetView, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0,
                  tokenizer: AnswerTokenizer | None = None, tokenizer_error: str | None = None) -> str:
    """The whole page, with every key value from the environment replaced by `***`."""
    payload = viewer_payload(view, max_rows, seed, tokenizer, tokenizer_error)
    return scrub_secrets(page_html(payload["name"], json_for_script(payload)), view.manifest)


@dataclass(frozen=True)
class ViewerFile:
    path: Path
    bytes: int
    rows_embedded: int
    rows_total: int

    def summary(self) -> str:
        """The CLI's line: where, how large, how many rows."""
        size = f"{self.bytes / 1e6:.1f} MB" if self.bytes >= 1_000_000 else f"{self.bytes / 1e3:.1f} kB"
        if self.rows_embedded < self.rows_total:
            rows = f"{self.rows_embedded:,} of {self.rows_total:,} rows, a random sample (--viewer-rows)"
        else:
            rows = f"all {self.rows_total:,} rows" if self.rows_total > 1 else plural(self.rows_total, "row")
        return f"viewer: {self.path} ({size}; {rows})"


def write_viewer(directory: str | Path, path: str | Path, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0,
                 tokenizer: AnswerTokenizer | None = None, tokenizer_error: str | None = None) -> ViewerFile:
    """Write the viewer of the dataset in `directory` to `path` (atomically)."""
    view = load_view(directory)
    page = render_viewer(view, max_rows, seed, tokenizer, tokenizer_error)
    path = Path(path)
    write_text_atomic(path, page, "the dataset viewer")
    total = sum(table.num_rows for table in (view.data, view.rejects) if table is not None)
    return ViewerFile(path, path.stat().st_size, min(total, max_rows), total)
