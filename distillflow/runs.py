"""How a command's flows run: orchestrated by a Prefect server, or as plain calls.

With a Prefect server (configured through PREFECT_API_URL or a profile, or left running by
`distill server start`), every flow and task is a Prefect run: states, logs and artifacts
in the UI. With none, Prefect would start a temporary server inside every command (5-15 s
on two cores, a database no UI shows) before the first line of work. Instead the command
runs **without orchestration** (`activate`, called by the CLI before Prefect is imported):

- calling a flow calls its function; calling a task calls its function; `task.submit`
  runs it on a thread of a pool sized like Prefect's thread-pool task runner and returns a
  future with `result()` and `wait()`; `task.map` submits one call per item;
- `quote(...)` and `unmapped(...)` arguments are unwrapped as Prefect would;
- a flow function's `Failed(...)` state (failures.failed_run) raises its error, as
  calling an orchestrated flow does;
- `get_run_logger()` (this module's: the project imports it from here) logs through
  Prefect's own `prefect.flow_runs` / `prefect.task_runs` loggers, so the terminal and the
  command's log file read as with a server: `Flow run 'build-dataset' - …`, never sent to
  an API;
- artifacts are not kept: the dataset card, `report.json` and the command's log hold the
  same facts on disk.

What needs a server switches back before its flow starts (`require_prefect`): a build
that fans its shards out to Dask or a work pool, `distill dedup --engine dask`. Set
`DISTILL_ORCHESTRATION=prefect` to keep Prefect's temporary server for every command.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import os
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

ORCHESTRATION_ENV = "DISTILL_ORCHESTRATION"  # auto (default) | prefect | local

_active = False
_originals: dict[tuple[Any, str], Any] = {}
_run_names: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("distill_run", default=None)
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def wanted_without_server() -> bool:
    """Whether a command with no Prefect server runs without orchestration (the default)
    rather than on Prefect's temporary server (DISTILL_ORCHESTRATION=prefect)."""
    value = os.environ.get(ORCHESTRATION_ENV, "auto").strip().lower()
    if value not in ("auto", "prefect", "local"):
        raise ValueError(f"{ORCHESTRATION_ENV}={value!r}: must be auto, prefect or local")
    return value != "prefect"


def activate() -> None:
    """Run every flow and task of this process as plain calls (see the module's docstring)."""
    global _active
    if _active:
        return
    from prefect.artifacts import Artifact
    from prefect.flows import Flow
    from prefect.tasks import Task

    patches: dict[tuple[Any, str], Any] = {
        (Flow, "__call__"): _call_flow,
        (Task, "__call__"): _call_task,
        (Task, "submit"): _submit_task,
        (Task, "map"): _map_task,
        (Artifact, "create"): _no_artifact,
        (Artifact, "acreate"): _no_artifact_async,
    }
    for (owner, name), replacement in patches.items():
        _originals[(owner, name)] = owner.__dict__[name]
        setattr(owner, name, replacement)
    _active = True


def keeps_artifacts() -> bool:
    """Whether Prefect artifacts are kept (a server shows them): callers skip building them
    (charts, tables) when not."""
    return not _active


def require_prefect(reason: str) -> None:
    """Give flows back to Prefect before a flow that needs it (`reason`: what needs it);
    without a server, Prefect then starts its temporary one."""
    if _active:
        deactivate()
        logging.getLogger("distillflow").info("%s needs Prefect: runs on Prefect's temporary server", reason)


def deactivate() -> None:
    """Give flows and tasks back to Prefect (undo `activate`)."""
    global _active
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()
    _active = False


