"""``sad bench``: the whole benchmark suite in one run, one JSON object, each target met or not.

Ratios are measured within this run (machines are noisy). Pipeline figures that need a finished
pipeline (per-stage time and memory, no-op ``dvc repro``) are read from the current project and
marked skipped when it has none.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sad.config import Params

_FLOW_PROBE = """
import json, time
t0 = time.perf_counter()
from prefect import flow, task
t1 = time.perf_counter()

@task
def work(x):
    return x + 1

@flow
def probe(x: int) -> int:
    return work(x)

times = []
for i in range(4):
    s = time.perf_counter(); probe(i); times.append(time.perf_counter() - s)
print(json.dumps({"import_s": t1 - t0, "flow_run_s": times}))
"""


def noop_repro(project: Path) -> dict[str, Any]:
    """Time ``dvc repro`` in a project whose pipeline is up to date (checked first with ``--dry``)."""
    if not (project / "dvc.lock").is_file():
        return {"skipped": "no dvc.lock here: run the pipeline first"}
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc if dvc.exists() else "dvc"), "repro"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dry = subprocess.run(cmd + ["--dry"], cwd=project, capture_output=True, text=True, env=env)
    pending = dry.stdout.count("Running stage")
    if dry.returncode != 0 or pending:
        return {"skipped": f"the pipeline is not up to date ({pending} stages would run): run it first"}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=env)
    return {"seconds": time.perf_counter() - started, "up_to_date": done.returncode == 0 and "Running stage" not in done.stdout}


def prefect_overhead() -> dict[str, Any]:
    """A flow run with one no-op task against a local Prefect server: what each stage pays on top of its work."""
    from flows.server import start_server, stop_server

    with tempfile.TemporaryDirectory(prefix="sad-prefectbench-") as tmp:
        started = time.perf_counter()
        server, api = start_server(Path(tmp) / "server.log")
        server_s = time.perf_counter() - started
        try:
            env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": tmp}
            done = subprocess.run([sys.executable, "-c", _FLOW_PROBE], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                return {"error": done.stderr[-2000:]}
            probe = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            stop_server(server)
    runs = probe["flow_run_s"]
    return {"server_start_s": server_s, "prefect_import_s": probe["import_s"], "first_flow_run_s": runs[0],
            "flow_run_s": sum(runs[1:]) / len(runs[1:])}


def _whole_pipeline_seconds(costs: dict[str, Any]) -> float | None:
    """The sum of stage times, only when the store holds a whole pipeline (first and last stage present)."""
    stages = costs.get("stages") or {}
    return costs["sum_of_stage_seconds"] if {"tasks", "report"} <= set(stages) else None


def evaluation_prefill_cut(p: Params, project: Path) -> dict[str, Any]:
    """The prefill cut of the project's latest ``evaluate_teacher`` (whole episodes, the evaluation's batch), from
    its metrics file: the suite's own rollout caps episodes at a few steps, where each first prompt weighs more."""
    from sad.stages.layout import eval_metrics_file

    path = project / eval_metrics_file(p, "teacher")
    if not path.is_file():
        return {"skipped": f"no {eval_metrics_file(p, 'teacher')}: run the pipeline first"}
    try:
        overall = json.loads(path.read_text())["splits"]["test"]["overall"]
        cut = overall.get("prefill_tokens_cut")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return {"skipped": f"{path}: not an evaluation metrics file with a test split ({type(exc).__name__}: {exc})"}
    if cut is None:
        return {"skipped": f"{eval_metrics_file(p, 'teacher')} predates the prefill counters: rerun evaluate_teacher"}
    return {"file": str(eval_metrics_file(p, "teacher")), "prefill_tokens_cut": cut,
            "prefill_tokens_per_generated_token": overall["prefill_tokens_per_generated_token"]}


def run_suite(p: Params, project: Path, quick: bool = False, log=print) -> dict[str, Any]:
    """Every benchmark, in one process tree, one after the other (each times its own work only)."""
    import torch

    from sad.bench.evaluation import benchmark_evaluation, benchmark_student_vs_teacher
    from sad.bench.suite import stage_costs, verdicts
    from sad.bench.training import benchmark_training

    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                       "python": platform.python_version(), "torch": torch.__version__},
                           "quick": quick}
    teacher_dir = project / p.path("models", "teacher")
    student_dir = project / p.path("models", "students", "sad", f"seed{p.distill.seeds[0]}")
    log("bench: rollout (batched vs one at a time)")
    out["rollout"] = benchmark_evaluation(p, teacher_dir, per_env=2 if quick else 6, batch_size=16,
                                          max_steps=3 if quick else 5)
    log("bench: training (tokens/s, MFU, cache)")
    out["training"] = benchmark_training(p, steps=2 if quick else 12, batch_size=2 if quick else 4,
                                         max_tokens=128 if quick else None, isolated=not quick)
    log("bench: student vs teacher")
    out["student_vs_teacher"] = benchmark_student_vs_teacher(p, teacher_dir, student_dir, per_env=2 if quick else 4,
                                                             max_steps=3 if quick else 5)
    log("bench: pipeline (no-op dvc repro, Prefect overhead, stage costs)")
    pipeline: dict[str, Any] = {"noop_dvc_repro": noop_repro(project), "prefect": prefect_overhead(),
                                "evaluate_teacher_prefill": evaluation_prefill_cut(p, project)}
    try:
        pipeline["stage_costs"] = stage_costs(p)
    except Exception as exc:  # no store yet
        pipeline["stage_costs"] = {"skipped": f"no MLflow stage runs ({type(exc).__name__})"}
    out["pipeline"] = pipeline
    tr = out["training"]
    costs = pipeline["stage_costs"]
    out["targets"] = verdicts({
        "rollout_batched_speedup": out["rollout"]["speedup_steps_per_s"],
        "prefill_tokens_cut": out["rollout"]["prefill_tokens_cut"],
        "prefill_tokens_cut_evaluate_teacher": pipeline["evaluate_teacher_prefill"].get("prefill_tokens_cut"),
        "admissible_cost_per_step": out["rollout"]["admissible_cost_per_scored_step"],
        "repair_cost_per_step": out["rollout"]["repair_cost_per_step"],
        "training_mfu_sft": tr["mfu"]["sft"],
        "training_mfu_teacher_sft": tr["mfu"]["teacher_sft"],
        "sad_overhead_vs_token_kd": tr["sad_overhead_vs_token_kd"],
        "cache_bytes_ratio": tr["cache"]["bytes_ratio"],
        "cache_sweep_time_saved": tr["cache"]["sweep_one_pass_time_saved"],
        "noop_dvc_repro_s": pipeline["noop_dvc_repro"].get("seconds"),
        "default_pipeline_s": _whole_pipeline_seconds(costs) if p.project.profile == "default" else None,
    })
    return out
