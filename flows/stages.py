"""One Prefect flow per pipeline stage; ``dvc.yaml`` runs them through the ``sad stage`` CLI.

Each flow loads and validates ``params.yaml`` once, opens an MLflow run for the stage, calls
its task (``tasks.stages.STAGE_TASKS``) and logs the stage's metrics. The work itself lives in ``sad.stages``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner

from sad.config import Params, load_params
from sad.environments import load_tasks
from sad.react import Episode
from sad.rollout import Player, PlayStats
from sad.stages import run_evaluate, run_rollout, tasks_root, teacher_dir
from sad.tracking import log_metrics, stage_run
from tasks import stages as t


def _mlflow_step_logger(run_id: str, prefix: str):
    """Per-step training metrics, logged by run id (safe from any thread)."""
    from mlflow import MlflowClient

    client = MlflowClient()

    def on_log(step: int, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                client.log_metric(run_id, f"{prefix}{key}", float(value), step=step)

    return on_log


def _tracked(p: Params, stage: str, logged: dict[str, Any] | None, work, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``work(run)`` inside the stage's MLflow run and log the metrics it returns."""
    with stage_run(p.tracking, stage, logged, tags=tags) as run:
        metrics = work(run)
        log_metrics(metrics)
    return metrics


@flow(name="tasks", log_prints=False)
def tasks_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """Generate disjoint, seeded train/dev/test task splits per environment."""
    p = load_params(params_path)
    return _tracked(p, "tasks", {"tasks": p.tasks.model_dump()}, lambda run: t.STAGE_TASKS["tasks"](p))


def _shards(items: list, n: int) -> list[list]:
    size = max(1, math.ceil(len(items) / n))
    return [items[i:i + size] for i in range(0, len(items), size)]


def dask_runner(p: Params):
    """Prefect's DaskTaskRunner: on ``workers.address`` if set, else a local cluster of worker processes
    bound to 127.0.0.1, without the dashboard."""
    from prefect_dask import DaskTaskRunner

    if p.workers.address:
        return DaskTaskRunner(address=p.workers.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": p.workers.n_workers, "threads_per_worker": p.workers.threads_per_worker,
                                          "processes": True, "host": "127.0.0.1", "dashboard_address": None})


def on_workers(p: Params) -> bool:
    return p.workers.task_runner == "dask"


def sharded_player(p: Params, model_dir: Path, batch_size: int) -> Player:
    """A :data:`sad.rollout.Player` that splits the tasks into one shard per worker, plays each shard as
    a Prefect task on the flow's task runner, and joins the episodes in task order."""

    def play(tasks, agent_name: str):
        futures = [t.play_agent_shard.submit(p, str(Path(model_dir).resolve()), str(tasks_root(p).resolve()),
                                             [task.to_dict() for task in shard], agent_name, batch_size)
                   for shard in _shards(tasks, p.workers.n_workers)]
        episodes, stats = [], PlayStats()
        for future in futures:
            shard_episodes, shard_stats = future.result()
            episodes.extend(Episode.from_dict(d) for d in shard_episodes)
            stats.add(PlayStats(**shard_stats))
        return episodes, stats

    return play


@flow(name="demos", log_prints=False)
def demos_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """The expert plays every train task (with injected mistakes: the demos) and every dev task (without:
    the held-out states of step accuracy); shards run in parallel worker processes."""
    p = load_params(params_path)
    root = p.path("data", "tasks")
    tasks = [task.to_dict() for env in p.tasks.envs for task in load_tasks(root, env, "train")]
    dev_tasks = [task.to_dict() for env in p.tasks.envs for task in load_tasks(root, env, "dev")]

    def work(run) -> dict[str, Any]:
        # Shards run in worker processes; with one worker, one shard in-process (the engine is not thread-safe).
        n_shards = p.workers.n_workers if on_workers(p) else 1 if p.demos.workers == 1 else 2 * p.demos.workers
        futures = [t.play_expert_shard.submit(shard, str(root), p.demos.perturb, p.demos.seed, p.demos.repeat_share)
                   for shard in _shards(tasks, n_shards)]
        train = [e for f in futures for e in f.result()]
        # after the train shards: a worker process never plays two shards at once (the engine is not thread-safe)
        dev_futures = [t.play_expert_shard.submit(shard, str(root), 0.0, p.demos.seed)
                       for shard in _shards(dev_tasks, n_shards)]
        return t.write_demos(p, train, [e for f in dev_futures for e in f.result()])

    return _tracked(p, "demos", {"demos": p.demos.model_dump()}, work)


