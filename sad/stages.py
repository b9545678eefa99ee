"""Each pipeline stage as a function of the validated params: read inputs, compute, write outputs.

Outputs are written atomically (temp path, then rename), so a killed stage leaves nothing
half-written. These functions know nothing of Prefect or DVC; ``flows/`` calls them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sad.benchmarks import load_tasks, write_tasks
from sad.config import Params
from sad.io import atomic_dir, read_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic
from sad.react import Episode, episode_text

log = logging.getLogger(__name__)

STUDENT_AGENTS_DIR = "students"


# --------------------------------------------------------------------------- paths
def tasks_root(p: Params) -> Path:
    return p.path("data", "tasks")


def demos_file(p: Params) -> Path:
    return p.path("data", "demos", "demos.jsonl")


def tokenizer_dir(p: Params) -> Path:
    return p.path("models", "tokenizer")


def teacher_dir(p: Params) -> Path:
    return p.path("models", "teacher")


def rollouts_file(p: Params) -> Path:
    return p.path("data", "rollouts", "rollouts.jsonl")


def segments_dir(p: Params) -> Path:
    return p.path("data", "segments")


def student_dir(p: Params, method: str) -> Path:
    return p.path("models", STUDENT_AGENTS_DIR, method)


def agent_dir(p: Params, agent: str) -> Path:
    return teacher_dir(p) if agent == "teacher" else student_dir(p, agent)


def eval_metrics_file(p: Params, agent: str) -> Path:
    return p.path("metrics", "eval", f"{agent}.json")


def read_episodes(path: Path) -> list[Episode]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    return [Episode.from_dict(d) for d in read_jsonl(path)]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- stages
def run_tasks(p: Params) -> dict[str, Any]:
    """Generate seeded, disjoint train/dev/test task splits for every environment."""
    root = tasks_root(p)
    with atomic_dir(root) as tmp:
        counts = write_tasks(p, tmp)
    metrics = {"tasks": counts}
    write_json_atomic(p.path("metrics", "tasks.json"), metrics)
    return metrics


def demos_metrics(episodes: list[Episode]) -> dict[str, Any]:
    from sad.metrics import success_by

    n = len(episodes) or 1
    return {
        "episodes": len(episodes),
        "expert_success_rate": sum(e.success for e in episodes) / n,
        "avg_steps": sum(e.n_steps for e in episodes) / n,
        "success_by_task_type": success_by(episodes),
    }


def write_demos(p: Params, episodes: list[Episode]) -> dict[str, Any]:
    failed = [e.episode_id for e in episodes if not e.success]
    if failed:
        log.warning("expert failed %d episode(s), kept out of the demos: %s", len(failed), failed[:5])
    write_jsonl_atomic(demos_file(p), (e.to_dict() for e in episodes if e.success))
    metrics = demos_metrics(episodes)
    write_json_atomic(p.path("metrics", "demos.json"), metrics)
    return metrics


def run_tokenizer(p: Params) -> dict[str, Any]:
    from sad.tokenizer import train_bpe

    episodes = read_episodes(demos_file(p))
    tokenizer = train_bpe((episode_text(e) for e in episodes), p.tokenizer.vocab_size, p.tokenizer.min_frequency)
    with atomic_dir(tokenizer_dir(p)) as tmp:
        tokenizer.save_pretrained(str(tmp))
    lengths = [len(tokenizer.encode(episode_text(e))) for e in episodes]
    metrics = {"vocab_size": len(tokenizer), "avg_episode_tokens": sum(lengths) / max(len(lengths), 1),
               "max_episode_tokens": max(lengths, default=0)}
    write_json_atomic(p.path("metrics", "tokenizer.json"), metrics)
    return metrics


def run_teacher(p: Params, on_log=None, progress: bool = True) -> dict[str, Any]:
    """Train the embedded-default teacher by imitation of the expert demos."""
    from sad.modeling import build_llama, count_parameters, save_model
    from sad.segment import segment_episodes
    from sad.tokenizer import load_tokenizer
    from sad.training import IMITATION, train_lm

    tokenizer = load_tokenizer(tokenizer_dir(p))
    episodes = read_episodes(demos_file(p))
    seg = segment_episodes(episodes, tokenizer, p.context.max_tokens, p.context.history_steps, what=str(demos_file(p)))
    model = build_llama(p.teacher.arch, tokenizer, p.context.max_tokens, seed=p.teacher.train.seed)
    result = train_lm(model, seg.windows, IMITATION, p.teacher.train, tokenizer.pad_token_id,
                      on_log=on_log, progress=progress, desc="teacher")
    card = {
        "role": "teacher", "method": "imitation", "parameters": count_parameters(model),
        "arch": p.teacher.arch.model_dump(), "train_windows": len(seg.windows),
        "final_loss": result.final_loss, "data_hash": file_hash(demos_file(p)),
    }
    save_model(model, tokenizer, teacher_dir(p), card)
    metrics = {"parameters": card["parameters"], "final_loss": result.final_loss, "steps": result.steps,
               "train_tokens_per_s": result.tokens_per_second, "train_seconds": result.seconds,
               "windows": len(seg.windows)}
    write_json_atomic(p.path("metrics", "teacher.json"), metrics)
    return metrics


def run_rollout(p: Params, progress: bool = True) -> dict[str, Any]:
    """The teacher plays the train tasks; its trajectories are the students' data."""
    from sad.evaluation import load_agent
    from sad.metrics import success_by, summarize
    from sad.rollout import PlayStats, play_agent

    agent = load_agent(teacher_dir(p), p)
    tasks = [t for env in p.tasks.envs for t in load_tasks(tasks_root(p), env, "train")]
    stats = PlayStats()
    episodes = play_agent(tasks, tasks_root(p), agent, "teacher", p.context.max_tokens, p.rollout.batch_size,
                          progress=progress, stats=stats, history_steps=p.context.history_steps)
    write_jsonl_atomic(rollouts_file(p), (e.to_dict() for e in episodes))
    metrics = {**summarize(episodes, agent.tokenizer), "success_by_task_type": success_by(episodes),
               "generated_tokens_per_s": stats.tokens_per_second, "generation_seconds": stats.generation_seconds,
               "env_seconds": stats.env_seconds}
    write_json_atomic(p.path("metrics", "rollout.json"), metrics)
    return metrics


