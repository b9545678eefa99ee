"""`agent.stop_after_failures` at two values, back to back on the same models and tasks: wall time, steps and wins
of the dev and test splits as the evaluate stage plays them (one call per split, `evaluate.batch_size` in flight).
Run alone in a project folder whose default pipeline has run:
`python docs/experiments/stop_after.py 10 6 models/teacher models/students/sad/seed0`; one JSON line per model and
value, then the paired counts (tasks won only at one value)."""
import json
import sys
import time
from pathlib import Path

from sad.config import load_params
from sad.environments import load_tasks
from sad.evaluation import load_agent, play_model
from sad.stages.layout import tasks_root

first, second, models = int(sys.argv[1]), int(sys.argv[2]), [Path(m) for m in sys.argv[3:]]
base = load_params("params.yaml")
root = tasks_root(base)
splits = {split: [t for env in base.tasks.envs for t in load_tasks(root, env, split)] for split in ("dev", "test")}
for model_dir in models:
    won: dict[int, dict[str, bool]] = {}
    for k in (first, second):
        p = base.model_copy(update={"agent": base.agent.model_copy(update={"stop_after_failures": k})})
        agent = load_agent(model_dir, p)
        row = {"model": str(model_dir), "stop_after_failures": k, "seconds": 0.0, "steps": 0, "wins": {}}
        won[k] = {}
        for split, tasks in splits.items():
            started = time.perf_counter()
            episodes, _ = play_model(model_dir, p, root, tasks, "teacher", p.evaluate.batch_size, agent=agent)
            row["seconds"] += time.perf_counter() - started
            row["steps"] += sum(e.n_steps for e in episodes)
            row["wins"][split] = sum(e.success for e in episodes)
            won[k].update({f"{split}:{e.task_id}": e.success for e in episodes})
        row["seconds"] = round(row["seconds"], 1)
        print(json.dumps(row), flush=True)
    print(json.dumps({"model": str(model_dir), f"won_only_at_{first}": sum(won[first][t] and not won[second][t] for t in won[first]),
                      f"won_only_at_{second}": sum(won[second][t] and not won[first][t] for t in won[first])}), flush=True)