@flow(name="pretrained", log_prints=False)
def pretrained_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """A pretrained teacher (teacher.source) as a safetensors folder, or a note that there is none."""
    p = load_params(params_path)
    return _tracked(p, "pretrained", {"teacher": {"source": p.teacher.source}}, lambda run: t.STAGE_TASKS["pretrained"](p))


@flow(name="tokenizer", log_prints=False)
def tokenizer_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    p = load_params(params_path)
    return _tracked(p, "tokenizer", {"tokenizer": p.tokenizer.model_dump()}, lambda run: t.STAGE_TASKS["tokenizer"](p))


@flow(name="teacher", log_prints=False)
def teacher_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    p = load_params(params_path)
    logged = {"teacher": p.teacher.model_dump(), "context": p.context.model_dump()}
    return _tracked(p, "teacher", logged,
                    lambda run: t.STAGE_TASKS["teacher"](p, on_log=_mlflow_step_logger(run.info.run_id, "train/")))


@flow(name="rollout", log_prints=False)
def rollout_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    p = load_params(params_path)

    def work(run) -> dict[str, Any]:
        if on_workers(p):  # shards are the retried tasks; the stage itself runs in the flow
            return run_rollout(p, progress=False, player=sharded_player(p, teacher_dir(p), p.rollout.batch_size))
        return t.STAGE_TASKS["rollout"](p)

    logged = {"rollout": p.rollout.model_dump(), "workers": p.workers.model_dump()}
    return _tracked(p, "rollout", logged, work)


@flow(name="segment", log_prints=False)
def segment_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    p = load_params(params_path)
    return _tracked(p, "segment", {"segment": p.segment.model_dump()}, lambda run: t.STAGE_TASKS["segment"](p))


@flow(name="teacher_logits", log_prints=False)
def teacher_logits_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """The teacher's top-k log-probs and entropies at every generated position (read by every KD method)."""
    p = load_params(params_path)
    return _tracked(p, "teacher_logits", {"teacher_logits": p.distill.teacher_logits.model_dump()},
                    lambda run: t.STAGE_TASKS["teacher_logits"](p))


@flow(name="student_init", log_prints=False)
def student_init_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """The student every method starts from: the teacher's layer cut, healed on the expert's demos."""
    p = load_params(params_path)
    logged = {"student_layers": p.distill.student_layers, "heal": p.distill.heal.model_dump()}
    return _tracked(p, "student_init", {"student_init": logged}, lambda run: t.STAGE_TASKS["student_init"](p))


@flow(name="distill", log_prints=False)
def distill_flow(method: str, params_path: str = "params.yaml") -> dict[str, Any]:
    p = load_params(params_path)
    if method not in p.distill.methods:
        raise ValueError(f"unknown method {method!r}; params.yaml distill.methods has {sorted(p.distill.methods)}")
    logged = {"student": p.distill.student.model_dump(), "train": p.distill.train.model_dump(),
              "method": p.distill.methods[method].model_dump(), "curriculum": p.distill.curriculum.model_dump(),
              "teacher_logits": p.distill.teacher_logits.model_dump()}
    return _tracked(p, f"distill@{method}", {"distill": logged},
                    lambda run: t.STAGE_TASKS["distill"](p, method, on_log=_mlflow_step_logger(run.info.run_id, "train/")),
                    tags={"sad.method": method})


