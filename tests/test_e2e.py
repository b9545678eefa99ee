"""The whole pipeline on the tiny profile, from a copy of the repository, through `sad pipeline`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from .conftest import REPO

pytestmark = pytest.mark.e2e

SOURCES = ["sad", "flows", "tasks", "profiles", "assets", "dvc.yaml", "params.yaml", ".dvcignore", "pyproject.toml", ".gitignore"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    repo.mkdir()
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy2(REPO / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    bindir = str(Path(sys.executable).parent)
    # the virtualenv is kept off PATH: `sad pipeline` must find its own `sad` for dvc.yaml's commands
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(bindir))
    env = {**os.environ, "PATH": path, "PREFECT_HOME": str(repo / ".prefect"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for var in ("PREFECT_API_URL", "SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "e2e"]):
        assert _run(cmd, repo, env).returncode == 0
    profile = _run([f"{bindir}/sad", "profile", "tiny"], repo, env)
    assert profile.returncode == 0, profile.stderr
    # the retrain is stopped twice mid-stage before the run the tests share, which must resume from there;
    # these two runs start (and stop) their own Prefect and MLflow servers
    stops = {"SIGTERM": _stop_mid_stage(repo, env, signal.SIGTERM)}
    # A stop that lands while DVC rewrites dvc.lock (a stage just finished) leaves it empty, as once in CI: the
    # next run must still resume (flows.retrain.keep_or_restore_dvc_lock_file)
    (repo / "dvc.lock").write_text("")
    stops["SIGKILL"] = _stop_mid_stage(repo, env, signal.SIGKILL)
    # The runs after them use servers started once for the module (configured PREFECT_API_URL and
    # SAD_MLFLOW_URI are used as they are), as a team with its own servers would: each `sad pipeline`
    # then skips ~20 s of server start-up on 2 cores.
    from flows.server import pipeline_services

    # (on the Prefect home the stopped runs' servers migrated: one database migration, not two)
    with mock.patch.dict(os.environ, {"PREFECT_HOME": env["PREFECT_HOME"]}), \
            pipeline_services(repo.parent / "services", f"sqlite:///{repo}/mlflow.db", repo / "mlartifacts", preload=False) as services:
        env = {**env, **services}
        started = time.perf_counter()
        result = _run([f"{bindir}/sad", "pipeline"], repo, env, timeout=1200)
        seconds = time.perf_counter() - started
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        print(f"\ntiny pipeline: {seconds:.1f}s; stopped runs: {stops}")
        yield repo, env, seconds


def _running_mlflow_runs(repo: Path) -> list[str]:
    import sqlite3

    if not (repo / "mlflow.db").is_file():  # (never create the store the server makes)
        return []
    with contextlib.closing(sqlite3.connect(repo / "mlflow.db")) as db:
        return [row[0] for row in db.execute("SELECT name FROM runs WHERE status = 'RUNNING'")]


def _listening_addresses(processes) -> set[tuple[str, int]]:
    """The (address, TCP port) pairs these processes listen on; a short-lived child (git, a dvc helper) that
    ended since the tree was listed is skipped."""
    import psutil

    found: set[tuple[str, int]] = set()
    for p in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return found


def _check_services_listen_on_localhost_only(log_text: str, listening: set[tuple[str, int]]) -> None:
    """``sad pipeline``'s own services: the Prefect and MLflow servers listen on 127.0.0.1 only (as does
    everything else the run started), the preload runner's Unix socket lies in a private 0700 folder."""
    import ast

    services = ast.literal_eval(re.search(r"services: (\{.*\})", log_text).group(1))
    ports = {int(services[k].rsplit(":", 1)[1].split("/")[0]) for k in ("PREFECT_API_URL", "SAD_MLFLOW_URI")}
    assert ports <= {port for _, port in listening}, (ports, listening)
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening
    assert oct(Path(services["SAD_PRELOAD_SOCKET"]).parent.stat().st_mode & 0o777) == "0o700"


