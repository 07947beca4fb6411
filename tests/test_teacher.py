"""The OpenAI teacher client against the project's own faulty OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import pytest

import distillflow.tasks.teacher.openai_client as teacher_module
from distillflow.config import TeacherConfig
from distillflow.storage.ledger import Ledger
from distillflow.tasks.teacher import Teacher, TeacherFatalError, answer_and_record, answer_requests, build_messages
from distillflow.tasks.teacher.choose import make_teacher as teacher_for
from tests.openai_server import FaultyOpenAIServer, ServerThread, expected_answer


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_module, "BACKOFF_BASE_S", 0.01)
    teacher_module._verified_endpoints.clear()


@pytest.fixture
def server(port):
    fake = FaultyOpenAIServer(api_key="right-key", hang_s=3.0)
    with ServerThread(fake, port) as running:
        yield running


def make_teacher(server: ServerThread, key: str = "right-key", **overrides) -> Teacher:
    settings = dict(
        base_url=server.base_url, model="test-teacher", api_key_env=None, max_concurrency=16, timeout_s=1.0, max_retries=4
    )
    settings.update(overrides)
    return teacher_for(TeacherConfig(**settings), api_key=key)


def ask(teacher: Teacher, prompts: list[str]):
    return asyncio.run(teacher.answer_all([build_messages(p, None) for p in prompts]))


@pytest.mark.parametrize("http_backend", ["aiohttp", "httpx"])
def test_every_answer_belongs_to_its_prompt_under_concurrency(server, http_backend):
    prompts = [f"question number {i}: what is {i} squared?" for i in range(300)]
    teacher = make_teacher(server, max_concurrency=32, http_backend=http_backend)
    answers = ask(teacher, prompts)
    assert [a.content for a in answers] == [expected_answer(p) for p in prompts]
    assert all(a.finish_reason == "stop" and a.ok for a in answers)
    assert teacher.stats.requests_sent == 300
    assert server.server.total_requests == 300


@pytest.mark.parametrize("http_backend", ["aiohttp", "httpx"])
def test_transient_faults_are_retried_until_answered(server, http_backend):
    prompts = [
        "rate limited [[429x2]]",
        "server error [[500x1]]",
        "unavailable [[503x2]]",
        "dropped connection [[dropx1]]",
        "malformed body [[badjsonx1]]",
        "hangs past the timeout [[hangx1]]",
        "plain",
    ]
    teacher = make_teacher(server, http_backend=http_backend)
    started = time.monotonic()
    answers = ask(teacher, prompts)
    assert [a.content for a in answers] == [expected_answer(p) for p in prompts]
    attempts = server.server.attempts
    assert [attempts[p] for p in prompts] == [3, 2, 3, 2, 2, 2, 1]
    reasons = teacher.stats.retry_reasons
    for reason in ("429", "500", "503", "connection", "malformed", "timeout"):
        assert reasons[f"teacher_error:{reason}"] >= 1, reasons
    # Two 429s each carried Retry-After: 1 — the client waited for them.
    assert time.monotonic() - started >= 2.0


def test_bad_request_is_a_per_prompt_reject_and_the_run_goes_on(server):
    prompts = ["fine one", "this one is refused [[400]]", "fine two"]
    answers = ask(make_teacher(server), prompts)
    assert answers[1].error == "teacher_error:400" and answers[1].content is None
    assert answers[0].ok and answers[2].ok
    assert server.server.attempts[prompts[1]] == 1  # a 400 is not retried


def test_exhausted_retries_become_an_error_answer(server):
    answers = ask(make_teacher(server, max_retries=2), ["always down [[503]]"])
    assert answers[0].error == "teacher_error:503"
    assert "3 attempts" in answers[0].error_detail
    assert server.server.attempts["always down [[503]]"] == 3


def test_wrong_key_stops_the_run_after_one_call(server):
    teacher = make_teacher(server, key="wrong-key", max_concurrency=32)
    with pytest.raises(TeacherFatalError, match="401"):
        ask(teacher, [f"prompt {i}" for i in range(200)])
    assert server.server.unauthorized <= 2
    assert server.server.total_requests <= 2


def test_unknown_model_stops_the_run(server):
    with pytest.raises(TeacherFatalError, match="404.*teacher.model"):
        ask(make_teacher(server, model="no-such-model"), ["a", "b", "c"])
    assert server.server.total_requests <= 2


def test_truncation_empty_content_and_top_logprobs_come_through(server):
    teacher = make_teacher(server, generation={"top_logprobs": 3, "max_tokens": 64})
    answers = ask(teacher, ["cut me [[truncate]] off please", "say nothing [[empty]]", "one two three"])
    assert answers[0].finish_reason == "length"
    assert answers[1].content == "" and answers[1].ok
    tokens = answers[2].top_logprobs
    assert tokens is not None and len(tokens) == len(answers[2].content.split(" "))
    assert all(len(t["top"]) == 3 for t in tokens)
    assert "".join(t["token"] for t in tokens) == answers[2].content


def test_requests_per_minute_is_respected(server):
    teacher = make_teacher(server, requests_per_minute=1200)  # 20 per second, 1 s burst
    started = time.monotonic()
    ask(teacher, [f"rated {i}" for i in range(50)])
    assert time.monotonic() - started >= 1.2  # 50 requests - 20 burst = 30 more at 20/s


def test_ledger_pays_once_and_keeps_permanent_errors(server, tmp_path):
    prompts = [f"ledger prompt {i}" for i in range(40)] + ["refused [[400]]", "flaky [[503]]"]
    messages = [build_messages(p, "be brief") for p in prompts]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        first = answer_requests(make_teacher(server, max_retries=1), ledger, messages)
        assert len(ledger) == 41  # 40 answers + the permanent 400; the 503 is not recorded
    before = server.server.total_requests
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        teacher = make_teacher(server, max_retries=1)
        second = answer_requests(teacher, ledger, messages)
    # Only the transient failure was asked again (2 attempts with max_retries=1).
    assert server.server.total_requests - before == 2
    assert teacher.stats.ledger_hits == 41
    assert [a.content for a, _ in first] == [a.content for a, _ in second]
    assert [t for _, t in first[:40]] == [t for _, t in second[:40]]  # created_at kept


def test_changed_generation_parameters_are_a_new_request(server, tmp_path):
    messages = [build_messages("same prompt", None)]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        answer_requests(make_teacher(server), ledger, messages)
        answer_requests(make_teacher(server, generation={"temperature": 0.0}), ledger, messages)
        assert len(ledger) == 2


# -- several client processes (teacher.client_processes) -------------------------------------


def test_client_processes_answer_every_prompt_into_the_ledger_once(server, tmp_path):
    prompts = [f"multi-process question {i}" for i in range(300)] + ["refused [[400]]", "late [[503x1]]"]
    messages = [build_messages(p, None) for p in prompts]
    teacher = make_teacher(server, max_concurrency=32, client_processes=2)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        try:
            answers = answer_requests(teacher, ledger, messages)
        finally:
            teacher.close()
        assert len(ledger) == 302  # 301 answers (one after a retry) + the permanent 400
    assert [a.content for a, _ in answers[:300]] == [expected_answer(p) for p in prompts[:300]]
    assert answers[300][0].error == "teacher_error:400"
    assert answers[301][0].content == expected_answer(prompts[301])
    # Both processes' counts reach the run's stats; the server saw each prompt once (+1 retry).
    assert teacher.stats.requests_sent == server.server.total_requests == 303
    assert teacher.stats.retry_reasons["teacher_error:503"] == 1
    assert teacher.stats.answered == 302


def test_client_processes_stop_on_a_wrong_key_after_one_call_each(server):
    teacher = make_teacher(server, key="wrong-key", max_concurrency=32, client_processes=2)
    try:
        with pytest.raises(TeacherFatalError, match="401"):
            teacher.answer_sync([build_messages(f"prompt {i}", None) for i in range(200)])
        with pytest.raises(TeacherFatalError):  # later batches fail at once
            teacher.answer_sync([build_messages("another", None)])
    finally:
        teacher.close()
    assert server.server.total_requests <= 2


def test_client_processes_do_not_rerun_the_callers_script(tmp_path):
    """A user's script without an `if __name__ == "__main__":` guard runs once: each client
    process is a fresh interpreter on its own module, not a re-import of the script, and
    the API key reaches it over its pipe, not on its command line."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "unguarded.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        "from distillflow.config import TeacherConfig\n"
        "from distillflow.tasks.teacher import build_messages\n"
        "from distillflow.tasks.teacher.choose import make_teacher\n"
        "from tests.openai_server import FaultyOpenAIServer, ServerThread\n"
        "import socket\n"
        "print('script ran', flush=True)\n"
        "with socket.socket() as probe:\n"
        "    probe.bind(('127.0.0.1', 0)); port = probe.getsockname()[1]\n"
        "with ServerThread(FaultyOpenAIServer(api_key='secret-key'), port) as server:\n"
        "    teacher = make_teacher(TeacherConfig(base_url=server.base_url, model='test-teacher', api_key_env=None,\n"
        "                                         client_processes=2), api_key='secret-key')\n"
        "    import psutil\n"
        "    answers = teacher.answer_sync([build_messages(f'q{i}', None) for i in range(6)])\n"
        "    children = psutil.Process().children()\n"
        "    print('children', len(children), 'key on a command line', any('secret-key' in ' '.join(c.cmdline()) for c in children))\n"
        "    teacher.close()\n"
        "    print('answered', sum(a.ok for a in answers), flush=True)\n"
    )
    result = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["script ran", "children 2 key on a command line False", "answered 6"]