@flow(name="evaluate", log_prints=False)
def evaluate_flow(agent: str, params_path: str = "params.yaml") -> dict[str, Any]:
    p = load_params(params_path)
    if agent != "teacher" and agent not in p.distill.methods:
        raise ValueError(f"unknown agent {agent!r}; use 'teacher' or one of {sorted(p.distill.methods)}")
    with stage_run(p.tracking, f"evaluate@{agent}", {"evaluate": p.evaluate.model_dump()}, tags={"sad.agent": agent}):
        if on_workers(p):
            results = run_evaluate(p, agent, progress=False,
                                   players=lambda model_dir: sharded_player(p, model_dir, p.evaluate.batch_size))
        else:
            results = t.STAGE_TASKS["evaluate"](p, agent)
        for split, r in results["splits"].items():
            log_metrics(r["overall"], prefix=f"{split}/")
        if "agreement" in results:
            log_metrics({k: results["agreement"][k] for k in ("cot_match_rate", "action_agreement")}, prefix="test/")
        if "step_accuracy" in results:
            acc = results["step_accuracy"]
            log_metrics({"step_accuracy": acc["step_accuracy"],
                         **{f"{env}.step_accuracy": m["step_accuracy"] for env, m in acc["envs"].items()}}, prefix="dev/")
    return results


@flow(name="scale", log_prints=False)
def scale_flow(size: str, params_path: str = "params.yaml") -> dict[str, Any]:
    """One point of the student-size sweep: train distill.scaling.method at this size, evaluate on test."""
    p = load_params(params_path)
    if size not in p.distill.scaling.sizes:
        raise ValueError(f"unknown size {size!r}; distill.scaling.sizes has {sorted(p.distill.scaling.sizes)}")
    logged = {"scaling": {"method": p.distill.scaling.method, "size": size,
                          "arch": p.distill.scaling.sizes[size].model_dump()}}

    def work(run) -> dict[str, Any]:
        out = t.STAGE_TASKS["scale"](p, size)
        return {"parameters": out["parameters"], "test_success_rate": out["splits"]["test"]["overall"]["success_rate"]}

    return _tracked(p, f"scale@{size}", logged, work, tags={"sad.size": size})


@flow(name="select", log_prints=False)
def select_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    """The registry candidate: best method by mean gate metric over seeds, then its best seed."""
    p = load_params(params_path)
    return _tracked(p, "select", {"register": p.registration.model_dump()}, lambda run: t.STAGE_TASKS["select"](p))


@flow(name="report", log_prints=False)
def report_flow(params_path: str = "params.yaml") -> dict[str, Any]:
    import mlflow

    p = load_params(params_path)
    with stage_run(p.tracking, "report"):
        summary = t.STAGE_TASKS["report"](p)
        log_metrics(summary["test_success"], prefix="test_success/")
        diff = summary["sad_vs_token_kd"].get("difference")
        if diff:
            log_metrics({"mean": diff["mean"], "ci_low": diff["low"], "ci_high": diff["high"]}, prefix="sad_minus_token_kd/")
        from sad.report import PLOTS

        for name in ("results.md", *PLOTS):
            mlflow.log_artifact(str(p.path("reports", name)))
    return summary


def on_workers_flow(flow_fn, p: Params):
    """``flow_fn`` on the Dask task runner when ``workers.task_runner`` is dask, else unchanged."""
    return flow_fn.with_options(task_runner=dask_runner(p)) if on_workers(p) else flow_fn


def demos_flow_for(p: Params):
    """The demos flow on Dask workers (``workers.task_runner: dask``), or with a process pool sized by
    ``demos.workers`` (in-process for one worker)."""
    if on_workers(p):
        return on_workers_flow(demos_flow, p)
    if p.demos.workers == 1:
        return demos_flow
    return demos_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=p.demos.workers))
