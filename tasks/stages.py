"""Prefect tasks over the pipeline's stage functions.

Why tasks at all: each unit of work gets Prefect's retries (for transient failures such as a
locked SQLite store or a briefly unavailable file system), its own log stream and state in the
Prefect UI, and independent units (expert shards, environments) can run concurrently.
Nothing is cached by Prefect: DVC decides what reruns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from sad import stages
from sad.config import Params
from sad.envs.base import Task
from sad.io import BAD_INPUT_ERRORS, BUG_ERRORS
from sad.react import Episode

# Bad input fails the same way every time: retrying it only delays the error; so do bugs (TypeError, a plain
# KeyError, ...). Everything else (a locked SQLite store, a dropped connection, a full disk freed meanwhile) gets
# its retries.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (*BAD_INPUT_ERRORS, *BUG_ERRORS, NotADirectoryError,
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


# One retry policy per kind of work. Cheap, idempotent steps retry twice; a step that plays or scores
# with a model retries once; training never (a killed run resumes from its checkpoint when DVC reruns it,
# a second full attempt inside one stage would only double a long failure).
RETRY_POLICIES: dict[str, dict[str, Any]] = {
    "quick": {"retries": 2, "retry_delay_seconds": 2},
    "once": {"retries": 1, "retry_delay_seconds": 2},
    "never": {"retries": 0},
}
RETRY = {**RETRY_POLICIES["quick"], "cache_policy": NO_CACHE, "retry_condition_fn": retry_if_transient}

# The stage bodies of sad.stages as Prefect tasks: stage -> (task name, body, retry policy).
STAGE_BODIES: dict[str, tuple[str, Callable[..., dict[str, Any]], str]] = {
    "tasks": ("generate-tasks", stages.run_tasks, "quick"),
    "pretrained": ("convert-pretrained", stages.run_pretrained, "quick"),
    "tokenizer": ("train-tokenizer", stages.run_tokenizer, "quick"),
    "teacher": ("train-teacher", stages.run_teacher, "never"),
    "rollout": ("teacher-rollouts", stages.run_rollout, "once"),
    "segment": ("segment-trajectories", stages.run_segment, "quick"),
    "teacher_logits": ("cache-teacher-logits", stages.run_teacher_logits, "once"),
    "student_init": ("init-student", stages.run_student_init, "never"),
    "distill": ("distill-student", stages.run_distill, "never"),
    "evaluate": ("evaluate-agent", stages.run_evaluate, "once"),
    "scale": ("scale-student", stages.run_scale, "never"),
    "select": ("select-candidate", stages.run_select, "quick"),
    "report": ("write-report", stages.run_report, "quick"),
}


def _stage_task(stage: str):
    name, body, policy = STAGE_BODIES[stage]
    return task(body, name=name, cache_policy=NO_CACHE, retry_condition_fn=retry_if_transient, **RETRY_POLICIES[policy])


STAGE_TASKS = {stage: _stage_task(stage) for stage in STAGE_BODIES}
"""A stage's body as a Prefect task: ``STAGE_TASKS["segment"](p)`` (the demos stage runs its shards below)."""


@task(name="play-expert-shard", **RETRY)
def play_expert_shard(task_dicts: list[dict[str, Any]], tasks_root: str, perturb: float = 0.0,
                      seed: int = 0, repeat_share: float = 0.0) -> list[dict[str, Any]]:
    """One shard of expert episodes (runs in a worker process; plain dicts cross the boundary)."""
    from sad.rollout import play_expert

    tasks = [Task.from_dict(d) for d in task_dicts]
    return [e.to_dict() for e in play_expert(tasks, Path(tasks_root), perturb=perturb, seed=seed,
                                             repeat_share=repeat_share)]


@task(name="play-agent-shard", **{**RETRY, **RETRY_POLICIES["once"]})
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
