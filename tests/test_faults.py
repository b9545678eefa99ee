"""Faults: SIGKILL during training, rollout, segmentation and writes; transient failures under
Prefect; a crash between registration and promotion; concurrent retrains. Real processes, real
signals, real stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, distill_raw

WORKER = Path(__file__).with_name("fault_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the worker printed READY (its inputs are loaded and the work starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "READY":
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} before READY:\n{proc.stderr.read()[-3000:]}")
    raise AssertionError("worker never became ready")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def run_worker(*args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def leftovers(folder: Path) -> list[str]:
    """Temp or half-renamed entries anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".old"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


# --------------------------------------------------------------------------- SIGKILL during distillation
@pytest.mark.slow
def test_sigkill_during_distillation_resumes_to_the_same_weights(tmp_path, demos, tokenizer):
    from safetensors.torch import load_file

    from sad.segment import segment_episodes

    segment_episodes(demos, tokenizer, 512).windows.reset_index(drop=True).to_parquet(tmp_path / "windows.parquet")
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))

    straight = start_worker("train", tmp_path, tmp_path / "ckpt-straight", tmp_path / "straight")
    killed = start_worker("train", tmp_path, tmp_path / "ckpt", tmp_path / "resumed", 0.4)
    wait_ready(killed)
    state = tmp_path / "ckpt" / "trainer_state.pt"
    deadline = time.monotonic() + 120
    while not state.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.is_file(), "no checkpoint was written"
    kill(killed)
    assert not (tmp_path / "resumed").exists()  # a killed run leaves no model behind
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]

    out = run_worker("train", tmp_path, tmp_path / "ckpt", tmp_path / "resumed")
    resumed_from = int(out.split("resumed_from=")[1].split()[0])
    assert resumed_from >= 2, out  # it went on from the checkpoint, not from scratch
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), "resumed weights differ"
    assert not (tmp_path / "ckpt").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- SIGKILL during an atomic write
def test_checkpoints_live_under_dot_checkpoints_for_relative_and_absolute_model_folders(tmp_path):
    """Never the model folder itself (an absolute project.models_dir once mapped onto it, so checkpoints and kept
    seeds would have landed in the DVC-tracked output)."""
    from sad.stages.layout import checkpoint_dir

    assert checkpoint_dir(Path("models/students/sad/seed0")) == Path(".checkpoints/models/students/sad/seed0")
    absolute = tmp_path / "models" / "students" / "sad"
    assert checkpoint_dir(absolute) == Path(".checkpoints", *absolute.parts[1:])
    assert not checkpoint_dir(absolute).is_absolute()


def test_sigkill_mid_write_leaves_the_old_file_and_the_next_write_sweeps_the_leftover(tmp_path):
    from sad.io import read_jsonl, write_jsonl_atomic

    path = tmp_path / "rollouts" / "rollouts.jsonl"
    write_jsonl_atomic(path, [{"old": True}])
    proc = start_worker("write", path, 1000)
    wait_ready(proc)
    assert len(leftovers(tmp_path)) == 1  # the writer's temp file, half written
    kill(proc)
    assert read_jsonl(path) == [{"old": True}]  # the old version is whole
    write_jsonl_atomic(path, [{"new": True}])
    assert read_jsonl(path) == [{"new": True}]
    assert leftovers(tmp_path) == []  # the dead writer's temp file is gone


def test_a_folder_interrupted_between_its_two_renames_is_restored(tmp_path):
    from sad.io import atomic_dir

    target = tmp_path / "segments"
    with atomic_dir(target) as tmp:
        (tmp / "windows.parquet").write_text("v1")
    os.replace(target, tmp_path / ".segments.old")  # what a kill between the renames leaves
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            raise RuntimeError("the next writer fails too")
    assert (target / "windows.parquet").read_text() == "v1" and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- SIGKILL during rollout / segmentation
