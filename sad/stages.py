"""Each pipeline stage as a function of the validated params: read inputs, compute, write outputs.

Outputs are written atomically (temp path, then rename), so a killed stage leaves nothing
half-written. These functions know nothing of Prefect or DVC; ``flows/`` calls them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sad.benchmarks import load_tasks, write_tasks
from sad.config import Params
from sad.io import atomic_dir, read_jsonl_numbered, write_json_atomic, write_jsonl_atomic, write_text_atomic
from sad.react import Episode, episode_text

if TYPE_CHECKING:
    from sad.envs.base import Task
    from sad.rollout import Player

log = logging.getLogger(__name__)

STUDENT_AGENTS_DIR = "students"


# --------------------------------------------------------------------------- paths
def tasks_root(p: Params) -> Path:
    return p.path("data", "tasks")


def demos_file(p: Params) -> Path:
    return p.path("data", "demos", "demos.jsonl")


def tokenizer_dir(p: Params) -> Path:
    return p.path("models", "tokenizer")


def pretrained_dir(p: Params) -> Path:
    return p.path("models", "pretrained")


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


def student_dir(p: Params, method: str, seed: int | None = None) -> Path:
    """``models/students/<method>`` (all seeds) or ``…/<method>/seed<k>`` (one student)."""
    base = p.path("models", STUDENT_AGENTS_DIR, method)
    return base if seed is None else base / f"seed{seed}"


def scaling_dir(p: Params, size: str) -> Path:
    return p.path("models", "scaling", size)


def eval_metrics_file(p: Params, agent: str) -> Path:
    return p.path("metrics", "eval", f"{agent}.json")


def read_episodes(path: Path) -> list[Episode]:
    """Episodes of a JSON-lines file; a malformed row or a repeated episode id names the file and line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not found (run the stage that writes it first)")
    episodes: list[Episode] = []
    first_line: dict[str, int] = {}
    for lineno, row in read_jsonl_numbered(path):
        try:
            episode = Episode.from_dict(row)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}:{lineno}: not an episode ({exc})") from None
        if episode.episode_id in first_line:
            raise ValueError(f"{path}:{lineno}: duplicate episode id {episode.episode_id!r} "
                             f"(first on line {first_line[episode.episode_id]})")
        first_line[episode.episode_id] = lineno
        episodes.append(episode)
    if not episodes:
        raise ValueError(f"{path}: no episodes (the stage that wrote it produced none; check its log)")
    return episodes


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


def dev_demos_file(p: Params) -> Path:
    """The expert's episodes on the dev tasks (no injected mistakes): the held-out states of step accuracy."""
    return p.path("data", "demos", "dev.jsonl")


def demos_metrics(episodes: list[Episode]) -> dict[str, Any]:
    from sad.metrics import success_by

    n = len(episodes) or 1
    by_env: dict[str, list[Episode]] = {}
    for e in episodes:
        by_env.setdefault(e.env, []).append(e)
    return {
        "episodes": len(episodes),
        "expert_success_rate": sum(e.success for e in episodes) / n,
        "avg_steps": sum(e.n_steps for e in episodes) / n,
        "success_by_env": success_by(episodes, "env"),
        "success_by_task_type": success_by(episodes),
        "success_by_env_and_task_type": {env: success_by(eps) for env, eps in sorted(by_env.items())},
        "gave_up": sum("expert_gave_up" in e.meta for e in episodes),
    }


class ExpertBelowFloor(ValueError):
    """The environment's expert failed too many tasks for its demos to be trusted (bad task data)."""


