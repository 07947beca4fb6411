"""A run that fails with one of the project's errors shows its paragraph once: as the flow
run's state message and as the run's one ERROR entry, with no traceback in it."""

from __future__ import annotations

import time

import pytest

from distillflow.config import load_config
from distillflow.flows.build import build_dataset
from distillflow.tasks.teacher import TeacherUnreachableError
from tests.conftest import free_port
from tests.test_build import API_KEY, GOOD, write_config, write_seeds


def run_logs(flow_run_id, done, timeout: float = 30.0) -> list:
    """The run's log entries, oldest first, once `done(entries)` holds (they arrive in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), sort=LogSort.TIMESTAMP_ASC
            )
            if done(logs) or time.monotonic() > deadline:
                return logs
            time.sleep(0.2)


@pytest.mark.slow
def test_an_unreachable_teacher_is_one_error_paragraph(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:3])
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    path = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", base_url, first_contact_s=1, max_retries=1, timeout_s=1)
    state = build_dataset(load_config(path), return_state=True)
    assert state.is_failed()
    paragraph = state.message
    assert paragraph.startswith(f"teacher at {base_url}") and "start the teacher server" in paragraph

    def finished(logs) -> bool:
        return any(log.task_run_id is None and log.message.startswith("Finished in state") for log in logs)

    logs = run_logs(state.state_details.flow_run_id, finished)
    errors = [log for log in logs if log.level >= 40]
    assert [log.message for log in errors] == [paragraph]
    assert "Traceback" not in errors[0].message
    # No traceback on the run's page, at any level (its UI lists DEBUG entries too).
    assert not any("Traceback" in log.message for log in logs), [log.message[:200] for log in logs]
    with pytest.raises(TeacherUnreachableError):  # the command's paragraph comes from the same error
        state.result()
