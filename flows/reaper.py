"""Stop what a retrain started when the retrain dies without stopping it (SIGKILL, the OOM killer).

``sad pipeline`` (:func:`flows.server.pipeline_services`) starts this process first, in its own
session, with a pipe on its stdin, and writes one line per process group it starts
(``pgid <n>``: the Prefect and MLflow servers, the preload runner, ``dvc repro`` with its stages;
``pid <n>`` for a single process, such as the temporary Prefect server of a ``sad stage`` run by hand),
``mlflow <backend-uri> <start-ms>`` for a local MLflow store, and ``done`` once it has stopped them
itself (``reap`` once it has stopped them after an interruption: then the clean-up below runs too, for
what a stopped stage could not finish). The end of the pipe without ``done`` means the retrain died: every group gets SIGTERM, then
SIGKILL after a grace period, and MLflow runs the dead retrain left RUNNING are marked KILLED.
Only the kernel closes the pipe of a killed process, so this works whatever killed it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def kill_groups(groups: list[int], grace_s: float = 5.0, pids: list[int] | None = None) -> None:
    """SIGTERM every process group (and single process in ``pids``), then SIGKILL those still alive
    after ``grace_s``."""
    targets = [(os.killpg, g) for g in groups] + [(os.kill, p) for p in pids or []]
    for send, ident in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(ident, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(send, ident) for send, ident in targets):
        time.sleep(0.1)
    for send, ident in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(ident, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still exists."""
    return _alive(os.killpg, pgid)


def _alive(send, ident: int) -> bool:
    """Whether the process (``os.kill``) or process group (``os.killpg``) ``ident`` still exists."""
    try:
        send(ident, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_killed_runs(backend_uri: str, since_ms: int, session: str | None = None) -> list[str]:
    """Mark the MLflow runs started since ``since_ms`` and still RUNNING as KILLED (only those tagged with
    ``session`` when given: another retrain's or stage's runs on the same store are not ours); returns their ids."""
    if not _may_have_running_runs(backend_uri, since_ms):
        return []
    from mlflow.tracking import MlflowClient

    from sad.tracking import SESSION_TAG

    client = MlflowClient(tracking_uri=backend_uri)
    marked = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = "attributes.status = 'RUNNING'" + (f" and tags.`{SESSION_TAG}` = '{session}'" if session else "")
    for run in client.search_runs(experiments, query, max_results=1000):
        if run.info.start_time >= since_ms:
            client.set_terminated(run.info.run_id, "KILLED")
            marked.append(run.info.run_id)
    return marked


def _may_have_running_runs(backend_uri: str, since_ms: int) -> bool:
    """False only when a SQLite store surely holds no such run (then MLflow, seconds to import, is not needed)."""
    import sqlite3

    if not backend_uri.startswith("sqlite:///"):
        return True
    try:
        with contextlib.closing(sqlite3.connect(f"file:{backend_uri[len('sqlite:///'):]}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING' AND start_time >= ?", (since_ms,)).fetchone()
    except sqlite3.Error:
        return True
    return bool(row and row[0])


def main() -> None:
    groups: list[int] = []
    pids: list[int] = []
    store: tuple[str, int, str | None] | None = None
    kind = ""
    for line in sys.stdin:
        kind, _, value = line.strip().partition(" ")
        if kind == "pgid":
            groups.append(int(value))
        elif kind == "pid":
            pids.append(int(value))
        elif kind == "mlflow":  # "<since_ms> <session or -> <uri>" (the URI last: it may hold spaces)
            since, session, uri = value.split(" ", 2)
            store = (uri, int(since), None if session == "-" else session)
        elif kind == "done":
            return
        elif kind == "reap":  # the retrain was interrupted and stopped what it could: check the rest
            break
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if our group is signalled too
    why = "was interrupted" if kind == "reap" else "died"
    print(f"reaper: the retrain {why}; stopping process groups {groups} and processes {pids}", flush=True)
    kill_groups(groups, pids=pids)
    if store is not None:
        try:
            marked = mark_killed_runs(*store)
        except Exception as exc:  # the clean-up of processes matters more; say why the runs stay RUNNING
            print(f"reaper: could not mark MLflow runs KILLED: {exc}", flush=True)
        else:
            print(f"reaper: marked MLflow runs KILLED: {marked}", flush=True)


if __name__ == "__main__":
    main()
