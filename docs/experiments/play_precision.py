"""The teacher on the default's test tasks (60: 20 per env) in fp32 and in bf16, with attention over the whole
static KV cache or only its written part (sliced, the default since 3f44569): success, steps and time, paired by
task. Run in a project folder whose pipeline has run up to the teacher stage, alone, e.g.
`python docs/experiments/play_precision.py fp32 bf16 bf16-cast-nosl` (each label: its dtype as agent.precision
loads it, "-cast" = bf16 by casting the loaded fp32 model instead, "-nosl" = attention over the whole cache); each
run writes play_<label>.json next to it and prints one line. `SAD_PLAY_MODEL=models/students/sad_takeover/seed0`
plays that model instead of the teacher (the agent name in the episodes stays "teacher")."""
import json
import os
import sys
import time
from pathlib import Path

import torch

from sad.config import load_params
from sad.environments import load_tasks
from sad.evaluation import load_agent, play_model
from sad.stages.layout import tasks_root, teacher_dir

p = load_params("params.yaml")
root = tasks_root(p)
tasks = [t for env in p.tasks.envs for t in load_tasks(root, env, "test")]
runs = {}
for label in sys.argv[1:]:
    cast = "-cast" in label  # bf16 by casting the fp32 model with .to(): RoPE's inverse frequencies are rounded too
    precision = "bf16" if label.startswith("bf16") and not cast else "fp32"
    model_dir = Path(os.environ.get("SAD_PLAY_MODEL") or teacher_dir(p))
    agent = load_agent(model_dir, p.model_copy(update={"agent": p.agent.model_copy(update={"precision": precision})}))
    agent.sliced_attention = "-nosl" not in label
    if cast:
        agent.model.to(torch.bfloat16)
    started = time.perf_counter()
    episodes, stats = play_model(model_dir, p, root, tasks, "teacher", p.evaluate.batch_size, agent=agent)
    run = {"seconds": round(time.perf_counter() - started, 1), "generation_s": round(stats.generation_seconds, 1),
           "generated_tokens": stats.generated_tokens, "wins": sum(e.success for e in episodes),
           "by_env": {env: sum(e.success for e in episodes if e.env == env) for env in p.tasks.envs},
           "success": [int(e.success) for e in episodes], "steps": [e.n_steps for e in episodes]}
    runs[label] = run
    Path(f"play_{label}.json").write_text(json.dumps(run))
    print(label, json.dumps({k: v for k, v in run.items() if k not in ("success", "steps")}), flush=True)
labels = list(runs)
for a, b in zip(labels, labels[1:]):
    sa, sb = runs[a]["success"], runs[b]["success"]
    print(f"{a} vs {b}: won only by {a} {sum(x > y for x, y in zip(sa, sb))}, only by {b} "
          f"{sum(y > x for x, y in zip(sa, sb))}; same episode lengths {sum(x == y for x, y in zip(runs[a]['steps'], runs[b]['steps']))}"
          f"/{len(sa)}; time {runs[a]['seconds'] / runs[b]['seconds']:.2f}x")