def _at_work(proc, repo: Path, stage: str, timeout: float = 60,
             with_root: bool = True) -> tuple[bool, list, set[tuple[str, int]]]:
    """Poll until ``stage`` is at work: the run's tree (``proc`` and what it started; without ``proc`` itself
    when not ``with_root``) holds its servers, the preload runner and the stage (>= 6 processes), something
    listens, and the stage's MLflow run is RUNNING (a busy machine only delays this, where a fixed sleep
    would look too early). Returns (whether it got there, processes, listening addresses as last seen)."""
    import sqlite3

    import psutil

    deadline = time.monotonic() + timeout
    while True:
        tree = [psutil.Process(proc.pid)] if with_root else []
        tree += psutil.Process(proc.pid).children(recursive=True)
        listening = _listening_addresses(tree)
        try:
            running = _running_mlflow_runs(repo)
        except sqlite3.Error:  # the server is writing: not yet
            running = []
        if len(tree) >= 6 and listening and stage in running:
            return True, tree, listening
        if proc.poll() is not None or time.monotonic() > deadline:
            return False, tree, listening
        time.sleep(0.5)


def _stop_mid_stage(repo: Path, env: dict[str, str], sig: signal.Signals, stage: str = "demos") -> dict:
    """Start `sad pipeline`, send ``sig`` while ``stage`` runs; within 15 s no process of the run's tree may
    be alive, none of its ports listening, and no MLflow run of it RUNNING. While it runs, its servers
    listen on localhost only."""
    import psutil

    log_file = repo / f"stopped-{sig.name}.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen([f"{Path(sys.executable).parent}/sad", "pipeline"], cwd=repo, env={**env, "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while f"Running stage '{stage}'" not in log_file.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
        time.sleep(0.5)
    at_work, tree, listening = _at_work(proc, repo, stage)
    ports = {port for _, port in listening}
    try:
        assert at_work, (len(tree), ports, log_file.read_text()[-3000:])
        assert len(tree) >= 6 and ports  # servers, preload runner and its stage child, reaper, dvc, the stage client
        _check_services_listen_on_localhost_only(log_file.read_text(), listening)
    except BaseException:  # leave nothing running behind a failed check
        for p in reversed(tree):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        raise
    stopped = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=15)  # (before psutil, which would reap it and hide its exit code)
    _, alive = psutil.wait_procs(tree[1:], timeout=max(0.1, 15 - (time.monotonic() - stopped)))
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    seconds = time.monotonic() - stopped
    listening = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert not ports & listening
    assert code == (-sig if sig == signal.SIGKILL else 128 + sig), code
    if sig != signal.SIGKILL:
        assert "stopped by SIGTERM" in log_file.read_text() and "Run `sad pipeline` again" in log_file.read_text()
    assert _running_mlflow_runs(repo) == []  # the stage's run ended FAILED (SIGTERM) or was marked KILLED
    return {"processes": len(tree), "ports": len(ports), "seconds_to_none_alive": round(seconds, 1)}


def test_report_has_teacher_and_three_students(pipeline_run):
    repo, _, _ = pipeline_run
    report = (repo / "reports" / "results.md").read_text()
    for agent, seeds in (("teacher", 1), ("sad", 2), ("token_kd", 2), ("sft", 2)):
        assert f"| {agent} | {seeds} |" in report  # success table: agent, number of seeds
    for column in ("alfworld success %", "hotpotqa success %", "webshop success %", "hotpotqa F1", "webshop score"):
        assert column in report  # a column per environment
    assert re.search(r"\| sad \| 2 \| \d+\.\d \[\d+\.\d, \d+\.\d\]", report)  # success with its CI
    assert "## `sad` against `token_kd` (paired" in report and "P(sad not better)" in report
    assert re.search(r"\*\*(sad beats token_kd|sad is worse|No significant difference|No difference between sad)", report)
    assert "CoT match" in report and "| xs |" in report and "| m |" in report and "| main |" in report
    for plot in ("success.png", "scaling.png", "reasoning.png", "learning_curves.png"):
        assert (repo / "reports" / plot).stat().st_size > 1000
    assert (repo / "dvc.lock").is_file()


