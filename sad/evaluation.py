"""Evaluate an agent (teacher or student) on held-out tasks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sad.agent import LMAgent
from sad.benchmarks import load_tasks
from sad.config import Params
from sad.metrics import success_by, summarize
from sad.modeling import count_parameters, load_model, read_card
from sad.react import Episode
from sad.rollout import PlayStats, play_agent
from sad.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def load_agent(model_dir: Path, params: Params, temperature: float | None = None) -> LMAgent:
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    temp = params.rollout.temperature if temperature is None else temperature
    return LMAgent(model, tokenizer, params.context.max_new_tokens, temperature=temp, seed=params.rollout.seed)


def evaluate_agent(
    model_dir: Path, agent_name: str, params: Params, tasks_root: Path, progress: bool = True
) -> tuple[dict[str, Any], dict[str, list[Episode]]]:
    """Play every environment's dev/test tasks; returns (metrics, episodes per split)."""
    agent = load_agent(model_dir, params)
    card = read_card(model_dir)
    results: dict[str, Any] = {
        "agent": agent_name,
        "method": card.get("method", agent_name),
        "parameters": count_parameters(agent.model),
        "splits": {},
    }
    episodes_by_split: dict[str, list[Episode]] = {}
    for split in params.evaluate.splits:
        tasks = [t for env in params.tasks.envs for t in load_tasks(tasks_root, env, split)]
        stats = PlayStats()
        episodes = play_agent(tasks, tasks_root, agent, agent_name, params.context.max_tokens,
                              params.evaluate.batch_size, progress=progress, stats=stats,
                              history_steps=params.context.history_steps)
        episodes_by_split[split] = episodes
        overall = summarize(episodes, agent.tokenizer)
        overall["generated_tokens_per_s"] = stats.tokens_per_second
        results["splits"][split] = {
            "overall": overall,
            "envs": {env: summarize([e for e in episodes if e.env == env], agent.tokenizer) for env in params.tasks.envs},
            "by_task_type": success_by(episodes, "task_type"),
        }
        log.info("%s on %s: success %.3f over %d episodes", agent_name, split, overall["success_rate"], len(episodes))
    return results, episodes_by_split
