"""`make_teacher`: the `Teacher` (tasks/teacher.py) a config asks for.

- `backend: local` → `LocalTeacherClient` (a model directory, in this process);
- `mode: batch` → `BatchTeacher` (the OpenAI Batch API);
- `base_url` with `replicas` → `ReplicaTeacher` over one client per server;
- `client_processes > 1` → `PooledTeacher` (requests from several processes);
- otherwise → `OpenAITeacher`.

Every caller (the build, its shard workers, mining, evaluation's `teacher: true` model and
the judge) gets its teacher here and uses it only through the protocol.
"""

from __future__ import annotations

from distillflow.config import TeacherConfig
from distillflow.tasks.teacher import OpenAITeacher, Teacher, resolve_api_key
from distillflow.tasks.teacher_batch import BatchTeacher
from distillflow.tasks.teacher_pool import PooledTeacher
from distillflow.tasks.teacher_replicas import ReplicaTeacher


def make_teacher(config: TeacherConfig, api_key: str | None = None) -> Teacher:
    """The teacher of `config`; an HTTP teacher's key from `api_key` or its `api_key_env`."""
    if config.backend == "local":
        # Imported here: torch and transformers cost an HTTP teacher's build ~1.5 s of start-up.
        from distillflow.tasks.teacher_local import LocalTeacherClient

        return LocalTeacherClient(config)
    key = api_key if api_key is not None else resolve_api_key(config.api_key_env)
    if config.mode == "batch":
        return BatchTeacher(config, key)
    if config.replicas:
        if config.client_processes > 1:
            return ReplicaTeacher(config, key, one=lambda replica: PooledTeacher(replica, key))
        return ReplicaTeacher(config, key)
    if config.client_processes > 1:
        return PooledTeacher(config, key)
    return OpenAITeacher(config, api_key=key)
