"""The dataset viewer (`distill inspect --viewer`) in a real headless chromium, on a white-box
dataset captured from a tiny teacher: filtering narrows the table, a row opens, the answer's
tokens are coloured with the teacher's top-k on hover, a duplicate links to what it
duplicates, a point on the map opens its row, and the console stays free of errors.
Every step waits for what it checks. A screenshot of each step is kept in tests/output/viewer/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.storage.parquet import REJECT_SCHEMA
from tests.cdp import chromium_binary, launch
from tests.prefect_processes import processes
from tests.test_capture_logits import K, ROWS, settings_for, tiny_teacher, write_dataset  # noqa: F401 (fixture)

SCREENSHOTS = Path(__file__).resolve().parent / "output" / "viewer"
NO_CHROMIUM = "no chromium on PATH: apt-get install -y chromium (.ci/run does)"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), pytest.mark.skipif(chromium_binary() is None, reason=NO_CHROMIUM)]

ROWS_SHOWN = "Array.from(document.querySelectorAll('#rows tbody tr'))"
ERROR_EVENTS = {"Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded"}


class EventLog:
    """Wraps the DevTools socket and keeps every error event that passes through it
    (`Browser.call` reads past events to find its reply)."""

    def __init__(self, socket) -> None:
        self.socket, self.errors = socket, []

    def send(self, message: str) -> None:
        self.socket.send(message)

    def recv(self, timeout: float | None = None) -> str:
        message = self.socket.recv(timeout=timeout)
        event = json.loads(message)
        params = event.get("params", {})
        if event.get("method") in ERROR_EVENTS and (
            event["method"] == "Runtime.exceptionThrown"
            or params.get("type") == "error"
            or params.get("entry", {}).get("level") == "error"
        ):
            self.errors.append(event)
        return message

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def white_box_dataset(tiny_teacher, tmp_path) -> Path:
    """ROWS with the tiny teacher's top-k captured, plus a near-duplicate of the first row and
    a whitespace-only prompt among the rejects."""
    from distillflow.tasks.capture.logits import capture_dataset

    source = write_dataset(tmp_path / "in")
    out = tmp_path / "ds"
    capture_dataset(settings_for(tiny_teacher, source, out))
    rejects = [
        {"id": "dup-0", "prompt": "What is the capital of France ?", "strategy": "seed", "reason": "near_duplicate",
         "detail": "jaccard 0.9", "duplicate_of": "id-0"},
        {"id": "blank", "prompt": "  \n\t ", "strategy": "edge_case", "reason": "empty", "detail": "whitespace only"},
    ]
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), out / "rejects" / "part-00001.parquet")
    return out


def test_viewer_in_chromium(white_box_dataset, tmp_path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = tmp_path / "viewer.html"
    result = CliRunner().invoke(app, ["inspect", str(white_box_dataset), "--viewer", str(page)])
    assert result.exit_code == 0, result.output
    assert f"viewer: {page} (" in result.output and "kB; all 8 rows)" in result.output

    with processes(tmp_path / "logs") as group:
        browser = launch(group, tmp_path / "chromium-profile")
        events = browser.socket = EventLog(browser.socket)
        browser.call("Log.enable")
        try:
            started = time.monotonic()
            browser.goto(page.as_uri())
            browser.wait_for("document.body.dataset.ready === '1'", "the viewer to draw its first page")
            print(f"viewer ready {time.monotonic() - started:.2f} s after navigation")
            assert browser.evaluate(f"{ROWS_SHOWN}.length") == len(ROWS) + 3
            browser.screenshot(SCREENSHOTS / "1-table.png")

            # Search narrows the table to the one row that mentions spiders.
            browser.type_into("document.getElementById('search')", "spider")
            browser.wait_for(f"{ROWS_SHOWN}.length === 1", "the search to narrow the table to one row")
            assert "1 matching" in browser.evaluate("document.getElementById('page-info').textContent")
            browser.type_into("document.getElementById('search')", "")
            browser.wait_for(f"{ROWS_SHOWN}.length === {len(ROWS) + 3}", "every row back after clearing the search")

            # The status filter keeps the rejects only; the whitespace-only prompt shows its whitespace.
            browser.evaluate("(() => { const s = document.getElementById('filter-kind'); s.value = '1';"
                             " s.dispatchEvent(new Event('change')); })()")
            browser.wait_for(f"{ROWS_SHOWN}.length === 3", "the status filter to keep the 3 rejects")
            texts = browser.evaluate(f"{ROWS_SHOWN}.map(tr => tr.innerText).join('\\n')")
            assert "accepted" not in texts and "··⏎→·" in texts
            browser.screenshot(SCREENSHOTS / "2-rejects.png")

            # The near-duplicate links to the row it duplicates; the link opens that row.
            browser.click("document.querySelector('#rows a.dup-link')", "the duplicate-of link")
            browser.wait_for("!document.getElementById('row-view').hidden && "
                             "document.getElementById('row-prompt').textContent === 'What is the capital of France?'",
                             "the row view of the row the duplicate duplicates")
            assert "1 rejected row duplicates this one" in browser.evaluate("document.getElementById('row-duplicate').innerText")

            # Its answer is coloured token by token, by the teacher's probability.
            tokens = browser.wait_for("document.querySelectorAll('#row-answer span.tok').length", "the answer's tokens")
            assert tokens >= 5
            answer = browser.evaluate("document.getElementById('row-answer').textContent")
            assert answer.replace("·", " ").startswith("The capital of France is Paris.")  # a lone-space token shows as ·
            colours = browser.evaluate("new Set(Array.from(document.querySelectorAll('#row-answer span.tok'))"
                                       ".map(s => getComputedStyle(s).backgroundColor)).size")
            assert colours >= 2
            browser.screenshot(SCREENSHOTS / "3-row-tokens.png")

            # Hovering a token (a real pointer move) shows the teacher's top-k alternatives.
            box = browser.evaluate("(() => { const r = document.querySelectorAll('#row-answer span.tok')[1]"
                                   ".getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()")
            browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])
            browser.wait_for(f"!document.getElementById('tip').hidden && "
                             f"document.querySelectorAll('#tip table.alternatives tr').length === {K}",
                             "the tooltip with the top-k alternatives")
            assert "token 2:" in browser.evaluate("document.getElementById('tip').innerText")
            browser.screenshot(SCREENSHOTS / "4-token-alternatives.png")

            # Closing, then a click on a point of the map opens that point's row.
            browser.click("document.getElementById('close-row')", "the close button")
            browser.wait_for("document.getElementById('row-view').hidden", "the row view to close")
            point = browser.evaluate(
                "(() => { const i = Number(document.querySelector('#rows tbody tr').dataset.row);"
                " const map = JSON.parse(document.getElementById('viewer-data').textContent).map;"
                " const r = document.getElementById('map').getBoundingClientRect();"
                " const px = v => 10 + v / map.scale * 420; return [i, r.left + px(map.x[i]), r.top + px(map.y[i])]; })()")
            for kind in ("mousePressed", "mouseReleased"):
                browser.call("Input.dispatchMouseEvent", type=kind, x=point[1], y=point[2], button="left", clickCount=1)
            browser.wait_for(f"!document.getElementById('row-view').hidden && location.hash === '#row={point[0]}'",
                             "the map click to open the row of that point")
            browser.screenshot(SCREENSHOTS / "5-map-click.png")

            browser.evaluate("1")  # reads any event still on the socket
            assert events.errors == [], events.errors
        except BaseException:
            browser.screenshot(SCREENSHOTS / "failed.png")
            raise
        finally:
            browser.close()
