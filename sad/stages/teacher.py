"""Stage ``teacher``: imitation on the demos (from scratch, fine-tuned or LoRA), DAgger rounds, or the
shipped teacher as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sad.config import Params
from sad.environments import load_tasks
from sad.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from sad.modeling import read_pretrained_arch
from sad.react import Episode
from sad.stages.layout import (
    checkpoint_dir,
    dagger_dir,
    demos_file,
    dir_hash,
    file_hash,
    fingerprint,
    is_main_process,
    pretrained_dir,
    read_episodes,
    tasks_root,
    teacher_dir,
    tokenizer_dir,
)

if TYPE_CHECKING:
    from sad.envs.base import Task

log = logging.getLogger(__name__)


def run_teacher(p: Params, on_log=None, progress: bool = True) -> dict[str, Any]:
    """Train the embedded-default teacher by imitation of the expert demos."""
    from sad.modeling import build_llama, count_parameters, save_model
    from sad.segment import segment_episodes
    from sad.tokenizer import load_tokenizer
    from sad.training import IMITATION, split_dev, train_lm

    tokenizer = load_tokenizer(tokenizer_dir(p))
    if p.teacher.source is not None and not p.teacher.finetune:
        return use_teacher_as_is(p, tokenizer)
    episodes = read_episodes(demos_file(p))
    seg = segment_episodes(episodes, tokenizer, p.context.max_tokens, p.context.history_steps, what=str(demos_file(p)))
    train_w, dev_w = split_dev(seg.windows, p.teacher.train.dev_fraction, p.teacher.train.seed)
    if p.teacher.source is not None:
        model = load_source_model(p, tokenizer)  # fine-tuned on the demos below
    else:
        model = build_llama(p.teacher.arch, tokenizer, p.context.max_tokens, seed=p.teacher.train.seed)
    init_hash = None
    if p.teacher.init is not None:
        from sad.pretrained import continue_lora

        model = continue_lora(model, p.teacher.init, p.teacher.source, p.teacher.lora)
        init_hash = dir_hash(p.teacher.init)
        log.info("teacher: training goes on from the adapter in %s", p.teacher.init)
    elif p.teacher.lora is not None:
        from sad.pretrained import add_lora

        model = add_lora(model, p.teacher.lora, p.teacher.train.seed)
    data_hash = file_hash(demos_file(p))
    # the tokenizer's files too: a checkpoint's embedding rows are ids of the tokenizer it was trained with
    base_fingerprint = fingerprint(p.teacher.model_dump(exclude={"dagger"}), p.context.model_dump(), data_hash,
                                   file_hash(pretrained_dir(p) / "card.json"), init_hash, dir_hash(tokenizer_dir(p)))

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
    if p.teacher.init is not None:
        card["objective"] = f"{p.teacher.init} (an adapter over {p.teacher.source}) trained further on the expert demos"
        card["init"] = init_card(p.teacher.init, init_hash)
    if dagger:
        card["dagger"] = {"params": p.teacher.dagger.model_dump(), "rounds": dagger}
    if p.teacher.lora is not None:
        from sad.pretrained import save_lora_teacher

        card["lora"] = p.teacher.lora.model_dump()
        card["adapter_parameters"] = sum(t.numel() for t in model.parameters() if t.requires_grad)
        card["parameters"] -= card["adapter_parameters"]  # the merged model has the base's size
        model = save_lora_teacher(model, tokenizer, teacher_dir(p), p.teacher.source, card, files=dagger_files(p))
    else:
        save_model(model, tokenizer, teacher_dir(p), card, files=dagger_files(p))
    if dagger:  # kept in the teacher folder now: the phases kept for resuming go
        import shutil

        shutil.rmtree(dagger_dir(p), ignore_errors=True)
    metrics = {"parameters": card["parameters"], "final_loss": result.final_loss, "steps": result.steps,
               "train_tokens_per_s": result.tokens_per_second, "train_seconds": result.seconds,
               "train_precision": result.precision,
               "windows": len(train_w), "dev_windows": len(dev_w), **{f"dev_{k}": v for k, v in result.dev.items()}}
    for r, summary in enumerate(dagger):
        metrics.update({f"dagger{r}_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    write_json_atomic(p.path("metrics", "teacher.json"), metrics)
    return metrics


def init_card(folder: str, content_hash: str) -> dict[str, Any]:
    """Where a continued teacher started: the folder, its content hash and its own card's provenance
    (recipe commit, demos hash, measured success), so the chain of recipes stays readable."""
    import json
    from pathlib import Path

    card_file = Path(folder) / "card.json"
    started = json.loads(card_file.read_text()) if card_file.is_file() else {}
    keep = ("commit", "data_hash", "profile", "measured", "test_success", "recipe")
    return {"folder": folder, "hash": content_hash, **{k: started[k] for k in keep if k in started}}


def dagger_tasks(p: Params, round_index: int) -> list[Task]:
    """Round ``round_index``'s train tasks: per env, block ``dagger.first_block + round_index`` of
    ``teacher.dagger.tasks[env]`` tasks (wrapping around when the blocks run past the train split)."""
    tasks = []
    block = p.teacher.dagger.first_block + round_index
    for env in p.tasks.envs:
        n = p.teacher.dagger.tasks.get(env, 0)
        pool = load_tasks(tasks_root(p), env, "train")
        if n and pool:
            tasks += [pool[(block * n + i) % len(pool)] for i in range(min(n, len(pool)))]
    return tasks


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
    from sad.training import IMITATION, load_phase, save_phase, split_dev, train_lm

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("teacher.dagger plays episodes between training rounds and runs in one process; "
                           "run the teacher stage without accelerate launch (or set teacher.dagger: null)")
    d, root = p.teacher.dagger, dagger_dir(p)
    key = base_fingerprint
    result = load_phase(root / "imitation", model, key)
    if result is None:
        result = imitation()
        save_phase(root / "imitation", model, result, key)
    else:
        log.info("dagger: imitation already done (%s), resuming after it", root / "imitation")
    summaries = []
    for r in range(d.rounds):
        round_dir = root / f"round-{r}"
        tasks = dagger_tasks(p, r)
        key = fingerprint(key, d.model_dump(), r, [t.task_id for t in tasks])
        played = round_dir / "takeover.jsonl"
        key_file = round_dir / "key"  # written after the episodes: a run stopped between the two plays again
        if played.exists() and key_file.is_file() and key_file.read_text() == key:
            takeover = read_episodes(played)
        else:
            log.info("dagger round %d: the teacher plays %d train tasks, the expert takes over at its first mistake",
                     r, len(tasks))
            model.eval()
            agent = LMAgent(model, tokenizer, p.context.max_new_tokens)
            takeover = play_takeover(tasks, tasks_root(p), agent, p.context.max_tokens, p.rollout.batch_size,
                                     p.context.history_steps, progress=progress, evict_to=p.context.evict_to)
            round_dir.mkdir(parents=True, exist_ok=True)
            key_file.unlink(missing_ok=True)  # an earlier key must not vouch for the episodes written next
            write_jsonl_atomic(played, (e.to_dict() for e in takeover))
            write_text_atomic(key_file, key)
        mixed = list(demos)
        random.Random(f"{d.train.seed}:{r}").shuffle(mixed)
        seg = segment_episodes(takeover + mixed[:d.demos], tokenizer, p.context.max_tokens, p.context.history_steps,
                               what=f"dagger round {r}")
        train_w, dev_w = split_dev(seg.windows, d.train.dev_fraction, d.train.seed)
        summaries.append(dagger_summary(takeover, len(train_w)))
        done = load_phase(round_dir / "trained", model, key)
        if done is not None:
            result = done
            continue
        model.train()
        result = train_lm(model, train_w, IMITATION, d.train, tokenizer.pad_token_id, dev_windows=dev_w,
                          checkpoint_dir=round_dir / "checkpoint", fingerprint=fingerprint(key, file_hash(played)),
                          on_log=on_log, progress=progress, desc=f"teacher dagger {r}")
        save_phase(round_dir / "trained", model, result, key)
    model.eval()
    return result, summaries


def dagger_files(p: Params) -> dict[str, Path]:
    """Each DAgger round's takeover episodes (what the teacher got wrong and how the expert recovered), to be
    written into the teacher folder with the model as ``dagger/round-<r>.jsonl``; none without DAgger."""
    if p.teacher.dagger is None:
        return {}
    return {f"dagger/round-{r}.jsonl": dagger_dir(p) / f"round-{r}" / "takeover.jsonl" for r in range(p.teacher.dagger.rounds)}


def dagger_summary(takeover: list[Episode], windows: int) -> dict[str, Any]:
    """Per env: share of episodes where the agent made a mistake, its mean step, and what training saw."""
    out: dict[str, Any] = {"episodes": len(takeover), "windows": windows}
    for env in sorted({e.env for e in takeover}):
        eps = [e for e in takeover if e.env == env]
        steps = [e.meta["takeover_step"] for e in eps if "takeover_step" in e.meta]
        out[f"{env}_mistake_rate"] = len(steps) / len(eps)
        out[f"{env}_first_mistake_step"] = sum(steps) / len(steps) if steps else None
    return out


def load_source_model(p: Params, tokenizer):
    """The pretrained source (the ``pretrained`` stage's model), its embedding and head cut to the tokenizer
    stage's domain vocabulary when it wrote one (``tokenizer.domain_vocab``)."""
    from sad.modeling import load_model, restrict_vocabulary
    from sad.tokenizer import read_domain_vocab

    model = load_model(pretrained_dir(p))
    keep = read_domain_vocab(tokenizer_dir(p))
    if keep is None:
        return model
    if max(keep) >= model.config.vocab_size:
        raise ValueError(f"{tokenizer_dir(p)}: the domain vocabulary keeps token id {max(keep)}, but the model in "
                         f"{pretrained_dir(p)} has {model.config.vocab_size} rows: rerun the tokenizer stage")
    source_rows = model.config.vocab_size
    restrict_vocabulary(model, keep, tokenizer)
    log.info("teacher vocabulary cut to the domain's %d of %d tokens", len(keep), source_rows)
    return model


def use_teacher_as_is(p: Params, tokenizer) -> dict[str, Any]:
    """``teacher.finetune: false``: the source (e.g. the shipped teacher) is the teacher, unchanged;
    its card (recipe, data hash, measured success) is kept under ``shipped``."""
    from sad.modeling import count_parameters, read_card, save_model

    model = load_source_model(p, tokenizer)
    source_card = read_card(pretrained_dir(p))
    card = {"role": "teacher", "method": "as is", "parameters": count_parameters(model), "source": p.teacher.source,
            "objective": f"{p.teacher.source}, used as it is (teacher.finetune: false)",
            "arch": read_pretrained_arch(model), "shipped": source_card}
    save_model(model, tokenizer, teacher_dir(p), card)
    metrics = {"parameters": card["parameters"], "finetuned": 0}
    write_json_atomic(p.path("metrics", "teacher.json"), metrics)
    return metrics
