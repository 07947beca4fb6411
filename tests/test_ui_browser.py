"""The Prefect UI as a person uses it, in a real headless chromium: open the build
deployment served by `distill serve`, edit its Run form, submit, wait for the run, and read
the counts on its artifact page. Screenshots of every step are kept in tests/output/ui/."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cdp import chromium_binary, launch
from tests.conftest import free_port
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.prefect_processes import (
    api,
    base_env,
    flow_run_logs,
    processes,
    start_server,
    wait_for_deployment,
    wait_until,
)
from tests.test_build import API_KEY, GOOD, write_config, write_seeds

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "tests" / "output" / "ui"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(chromium_binary() is None, reason="no chromium on PATH: apt-get install -y chromium (.ci/run does)"),
]

# The form field of a schema property, found by its label and description as shown on the page.
FIELD_JS = """((tag, label) => Array.from(document.querySelectorAll(tag)).find(element => {
    const field = element.closest('.p-label');
    return field && field.innerText.trim().startsWith(label);
}))"""


# Validation messages and toasts on the page, for a failure message.
ERRORS_JS = """Array.from(document.querySelectorAll('.p-message, .p-toast, [class*=error], [class*=invalid]'))
    .map(e => (e.innerText || e.textContent || '').trim()).filter(Boolean).slice(0, 20).join(' | ')"""


def deepest_with_text(text: str, exact: bool = False) -> str:
    """JS for the innermost element showing `text` (a click on it reaches its tab, link or card)."""
    test = f"e.innerText.trim() === {json.dumps(text)}" if exact else f"e.innerText.includes({json.dumps(text)})"
    return f"Array.from(document.body.querySelectorAll('*')).filter(e => e.innerText && {test}).pop()"


@contextmanager
def reported_on_failure(browser, shot: Path) -> Iterator[None]:
    """On a failure inside: a screenshot to `shot`, the page's messages and text printed; the
    browser is closed either way."""
    try:
        yield
    except BaseException:
        browser.screenshot(shot)
        print(browser.evaluate(ERRORS_JS))
        print(browser.evaluate("location.href + '\\n' + document.body.innerText.slice(0, 3000)"))
        raise
    finally:
        browser.close()


def type_until_kept(browser, field: str, text: str, what: str) -> None:
    """Type `text` into the form field `field` (a JS expression) as a user would, again if the
    form redraws it with its old value (it can while its schema and defaults still load), until
    the field has kept `text` for two checks in a row."""
    seen = {"kept": 0}

    def kept() -> bool:
        if browser.evaluate(f"{field}.value") != text:
            browser.type_into(field, text)
            seen["kept"] = 0
            return False
        seen["kept"] += 1
        return seen["kept"] >= 2

    wait_until(kept, 60, f"{what} to keep the typed value", every=0.5)


def submit_run(browser, url: str, deployment_id, what: str, timeout: float = 120) -> str:
    """Click the Run form's Submit and wait until the server has the deployment's new run; its id.
    Under load, the Prefect UI sometimes loses the call that checks the form against its schema
    (it then shows its generic "Oops. Something went wrong." toast and stays on the form): a user
    clicks Submit again, and so does this, every 15 s while the server has no run and the form
    is still there."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    last_click = {"at": 0.0}
    submit = button("Submit")

    def created() -> str | None:
        with api(url) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        if runs:
            return str(runs[0].id)
        if time.monotonic() - last_click["at"] > 15 and browser.evaluate(f"!!{submit}"):
            browser.evaluate(f"{submit}.click()")
            last_click["at"] = time.monotonic()
        return None

    return wait_until(created, timeout, f"the new {what} run on the server", every=1.0)


def button(text: str) -> str:
    return f"Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === {json.dumps(text)})"


