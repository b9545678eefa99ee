#!/bin/bash
# One method per seed in copies of one project folder (issue #18), then merge them for one report.
# Each copy holds the same teacher, rollouts, top-k cache and tasks; copy S has `distill.seeds: [S]`
# in params_sS.yaml (seed 0: the folder's own params.yaml). Methods must be in each params file's
# distill.methods. Usage:
#   docs/experiments/seed_runs.sh "sad_reason_only sad_act_only sad_no_curriculum" /tmp/tk /tmp/tk1 /tmp/tk2
#   python docs/experiments/merge_seeds.py --into /tmp/combo /tmp/tk /tmp/tk1 /tmp/tk2 --methods ...
# (/tmp/combo: `cp -al /tmp/tk /tmp/combo` first; then `sad stage report` in /tmp/combo.)
# The library is the `sad` on PATH; the measured runs used each folder's own (PYTHONPATH=<folder>).
set -u
methods=$1; shift
export PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
for m in $methods; do
  s=0
  for d in "$@"; do
    pf=params_s$s.yaml; [ "$s" = 0 ] && pf=params.yaml
    (cd "$d" && export PREFECT_HOME=$d/.prefect &&
      t=$(date +%s) && sad stage distill --method "$m" --params "$pf" && echo "=== $m seed$s distill $(( $(date +%s) - t )) s" &&
      t=$(date +%s) && sad stage evaluate --agent "$m" --params "$pf" && echo "=== $m seed$s evaluate $(( $(date +%s) - t )) s")
    s=$((s + 1))
  done
done
echo "=== all done $(date)"
