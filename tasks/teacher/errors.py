"""The errors that stop a teacher run, and the messages that say how to fix them."""

from __future__ import annotations

from collections.abc import Sequence

from distillflow.config import TeacherConfig


class TeacherFatalError(RuntimeError):
    """The endpoint refuses every request (bad key, no permission, unknown model/URL)."""


class TeacherUnreachableError(TeacherFatalError):
    """The teacher answered none of the first prompts (connection, timeout, 5xx, malformed)."""


class TeacherFailureRateError(TeacherFatalError):
    """More prompts failed than `teacher.max_error_rate` allows."""


class NoUsableAnswersError(TeacherFatalError):
    """The run asked the teacher and got no answer that made it into the dataset."""


class TeacherAborted(TeacherFatalError):
    """The run was stopped from outside (a signal, another batch's failure)."""



def likely_fix(reason: str, config: TeacherConfig) -> str:
    """What to do about a teacher that fails every request with `reason`."""
    status = reason.rsplit(":", 1)[-1]
    if status == "connection":
        return (
            "nothing accepts connections there: start the teacher server, or correct teacher.base_url "
            "(scheme, host and port; it usually ends in /v1)"
        )
    if status in ("timeout", "408"):
        return (
            f"the server took the connection but sent no answer within teacher.timeout_s={config.timeout_s:g} s: "
            "check that it is healthy (its log, memory), or raise teacher.timeout_s if it is only slow"
        )
    if status == "malformed":
        return (
            "something answers at that URL, but not with OpenAI chat completions (an HTML page, a proxy, "
            "another API): point teacher.base_url at the API root, which usually ends in /v1"
        )
    if status == "429":
        return "the endpoint keeps rate-limiting: check the account's quota, or lower teacher.requests_per_minute"
    if status.isdigit():
        return (
            f"the server answers with HTTP {status}: read the teacher server's log (model still loading? "
            "out of memory?) and restart it"
        )
    return "check that the teacher server is up and that teacher.base_url points at it"


def unreachable_message(config: TeacherConfig, failures: Sequence[tuple[str, str, int, float]]) -> str:
    reason, detail, _, _ = failures[-1]
    attempts = sum(failure[2] for failure in failures)
    seconds = sum(failure[3] for failure in failures)
    prompts = "its first prompt" if len(failures) == 1 else f"any of its first {len(failures)} prompts"
    return (
        f"teacher at {config.base_url} (model {config.model!r}) did not answer {prompts} "
        f"({attempts} request{'s' if attempts > 1 else ''} over {seconds:.0f} s); last error: {reason}: "
        f"{detail.rstrip('.')}. Likely fix: {likely_fix(reason, config)}. "
        "Stopped the run before paying for anything; rerun once the teacher answers "
        f"(`curl {str(config.base_url).rstrip('/')}/models` should list the model)."
    )
