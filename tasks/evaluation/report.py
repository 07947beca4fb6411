"""The human-readable side of the eval report: the comparison table, report.md, chart.png.

`storage/`-style writes: every file goes to a temporary name and is renamed into place, and
report.json is written last, so a directory with a report.json holds a complete report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillflow.storage.atomic import atomic_path, write_text_atomic

TABLE_COLUMNS = (
    ("model", "model"),
    ("params", "params"),
    ("clean_acc", "clean acc"),
    ("robust_acc", "robust acc"),
    ("gap", "gap"),
    ("agreement", "agreement"),
    ("ppl", "ppl"),
    ("tok_s_at_1", "tok/s@1"),
    ("speedup_vs_teacher", "speed-up"),
)


def _format(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,}"
    if key in ("clean_acc", "robust_acc", "agreement"):
        return f"{100 * value:.1f}%"
    if key == "gap":
        return f"{100 * value:+.1f} pt"
    if key == "ppl":
        return f"{value:.3g}"
    if key == "tok_s_at_1":
        return f"{value:.1f}"
    if key == "speedup_vs_teacher":
        return f"{value:.2f}x"
    return str(value)


def table_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[_format(key, row.get(key)) for key, _ in TABLE_COLUMNS] for row in rows]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison table as aligned plain text (printed at the end of `distill eval`)."""
    header = [title for _, title in TABLE_COLUMNS]
    cells = table_cells(rows)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) if i == 0 else text.rjust(width) for i, (text, width) in enumerate(zip(line, widths))) for line in [header, *cells]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the comparison table, then accuracy, robustness, held-out, judge and speed."""
    models = report["models"]
    parts = [
        "# Evaluation report",
        "",
        f"Reference model: `{report.get('reference_model')}`. Every figure below is recomputable from "
        "`records.jsonl` (one record per model, eval set, perturbation and prompt).",
        "",
        markdown_table([title for _, title in TABLE_COLUMNS], table_cells(report["table"])),
        "",
        "## Accuracy per eval set (clean prompts)",
        "",
    ]
    sets = sorted({name for entry in models.values() for name in entry["accuracy"]["per_eval_set"]})
    parts += [
        markdown_table(
            ["model", *sets],
            [
                [name, *(_pct((entry["accuracy"]["per_eval_set"].get(s) or {}).get("accuracy")) for s in sets)]
                for name, entry in models.items()
            ],
        ),
        "",
    ]
    checks = sorted({name for entry in models.values() for name in entry["accuracy"]["per_check"]})
    if checks:
        parts += [
            "## Accuracy per check",
            "",
            markdown_table(
                ["model", *checks],
                [
                    [name, *(_pct((entry["accuracy"]["per_check"].get(c) or {}).get("accuracy")) for c in checks)]
                    for name, entry in models.items()
                ],
            ),
            "",
        ]
    families = sorted({name for entry in models.values() for name in entry["accuracy"].get("per_family", {})})
    if families:
        parts += [
            "## Accuracy per family (clean prompts)",
            "",
            markdown_table(
                ["model", *families],
                [
                    [name, *(_pct((entry["accuracy"]["per_family"].get(f) or {}).get("accuracy")) for f in families)]
                    for name, entry in models.items()
                ],
            ),
            "",
        ]
    spread_families = sorted({name for entry in models.values() for name in (entry.get("spread") or {})})
    if spread_families:
        parts += [
            "## Several right answers: validity and spread of sampled answers",
            "",
            "validity: share of sampled answers that are right; spread: share of the right answers "
            "each question's samples cover (of the most they could), averaged over questions.",
            "",
            markdown_table(
                ["model", *(f"{f} {kind}" for f in spread_families for kind in ("validity", "spread"))],
                [
                    [
                        name,
                        *(
                            _pct(((entry.get("spread") or {}).get(f) or {}).get(kind))
                            for f in spread_families
                            for kind in ("validity", "spread")
                        ),
                    ]
                    for name, entry in models.items()
                ],
            ),
            "",
        ]
    perturbations = report.get("perturbations") or []
    if perturbations:
        parts += [
            "## Robustness (accuracy on perturbed prompts; gap = clean − perturbed on the same prompts)",
            "",
            markdown_table(
                ["model", "clean", *perturbations],
                [
                    [
                        name,
                        _pct((entry.get("robustness") or {}).get("clean_accuracy")),
                        *(
                            f"{_pct(p.get('accuracy'))} ({_format('gap', p.get('gap'))})"
                            for p in ((entry.get("robustness") or {}).get("per_perturbation", {}).get(n, {}) for n in perturbations)
                        ),
                    ]
                    for name, entry in models.items()
                ],
            ),
            "",
        ]
        if report.get("skipped_perturbations"):
            skipped = ", ".join(f"{k}: {v}" for k, v in report["skipped_perturbations"].items())
            parts += [f"Copies a perturbation could not make (left out): {skipped}.", ""]
    if any(entry.get("heldout") for entry in models.values()):
        parts += [
            "## Held-out split of the dataset (the teacher's answers are the references)",
            "",
            markdown_table(
                ["model", "rows", "exact", "token F1", "ROUGE-L", "CE (nats/token)", "perplexity"],
                [
                    [
                        name,
                        str(h.get("rows")),
                        _pct(h.get("exact")),
                        _pct(h.get("token_f1")),
                        _pct(h.get("rouge_l")),
                        "–" if h.get("cross_entropy") is None else f"{h['cross_entropy']:.4f}",
                        "–" if h.get("perplexity") is None else f"{h['perplexity']:.4g}",
                    ]
                    for name, entry in models.items()
                    if (h := entry.get("heldout"))
                ],
            ),
            "",
        ]
    if report.get("judge"):
        summary = report["judge"]
        cost = summary.get("estimated_cost_usd")
        parts += [
            f"## Judge (`{summary['model']}`, against `{summary['reference_model']}`, both orders)",
            "",
            markdown_table(
                ["model", "wins", "ties", "losses", "win rate"],
                [
                    [name, str(j["wins"]), str(j["ties"]), str(j["losses"]), _pct(j["win_rate"])]
                    for name, entry in models.items()
                    if (j := entry.get("judge"))
                ],
            ),
            "",
            f"{summary['requests']} judge requests ({summary['requests_sent']} sent, {summary['ledger_hits']} from the "
            f"ledger); {summary['paid_prompt_tokens']} prompt + {summary['paid_completion_tokens']} completion tokens "
            f"paid in this run{'' if cost is None else f', about ${cost:.4f}'}.",
            "",
        ]
    speed_rows = []
    for name, entry in models.items():
        for batch, figures in (entry.get("speed") or {}).items():
            speed_rows.append(
                [
                    name,
                    batch,
                    "–" if figures.get("tokens_per_s") is None else f"{figures['tokens_per_s']:.1f}",
                    f"{figures['latency_p50_s'] * 1000:.1f}",
                    f"{figures['latency_p95_s'] * 1000:.1f}",
                ]
            )
    if speed_rows:
        parts += [
            "## Speed and size",
            "",
            markdown_table(["model", "batch", "tokens/s", "latency p50 (ms)", "latency p95 (ms)"], speed_rows),
            "",
            markdown_table(
                ["model", "parameters", "size on disk (MB)", "weights in memory (MB)", "peak memory (MB)"],
                [
                    [
                        name,
                        "–" if entry.get("parameters") is None else f"{entry['parameters']:,}",
                        "–" if entry.get("size_mb") is None else f"{entry['size_mb']:.2f}",
                        "–" if entry.get("weights_memory_mb") is None else f"{entry['weights_memory_mb']:.2f}",
                        "–" if entry.get("peak_memory_mb") is None else f"{entry['peak_memory_mb']:.1f} ({entry['peak_memory_kind']})",
                    ]
                    for name, entry in models.items()
                ],
            ),
            "",
        ]
    return "\n".join(parts)


def write_chart(report: dict[str, Any], path: Path) -> None:
    """chart.png: accuracy vs parameters (marker area ~ tokens/s at batch 1), and accuracy per
    perturbation per model (clean first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    names = list(models)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    speeds = [(models[n].get("speed") or {}).get("1", {}).get("tokens_per_s") for n in names]
    top_speed = max((s for s in speeds if s), default=None)
    for name, speed in zip(names, speeds):
        entry = models[name]
        accuracy = entry["accuracy"]["accuracy"]
        params = entry.get("parameters")
        if accuracy is None or not params:
            continue
        size = 60 + 600 * (speed / top_speed) if speed and top_speed else 60
        left.scatter([params], [100 * accuracy], s=size, alpha=0.6)
        label = f"{name}" + (f"\n{speed:.0f} tok/s" if speed else "")
        left.annotate(label, (params, 100 * accuracy), textcoords="offset points", xytext=(6, 6), fontsize=8)
    left.set_xscale("log")
    left.set_xlabel("parameters (log)")
    left.set_ylabel("clean accuracy (%)")
    left.set_ylim(-5, 105)
    left.set_title("accuracy vs parameters (marker area ~ tokens/s at batch 1)")
    left.grid(alpha=0.3)

    columns = ["clean", *(report.get("perturbations") or [])]
    width = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        entry = models[name]
        robustness = entry.get("robustness") or {}
        values = [entry["accuracy"]["accuracy"]] + [
            (robustness.get("per_perturbation", {}).get(p) or {}).get("accuracy") for p in columns[1:]
        ]
        positions = [i + index * width for i in range(len(columns))]
        right.bar(positions, [100 * (v or 0.0) for v in values], width=width, label=name)
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], columns, rotation=30, ha="right")
    right.set_ylabel("accuracy (%)")
    right.set_ylim(0, 105)
    right.set_title("robustness: accuracy per perturbation")
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path, "the chart") as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def write_report_files(
    output_dir: Path,
    report: dict[str, Any],
    records_jsonl: str,
    judge_jsonl: str | None,
) -> dict[str, str]:
    """records.jsonl, judge.jsonl, report.md, chart.png, then report.json (last)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").unlink(missing_ok=True)
    write_text_atomic(output_dir / "records.jsonl", records_jsonl)
    if judge_jsonl is not None:
        write_text_atomic(output_dir / "judge.jsonl", judge_jsonl)
    write_text_atomic(output_dir / "report.md", report_markdown(report))
    write_chart(report, output_dir / "chart.png")
    write_text_atomic(output_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return {name: str(output_dir / name) for name in ("records.jsonl", "report.md", "chart.png", "report.json")}
