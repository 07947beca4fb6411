"""Child processes that talk to the build over pipes: the shard writer
(tasks/build/shard_writer.py) and the teacher's client processes (tasks/teacher/client_process.py).

Each child is a fresh interpreter running its own module (`python -m MODULE`), not
multiprocessing's spawn, which re-runs the caller's own script in the child when it has no
`__main__` guard, and not a fork of a process with running threads. Pickled messages go
over the child's stdin (to it) and stdout (from it); what else the child prints goes to
its stderr, which it shares with the build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from multiprocessing.connection import Connection


def start_child(module: str) -> tuple[subprocess.Popen, Connection, Connection]:
    """Start `python -m module`; (the process, the connection to it, the connection from it)."""
    process = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    to_child = Connection(process.stdin.fileno(), readable=False)
    from_child = Connection(process.stdout.fileno(), writable=False)
    return process, to_child, from_child


def child_connections() -> tuple[Connection, Connection]:
    """In the child: (the connection from the build, the connection back to it).

    Stdout is taken for the replies, so anything else printed goes to stderr. SIGINT is
    ignored: a Ctrl-C in the terminal reaches the whole process group, and the build
    decides what stops (it tells the child, or closes its pipe by exiting)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reply = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    return Connection(0, writable=False), reply
