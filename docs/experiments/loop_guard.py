"""The teacher on the default's test tasks with the loop guard on (`agent.redraws` N at `redraw_temperature` T),
paired by task against the episodes its `evaluate_teacher` stage stored (the params' own redraws, 0 by default).
Run alone in a project folder whose default pipeline has run: `python docs/experiments/loop_guard.py 3 0.7`;
prints one JSON line and writes loop_guard_<N>_<T>.json next to it."""
import json
import sys
import time
from pathlib import Path

from sad.config import load_params
from sad.environments import load_tasks
from sad.evaluation import load_agent, play_model
from sad.stages.layout import tasks_root, teacher_dir

draws, temperature = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.7
p = load_params("params.yaml")
p = p.model_copy(update={"agent": p.agent.model_copy(update={"redraws": draws, "redraw_temperature": temperature})})
root = tasks_root(p)
tasks = [t for env in p.tasks.envs for t in load_tasks(root, env, "test")]
started = time.perf_counter()
episodes, _ = play_model(teacher_dir(p), p, root, tasks, "teacher", p.evaluate.batch_size, agent=load_agent(teacher_dir(p), p))
stored = {e["task_id"]: e["success"] for e in map(json.loads, Path("data/eval/teacher/test.jsonl").read_text().splitlines())}
guarded = {e.task_id: e.success for e in episodes}
out = {"redraws": draws, "temperature": temperature, "seconds": round(time.perf_counter() - started, 1),
       "wins": sum(guarded.values()), "stored_wins": sum(stored.values()),
       "by_env": {env: sum(v for k, v in guarded.items() if k.startswith(env)) for env in p.tasks.envs},
       "stored_by_env": {env: sum(v for k, v in stored.items() if k.startswith(env)) for env in p.tasks.envs},
       "won_only_guarded": sorted(k for k in guarded if guarded[k] and not stored[k]),
       "won_only_stored": sorted(k for k in guarded if stored[k] and not guarded[k]),
       "steps": sum(e.n_steps for e in episodes)}
Path(f"loop_guard_{draws}_{temperature}.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out))