def get_run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The logger of the current flow or task run: Prefect's inside an orchestrated run;
    without orchestration, Prefect's run loggers with the run's name, never sent to an API."""
    if _active:
        names = _run_names.get()
        if names is not None:
            kind, name = names
            if kind == "task":
                extra = {"task_run_name": name, "task_name": name, "send_to_api": False}
                return logging.LoggerAdapter(logging.getLogger("prefect.task_runs"), extra)
            extra = {"flow_run_name": name, "flow_name": name, "send_to_api": False}
            return logging.LoggerAdapter(logging.getLogger("prefect.flow_runs"), extra)
    from prefect import get_run_logger as prefect_run_logger

    return prefect_run_logger()


def _plain(value: Any) -> Any:
    """An argument as the function receives it: annotations unwrapped, futures resolved."""
    from prefect.utilities.annotations import BaseAnnotation

    if isinstance(value, BaseAnnotation):
        return value.unwrap()
    if isinstance(value, LocalFuture):
        return value.result()
    return value


def _run(kind: str, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    token = _run_names.set((kind, name))
    try:
        return fn(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})
    finally:
        _run_names.reset(token)


def _call_flow(self: Any, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
    from prefect.states import State

    result = _run("flow", _run_name(self, "flow_run_name", args, kwargs), self.fn, args, kwargs)
    if isinstance(result, State):  # failures.failed_run: the caller gets the error, as from Prefect
        if result.is_failed() and isinstance(result.data, BaseException):
            raise result.data
        return result.result()
    return result


def _run_name(run: Any, attribute: str, args: tuple, kwargs: dict[str, Any]) -> str:
    """The run's name as Prefect would give it: its `flow_run_name` / `task_run_name`
    template filled from the call's arguments, else the flow's or task's name."""
    template = getattr(run, attribute, None)
    if isinstance(template, str):
        import inspect

        try:
            bound = inspect.signature(run.fn).bind_partial(*args, **kwargs).arguments
            return template.format(**{k: _plain(v) for k, v in bound.items()})
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            pass
    return run.name


def _call_task(self: Any, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
    return _run("task", _run_name(self, "task_run_name", args, kwargs), self.fn, args, kwargs)


class LocalFuture:
    """A submitted task's result (the part of Prefect's future the project uses)."""

    def __init__(self, future: concurrent.futures.Future, name: str) -> None:
        self.future, self.name = future, name

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        return self.future.result(timeout)

    def wait(self, timeout: float | None = None) -> None:
        concurrent.futures.wait([self.future], timeout=timeout)

    def done(self) -> bool:
        return self.future.done()


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:  # Prefect's thread-pool task runner's default size
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="distill-task"
            )
        return _pool


def _submit_task(self: Any, *args: Any, wait_for: Any = None, **kwargs: Any) -> LocalFuture:
    name = _run_name(self, "task_run_name", args, kwargs)
    context = contextvars.copy_context()  # the flow's run name and Prefect settings go along
    future = _thread_pool().submit(context.run, _run, "task", name, self.fn, args, kwargs)
    return LocalFuture(future, name)


def _map_task(self: Any, *args: Any, wait_for: Any = None, return_state: bool = False, **kwargs: Any) -> list[LocalFuture]:
    """One submitted call per item of the iterable arguments (`unmapped(...)` ones stay whole)."""
    from prefect.utilities.annotations import BaseAnnotation

    def mapped(value: Any) -> bool:
        return not isinstance(value, (BaseAnnotation, str, bytes, dict)) and hasattr(value, "__iter__")

    positional = [list(a) if mapped(a) else a for a in args]
    named = {k: list(v) if mapped(v) else v for k, v in kwargs.items()}
    lengths = {len(v) for v in [*positional, *named.values()] if isinstance(v, list)}
    if len(lengths) != 1:
        raise ValueError(f"task {self.name!r}: map needs iterables of one length (got lengths {sorted(lengths)})")
    (count,) = lengths

    def item(value: Any, i: int) -> Any:  # `unmapped(...)` stays whole; `_run` unwraps it
        return value[i] if isinstance(value, list) else value

    return [
        _submit_task(self, *[item(a, i) for a in positional], **{k: item(v, i) for k, v in named.items()})
        for i in range(count)
    ]


def _no_artifact(self: Any, *args: Any, **kwargs: Any) -> Any:
    return SimpleNamespace(id=None, key=getattr(self, "key", None))


async def _no_artifact_async(self: Any, *args: Any, **kwargs: Any) -> Any:
    return _no_artifact(self)
