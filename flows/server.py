"""Local Prefect and MLflow servers for the length of a pipeline run (bound to 127.0.0.1).

Without ``PREFECT_API_URL``, every Prefect process starts its own temporary server (10-20 s
each); with a local SQLite MLflow store, every process spends ~2.5 s importing and checking the
SQL store. ``sad pipeline`` starts one server of each for the whole ``dvc repro`` and stops them
afterwards. Configured ``PREFECT_API_URL`` / ``SAD_MLFLOW_URI`` are used as they are.

Nothing outlives the run: every process group the run starts is registered with a reaper
(:mod:`flows.reaper`) that stops them if the run itself is killed; a stopped run (SIGTERM, SIGINT)
stops them in order itself (the stage under ``dvc repro``, then the preload runner, then the servers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, timeout_s: float = 90.0, proc: subprocess.Popen | None = None,
                 log_file: Path | None = None) -> None:
    """Wait until ``api_url``/health answers; a server that exits or never answers is an error naming its log."""
    where = f"see {log_file}" if log_file is not None else "see its log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = _last_line(log_file)
            raise RuntimeError(f"server for {api_url} exited early with code {proc.returncode} ({where}"
                               + (f"; its last line: {tail}" if tail else "") + ")")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {api_url} not healthy after {timeout_s:.0f}s ({where})")


def _last_line(log_file: Path | None) -> str:
    """The last non-empty line of a server's log (often its error), or ''."""
    if log_file is None or not log_file.is_file():
        return ""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines()[-50:] if line.strip()]
    return lines[-1][:300] if lines else ""


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


LOCK_FILE = ".retrain.lock"


class RetrainBusy(RuntimeError):
    """Another retrain holds the project's lock."""


@contextlib.contextmanager
def single_flight(project: Path, timeout_s: float) -> Iterator[None]:
    """Hold the project's retrain lock, or raise :class:`RetrainBusy` after ``timeout_s``."""
    lock = FileLock(str(project / LOCK_FILE))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise RetrainBusy(f"another retrain is running in {project} (lock {project / LOCK_FILE}); "
                          f"waited {timeout_s:.0f}s (retrain.lock_timeout_s). Try again when it has finished.") from None
    try:
        yield
    finally:
        lock.release()


