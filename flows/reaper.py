"""Stop what a retrain started when the retrain dies without stopping it (SIGKILL, the OOM killer).

``sad pipeline`` (:func:`flows.server.pipeline_services`) starts this process first, in its own
session, with a pipe on its stdin, and writes one line per process group it starts
(``pgid <n>``: the Prefect and MLflow servers, the preload runner, ``dvc repro`` with its stages),
``mlflow <backend-uri> <start-ms>`` for a local MLflow store, and ``done`` once it has stopped them
itself. The end of the pipe without ``done`` means the retrain died: every group gets SIGTERM, then
SIGKILL after a grace period, and MLflow runs the dead retrain left RUNNING are marked KILLED.
Only the kernel closes the pipe of a killed process, so this works whatever killed it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_groups(groups: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM every process group, then SIGKILL those still alive after ``grace_s``."""
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(group_alive(g) for g in groups):
        time.sleep(0.1)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def mark_killed_runs(backend_uri: str, since_ms: int) -> list[str]:
    """Mark the MLflow runs started since ``since_ms`` and still RUNNING as KILLED; returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=backend_uri)
    marked = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000):
        if run.info.start_time >= since_ms:
            client.set_terminated(run.info.run_id, "KILLED")
            marked.append(run.info.run_id)
    return marked


def main() -> None:
    groups: list[int] = []
    store: tuple[str, int] | None = None
    for line in sys.stdin:
        kind, _, value = line.strip().partition(" ")
        if kind == "pgid":
            groups.append(int(value))
        elif kind == "mlflow":
            uri, since = value.rsplit(" ", 1)
            store = (uri, int(since))
        elif kind == "done":
            return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if our group is signalled too
    print(f"reaper: the retrain died; stopping process groups {groups}", flush=True)
    kill_groups(groups)
    if store is not None:
        try:
            marked = mark_killed_runs(*store)
        except Exception as exc:  # the clean-up of processes matters more; say why the runs stay RUNNING
            print(f"reaper: could not mark MLflow runs KILLED: {exc}", flush=True)
        else:
            print(f"reaper: marked MLflow runs KILLED: {marked}", flush=True)


if __name__ == "__main__":
    main()
