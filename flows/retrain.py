"""The retrain flow: reproduce the pipeline with DVC, log the run to MLflow, register the candidate
student, and move ``@champion`` only if the gates pass.

``sad pipeline`` runs it once; ``sad schedule`` serves it as a cron-scheduled deployment. One
retrain at a time per project folder (a file lock, plus the deployment's concurrency limit of 1):
a second one waits ``retrain.lock_timeout_s`` and then refuses, so two runs can never both promote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal

from flows.server import RetrainStopped, single_flight, stop_on_signals
from sad.config import Params, load_params
from sad.io import write_json_atomic, write_text_atomic
from sad.tracking import flatten, git_commit, log_metrics, redact, stage_run
from tasks.stages import retry_if_transient

log = logging.getLogger("sad.retrain")

# DVC gets this long to stop after SIGTERM; then its group is killed (a stage that has not ended its
# MLflow run by then leaves it to the reaper, which marks it KILLED).
STAGE_GRACE_S = 5.0


class RetrainTerminated(RetrainStopped, TerminationSignal):
    """A stopped retrain as Prefect's flow engine understands it: the flow run ends Cancelled when its
    runner cancelled it (``prefect flow-run cancel``, the UI), Crashed when a plain SIGTERM/SIGINT stopped it."""

    def __init__(self, signum: int):
        RetrainStopped.__init__(self, signum)
        self.signal = signum


# DVC's own failures that pass on a retry: another DVC process held the repo's lock for a moment.
DVC_TRANSIENT = ("Unable to acquire lock", "Unable to read RWLock-file", "database is locked")


# A stage's exit statuses that fail the same way on a retry: bad input (2) and a bug in the code (3).
PERMANENT_STAGE_EXITS = (2, 3)


class StageFailed(RuntimeError):
    """``dvc repro`` stopped on a failing stage (whose own output already said why); ``stage_exit`` is the
    stage's exit status as DVC reports it (2: bad input; 3: a bug; negative: killed by that signal), if it reported
    one. ``transient``: worth a retry: a stage that crashed otherwise (1) or was killed, or DVC's lock busy; not
    bad input, a bug, nor DVC's own errors (a missing dependency, a broken dvc.yaml), which fail the same way."""

    def __init__(self, message: str, stage_exit: int | None = None, transient: bool | None = None):
        super().__init__(message)
        self.stage_exit = stage_exit
        self.transient = (stage_exit is not None and stage_exit not in PERMANENT_STAGE_EXITS) if transient is None else transient


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn`` of the DVC run: a stage that exited 2 (bad input) or 3 (a bug), or DVC's own
    error, fails the same way again, so it is not retried; a stage that crashed otherwise or was killed is."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except Exception:  # noqa: BLE001 - the task's own exception, re-raised by Prefect
        return True
    return True


def _dvc() -> str:
    path = Path(sys.executable).with_name("dvc")
    return str(path) if path.exists() else "dvc"


def dvc_command(set_params: list[str], force: bool, target: str | None) -> list[str]:
    """``dvc exp run -S k=v ...`` when parameters are set (an experiment), else ``dvc repro``."""
    if set_params:
        cmd = [_dvc(), "exp", "run"]
        for item in set_params:
            if "=" not in item and not item.split(":")[-1].startswith("~"):
                raise ValueError(f"--set {item!r}: expected KEY=VALUE (or ~KEY to delete one), e.g. distill.train.lr=0.001")
            cmd += ["-S", item]
    else:
        cmd = [_dvc(), "repro"]
    return cmd + (["--force"] if force else []) + ([target] if target else [])


def clear_torn_dvc_lock(repo: Path) -> bool:
    """Remove DVC's ``.dvc/tmp/rwlock`` when it is not valid JSON: a run killed (SIGKILL) while DVC wrote it
    leaves it empty or torn, and every later ``dvc repro`` then fails ("Unable to read RWLock-file"). Runs
    inside the retrain's single-flight lock, so no live DVC of this repo is writing it. True if removed."""
    lock = repo / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(lock.read_text())
        return False
    except FileNotFoundError:
        return False
    except ValueError:
        log.warning("%s: torn by a killed run (not JSON); removed so DVC can run again", lock)
        lock.unlink(missing_ok=True)
        return True


