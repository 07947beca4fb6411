"""The measured tables in README.md and docs/ are the reports' own numbers, never typed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_tables", ROOT / "scripts" / "render_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_measured_table_equals_its_saved_report():
    renderer = load_renderer()
    tables = renderer.tables()
    assert "demo" in tables, "docs/reports/demo-report.json is missing: run `make demo`, then scripts/render_tables.py --save"
    for name, (path, markdown) in tables.items():
        match = renderer.block(name).search(path.read_text(encoding="utf-8"))
        assert match, f"{path.name} has no <!-- table:{name} --> block"
        assert match.group(2) == markdown, f"{path.name}'s {name} table differs from its report: run scripts/render_tables.py"


def test_the_demo_table_shows_each_models_clean_accuracy():
    import json

    renderer = load_renderer()
    report = json.loads((renderer.REPORTS / "demo-report.json").read_text())
    table = renderer.demo_table(report)
    for row in report["table"]:
        line = next(line for line in table.splitlines() if line.startswith(f"| `{row['model']}` |"))
        assert f"{100 * row['clean_acc']:.1f} %" in line
        if row["model"] != report["reference_model"]:  # its share of the teacher's clean accuracy
            teacher = next(entry for entry in report["table"] if entry["model"] == report["reference_model"])
            assert f"| {100 * row['clean_acc'] / teacher['clean_acc']:.0f} % |" in line