def check_expert_success(episodes: list[Episode], floor: float) -> None:
    """Raise :class:`ExpertBelowFloor` naming the failed tasks when, in any environment, the expert wins
    fewer than ``floor`` of its tasks (``demos.min_success``): its demos would teach failure."""
    by_env: dict[str, list[Episode]] = {}
    for e in episodes:
        by_env.setdefault(e.env, []).append(e)
    low = {env: eps for env, eps in sorted(by_env.items()) if sum(e.success for e in eps) < floor * len(eps)}
    if not low:
        return
    parts = []
    for env, eps in low.items():
        failed = [e for e in eps if not e.success]
        shown = ", ".join(f"{e.task_id}" + (f" ({e.meta['expert_gave_up']})" if "expert_gave_up" in e.meta else "")
                          for e in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        parts.append(f"{env}: {len(eps) - len(failed)}/{len(eps)} won; failed {shown}{more}")
    raise ExpertBelowFloor(f"the expert wins too few tasks (demos.min_success {floor:.2f}): {'; '.join(parts)}. "
                           "Check the task data (tasks.<env>.official) or lower demos.min_success.")


def write_demos(p: Params, episodes: list[Episode], dev_episodes: list[Episode] | None = None) -> dict[str, Any]:
    """The expert's successful train episodes (the demos) and, if given, its dev episodes (for step accuracy).
    Refuses (nothing written) when the expert wins fewer than ``demos.min_success`` of any env's tasks."""
    check_expert_success(episodes, p.demos.min_success)
    failed = [e.episode_id for e in episodes if not e.success]
    if failed:
        log.warning("expert failed %d episode(s), kept out of the demos: %s", len(failed), failed[:5])
    write_jsonl_atomic(demos_file(p), (e.to_dict() for e in episodes if e.success))
    if dev_episodes is not None:
        write_jsonl_atomic(dev_demos_file(p), (e.to_dict() for e in dev_episodes if e.success))
    metrics = demos_metrics(episodes)
    if dev_episodes is not None:
        metrics["dev_episodes"] = sum(e.success for e in dev_episodes)
    log.info("expert success per env: %s", ", ".join(f"{k} {v:.0%}" for k, v in metrics["success_by_env"].items()))
    write_json_atomic(p.path("metrics", "demos.json"), metrics)
    return metrics


def run_pretrained(p: Params) -> dict[str, Any]:
    """Convert ``teacher.source`` (GGUF in a wheel, a folder, a downloaded Hub id) to a safetensors
    folder; with no source, record that the teacher is trained from scratch."""
    import time

    from sad.pretrained import convert_to_safetensors, model_source

    if p.teacher.source is None:
        with atomic_dir(pretrained_dir(p)) as tmp:
            (tmp / "card.json").write_text(json.dumps({"source": None, "note": "embedded teacher, trained from scratch"}) + "\n")
        metrics: dict[str, Any] = {"pretrained": 0}
    else:
        started = time.perf_counter()
        card = convert_to_safetensors(model_source(p.teacher.source), pretrained_dir(p))
        metrics = {"pretrained": 1, "parameters": card["parameters"], "layers": card["layers"],
                   "vocab_size": card["vocab_size"], "seconds": time.perf_counter() - started}
        log.info("pretrained teacher %s: %d layers, %d parameters", p.teacher.source, card["layers"], card["parameters"])
    write_json_atomic(p.path("metrics", "pretrained.json"), metrics)
    return metrics


def run_tokenizer(p: Params) -> dict[str, Any]:
    from sad.tokenizer import load_tokenizer, train_bpe

    episodes = read_episodes(demos_file(p))
    if p.teacher.source is not None:  # a pretrained teacher brings its tokenizer; students share it
        tokenizer = load_tokenizer(pretrained_dir(p))
    else:
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
    if p.teacher.source is not None and not p.teacher.finetune:
        return use_teacher_as_is(p, tokenizer)
    episodes = read_episodes(demos_file(p))
    seg = segment_episodes(episodes, tokenizer, p.context.max_tokens, p.context.history_steps, what=str(demos_file(p)))
    train_w, dev_w = split_dev(seg.windows, p.teacher.train.dev_fraction, p.teacher.train.seed)
    if p.teacher.source is not None:
        from sad.modeling import load_model

        model = load_model(pretrained_dir(p))  # fine-tuned on the demos below
    else:
        model = build_llama(p.teacher.arch, tokenizer, p.context.max_tokens, seed=p.teacher.train.seed)
    if p.teacher.lora is not None:
        from sad.pretrained import add_lora

        model = add_lora(model, p.teacher.lora)
    data_hash = file_hash(demos_file(p))
    base_fingerprint = fingerprint(p.teacher.model_dump(exclude={"dagger"}), p.context.model_dump(), data_hash,
                                   file_hash(pretrained_dir(p) / "card.json"))

    def imitation():
        return train_lm(model, train_w, IMITATION, p.teacher.train, tokenizer.pad_token_id, dev_windows=dev_w,
                        checkpoint_dir=checkpoint_dir(teacher_dir(p)), fingerprint=base_fingerprint,
                        on_log=on_log, progress=progress, desc="teacher")

    dagger: list[dict[str, Any]] = []
    if p.teacher.dagger is None:
        result = imitation()
    else:
        result, dagger = dagger_rounds(p, model, tokenizer, episodes, imitation, base_fingerprint, on_log, progress)
    if not is_main_process():
        return {}
    card = {
        "role": "teacher", "method": "imitation", "parameters": count_parameters(model), "source": p.teacher.source,
        "objective": ("fine-tuned " + p.teacher.source if p.teacher.source else "trained from scratch") + " on the expert demos",
        "arch": read_pretrained_arch(model) if p.teacher.source else p.teacher.arch.model_dump(),
        "train_windows": len(train_w), "dev_windows": len(dev_w),
        "final_loss": result.final_loss, "dev": result.dev, "data_hash": data_hash,
    }
    if dagger:
        card["dagger"] = {"params": p.teacher.dagger.model_dump(), "rounds": dagger}
    if p.teacher.lora is not None:
        from sad.pretrained import save_lora_teacher

        card["lora"] = p.teacher.lora.model_dump()
        card["adapter_parameters"] = sum(t.numel() for t in model.parameters() if t.requires_grad)
        card["parameters"] -= card["adapter_parameters"]  # the merged model has the base's size
        model = save_lora_teacher(model, tokenizer, teacher_dir(p), p.teacher.source, card)
    else:
        save_model(model, tokenizer, teacher_dir(p), card)
    if dagger:
        keep_dagger_episodes(p)
    metrics = {"parameters": card["parameters"], "final_loss": result.final_loss, "steps": result.steps,
               "train_tokens_per_s": result.tokens_per_second, "train_seconds": result.seconds,
               "windows": len(train_w), "dev_windows": len(dev_w), **{f"dev_{k}": v for k, v in result.dev.items()}}
    for r, summary in enumerate(dagger):
        metrics.update({f"dagger{r}_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    write_json_atomic(p.path("metrics", "teacher.json"), metrics)
    return metrics


def dagger_tasks(p: Params, round_index: int) -> list["Task"]:
    """Round ``round_index``'s train tasks: per env, the round's block of ``teacher.dagger.tasks[env]``
    tasks (wrapping around when the blocks run past the train split)."""
    tasks = []
    for env in p.tasks.envs:
        n = p.teacher.dagger.tasks.get(env, 0)
        pool = load_tasks(tasks_root(p), env, "train")
        if n and pool:
            tasks += [pool[(round_index * n + i) % len(pool)] for i in range(min(n, len(pool)))]
    return tasks


def dagger_dir(p: Params) -> Path:
    """Where a DAgger run keeps its phases until the teacher is written (beside the checkpoints)."""
    return checkpoint_dir(teacher_dir(p).with_name(teacher_dir(p).name + "-dagger"))


def _save_phase(folder: Path, model, result, key: str) -> None:
    """A finished phase: the trained weights (only the trainable ones under LoRA), its result and key."""
    from safetensors.torch import save_file, save_model

    from sad.training import _trainable_state

    with atomic_dir(folder) as tmp:
        trainable = _trainable_state(model)
        if trainable is None:
            save_model(model, str(tmp / "weights.safetensors"))  # handles tied embeddings
        else:
            save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "weights.safetensors"))
        write_json_atomic(tmp / "result.json", {**asdict(result), "key": key})


def _load_phase(folder: Path, model, key: str):
    """The result of a finished phase with this ``key`` (its weights loaded into ``model``), else None."""
    from safetensors.torch import load_file, load_model

    from sad.training import TrainResult, _trainable_state

    try:
        saved = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.pop("key", None) != key:
        return None
    if _trainable_state(model) is None:
        load_model(model, str(folder / "weights.safetensors"))
    else:
        model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=False)
    return TrainResult(**saved)


