"""The report's tables over whichever agents a (possibly unfinished) run has evaluated so far.

    python docs/experiments/partial_report.py /path/to/project     (its metrics/eval/*.json; run with its own sad)

Used for docs/results/full_profile_2026-12-07.md while `sad profile full` was still running stage by stage.
"""
import json
import sys
from pathlib import Path

project = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
sys.path.insert(0, str(project))
from sad.report import paired_section, step_accuracy_table, success_table, verdict  # noqa: E402

results = {f.stem: json.loads(f.read_text()) for f in sorted((project / "metrics" / "eval").glob("*.json"))}
print("agents:", list(results))
print(success_table(results, "test", 2000, 0.95))
print()
print(step_accuracy_table(results))
for a, b in [("sad", "token_kd"), ("sad_takeover", "sad"), ("sad_takeover", "token_kd")]:
    if a in results and b in results:
        md, cmp = paired_section(results, a, b, "test", 2000, 0.95)
        print(f"\n{a} vs {b}\n" + md + "\n" + verdict(cmp, a, b, 0.95))
