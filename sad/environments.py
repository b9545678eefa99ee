"""The registry of benchmarks: task sources, environments and experts by name.

The tasks root holds one folder per environment and a manifest per split
(``<root>/<env>/<split>.jsonl``) listing the playable tasks.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sad.config import Params
from sad.envs.base import Environment, Expert, Task, UnsafePathError, task_location
from sad.io import read_jsonl_numbered, write_jsonl_atomic

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class Benchmark:
    name: str
    make_env: Callable[[bool], Environment]  # (expert_plan) -> env
    make_expert: Callable[[], Expert]
    generate: Callable[[Params, Path], dict[str, list[Task]]]
    # text the environment shows whatever the task (a shop's catalogue), from its tasks folder; None: per task only
    world_texts: Callable[[Path], Iterable[str]] | None = None


def _counts(params: Params) -> dict[str, int]:
    p = params.tasks
    return {"train": p.train, "dev": p.dev, "test": p.test}


def _alfworld_generate(params: Params, root: Path) -> dict[str, list[Task]]:
    from sad.envs import alfworld

    p = params.tasks
    cap = p.alfworld.max_steps
    if p.alfworld.official:
        data = Path(p.alfworld.official).expanduser()
        out = {}
        for split, folder in alfworld.OFFICIAL_SPLITS.items():
            trials = alfworld.official_games(data, folder)
            picked = alfworld.pick_official_games(trials, _counts(params)[split], f"alfworld:{p.seed}:{split}",
                                                  str(data / folder), tuple(p.alfworld.task_types))
            out[split] = [alfworld.copy_official_game(t, root, split, i, cap) for i, t in enumerate(picked)]
        return out
    games = alfworld.generate_games(
        seed=p.seed, counts=_counts(params), task_types=tuple(p.alfworld.task_types),
        n_distractors=tuple(p.alfworld.distractors),
    )
    return {split: [alfworld.write_game(g, root, split, i, cap) for i, g in enumerate(gs)]
            for split, gs in games.items()}


def _hotpotqa_generate(params: Params, root: Path) -> dict[str, list[Task]]:
    from sad.envs import hotpotqa

    p = params.tasks
    counts = _counts(params)
    if p.hotpotqa.official:
        splits = hotpotqa.official_splits(Path(p.hotpotqa.official).expanduser(), p.seed, counts)
    else:
        records = hotpotqa.generate_questions(p.seed, sum(counts.values()), p.hotpotqa.distractors)
        splits, start = {}, 0
        for split, k in counts.items():
            splits[split], start = records[start:start + k], start + k
    return {split: hotpotqa.write_split(recs, root, split, p.hotpotqa.max_steps) for split, recs in splits.items()}


def _webshop_generate(params: Params, root: Path) -> dict[str, list[Task]]:
    from sad.envs import webshop

    p = params.tasks
    counts = _counts(params)
    folder = root / "catalogue"
    if p.webshop.official:
        source = Path(p.webshop.official).expanduser()
        products, instructions = webshop.read_official(source)
    else:
        products, instructions = webshop.generate_catalogue(p.seed, p.webshop.products, counts)
    webshop.write_catalogue(products, instructions, folder)
    categories = {str(rec["asin"]): str(rec.get("category", "")) for rec in products}
    return webshop.goal_tasks(instructions, categories, "catalogue", p.seed, counts, p.webshop.max_steps)


def _webshop_world(env_root: Path) -> Iterable[str]:
    from sad.envs import webshop

    return webshop.catalogue_texts(env_root / "catalogue")


def _env_factory(module: str, cls: str) -> Callable[[bool], Environment]:
    def make(expert_plan: bool) -> Environment:
        return getattr(importlib.import_module(f"sad.envs.{module}"), cls)(expert_plan=expert_plan)

    return make


def _expert_factory(module: str, cls: str) -> Callable[[], Expert]:
    def make() -> Expert:
        return getattr(importlib.import_module(f"sad.envs.{module}"), cls)()

    return make


BENCHMARKS: dict[str, Benchmark] = {
    "alfworld": Benchmark("alfworld", _env_factory("alfworld", "AlfworldEnv"),
                          _expert_factory("alfworld", "AlfworldExpert"), _alfworld_generate),
    "hotpotqa": Benchmark("hotpotqa", _env_factory("hotpotqa", "HotpotEnv"),
                          _expert_factory("hotpotqa", "HotpotExpert"), _hotpotqa_generate),
    "webshop": Benchmark("webshop", _env_factory("webshop", "WebShopEnv"),
                         _expert_factory("webshop", "WebShopExpert"), _webshop_generate, _webshop_world),
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
    tasks: list[Task] = []
    seen: set[str] = set()
    for i, row in read_jsonl_numbered(manifest):
        try:
            task = Task.from_dict(row)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{manifest}:{i}: not a task entry (missing or malformed field {exc})") from None
        if task.env != env:
            raise ValueError(f"{manifest}:{i}: task {task.task_id} belongs to env {task.env!r}, not {env!r}")
        if task.task_id in seen:
            raise ValueError(f"{manifest}:{i}: duplicate task id {task.task_id!r}")
        try:
            task_location(root, task)
        except UnsafePathError as exc:
            raise UnsafePathError(f"{manifest}:{i}: {exc}") from None
        seen.add(task.task_id)
        tasks.append(task)
    return tasks


def generate_fresh(params: Params, env: str, split: str, n: int, root: Path) -> list[Task]:
    """Generate a fresh seeded task set of ``n`` tasks in ``split`` for one environment under
    ``root`` (the other splits get one task each) and return that split's tasks."""
    counts = {s: (n if s == split else 1) for s in SPLITS}
    if split not in counts:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    tasks = params.tasks.model_copy(update={"envs": [env], **counts})
    fresh = params.model_copy(update={"tasks": tasks})
    write_tasks(fresh, root)
    return load_tasks(root, env, split)