def dagger_rounds(p: Params, model, tokenizer, demos: list[Episode], imitation, base_fingerprint: str, on_log=None,
                  progress: bool = True):
    """Imitation (``imitation()``, training ``model`` in place), then ``teacher.dagger.rounds`` rounds of
    DAgger with expert takeover.

    Each round the current model plays its block of train tasks with the expert shadowing it
    (:func:`sad.rollout.play_takeover`); training goes on over those episodes plus a seeded sample of
    ``dagger.demos`` demo episodes. Every finished phase (imitation, a round's episodes, a round's training)
    is kept under :func:`dagger_dir` until the teacher is written, so a rerun after a crash resumes where it
    stopped. Returns (the last phase's TrainResult, per-round summaries).
    """
    import os
    import random

    from sad.agent import LMAgent
    from sad.rollout import play_takeover
    from sad.segment import segment_episodes
    from sad.training import IMITATION, split_dev, train_lm

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("teacher.dagger plays episodes between training rounds and runs in one process; "
                           "run the teacher stage without accelerate launch (or set teacher.dagger: null)")
    d, root = p.teacher.dagger, dagger_dir(p)
    key = base_fingerprint
    result = _load_phase(root / "imitation", model, key)
    if result is None:
        result = imitation()
        _save_phase(root / "imitation", model, result, key)
    else:
        log.info("dagger: imitation already done (%s), resuming after it", root / "imitation")
    summaries = []
    for r in range(d.rounds):
        round_dir = root / f"round-{r}"
        tasks = dagger_tasks(p, r)
        key = fingerprint(key, d.model_dump(), r, [t.task_id for t in tasks])
        played = round_dir / "takeover.jsonl"
        if played.exists() and (round_dir / "key").read_text() == key:
            takeover = read_episodes(played)
        else:
            log.info("dagger round %d: the teacher plays %d train tasks, the expert takes over at its first mistake",
                     r, len(tasks))
            model.eval()
            agent = LMAgent(model, tokenizer, p.context.max_new_tokens)
            takeover = play_takeover(tasks, tasks_root(p), agent, p.context.max_tokens, p.rollout.batch_size,
                                     p.context.history_steps, progress=progress)
            round_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(played, (e.to_dict() for e in takeover))
            write_text_atomic(round_dir / "key", key)
        mixed = list(demos)
        random.Random(f"{d.train.seed}:{r}").shuffle(mixed)
        seg = segment_episodes(takeover + mixed[:d.demos], tokenizer, p.context.max_tokens, p.context.history_steps,
                               what=f"dagger round {r}")
        train_w, dev_w = split_dev(seg.windows, d.train.dev_fraction, d.train.seed)
        summaries.append(dagger_summary(takeover, len(train_w)))
        done = _load_phase(round_dir / "trained", model, key)
        if done is not None:
            result = done
            continue
        model.train()
        result = train_lm(model, train_w, IMITATION, d.train, tokenizer.pad_token_id, dev_windows=dev_w,
                          checkpoint_dir=round_dir / "checkpoint", fingerprint=fingerprint(key, file_hash(played)),
                          on_log=on_log, progress=progress, desc=f"teacher dagger {r}")
        _save_phase(round_dir / "trained", model, result, key)
    model.eval()
    return result, summaries


