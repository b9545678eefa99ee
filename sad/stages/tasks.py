"""Stage ``tasks``: seeded, disjoint train/dev/test task splits for every environment."""

from __future__ import annotations

from typing import Any

from sad.config import Params
from sad.environments import write_tasks
from sad.io import atomic_dir, write_json_atomic
from sad.stages.layout import tasks_root


def run_tasks(p: Params) -> dict[str, Any]:
    """Generate seeded, disjoint train/dev/test task splits for every environment."""
    root = tasks_root(p)
    with atomic_dir(root) as tmp:
        counts = write_tasks(p, tmp)
    metrics = {"tasks": counts}
    write_json_atomic(p.path("metrics", "tasks.json"), metrics)
    return metrics
