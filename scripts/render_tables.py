"""Write the measured tables of README.md and docs/ from the reports that measured them.

    python scripts/render_tables.py --save      # after `make demo` / `make kd-vs-sft`: copy the
                                                # reports into docs/reports/, then render
    python scripts/render_tables.py             # render from docs/reports/ (what the tests check)

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in its file and is
never typed by hand. Sources:

    demo        runs/demo/eval/report.json           → README.md (`distill demo`, `make demo`)
    demo-family runs/demo/eval/report.json           → README.md
    kd-vs-sft   runs/kd-vs-sft/kd_vs_sft.json        → docs/kd_vs_sft.md (`make kd-vs-sft`)
    kd-vs-sft-rows500 runs/kd-vs-sft-rows500/kd_vs_sft.json → docs/kd_vs_sft.md
    kd-vs-sft-rows500-lr runs/kd-vs-sft-rows500-lr/kd_vs_sft.json → docs/kd_vs_sft.md (500 rows, 3.75e-4)
    kd-vs-sft-bpe runs/kd-vs-sft-bpe/kd_vs_sft.json  → docs/kd_vs_sft.md (own-vocabulary students)
    kd-vs-sft-lr runs/kd-vs-sft-lr/kd_vs_sft.json    → docs/kd_vs_sft.md (the learning rates, 5 seeds)
    kd-vs-sft-demo-rate runs/kd-vs-sft-demo-rate/kd_vs_sft.json → docs/kd_vs_sft.md (every objective at 3.75e-4)
    kd-vs-sft-pruned runs/kd-vs-sft-pruned/kd_vs_sft.json → docs/kd_vs_sft.md (a pruned copied student)
    kd-vs-sft-small runs/kd-vs-sft-small/kd_vs_sft.json → docs/kd_vs_sft.md (a smaller student)
    kd-vs-sft-t4 runs/kd-vs-sft-t4/kd_vs_sft.json    → docs/kd_vs_sft.md (T = 4 at its rates, on-policy stage)
    sparse-kd-tail runs/sparse-kd-tail/report.json     → docs/training.md (bench/sparse_kd_tail.py)
    sampled-kd  runs/bench-sampled-kd/sampled_kd.json → docs/training.md (bench/sampled_kd.py)
    greybox-kd  runs/bench-greybox-kd/greybox_kd.json → docs/training.md (bench/greybox_kd.py)
    startup     runs/bench-startup/startup.json      → docs/benchmarks.md (bench/startup.py)
    throughput  runs/bench-throughput/teacher_throughput.json → docs/benchmarks.md (bench/teacher_throughput.py)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "docs" / "reports"
SOURCES = {  # saved report → where a fresh run writes it
    "demo-report.json": ROOT / "runs" / "demo" / "eval" / "report.json",
    "kd_vs_sft.json": ROOT / "runs" / "kd-vs-sft" / "kd_vs_sft.json",
    "kd_vs_sft-rows500.json": ROOT / "runs" / "kd-vs-sft-rows500" / "kd_vs_sft.json",
    "kd_vs_sft-rows500-lr.json": ROOT / "runs" / "kd-vs-sft-rows500-lr" / "kd_vs_sft.json",
    "kd_vs_sft-bpe.json": ROOT / "runs" / "kd-vs-sft-bpe" / "kd_vs_sft.json",
    "kd_vs_sft-lr.json": ROOT / "runs" / "kd-vs-sft-lr" / "kd_vs_sft.json",
    "kd_vs_sft-demo-rate.json": ROOT / "runs" / "kd-vs-sft-demo-rate" / "kd_vs_sft.json",
    "kd_vs_sft-pruned.json": ROOT / "runs" / "kd-vs-sft-pruned" / "kd_vs_sft.json",
    "kd_vs_sft-small.json": ROOT / "runs" / "kd-vs-sft-small" / "kd_vs_sft.json",
    "kd_vs_sft-t4.json": ROOT / "runs" / "kd-vs-sft-t4" / "kd_vs_sft.json",
    "sparse_kd_tail.json": ROOT / "runs" / "sparse-kd-tail" / "report.json",
    "sampled_kd.json": ROOT / "runs" / "bench-sampled-kd" / "sampled_kd.json",
    "greybox_kd.json": ROOT / "runs" / "bench-greybox-kd" / "greybox_kd.json",
    "startup.json": ROOT / "runs" / "bench-startup" / "startup.json",
    "teacher_throughput.json": ROOT / "runs" / "bench-throughput" / "teacher_throughput.json",
}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _params(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f} M"


SPEED_AGREEMENT = 1.10  # same-size models must time within 10 % of each other for the column to mean anything


def speed_agrees(table: list[dict[str, Any]]) -> bool:
    """Whether the batch-1 tokens/s of models of the same size agree within `SPEED_AGREEMENT`
    (the same network with other weights runs at the same speed: what is left is the
    timing's noise); a run where they do not leaves the speed columns out."""
    by_size: dict[Any, list[float]] = {}
    for entry in table:
        if entry.get("tok_s_at_1") is None:
            return False
        by_size.setdefault(entry["params"], []).append(entry["tok_s_at_1"])
    return all(max(speeds) <= SPEED_AGREEMENT * min(speeds) for speeds in by_size.values())


def demo_table(report: dict[str, Any]) -> str:
    """The demo's comparison: one row per model of report.json, in its order; tokens/s at
    batch 1 and the speed-up on the teacher when same-size models time alike (`speed_agrees`)."""
    speed = speed_agrees(report["table"])
    teacher = next((entry for entry in report["table"] if entry["model"] == report.get("reference_model")), None)
    rows = [
        "| model | params | clean acc | of the teacher's | robust acc | gap | on disk |"
        + (" tok/s @1 | speed-up |" if speed else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if speed else ""),
    ]
    for entry in report["table"]:
        model = report["models"][entry["model"]]
        gap = "–" if entry["gap"] is None else f"{100 * entry['gap']:.1f} pt"
        size = "–" if model.get("size_mb") is None else f"{model['size_mb']:.1f} MB"
        share = "–" if teacher is None or entry is teacher or not teacher["clean_acc"] else (
            f"{100 * entry['clean_acc'] / teacher['clean_acc']:.0f} %")
        row = (
            f"| `{entry['model']}` | {_params(entry['params'])} | {_pct(entry['clean_acc'])} | {share} | "
            f"{_pct(entry['robust_acc'])} | {gap} | {size} |"
        )
        if speed:
            row += f" {entry['tok_s_at_1']:.0f} | {entry['speedup_vs_teacher']:.2f}× |"
        rows.append(row)
    return "\n".join(rows)


def demo_family_table(report: dict[str, Any]) -> str:
    """Clean accuracy per family, and the spread of sampled answers where several are right."""
    models = report["models"]
    families = sorted({f for entry in models.values() for f in entry["accuracy"].get("per_family", {})})
    spread = sorted({f for entry in models.values() for f in (entry.get("spread") or {})})
    header = ["model", *families, *(f"{f} spread" for f in spread)]
    rows = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, entry in models.items():
        cells = [_pct((entry["accuracy"]["per_family"].get(f) or {}).get("accuracy")) for f in families]
        cells += [_pct(((entry.get("spread") or {}).get(f) or {}).get("spread")) for f in spread]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def bench_table(result: dict[str, Any]) -> str:
    sys.path.insert(0, str(ROOT))
    from bench.kd_vs_sft import render

    return render(result).strip()


def tail_table(result: dict[str, Any]) -> str:
    sys.path.insert(0, str(ROOT))
    from bench.sparse_kd_tail import render

    return render(result)


def sampled_kd_table(result: dict[str, Any]) -> str:
    sys.path.insert(0, str(ROOT))
    from bench.sampled_kd import table

    return table(result)


def greybox_kd_table(result: dict[str, Any]) -> str:
    sys.path.insert(0, str(ROOT))
    from bench.greybox_kd import table

    return table(result)


def tables() -> dict[str, tuple[Path, str]]:
    """Every table: name → (file it goes in, its markdown), from the saved reports present."""
    out: dict[str, tuple[Path, str]] = {}
    demo = REPORTS / "demo-report.json"
    if demo.is_file():
        report = json.loads(demo.read_text())
        out["demo"] = (ROOT / "README.md", demo_table(report))
        out["demo-family"] = (ROOT / "README.md", demo_family_table(report))
    for saved, name in (("kd_vs_sft.json", "kd-vs-sft"), ("kd_vs_sft-lr.json", "kd-vs-sft-lr"),
                        ("kd_vs_sft-demo-rate.json", "kd-vs-sft-demo-rate"),
                        ("kd_vs_sft-rows500.json", "kd-vs-sft-rows500"),
                        ("kd_vs_sft-rows500-lr.json", "kd-vs-sft-rows500-lr"),
                        ("kd_vs_sft-bpe.json", "kd-vs-sft-bpe"), ("kd_vs_sft-pruned.json", "kd-vs-sft-pruned"),
                        ("kd_vs_sft-small.json", "kd-vs-sft-small"), ("kd_vs_sft-t4.json", "kd-vs-sft-t4")):
        if (REPORTS / saved).is_file():
            out[name] = (ROOT / "docs" / "kd_vs_sft.md", bench_table(json.loads((REPORTS / saved).read_text())))
    if (REPORTS / "sparse_kd_tail.json").is_file():
        result = json.loads((REPORTS / "sparse_kd_tail.json").read_text())
        out["sparse-kd-tail"] = (ROOT / "docs" / "training.md", tail_table(result))
    if (REPORTS / "sampled_kd.json").is_file():
        result = json.loads((REPORTS / "sampled_kd.json").read_text())
        out["sampled-kd"] = (ROOT / "docs" / "training.md", sampled_kd_table(result))
    if (REPORTS / "greybox_kd.json").is_file():
        result = json.loads((REPORTS / "greybox_kd.json").read_text())
        out["greybox-kd"] = (ROOT / "docs" / "training.md", greybox_kd_table(result))
    for saved, name, module in (("startup.json", "startup", "bench.startup"),
                                ("teacher_throughput.json", "throughput", "bench.teacher_throughput")):
        if (REPORTS / saved).is_file():
            import importlib

            sys.path.insert(0, str(ROOT))
            render = importlib.import_module(module).table
            out[name] = (ROOT / "docs" / "benchmarks.md", render(json.loads((REPORTS / saved).read_text())))
    return out


def block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- table:{re.escape(name)} -->\n)(.*?)(\n<!-- /table:{re.escape(name)} -->)", re.S)


def render_into(path: Path, name: str, markdown: str) -> bool:
    """Replace the named block in `path`; False when the file has no such block."""
    text = path.read_text(encoding="utf-8")
    pattern = block(name)
    if not pattern.search(text):
        return False
    path.write_text(pattern.sub(lambda m: m.group(1) + markdown + m.group(3), text), encoding="utf-8")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save", action="store_true", help="First copy the reports of the last runs into docs/reports/.")
    args = parser.parse_args()
    if args.save:
        REPORTS.mkdir(parents=True, exist_ok=True)
        for saved, source in SOURCES.items():
            if source.is_file():
                shutil.copyfile(source, REPORTS / saved)
                print(f"saved {source} → {REPORTS / saved}")
    for name, (path, markdown) in tables().items():
        if not render_into(path, name, markdown):
            raise SystemExit(f"{path}: no <!-- table:{name} --> block to render into")
        print(f"rendered {name} into {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
