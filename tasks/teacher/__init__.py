"""The teacher: every way of asking a teacher model for answers, and the ledger in front.

`distillflow.tasks.teacher` is this folder, tasks/teacher/ (pyproject.toml maps the
`distillflow.tasks` package to tasks/), while distillflow/ is another folder: the CLI,
the config and the core records.

- errors.py: the errors that stop a run, and what to tell the user;
- protocol.py: `Teacher`, what every transport implements; the request format; counts;
- budget.py: the spending budget (before each request) and the failure budget;
- rate_limit.py: client-side rate limits, following the API's rate-limit headers;
- openai_client.py: `OpenAITeacher`, an OpenAI-compatible server from this process;
- pool.py, client_process.py: `PooledTeacher`, the same from client processes;
- replicas.py: `ReplicaTeacher`, several servers of one model;
- batch.py: `BatchTeacher`, the OpenAI Batch API;
- local.py: `LocalTeacherClient`, a Hugging Face model in this process (imports torch);
- choose.py: `make_teacher`, the transport a config asks for;
- recording.py: `answer_requests`, the ledger around any transport, the one place answers
  are recorded and failures counted;
- loop_gc.py: the garbage collector's settings while a request loop runs.

Its modules import the config, core records, storage/ (the ledger), training/ (a local
model's loader) and, of tasks/, only tasks/child.py; the other steps import this package. This package re-exports what the rest of the pipeline uses, except
the transports that `make_teacher` chooses (import those, and `make_teacher`, from their
modules: pool.py starts client processes on client_process.py, and local.py imports torch).
"""

from distillflow.records import BUDGET_REASON, PERMANENT_ERROR_PREFIXES, TeacherAnswer, is_failure
from distillflow.tasks.teacher.budget import FailureBudget, Reservation, SpendingBudget
from distillflow.tasks.teacher.errors import (
    NoUsableAnswersError,
    TeacherAborted,
    TeacherFailureRateError,
    TeacherFatalError,
    TeacherUnreachableError,
    likely_fix,
    unreachable_message,
)
from distillflow.tasks.teacher.loop_gc import request_loop_gc
from distillflow.tasks.teacher.openai_client import OpenAITeacher
from distillflow.tasks.teacher.protocol import (
    Messages,
    Teacher,
    TeacherStats,
    build_messages,
    estimate_tokens,
    resolve_api_key,
)
from distillflow.tasks.teacher.rate_limit import RateLimiter, parse_duration_s
from distillflow.tasks.teacher.recording import (
    GroupCommit,
    Recording,
    answer_and_record,
    answer_requests,
    record_answer,
    teacher_params_for_key,
)

__all__ = [
    "BUDGET_REASON",
    "PERMANENT_ERROR_PREFIXES",
    "FailureBudget",
    "GroupCommit",
    "Messages",
    "NoUsableAnswersError",
    "OpenAITeacher",
    "RateLimiter",
    "Recording",
    "Reservation",
    "SpendingBudget",
    "Teacher",
    "TeacherAborted",
    "TeacherAnswer",
    "TeacherFailureRateError",
    "TeacherFatalError",
    "TeacherStats",
    "TeacherUnreachableError",
    "answer_and_record",
    "answer_requests",
    "build_messages",
    "estimate_tokens",
    "is_failure",
    "likely_fix",
    "parse_duration_s",
    "record_answer",
    "request_loop_gc",
    "resolve_api_key",
    "teacher_params_for_key",
    "unreachable_message",
]
