"""The registry of benchmarks: task sources, environments and experts by name.

The tasks root holds one folder per environment and a manifest per split
(``<root>/<env>/<split>.jsonl``) listing the playable tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sad.config import Params
from sad.envs.base import Environment, Expert, Task
from sad.io import read_jsonl, write_jsonl_atomic

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class Benchmark:
    name: str
    make_env: Callable[[bool], Environment]  # (expert_plan) -> env
    make_expert: Callable[[], Expert]
    generate: Callable[[Params, Path], dict[str, list[Task]]]


def _alfworld_generate(params: Params, root: Path) -> dict[str, list[Task]]:
    from sad.envs import alfworld

    p = params.tasks
    counts = {"train": p.train, "dev": p.dev, "test": p.test}
    games = alfworld.generate_games(
        seed=p.seed, counts=counts, task_types=tuple(p.alfworld.task_types),
        n_distractors=tuple(p.alfworld.distractors),
    )
    return {split: [alfworld.write_game(g, root, split, i, p.alfworld.max_steps) for i, g in enumerate(gs)]
            for split, gs in games.items()}


def _alfworld_env(expert_plan: bool) -> Environment:
    from sad.envs.alfworld import AlfworldEnv

    return AlfworldEnv(expert_plan=expert_plan)


def _alfworld_expert() -> Expert:
    from sad.envs.alfworld import AlfworldExpert

    return AlfworldExpert()


BENCHMARKS: dict[str, Benchmark] = {
    "alfworld": Benchmark("alfworld", _alfworld_env, _alfworld_expert, _alfworld_generate),
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown environment {name!r}; known: {sorted(BENCHMARKS)}") from None


def write_tasks(params: Params, root: Path) -> dict[str, dict[str, int]]:
    """Generate every environment's splits under ``root`` and write the manifests."""
    counts: dict[str, dict[str, int]] = {}
    for env in params.tasks.envs:
        bench = get_benchmark(env)
        env_root = root / env
        splits = bench.generate(params, env_root)
        ids = [t.task_id for ts in splits.values() for t in ts]
        if len(ids) != len(set(ids)):
            raise RuntimeError(f"{env}: duplicate task ids across splits")
        for split, tasks in splits.items():
            write_jsonl_atomic(env_root / f"{split}.jsonl", (t.to_dict() for t in tasks))
        counts[env] = {split: len(tasks) for split, tasks in splits.items()}
        log.info("%s: wrote %s", env, counts[env])
    return counts


def load_tasks(root: Path, env: str, split: str) -> list[Task]:
    manifest = Path(root) / env / f"{split}.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: task manifest not found (run the 'tasks' stage first)")
    tasks = []
    for i, row in enumerate(read_jsonl(manifest), 1):
        try:
            tasks.append(Task.from_dict(row))
        except KeyError as exc:
            raise ValueError(f"{manifest}:{i}: task entry lacks field {exc}") from None
    return tasks