def keep_dagger_episodes(p: Params) -> None:
    """Once the teacher is written: each round's takeover episodes go into its folder (``dagger/round-<r>.jsonl``,
    what the teacher got wrong and how the expert recovered) and the phases kept for resuming are removed."""
    import shutil

    root = dagger_dir(p)
    kept = teacher_dir(p) / "dagger"
    kept.mkdir(exist_ok=True)
    for r in range(p.teacher.dagger.rounds):
        shutil.copyfile(root / f"round-{r}" / "takeover.jsonl", kept / f"round-{r}.jsonl")
    shutil.rmtree(root, ignore_errors=True)


def dagger_summary(takeover: list[Episode], windows: int) -> dict[str, Any]:
    """Per env: share of episodes where the agent made a mistake, its mean step, and what training saw."""
    out: dict[str, Any] = {"episodes": len(takeover), "windows": windows}
    for env in sorted({e.env for e in takeover}):
        eps = [e for e in takeover if e.env == env]
        steps = [e.meta["takeover_step"] for e in eps if "takeover_step" in e.meta]
        out[f"{env}_mistake_rate"] = len(steps) / len(eps)
        out[f"{env}_first_mistake_step"] = sum(steps) / len(steps) if steps else None
    return out


def use_teacher_as_is(p: Params, tokenizer) -> dict[str, Any]:
    """``teacher.finetune: false``: the source (e.g. the shipped teacher) is the teacher, unchanged;
    its card (recipe, data hash, measured success) is kept under ``shipped``."""
    from sad.modeling import count_parameters, load_model, read_card, save_model

    model = load_model(pretrained_dir(p))
    source_card = read_card(pretrained_dir(p))
    card = {"role": "teacher", "method": "as is", "parameters": count_parameters(model), "source": p.teacher.source,
            "objective": f"{p.teacher.source}, used as it is (teacher.finetune: false)",
            "arch": read_pretrained_arch(model), "shipped": source_card}
    save_model(model, tokenizer, teacher_dir(p), card)
    metrics = {"parameters": card["parameters"], "finetuned": 0}
    write_json_atomic(p.path("metrics", "teacher.json"), metrics)
    return metrics