def test_dvc_plots_and_metrics_show_the_results(pipeline_run):
    repo, env, _ = pipeline_run
    dvc = str(Path(sys.executable).parent / "dvc")
    shown = _run([dvc, "metrics", "show", "--json"], repo, env)
    assert shown.returncode == 0, shown.stderr
    assert "sad_vs_token_kd" in shown.stdout and "success_rate" in shown.stdout
    plots = _run([dvc, "plots", "show", "--json"], repo, env)
    assert plots.returncode == 0, plots.stderr
    for name in ("metrics/curves/sad.csv", "reports/success.png", "reports/scaling.png"):
        assert name in plots.stdout


def test_metrics_exist_and_lie_in_range(pipeline_run):
    from sad.modeling import cpu_bf16_is_fast, cpu_has_native_bf16

    repo, _, _ = pipeline_run
    # distill.teacher_logits.precision auto: the teacher's forward for the cache in bf16 where bf16 matmuls are faster
    cache_dtype = "bfloat16" if cpu_bf16_is_fast() else "float32"
    assert json.loads((repo / "metrics" / "teacher_logits.json").read_text())["dtype"] == cache_dtype
    native_dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    for agent in ("teacher", "sad", "token_kd", "sft"):
        result = json.loads((repo / "metrics" / "eval" / f"{agent}.json").read_text())
        assert result["parameters"] > 0
        # agent.precision auto: agents play in bf16 where the CPU has bf16 instructions
        assert result["dtype"] == native_dtype
        assert len(result["seeds"]) == (1 if agent == "teacher" else 2)
        if agent != "teacher":
            assert 0.0 <= result["agreement"]["cot_match_rate"] <= 1.0
            assert 0.0 <= result["agreement"]["action_agreement"] <= 1.0
            assert (repo / "data" / "eval" / agent / "seed1" / "agreement.jsonl").is_file()
        for split in ("dev", "test"):
            m = result["splits"][split]["overall"]
            assert 0.0 <= m["success_rate"] <= 1.0
            assert 1.0 <= m["avg_steps"] <= 10.0  # tiny caps: alfworld 10, webshop 8, hotpotqa 7 steps
            assert 0.0 <= m["invalid_action_rate"] <= 1.0
            assert m["avg_reasoning_tokens"] >= 0.0 and m["latency_per_step_s"] > 0.0
            # each step's context extends the one before: the prefix store keeps most of it from being encoded again
            assert m["prefill_tokens_cut"] > 1 and m["prefill_tokens_per_generated_token"] > 0
    from flows.bench import evaluation_prefill_cut
    from sad.config import load_params

    read = evaluation_prefill_cut(load_params(repo / "params.yaml"), repo)  # what `sad bench` reports of it
    test_overall = json.loads((repo / "metrics" / "eval" / "teacher.json").read_text())["splits"]["test"]["overall"]
    assert read["prefill_tokens_cut"] == test_overall["prefill_tokens_cut"] > 1
    rollout = json.loads((repo / "metrics" / "rollout.json").read_text())
    assert rollout["prefill_tokens_cut"] > 1 and rollout["prefill_tokens_per_generated_token"] > 0
    teacher = json.loads((repo / "metrics" / "teacher.json").read_text())
    student = json.loads((repo / "metrics" / "distill" / "sad.json").read_text())
    assert teacher["parameters"] > student["parameters"] > 0
    demos = json.loads((repo / "metrics" / "demos.json").read_text())
    # tiny caps: alfworld 10, webshop 8, hotpotqa 7 steps, which cuts the longer task types short; the
    # expert's 100% at ALFWorld's 50-step cap is asserted in tests/test_alfworld.py
    assert 0.0 < demos["expert_success_rate"] <= 1.0 and demos["episodes"] == 24
    by_type = demos["success_by_task_type"]  # which ALFWorld types fit in 10 steps depends on the drawn games
    assert all(0.0 <= v <= 1.0 for v in by_type.values()) and max(by_type.values()) == 1.0


