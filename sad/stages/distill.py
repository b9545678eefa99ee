"""Stage ``distill@<method>``: one student per seed, distilled with the method's loss."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sad.config import Params
from sad.io import atomic_dir, write_json_atomic, write_text_atomic
from sad.modeling import read_pretrained_arch
from sad.stages.layout import (
    checkpoint_dir,
    demos_file,
    file_hash,
    fingerprint,
    is_main_process,
    mean_over_seeds,
    read_episodes,
    segments_dir,
    student_dir,
    student_init_dir,
    tasks_root,
    teacher_dir,
    teacher_logits_dir,
    tokenizer_dir,
)
from sad.stages.resume import FinishedSeeds

log = logging.getLogger(__name__)


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


def load_student_init(p: Params):
    """The student every method starts from (``student_init`` stage output) and its card, or (None, None) for
    from-scratch students (``distill.student_layers: null``)."""
    import json

    from sad.modeling import load_model

    if p.distill.student_layers is None:
        return None, None
    folder = student_init_dir(p)
    card_file = folder / "card.json"
    if not card_file.is_file():
        raise FileNotFoundError(f"{folder}: no initial student (distill.student_layers is set): run `sad stage "
                                "student_init` (or `dvc repro`) first")
    card = json.loads(card_file.read_text())
    if card.get("from_scratch") or card.get("layers_from_teacher") is None:
        raise ValueError(f"{folder}: written for from-scratch students, but distill.student_layers is "
                         f"{p.distill.student_layers}: rerun `sad stage student_init`")
    return load_model(folder), card


def _train_student(p: Params, inputs, arch, seed: int, out_dir: Path, method: str, on_log=None,
                   progress: bool = True, checkpoint_for: Path | None = None,
                   init: tuple[Any, dict] | None = None,
                   finished: FinishedSeeds | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Train and save one student into ``out_dir``; returns (metrics, loss history). The student starts as
    a copy of ``init`` (the ``student_init`` stage's (model, card)) or, without it, from scratch shaped by
    ``arch``. Checkpoints live under the final model path ``checkpoint_for`` (default ``out_dir``) so a
    rerun finds them; a seed already in ``finished`` (same settings, data and code) is copied, not trained."""
    from sad.modeling import build_llama, count_parameters, save_model
    from sad.training import train_lm

    spec, tokenizer, teacher, train_w, dev_w, cached, order, data_hash = inputs
    train = p.distill.train.model_copy(update={"seed": seed})
    if init is not None:  # the teacher's cut (healed): a copy per seed
        import copy

        student = copy.deepcopy(init[0])
        student.train()
        shape = {"layers_from_teacher": list(init[1]["layers_from_teacher"]), "healed": bool(init[1].get("healed")),
                 **read_pretrained_arch(student)}
    else:
        student = build_llama(arch, tokenizer, p.context.max_tokens, seed=seed)
        shape = arch.model_dump()
    online = spec.needs_teacher and cached is None
    ckpt = checkpoint_dir(checkpoint_for or out_dir)
    key = fingerprint(method, seed, shape, spec.model_dump(), p.distill.model_dump(exclude={"methods", "seeds", "scaling", "student"}),
                      p.context.model_dump(), data_hash, init[1].get("heal") if init is not None else None)
    kept = finished.load(seed, key, out_dir) if finished is not None else None
    if kept is not None:
        log.info("distill %s seed %d: finished before the stage was stopped; kept, not trained again", method, seed)
        for record in kept["history"] if on_log else []:  # its learning curve, as it was logged the first time
            on_log(record["step"], {k: v for k, v in record.items() if k != "phase"})
        return kept["metrics"], kept["history"]

    def off_policy():
        return train_lm(student, train_w, spec, train, tokenizer.pad_token_id,
                        teacher=teacher if online else None, cached=cached, dev_windows=dev_w,
                        curriculum_order=order, curriculum=p.distill.curriculum, checkpoint_dir=ckpt, fingerprint=key,
                        on_log=on_log, progress=progress, desc=f"distill {method} seed {seed}")

    rounds: list[dict[str, Any]] = []
    histories: list[list[dict]] = []
    if spec.onpolicy is None:
        result = off_policy()
    else:  # the off-policy phase is kept, so that a crash in a round resumes after it
        from sad.training import load_phase, save_phase

        result = load_phase(ckpt / "offpolicy", student, key)
        if result is None:
            result = off_policy()
            save_phase(ckpt / "offpolicy", student, result, key)
        rounds, histories = onpolicy_rounds(p, spec, student, teacher, tokenizer, train_w, dev_w, seed, ckpt / "onpolicy",
                                            key, on_log, progress)
    if not is_main_process():
        return {}, []
    n_student, n_teacher = count_parameters(student), count_parameters(teacher)
    card = {
        "role": "student", "method": method, "seed": seed, "objective": spec.describe(), "loss": spec.model_dump(),
        "parameters": n_student, "teacher_parameters": n_teacher, "compression": n_teacher / n_student,
        "arch": shape, "final_loss": result.final_loss, "dev": result.dev,
        "teacher_logits": p.distill.teacher_logits.mode if spec.needs_teacher else "-",
        "curriculum": order is not None, "data_hash": data_hash,
        **({"onpolicy_rounds": rounds} if rounds else {}),
    }
    played = ckpt / "onpolicy" / "episodes"  # each round's student data, versioned with the student (a rerun
    save_model(student, tokenizer, out_dir, card,  # reproduces it), written with it
               files={f"onpolicy/{f.name}": f for f in sorted(played.iterdir()) if f.is_file()} if rounds else None)
    metrics = {"parameters": n_student, "compression": card["compression"], "final_loss": result.final_loss,
               "steps": result.steps, "train_tokens_per_s": result.tokens_per_second,
               "train_seconds": result.seconds, "resumed_from_step": result.resumed_from,
               "train_precision": result.precision,
               **{f"dev_{k}": v for k, v in result.dev.items()},
               **{f"onpolicy_r{r['round']}_{k}": v for r in rounds for k, v in r.items() if k != "round"}}
    history = [{**h, "phase": "off-policy"} for h in result.history]
    for r, round_history in enumerate(histories):  # the learning curve goes on through the rounds
        offset = history[-1]["step"] if history else 0
        history += [{**h, "step": h["step"] + offset, "phase": f"round {r}"} for h in round_history]
    if finished is not None:
        finished.save(seed, key, out_dir, {"metrics": metrics, "history": history})
    if rounds:
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)  # the phases kept for resuming (the finished seed is kept above)
    return metrics, history