def run_rollout(p: Params, progress: bool = True, player: "Player | None" = None) -> dict[str, Any]:
    """The teacher plays the train tasks; its trajectories are the students' data.

    ``player`` (a :data:`sad.rollout.Player`) plays them elsewhere, e.g. sharded over Dask workers.
    """
    from sad.evaluation import play_model
    from sad.metrics import success_by, summarize
    from sad.tokenizer import load_tokenizer

    tasks = [t for env in p.tasks.envs for t in load_tasks(tasks_root(p), env, "train")]
    if player is not None:
        episodes, stats = player(tasks, "teacher")
    else:
        episodes, stats = play_model(teacher_dir(p), p, tasks_root(p), tasks, "teacher", p.rollout.batch_size,
                                     progress=progress)
    write_jsonl_atomic(rollouts_file(p), (e.to_dict() for e in episodes))
    metrics = {**summarize(episodes, load_tokenizer(teacher_dir(p))), "success_by_task_type": success_by(episodes),
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


def read_pretrained_arch(model) -> dict[str, Any]:
    """The architecture numbers of a loaded model (for cards)."""
    c = model.config
    return {"hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "intermediate_size": getattr(c, "intermediate_size", None), "vocab_size": c.vocab_size}


INFLUENCE_WINDOWS = 16  # training windows on which block influence picks a student's layers


def resolve_student_layers(p: Params, teacher, train_windows) -> list[int] | None:
    """The teacher layers each student keeps: ``distill.student_layers`` as listed, or, when it is a
    number, that many layers of highest block influence on the first training windows (deterministic:
    the windows' order is seeded)."""
    from sad.pretrained import block_influence, most_influential_layers

    keep = p.distill.student_layers
    if keep is None or isinstance(keep, list):
        return keep
    n = teacher.config.num_hidden_layers
    if keep > n:
        raise ValueError(f"distill.student_layers keeps {keep} layers, but the teacher has {n}")
    sequences = [list(ids) for ids in train_windows["input_ids"].head(INFLUENCE_WINDOWS)]
    influence = block_influence(teacher, sequences)
    chosen = most_influential_layers(influence, keep)
    log.info("students keep %d of the teacher's %d layers, by block influence: %s (dropped %s)", keep, n, chosen,
             [i for i in range(n) if i not in chosen])
    return chosen


def _train_student(p: Params, inputs, arch, seed: int, out_dir: Path, method: str, on_log=None,
                   progress: bool = True, checkpoint_for: Path | None = None,
                   keep_layers: list[int] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Train and save one student into ``out_dir``; returns (metrics, loss history). Checkpoints
    live under the final model path ``checkpoint_for`` (default ``out_dir``) so a rerun finds them."""
    from sad.modeling import build_llama, count_parameters, save_model
    from sad.training import train_lm

    spec, tokenizer, teacher, train_w, dev_w, cached, order, data_hash = inputs
    train = p.distill.train.model_copy(update={"seed": seed})
    if keep_layers is not None:  # the teacher's embeddings, head and these layers
        from sad.pretrained import layer_subset

        student = layer_subset(teacher, keep_layers)
        shape = {"layers_from_teacher": list(keep_layers), **read_pretrained_arch(student)}
    else:
        student = build_llama(arch, tokenizer, p.context.max_tokens, seed=seed)
        shape = arch.model_dump()
    online = spec.needs_teacher and cached is None
    result = train_lm(student, train_w, spec, train, tokenizer.pad_token_id,
                      teacher=teacher if online else None, cached=cached, dev_windows=dev_w,
                      curriculum_order=order, curriculum=p.distill.curriculum,
                      checkpoint_dir=checkpoint_dir(checkpoint_for or out_dir),
                      fingerprint=fingerprint(method, seed, shape, spec.model_dump(),
                                              p.distill.model_dump(exclude={"methods", "seeds", "scaling", "student"}),
                                              p.context.model_dump(), data_hash),
                      on_log=on_log, progress=progress, desc=f"distill {method} seed {seed}")
    if not is_main_process():
        return {}, []
    n_student, n_teacher = count_parameters(student), count_parameters(teacher)
    card = {
        "role": "student", "method": method, "seed": seed, "objective": spec.describe(), "loss": spec.model_dump(),
        "parameters": n_student, "teacher_parameters": n_teacher, "compression": n_teacher / n_student,
        "arch": shape, "final_loss": result.final_loss, "dev": result.dev,
        "teacher_logits": p.distill.teacher_logits.mode if spec.needs_teacher else "-",
        "curriculum": order is not None, "data_hash": data_hash,
    }
    save_model(student, tokenizer, out_dir, card)
    metrics = {"parameters": n_student, "compression": card["compression"], "final_loss": result.final_loss,
               "steps": result.steps, "train_tokens_per_s": result.tokens_per_second,
               "train_seconds": result.seconds, "resumed_from_step": result.resumed_from,
               **{f"dev_{k}": v for k, v in result.dev.items()}}
    return metrics, result.history


def _mean_metrics(per_seed: dict[str, dict[str, Any]]) -> dict[str, float]:
    keys = {k for m in per_seed.values() for k, v in m.items() if isinstance(v, (int, float))}
    return {k: sum(m[k] for m in per_seed.values() if k in m) / len(per_seed) for k in sorted(keys)}


def run_distill(p: Params, method: str, on_log=None, progress: bool = True) -> dict[str, Any]:
    """Train one student per seed with ``method``'s loss against the teacher (online or cached logits)."""
    import csv
    import io

    inputs = distill_inputs(p, method)
    spec = inputs[0]
    keep_layers = resolve_student_layers(p, inputs[2], inputs[3])
    per_seed: dict[str, dict[str, Any]] = {}
    curves: list[dict[str, Any]] = []
    with atomic_dir(student_dir(p, method)) as tmp:
        for seed in p.distill.seeds:
            log_seed = (lambda step, record, s=seed: on_log(step, {f"seed{s}/{k}": v for k, v in record.items()})) if on_log else None
            metrics, history = _train_student(p, inputs, p.distill.student, seed, tmp / f"seed{seed}", method,
                                              log_seed, progress, checkpoint_for=student_dir(p, method, seed),
                                              keep_layers=keep_layers)
            per_seed[str(seed)] = metrics
            curves += [{"step": h["step"], "seed": seed, "loss": h["loss"]} for h in history]
    if not is_main_process():
        return {}
    mean = _mean_metrics(per_seed)
    out = {**mean, "objective": spec.describe(), "normalisation": spec.normalisation if spec.loss == "sad" else "-",
           "teacher_logits": p.distill.teacher_logits.mode if spec.needs_teacher else "-",
           "curriculum": inputs[6] is not None, "layers_from_teacher": keep_layers, "seeds": per_seed}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "seed", "loss"])
    writer.writeheader()
    writer.writerows(curves)
    write_text_atomic(p.path("metrics", "curves", f"{method}.csv"), buf.getvalue())
    write_json_atomic(p.path("metrics", "distill", f"{method}.json"), out)
    return out


def _agreement(p: Params, agent, progress: bool) -> dict[str, Any] | None:
    """Teacher-forced CoT match / action agreement on the teacher's test episodes (None if absent)."""
    from sad.evaluation import teacher_forced_agreement

    path = p.path("data", "eval", "teacher", "test.jsonl")
    if not path.is_file():
        log.warning("%s not found: no CoT match / action agreement (run evaluate_teacher first)", path)
        return None
    return teacher_forced_agreement(agent, read_episodes(path), p.context.max_tokens, p.context.history_steps,
                                    p.evaluate.cot_threshold, p.evaluate.batch_size, p.evaluate.agreement_steps,
                                    seed=p.project.seed, progress=progress)


def _step_accuracy(p: Params, agent, progress: bool) -> dict[str, Any] | None:
    """Step accuracy on the expert's dev episodes (None if the demos stage wrote none)."""
    from sad.evaluation import step_accuracy

    path = dev_demos_file(p)
    if not path.is_file():
        log.warning("%s not found: no step accuracy (rerun the demos stage)", path)
        return None
    return step_accuracy(agent, read_episodes(path), p.context.max_tokens, p.context.history_steps,
                         p.evaluate.batch_size, p.evaluate.step_accuracy_steps, seed=p.project.seed, progress=progress)


def _mean_step_accuracy(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
            "overall": _mean_metrics({s: r[split]["overall"] for s, r in per_seed.items()}),
            "envs": {env: _mean_metrics({s: r[split]["envs"][env] for s, r in per_seed.items()}) for env in body["envs"]},
            "by_task_type": _mean_metrics({s: r[split]["by_task_type"] for s, r in per_seed.items()}),
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
    with atomic_dir(p.path("data", "eval", agent)) as tmp:
        for seed, model_dir in seeds.items():
            lm = load_agent(model_dir, p)
            res, episodes = evaluate_agent(model_dir, agent, p, tasks_root(p), progress=progress, agent=lm,
                                           player=players(model_dir) if players else None)
            per_seed[seed] = res["splits"]
            results.update({"method": res["method"], "parameters": res["parameters"]})
            folder = tmp if agent == "teacher" else tmp / f"seed{seed}"
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
    card = read_card(seeds[next(iter(seeds))])
    results.update({
        "objective": card.get("objective", "imitation of the expert demos" if agent == "teacher" else "-"),
        "compression": card.get("compression", 1.0),
        "splits": aggregate_seeds(per_seed),
        "seeds": {s: {"splits": r} for s, r in per_seed.items()},
    })
    if accuracy:
        results["step_accuracy"] = _mean_step_accuracy(accuracy)
    if agreement:
        results["agreement"] = {
            "cot_match_rate": sum(a["cot_match_rate"] for a in agreement.values()) / len(agreement),
            "action_agreement": sum(a["action_agreement"] for a in agreement.values()) / len(agreement),
            "threshold": p.evaluate.cot_threshold, "seeds": agreement,
        }
    write_json_atomic(eval_metrics_file(p, agent), results)
    return results


def run_scale(p: Params, size: str, progress: bool = True) -> dict[str, Any]:
    """One point of the scaling sweep: ``distill.scaling.method`` at student size ``size``
    (first seed), evaluated on the test split."""
    from sad.evaluation import evaluate_agent, load_agent

    if size not in p.distill.scaling.sizes:
        raise ValueError(f"unknown size {size!r}; distill.scaling.sizes has {sorted(p.distill.scaling.sizes)}")
    method, seed = p.distill.scaling.method, p.distill.seeds[0]
    inputs = distill_inputs(p, method)
    metrics, _ = _train_student(p, inputs, p.distill.scaling.sizes[size], seed, scaling_dir(p, size),
                                f"{method}@{size}", progress=progress)
    test_only = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"splits": ["test"]})})
    res, _ = evaluate_agent(scaling_dir(p, size), method, test_only, tasks_root(p), progress=progress,
                            agent=load_agent(scaling_dir(p, size), p))
    out = {"size": size, "method": method, "seed": seed, "arch": p.distill.scaling.sizes[size].model_dump(),
           "parameters": metrics["parameters"], "train": metrics, "splits": res["splits"]}
    write_json_atomic(p.path("metrics", "scaling", f"{size}.json"), out)
    return out


