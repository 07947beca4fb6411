"""`distill inspect`: the HTML report, SQL over the Parquet, and the dataset card's HF header."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.storage.card import refresh_card
from distillflow.storage.dataset import dataset_card, write_dataset
from distillflow.storage.manifest import read_manifest, write_manifest
from distillflow.storage.topk import encode_topk
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.test_build import API_KEY, GOOD, write_config, write_seeds

runner = CliRunner()
XSS = '<script>alert("owned")</script><img src=x onerror=alert(1)>'
TOPK_PROBS = [0.5, 0.2, 0.1, 0.05]  # each position's stored top-4: mass 0.85, top-1 0.5
SECTIONS = ["summary", "warnings", "counts", "strategies", "rejects", "lengths", "diversity", "cost",
            "near-duplicates", "samples", "reject-samples", "topk"]


def _row(i: int, prompt: str, strategy: str) -> dict:
    return {
        "id": f"id-{i:03d}",
        "prompt": prompt,
        "response": f"answer {i} " * (1 + i % 7),
        "strategy": strategy,
        "parent_id": None,
        "teacher_model": "test-teacher",
        "finish_reason": "stop",
        "prompt_tokens": 10 + i,
        "completion_tokens": 20 + i,
        "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
    }


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A finished dataset written by the storage layer: 3 strategies, one XSS prompt, two
    near-duplicate clusters, a teacher error, and captured top-k logprobs."""
    out = tmp_path / "ds"
    rows = [_row(i, f"How do I sort list {i} in Python?", ["seed", "edge_case", "adversarial"][i % 3]) for i in range(24)]
    rows[4]["prompt"] = XSS
    rejects = [
        {"id": "dup-1", "prompt": "How do I sort list 0 in Python ?", "strategy": "seed", "parent_id": None,
         "reason": "near_duplicate", "detail": "jaccard~0.91 with kept row", "duplicate_of": "id-000", "response": None},
        {"id": "dup-2", "prompt": "how do i sort list 0 in python?", "strategy": "seed", "parent_id": None,
         "reason": "exact_duplicate", "detail": "normalised text equal", "duplicate_of": "id-000", "response": None},
        {"id": "dup-3", "prompt": f"{XSS} again", "strategy": "adversarial", "parent_id": None,
         "reason": "near_duplicate", "detail": "jaccard~0.85 with kept row", "duplicate_of": "id-004", "response": None},
        {"id": "err-1", "prompt": "refused", "strategy": "seed", "parent_id": None,
         "reason": "teacher_error:400", "detail": "bad request", "duplicate_of": None, "response": None},
    ]
    manifest = {
        "name": "report-test",
        "distillflow_version": "0.1.0",
        "created_at": "2026-01-01T00:00:00+00:00",
        "config": {"teacher": {"model": "test-teacher", "backend": "openai", "api_key_env": "DISTILL_TEST_KEY"},
                   "license": "apache-2.0"},
        "counts": {"seeds": 28, "accepted": 24, "rejected": 4},
        "teacher_usage": {"requests_sent": 25, "prompt_tokens": 1234, "completion_tokens": 5678,
                          "estimated_cost_usd": 0.0123},
    }
    write_dataset(out, rows, rejects, manifest, dataset_card(manifest))
    # Captured top-k (what `distill capture-logits` adds): a blob per row, 3 positions each.
    shard = out / "data" / "part-00000.parquet"
    table = pq.read_table(shard)
    logprobs = np.log(np.tile(np.array(TOPK_PROBS, dtype=np.float32), (3, 1)))
    blob = encode_topk(np.tile(np.arange(4), (3, 1)), logprobs)
    table = table.append_column("teacher_topk", pa.array([blob] * table.num_rows, pa.binary()))
    pq.write_table(table, shard)
    manifest = read_manifest(out)
    manifest["capture"] = {"k": 4, "model": "test-teacher", "source": "local", "rows": table.num_rows,
                           "positions": 3 * table.num_rows, "stored_bytes_per_token": 3.1}
    refresh_card(out, manifest)  # as capture does: the header's features follow the new column
    write_manifest(out, manifest)
    return out


