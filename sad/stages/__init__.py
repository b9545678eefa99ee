"""Each pipeline stage as a function of the validated params: read inputs, compute, write outputs.

One module per stage family (``sad/stages/<stage>.py``) and one for the data layout (``layout.py``).
Outputs are written atomically (temp path, then rename), so a killed stage leaves nothing
half-written. These functions know nothing of Prefect or DVC; ``flows/`` calls them. Each stage's
code dependencies in dvc.yaml are computed from what its module imports (:mod:`sad.stagegraph`).
"""

from __future__ import annotations

# Re-exports: `from sad.stages import run_distill` keeps working.
# ruff: noqa: F401
from sad.stages.layout import (
    STUDENT_AGENTS_DIR, tasks_root, demos_file, tokenizer_dir, pretrained_dir, teacher_dir, rollouts_file,
    segments_dir, teacher_logits_dir, checkpoint_dir, fingerprint, is_main_process, student_dir, scaling_dir,
    eval_metrics_file, read_episodes, file_hash, dev_demos_file, dagger_dir, candidate_file, mean_over_seeds,
    load_eval_results, load_scaling_results)
from sad.modeling import read_pretrained_arch
from sad.stages.tasks import run_tasks
from sad.stages.demos import demos_metrics, ExpertBelowFloor, check_expert_success, write_demos
from sad.stages.pretrained import run_pretrained
from sad.stages.tokenizer import run_tokenizer
from sad.stages.teacher import (
    run_teacher, dagger_tasks, _save_phase, _load_phase, dagger_rounds, keep_dagger_episodes, dagger_summary,
    use_teacher_as_is)
from sad.stages.rollout import run_rollout
from sad.stages.segment import run_segment
from sad.stages.teacher_logits import run_teacher_logits
from sad.stages.distill import (
    INFLUENCE_WINDOWS, _train_student, distill_inputs, resolve_student_layers, run_distill)
from sad.stages.evaluate import (
    _agreement, _step_accuracy, _mean_step_accuracy, aggregate_seeds, run_evaluate)
from sad.stages.scale import run_scale
from sad.stages.select import _seed_gate_values, best_student, run_select, replay_per_task
from sad.stages.report import run_report