def test_segments_validate_against_the_schemas(pipeline_run):
    import pandas as pd

    from sad.schemas import SpanSchema, StepSchema, validate
    from sad.segment import load_windows

    repo, _, _ = pipeline_run
    windows = load_windows(repo / "data" / "segments")
    assert len(windows) > 0
    validate(pd.read_parquet(repo / "data" / "segments" / "spans.parquet"), SpanSchema, "spans")
    validate(pd.read_parquet(repo / "data" / "segments" / "steps.parquet"), StepSchema, "steps")


def test_champion_loads_with_mlflow_and_generates(pipeline_run):
    import mlflow

    repo, _, _ = pipeline_run
    registry = json.loads((repo / "reports" / "registry.json").read_text())
    assert registry["promoted"] is True and registry["version"] == "1"
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    pipe = mlflow.transformers.load_model("models:/sad-student@champion")
    prompt = "[alfworld] You are in the middle of a room."
    text = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt), text  # the prompt, then what the champion wrote


def test_second_repro_is_a_no_op(pipeline_run):
    repo, env, _ = pipeline_run
    result = _run([str(Path(sys.executable).parent / "dvc"), "repro"], repo, env)
    assert result.returncode == 0, result.stderr
    assert "Running stage" not in result.stdout
    assert "Data and pipelines are up to date" in result.stdout or "didn't change" in result.stdout


