"""Evaluation throughput: episodes/s with many episodes batched on the KV cache against one at a time.

Both runs play the same freshly generated tasks (every environment, a short step cap so the
one-at-a-time run stays short) with the same model, greedy, in one process.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from sad.config import Params


def _capped(p: Params, max_steps: int) -> Params:
    t = p.tasks
    tasks = t.model_copy(update={
        "alfworld": t.alfworld.model_copy(update={"max_steps": max_steps}),
        "hotpotqa": t.hotpotqa.model_copy(update={"max_steps": max_steps}),
        "webshop": t.webshop.model_copy(update={"max_steps": max_steps}),
    })
    return p.model_copy(update={"tasks": tasks})


def benchmark_evaluation(p: Params, model_dir: Path | None, per_env: int = 8, batch_size: int = 16,
                         max_steps: int = 5) -> dict[str, Any]:
    """Play ``per_env`` test tasks per environment with ``batch_size`` episodes in flight, then one at a time."""
    from sad.agent import LMAgent
    from sad.benchmarks import generate_fresh
    from sad.evaluation import load_agent
    from sad.rollout import PlayStats, play_agent

    capped = _capped(p, max_steps)
    if model_dir is not None and (model_dir / "config.json").is_file():
        agent = load_agent(model_dir, p)
        model = f"{model_dir} (trained)"
    else:
        from sad.modeling import build_llama
        from sad.tokenizer import train_bpe

        tokenizer = train_bpe(["Thought: look around.\nAction: look\nObservation: nothing.\n"] * 20,
                              p.tokenizer.vocab_size, 1)
        agent = LMAgent(build_llama(p.teacher.arch, tokenizer, p.context.max_tokens), tokenizer, p.context.max_new_tokens)
        model = "untrained model of the teacher's size (no models/teacher)"
    out: dict[str, Any] = {"model": model, "episodes": per_env * len(p.tasks.envs), "max_steps": max_steps,
                           "max_new_tokens": p.context.max_new_tokens, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="sad-evalbench-") as tmp:
        root = Path(tmp)
        tasks = []
        for env in p.tasks.envs:  # each env writes under root/<env>/, as the tasks stage does
            tasks += generate_fresh(capped, env, "test", per_env, root)
        for label, size in (("batched", batch_size), ("one_at_a_time", 1)):
            stats = PlayStats()
            started = time.perf_counter()
            episodes = play_agent(tasks, root, agent, "bench", p.context.max_tokens, size, stats=stats,
                                  history_steps=p.context.history_steps)
            seconds = time.perf_counter() - started
            steps = sum(e.n_steps for e in episodes)
            out["runs"][label] = {"batch_size": size, "seconds": seconds, "episodes_per_s": len(episodes) / seconds,
                                  "steps": steps, "steps_per_s": steps / seconds,
                                  "generated_tokens_per_s": stats.tokens_per_second}
    b, one = out["runs"]["batched"], out["runs"]["one_at_a_time"]
    out["speedup_episodes_per_s"] = b["episodes_per_s"] / one["episodes_per_s"]
    out["same_steps"] = b["steps"] == one["steps"]
    return out
