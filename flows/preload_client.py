"""The client side of the preload runner (:mod:`flows.preload`): hand a ``sad`` command to the server,
and the exit hooks through which the CLI reports its exit code. Kept apart so that the CLI imports this
small module and the server imports the CLI, never the other way round."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys

SOCKET_ENV = "SAD_PRELOAD_SOCKET"

_exit_hooks: list = []


def on_exit(code: int) -> None:
    """Called by the CLI just before it exits: report the code to a preload client."""
    for hook in _exit_hooks:
        with contextlib.suppress(Exception):
            hook(code)


def delegate(argv: list[str]) -> int | None:
    """Run ``sad argv`` through the preload server; None if there is none to reach."""
    path = os.environ.get(SOCKET_ENV)
    if not path or os.environ.get("SAD_PRELOAD", "1") == "0":
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode()
    socket.send_fds(conn, [request], [0, 1, 2])
    child = None

    def forward(signum, _frame):
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    reader = conn.makefile("r")
    code = None
    for line in reader:
        message = json.loads(line)
        if "pid" in message:
            child = message["pid"]
        if "exit" in message:
            code = int(message["exit"])
            break
    conn.close()
    if code is None:
        print(f"sad: the stage process {child} died without an exit code", file=sys.stderr)
        return 1
    return code
