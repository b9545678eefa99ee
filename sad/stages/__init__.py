"""Each pipeline stage as a function of the validated params: read inputs, compute, write outputs.

One module per stage family (``sad/stages/<stage>.py``) and one for the data layout (``layout.py``).
Outputs are written atomically (temp path, then rename), so a killed stage leaves nothing
half-written. These functions know nothing of Prefect or DVC; ``flows/`` calls them. Each stage's
code dependencies in dvc.yaml are computed from what its module imports (:mod:`sad.stagegraph`).
"""

from __future__ import annotations

from sad.modeling import read_pretrained_arch
from sad.stages.demos import ExpertBelowFloor, check_expert_success, demos_metrics, write_demos
from sad.stages.distill import _train_student, distill_inputs, load_student_init, run_distill
from sad.stages.evaluate import _agreement, _step_accuracy, aggregate_seeds, mean_step_accuracy, run_evaluate

# Re-exports: `from sad.stages import run_distill` keeps working.
# ruff: noqa: F401
from sad.stages.layout import (
    STUDENT_AGENTS_DIR,
    candidate_file,
    checkpoint_dir,
    dagger_dir,
    demos_file,
    dev_demos_file,
    eval_metrics_file,
    file_hash,
    fingerprint,
    is_main_process,
    load_eval_results,
    load_scaling_results,
    mean_over_seeds,
    pretrained_dir,
    read_episodes,
    rollouts_file,
    scaling_dir,
    segments_dir,
    student_dir,
    student_init_dir,
    tasks_root,
    teacher_dir,
    teacher_logits_dir,
    tokenizer_dir,
)
from sad.stages.pretrained import run_pretrained
from sad.stages.report import run_report
from sad.stages.rollout import run_rollout
from sad.stages.scale import run_scale
from sad.stages.segment import run_segment
from sad.stages.select import _seed_gate_values, best_student, replay_per_task, run_select
from sad.stages.student_init import INFLUENCE_WINDOWS, heal, resolve_student_layers, run_student_init
from sad.stages.tasks import run_tasks
from sad.stages.teacher import (
    dagger_files,
    dagger_rounds,
    dagger_summary,
    dagger_tasks,
    run_teacher,
    use_teacher_as_is,
)
from sad.stages.teacher_logits import run_teacher_logits
from sad.stages.tokenizer import run_tokenizer

