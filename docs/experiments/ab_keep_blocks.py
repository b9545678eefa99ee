"""A/B: play `sad bench eval`'s 6 capped episodes (2 test tasks per env, 12 steps, 6 in flight) with the
generated blocks kept in the prefix store or not, alternating (ABBAAB) to spread drift; run in a project folder
with models/teacher: `python docs/experiments/ab_keep_blocks.py`."""
import json
import tempfile
import time
from pathlib import Path

from sad.agent import PrefixStore
from sad.bench.evaluation import _capped
from sad.config import load_params
from sad.environments import generate_fresh
from sad.evaluation import load_agent
from sad.rollout import PlayStats, play_agent

p = load_params(Path("params.yaml"))
capped = _capped(p, 12)
agent = load_agent(Path("models/teacher"), p)
out = []
with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    tasks = []
    for env in p.tasks.envs:
        tasks += generate_fresh(capped, env, "test", 2, root)
    play_agent(tasks, root, agent, "warm-up", p.context.max_tokens, 6, evict_to=p.context.evict_to)
    for keep in (True, False, False, True, True, False):
        agent.prefix_store = PrefixStore(64)
        agent.keep_blocks = keep
        agent.prefill_computed = agent.prefill_reused = 0
        stats = PlayStats()
        t = time.perf_counter()
        eps = play_agent(tasks, root, agent, "ab", p.context.max_tokens, 6, stats=stats, evict_to=p.context.evict_to)
        s = time.perf_counter() - t
        row = {"keep_blocks": keep, "seconds": round(s, 2), "steps": sum(e.n_steps for e in eps),
               "generation_s": round(stats.generation_seconds, 2),
               "prefill_per_token": round(agent.prefill_computed / stats.generated_tokens, 3)}
        print(json.dumps(row), flush=True)
        out.append(row)
for k in (True, False):
    r = [o["seconds"] for o in out if o["keep_blocks"] == k]
    print(k, sum(r) / len(r), r)