def test_run_the_build_deployment_from_the_ui_and_read_its_counts(tmp_path):
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:8])
    started = time.monotonic()

    def log(message: str) -> None:  # where the time goes (pytest -s)
        print(f"[{time.monotonic() - started:5.1f} s] {message}", flush=True)

    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as teacher, processes(tmp_path / "logs") as group:
        config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", teacher.base_url)
        port = free_port()
        url = start_server(group, tmp_path / "server-home", port, ui=True)
        log("server up")
        # `distill serve` runs the flow runs; the key is in its environment only.
        env = base_env(tmp_path / "client-home", PREFECT_API_URL=url, DISTILL_TEST_KEY=API_KEY, PREFECT_RUNNER_POLL_FREQUENCY="2")
        group.start("serve", [sys.executable, "-m", "distillflow.cli", "serve", str(config)], env, cwd=tmp_path)
        browser = launch(group, tmp_path / "chromium-profile")
        with reported_on_failure(browser, SCREENSHOTS / "failed.png"):
            deployment = wait_for_deployment(url, "build-dataset/test-build", 60, group)
            log("deployment registered")
            ui = f"http://127.0.0.1:{port}"

            # The deployment page, then its Run form (custom run).
            browser.goto(f"{ui}/deployments/deployment/{deployment.id}")
            browser.wait_for("document.body.innerText.includes('test-build')", "the deployment page")
            browser.screenshot(SCREENSHOTS / "1-deployment.png")
            browser.goto(f"{ui}/deployments/deployment/{deployment.id}/run")
            num_prompts = f"{FIELD_JS}('input', 'Num Prompts (Optional)\\nTarget prompt count')"
            name = f"{FIELD_JS}('textarea', 'Name\\nDataset / run name.')"
            browser.wait_for(f"{num_prompts} && {num_prompts}.value === '1000'", "the Run form with the config's num_prompts")
            assert browser.evaluate(f"{name}.value") == "test-build"

            # Edit two parameters as a user would: type over the old values.
            type_until_kept(browser, num_prompts, "5", "num_prompts")
            type_until_kept(browser, name, "from-the-ui", "name")
            browser.screenshot(SCREENSHOTS / "2-run-form-edited.png")
            run_id = submit_run(browser, url, deployment.id, "build")
            browser.goto(f"{ui}/runs/flow-run/{run_id}")  # the run's page
            log(f"submitted run {run_id}")
            run = wait_until(finished_run(url, run_id), 120, "the flow run to finish", group, every=1.0)
            log(f"run {run.state.name}")
            assert run.state.is_completed(), flow_run_logs(url, run.id) + group.log("serve")
            assert run.parameters["config"]["prompts"]["num_prompts"] == 5
            browser.wait_for("document.body.innerText.includes('Completed')", "the run page to show Completed")
            browser.screenshot(SCREENSHOTS / "3-flow-run-completed.png")

            # The run's Artifacts tab lists the summary; its page shows the counts and the chart.
            # The tab renders after the run page does: click it until the artifact card shows.
            tab = deepest_with_text("Artifacts", exact=True)
            card = deepest_with_text("from-the-ui-summary")
            browser.wait_for(
                f"(() => {{ const card = {card}; if (!card) {{ const tab = {tab}; if (tab) tab.click(); }} return !!card; }})()",
                "the summary artifact in the run's Artifacts tab",
                60,
            )
            browser.screenshot(SCREENSHOTS / "4-run-artifacts.png")
            browser.click(card, "the summary artifact card")
            browser.wait_for("document.body.innerText.includes('5 accepted, 0 rejected')", "the counts on the artifact page")
            text = browser.evaluate("document.body.innerText")
            assert "Rows per stage" in text and "Accepted rows per strategy" in text and "Teacher usage" in text
            image_width = browser.wait_for(
                "Array.from(document.images).filter(i => i.src.startsWith('data:image/png') && i.complete)"
                ".map(i => i.naturalWidth)[0]",
                "the length histograms image to render",
            )
            assert image_width > 300
            browser.evaluate("window.scrollTo(0, 0)")
            browser.screenshot(SCREENSHOTS / "5-artifact-summary.png")
            browser.evaluate("Array.from(document.images).find(i => i.src.startsWith('data:image/png')).scrollIntoView()")
            browser.screenshot(SCREENSHOTS / "6-artifact-length-histograms.png")
            log("artifact page checked")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["name"] == "from-the-ui" and manifest["counts"]["accepted"] == 5


