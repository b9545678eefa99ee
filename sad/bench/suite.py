"""Targets of the benchmark suite (``sad bench``, run by flows/bench.py) and the per-stage costs of
the project's latest pipeline run, read from its MLflow stage runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sad.config import Params

# (name, target, how "met" is decided)
TARGETS = {
    "rollout_batched_speedup": (8.0, "ge"),  # steps/s batched against one at a time, same tasks and model
    "prefill_tokens_cut": (4.0, "ge"),  # the suite's rollout: 5-step episodes, where each first prompt weighs more
    "prefill_tokens_cut_evaluate_teacher": (4.0, "ge"),  # the project's latest evaluate_teacher: whole episodes
    "admissible_cost_per_step": (2.0, "le"),  # seconds per scored step against a free step, same tasks and model
    "repair_cost_per_step": (2.0, "le"),
    "training_mfu_sft": (0.5, "ge"),  # the default student's training (sft: no teacher in the step)
    "training_mfu_teacher_sft": (0.5, "ge"),  # the teacher's architecture, trained the same way
    "sad_overhead_vs_token_kd": (0.03, "le"),
    "cache_bytes_ratio": (0.05, "le"),
    "cache_sweep_time_saved": (0.40, "ge"),
    "noop_dvc_repro_s": (5.0, "le"),
    "default_pipeline_s": (1200.0, "le"),
}


def verdicts(measured: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (target, op) in TARGETS.items():
        value = measured.get(name)
        met = None if value is None else (value >= target if op == "ge" else value <= target)
        out[name] = {"measured": value, "target": f"{'>=' if op == 'ge' else '<='} {target}", "met": met}
    return out


def stage_costs(p: Params) -> dict[str, Any]:
    """Duration and peak memory of the latest run of every stage in the project's MLflow store (a local SQLite
    store that does not exist yet is not created: ``skipped``)."""
    import mlflow

    from sad.tracking import configure, tracking_uri

    uri = tracking_uri(p.tracking)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return {"skipped": f"no MLflow store at {uri.removeprefix('sqlite:///')} yet: run the pipeline first"}
    configure(p.tracking)
    runs = mlflow.search_runs(experiment_names=[p.tracking.experiment], output_format="list", max_results=5000)
    latest: dict[str, Any] = {}
    for run in runs:  # newest first
        stage = run.data.tags.get("sad.stage")
        if stage and stage not in latest and run.info.status == "FINISHED" and run.info.end_time:
            latest[stage] = run
    stages = {}
    for stage, run in latest.items():
        if stage == "retrain":
            continue
        stages[stage] = {"seconds": (run.info.end_time - run.info.start_time) / 1000,
                         "peak_rss_mb": run.data.metrics.get("stage/peak_rss_mb")}
    total = sum(s["seconds"] for s in stages.values())
    out: dict[str, Any] = {"stages": stages, "sum_of_stage_seconds": total}
    if "retrain" in latest:
        out["last_retrain_repro_s"] = latest["retrain"].data.metrics.get("candidate/repro_seconds")
    return out