# ---------------------------------------------------------------- model lifecycle (run in file order)
def _sad(args: list[str], repo: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return _run([str(Path(sys.executable).parent / "sad"), *args], repo, env, timeout=timeout)


def _versions(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    """What `sad registry list --json` lists for ``repo``'s registry with ``env``'s store, read in this process
    (no CLI start-up per look; the CLI itself is tested in tests/test_cli.py)."""
    import mlflow

    from sad.config import load_params
    from sad.registry import list_versions

    before = mlflow.get_tracking_uri()
    try:
        with mock.patch.dict(os.environ, {k: env[k] for k in ("SAD_MLFLOW_URI",) if k in env}):
            rows = list_versions(load_params(repo / "params.yaml").tracking)
    finally:
        mlflow.set_tracking_uri(before)
    return {row["version"]: row for row in json.loads(json.dumps(rows))}


def test_a_worse_retrain_is_registered_but_not_promoted(pipeline_run):
    repo, env, _ = pipeline_run
    # a DVC experiment over a distillation parameter: a learning rate that leaves students untrained
    result = _sad(["pipeline", "--set", "distill.train.lr=0.0000001"], repo, env, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    decision = json.loads((repo / "reports" / "registry.json").read_text())
    assert decision["version"] == "2" and decision["promoted"] is False
    assert decision["champion_before"] == decision["champion_after"] == "1"
    assert any("does not beat" in r for r in decision["reasons"])  # higher dev CE than the champion's
    versions = _versions(repo, env)
    assert versions["1"]["aliases"] == ["champion"] and versions["2"]["aliases"] == ["challenger"]
    assert "kept champion" in versions["2"]["decision"]
    exps = _run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--json"], repo, env, timeout=120)
    assert exps.returncode == 0 and "1e-07" in exps.stdout.replace("0.0000001", "1e-07")


def test_rollback_restores_the_previous_champion(pipeline_run):
    repo, env, _ = pipeline_run
    promoted = _sad(["registry", "promote", "2", "--reason", "e2e: by hand"], repo, env, timeout=120)
    assert promoted.returncode == 0, promoted.stderr
    assert "champion" in _versions(repo, env)["2"]["aliases"]
    rolled = _sad(["registry", "rollback"], repo, env, timeout=120)
    assert rolled.returncode == 0 and "from v2 to v1" in rolled.stdout, rolled.stderr
    assert "champion" in _versions(repo, env)["1"]["aliases"]


def test_a_second_retrain_at_once_is_refused(pipeline_run):
    from filelock import FileLock

    repo, env, _ = pipeline_run
    with FileLock(str(repo / ".retrain.lock")):  # a retrain in flight holds this lock
        result = _sad(["pipeline"], repo, env, timeout=300)
    assert result.returncode == 2 and "another retrain is running" in result.stderr, result.stderr[-2000:]
    assert "services:" not in result.stdout + result.stderr  # refused before any server was started
    assert "champion" in _versions(repo, env)["1"]["aliases"]


def _prefect_api(env: dict[str, str], path: str, missing_ok: bool = False, timeout_s: float = 120) -> dict | None:
    """GET ``path`` from the Prefect server's REST API at ``env['PREFECT_API_URL']`` (what `prefect ... inspect`
    shows, without a CLI start-up per poll), retried on a connection error or a 5xx of a loaded server for up
    to ``timeout_s``; None for a 404 when ``missing_ok``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(f"{env['PREFECT_API_URL'].rstrip('/')}/{path}", timeout=30)
            if missing_ok and response.status_code == 404:
                return None
            if response.status_code < 500:
                response.raise_for_status()
                return response.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the Prefect server did not answer GET {path}"
        time.sleep(1)


def _cancel_a_deployment_run(repo: Path, env: dict[str, str], served: subprocess.Popen, serve_log: Path) -> dict:
    """`prefect flow-run cancel` of a deployment run during a stage: within 15 s no process the run started
    is alive and none of its ports listens, the flow run ends Cancelled, no MLflow run of it stays RUNNING."""
    import psutil

    prefect = str(Path(sys.executable).parent / "prefect")
    started = _run([prefect, "deployment", "run", "retrain/scheduled", "--param", "force=true"], repo, env, timeout=60)
    flow_run = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)
    assert started.returncode == 0 and flow_run, started.stdout + started.stderr
    deadline = time.monotonic() + 300
    while "Running stage 'demos'" not in serve_log.read_text():  # the runner streams the flow run's output
        assert time.monotonic() < deadline and served.poll() is None, serve_log.read_text()[-3000:]
        time.sleep(0.5)
    # the flow run's process and all it started (the serving process itself is not stopped)
    at_work, tree, listening = _at_work(served, repo, "demos", with_root=False)
    ports = {port for _, port in listening}
    assert at_work, (len(tree), ports, serve_log.read_text()[-3000:])
    assert len(tree) >= 6 and ports, [p.cmdline() for p in tree]  # engine, servers, preload runner, reaper, dvc, stage
    stopped = time.monotonic()
    cancel = _run([prefect, "flow-run", "cancel", flow_run.group(1)], repo, env, timeout=60)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    seconds = time.monotonic() - stopped
    listening = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert not ports & listening
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the runner reports the final state just after the process is gone
        state = _prefect_api(env, f"flow_runs/{flow_run.group(1)}")["state"]
        if state["type"] == "CANCELLED":
            break
        time.sleep(0.5)
    assert state["type"] == "CANCELLED", state
    assert _running_mlflow_runs(repo) == []
    assert served.poll() is None  # the deployment keeps serving
    return {"processes": len(tree), "ports": len(ports), "seconds_to_none_alive": round(seconds, 1)}


def test_scheduled_deployment_runs_on_a_real_prefect_server(pipeline_run, tmp_path):
    """The retrain served as a cron deployment on the module's real Prefect server: a run cancelled
    mid-stage leaves nothing running and ends Cancelled; the next run completes. The flow runs start
    their own MLflow server (SAD_MLFLOW_URI unset), which the cancellation must stop too."""
    from flows.server import stop_server

    repo, env, _ = pipeline_run
    served = None
    try:
        env2 = {k: v for k, v in env.items() if k != "SAD_MLFLOW_URI"}
        # the runner looks for due runs every second (Prefect's default: 10 s), only to keep the test short
        served = subprocess.Popen([str(Path(sys.executable).parent / "sad"), "schedule", "--cron", "0 3 * * 0"],
                                  cwd=repo, env={**env2, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
                                  stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        prefect = str(Path(sys.executable).parent / "prefect")
        deadline = time.monotonic() + 120
        while True:  # the serve process registers the deployment
            shown = _prefect_api(env2, "deployments/name/retrain/scheduled", missing_ok=True)
            if shown is not None:
                break
            assert time.monotonic() < deadline and served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert [s["schedule"]["cron"] for s in shown["schedules"]] == ["0 3 * * 0"]  # the cron schedule is on it
        cancelled = _cancel_a_deployment_run(repo, env2, served, tmp_path / "serve.log")
        print(f"\ncancelled deployment run: {cancelled}")
        ran = _run([prefect, "deployment", "run", "retrain/scheduled", "--watch", "--watch-timeout", "400"], repo, env2,
                   timeout=450)
        assert ran.returncode == 0 and "Completed" in ran.stdout, ran.stdout[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
        decision = json.loads((repo / "reports" / "registry.json").read_text())
        assert decision["promoted"] is False and "unchanged" in decision["reason"]  # nothing new since v2
    finally:
        if served is not None:
            stop_server(served)
    assert served.poll() is not None  # everything the test started is gone


# ---------------------------------------------------------------- code deps: an edit reruns what runs it
def _stages_dvc_status_names(repo: Path, env: dict[str, str]) -> set[str]:
    status = _run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], repo, env, timeout=300)
    assert status.returncode == 0, status.stderr
    return {name.split(":")[-1] for name in json.loads(status.stdout or "{}")}


@pytest.mark.parametrize("edited, must_list, must_not_list", [
    ("sad/losses.py", ["distill@"], ["tasks", "demos", "rollout", "segment", "evaluate@"]),
    # distill@ plays too (on-policy rounds: the student acts with the agent loop in the environments)
    ("sad/agent.py", ["rollout", "evaluate_teacher", "evaluate@", "distill@"], ["tasks", "segment"]),
    ("sad/envs/webshop.py", ["tasks", "demos", "rollout", "distill@"], ["segment"]),
    ("README.md", [], []),
])
def test_editing_code_makes_dvc_rerun_the_stages_that_run_it(pipeline_run, edited, must_list, must_not_list):
    """dvc.yaml's code deps are computed from imports (sad dvc-deps): editing a module marks exactly the
    stages that import it (DVC reruns their downstream when their outputs change); the file is restored."""
    repo, env, _ = pipeline_run
    path = repo / edited
    before = path.read_bytes() if path.exists() else None
    try:
        path.write_text((before or b"").decode() + "\n# an edit\n")
        listed = _stages_dvc_status_names(repo, env)
    finally:
        path.write_bytes(before) if before is not None else path.unlink()
    if not must_list:
        assert listed == set(), listed
    for prefix in must_list:
        assert any(s == prefix or (prefix.endswith("@") and s.startswith(prefix)) for s in listed), (prefix, listed)
    for prefix in must_not_list:
        assert not any(s == prefix or (prefix.endswith("@") and s.startswith(prefix)) for s in listed), (prefix, listed)
    if edited == "sad/losses.py":
        distills = {s for s in listed if s.startswith("distill@")}
        assert len(distills) == len(yaml_methods(repo)), (distills, listed)
    assert _stages_dvc_status_names(repo, env) == set()


def yaml_methods(repo: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load((repo / "params.yaml").read_text())["distill"]["methods"])
