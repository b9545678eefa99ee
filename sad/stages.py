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


def teacher_logits_dir(p: Params) -> Path:
    return p.path("data", "teacher_logits")


def checkpoint_dir(model_dir: Path) -> Path:
    """Where training checkpoints of ``model_dir`` live until the model is written (git-ignored,
    outside every DVC-tracked folder)."""
    return Path(".checkpoints", *model_dir.parts)


def fingerprint(*parts: Any) -> str:
    """A short hash of settings and data that a checkpoint must match to be resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_main_process() -> bool:
    """False on the other ranks of a multi-process (accelerate launch) run: only rank 0 writes."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


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

    from sad.training import split_dev

    tokenizer = load_tokenizer(tokenizer_dir(p))
    episodes = read_episodes(demos_file(p))
    seg = segment_episodes(episodes, tokenizer, p.context.max_tokens, p.context.history_steps, what=str(demos_file(p)))
    train_w, dev_w = split_dev(seg.windows, p.teacher.train.dev_fraction, p.teacher.train.seed)
    model = build_llama(p.teacher.arch, tokenizer, p.context.max_tokens, seed=p.teacher.train.seed)
    data_hash = file_hash(demos_file(p))
    result = train_lm(model, train_w, IMITATION, p.teacher.train, tokenizer.pad_token_id, dev_windows=dev_w,
                      checkpoint_dir=checkpoint_dir(teacher_dir(p)),
                      fingerprint=fingerprint(p.teacher.model_dump(), p.context.model_dump(), data_hash),
                      on_log=on_log, progress=progress, desc="teacher")
    if not is_main_process():
        return {}
    card = {
        "role": "teacher", "method": "imitation", "parameters": count_parameters(model),
        "arch": p.teacher.arch.model_dump(), "train_windows": len(train_w), "dev_windows": len(dev_w),
        "final_loss": result.final_loss, "dev": result.dev, "data_hash": data_hash,
    }
    save_model(model, tokenizer, teacher_dir(p), card)
    metrics = {"parameters": card["parameters"], "final_loss": result.final_loss, "steps": result.steps,
               "train_tokens_per_s": result.tokens_per_second, "train_seconds": result.seconds,
               "windows": len(train_w), "dev_windows": len(dev_w), **{f"dev_{k}": v for k, v in result.dev.items()}}
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


def run_teacher_logits(p: Params, progress: bool = True) -> dict[str, Any]:
    """Cache the teacher's top-k log-probs (and entropies) at every generated position of the windows."""
    import time

    from sad.modeling import load_model
    from sad.segment import load_windows
    from sad.teacher_cache import build_topk_cache, save_cache

    windows = load_windows(segments_dir(p))
    teacher = load_model(teacher_dir(p))
    started = time.perf_counter()
    cache = build_topk_cache(teacher, windows, p.distill.teacher_logits.top_k, p.distill.temperatures(),
                             teacher.config.pad_token_id or 0, file_hash(segments_dir(p) / "windows.parquet"),
                             p.distill.teacher_logits.batch_size, progress=progress)
    seconds = time.perf_counter() - started
    save_cache(cache, windows, teacher_logits_dir(p))
    positions = int(cache.offsets[-1])
    metrics = {"positions": positions, "top_k": cache.top_k, "temperatures": p.distill.temperatures(),
               "cache_bytes": cache.nbytes, "full_logits_bytes": cache.full_logits_bytes(),
               "bytes_ratio": cache.nbytes / max(cache.full_logits_bytes(), 1), "seconds": seconds,
               "mean_teacher_entropy": float(cache.entropy_sum.sum()) / max(positions, 1)}
    write_json_atomic(p.path("metrics", "teacher_logits.json"), metrics)
    return metrics


