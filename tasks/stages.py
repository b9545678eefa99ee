"""Prefect tasks over the pipeline's stage functions.

Why tasks at all: each unit of work gets Prefect's retries (for transient failures such as a
locked SQLite store or a briefly unavailable file system), its own log stream and state in the
Prefect UI, and independent units (expert shards, environments) can run concurrently.
Nothing is cached by Prefect: DVC decides what reruns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from sad import stages
from sad.config import Params
from sad.envs.base import Task
from sad.io import BAD_INPUT_ERRORS
from sad.react import Episode

# Bad input fails the same way every time: retrying it only delays the error. Everything else
# (a locked SQLite store, a dropped connection, a full disk freed meanwhile) gets its retries.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (*BAD_INPUT_ERRORS, TypeError, NotADirectoryError,
                                                     IsADirectoryError, PermissionError)


def is_transient(exc: BaseException) -> bool:
    """Whether a failure may pass on a retry (bad input and missing inputs never do)."""
    return not isinstance(exc, PERMANENT_ERRORS)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run only when its exception is transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the task's own exception, re-raised by Prefect
        return is_transient(exc)
    return True


RETRY = {"retries": 2, "retry_delay_seconds": 2, "cache_policy": NO_CACHE, "retry_condition_fn": retry_if_transient}


@task(name="generate-tasks", **RETRY)
def generate_tasks(p: Params) -> dict[str, Any]:
    return stages.run_tasks(p)


@task(name="play-expert-shard", **RETRY)
def play_expert_shard(task_dicts: list[dict[str, Any]], tasks_root: str, perturb: float = 0.0,
                      seed: int = 0, repeat_share: float = 0.0) -> list[dict[str, Any]]:
    """One shard of expert episodes (runs in a worker process; plain dicts cross the boundary)."""
    from sad.rollout import play_expert

    tasks = [Task.from_dict(d) for d in task_dicts]
    return [e.to_dict() for e in play_expert(tasks, Path(tasks_root), perturb=perturb, seed=seed,
                                             repeat_share=repeat_share)]


@task(name="play-agent-shard", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def play_agent_shard(p: Params, model_dir: str, tasks_root: str, task_dicts: list[dict[str, Any]], agent_name: str,
                     batch_size: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One shard of an agent's episodes, on a worker: the agent is loaded there, plain dicts cross the
    boundary. Paths are absolute (a worker need not share the flow's working directory, only its files)."""
    from dataclasses import asdict

    from sad.evaluation import play_model

    tasks = [Task.from_dict(d) for d in task_dicts]
    episodes, stats = play_model(Path(model_dir), p, Path(tasks_root), tasks, agent_name, batch_size)
    return [e.to_dict() for e in episodes], asdict(stats)


@task(name="write-demos", **RETRY)
def write_demos(p: Params, episode_dicts: list[dict[str, Any]], dev_dicts: list[dict[str, Any]]) -> dict[str, Any]:
    return stages.write_demos(p, [Episode.from_dict(d) for d in episode_dicts], [Episode.from_dict(d) for d in dev_dicts])


@task(name="convert-pretrained", **RETRY)
def convert_pretrained(p: Params) -> dict[str, Any]:
    return stages.run_pretrained(p)


@task(name="train-tokenizer", **RETRY)
def train_tokenizer(p: Params) -> dict[str, Any]:
    return stages.run_tokenizer(p)


@task(name="train-teacher", cache_policy=NO_CACHE)
def train_teacher(p: Params, on_log=None) -> dict[str, Any]:
    return stages.run_teacher(p, on_log=on_log)


@task(name="teacher-rollouts", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def teacher_rollouts(p: Params) -> dict[str, Any]:
    return stages.run_rollout(p)


@task(name="segment-trajectories", **RETRY)
def segment_trajectories(p: Params) -> dict[str, Any]:
    return stages.run_segment(p)


@task(name="cache-teacher-logits", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def cache_teacher_logits(p: Params) -> dict[str, Any]:
    return stages.run_teacher_logits(p)


@task(name="distill-student", cache_policy=NO_CACHE)
def distill_student(p: Params, method: str, on_log=None) -> dict[str, Any]:
    return stages.run_distill(p, method, on_log=on_log)


@task(name="evaluate-agent", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def evaluate_agent(p: Params, agent: str) -> dict[str, Any]:
    return stages.run_evaluate(p, agent)


@task(name="scale-student", cache_policy=NO_CACHE)
def scale_student(p: Params, size: str) -> dict[str, Any]:
    return stages.run_scale(p, size)


@task(name="select-candidate", **RETRY)
def select_candidate(p: Params) -> dict[str, Any]:
    return stages.run_select(p)


@task(name="write-report", **RETRY)
def write_report(p: Params) -> dict[str, Any]:
    return stages.run_report(p)