@pytest.mark.slow
@pytest.mark.parametrize("stage, output", [("rollout", "data/rollouts"), ("segment", "data/segments")])
def test_sigkill_during_a_stage_leaves_no_partial_output_and_a_rerun_completes(rollout_project, stage, output, tmp_path,
                                                                              demos):
    import shutil

    from sad.io import read_jsonl, write_jsonl_atomic

    rollout_project = Path(shutil.copytree(rollout_project, tmp_path / "project"))

    out = rollout_project / output
    if stage == "segment":  # the expert's episodes stand in for the teacher's rollouts (segment's input)
        write_jsonl_atomic(rollout_project / "data/rollouts/rollouts.jsonl", (e.to_dict() for e in demos))
    before = snapshot(out)
    proc = start_worker("stage", rollout_project, stage)
    wait_ready(proc)
    time.sleep(0.5)
    still_running = proc.poll() is None
    kill(proc) if still_running else proc.wait()
    assert still_running, f"the {stage} stage finished before it could be killed"
    assert snapshot(out) == before and leftovers(rollout_project / "data") == []

    run_worker("stage", rollout_project, stage)
    assert leftovers(rollout_project / "data") == []
    if stage == "rollout":
        episodes = read_jsonl(out / "rollouts.jsonl")
        assert len(episodes) == 12 and all(e["steps"] for e in episodes)
    else:
        import pandas as pd

        assert len(pd.read_parquet(out / "windows.parquet")) > 0
    assert json.loads((rollout_project / "metrics" / f"{stage}.json").read_text())


# --------------------------------------------------------------------------- a multi-seed stage stopped half-way
@pytest.mark.slow
def test_a_distill_stage_killed_after_its_first_seed_resumes_at_the_second(distill_project):
    """Each finished seed is kept (under .checkpoints) until the stage's output is written: a rerun copies it
    instead of training it again, and trains only the seeds that were not finished."""
    raw = distill_raw(None, 0)
    raw["distill"]["seeds"] = [0, 1]
    raw["distill"]["train"]["epochs"] = 12  # long enough a seed for the kill to land inside the second one
    (distill_project / "params.yaml").write_text(yaml.safe_dump(raw))
    kept = distill_project / ".checkpoints" / "models" / "students" / "sft" / "finished-seeds"
    proc = start_worker("stage", distill_project, "distill", "method=sft")
    wait_ready(proc)
    deadline = time.monotonic() + 180
    while not (kept / "seed0" / "record.json").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, f"the stage ended before its second seed could be killed:\n{proc.stderr.read()[-3000:]}"
    kill(proc)
    assert not (distill_project / "models" / "students" / "sft").exists()  # no half-written output
    record = json.loads((kept / "seed0" / "record.json").read_text())["record"]
    assert not (kept / "seed1").exists()

    run_worker("stage", distill_project, "distill", "method=sft")
    seeds = json.loads((distill_project / "metrics" / "distill" / "sft.json").read_text())["seeds"]
    assert seeds["0"] == record["metrics"]  # kept as it was (its own training time), not trained again
    assert seeds["1"]["steps"] == seeds["0"]["steps"]  # the second seed trained in full after the kill
    students = distill_project / "models" / "students" / "sft"
    assert (students / "seed0" / "model.safetensors").is_file() and (students / "seed1" / "model.safetensors").is_file()
    assert not kept.exists() and leftovers(distill_project) == []


