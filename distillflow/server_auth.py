"""A Prefect server with basic authentication, as the `distill` commands meet it.

A server started with `PREFECT_SERVER_API_AUTH_STRING=USER:PASSWORD` answers every API
call but its health check with 401 unless the call carries that string; Prefect's clients
send `PREFECT_API_AUTH_STRING`. distillflow leaves reading it to Prefect (the environment
of the command, the worker or the `serve` process) and never puts it in a distillflow
config, a flow parameter, a log line or an artifact: only the setting's name appears in
messages.

`explain_server_error` turns the 401 that any command meets first (`serve`, `deploy`,
`build` with a work pool, a flow run reported to the server) into one paragraph naming the
setting and the fix.
"""

from __future__ import annotations

import httpx

AUTH_SETTING = "PREFECT_API_AUTH_STRING"
SERVER_AUTH_SETTING = "PREFECT_SERVER_API_AUTH_STRING"


class ServerAuthError(Exception):
    """The Prefect server refused this command's credentials (or their absence)."""


def is_unauthorized(error: BaseException | None) -> bool:
    """Whether `error`, an error it was raised from or one it groups, is an HTTP 401."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, httpx.HTTPStatusError) and current.response.status_code == 401:
            return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend([current.__cause__, current.__context__])
    return False


def unauthorized_message() -> str:
    """The paragraph for a 401: which server, whether the setting was sent, how to fix it."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    server = (
        f"the Prefect server at PREFECT_API_URL={url}"
        if url
        else f"the temporary Prefect server of this command (no PREFECT_API_URL; {SERVER_AUTH_SETTING} is set "
        "in its environment or in a .env file here)"
    )
    fix = (
        f"set {AUTH_SETTING} to the server's {SERVER_AUTH_SETTING} (USER:PASSWORD; with docker compose, "
        f"PREFECT_AUTH_STRING in .env) in the environment of this command, e.g. `export {AUTH_SETTING}=admin:...`"
    )
    if PREFECT_API_AUTH_STRING.value():
        return f"{server} refused the credentials in {AUTH_SETTING} (401 Unauthorized): {fix}"
    return f"{server} requires basic authentication (401 Unauthorized) and {AUTH_SETTING} is not set: {fix}"


def explain_server_error(error: BaseException) -> BaseException:
    """A `ServerAuthError` with the fix when `error` comes from a 401, else `error` itself."""
    if not is_unauthorized(error):
        return error
    explained = ServerAuthError(unauthorized_message())
    explained.__cause__ = error  # the log file keeps the original traceback
    return explained