class _Page(HTMLParser):
    """Collects section ids, script tags, external references and checks tag balance."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.ids, self.scripts, self.external, self.stack, self.errors = [], 0, [], [], []
        self.images = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith("data:image/png;base64,"):
                self.external.append(value)
            if value.startswith("data:image/png"):
                self.images += 1
        if any(key.startswith("on") for key in attrs):
            self.errors.append(f"event handler on <{tag}>")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_html_report_is_self_contained_escaped_and_complete(dataset, tmp_path):
    result = runner.invoke(app, ["inspect", str(dataset), "--html", str(tmp_path / "report.html"), "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    parsed = _parse(page)
    assert page.startswith("<!DOCTYPE html>")
    assert parsed.errors == [] and parsed.stack == []
    assert parsed.scripts == 0 and parsed.external == []  # no JS, nothing fetched from elsewhere
    assert parsed.ids == SECTIONS
    assert parsed.images >= 5  # strategies, reasons, two length histograms, top-k mass
    text = "".join(parsed.text)
    # The dataset's strings are shown as text, never as markup.
    assert "<script>" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert XSS in text
    # Same content as the terminal view: counts, strategies, reasons, usage.
    for stage, value in {"seeds": 28, "accepted": 24, "rejected": 4}.items():
        assert re.search(rf"<td>{stage}</td><td class=num>{value}</td>", page)
    assert re.search(r"<td>adversarial</td><td class=num>8</td>", page)
    assert re.search(r"<td>teacher_error:400</td><td class=num>1</td>", page)
    assert "$0.0123" in text and "5678" in text
    assert "teacher_model" not in text  # the column list is the SQL's business, not the report's


def _section_text(page: str, section_id: str) -> str:
    body = page.split(f'<section id="{section_id}">', 1)[1].split("</section>", 1)[0]
    return "".join(_parse(body).text)


def test_html_report_clusters_samples_and_topk(dataset, tmp_path):
    runner.invoke(app, ["inspect", str(dataset), "--html", str(tmp_path / "r.html"), "--samples", "2"])
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    clusters = _section_text(page, "near-duplicates")
    assert "2 rows kept with duplicates rejected against them; 3 duplicates" in clusters
    assert "kept id-000 with 2 duplicates" in clusters  # the larger cluster first
    assert "How do I sort list 0 in Python?" in clusters  # the keeper's prompt, from data/
    assert "how do i sort list 0 in python?" in clusters and "jaccard~0.91" in clusters
    assert f"{XSS} again" in clusters
    samples = _section_text(page, "samples")
    for strategy in ("seed", "edge_case", "adversarial"):
        assert f"{strategy} (8 rows)" in samples
    assert samples.count("prompt") == 6  # 2 per strategy
    topk = _section_text(page, "topk")
    assert "mean 0.850" in topk and "mean top-1 probability 0.500" in topk
    assert "rows_with_topk24" in topk.replace(" ", "")


def test_terminal_view_shows_the_capture(dataset):
    result = runner.invoke(app, ["inspect", str(dataset)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "captured teacher top-k" in text and re.search(r"\n  k +4\n", text)
    assert "accepted rows per strategy (24 rows):" in text and "near_duplicate" in text


def test_report_of_an_unfinished_dataset_says_so(tmp_path):
    (tmp_path / "data").mkdir()
    result = runner.invoke(app, ["inspect", str(tmp_path), "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "no manifest.json: the build did not finish" in _section_text(page, "warnings")
    assert _parse(page).ids == SECTIONS


# -- SQL ------------------------------------------------------------------------------------


def test_sql_over_data_and_rejects(dataset):
    result = runner.invoke(app, ["inspect", str(dataset), "--sql",
                                 "SELECT strategy, count(*) AS n FROM data GROUP BY strategy ORDER BY strategy"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["strategy", "n"]
    assert [line.split() for line in lines[2:5]] == [["adversarial", "8"], ["edge_case", "8"], ["seed", "8"]]
    assert lines[-1] == "(3 rows)"

    result = runner.invoke(app, ["inspect", str(dataset), "--format", "json", "--sql",
                                 "SELECT r.id, r.reason, d.prompt AS kept FROM rejects r JOIN data d ON r.duplicate_of = d.id ORDER BY r.id"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [row["id"] for row in rows] == ["dup-1", "dup-2", "dup-3"]
    assert rows[2]["kept"] == XSS

    result = runner.invoke(app, ["inspect", str(dataset), "--format", "csv", "--sql",
                                 "SELECT id, teacher_topk FROM data ORDER BY id LIMIT 2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[0] == "id,teacher_topk"
    assert re.fullmatch(r"id-000,<\d+ bytes>", result.output.strip().splitlines()[1])


@pytest.mark.parametrize(
    "query, expected",
    [
        ("SELECT nope FROM data", "nope"),
        ("SELECT * FROM prompts", "prompts"),
        ("SELEC 1", "syntax error"),
    ],
)
def test_bad_sql_is_one_paragraph_naming_the_tables(dataset, query, expected):
    result = runner.invoke(app, ["inspect", str(dataset), "--sql", query])
    assert result.exit_code == 1
    error = result.output[result.output.index("error: "):]
    assert "the query failed" in error and expected in error
    assert "Tables: data (id, prompt, response, strategy" in error and "rejects (id, prompt" in error
    assert "\n\n" not in error.strip()


def test_sql_cannot_touch_files(dataset, tmp_path):
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"x": [1]}), outside)
    for query in (
        f"COPY data TO '{tmp_path / 'copy.parquet'}'",
        f"SELECT * FROM read_parquet('{outside}')",
        f"ATTACH '{tmp_path / 'db.duckdb'}'",
        "SET enable_external_access = true",
    ):
        result = runner.invoke(app, ["inspect", str(dataset), "--sql", query])
        assert result.exit_code == 1, (query, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "outside.parquet"]
    assert len(pq.read_table(dataset / "data").column("id")) == 24


# -- dataset card ---------------------------------------------------------------------------


def test_card_header_loads_with_datasets_and_parses(dataset):
    import datasets
    from huggingface_hub import DatasetCard

    loaded = datasets.load_dataset(str(dataset), split="train")
    table = pq.read_table(dataset / "data")
    assert loaded.num_rows == 24  # the rejects next to the data are not loaded
    assert loaded.column_names == table.column_names
    assert sorted(loaded["id"]) == sorted(table.column("id").to_pylist())

    card = DatasetCard.load(dataset / "README.md")
    header = yaml.safe_load((dataset / "README.md").read_text().split("---\n")[1])
    assert card.data.license == "apache-2.0" == header["license"]
    assert header["size_categories"] == ["n<1K"]
    assert header["task_categories"] == ["text-generation"]
    assert header["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    info = header["dataset_info"]
    assert [f["name"] for f in info["features"]][:4] == ["id", "prompt", "response", "strategy"]
    assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"], "num_examples": 24}]
    assert "## Counts" in card.text


def test_card_features_written_without_datasets_match_what_datasets_writes(dataset):
    """A schema of primitive columns (every build without top-k logprobs) gets its card
    features without importing `datasets`; they must read exactly as `datasets` writes them."""
    import datasets
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    from distillflow.storage.card import add_dataset_info, flat_features, split_stats

    primitive = pa.schema([(name, t) for name, t in [
        ("s", pa.string()), ("ls", pa.large_string()), ("i8", pa.int8()), ("i32", pa.int32()), ("i64", pa.int64()),
        ("u16", pa.uint16()), ("f16", pa.float16()), ("f32", pa.float32()), ("f64", pa.float64()), ("b", pa.bool_()),
        ("bin", pa.binary()), ("lbin", pa.large_binary()), ("t", pa.timestamp("us", tz="UTC")), ("tm", pa.timestamp("ms"))]])
    for stats in (split_stats(dataset), {"schema": primitive, "rows": 5, "num_bytes": 100, "download_size": 50}):
        assert flat_features(stats["schema"]) is not None
        ours, theirs = DatasetCardData(), DatasetCardData()
        add_dataset_info(ours, stats)
        info = datasets.DatasetInfo(
            features=datasets.Features.from_arrow_schema(stats["schema"]),
            splits=datasets.SplitDict({"train": datasets.SplitInfo(
                name="train", num_bytes=stats["num_bytes"], num_examples=stats["rows"])}),
            download_size=stats["download_size"], dataset_size=stats["num_bytes"],
        )
        DatasetInfosDict({"default": info}).to_dataset_card_data(theirs)
        assert ours.to_yaml() == theirs.to_yaml()
    nested = pa.schema([("top", pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float32())])))])
    assert flat_features(nested) is None  # described by `datasets` itself


def test_size_categories():
    from distillflow.storage.card import size_category

    assert [size_category(n) for n in (0, 999, 1000, 12_345, 2_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


# -- a real build: the planted key is nowhere ------------------------------------------------


def test_built_dataset_loads_and_the_key_is_in_no_report(prefect_harness, tmp_path, port, monkeypatch):
    from distillflow.flows.build import build_command

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:10] + [GOOD[0], "refused [[400]]", f"{XSS} [[400]]"])
    out = tmp_path / "out"
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as server:
        build_command(write_config(tmp_path / "c.yaml", seeds, out, server.base_url))

    import datasets

    assert datasets.load_dataset(str(out), split="train").num_rows == 10

    outputs = [(out / "README.md").read_text()]
    for args in (["--html", str(tmp_path / "r.html")], ["--sql", "SELECT * FROM data"],
                 ["--sql", "SELECT * FROM rejects", "--format", "json"], []):
        result = runner.invoke(app, ["inspect", str(out), *args])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    page = (tmp_path / "r.html").read_text()
    outputs.append(page)
    assert all(API_KEY not in text for text in outputs)
    assert "<script>" not in page and XSS in "".join(_parse(page).text)
    assert "kept" in _section_text(page, "near-duplicates")  # the repeated seed points at its first copy