LOCK_FILE_COPY = Path(".dvc") / "tmp" / "dvc.lock.last-good"


def _valid_lock_file(path: Path) -> bool:
    """A ``dvc.lock`` DVC can read: YAML that passes DVC's own lock-file schema."""
    import yaml
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from voluptuous import Invalid

    try:
        COMPILED_LOCKFILE_SCHEMA(yaml.safe_load(path.read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, Invalid):
        return False
    return True


def keep_or_restore_dvc_lock_file(repo: Path) -> str:
    """DVC rewrites ``dvc.lock`` in place after every stage, so a run stopped (SIGTERM or SIGKILL) while it writes
    leaves the file empty or torn, and every later ``dvc repro`` fails ("'./dvc.lock' validation failed"; seen in
    CI: SIGTERM just as a stage finished). Before each repro a valid ``dvc.lock`` is copied to
    ``.dvc/tmp/dvc.lock.last-good``; a torn one is replaced by that copy (the stages that finished after it rerun,
    or come back from DVC's run cache) or, with no copy, removed (DVC then restores what its run cache holds).
    Runs inside the retrain's single-flight lock. Returns ``none``, ``kept``, ``restored`` or ``removed``."""
    lock, copy = repo / "dvc.lock", repo / LOCK_FILE_COPY
    if not lock.exists():
        return "none"
    if _valid_lock_file(lock):
        copy.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(copy, lock.read_text())
        return "kept"
    if copy.exists() and _valid_lock_file(copy):
        log.warning("%s: torn by a stopped run (%d bytes); restored the copy from before that run's repro (%s): "
                    "the stages that finished after it run again or come from DVC's run cache", lock, lock.stat().st_size, copy)
        write_text_atomic(lock, copy.read_text())
        return "restored"
    log.warning("%s: torn by a stopped run (%d bytes) and no earlier copy; removed, so DVC reruns what its run cache "
                "does not hold", lock, lock.stat().st_size)
    lock.unlink()
    return "removed"


@task(name="dvc-repro", cache_policy=NO_CACHE)
def reproduce(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run DVC (its cache decides what reruns); output streams to the console, the tail goes into errors."""
    from flows.server import stop_group, watch_group

    clear_torn_dvc_lock(Path.cwd())
    keep_or_restore_dvc_lock_file(Path.cwd())
    started = time.perf_counter()
    # its own process group (DVC and the stage it runs): a stopped retrain stops exactly that group
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    watch_group(proc.pid)
    tail: list[str] = []
    stages_run = 0
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail = (tail + [line])[-40:]
            stages_run += line.startswith("Running stage")
    except BaseException:
        log.warning("stopping %s (the running stage first)", " ".join(cmd[1:]))
        stop_group(proc, grace_s=STAGE_GRACE_S)
        raise
    code = proc.wait()
    if code != 0:
        text = "".join(tail)
        reported = re.findall(r"exited with (-?\d+)", text)
        stage_exit = int(reported[-1]) if reported else None
        why = f"a stage {exit_in_words(stage_exit)}, see its message above" if stage_exit is not None else f"exit code {code}"
        # a stage that crashed or was killed, DVC itself killed (a negative exit code), or DVC's lock busy
        transient = ((stage_exit is not None and stage_exit not in PERMANENT_STAGE_EXITS) or code < 0
                     or any(m in text for m in DVC_TRANSIENT))
        raise StageFailed(f"{' '.join(cmd[1:])} failed ({why}):\n" + text, stage_exit, transient)
    return {"seconds": time.perf_counter() - started, "stages_run": stages_run}


def exit_in_words(code: int) -> str:
    """``-9`` (Python's way) and ``137`` (a shell's way, 128 + the signal) both read "was killed by SIGKILL"."""
    number = -code if code < 0 else code - 128 if 128 < code < 128 + 65 else None
    try:
        return f"was killed by {signal.Signals(number).name}" if number else f"exited with {code}"
    except ValueError:
        return f"exited with {code}"


@task(name="dvc-push", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient)
def push(remote: str, env: dict[str, str]) -> None:
    subprocess.run([_dvc(), "push", "-r", remote], env=env, check=True)


def push_or_warn(remote: str, env: dict[str, str]) -> bool:
    """Push the outputs to ``remote`` (with the push task's retries); a push that still fails is an error in
    the log with the command to push by hand, not a failed retrain (its stages and registration stand)."""
    try:
        push(remote, env)
        return True
    except subprocess.CalledProcessError as exc:
        log.error("dvc push -r %s failed (exit code %s) after its retries; the retrain's outputs are in the local "
                  "DVC cache: push them by hand with `dvc push -r %s`", remote, exc.returncode, remote)
        return False


def check_dvc_remote(remote: str, env: dict[str, str]) -> None:
    """``retrain.dvc_remote`` must name a remote of this repo (``dvc remote list``): checked before the
    repro, so a typo fails in seconds, not after hours of stages (and is not retried as a network error)."""
    listed = subprocess.run([_dvc(), "remote", "list"], env=env, capture_output=True, text=True)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    if listed.returncode != 0 or remote not in names:
        raise ValueError(f"retrain.dvc_remote: {remote!r} is not a DVC remote of this repo (remotes: "
                         f"{', '.join(names) or 'none'}); add it with `dvc remote add {remote} <url>` or set "
                         "retrain.dvc_remote: null")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"


@task(name="register-and-gate", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def register_and_gate(p: Params, repro: dict[str, Any]) -> dict[str, Any]:
    """Log the retrain run (params, metrics, reports, DVC lock hash, git commit), register the
    candidate unless these exact weights are registered already, then gate and maybe promote."""
    import mlflow

    from sad import registry as reg
    from sad.stages import candidate_file, replay_per_task

    path = candidate_file(p)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no candidate (the select stage did not run; see the dvc output above)")
    candidate = json.loads(path.read_text())
    standing = reg.Standing(**candidate["standing"])
    provenance = {"dvc_lock_sha256": file_sha256(Path("dvc.lock")), "git_commit": git_commit()}
    tags = {"sad.dvc_lock_sha256": provenance["dvc_lock_sha256"], "sad.candidate": f"{candidate['method']}/seed{candidate['seed']}"}
    with stage_run(p.tracking, "retrain", tags=tags) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in redact(flatten(p.model_dump(by_alias=True))).items()})
        report = Path(p.path("metrics", "report.json"))
        if report.is_file():
            log_metrics(json.loads(report.read_text()), prefix="report/")
        log_metrics({"gate_value": standing.gate_value, "success_rate": standing.success_rate,
                     "teacher_success_rate": standing.teacher_success_rate, "repro_seconds": repro["seconds"],
                     "stages_run": repro["stages_run"]}, prefix="candidate/")
        for name in sorted(p.path("reports").glob("*")):
            if name.suffix in (".md", ".png", ".json"):
                mlflow.log_artifact(str(name), "reports")
        for name in ("dvc.lock", "params.yaml"):
            if Path(name).is_file():
                mlflow.log_artifact(name)
        existing = reg.find_version(p.tracking, candidate["weights_sha256"])
        if existing is not None and reg.decision_of(p.tracking, existing) is not None:
            decision = reg.decision_of_this_retrain(p.tracking, existing, candidate["standing"])
            if decision is None:  # gated by an earlier retrain: nothing changes now
                current = reg.champion(p.tracking)
                holder = current[0] if current else None
                decision = reg.Decision(existing, False, [f"unchanged: this student is already registered as v{existing}"],
                                        holder, holder, candidate["standing"])
        else:  # new weights, or registered but never gated (a crash or a retry between the two steps)
            card = {**candidate["card"], **provenance}
            if existing is not None:
                reg.complete_registration(p.tracking, existing, card, standing)
            version = existing or reg.register_candidate(Path(candidate["model_dir"]), card, standing, p.tracking)

            def replay(champion_version: str, task_ids: list[str]) -> dict[str, float]:
                return replay_per_task(p, *reg.load_version(p.tracking, champion_version), task_ids)

            decision = reg.gate_and_promote(p.tracking, version, standing, p.registration, replay=replay)
        out = {"candidate": f"{candidate['method']}/seed{candidate['seed']}", "run_id": run.info.run_id,
               "version": decision.version, "promoted": decision.promoted, "reason": decision.reason,
               "reasons": decision.reasons, "champion_before": decision.champion_before,
               "champion_after": decision.champion_after, "standing": candidate["standing"], **provenance}
        out["summary"] = reg.decision_summary(decision)
        write_json_atomic(p.path("reports", "registry.json"), out)  # the decision is taken: written at once
        try:  # a store error from here on fails the task; its retry reports this decision (same session)
            mlflow.log_dict(out, "decision.json")
            mlflow.log_text(reg.decision_markdown(decision), "promotion.md")
            mlflow.set_tag("sad.decision", ("promoted v" if decision.promoted else "not promoted v") + str(decision.version))
        except Exception as exc:  # noqa: BLE001 - any store error
            log.warning("the decision was not logged to the retrain run (%s); it is in reports/registry.json and on "
                        "the version's tags", exc)
    log.info("retrain: %s", out["summary"])
    return out


@flow(name="retrain", log_prints=False)
def retrain_flow(project_dir: str | None = None, params_path: str = "params.yaml", set_params: list[str] | None = None,
                 force: bool = False, target: str | None = None, preload: bool = True,
                 lock: bool = True) -> dict[str, Any]:
    """Reproduce the pipeline (DVC), then register the candidate and promote it if the gates pass.

    ``set_params`` (``KEY=VALUE``) runs a DVC experiment (``dvc exp run -S``) in the workspace;
    ``target`` reproduces up to one stage and registers nothing. ``lock=False``: the caller holds the
    project's retrain lock already (``sad pipeline`` takes it before it starts any server).
    """
    from flows.server import pipeline_services
    from sad.tracking import tracking_uri

    stop_on_signals(RetrainTerminated)
    if project_dir:
        os.chdir(project_dir)
    project = Path.cwd()
    p = load_params(params_path)
    cmd = dvc_command(list(set_params or []), force, target)
    with single_flight(project, p.retrain.lock_timeout_s) if lock else contextlib.nullcontext():
        home = Path(os.environ.get("PREFECT_HOME", project / ".prefect"))
        with pipeline_services(home, tracking_uri(p.tracking), Path(p.tracking.artifacts), preload) as services:
            saved = {k: os.environ.get(k) for k in services}
            os.environ.update(services)
            try:
                env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
                remote = p.retrain.dvc_remote
                if remote:
                    check_dvc_remote(remote, env)
                log.info("retrain in %s: %s", project, " ".join(cmd[1:]))
                repro = reproduce.with_options(retries=p.retrain.retries, retry_delay_seconds=p.retrain.retry_delay_s,
                                               retry_condition_fn=retry_unless_bad_input)(cmd, env)
                if target:
                    if remote:
                        push_or_warn(remote, env)
                    return {"target": target, **repro}
                p = load_params(params_path)  # `dvc exp run -S` rewrote params.yaml
                decision = register_and_gate(p, repro)  # before the push: a failed push does not undo the retrain
                if remote:
                    decision["pushed"] = push_or_warn(remote, env)
                log.info("retrain finished: %s", decision["summary"])
                return {**decision, "repro": repro}
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