def run_segment(p: Params) -> dict[str, Any]:
    """Cut the teacher's trajectories into REASON/ACT spans and masked token windows."""
    from sad.segment import save_segments, segment_episodes
    from sad.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir(p))
    episodes = read_episodes(rollouts_file(p))
    kept = [e for e in episodes if e.success] if p.segment.keep == "successful" else episodes
    if not kept:
        log.warning("no successful teacher episode: keeping all %d episodes", len(episodes))
        kept = episodes
    seg = segment_episodes(kept, tokenizer, p.context.max_tokens, p.context.history_steps, what=str(rollouts_file(p)))
    with atomic_dir(segments_dir(p)) as tmp:
        save_segments(seg, tmp)
    reason = int(sum(sum(m) for m in seg.windows["reason_mask"]))
    act = int(sum(sum(m) for m in seg.windows["act_mask"]))
    total = int(seg.windows["n_tokens"].sum())
    metrics = {"episodes": len(kept), "windows": len(seg.windows), "spans": len(seg.spans), "tokens": total,
               "reason_tokens": reason, "act_tokens": act, "context_tokens": total - reason - act}
    write_json_atomic(p.path("metrics", "segment.json"), metrics)
    return metrics


def run_distill(p: Params, method: str, on_log=None, progress: bool = True) -> dict[str, Any]:
    """Train one student with ``method``'s loss against the teacher."""
    from sad.modeling import build_llama, count_parameters, load_model, save_model
    from sad.segment import load_windows
    from sad.tokenizer import check_compatible, load_tokenizer
    from sad.training import train_lm

    if method not in p.distill.methods:
        raise ValueError(f"unknown method {method!r}; params.yaml distill.methods has {sorted(p.distill.methods)}")
    spec = p.distill.methods[method]
    tokenizer = load_tokenizer(tokenizer_dir(p))
    check_compatible(load_tokenizer(teacher_dir(p)), tokenizer)
    teacher = load_model(teacher_dir(p))
    windows = load_windows(segments_dir(p))
    student = build_llama(p.distill.student, tokenizer, p.context.max_tokens, seed=p.distill.train.seed)
    result = train_lm(student, windows, spec, p.distill.train, tokenizer.pad_token_id, teacher=teacher,
                      on_log=on_log, progress=progress, desc=f"distill {method}")
    n_student, n_teacher = count_parameters(student), count_parameters(teacher)
    card = {
        "role": "student", "method": method, "loss": spec.model_dump(), "parameters": n_student,
        "teacher_parameters": n_teacher, "compression": n_teacher / n_student,
        "arch": p.distill.student.model_dump(), "final_loss": result.final_loss,
        "data_hash": file_hash(segments_dir(p) / "windows.parquet"),
    }
    save_model(student, tokenizer, student_dir(p, method), card)
    metrics = {"parameters": n_student, "compression": card["compression"], "final_loss": result.final_loss,
               "steps": result.steps, "train_tokens_per_s": result.tokens_per_second,
               "train_seconds": result.seconds, "normalisation": spec.normalisation if spec.loss == "sad" else "-"}
    write_json_atomic(p.path("metrics", "distill", f"{method}.json"), metrics)
    return metrics


