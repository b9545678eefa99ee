"""Stage ``rollout``: the teacher plays the train tasks; its episodes are the students' data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sad.config import Params
from sad.environments import load_tasks
from sad.io import write_json_atomic, write_jsonl_atomic
from sad.stages.layout import rollouts_file, tasks_root, teacher_dir

if TYPE_CHECKING:
    from sad.rollout import Player


def rollout_tasks(train_tasks: list, per_env: int) -> list:
    """The train tasks of one env the teacher plays: the first ``per_env`` (``rollout.tasks``; 0 = all)."""
    return list(train_tasks[:per_env]) if per_env else list(train_tasks)


def run_rollout(p: Params, progress: bool = True, player: Player | None = None) -> dict[str, Any]:
    """The teacher plays the train tasks; its trajectories are the students' data.

    ``player`` (a :data:`sad.rollout.Player`) plays them elsewhere, e.g. sharded over Dask workers.
    """
    from sad.evaluation import play_model
    from sad.metrics import success_by, summarize
    from sad.tokenizer import load_tokenizer

    tasks = [t for env in p.tasks.envs for t in rollout_tasks(load_tasks(tasks_root(p), env, "train"), p.rollout.tasks)]
    if player is not None:
        episodes, stats = player(tasks, "teacher")
    else:
        episodes, stats = play_model(teacher_dir(p), p, tasks_root(p), tasks, "teacher", p.rollout.batch_size,
                                     progress=progress)
    write_jsonl_atomic(rollouts_file(p), (e.to_dict() for e in episodes))
    metrics = {**summarize(episodes, load_tokenizer(teacher_dir(p))), "success_by_task_type": success_by(episodes),
               "generated_tokens_per_s": stats.tokens_per_second, "generation_seconds": stats.generation_seconds,
               "env_seconds": stats.env_seconds}
    if stats.prefill_computed:  # as in the evaluation metrics: absent when the player counted no prefill
        metrics.update(prefill_tokens_per_generated_token=stats.prefill_tokens_per_generated_token,
                       prefill_tokens_cut=stats.prefill_tokens_cut)
    write_json_atomic(p.path("metrics", "rollout.json"), metrics)
    return metrics
