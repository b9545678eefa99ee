"""Evaluate an agent (teacher or student) on held-out tasks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sad.agent import LMAgent, forced_items
from sad.config import Params
from sad.environments import load_tasks
from sad.envs.base import Task
from sad.metrics import success_by, summarize
from sad.modeling import count_parameters, load_model, play_dtype, read_card
from sad.react import Episode
from sad.rollout import Player, PlayStats, play_agent
from sad.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def load_agent(model_dir: Path, params: Params, temperature: float | None = None) -> LMAgent:
    model = load_model(model_dir, dtype=play_dtype(params.agent.precision))
    tokenizer = load_tokenizer(model_dir)
    temp = params.rollout.temperature if temperature is None else temperature
    return LMAgent(model, tokenizer, params.context.max_new_tokens, temperature=temp, seed=params.rollout.seed)


def play_model(model_dir: Path, params: Params, tasks_root: Path, tasks: list[Task], agent_name: str,
               batch_size: int, progress: bool = False, agent: LMAgent | None = None) -> tuple[list[Episode], PlayStats]:
    """Load the agent of ``model_dir`` (unless given) and play ``tasks``: one shard of a stage's episodes."""
    agent = agent or load_agent(model_dir, params)
    stats = PlayStats()
    episodes = play_agent(tasks, tasks_root, agent, agent_name, params.context.max_tokens, batch_size,
                          progress=progress, stats=stats, history_steps=params.context.history_steps,
                          action_choice=params.agent.action_choice, redraws=params.agent.redraws,
                          redraw_temperature=params.agent.redraw_temperature,
                          stop_after_failures=params.agent.stop_after_failures,
                          evict_to=params.context.evict_to)
    return episodes, stats


def evaluate_agent(
    model_dir: Path, agent_name: str, params: Params, tasks_root: Path, progress: bool = True,
    agent: LMAgent | None = None, player: Player | None = None,
) -> tuple[dict[str, Any], dict[str, list[Episode]]]:
    """Play every environment's dev/test tasks; returns (metrics, episodes per split).

    Per split: ``overall`` and per-``envs`` summaries, success ``by_task_type``, and
    ``per_task`` success (1.0/0.0 per env, in task order) for confidence intervals.
    """
    agent = agent or load_agent(model_dir, params)
    card = read_card(model_dir)
    results: dict[str, Any] = {
        "agent": agent_name,
        "method": card.get("method", agent_name),
        "parameters": count_parameters(agent.model),
        "dtype": str(next(agent.model.parameters()).dtype).removeprefix("torch."),
        "splits": {},
    }
    splits = list(params.evaluate.splits)
    split_tasks = {split: [t for env in params.tasks.envs for t in load_tasks(tasks_root, env, split)] for split in splits}
    tasks = [t for split in splits for t in split_tasks[split]]
    # every split in one play queue: continuous batching keeps the slots full across the split boundary, so
    # the smaller split does not play alone at a fraction of the batch while its longest episode ends
    if player is not None:
        played, stats = player(tasks, agent_name)
    else:
        played, stats = play_model(model_dir, params, tasks_root, tasks, agent_name, params.evaluate.batch_size,
                                   progress=progress, agent=agent)
    if [e.task_id for e in played] != [t.task_id for t in tasks]:
        raise RuntimeError(f"{agent_name}: the player returned {len(played)} episodes for {len(tasks)} tasks, or out of "
                           "task order")
    episodes_by_split: dict[str, list[Episode]] = {}
    for split in splits:  # the queue holds each split's tasks in turn, in task order
        episodes_by_split[split], played = played[:len(split_tasks[split])], played[len(split_tasks[split]):]
    for split, episodes in episodes_by_split.items():
        overall = summarize(episodes, agent.tokenizer)
        overall["generated_tokens_per_s"] = stats.tokens_per_second  # of the whole queue (dev and test together)
        if stats.prefill_computed:  # of the same queue (a player that counts no prefill reports none)
            overall["prefill_tokens_per_generated_token"] = stats.prefill_tokens_per_generated_token
            overall["prefill_tokens_cut"] = stats.prefill_tokens_cut
        results["splits"][split] = {
            "overall": overall,
            "envs": {env: summarize([e for e in episodes if e.env == env], agent.tokenizer) for env in params.tasks.envs},
            "by_task_type": success_by(episodes, "task_type"),
            "per_task": {env: [1.0 if e.success else 0.0 for e in episodes if e.env == env] for env in params.tasks.envs},
        }
        log.info("%s on %s: success %.3f over %d episodes", agent_name, split, overall["success_rate"], len(episodes))
    return results, episodes_by_split


def _sample(items: list[dict], max_items: int, seed: int) -> list[dict]:
    import random

    if max_items and len(items) > max_items:
        keep = sorted(random.Random(seed).sample(range(len(items)), max_items))
        return [items[i] for i in keep]
    return items


