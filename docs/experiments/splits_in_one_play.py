"""The dev and test splits played one after the other (as the evaluate stage did before 2026-12-06) against in one
play (as it does since): wall time, steps and wins, back to back, twice each, alternating, on the same model and tasks.
Run alone in a project folder whose default pipeline has run:
`python docs/experiments/splits_in_one_play.py models/teacher models/students/sad/seed0`; one JSON line per run."""
import json
import sys
import time
from pathlib import Path

from sad.config import load_params
from sad.environments import load_tasks
from sad.evaluation import load_agent, play_model
from sad.stages.layout import tasks_root

p = load_params("params.yaml")
root = tasks_root(p)
splits = {split: [t for env in p.tasks.envs for t in load_tasks(root, env, split)] for split in p.evaluate.splits}
for model_dir in map(Path, sys.argv[1:]):
    agent = load_agent(model_dir, p)
    for schedule in ("one_after_the_other", "one_play", "one_after_the_other", "one_play"):
        started = time.perf_counter()
        plays = [[t for ts in splits.values() for t in ts]] if schedule == "one_play" else list(splits.values())
        episodes = [e for tasks in plays for e in play_model(model_dir, p, root, tasks, "agent", p.evaluate.batch_size, agent=agent)[0]]
        print(json.dumps({"model": str(model_dir), "schedule": schedule, "seconds": round(time.perf_counter() - started, 1),
                          "steps": sum(e.n_steps for e in episodes), "wins": sum(e.success for e in episodes)}), flush=True)
