"""`make_teacher`: the `Teacher` transport (protocol.py) a config asks for.

- `backend: local` → `LocalTeacherClient` (a model directory, in this process);
- `mode: batch` → `BatchTeacher` (the OpenAI Batch API);
- `base_url` with `replicas` → `ReplicaTeacher` over one client per server;
- `client_processes > 1` → `PooledTeacher` (requests from several processes);
- `own_process` (a large build) → `PooledTeacher` with one process, started at once;
- otherwise → `OpenAITeacher` (requests from the caller's process).

Every caller (the build, its shard workers, mining, evaluation's `teacher: true` model and
the judge) gets its teacher here and uses it only through the protocol, inside `answer_requests`
(recording.py).
"""

from __future__ import annotations

from distillflow.config import TeacherConfig
from distillflow.tasks.teacher.batch import BatchTeacher
from distillflow.tasks.teacher.openai_client import OpenAITeacher
from distillflow.tasks.teacher.pool import PooledTeacher
from distillflow.tasks.teacher.protocol import Teacher, resolve_api_key
from distillflow.tasks.teacher.replicas import ReplicaTeacher


def make_teacher(config: TeacherConfig, api_key: str | None = None, own_process: bool = False) -> Teacher:
    """The teacher of `config`; an HTTP teacher's key from `api_key` or its `api_key_env`.

    `own_process`: an online HTTP teacher with `client_processes: 1` and no replicas issues its requests
    from a process of its own rather than the caller's, whose other threads (Prefect's
    task runs, the flow's bookkeeping) would otherwise take the request loop's interpreter
    lock. The process starts now; it costs about a second of start-up, so only a caller
    with many requests to come asks for it."""
    if config.backend == "local":
        # Imported here: torch and transformers cost an HTTP teacher's build ~1.5 s of start-up.
        from distillflow.tasks.teacher.local import LocalTeacherClient

        return LocalTeacherClient(config)
    key = api_key if api_key is not None else resolve_api_key(config.api_key_env)
    if config.mode == "batch":
        return BatchTeacher(config, key)
    if config.replicas:
        if config.client_processes > 1:
            return ReplicaTeacher(config, key, one=lambda replica: PooledTeacher(replica, key))
        return ReplicaTeacher(config, key)
    if config.client_processes > 1 or own_process:
        return PooledTeacher(config, key, start=own_process)
    return OpenAITeacher(config, api_key=key)