def test_a_dead_client_process_fails_the_batch_instead_of_hanging(server):
    teacher = make_teacher(server, client_processes=2)
    try:
        teacher.answer_sync([build_messages("warm up", None)])
        for process in teacher._pool.processes:
            process.kill()
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            teacher.answer_sync([build_messages(f"after {i}", None) for i in range(10)])
        time.sleep(0.5)  # the receivers have seen the pipes close: later batches fail at once too
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            teacher.answer_sync([build_messages("later", None)])
    finally:
        teacher.close()


def test_response_bodies_that_are_not_chat_completions_are_malformed(server):
    teacher = make_teacher(server)
    for body in (b"not json", b"[]", b'{"choices": []}', b'{"choices": [{"finish_reason": "stop"}]}',
                 b'{"choices": [{"message": {"content": 5}}]}'):
        assert teacher._parse(body) is None, body
    answer = teacher._parse(b'{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": null}')
    assert (answer.content, answer.finish_reason, answer.prompt_tokens, answer.model) == ("hi", "stop", 0, "test-teacher")


class LedgerWatchingServer(FaultyOpenAIServer):
    """Notes, as each request arrives, how many requests it has received (this one
    included) whose answers the client's ledger does not hold yet: being answered, on the
    wire back, or waiting for their commit."""

    def __init__(self, ledger_path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ledger_path = ledger_path
        self.uncommitted: list[int] = []

    async def chat(self, request):
        import sqlite3

        if self.ledger_path.exists():
            with contextlib.closing(sqlite3.connect(self.ledger_path)) as db:
                rows = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
            self.uncommitted.append(self.total_requests + 1 - rows)
        return await super().chat(request)


class CountingLedger(Ledger):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[int] = []

    def put_many(self, entries) -> None:
        self.commits.append(len(entries))
        time.sleep(0.01)  # a slow disk: the server handles whatever was sent meanwhile
        super().put_many(entries)


def test_answers_that_arrive_together_are_committed_together_before_their_workers_ask_again(port, tmp_path):
    """Grouped ledger commits: fewer transactions than answers, every answer committed
    before `on_recorded` sees it, and a worker never sends its next request while its last
    answer is uncommitted, so a crash still loses at most `max_concurrency` answers."""
    path = tmp_path / "ledger.sqlite"
    fake = LedgerWatchingServer(path, api_key="right-key", latency_s=0.02)
    prompts = [f"grouped commit prompt {i}" for i in range(400)]
    messages = [build_messages(p, None) for p in prompts]
    with ServerThread(fake, port) as server, CountingLedger(path) as ledger:
        teacher = make_teacher(server, max_concurrency=16)
        answers = answer_requests(teacher, ledger, messages)
        teacher.close()
        assert [a.content for a, _ in answers] == [expected_answer(p) for p in prompts]
        assert len(ledger) == 400 and sum(ledger.commits) == 400
        assert len(ledger.commits) < 400 and max(ledger.commits) > 1  # grouped
    # Each of the 16 workers has one request out or one answer waiting for its commit.
    assert fake.uncommitted and max(fake.uncommitted) <= 16, max(fake.uncommitted)


def keyed_requests(label: str, count: int) -> tuple[list, list[str]]:
    """`count` distinct requests and a ledger key for each."""
    return [build_messages(f"{label} {i}", None) for i in range(count)], [f"key-{i}" for i in range(count)]


def test_on_recorded_runs_after_the_answer_is_in_the_ledger(server, tmp_path):
    messages, keys = keyed_requests("recorded first", 64)
    missing: list[int] = []
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        teacher = make_teacher(server, max_concurrency=16)

        def on_recorded(index, answer, created_at):
            if keys[index] not in ledger.get_many([keys[index]]):
                missing.append(index)

        answer_and_record(teacher, messages, keys, ledger, on_recorded)
        teacher.close()
        assert len(ledger) == 64
    assert missing == []


class FailingLedger(Ledger):
    """A disk that fails from the third commit on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commits = 0

    def put_many(self, entries) -> None:
        self.commits += 1
        if self.commits >= 3:
            raise sqlite3.OperationalError("disk I/O error")
        super().put_many(entries)


def test_a_failed_ledger_commit_stops_the_run_with_its_error(server, tmp_path):
    """A commit that fails (a full or broken disk) stops the run with its error: no hang,
    and no answer reported as recorded that is not in the ledger."""
    messages, keys = keyed_requests("failing commit", 200)
    recorded: list[int] = []
    with FailingLedger(tmp_path / "ledger.sqlite") as ledger:
        teacher = make_teacher(server, max_concurrency=16)
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
            answer_and_record(teacher, messages, keys, ledger, lambda index, answer, created_at: recorded.append(index))
        assert time.monotonic() - started < 10
        teacher.close()
        stored = ledger.get_many(keys)
    assert recorded and len(recorded) < 200
    assert {keys[index] for index in recorded} <= set(stored)


def test_a_commit_whose_waiting_worker_was_cancelled_still_commits(tmp_path):
    """Ctrl-C cancels the workers waiting for a commit, and with them the future they share:
    the queued answers are committed all the same, without an error from the loop."""
    from distillflow.records import TeacherAnswer
    from distillflow.tasks.teacher import GroupCommit

    async def run(ledger: Ledger) -> None:
        commits = GroupCommit(ledger, asyncio.get_running_loop())
        _, committed = commits.add("key-a", TeacherAnswer("an answer", "stop", "m"))
        commits.add("key-b", TeacherAnswer("another", "stop", "m"))
        committed.cancel()
        commits.flush()

    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        asyncio.run(run(ledger))
        assert set(ledger.get_many(["key-a", "key-b"])) == {"key-a", "key-b"}