def run_evaluate(p: Params, agent: str, progress: bool = True) -> dict[str, Any]:
    """Play dev/test tasks with an agent; writes its episodes and metrics."""
    from sad.evaluation import evaluate_agent

    results, episodes = evaluate_agent(agent_dir(p, agent), agent, p, tasks_root(p), progress=progress)
    with atomic_dir(p.path("data", "eval", agent)) as tmp:
        for split, eps in episodes.items():
            write_jsonl_atomic(tmp / f"{split}.jsonl", (e.to_dict() for e in eps))
    write_json_atomic(eval_metrics_file(p, agent), results)
    return results


def load_eval_results(p: Params, agents: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for agent in agents:
        path = eval_metrics_file(p, agent)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage evaluate --agent {agent}' first)")
        out[agent] = json.loads(path.read_text())
    return out


def best_student(p: Params) -> tuple[str, float]:
    """The student with the best gate metric on the gate split (ties: first in params order)."""
    results = load_eval_results(p, list(p.distill.methods))
    split, metric = p.registration.gate_split, p.registration.gate_metric
    scored = [(m, results[m]["splits"][split]["overall"][metric]) for m in p.distill.methods]
    return max(scored, key=lambda x: x[1])


def run_register(p: Params) -> dict[str, Any]:
    """Register the best student; ``@champion`` moves only if it beats the current one."""
    from sad.modeling import read_card
    from sad.registry import decision_dict, register_and_promote

    method, value = best_student(p)
    card = {**read_card(student_dir(p, method)), "gate_split": p.registration.gate_split,
            "gate_metric": p.registration.gate_metric, "gate_value": value}
    decision = register_and_promote(student_dir(p, method), card, value, p.tracking, p.registration.min_improvement)
    out = {"candidate": method, **decision_dict(decision)}
    write_json_atomic(p.path("reports", "registry.json"), out)
    return out


def run_report(p: Params) -> dict[str, Any]:
    from sad.report import render_report, success_plot

    agents = ["teacher", *p.distill.methods]
    results = load_eval_results(p, agents)
    registry_file = p.path("reports", "registry.json")
    registry = json.loads(registry_file.read_text()) if registry_file.is_file() else None
    normalisation = {m: (s.normalisation if s.loss == "sad" else "mean over generated tokens")
                     for m, s in p.distill.methods.items()}
    success_plot(results, p.path("reports", "success.png"))
    write_text_atomic(p.path("reports", "results.md"), render_report(results, registry, p.project.profile, normalisation))
    summary = {a: r["splits"]["test"]["overall"]["success_rate"] for a, r in results.items() if "test" in r["splits"]}
    return summary
