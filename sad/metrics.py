"""Episode metrics: success, steps, reasoning length, invalid actions, latency; CoT match and
action agreement against the teacher."""

from __future__ import annotations

import re
from collections import defaultdict
from statistics import mean
from typing import Any

from rapidfuzz.distance import LCSseq

from sad.react import Episode

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenisation: lower-case, runs of [a-z0-9]."""
    return _ROUGE_TOKEN.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of two texts: the longest common subsequence of their words (0 if either is empty)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = LCSseq.similarity(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def normalize_action(action: str) -> str:
    """Actions compare case- and whitespace-insensitively."""
    return " ".join(action.lower().split())


def cot_match(prediction: str, reference: str, threshold: float) -> bool:
    """CoT match: ROUGE-L F1 of the student's thought against the teacher's is at least ``threshold``."""
    return rouge_l(prediction, reference) >= threshold


def action_agrees(prediction: str, reference: str) -> bool:
    """Action agreement: the same non-empty action after :func:`normalize_action` (no action parsed
    never agrees, not even with a teacher that parsed none)."""
    p = normalize_action(prediction)
    return bool(p) and p == normalize_action(reference)


def _safe_mean(values: list[float]) -> float:
    return float(mean(values)) if values else 0.0


def summarize(episodes: list[Episode], tokenizer) -> dict[str, float]:
    """Aggregate metrics over episodes.

    * ``success_rate`` - share of episodes won within the step cap;
    * ``avg_steps`` - actions per episode;
    * ``avg_reasoning_tokens`` - thought tokens per episode; ``avg_thought_tokens`` per thought;
    * ``invalid_action_rate`` - share of actions the environment rejected (or none was parsed);
    * ``latency_per_step_s`` - mean wall time from a step's context joining the decode batch to its block's
      end (what one agent step waits for at the batch size used; continuous batching, :meth:`LMAgent.stream`);
    * ``avg_reward`` - the benchmark's own score (ALFWorld: won; HotPotQA: exact match;
      WebShop: its reward in [0, 1]); ``f1`` - HotPotQA's answer F1, where episodes report it;
    * ``redrawn_step_rate`` - share of steps the loop guard sampled again, where it was on;
    * ``repaired_step_rate`` - share of steps whose generated action was not a listed valid one and was
      replaced (``agent.action_choice: repair``): the invalid-action rate free choice would have had there;
    * ``stuck_stop_rate`` - share of episodes ended early after failed steps in a row, where that stop was on.
    """
    thoughts = [len(tokenizer.encode(s.thought, add_special_tokens=False)) if s.thought else 0 for ep in episodes for s in ep.steps]
    per_episode = []
    i = 0
    for ep in episodes:
        per_episode.append(sum(thoughts[i:i + ep.n_steps]))
        i += ep.n_steps
    steps = [s for ep in episodes for s in ep.steps]
    latency = [s.latency_s for s in steps if s.latency_s > 0]
    f1s = [float(ep.meta["f1"]) for ep in episodes if "f1" in ep.meta]
    summary = {
        "episodes": float(len(episodes)),
        "success_rate": _safe_mean([1.0 if ep.success else 0.0 for ep in episodes]),
        "avg_steps": _safe_mean([float(ep.n_steps) for ep in episodes]),
        "avg_reasoning_tokens": _safe_mean([float(x) for x in per_episode]),
        "avg_thought_tokens": _safe_mean([float(x) for x in thoughts]),
        "invalid_action_rate": _safe_mean([0.0 if s.valid else 1.0 for s in steps]),
        "latency_per_step_s": _safe_mean(latency),
        "avg_reward": _safe_mean([float(ep.reward) for ep in episodes]),
    }
    if f1s:
        summary["f1"] = _safe_mean(f1s)
    if any("redrawn_steps" in ep.meta for ep in episodes):  # the loop guard was on
        summary["redrawn_step_rate"] = sum(ep.meta.get("redrawn_steps", 0) for ep in episodes) / max(len(steps), 1)
    if any("repaired_steps" in ep.meta for ep in episodes):  # agent.action_choice: repair
        summary["repaired_step_rate"] = sum(ep.meta.get("repaired_steps", 0) for ep in episodes) / max(len(steps), 1)
    if any("stopped_stuck" in ep.meta for ep in episodes):  # agent.stop_after_failures was on
        summary["stuck_stop_rate"] = _safe_mean([1.0 if ep.meta.get("stopped_stuck") else 0.0 for ep in episodes])
    return summary


def success_by(episodes: list[Episode], key: str = "task_type") -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for ep in episodes:
        groups[str(getattr(ep, key))].append(1.0 if ep.success else 0.0)
    return {k: _safe_mean(v) for k, v in sorted(groups.items())}


def action_arguments(env: str, action: str) -> list[str]:
    """What an action copies from the agent's context: the bracketed argument (``search[T]``,
    ``click[B0…]``, ``lookup[kw]``, ``finish[answer]``; a WebShop search's words one by one; a yes/no
    answer copies nothing) or an ALFWorld command's object and receptacle names (``mug 1``)."""
    m = re.match(r"\s*(\w+)\[(.*)\]\s*$", action)
    if m:
        verb, arg = m.group(1).lower(), m.group(2).strip()
        if verb == "finish" and arg.lower() in ("yes", "no"):
            return []
        return arg.split() if (env == "webshop" and verb == "search") else [arg]
    return re.findall(r"[a-z]+ \d+", action.lower())


def hidden_arguments(episodes, tokenizer, budget: int, history_steps: int = 0) -> list[dict[str, Any]]:
    """The imitated expert steps whose action copies something absent from the agent's play-time context
    (the prompt and the latest steps as :func:`sad.agent.fit_context` keeps them): demos an agent cannot
    imitate from what it sees. Each row names the episode, step, action and the missing arguments."""
    from sad.agent import forced_items

    rows = []
    for item in forced_items(tokenizer, episodes, budget, history_steps, imitated_only=True):
        seen = tokenizer.decode(item["context"]).lower()
        missing = [a for a in action_arguments(item["env"], item["action"]) if a.lower() not in seen]
        if missing:
            rows.append({"episode_id": item["episode_id"], "step": item["step"], "action": item["action"],
                         "missing": missing})
    return rows
