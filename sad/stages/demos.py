"""Stage ``demos``: the environments' experts play the train (and dev) tasks; their success is checked."""

from __future__ import annotations

import logging
from typing import Any

from sad.config import Params
from sad.io import write_json_atomic, write_jsonl_atomic
from sad.react import Episode
from sad.stages.layout import demos_file, dev_demos_file

log = logging.getLogger(__name__)


def demos_metrics(episodes: list[Episode]) -> dict[str, Any]:
    from sad.metrics import success_by

    n = len(episodes) or 1
    by_env: dict[str, list[Episode]] = {}
    for e in episodes:
        by_env.setdefault(e.env, []).append(e)
    return {
        "episodes": len(episodes),
        "expert_success_rate": sum(e.success for e in episodes) / n,
        "avg_steps": sum(e.n_steps for e in episodes) / n,
        "success_by_env": success_by(episodes, "env"),
        "success_by_task_type": success_by(episodes),
        "success_by_env_and_task_type": {env: success_by(eps) for env, eps in sorted(by_env.items())},
        "gave_up": sum("expert_gave_up" in e.meta for e in episodes),
    }


class ExpertBelowFloor(ValueError):
    """The environment's expert failed too many tasks for its demos to be trusted (bad task data)."""


def check_expert_success(episodes: list[Episode], floor: float) -> None:
    """Raise :class:`ExpertBelowFloor` naming the failed tasks when, in any environment, the expert wins
    fewer than ``floor`` of its tasks (``demos.min_success``): its demos would teach failure."""
    by_env: dict[str, list[Episode]] = {}
    for e in episodes:
        by_env.setdefault(e.env, []).append(e)
    low = {env: eps for env, eps in sorted(by_env.items()) if sum(e.success for e in eps) < floor * len(eps)}
    if not low:
        return
    parts = []
    for env, eps in low.items():
        failed = [e for e in eps if not e.success]
        shown = ", ".join(f"{e.task_id}" + (f" ({e.meta['expert_gave_up']})" if "expert_gave_up" in e.meta else "")
                          for e in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        parts.append(f"{env}: {len(eps) - len(failed)}/{len(eps)} won; failed {shown}{more}")
    raise ExpertBelowFloor(f"the expert wins too few tasks (demos.min_success {floor:.2f}): {'; '.join(parts)}. "
                           "Check the task data (tasks.<env>.official) or lower demos.min_success.")


def write_demos(p: Params, episodes: list[Episode], dev_episodes: list[Episode] | None = None) -> dict[str, Any]:
    """The expert's successful train episodes (the demos) and, if given, its dev episodes (for step accuracy).
    Refuses (nothing written) when the expert wins fewer than ``demos.min_success`` of any env's tasks."""
    check_expert_success(episodes, p.demos.min_success)
    failed = [e.episode_id for e in episodes if not e.success]
    if failed:
        log.warning("expert failed %d episode(s), kept out of the demos: %s", len(failed), failed[:5])
    write_jsonl_atomic(demos_file(p), (e.to_dict() for e in episodes if e.success))
    if dev_episodes is not None:
        write_jsonl_atomic(dev_demos_file(p), (e.to_dict() for e in dev_episodes if e.success))
    metrics = demos_metrics(episodes)
    if dev_episodes is not None:
        metrics["dev_episodes"] = sum(e.success for e in dev_episodes)
    log.info("expert success per env: %s", ", ".join(f"{k} {v:.0%}" for k, v in metrics["success_by_env"].items()))
    write_json_atomic(p.path("metrics", "demos.json"), metrics)
    return metrics
