"""Stage ``select``: the best student on the gate split becomes the registry candidate."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sad.config import Params
from sad.environments import load_tasks
from sad.io import write_json_atomic
from sad.stages.layout import candidate_file, load_eval_results, read_episodes, student_dir, tasks_root

log = logging.getLogger(__name__)


def _seed_gate_values(p: Params, method: str, result: dict[str, Any]) -> dict[str, float]:
    """{seed: gate metric value} for one method (evaluation, agreement or distillation metrics)."""
    metric, split = p.registration.gate_metric, p.registration.gate_split
    if metric in ("dev_ce", "dev_act_accuracy"):
        path = p.path("metrics", "distill", f"{method}.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage distill --method {method}' first)")
        seeds = json.loads(path.read_text())["seeds"]
        missing = sorted(s for s, v in seeds.items() if metric not in v)
        if missing:
            raise ValueError(f"{path}: seed(s) {', '.join(missing)} have no {metric} (no held-out windows: "
                             "distill.train.dev_fraction too small for these windows); gate on another metric")
        return {s: float(v[metric]) for s, v in seeds.items()}
    if metric in ("cot_match_rate", "action_agreement"):
        if "agreement" not in result:
            raise ValueError(f"register.gate_metric is {metric}, but {method}'s evaluation has no agreement with the "
                             "teacher (the teacher's test episodes were missing when it ran): run evaluate_teacher, "
                             f"then `sad stage evaluate --agent {method}`")
        return {s: float(v[metric]) for s, v in result["agreement"]["seeds"].items()}
    if metric == "step_accuracy":
        if "step_accuracy" not in result:
            raise ValueError("register.gate_metric is step_accuracy, but the evaluation has none (the demos stage "
                             "wrote no data/demos/dev.jsonl): rerun the pipeline from the demos stage")
        return {s: float(v["step_accuracy"]) for s, v in result["step_accuracy"]["seeds"].items()}
    return {s: float(v["splits"][split]["overall"][metric]) for s, v in result["seeds"].items()}


def best_student(p: Params) -> tuple[str, int, float]:
    """(method, seed, gate value): the method with the best mean gate metric over seeds, then its
    best seed (in the metric's direction; ties: first in params order)."""
    from sad.config import GATE_METRICS

    sign = 1.0 if GATE_METRICS[p.registration.gate_metric] else -1.0
    results = load_eval_results(p, list(p.distill.methods))
    values = {m: _seed_gate_values(p, m, results[m]) for m in p.distill.methods}
    method = max(p.distill.methods, key=lambda m: sign * sum(values[m].values()) / len(values[m]))
    seed = max(values[method], key=lambda s: sign * values[method][s])
    return method, int(seed), values[method][seed]


def run_select(p: Params) -> dict[str, Any]:
    """Pick the candidate student for the registry and write its standing (what the gates compare).

    The registry itself is changed by the retrain flow, outside DVC: a cached stage must never
    skip or repeat a registration.
    """
    from sad.modeling import read_card
    from sad.registry import Standing, per_task_values, weights_hash

    method, seed, value = best_student(p)
    split = p.registration.gate_split
    student = load_eval_results(p, [method])[method]["seeds"][str(seed)]["splits"][split]
    teacher = load_eval_results(p, ["teacher"])["teacher"]["splits"][split]["overall"]
    episodes = read_episodes(p.path("data", "eval", method, f"seed{seed}", f"{split}.jsonl"))
    standing = Standing(gate_metric=p.registration.gate_metric, gate_value=value,
                        success_rate=float(student["overall"]["success_rate"]),
                        env_success={env: float(m["success_rate"]) for env, m in student["envs"].items()},
                        teacher_success_rate=float(teacher["success_rate"]),
                        invalid_action_rate=float(student["overall"]["invalid_action_rate"]),
                        per_task=per_task_values(episodes, p.registration.gate_metric),
                        candidates=len(p.distill.methods) * len(p.distill.seeds))
    model_dir = student_dir(p, method, seed)
    card = {**read_card(model_dir), "method": method, "seed": seed, "gate_split": split}
    out = {"method": method, "seed": seed, "model_dir": str(model_dir), "weights_sha256": weights_hash(model_dir),
           "standing": asdict(standing), "card": card}
    write_json_atomic(candidate_file(p), out)
    log.info("candidate: %s seed %d (%s %s = %.4f)", method, seed, split, p.registration.gate_metric, value)
    return {"gate_value": value, "success_rate": standing.success_rate}


def replay_per_task(p: Params, model, tokenizer, task_ids: list[str]) -> dict[str, float]:
    """Play ``model`` (e.g. the registry's champion, whose per-task results were not stored) on the
    gate split's tasks ``task_ids`` with the pipeline's agent settings; {task id: gate metric value}."""
    from sad.agent import LMAgent
    from sad.evaluation import play_model
    from sad.modeling import play_dtype
    from sad.registry import per_task_values

    split, wanted = p.registration.gate_split, set(task_ids)
    tasks = [t for env in p.tasks.envs for t in load_tasks(tasks_root(p), env, split) if t.task_id in wanted]
    missing = sorted(wanted - {t.task_id for t in tasks})
    if missing:
        raise ValueError(f"cannot replay the champion on {len(missing)} {split} tasks that are not in "
                         f"{tasks_root(p)} (e.g. {missing[:3]}): run the tasks stage first")
    model = model.to(play_dtype(p.agent.precision))  # as the candidate's evaluation played
    agent = LMAgent(model, tokenizer, p.context.max_new_tokens, temperature=p.rollout.temperature, seed=p.rollout.seed)
    episodes, _ = play_model(Path("."), p, tasks_root(p), tasks, "champion", p.evaluate.batch_size, agent=agent)
    return per_task_values(episodes, p.registration.gate_metric)
