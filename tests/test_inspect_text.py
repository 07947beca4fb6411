"""`distill inspect DIR` on the terminal: whitespace made visible, diversity per strategy,
duplicates next to the row they duplicate, cost only where something was paid, plurals, and
each warning once."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.storage.dataset import dataset_card, write_dataset
from distillflow.storage.inspect import distinct_n, plural, side_by_side, visible_whitespace
from tests.test_inspect import _row, dataset  # noqa: F401 (fixture)

runner = CliRunner()


def test_visible_whitespace():
    assert visible_whitespace("a b") == "a b"  # one space between words stays a space
    assert visible_whitespace("  a  b ") == "··a··b·"
    assert visible_whitespace(" \n\t") == "·⏎→"
    assert visible_whitespace("a\r\nb\u00a0c\u200bd") == "a␍⏎b⍽c⍽d"
    assert visible_whitespace("a\nb", keep_newlines=True) == "a⏎\nb"
    assert visible_whitespace("") == visible_whitespace(None) == "∅ (empty)"


def test_plural_and_distinct_n():
    assert [plural(n, "seed") for n in (0, 1, 2)] == ["0 seeds", "1 seed", "2 seeds"]
    assert plural(1, "duplicate", "dupes") == "1 duplicate" and plural(3, "x", "xen") == "3 xen"
    assert distinct_n(["a b", "a b"]) == {1: 0.5, 2: 0.5, 3: 0.0}
    assert distinct_n(["a b c", "d e f"], (2,)) == {2: 1.0}
    assert distinct_n([""], (1,)) == {1: 0.0}


def test_side_by_side_wraps_two_columns():
    lines = side_by_side("left " * 8, "right", width=12, indent="")
    assert lines[0] == "left left    │ right" and all("│" in line for line in lines) and len(lines) == 4


def test_terminal_view_shows_diversity_duplicates_and_paid_usage(dataset):
    text = runner.invoke(app, ["inspect", str(dataset), "--samples", "4"]).output
    diversity = text.split("diversity per strategy", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"\n  seed +8 +\d\.\d{3} \d\.\d{3} \d\.\d{3} +\d\.\d{3} \d\.\d{3}", diversity)
    assert "spread" not in diversity  # no embeddings in this dataset
    duplicates = text.split("duplicates, each next to the row it duplicates (3 of 3):", 1)[1].split("\n\n", 1)[0]
    assert "rejected dup-2" in duplicates and "duplicates id-000 (accepted)" in duplicates
    assert re.search(r"how do i sort list 0 in python\? +│ How do I sort list 0 in Python\?", duplicates)
    assert "teacher usage:" in text and "estimated_cost_usd     0.0123" in text  # an API teacher with a price
    assert "(1 row)" not in text and "(4 rows)" in text


def _local_dataset(tmp_path, seeds_unused: int, **usage):
    rows = [_row(i, prompt, "seed") for i, prompt in enumerate(["same", "  ", "other"])]
    rejects = [{"id": "dup", "prompt": "  ", "strategy": "seed", "reason": "exact_duplicate", "detail": "equal",
                "duplicate_of": "id-001", "response": None}]
    warning = (f"prompts.num_prompts=3 leaves room for 3 of the 4 seed prompts; {seeds_unused} seeds are not used "
               "in any form (manifest: seeds_unused). Leave num_prompts out to use every seed once, or raise it.")
    manifest = {
        "name": "local", "config": {"teacher": {"model": "tiny", "backend": "local"}, "prompts": {"num_prompts": 3}},
        "counts": {"seeds": 4, "seeds_unused": seeds_unused, "accepted": 3, "rejected": 1},
        "prompt_report": {"allocation": {"seed": 3}, "warnings": [warning, warning]},
        "teacher_usage": {"requests_sent": 3, "paid_requests": 3, "prompt_tokens": 30, **usage},
    }
    write_dataset(tmp_path / "ds", rows, rejects, manifest, dataset_card(manifest))
    return tmp_path / "ds"


def test_a_local_teacher_is_not_paid_and_warnings_are_said_once(tmp_path):
    directory = _local_dataset(tmp_path, seeds_unused=1)
    text = runner.invoke(app, ["inspect", str(directory)]).output
    assert "teacher usage (backend local: nothing paid):" in text and "requests_sent          3" in text
    assert "paid_requests" not in text and "cost" not in text
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING: 1 of 4 seeds is in the dataset in no form: prompts.num_prompts=3 leaves room "
                        "for 3 of them. Leave prompts.num_prompts out to use every seed once, or raise it."]
    # The whitespace-only duplicate and the row it duplicates are visible, side by side.
    assert re.search(r"\n    ·· +│ ··\n", text)

    page = tmp_path / "r.html"
    runner.invoke(app, ["inspect", str(directory), "--html", str(page)])
    html = page.read_text(encoding="utf-8")
    assert html.count("1 of 4 seeds is in the dataset in no form") == 1 and "seeds are not used" not in html
    assert "nothing was paid" in html and "paid_requests" not in html
    assert "kept <code>id-001</code> with 1 duplicate<" in html