def load_eval_results(p: Params, agents: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for agent in agents:
        path = eval_metrics_file(p, agent)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage evaluate --agent {agent}' first)")
        out[agent] = json.loads(path.read_text())
    return out


def _seed_gate_values(p: Params, method: str, result: dict[str, Any]) -> dict[str, float]:
    """{seed: gate metric value} for one method (evaluation, agreement or distillation metrics)."""
    metric, split = p.registration.gate_metric, p.registration.gate_split
    if metric in ("dev_ce", "dev_act_accuracy"):
        path = p.path("metrics", "distill", f"{method}.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage distill --method {method}' first)")
        seeds = json.loads(path.read_text())["seeds"]
        return {s: float(v[metric]) for s, v in seeds.items()}
    if metric in ("cot_match_rate", "action_agreement"):
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


def candidate_file(p: Params) -> Path:
    return p.path("reports", "candidate.json")


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
                        per_task=per_task_values(episodes, p.registration.gate_metric))
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
    from sad.registry import per_task_values

    split, wanted = p.registration.gate_split, set(task_ids)
    tasks = [t for env in p.tasks.envs for t in load_tasks(tasks_root(p), env, split) if t.task_id in wanted]
    missing = sorted(wanted - {t.task_id for t in tasks})
    if missing:
        raise ValueError(f"cannot replay the champion on {len(missing)} {split} tasks that are not in "
                         f"{tasks_root(p)} (e.g. {missing[:3]}): run the tasks stage first")
    agent = LMAgent(model, tokenizer, p.context.max_new_tokens, temperature=p.rollout.temperature, seed=p.rollout.seed)
    episodes, _ = play_model(Path("."), p, tasks_root(p), tasks, "champion", p.evaluate.batch_size, agent=agent)
    return per_task_values(episodes, p.registration.gate_metric)


