"""A preloading stage runner: import the heavy libraries once, fork a process per stage.

Every DVC stage is a new process, and importing torch, transformers, Prefect and MLflow costs
~8 s of CPU per process before any work starts. During ``sad pipeline``, a preload server
imports them once and listens on a Unix socket; each ``sad ...`` command that DVC starts sees
``SAD_PRELOAD_SOCKET``, hands its arguments, working directory, environment and stdin/stdout/
stderr (file descriptors, over the socket) to the server, which forks a child that runs the
command exactly as the CLI would, then reports its exit code. Without the variable, or if the
server is unreachable, the command runs in its own process as usual.

Forking is safe here because the server only imports: no thread pool, CUDA context or event
loop exists in it when it forks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

from flows.preload_client import _exit_hooks

log = logging.getLogger(__name__)


def _preload_imports() -> None:
    import mlflow  # noqa: F401
    import pandas  # noqa: F401
    import pandera.pandas  # noqa: F401
    import prefect  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import flows.cli  # noqa: F401
    import flows.stages  # noqa: F401
    import sad.stages  # noqa: F401


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _run_child(conn: socket.socket) -> None:
    """In the forked child: adopt the client's stdio, cwd and env, run the command, exit."""
    code = 1
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(data.decode())
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = os.fdopen(0, "r", closefd=False)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _send(conn, {"pid": os.getpid()})
        _exit_hooks.append(lambda c: _send(conn, {"exit": int(c)}))
        from flows.cli import app

        sys.argv = ["sad", *request["argv"]]
        try:
            app(prog_name="sad")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, the client must get an answer
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
            _send(conn, {"exit": code})
        os._exit(code)


def serve(socket_path: Path) -> None:
    """Import everything, then fork one child per connection until terminated."""
    _preload_imports()
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = socket_path.with_name(socket_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    server.bind(str(tmp))
    os.chmod(tmp, 0o600)
    server.listen(8)
    os.replace(tmp, socket_path)  # the socket appears only once everything is imported
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _run_child(conn)
        conn.close()


def main() -> None:
    serve(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
