"""Offline: what `agent.stop_after_failures` = k would have cut from stored episodes (played with a larger k or none):
per agent kind and k, the steps after the first point where k steps in a row brought nothing new
(`sad.rollout.trailing_unproductive`), and the wins among the episodes cut. Run from anywhere with the repository on
PYTHONPATH: `python docs/experiments/stuck_steps.py <pipeline folder> [...]` (reads data/eval/**/{dev,test}.jsonl)."""
import collections
import json
import sys
from pathlib import Path

from sad.react import Step
from sad.rollout import trailing_unproductive

fields = Step.__dataclass_fields__
totals: dict[tuple[str, int], collections.Counter] = collections.defaultdict(collections.Counter)
for folder in map(Path, sys.argv[1:]):
    for path in sorted((folder / "data" / "eval").rglob("*.jsonl")):
        if path.stem not in ("dev", "test"):
            continue
        kind = "teacher" if path.parts[-2] == "teacher" else "students"
        for line in path.read_text().splitlines():
            episode = json.loads(line)
            steps = [Step(**{k: v for k, v in s.items() if k in fields}) for s in episode["steps"]]
            for k in (4, 5, 6, 7, 8, 10):
                cut = next((i for i in range(1, len(steps) + 1) if trailing_unproductive(steps[:i]) >= k), None)
                row = totals[(kind, k)]
                row["episodes"] += 1
                row["steps"] += len(steps)
                row["wins"] += int(episode["success"])
                if cut is not None and cut < len(steps):
                    row["steps_cut"] += len(steps) - cut
                    row["wins_lost"] += int(episode["success"])
for (kind, k), row in sorted(totals.items()):
    print(json.dumps({"agents": kind, "stop_after_failures": k, **row}))