def _generate_blocks(agent: LMAgent, items: list[dict], batch_size: int, progress: bool, desc: str):
    """(item, parsed generation) for every item, in order; up to ``batch_size`` rows decode together and
    each row takes the next item as soon as its block ends (:meth:`LMAgent.stream`)."""
    from tqdm.auto import tqdm

    from sad.react import ParsedOutput, parse_output

    parsed: dict[int, ParsedOutput] = {}
    upcoming = iter(range(batch_size, len(items)))
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="step")

    def on_block(index: int, generation) -> list[tuple[int, list[int]]]:
        parsed[index] = parse_output(generation.text)
        bar.update(1)
        following = next(upcoming, None)
        return [] if following is None else [(following, items[following]["context"])]

    agent.stream([(i, items[i]["context"]) for i in range(min(batch_size, len(items)))], on_block)
    bar.close()
    return [(item, parsed[i]) for i, item in enumerate(items)]


def teacher_forced_agreement(
    agent: LMAgent,
    teacher_episodes: list[Episode],
    max_tokens: int,
    history_steps: int,
    threshold: float,
    batch_size: int,
    max_items: int = 0,
    seed: int = 0,
    progress: bool = False,
    evict_to: float = 1.0,
) -> dict[str, Any]:
    """CoT match and action agreement, teacher-forced on the teacher's trajectories.

    At every step of the teacher's episodes the agent sees exactly the context it would see at
    play time (prompt + latest ``history_steps`` teacher steps) and generates one block:

    * CoT match - the share of steps whose thought has ROUGE-L F1 >= ``threshold`` against the
      teacher's thought at that step;
    * action agreement - the share of steps whose action equals the teacher's (case and
      whitespace aside).

    ``max_items`` > 0 evaluates a seeded sample of that many steps (the same steps for every
    agent). Returns the rates overall and per env, and the per-step outcomes.
    """
    from sad.metrics import action_agrees, cot_match

    items = _sample(forced_items(agent.tokenizer, teacher_episodes, max_tokens - agent.max_new_tokens, history_steps,
                                 evict_to=evict_to), max_items, seed)
    outcomes = [{"env": item["env"], "task_id": item["task_id"], "step": item["step"],
                 "cot_match": cot_match(parsed.thought, item["thought"], threshold),
                 "action_agrees": action_agrees(parsed.action, item["action"])}
                for item, parsed in _generate_blocks(agent, items, batch_size, progress, "teacher-forced")]

    def rates(rows: list[dict]) -> dict[str, float]:
        n = max(len(rows), 1)
        return {"cot_match_rate": sum(r["cot_match"] for r in rows) / n,
                "action_agreement": sum(r["action_agrees"] for r in rows) / n, "steps": float(len(rows))}

    envs = sorted({o["env"] for o in outcomes})
    return {**rates(outcomes), "threshold": threshold,
            "envs": {env: rates([o for o in outcomes if o["env"] == env]) for env in envs}, "outcomes": outcomes}


def action_kind(action: str) -> str:
    """The verb of an action: ``search``/``lookup``/``finish``/``click`` (bracketed actions) or the
    first word of an ALFWorld command (``go``, ``take``, ``open``, ...)."""
    import re

    m = re.match(r"\s*([A-Za-z]+)", action)
    return m.group(1).lower() if m else "-"


def step_accuracy(
    agent: LMAgent,
    expert_episodes: list[Episode],
    max_tokens: int,
    history_steps: int,
    batch_size: int,
    max_items: int = 0,
    seed: int = 0,
    progress: bool = False,
    evict_to: float = 1.0,
) -> dict[str, Any]:
    """Step accuracy on held-out expert states: the share of the expert's steps where the agent, given
    exactly its play-time context (the prompt and the expert's earlier steps, fitted as at play), freely
    generates a parseable thought+action whose action equals the expert's (case and spaces aside).

    Unlike token accuracy after the expert's own thought, nothing of the expert's step is shown: the agent
    must decide. Returns the rate overall, per env and per action kind (the expert action's verb), the
    share of steps with a parseable action, and the per-step outcomes.
    """
    from sad.metrics import action_agrees

    items = _sample(forced_items(agent.tokenizer, expert_episodes, max_tokens - agent.max_new_tokens, history_steps,
                                 imitated_only=True, evict_to=evict_to), max_items, seed)
    outcomes = [{"env": item["env"], "task_id": item["task_id"], "step": item["step"], "kind": action_kind(item["action"]),
                 "expert_action": item["action"], "action": parsed.action, "parsed": parsed.has_action,
                 "correct": parsed.has_action and action_agrees(parsed.action, item["action"])}
                for item, parsed in _generate_blocks(agent, items, batch_size, progress, "step accuracy")]

    def rates(rows: list[dict]) -> dict[str, Any]:
        n = max(len(rows), 1)
        return {"step_accuracy": sum(r["correct"] for r in rows) / n, "parsed_rate": sum(r["parsed"] for r in rows) / n,
                "steps": len(rows)}

    envs = sorted({o["env"] for o in outcomes})
    per_env = {}
    for env in envs:
        rows = [o for o in outcomes if o["env"] == env]
        kinds = sorted({o["kind"] for o in rows})
        per_env[env] = {**rates(rows), "by_kind": {k: rates([o for o in rows if o["kind"] == k]) for k in kinds}}
    return {**rates(outcomes), "envs": per_env, "outcomes": outcomes}