@pytest.mark.slow
def test_an_evaluation_that_failed_in_its_second_seed_keeps_the_first(distill_project, caplog):
    """A student evaluation that stops after seed 0 (here its seed 1 player fails) plays only seed 1 again."""
    import logging

    from sad.config import parse_params
    from sad.stages import run_distill, run_evaluate, student_dir

    raw = distill_raw(None, 0)
    raw["distill"]["seeds"] = [0, 1]
    p = parse_params(raw)
    run_distill(p, "sft", progress=False)

    def failing_for_seed1(model_dir: Path):
        if model_dir == student_dir(p, "sft", 1):
            raise ConnectionError("the worker playing seed 1 went away")
        return None  # seed 0 plays here

    with pytest.raises(ConnectionError):
        run_evaluate(p, "sft", progress=False, players=failing_for_seed1)
    assert not Path("data/eval/sft").exists() and not Path("metrics/eval/sft.json").exists()
    first = snapshot(Path(".checkpoints/data/eval/sft/finished-seeds/seed0/files"))
    assert "test.jsonl" in first

    with caplog.at_level(logging.INFO, logger="sad.stages.evaluate"):
        result = run_evaluate(p, "sft", progress=False)
    assert "sft seed 0: evaluated before the stage was stopped" in caplog.text
    assert "sft seed 1: evaluated before" not in caplog.text
    assert snapshot(Path("data/eval/sft/seed0")) == first and (Path("data/eval/sft/seed1") / "test.jsonl").is_file()
    assert set(result["seeds"]) == {"0", "1"} and result["dtype"] and not Path(".checkpoints/data/eval/sft").exists()

    raw["agent"] = {"stop_after_failures": 3}  # other settings: a kept seed is never reused
    with pytest.raises(ConnectionError):
        run_evaluate(parse_params(raw), "sft", progress=False, players=failing_for_seed1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sad.stages.evaluate"):
        run_evaluate(p, "sft", progress=False)
    assert "evaluated before the stage was stopped" not in caplog.text


# --------------------------------------------------------------------------- transient failures under Prefect
@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    settings = {"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)  # a fresh database: its first start migrates it (slow on 2 cores)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.slow
def test_a_transient_failure_is_retried_by_prefect_and_bad_input_is_not(tmp_path, prefect_home):
    """A real 'database is locked' (another connection holds the write lock for a moment) passes on
    Prefect's retry; a ValueError (bad input) fails at once, without retries."""
    import sqlite3

    from prefect import flow, task

    from tasks.stages import RETRY

    db = tmp_path / "store.db"
    sqlite3.connect(db).execute("create table runs (n int)").connection.commit()
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("begin exclusive")
    locked_out = threading.Event()
    releaser = threading.Thread(target=lambda: locked_out.wait(300) and holder.execute("commit"))
    releaser.start()  # the other writer finishes once our first attempt has hit its lock
    attempts = {"store": 0, "bad": 0}

    @task(**{**RETRY, "retry_delay_seconds": 1})
    def store_result() -> int:
        attempts["store"] += 1
        try:
            with sqlite3.connect(db, timeout=0.1) as conn:
                conn.execute("insert into runs values (1)")
        except sqlite3.OperationalError:
            locked_out.set()
            raise
        return attempts["store"]

    @task(**{**RETRY, "retry_delay_seconds": 0})
    def parse_bad_input() -> None:
        attempts["bad"] += 1
        raise ValueError("rollouts.jsonl:3: not valid JSON")

    @flow
    def retrying_flow() -> int:
        return store_result()

    @flow
    def failing_flow() -> None:
        parse_bad_input()

    assert retrying_flow() == 2  # failed once on the lock, passed on the retry
    releaser.join()
    assert sqlite3.connect(db).execute("select count(*) from runs").fetchone()[0] == 1
    with pytest.raises(ValueError, match="not valid JSON"):
        failing_flow()
    assert attempts["bad"] == 1


# --------------------------------------------------------------------------- registry: crash, concurrency
REGISTER_CHILD = r"""
import json, os, signal, sys
sys.path.insert(0, {repo!r})
os.chdir({project!r})
from sad.config import load_params
from flows import retrain
from sad import registry
mode = sys.argv[1]
p = load_params("params.yaml")
if mode == "crash":  # die (SIGKILL, no cleanup) right after the version is registered, before the gates
    registry.gate_and_promote = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
with retrain.single_flight(retrain.Path.cwd(), p.retrain.lock_timeout_s):
    print("LOCKED", flush=True)
    out = retrain.register_and_gate.fn(p, {{"seconds": 0.0, "stages_run": 0}})
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture
def registry_project(tmp_path, tokenizer, tiny_model_factory):
    """A project whose select stage has run: a candidate student, its standing, a SQLite registry."""
    from sad.modeling import save_model
    from sad.registry import weights_hash

    def candidate(seed: int, value: float) -> None:
        model_dir = tmp_path / "models" / "students" / "sad" / f"seed{seed}"
        save_model(tiny_model_factory(seed=seed), tokenizer, model_dir, {"method": "sad"})
        standing = {"gate_metric": "success_rate", "gate_value": value, "success_rate": value,
                    "env_success": {"alfworld": value}, "teacher_success_rate": 0.5}
        (tmp_path / "reports").mkdir(exist_ok=True)
        (tmp_path / "reports" / "candidate.json").write_text(json.dumps(
            {"method": "sad", "seed": seed, "model_dir": str(model_dir), "weights_sha256": weights_hash(model_dir),
             "standing": standing, "card": {"method": "sad", "seed": seed}}))

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifacts": str(tmp_path / "mlartifacts")},
         "retrain": {"lock_timeout_s": 120}}))
    (tmp_path / "child.py").write_text(REGISTER_CHILD.format(repo=str(REPO), project=str(tmp_path)))
    return tmp_path, candidate


def _child(project: Path, mode: str) -> subprocess.Popen:
    env = {k: v for k, v in ENV.items() if k not in ("SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI")}
    return subprocess.Popen([sys.executable, str(project / "child.py"), mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=project)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.split("RESULT ", 1)[1])


def _champion(project: Path) -> str | None:
    from sad.config import load_params
    from sad.registry import champion

    for var in ("SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI"):  # mlflow.set_tracking_uri() exports the last one used
        os.environ.pop(var, None)
    found = champion(load_params(project / "params.yaml").tracking)
    return found[0] if found else None


@pytest.mark.slow
def test_a_crash_between_registration_and_promotion_leaves_the_champion_and_concurrent_retrains_promote_once(
        registry_project, monkeypatch):
    from mlflow import MlflowClient

    from flows import retrain
    from sad.config import load_params

    project, candidate = registry_project
    candidate(0, 0.3)  # passes the floors (0.3 >= 0.5 x teacher 0.5)
    monkeypatch.chdir(project)  # the first retrain in this process: nothing runs beside it
    for var in ("SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    assert retrain.register_and_gate.fn(load_params("params.yaml"), {"seconds": 0.0, "stages_run": 0})["promoted"]
    assert _champion(project) == "1"

    candidate(1, 0.6)  # better: it would be promoted
    crashed = _child(project, "crash")
    crashed.communicate(timeout=300)
    assert crashed.returncode == -signal.SIGKILL
    assert _champion(project) == "1"  # registered as v2, but the champion never moved

    # two retrains at once: one gates the ungated v2 and promotes it; the other waits for the lock,
    # then finds v2 registered and gated ("unchanged")
    results = [_result(proc) for proc in [_child(project, "run"), _child(project, "run")]]
    assert sorted(r["promoted"] for r in results) == [False, True], results
    assert all(r["version"] == "2" for r in results)
    assert any("unchanged" in r["reason"] for r in results)
    versions = MlflowClient(f"sqlite:///{project}/mlflow.db").search_model_versions("name='sad-student'")
    assert len(versions) == 2 and _champion(project) == "2"


def test_a_store_error_during_registration_or_after_the_decision_is_retried_into_the_true_outcome(
        registry_project, monkeypatch):
    """register_and_gate is retried on a store error. Failing right after the version is created (before its
    card and @challenger), or after @champion moved (before the decision tag), or while the decision is logged
    to the run: what the retry (or the run) reports is what happened, and the version gets its card."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows import retrain
    from sad import registry as reg
    from sad.config import load_params

    project, candidate = registry_project
    monkeypatch.chdir(project)
    for var in ("SAD_MLFLOW_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    p = load_params("params.yaml")
    client = MlflowClient(p.tracking.uri)

    def fails(real, when):
        def call(*args, **kwargs):
            if when(*args, **kwargs):
                raise MlflowException("the store went away")
            return real(*args, **kwargs)
        return call

    def gate():
        return retrain.register_and_gate.fn(p, {"seconds": 0.0, "stages_run": 0})

    candidate(0, 0.3)  # the decision is taken, then logging it to the run fails: still reported as promoted
    with monkeypatch.context() as m:
        m.setattr(mlflow, "log_dict", fails(mlflow.log_dict, lambda d, name: name == "decision.json"))
        first = gate()
    assert first["promoted"] and first["version"] == "1" and _champion(project) == "1"

    candidate(1, 0.6)  # created with its tags, then the store fails before its card and @challenger
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "update_model_version", fails(MlflowClient.update_model_version, lambda *a, **k: True))
        with pytest.raises(MlflowException):
            gate()
    assert reg.find_version(p.tracking, json.loads((project / "reports" / "candidate.json").read_text())["weights_sha256"]) == "2"
    second = gate()  # the retry
    assert second["promoted"] and second["version"] == "2" and second["champion_before"] == "1"
    assert "method `sad`, seed 1" in client.get_model_version("sad-student", "2").description

    candidate(2, 0.9)  # @champion moved to v3, then the decision tag failed
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "set_model_version_tag",
                  fails(MlflowClient.set_model_version_tag, lambda self, name, version, key, value: key == reg.DECISION_TAG))
        with pytest.raises(MlflowException):
            gate()
    assert _champion(project) == "3"
    third = gate()
    assert third["promoted"] and third["version"] == "3" and third["champion_before"] == "2", third
    assert reg.decision_of(p.tracking, "3").startswith("promoted")
    assert "unchanged" in gate()["reason"]  # a later retrain with the same weights changes nothing

    from sad.tracking import SESSION_ENV

    candidate(3, 0.95)  # the retrain run fails to close after the decision: its retry (same session) reports it
    monkeypatch.setenv(SESSION_ENV, "retrain-a")
    with monkeypatch.context() as m:
        m.setattr(mlflow, "log_metrics", fails(mlflow.log_metrics, lambda metrics, *a, **k: "stage/seconds" in metrics))
        with pytest.raises(MlflowException):
            gate()
    assert json.loads((project / "reports" / "registry.json").read_text())["promoted"]  # written at the decision
    retried = gate()
    assert retried["promoted"] and retried["version"] == "4" and retried["champion_before"] == "3", retried
    monkeypatch.setenv(SESSION_ENV, "retrain-b")  # a later retrain
    assert "unchanged" in gate()["reason"]


def test_a_torn_dvc_lock_left_by_a_killed_run_is_cleared_before_dvc_runs(tmp_path):
    """SIGKILL while DVC writes .dvc/tmp/rwlock leaves it empty; DVC then refuses every repro (seen in CI)."""
    from flows.retrain import clear_torn_dvc_lock

    lock = tmp_path / ".dvc" / "tmp" / "rwlock"
    assert clear_torn_dvc_lock(tmp_path) is False  # none there
    lock.parent.mkdir(parents=True)
    lock.write_text('{"read": {}, "write": {}}')
    assert clear_torn_dvc_lock(tmp_path) is False and lock.exists()  # a valid lock is DVC's to manage
    for torn in ("", '{"read": {'):
        lock.write_text(torn)
        assert clear_torn_dvc_lock(tmp_path) is True and not lock.exists()


def test_a_torn_dvc_lock_file_left_by_a_stopped_run_is_restored_from_the_copy_before_its_repro(tmp_path):
    """SIGTERM just as a stage finished left dvc.lock empty (DVC rewrites it in place); the next repro then failed
    with "'./dvc.lock' validation failed" (seen in CI)."""
    from flows.retrain import LOCK_FILE_COPY, keep_or_restore_dvc_lock_file

    lock, copy = tmp_path / "dvc.lock", tmp_path / LOCK_FILE_COPY
    assert keep_or_restore_dvc_lock_file(tmp_path) == "none" and not copy.exists()
    good = "schema: '2.0'\nstages:\n  tasks:\n    cmd: sad stage tasks\n"
    lock.write_text(good)
    assert keep_or_restore_dvc_lock_file(tmp_path) == "kept" and copy.read_text() == good and lock.read_text() == good
    for torn in ("", "schema: '2.0'\nstages:\n  tasks:\n    cmd: [", "schema: '2.0'\nstages:\n  tasks:\n    outs:\n"):
        lock.write_text(torn)
        assert keep_or_restore_dvc_lock_file(tmp_path) == "restored" and lock.read_text() == good
    copy.unlink()
    lock.write_text("")
    assert keep_or_restore_dvc_lock_file(tmp_path) == "removed" and not lock.exists()


def test_bad_input_and_bugs_exit_2_and_3_and_are_never_retried_other_failures_are(tmp_path):
    """One classification for the CLI's exit status and the Prefect tasks' retries: bad input exits 2, a bug in
    the code (a plain KeyError, a TypeError) exits 3 with its traceback, neither is retried; a crash a rerun may
    pass (a full disk, a locked store, memory) exits 1 and is retried."""
    import sqlite3

    from sad.io import MissingEntryError, failure_exit_code
    from tasks.stages import is_transient

    cases = {ValueError("bad row"): 2, FileNotFoundError("no file"): 2, MissingEntryError("no question"): 2,
             TypeError("bad call"): 3, KeyError("key"): 3, AttributeError("attr"): 3, IndexError("index"): 3,
             OSError(28, "No space left on device"): 1, sqlite3.OperationalError("database is locked"): 1,
             RuntimeError("DefaultCPUAllocator: can't allocate memory"): 1, ConnectionError("dropped"): 1,
             ModuleNotFoundError("No module named 'alfworld'"): 1}
    assert {type(exc).__name__: failure_exit_code(exc) for exc in cases} == \
        {type(exc).__name__: code for exc, code in cases.items()}
    assert {type(exc).__name__: is_transient(exc) for exc in cases} == \
        {type(exc).__name__: code == 1 for exc, code in cases.items()}
    script = ("from flows.cli import _report_bug\n"
              "try:\n    {}['model'].shape\nexcept KeyError as exc:\n    _report_bug(exc, 'stage distill')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SAD_DEBUG", "PREFECT_API_URL")}
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" in result.stderr and "KeyError: 'model'" in result.stderr
    assert "stage distill stopped on an error in the code (KeyError), not in its input" in result.stderr


