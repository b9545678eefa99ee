"""Environment throughput: reset time and env steps per second, engine only.

The expert plays each task once to record a valid action sequence (with thoughts and planner
calls, timed separately as ``expert_episodes_per_s``); the actions are then replayed on a
fresh environment without expert planning, timing ``reset`` and ``step`` alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import mean, median
from typing import Any

from sad.environments import get_benchmark
from sad.envs.base import Task
from sad.rollout import play_expert


def benchmark_env(tasks: list[Task], tasks_root: Path) -> dict[str, Any]:
    """Time one environment's engine on ``tasks`` (all of one env)."""
    if not tasks:
        raise ValueError("no tasks to benchmark")
    started = time.perf_counter()
    episodes = play_expert(tasks, tasks_root)
    expert_seconds = time.perf_counter() - started
    env = get_benchmark(tasks[0].env).make_env(False)
    env.reset(tasks[0], tasks_root)  # warm caches (parsers, indexes) outside the timings
    resets: list[float] = []
    step_seconds = 0.0
    steps = 0
    for task, episode in zip(tasks, episodes):
        t0 = time.perf_counter()
        env.reset(task, tasks_root)
        resets.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for step in episode.steps:
            env.step(step.action)
        step_seconds += time.perf_counter() - t0
        steps += episode.n_steps
    return {
        "env": tasks[0].env,
        "episodes": len(tasks),
        "steps": steps,
        "reset_ms_mean": 1000 * mean(resets),
        "reset_ms_median": 1000 * median(resets),
        "steps_per_s": steps / step_seconds if step_seconds else 0.0,
        "expert_success_rate": sum(e.success for e in episodes) / len(episodes),
        "expert_episodes_per_s": len(episodes) / expert_seconds,
    }