def test_a_slow_run_shows_its_progress_and_a_failed_run_its_paragraph_once(tmp_path):
    """While a slow build runs, its page shows how far the teacher got (the run's log lines and
    its progress artifact); a build whose teacher is unreachable shows the project's paragraph
    on its page, once, with no traceback around it."""
    shutil.rmtree(SCREENSHOTS / "progress-and-error", ignore_errors=True)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:8])
    slow_teacher = FaultyOpenAIServer(api_key=API_KEY, latency_s=2.5)  # one at a time: about 20 s of teacher
    with ServerThread(slow_teacher, free_port()) as teacher, processes(tmp_path / "logs") as group:
        config = write_config(
            tmp_path / "c.yaml", seeds, tmp_path / "out", teacher.base_url, max_concurrency=1, batch_size=1,
            first_contact_s=2, max_retries=1,
        )
        port = free_port()
        url = start_server(group, tmp_path / "server-home", port, ui=True)
        env = base_env(tmp_path / "client-home", PREFECT_API_URL=url, DISTILL_TEST_KEY=API_KEY,
                       PREFECT_RUNNER_POLL_FREQUENCY="1", DISTILL_RUN_LOG_INTERVAL_S="1",
                       DISTILL_LOG_DIR=str(tmp_path / "serve-logs"))
        group.start("serve", [sys.executable, "-m", "distillflow.cli", "serve", str(config)], env, cwd=tmp_path)
        browser = launch(group, tmp_path / "chromium-profile")
        shots = SCREENSHOTS / "progress-and-error"
        with reported_on_failure(browser, SCREENSHOTS / "progress-and-error" / "failed.png"):
            deployment = wait_for_deployment(url, "build-dataset/test-build", 60, group)
            ui = f"http://127.0.0.1:{port}"
            with api(url) as client:
                slow = client.create_flow_run_from_deployment(deployment.id, parameters=deployment.parameters)
                dead = json.loads(json.dumps(deployment.parameters))
                dead["config"]["teacher"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens
                dead["config"]["output_dir"] = str(tmp_path / "out-dead")  # one writer per output directory
                failing = client.create_flow_run_from_deployment(deployment.id, parameters=dead)

            # The slow run's page: the teacher's count shows in its log while it still runs.
            browser.goto(f"{ui}/runs/flow-run/{slow.id}")
            seen = browser.wait_for(
                "(() => { const m = document.body.innerText.match(/\\[test-build teacher\\] (\\d)\\/8 answered/g);"
                " return m && m.length ? m[m.length - 1] : null; })()",
                "the teacher's progress line on the running run's page", 90,
            )
            with api(url) as client:
                still = client.read_flow_run(slow.id)
            assert not still.state.is_final(), f"saw {seen!r} only after the run ended ({still.state.name})"
            browser.screenshot(shots / "1-running-with-progress.png")

            # The failed run's page: the paragraph once, no traceback.
            def failed():
                with api(url) as client:
                    run = client.read_flow_run(failing.id)
                return run if run.state.is_final() else None

            run = wait_until(failed, 120, "the run with the unreachable teacher to end", group, every=1.0)
            assert run.state.is_failed(), run.state.name
            paragraph = run.state.message
            assert paragraph.startswith("teacher at http://127.0.0.1:") and "start the teacher server" in paragraph
            browser.goto(f"{ui}/runs/flow-run/{failing.id}")
            opening = paragraph[:60]
            browser.wait_for(f"document.body.innerText.includes({json.dumps(opening)})", "the paragraph on the failed run's page", 60)
            browser.screenshot(shots / "2-failed-run.png")
            text = browser.evaluate("document.body.innerText")
            assert text.count(opening) == 1, text[:4000]
            assert "Traceback" not in text
            # The traceback is kept on the machine that ran the run, in the run's own log file.
            kept = (tmp_path / "serve-logs" / f"distill-run-{failing.id}.log").read_text()
            assert "Traceback" in kept and "TeacherUnreachableError" in kept, kept[-2000:]
            wait_until(finished_run(url, slow.id), 120, "the slow run to finish", group, every=1.0)


def finished_run(url: str, run_id):
    def check():
        with api(url) as client:
            run = client.read_flow_run(run_id)
        return run if run.state.is_final() else None

    return check


def submit_with_output_dir(browser, ui: str, url: str, deployment, old: str, new: str, shots: Path, name: str) -> str:
    """Open the deployment's Run form, type `new` over the output_dir `old`, submit; the new run's id."""
    browser.goto(f"{ui}/deployments/deployment/{deployment.id}/run")
    output_dir = f"{FIELD_JS}('textarea', 'Output Dir\\nWhere the dataset (and the ledger) is written.')"
    browser.wait_for(f"{output_dir} && {output_dir}.value === {json.dumps(old)}", f"the {name} form with its output_dir")
    type_until_kept(browser, output_dir, new, "output_dir")
    browser.screenshot(shots / f"{name}-form-edited.png")
    return submit_run(browser, url, deployment.id, name)


@pytest.mark.timeout(900)
def test_an_output_dir_edited_in_the_forms_is_what_capture_and_training_read(tmp_path):
    """A config with capture and kd_topk training, served; in the capture form the user points
    output_dir at another copy of the dataset, then does the same in the training form. The
    capture writes into that copy (the original stays as it was) and training reads that copy:
    kd_topk needs the captured columns, which only the copy has."""
    import yaml

    from distillflow.training.scratch import build_tiny_llama
    from tests.test_capture_logits import write_dataset

    shots = SCREENSHOTS / "stage-forms"
    shutil.rmtree(shots, ignore_errors=True)
    teacher = tmp_path / "teacher"
    build_tiny_llama(teacher, hidden_size=64, num_heads=2, num_layers=2, vocab_size=320, seed=1)
    built = write_dataset(tmp_path / "built")
    edited = shutil.copytree(built, tmp_path / "edited")
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ui-stages", "output_dir": str(built),  # no seeds: this config only captures and trains
        "teacher": {"backend": "local", "model": str(teacher), "device": "cpu"},
        "capture": {"k": 4, "max_length": 64, "batch_size": 4},
        "training": {"objective": "kd_topk", "student": str(teacher), "output_dir": str(tmp_path / "student"),
                     "max_length": 64, "max_steps": 2, "micro_batch_size": 2, "master_port": free_port()},
    }))
    with processes(tmp_path / "logs") as group:
        port = free_port()
        url = start_server(group, tmp_path / "server-home", port, ui=True)
        env = base_env(tmp_path / "client-home", PREFECT_API_URL=url, PREFECT_RUNNER_POLL_FREQUENCY="1",
                       DS_ACCELERATOR="cpu", DISTILL_LOG_DIR=str(tmp_path / "serve-logs"))
        group.start("serve", [sys.executable, "-m", "distillflow.cli", "serve", str(config)], env, cwd=tmp_path)
        browser = launch(group, tmp_path / "chromium-profile")
        ui = f"http://127.0.0.1:{port}"
        with reported_on_failure(browser, shots / "failed.png"):
            capture = wait_for_deployment(url, "distill-capture-logits/ui-stages", 90, group)
            run_id = submit_with_output_dir(browser, ui, url, capture, str(built), str(edited), shots, "capture")
            run = wait_until(finished_run(url, run_id), 300, "the capture run to finish", group, every=1.0)
            assert run.state.is_completed(), flow_run_logs(url, run.id) + group.log("serve")
            assert run.parameters["config"]["output_dir"] == str(edited)
            assert json.loads((edited / "manifest.json").read_text())["capture"]["k"] == 4
            assert "capture" not in json.loads((built / "manifest.json").read_text())  # untouched

            train = wait_for_deployment(url, "distill-train/ui-stages", 30, group)
            run_id = submit_with_output_dir(browser, ui, url, train, str(built), str(edited), shots, "train")
            run = wait_until(finished_run(url, run_id), 480, "the training run to finish", group, every=1.0)
            assert run.state.is_completed(), flow_run_logs(url, run.id) + group.log("serve")
            browser.goto(f"{ui}/runs/flow-run/{run_id}")
            browser.wait_for("document.body.innerText.includes('Completed')", "the training run's page to show Completed")
            browser.screenshot(shots / "train-completed.png")
    summary = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert summary["steps"] == 2 and summary["objective"] == "kd_topk"
