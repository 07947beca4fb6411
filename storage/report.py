"""`distill inspect DIR --html report.html`: the inspect view as one self-contained page.

Everything is inline: the style sheet, and the charts as base64 PNG images drawn with
matplotlib; no script, no external asset, so the file can be mailed or attached to a
ticket and opens offline. Every string that comes from the dataset is HTML-escaped.

Sections (each a `<section id=...>`, stable for links and tests): `summary`, `warnings`,
`counts`, `strategies`, `rejects`, `lengths`, `diversity`, `cost`, `near-duplicates`,
`samples`, `reject-samples`, `topk`. Texts show their whitespace (`inspect.visible_whitespace`).
"""

from __future__ import annotations

import base64
import html
import io
import os
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distillflow.storage.atomic import write_text_atomic
from distillflow.storage.dataset import logprob_coverage, logprob_coverage_lines
from distillflow.storage.inspect import (
    DIVERSITY_ROWS,
    DUPLICATE_REASONS,
    DatasetView,
    header_lines,
    load_view,
    plural,
    visible_whitespace,
)

CLUSTERS_SHOWN = 12
MEMBERS_SHOWN = 5
TEXT_SHOWN = 600  # characters of a prompt or response shown in a sample
TOPK_ROWS_DECODED = 256  # rows whose teacher_topk blobs are decoded for the mass statistics
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|AUTH_STRING)", re.IGNORECASE)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #1d2330; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
td, th { border: 1px solid #dde; padding: .25em .6em; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.warning { background: #fff4d6; border-left: 4px solid #e0a800; padding: .4em .8em; margin: .3em 0; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .85em; max-width: 60em; }
.muted { color: #667; }
img { max-width: 100%; }
details { margin: .4em 0; }
"""


def _e(value: Any) -> str:
    """HTML-escaped text of any value (quotes too: safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _clip(text: str | None, width: int = TEXT_SHOWN) -> str:
    text = visible_whitespace(text, keep_newlines=True)
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{_e(v)}</td>' for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(figure: Any) -> str:
    """An <img> with the figure inline as a base64 PNG."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="chart" src="data:image/png;base64,{encoded}">'


def _figure(width: float = 6.4, height: float = 2.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def length_chart(lengths: list[int], title: str) -> str:
    """Histogram of character lengths over log-spaced bins (like the terminal's)."""
    figure, axes = _figure()
    values = np.asarray(lengths, dtype=np.int64)
    top = max(int(values.max()), 1)
    edges = np.unique(np.round(np.geomspace(1, top + 1, 25)).astype(np.int64))
    edges[0] = 0
    axes.hist(values, bins=edges, color="#4c72b0")
    if top > 50:
        axes.set_xscale("symlog", linthresh=10)
    axes.set_title(title)
    axes.set_xlabel("characters")
    axes.set_ylabel("rows")
    return _png(figure)


def bar_chart(counts: dict[str, int], title: str) -> str:
    figure, axes = _figure(height=max(1.2, 0.32 * len(counts) + 0.8))
    names = list(counts)[::-1]
    axes.barh(names, [counts[name] for name in names], color="#55a868")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_title(title)
    axes.set_xlabel("rows")
    return _png(figure)


# -- sections -------------------------------------------------------------------------------


def near_duplicate_clusters(view: DatasetView) -> list[dict[str, Any]]:
    """Rejected duplicates grouped by the row they duplicate (the keeper), largest first:
    [{"keeper_id", "keeper_prompt" (None when the keeper is not in data/), "members": [reject rows]}]."""
    if view.rejects is None or "duplicate_of" not in view.rejects.column_names:
        return []
    mask = pc.and_(pc.is_in(view.rejects.column("reason"), pa.array(DUPLICATE_REASONS)), pc.is_valid(view.rejects.column("duplicate_of")))
    duplicates = view.rejects.filter(mask).select(["id", "prompt", "reason", "detail", "duplicate_of"]).to_pylist()
    members: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in duplicates:
        members[row["duplicate_of"]].append(row)
    keepers: dict[str, str] = {}
    if members and view.data is not None:
        found = view.data.filter(pc.is_in(view.data.column("id"), pa.array(list(members)))).select(["id", "prompt"])
        keepers = dict(zip(found.column("id").to_pylist(), found.column("prompt").to_pylist()))
    clusters = [
        {"keeper_id": keeper, "keeper_prompt": keepers.get(keeper), "members": rows}
        for keeper, rows in members.items()
    ]
    return sorted(clusters, key=lambda cluster: (-len(cluster["members"]), cluster["keeper_id"]))


def topk_summary(view: DatasetView, rows_decoded: int = TOPK_ROWS_DECODED) -> dict[str, Any] | None:
    """What was captured (the manifest's `capture` record) and, from up to `rows_decoded`
    rows, how much probability the stored top-k covers per position (mean, p10, p50) and
    the mean top-1 probability. None when nothing was captured."""
    capture = (view.manifest or {}).get("capture")
    has_blobs = view.data is not None and "teacher_topk" in view.data.column_names
    has_inline = view.data is not None and "top_logprobs" in view.data.column_names
    if not capture and not has_blobs and not has_inline:
        return None
    summary: dict[str, Any] = {"capture": capture or {}}
    if has_blobs:
        from distillflow.storage.topk import decode_topk

        blobs = [b for b in view.data.column("teacher_topk").to_pylist() if b is not None]
        summary["rows_with_topk"] = len(blobs)
        chosen = random.Random(0).sample(blobs, min(rows_decoded, len(blobs)))
        masses, top1 = [], []
        for blob in chosen:
            _, logprobs = decode_topk(blob)  # (T, k)
            if logprobs.size:
                probs = np.exp(logprobs.astype(np.float64))
                masses.append(probs.sum(axis=1))
                top1.append(probs[:, 0])
        if masses:
            mass = np.concatenate(masses)
            summary["mass"] = {
                "rows_decoded": len(chosen),
                "positions": int(mass.size),
                "mean": float(mass.mean()),
                "p10": float(np.percentile(mass, 10)),
                "p50": float(np.percentile(mass, 50)),
                "mean_top1": float(np.concatenate(top1).mean()),
            }
            summary["mass_values"] = mass
    if has_inline:  # the API's alternatives stored at build time: counted over every shard
        requested = (((view.manifest or {}).get("config") or {}).get("teacher") or {}).get("generation", {})
        summary["teacher_logprobs"] = (view.manifest or {}).get("teacher_logprobs") or logprob_coverage(
            view.directory / "data", int(requested.get("top_logprobs") or 0)
        )
    return summary


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _sample_block(row: dict[str, Any]) -> str:
    return (
        f'<details open><summary><code>{_e(row["id"])}</code></summary>'
        f'<div><b>prompt</b></div><div class="text">{_e(_clip(row.get("prompt")))}</div>'
        f'<div><b>response</b></div><div class="text">{_e(_clip(row.get("response")))}</div></details>'
    )


def render_html(view: DatasetView, samples: int = 3, seed: int = 0) -> str:
    """The whole page (see the module doc)."""
    name = (view.manifest or {}).get("name") or view.directory.name
    parts: list[str] = []

    summary_rows = [[label, value] for label, value in header_lines(view)]
    parts.append(_section("summary", "Dataset", _table(["", ""], summary_rows)))

    warnings = list(view.warnings)
    if view.seeds_note:
        warnings.insert(0, view.seeds_note)
    if view.teacher_failures:
        warnings.append(view.teacher_failures)
    body = "".join(f'<div class="warning">{_e(w)}</div>' for w in warnings) or '<p class="muted">none</p>'
    parts.append(_section("warnings", "Warnings", body))

    counts = view.counts
    body = _table(["stage", "rows"], [[k, v] for k, v in counts.items()], {1}) if counts else '<p class="muted">no manifest</p>'
    parts.append(_section("counts", "Counts per stage", body))

    strategies = view.strategies()
    body = '<p class="muted">no data/ shards</p>'
    if view.data is not None:
        body = f"<p>{plural(view.data.num_rows, 'accepted row')}.</p>" + _table(["strategy", "rows"], [[k, v] for k, v in strategies.items()], {1})
        if strategies:
            body += bar_chart(strategies, "accepted rows per strategy")
        finish_reasons = view.finish_reasons()
        if finish_reasons:  # stop: eos or a stop string; length: max_tokens ran out
            body += _table(["finish reason", "rows"], [[k, v] for k, v in finish_reasons.items()], {1})
    parts.append(_section("strategies", "Accepted rows per strategy", body))

    reasons = view.reasons()
    body = '<p class="muted">no rejects/ shards</p>'
    if view.rejects is not None:
        body = f"<p>{plural(view.rejects.num_rows, 'rejected row')}.</p>" + _table(["reason", "rows"], [[k, v] for k, v in reasons.items()], {1})
        if reasons:
            body += bar_chart(reasons, "rejects per reason")
    parts.append(_section("rejects", "Rejects per reason", body))

    body = '<p class="muted">no accepted rows</p>'
    if view.data is not None and view.data.num_rows:
        stats = []
        charts = []
        for column in ("prompt", "response"):
            lengths = view.lengths(column)
            p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
            stats.append([column, f"{p50:.0f}", f"{p90:.0f}", f"{p99:.0f}", max(lengths)])
            charts.append(length_chart(lengths, f"{column} length (chars)"))
        body = _table(["column", "p50", "p90", "p99", "max"], stats, {1, 2, 3, 4}) + "".join(charts)
    parts.append(_section("lengths", "Lengths", body))

    rows = view.diversity()
    body = '<p class="muted">no accepted rows</p>'
    if rows:
        spread = "embedding_spread" in rows[0]
        body = (f"<p>distinct-n: unique / all word n-grams, over up to {DIVERSITY_ROWS} rows of each strategy"
                + ("; spread: mean cosine distance of the prompt embeddings to their mean" if spread else "") + ".</p>")
        body += _table(
            ["strategy", "rows", "prompt distinct-1", "distinct-2", "distinct-3", "answer distinct-1", "distinct-2"]
            + (["embedding spread"] if spread else []),
            [[row["strategy"], row["rows"], *(f"{row['prompt'][n]:.3f}" for n in (1, 2, 3)),
              *(f"{row['response'][n]:.3f}" for n in (1, 2))]
             + ([f"{row['embedding_spread']:.3f}"] if spread else []) for row in rows],
            {1, 2, 3, 4, 5, 6, 7},
        )
    parts.append(_section("diversity", "Diversity per strategy", body))

    usage = view.usage
    rows = [[k, v] for k, v in usage.items()]
    if view.data is not None:
        for column in ("prompt_tokens", "completion_tokens"):
            if column in view.data.column_names:
                rows.append([f"{column} in accepted rows", pc.sum(view.data.column(column)).as_py() or 0])
    cost = usage.get("estimated_cost_usd")
    if not view.paid:
        body = '<p class="muted">a local teacher (teacher.backend: local): nothing was paid</p>'
    elif isinstance(cost, (int, float)):
        body = f"<p>Estimated cost: <b>${cost:.4f}</b></p>"
    else:
        body = '<p class="muted">no price configured (teacher.pricing): cost not estimated</p>'

    body += _table(["", "value"], rows, {1}) if rows else ""
    parts.append(_section("cost", "Teacher token usage and cost", body))

    clusters = near_duplicate_clusters(view)
    if clusters:
        body = (f"<p>{plural(len(clusters), 'row')} kept with duplicates rejected against them; "
                f"{plural(sum(len(c['members']) for c in clusters), 'duplicate')}. Largest {min(CLUSTERS_SHOWN, len(clusters))}:</p>")
        for cluster in clusters[:CLUSTERS_SHOWN]:
            keeper = cluster["keeper_prompt"]
            keeper_html = (f'<div class="text">{_e(_clip(keeper, 300))}</div>' if keeper is not None
                           else '<div class="muted">(the kept row is not in data/: rejected later by another filter)</div>')
            member_rows = [[m["reason"], _clip(m["prompt"], 300), m["detail"]] for m in cluster["members"][:MEMBERS_SHOWN]]
            more = len(cluster["members"]) - MEMBERS_SHOWN
            body += (
                f'<details open><summary>kept <code>{_e(cluster["keeper_id"])}</code> with '
                f'{plural(len(cluster["members"]), "duplicate")}</summary>{keeper_html}'
                + _table(["reason", "duplicate prompt", "detail"], member_rows)
                + (f'<p class="muted">and {more} more</p>' if more > 0 else "")
                + "</details>"
            )
    else:
        body = '<p class="muted">no duplicate was rejected</p>'
    parts.append(_section("near-duplicates", "Near-duplicate clusters", body))

    body = '<p class="muted">no accepted rows</p>'
    if view.data is not None and view.data.num_rows:
        body = ""
        strategy_column = view.data.column("strategy")
        for index, strategy in enumerate(strategies):
            rows_of = view.data.filter(pc.equal(strategy_column, strategy))
            body += f"<h3>{_e(strategy)} <span class=muted>({plural(rows_of.num_rows, 'row')})</span></h3>"
            body += "".join(_sample_block(row) for row in view.sample(rows_of, samples, seed + index))
    parts.append(_section("samples", "Samples per strategy", body))

    body = '<p class="muted">no rejects</p>'
    if view.rejects is not None and view.rejects.num_rows:
        rows = [[r["reason"], _clip(r["prompt"], 300), _clip(r["detail"], 200), r.get("duplicate_of") or ""]
                for r in view.sample(view.rejects, samples, seed + 1)]
        body = _table(["reason", "prompt", "detail", "duplicate of"], rows)
    parts.append(_section("reject-samples", "Reject samples", body))

    topk = topk_summary(view)
    if topk is None:
        body = '<p class="muted">no teacher logits were captured (see <code>distill capture-logits</code>)</p>'
    else:
        capture = topk["capture"]
        rows = [[key, capture[key]] for key in ("k", "model", "source", "rows", "positions", "shards_captured",
                                                 "shards_skipped", "blob_bytes_per_token", "stored_bytes_per_token",
                                                 "gap_encoding", "max_abs_logprob_error_nats") if key in capture]
        if topk.get("rows_with_topk") is not None:
            rows.append(["rows_with_topk", topk["rows_with_topk"]])
        body = _table(["", "value"], rows) if rows else ""
        if topk.get("teacher_logprobs"):
            body += "<p><b>Teacher logprobs (teacher.generation.top_logprobs, for kd_greybox)</b></p><ul>"
            body += "".join(f"<li>{_e(line)}</li>" for line in logprob_coverage_lines(topk["teacher_logprobs"]))
            body += "</ul>"
        mass = topk.get("mass")
        if mass:
            body += (
                f"<p>Probability mass the stored top-{_e(capture.get('k', ''))} covers per position "
                f"(from {mass['rows_decoded']} rows, {mass['positions']} positions): mean {mass['mean']:.3f}, "
                f"p10 {mass['p10']:.3f}, median {mass['p50']:.3f}; mean top-1 probability {mass['mean_top1']:.3f}.</p>"
            )
            figure, axes = _figure()
            axes.hist(np.clip(topk["mass_values"], 0, 1), bins=40, range=(0, 1), color="#8172b2")
            axes.set_title("probability mass covered by the top-k, per position")
            axes.set_xlabel("mass")
            axes.set_ylabel("positions")
            body += _png(figure)
    parts.append(_section("topk", "Captured teacher top-k", body))

    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(name)}: distillflow dataset report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_e(name)}</h1>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )
    return scrub_secrets(page, view.manifest)


def secret_values(manifest: dict[str, Any] | None) -> list[str]:
    """Values of environment variables that hold keys: those the config names
    (`*api_key_env`) and any whose name says KEY, TOKEN, SECRET, PASSWORD or AUTH_STRING
    (the Prefect server's basic auth)."""
    names: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key.endswith("api_key_env") and isinstance(item, str):
                    names.add(item)
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    collect((manifest or {}).get("config", {}))
    names |= {name for name in os.environ if SECRET_NAME.search(name)}
    return sorted({os.environ[name] for name in names if len(os.environ.get(name, "")) >= 8}, key=len, reverse=True)


def scrub_secrets(text: str, manifest: dict[str, Any] | None) -> str:
    """`text` with every key value from the environment replaced by `***`."""
    for secret in secret_values(manifest):
        text = text.replace(secret, "***").replace(html.escape(secret, quote=True), "***")
    return text


def write_report(directory: str | Path, path: str | Path, samples: int = 3, seed: int = 0) -> Path:
    """Write the report of the dataset in `directory` to `path` (atomically); returns it."""
    page = render_html(load_view(directory), samples=samples, seed=seed)
    path = Path(path)
    write_text_atomic(path, page, "the HTML report")
    return path