def onpolicy_rounds(p: Params, spec, student, teacher, tokenizer, teacher_windows, dev_windows, seed: int, work: Path,
                    key: str, on_log=None, progress: bool = True) -> tuple[list[dict[str, Any]], list[list[dict]]]:
    """``spec.onpolicy.rounds`` rounds of play -> score -> train on ``student`` (in place; see
    :mod:`sad.onpolicy`). Each round's episodes and trained weights are kept under ``work`` with their key,
    so a rerun after a crash resumes at the round it stopped in. Returns (one summary per round, each round's
    training loss history)."""
    import os

    from sad.agent import LMAgent
    from sad.environments import load_tasks
    from sad.io import write_jsonl_atomic
    from sad.onpolicy import act_only, expert_labelled_episodes, mix_windows, play_round, round_summary, round_tasks
    from sad.segment import segment_episodes
    from sad.training import IMITATION, load_phase, save_phase, train_lm

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("onpolicy rounds play episodes between trainings and run in one process; run this "
                           "distill stage without accelerate launch (or remove the method's onpolicy)")
    o = spec.onpolicy
    by_env = {env: load_tasks(tasks_root(p), env, "train") for env in p.tasks.envs}
    task_of = {t.task_id: t for tasks in by_env.values() for t in tasks}
    round_spec = IMITATION if o.loss == "imitation" else \
        spec.model_copy(update={"divergence": o.divergence or spec.divergence, "onpolicy": None})
    other_windows = teacher_windows if o.mix == "rollouts" else segment_episodes(
        read_episodes(demos_file(p)), tokenizer, p.context.max_tokens, p.context.history_steps,
        what=str(demos_file(p))).windows
    mixed_from = [file_hash(demos_file(p))] if o.mix == "demos" else []  # in the rounds' keys
    train = p.distill.train.model_copy(update={"seed": seed, "epochs": o.epochs})
    summaries, histories = [], []
    for r in range(o.rounds):
        # how the student plays (agent.*, rollout.*) decides the round's episodes, so it is in the key too
        key = fingerprint(key, o.model_dump(), r, *mixed_from, p.agent.model_dump(), p.rollout.model_dump())
        tasks = round_tasks(by_env, o.tasks, r)
        played = work / "episodes" / f"round-{r}.jsonl"
        key_file = work / "episodes" / f"round-{r}.key"
        if played.is_file() and key_file.is_file() and key_file.read_text() == key:
            episodes = read_episodes(played)
        else:
            log.info("on-policy round %d: the student plays %d train tasks", r, len(tasks))
            student.eval()
            agent = LMAgent(student, tokenizer, p.context.max_new_tokens, temperature=p.rollout.temperature,
                            seed=p.rollout.seed)
            episodes = play_round(agent, tasks, tasks_root(p), p, o.at_round(o.takeover_start, o.takeover_end, r), seed,
                                  r, progress)
            key_file.unlink(missing_ok=True)  # an earlier key must not vouch for the episodes written next
            write_jsonl_atomic(played, (e.to_dict() for e in episodes))
            write_text_atomic(key_file, key)
        fraction = o.at_round(o.fraction_start, o.fraction_end, r)
        own = segment_episodes(episodes, tokenizer, p.context.max_tokens, p.context.history_steps,
                               what=f"on-policy round {r}").windows
        mixed = mix_windows(own, other_windows, fraction, seed, r)
        labelled = [lab for e in episodes if e.agent.startswith("student")
                    for lab in expert_labelled_episodes(e, task_of[e.task_id], tasks_root(p), o.expert_labels)] \
            if o.expert_labels else []
        summary = {**round_summary(episodes, r), "own_windows": len(own), "windows": len(mixed), "fraction": fraction,
                   "expert_labels": len(labelled)}
        done = load_phase(work / f"round-{r}", student, key)
        if done is None:
            student.train()
            done = train_lm(student, mixed, round_spec, train, tokenizer.pad_token_id,
                            teacher=None if o.loss == "imitation" else teacher,
                            dev_windows=dev_windows, checkpoint_dir=work / f"round-{r}-checkpoint",
                            fingerprint=fingerprint(key, file_hash(played)), on_log=on_log, progress=progress,
                            desc=f"on-policy round {r} seed {seed}")
            if labelled:  # CE on the expert's action after the student's own thought
                windows = act_only(segment_episodes(labelled, tokenizer, p.context.max_tokens, p.context.history_steps,
                                                    what=f"expert labels, round {r}").windows)
                train_lm(student, windows, IMITATION, train, tokenizer.pad_token_id, progress=progress,
                         desc=f"expert labels round {r} seed {seed}")
            save_phase(work / f"round-{r}", student, done, key)
        summaries.append({**summary, "final_loss": done.final_loss, **{f"dev_{k}": v for k, v in done.dev.items()}})
        histories.append(done.history)
        log.info("on-policy round %d: %s", r, summaries[-1])
    student.eval()
    return summaries, histories


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sad-distill-rank-") as folder:
        yield Path(folder)