def load_scaling_results(p: Params) -> dict[str, dict[str, Any]]:
    out = {}
    for size in p.distill.scaling.sizes:
        path = p.path("metrics", "scaling", f"{size}.json")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run 'sad stage scale --size {size}' first)")
        out[size] = json.loads(path.read_text())
    return out


def run_report(p: Params) -> dict[str, Any]:
    """results.md in the paper's layout, with CIs, the paired SAD vs token-KD comparison and plots."""
    from sad import report as r

    agents = ["teacher", *p.distill.methods]
    results = load_eval_results(p, agents)
    scaling = load_scaling_results(p)
    n_boot, confidence = p.evaluate.bootstrap, p.evaluate.confidence
    registry_file = candidate_file(p)
    registry = json.loads(registry_file.read_text()) if registry_file.is_file() else None
    objectives = {m: s.describe() for m, s in p.distill.methods.items()}
    paired_md, paired = r.paired_section(results, "sad", "token_kd", "test", n_boot, confidence)
    verdict_md = r.verdict(paired, "sad", "token_kd", confidence)
    method = p.distill.scaling.method
    points = r.scaling_points(results, scaling, method, n_boot, confidence)
    teacher_success = results["teacher"]["splits"]["test"]["overall"]["success_rate"]
    reports = p.path("reports")
    r.success_plot(results, reports / "success.png", n_boot, confidence)
    r.scaling_plot(points, method, teacher_success, reports / "scaling.png")
    r.reasoning_plot(results, reports / "reasoning.png")
    r.curves_plot(r.read_curves(p.path("metrics", "curves"), list(p.distill.methods)), reports / "learning_curves.png")
    text = r.render_report(results, registry, p.project.profile, objectives, r.scaling_table(points, method),
                           paired_md, verdict_md, n_boot, confidence)
    write_text_atomic(reports / "results.md", text)
    summary = {
        "test_success": {a: res["splits"]["test"]["overall"]["success_rate"] for a, res in results.items()},
        "sad_vs_token_kd": paired.get("all envs", {}),
        "scaling": {pt["size"]: {"parameters": pt["parameters"], "success": pt["success"].mean} for pt in points},
    }
    write_json_atomic(p.path("metrics", "report.json"), summary)
    return summary