def test_dvc_failures_are_retried_only_when_they_may_pass_and_a_bad_remote_fails_before_the_repro(tmp_path):
    """A stage that crashed (exit 1) or was killed is worth a retry; a stage's bad input (exit 2), a bug (exit 3)
    and DVC's own errors (a dependency that does not exist) fail the same way again. `retrain.dvc_remote` naming no remote of
    the repo is refused before any stage runs."""
    from flows.retrain import StageFailed, check_dvc_remote, dvc_command, reproduce

    env = {**ENV, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    assert subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env).returncode == 0
    stages = {"crash": "exit 1", "bad": "exit 2", "bug": "exit 3", "killed": "kill -9 $$"}
    dvc_yaml = {"stages": {name: {"cmd": f"sh -c '{cmd}'"} for name, cmd in stages.items()}}
    dvc_yaml["stages"]["missing"] = {"cmd": "true", "deps": ["no/such/file"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        failures = {}
        for name in [*stages, "missing"]:
            with pytest.raises(StageFailed) as caught:
                reproduce.fn(dvc_command([], False, name), env)
            failures[name] = (caught.value.stage_exit, caught.value.transient)
            if name == "killed":
                assert "(a stage was killed by SIGKILL, see its message above)" in str(caught.value)
        # a shell between DVC and the stage reports the kill as 128 + 9, else Python reports -9 (both say SIGKILL)
        assert failures.pop("killed") in {(-9, True), (137, True)}, failures
        assert failures == {"crash": (1, True), "bad": (2, False), "bug": (3, False), "missing": (None, False)}, failures
        with pytest.raises(ValueError, match=r"retrain.dvc_remote: 'backup' is not a DVC remote of this repo \(remotes: none\)"):
            check_dvc_remote("backup", env)
        assert subprocess.run([dvc, "remote", "add", "backup", str(tmp_path / "store")], env=env).returncode == 0
        check_dvc_remote("backup", env)
    finally:
        os.chdir(cwd)