def distill_inputs(p: Params, method: str):
    """Everything a student's training needs: (spec, tokenizer, teacher, train windows, dev windows,
    cached targets or None, curriculum order or None, data hash)."""
    from sad.curriculum import easy_to_hard, trajectory_difficulty
    from sad.modeling import load_model
    from sad.segment import load_windows
    from sad.teacher_cache import load_cache
    from sad.tokenizer import check_compatible, load_tokenizer
    from sad.training import CachedTeacher, split_dev

    if method not in p.distill.methods:
        raise ValueError(f"unknown method {method!r}; params.yaml distill.methods has {sorted(p.distill.methods)}")
    spec = p.distill.methods[method]
    tokenizer = load_tokenizer(tokenizer_dir(p))
    check_compatible(load_tokenizer(teacher_dir(p)), tokenizer)
    teacher = load_model(teacher_dir(p))
    windows = load_windows(segments_dir(p)).reset_index(drop=True)
    windows["cache_row"] = range(len(windows))
    data_hash = file_hash(segments_dir(p) / "windows.parquet")
    cur = p.distill.curriculum
    use_curriculum = cur.enabled and spec.curriculum
    cache = None
    if (spec.needs_teacher and p.distill.teacher_logits.mode == "cached") or (use_curriculum and cur.gamma):
        cache = load_cache(teacher_logits_dir(p), data_hash)
    train_w, dev_w = split_dev(windows, p.distill.train.dev_fraction, p.distill.train.seed)
    train_w = train_w.reset_index(drop=True)
    order = None
    if use_curriculum:
        entropy = None
        if cur.gamma:
            import pandas as pd

            entropy = pd.Series(cache.entropy_sum.numpy()[train_w["cache_row"].to_numpy()], index=train_w.index)
        difficulty = trajectory_difficulty(train_w, entropy, cur.alpha, cur.beta, cur.gamma)
        order = easy_to_hard(train_w, difficulty)
    cached = CachedTeacher(cache) if spec.needs_teacher and p.distill.teacher_logits.mode == "cached" else None
    return spec, tokenizer, teacher, train_w, dev_w, cached, order, data_hash


def run_distill(p: Params, method: str, on_log=None, progress: bool = True) -> dict[str, Any]:
    """Train one student with ``method``'s loss against the teacher (online or cached logits)."""
    from sad.modeling import build_llama, count_parameters, save_model
    from sad.training import train_lm

    spec, tokenizer, teacher, train_w, dev_w, cached, order, data_hash = distill_inputs(p, method)
    student = build_llama(p.distill.student, tokenizer, p.context.max_tokens, seed=p.distill.train.seed)
    online = spec.needs_teacher and cached is None
    out_dir = student_dir(p, method)
    result = train_lm(student, train_w, spec, p.distill.train, tokenizer.pad_token_id,
                      teacher=teacher if online else None,
                      cached=cached, dev_windows=dev_w, curriculum_order=order, curriculum=p.distill.curriculum,
                      checkpoint_dir=checkpoint_dir(out_dir),
                      fingerprint=fingerprint(method, spec.model_dump(), p.distill.model_dump(exclude={"methods"}),
                                              p.context.model_dump(), data_hash),
                      on_log=on_log, progress=progress, desc=f"distill {method}")
    if not is_main_process():
        return {}
    n_student, n_teacher = count_parameters(student), count_parameters(teacher)
    card = {
        "role": "student", "method": method, "objective": spec.describe(), "loss": spec.model_dump(),
        "parameters": n_student, "teacher_parameters": n_teacher, "compression": n_teacher / n_student,
        "arch": p.distill.student.model_dump(), "final_loss": result.final_loss, "dev": result.dev,
        "teacher_logits": p.distill.teacher_logits.mode if spec.needs_teacher else "-",
        "curriculum": order is not None, "data_hash": data_hash,
    }
    save_model(student, tokenizer, out_dir, card)
    metrics = {"parameters": n_student, "compression": card["compression"], "final_loss": result.final_loss,
               "steps": result.steps, "train_tokens_per_s": result.tokens_per_second,
               "train_seconds": result.seconds, "objective": spec.describe(),
               "normalisation": spec.normalisation if spec.loss == "sad" else "-",
               "teacher_logits": card["teacher_logits"], "curriculum": card["curriculum"],
               "resumed_from_step": result.resumed_from, **{f"dev_{k}": v for k, v in result.dev.items()}}
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
    normalisation = {m: s.describe() for m, s in p.distill.methods.items()}
    success_plot(results, p.path("reports", "success.png"))
    write_text_atomic(p.path("reports", "results.md"), render_report(results, registry, p.project.profile, normalisation))
    summary = {a: r["splits"]["test"]["overall"]["success_rate"] for a, r in results.items() if "test" in r["splits"]}
    return summary
