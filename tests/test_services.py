"""The pipeline's local services: the preload stage runner (and its fallback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.server import stop_server, wait_for_socket

from .conftest import REPO

SAD = str(Path(sys.executable).with_name("sad"))


@pytest.fixture(scope="module")
def preload_socket():
    folder = Path(tempfile.mkdtemp(prefix="sad-test-"))
    sock = folder / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "flows.preload", str(sock)], cwd=REPO, start_new_session=True)
    try:
        assert wait_for_socket(sock, proc, timeout_s=120), "preload server did not start"
        yield sock
    finally:
        stop_server(proc)
        shutil.rmtree(folder, ignore_errors=True)


def _sad(args: list[str], cwd: Path, sock: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SAD_PRELOAD_SOCKET"}
    if sock is not None:
        env["SAD_PRELOAD_SOCKET"] = str(sock)
    return subprocess.run([SAD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_preloaded_command_gives_the_same_output_and_exit_code(preload_socket, tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    direct = _sad(["profile", "tiny", "--dry-run"], tmp_path, None)
    forked = _sad(["profile", "tiny", "--dry-run"], tmp_path, preload_socket)
    assert direct.returncode == forked.returncode == 0
    assert forked.stdout == direct.stdout and "profile: tiny" in forked.stdout


@pytest.mark.slow
def test_the_preload_server_runs_the_command_not_the_fallback(preload_socket, tmp_path, monkeypatch, capfd):
    """delegate returns None (and sad runs as a plain process) when no server answers: here it must return the
    command's exit code, with the forked child's output on this process's own stdout and stderr."""
    import signal

    from flows.preload_client import delegate

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAD_PRELOAD_SOCKET", str(preload_socket))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert delegate(["profile", "tiny", "--dry-run"]) == 0
        assert "profile: tiny" in capfd.readouterr().out
        assert delegate(["profile", "does-not-exist"]) == 2
        assert "no profile 'does-not-exist' (profiles/does-not-exist.yaml not found)" in capfd.readouterr().err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_preloaded_command_reports_failure(preload_socket, tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = _sad(["profile", "does-not-exist"], tmp_path, preload_socket)
    assert result.returncode == 2
    assert "no profile 'does-not-exist' (profiles/does-not-exist.yaml not found)" in result.stderr


def test_unreachable_preload_socket_falls_back_to_a_plain_process(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    result = _sad(["profile", "tiny", "--dry-run"], tmp_path, tmp_path / "missing.sock")
    assert result.returncode == 0 and "profile: tiny" in result.stdout


CHILD_THAT_UNWINDS = r"""
import os, signal, sys, time
from pathlib import Path
done = Path(sys.argv[1])
def stopped(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as `sad stage` does
    raise SystemExit(143)
signal.signal(signal.SIGTERM, stopped)
(done.parent / "ready").write_text("")
try:
    time.sleep(60)
finally:  # ends its MLflow run, marks its flow run: it takes a moment
    time.sleep(0.5)
    done.write_text("unwound")
"""


def test_stopping_a_group_lets_its_stage_unwind_after_the_leader_died(tmp_path):
    """DVC (the group's leader) dies at once on SIGTERM; the stage it ran gets the same SIGTERM and needs a
    moment to end its runs: the group is killed only once it is empty or the grace is over."""
    import subprocess
    import sys
    import time

    from flows.reaper import group_alive
    from flows.server import stop_group

    (tmp_path / "child.py").write_text(CHILD_THAT_UNWINDS)
    leader = ("import subprocess, sys, time; subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]]); "
              "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", leader, str(tmp_path / "child.py"), str(tmp_path / "done")],
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    started = time.monotonic()
    stop_group(proc, grace_s=60)
    assert (tmp_path / "done").read_text() == "unwound"
    assert time.monotonic() - started < 30 and not group_alive(proc.pid)  # unwound on SIGTERM, not killed after the grace


def test_a_server_that_exits_at_start_is_named_with_its_log_and_last_line(tmp_path):
    import subprocess
    import sys

    import pytest

    from flows.server import wait_healthy

    log = tmp_path / "mlflow-server.log"
    log.write_text("starting\nERROR: the store was written by a newer MLflow (mlflow db upgrade)\n\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match=rf"exited early with code 3 \(see {log}; its last line: ERROR: the store was"):
        wait_healthy("http://127.0.0.1:9", proc=proc, log_file=log)


def test_the_reaper_marks_only_its_own_sessions_runs_killed(tmp_path, monkeypatch):
    """A retrain that dies leaves its stage's MLflow run RUNNING; the reaper marks it KILLED, not the run of
    another retrain or hand-run stage on the same store (each tags its runs with its session)."""
    import time

    from mlflow import MlflowClient

    from flows.reaper import mark_killed_runs
    from sad.config import TrackingParams
    from sad.tracking import SESSION_ENV, SESSION_TAG, stage_run

    for var in ("SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    tracking = TrackingParams(uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts=str(tmp_path / "art"), experiment="reap")
    since = int(time.time() * 1000) - 1000
    monkeypatch.setenv(SESSION_ENV, "ours")
    with stage_run(tracking, "stage") as run:
        pass
    client = MlflowClient(tracking.uri)
    assert client.get_run(run.info.run_id).data.tags[SESSION_TAG] == "ours"
    # two stages left RUNNING, as by a SIGKILL: one of this session, one of another retrain on the same store
    ours, theirs = (client.create_run(run.info.experiment_id, tags={SESSION_TAG: s}).info.run_id for s in ("ours", "theirs"))
    assert mark_killed_runs(tracking.uri, since, "ours") == [ours]
    assert client.get_run(ours).info.status == "KILLED" and client.get_run(theirs).info.status == "RUNNING"
    # the same through the reaper process, with a session id that looks like a number (a CI job id)
    from flows.server import Reaper

    mine = client.create_run(run.info.experiment_id, tags={SESSION_TAG: "4711"}).info.run_id
    reaper = Reaper(tmp_path / "reaper.log")
    reaper.watch_store(tracking.uri, since, "4711")
    reaper.close(interrupted=True)
    assert client.get_run(mine).info.status == "KILLED" and client.get_run(theirs).info.status == "RUNNING", \
        (tmp_path / "reaper.log").read_text()


def test_every_retrain_gets_its_own_session_even_under_exported_services(tmp_path, monkeypatch):
    """Servers a team (or the e2e fixture) started once export their environment, the session included: each
    retrain inside it still gets a new session, or a later retrain would take an earlier one's decision for its own."""
    from flows.server import pipeline_services
    from sad.tracking import SESSION_ENV

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # configured: no server is started
    monkeypatch.setenv("SAD_MLFLOW_URI", "http://127.0.0.1:9")
    monkeypatch.setenv(SESSION_ENV, "exported-by-the-team")
    def services():
        return pipeline_services(tmp_path / "services", f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art", preload=False)

    sessions = []
    for _ in range(2):
        with services() as env:
            sessions.append(env[SESSION_ENV])
            monkeypatch.setenv(SESSION_ENV, env[SESSION_ENV])  # as `sad pipeline` exports them, then runs the flow
            with services() as inner:  # retrain_flow's own, in the same process: the same session (its runs are
                assert inner[SESSION_ENV] == env[SESSION_ENV]  # those the outer reaper, watching the store, marks)
    assert len(set(sessions)) == 2 and "exported-by-the-team" not in sessions
