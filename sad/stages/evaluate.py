"""Stage ``evaluate@<agent>`` (and ``evaluate_teacher``): agents play held-out tasks; success, CoT
match, step accuracy, reasoning length, steps and latency per environment, with CIs over seeds.
"""

from __future__ import annotations

import logging
from typing import Any

from sad.config import Params
from sad.io import atomic_dir, write_json_atomic, write_jsonl_atomic
from sad.stages.layout import (
    dev_demos_file,
    eval_metrics_file,
    mean_over_seeds,
    read_episodes,
    student_dir,
    tasks_root,
    teacher_dir,
)
from sad.stages.resume import FinishedSeeds

log = logging.getLogger(__name__)


def _agreement(p: Params, agent, progress: bool) -> dict[str, Any] | None:
    """Teacher-forced CoT match / action agreement on the teacher's test episodes (None if absent)."""
    from sad.evaluation import teacher_forced_agreement

    path = p.path("data", "eval", "teacher", "test.jsonl")
    if not path.is_file():
        log.warning("%s not found: no CoT match / action agreement (run evaluate_teacher first)", path)
        return None
    return teacher_forced_agreement(agent, read_episodes(path), p.context.max_tokens, p.context.history_steps,
                                    p.evaluate.cot_threshold, p.evaluate.batch_size, p.evaluate.agreement_steps,
                                    seed=p.project.seed, progress=progress, evict_to=p.context.evict_to)


def _step_accuracy(p: Params, agent, progress: bool) -> dict[str, Any] | None:
    """Step accuracy on the expert's dev episodes (None if the demos stage wrote none)."""
    from sad.evaluation import step_accuracy

    path = dev_demos_file(p)
    if not path.is_file():
        log.warning("%s not found: no step accuracy (rerun the demos stage)", path)
        return None
    return step_accuracy(agent, read_episodes(path), p.context.max_tokens, p.context.history_steps,
                         p.evaluate.batch_size, p.evaluate.step_accuracy_steps, seed=p.project.seed, progress=progress,
                         evict_to=p.context.evict_to)


def mean_step_accuracy(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Step accuracy averaged over seeds, overall and per env (per-kind numbers stay per seed)."""
    n = len(per_seed)
    envs = sorted({env for r in per_seed.values() for env in r["envs"]})
    return {"step_accuracy": sum(r["step_accuracy"] for r in per_seed.values()) / n,
            "envs": {env: {"step_accuracy": sum(r["envs"].get(env, {}).get("step_accuracy", 0.0) for r in per_seed.values()) / n}
                     for env in envs},
            "seeds": per_seed}


def aggregate_seeds(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every split's overall/env/task-type numbers (the per-task lists stay per seed)."""
    first = next(iter(per_seed.values()))
    out: dict[str, Any] = {}
    for split, body in first.items():
        out[split] = {
            "overall": mean_over_seeds({s: r[split]["overall"] for s, r in per_seed.items()}),
            "envs": {env: mean_over_seeds({s: r[split]["envs"][env] for s, r in per_seed.items()}) for env in body["envs"]},
            "by_task_type": mean_over_seeds({s: r[split]["by_task_type"] for s, r in per_seed.items()}),
        }
    return out


def run_evaluate(p: Params, agent: str, progress: bool = True, players=None) -> dict[str, Any]:
    """Play dev/test tasks with the teacher or with every seed of a method's students; for students,
    also CoT match and action agreement against the teacher's test trajectories.

    ``players(model_dir)`` returns a :data:`sad.rollout.Player` that plays elsewhere (Dask workers)."""
    from sad.evaluation import evaluate_agent, load_agent
    from sad.modeling import read_card

    if agent == "teacher":
        seeds = {str(p.teacher.train.seed): teacher_dir(p)}
    else:
        seeds = {str(seed): student_dir(p, agent, seed) for seed in p.distill.seeds}
    per_seed: dict[str, dict[str, Any]] = {}
    agreement: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {"agent": agent}
    out = p.path("data", "eval", agent)
    finished = None if agent == "teacher" else FinishedSeeds.for_stage(
        out, p, *seeds.values(), tasks_root(p), dev_demos_file(p), p.path("data", "eval", "teacher", "test.jsonl"))
    with atomic_dir(out) as tmp:
        for seed, model_dir in seeds.items():
            folder = tmp if agent == "teacher" else tmp / f"seed{seed}"
            kept = finished.load(seed, seed, folder) if finished is not None else None
            if kept is not None:
                log.info("%s seed %s: evaluated before the stage was stopped; kept, not played again", agent, seed)
                per_seed[seed] = kept["splits"]
                results.update(kept["about"])
                accuracy.update({seed: kept["step_accuracy"]} if kept["step_accuracy"] is not None else {})
                agreement.update({seed: kept["agreement"]} if kept["agreement"] is not None else {})
                continue
            lm = load_agent(model_dir, p)
            res, episodes = evaluate_agent(model_dir, agent, p, tasks_root(p), progress=progress, agent=lm,
                                           player=players(model_dir) if players else None)
            per_seed[seed] = res["splits"]
            results.update({"method": res["method"], "parameters": res["parameters"], "dtype": res["dtype"]})
            for split, eps in episodes.items():
                write_jsonl_atomic(folder / f"{split}.jsonl", (e.to_dict() for e in eps))
            found_accuracy = _step_accuracy(p, lm, progress)
            if found_accuracy is not None:
                write_jsonl_atomic(folder / "step_accuracy.jsonl", found_accuracy.pop("outcomes"))
                accuracy[seed] = found_accuracy
                log.info("%s (seed %s): step accuracy %.3f on %d dev expert steps", agent, seed,
                         found_accuracy["step_accuracy"], found_accuracy["steps"])
            if agent != "teacher":
                found = _agreement(p, lm, progress)
                if found is not None:
                    write_jsonl_atomic(folder / "agreement.jsonl", found.pop("outcomes"))
                    agreement[seed] = found
            if finished is not None:
                finished.save(seed, seed, folder, {
                    "splits": per_seed[seed], "step_accuracy": accuracy.get(seed), "agreement": agreement.get(seed),
                    "about": {k: results[k] for k in ("method", "parameters", "dtype")}})
    card = read_card(seeds[next(iter(seeds))])
    results.update({
        "objective": card.get("objective", "imitation of the expert demos" if agent == "teacher" else "-"),
        "compression": card.get("compression", 1.0),
        "splits": aggregate_seeds(per_seed),
        "seeds": {s: {"splits": r} for s, r in per_seed.items()},
    })
    if accuracy:
        results["step_accuracy"] = mean_step_accuracy(accuracy)
    if agreement:
        results["agreement"] = {
            "cot_match_rate": sum(a["cot_match_rate"] for a in agreement.values()) / len(agreement),
            "action_agreement": sum(a["action_agreement"] for a in agreement.values()) / len(agreement),
            "threshold": p.evaluate.cot_threshold, "seeds": agreement,
        }
    write_json_atomic(eval_metrics_file(p, agent), results)
    if finished is not None:
        finished.clear()
    return results