def run_distill(p: Params, method: str, on_log=None, progress: bool = True) -> dict[str, Any]:
    """Train one student per seed with ``method``'s loss against the teacher (online or cached logits)."""
    import csv
    import io

    inputs = distill_inputs(p, method)
    spec = inputs[0]
    init_model, init_card = load_student_init(p)
    init = (init_model, init_card) if init_model is not None else None
    keep_layers = None if init is None else list(init[1]["layers_from_teacher"])
    per_seed: dict[str, dict[str, Any]] = {}
    curves: list[dict[str, Any]] = []
    finished = FinishedSeeds.for_stage(student_dir(p, method), p, teacher_dir(p), tokenizer_dir(p), student_init_dir(p),
                                       segments_dir(p), teacher_logits_dir(p), demos_file(p), tasks_root(p))
    # only rank 0 writes the stage's output; the other processes of a multi-process run train into a scratch
    # folder they throw away (committing theirs would replace the output with an empty folder)
    with (atomic_dir(student_dir(p, method)) if is_main_process() else _scratch_dir()) as tmp:
        for seed in p.distill.seeds:
            log_seed = (lambda step, record, s=seed: on_log(step, {f"seed{s}/{k}": v for k, v in record.items()})) if on_log else None
            metrics, history = _train_student(p, inputs, p.distill.student, seed, tmp / f"seed{seed}", method,
                                              log_seed, progress, checkpoint_for=student_dir(p, method, seed),
                                              init=init, finished=finished)
            per_seed[str(seed)] = metrics
            curves += [{"step": h["step"], "seed": seed, "loss": h["loss"], "phase": h["phase"]} for h in history]
    if not is_main_process():
        return {}
    mean = mean_over_seeds(per_seed)
    out = {**mean, "objective": spec.describe(), "normalisation": spec.normalisation if spec.loss == "sad" else "-",
           "teacher_logits": p.distill.teacher_logits.mode if spec.needs_teacher else "-",
           "curriculum": inputs[6] is not None, "layers_from_teacher": keep_layers,
           "healed": bool(init and init[1].get("healed")), "seeds": per_seed}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "seed", "loss", "phase"])
    writer.writeheader()
    writer.writerows(curves)
    write_text_atomic(p.path("metrics", "curves", f"{method}.csv"), buf.getvalue())
    write_json_atomic(p.path("metrics", "distill", f"{method}.json"), out)
    if finished is not None:
        finished.clear()
    return out