class RetrainStopped(BaseException):
    """SIGTERM or SIGINT reached the retrain (a BaseException: never retried, never taken for a failed stage)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

def stop_on_signals(stopped: type[RetrainStopped] = RetrainStopped) -> None:
    """SIGTERM/SIGINT raise ``stopped`` (a :class:`RetrainStopped`) in the main thread, so every ``finally``
    runs: the running stage, then the preload runner and the servers are stopped (no-op off the main thread)."""

    def raise_stopped(signum: int, _frame) -> None:
        raise stopped(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, raise_stopped)



class Reaper:
    """The guard process of :mod:`flows.reaper`: told every process group the run starts, it stops them
    if this process dies without saying ``done`` (its stdin pipe closes with us, however we die).
    Registered in ``_reapers`` while it guards, so :func:`watch_group` reaches it."""

    def __init__(self, log_file: Path):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "flows.reaper"], stdin=subprocess.PIPE, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True, text=True)

    def _send(self, line: str) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def watch_group(self, pgid: int) -> None:
        self._send(f"pgid {pgid}")

    def watch_pid(self, pid: int) -> None:
        self._send(f"pid {pid}")

    def watch_store(self, backend_uri: str, since_ms: int, session: str | None = None) -> None:
        """Mark RUNNING runs of ``backend_uri`` started since ``since_ms`` (tagged ``session``, if given) KILLED
        should the guarded run die or be interrupted."""
        self._send(f"mlflow {since_ms} {session or '-'} {backend_uri}")

    def close(self, interrupted: bool = False) -> None:
        """Everything was stopped here: the reaper exits without touching anything; ``interrupted``: it first
        stops what is left and marks the MLflow runs still RUNNING as KILLED (a stage killed while it
        ended its run)."""
        self._send("reap" if interrupted else "done")
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


_reapers: list[Reaper] = []


def watch_group(pgid: int) -> None:
    """Register a process group the running pipeline started (no-op outside ``pipeline_services``)."""
    for reaper in _reapers:
        reaper.watch_group(pgid)


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``proc``; SIGKILL what is left of it once the whole group has exited or
    ``grace_s`` has passed; waits for ``proc``. The leader (DVC) dies at once on SIGTERM while the stage it ran
    unwinds (ends its MLflow run FAILED, marks its Prefect flow run): the grace is for the group, not the
    leader. A stage killed before it ended its MLflow run leaves it RUNNING for the reaper to mark KILLED
    (``Reaper.close(interrupted=True)``)."""
    from flows.reaper import group_alive

    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    while time.monotonic() < deadline and group_alive(proc.pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, even when its leader is gone
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _spawn(cmd: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    watch_group(proc.pid)
    return proc


def spawn_prefect(log_file: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on 127.0.0.1 (not yet healthy); returns (process, API URL)."""
    port = port or free_port()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "false")}
    env.pop("PREFECT_API_URL", None)
    cmd = [_tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return _spawn(cmd, log_file, env), f"http://127.0.0.1:{port}/api"


def spawn_mlflow(backend_uri: str, artifact_root: Path, log_file: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` over a local store on 127.0.0.1; returns (process, tracking URI)."""
    port = port or free_port()
    artifact_root.mkdir(parents=True, exist_ok=True)
    cmd = [_tool("mlflow"), "server", "--backend-store-uri", backend_uri, "--default-artifact-root",
           artifact_root.resolve().as_uri(), "--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # The pipeline needs tracking and the registry only: no background job runner (its workers
    # would compete with training for the CPU).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return _spawn(cmd, log_file, env), f"http://127.0.0.1:{port}"


def start_server(log_file: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start a Prefect server on 127.0.0.1 and wait until it is healthy."""
    proc, api_url = spawn_prefect(log_file, port)
    try:
        wait_healthy(api_url, proc=proc, log_file=log_file)
    except Exception:
        stop_server(proc)
        raise
    return proc, api_url


def stop_server(proc: subprocess.Popen) -> None:
    stop_group(proc)


def new_run_session() -> str:
    """A new id for the MLflow runs of one retrain or hand-run stage (``sad.tracking.SESSION_ENV``)."""
    import uuid

    return uuid.uuid4().hex


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def spawn_preload(log_file: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """Start the preload server (flows/preload.py); its socket appears once it is ready."""
    folder = Path(tempfile.mkdtemp(prefix="sad-preload-"))
    sock = folder / "stages.sock"
    proc = _spawn([sys.executable, "-m", "flows.preload", str(sock)], log_file, env)
    return proc, sock


def wait_for_socket(sock: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def pipeline_services(log_dir: Path, mlflow_uri: str, artifact_root: Path, preload: bool = True) -> Iterator[dict[str, str]]:
    """Yield the environment the pipeline's stages need: Prefect API URL, MLflow tracking URI and
    the preload socket.

    Servers are started (in parallel) only for what is not configured already, and stopped on exit.
    """
    env: dict[str, str] = {}
    procs: list[tuple[subprocess.Popen, str, Path]] = []
    preload_proc: subprocess.Popen | None = None
    interrupted = False
    from sad.tracking import SESSION_ENV

    # The stages' MLflow runs carry a session: the reaper marks only these, and a retried register-and-gate tells
    # its own earlier decision from an earlier retrain's. Inside another pipeline_services of this process (`sad
    # pipeline` -> retrain_flow) it is the enclosing one's, whose reaper watches the store; otherwise a new one,
    # even when one is in the environment (servers a team or a test started once and exported, with it).
    enclosing = os.environ.get(SESSION_ENV) if _reapers else None
    session = enclosing or new_run_session()
    env[SESSION_ENV] = session
    reaper = Reaper(log_dir / "reaper.log")
    _reapers.append(reaper)
    if is_local_store(mlflow_uri):
        reaper.watch_store(mlflow_uri, int(time.time() * 1000), session)
    try:
        if os.environ.get("PREFECT_API_URL"):
            env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
        else:
            proc, url = spawn_prefect(log_dir / "prefect-server.log")
            procs.append((proc, url + "/health", log_dir / "prefect-server.log"))
            env["PREFECT_API_URL"] = url
        if not os.environ.get("SAD_MLFLOW_URI") and is_local_store(mlflow_uri):
            proc, url = spawn_mlflow(mlflow_uri, artifact_root, log_dir / "mlflow-server.log")
            procs.append((proc, url + "/health", log_dir / "mlflow-server.log"))
            env["SAD_MLFLOW_URI"] = url
        if os.environ.get("SAD_PRELOAD_SOCKET"):
            env["SAD_PRELOAD_SOCKET"] = os.environ["SAD_PRELOAD_SOCKET"]
            preload = False
        if preload:
            # Started with the final environment: libraries that read settings at import see it.
            preload_proc, sock = spawn_preload(log_dir / "preload.log", {**os.environ, **env})
        for proc, health, log_file in procs:
            wait_healthy(health.rsplit("/health", 1)[0], proc=proc, log_file=log_file)
        if preload_proc is not None:
            if wait_for_socket(sock, preload_proc):
                env["SAD_PRELOAD_SOCKET"] = str(sock)
            else:
                log.warning("preload server did not start (see %s); stages start their own processes", log_dir / "preload.log")
        log.info("services: %s", env)
        yield env
    except BaseException:
        interrupted = True
        raise
    finally:
        if preload_proc is not None:  # first the stage processes it forked, while the servers still record them
            stop_group(preload_proc, grace_s=2.0)
            shutil.rmtree(sock.parent, ignore_errors=True)
        for proc, _, _ in procs:
            stop_server(proc)
        _reapers.remove(reaper)
        reaper.close(interrupted)
