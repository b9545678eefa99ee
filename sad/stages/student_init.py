"""Stage ``student_init``: the student every method starts from, built once and shared by all methods and seeds.

With ``distill.student_layers`` the student is the teacher cut to those layers (embeddings, final norm and
head kept); with ``distill.heal.epochs`` > 0 the cut is then *healed*: trained with CE on the expert's train
demos (thoughts and actions; prompts, observations and injected mistakes carry no loss), so that the layers
left relearn to work together before any distillation. Measured (README "What to expect"): a 16-layer cut of
the shipped teacher goes from 8.5% to 75.5% dev step accuracy after one epoch on 450 expert demos.
With ``distill.heal.lora`` the heal trains a LoRA adapter, kept in ``heal_adapter/`` (``sad ship-heal``); with
``distill.heal.source`` such a shipped adapter is merged into the cut instead of healing here (the default).
With ``student_layers: null`` students are built from scratch per seed by ``distill``; this stage then
writes only a card saying so.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from sad.config import Params
from sad.io import atomic_dir, write_json_atomic
from sad.stages.layout import (
    checkpoint_dir,
    demos_file,
    dev_demos_file,
    file_hash,
    fingerprint,
    read_episodes,
    segments_dir,
    student_init_dir,
    teacher_dir,
    tokenizer_dir,
)

log = logging.getLogger(__name__)

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


def _teacher_train_windows(p: Params):
    """The training windows of the teacher's rollouts, in the order distill sees them (block influence
    reads the first of them)."""
    from sad.segment import load_windows
    from sad.training import split_dev

    windows = load_windows(segments_dir(p)).reset_index(drop=True)
    return split_dev(windows, p.distill.train.dev_fraction, p.distill.train.seed)[0].reset_index(drop=True)


HEAL_ADAPTER = "heal_adapter"  # inside models/student_init: the adapter a LoRA heal trained (what `sad ship-heal` ships)


def teacher_identity(p: Params) -> dict[str, Any]:
    """The teacher a cut comes from, as a heal adapter records it: ``teacher.source`` and, for a folder used
    as it is, the sha256[:16] of its weight files (a fine-tuned or from-scratch teacher has no fixed identity)."""
    import hashlib

    source, digest = p.teacher.source, None
    if source is not None and Path(source).is_dir():
        source = Path(source).as_posix()  # ./assets/teacher and assets/teacher are one folder
    if source is not None and not p.teacher.finetune and Path(source).is_dir():
        h = hashlib.sha256()
        for weights in sorted(Path(source).glob("*.safetensors")):
            h.update(weights.name.encode() + b"\0" + weights.read_bytes())
        digest = h.hexdigest()[:16]
    return {"source": source, "finetune": p.teacher.finetune, "weights": digest}


def apply_heal_adapter(cut, folder: Path, keep: list[int], teacher: dict[str, Any]):
    """``cut`` with the heal adapter of ``folder`` merged in (``distill.heal.source``). The adapter must have
    been trained on the same layers of the same teacher; its card (card.json) says which."""
    from peft import PeftModel

    from sad.pretrained import ADAPTER_CARD

    card_file = folder / ADAPTER_CARD
    if not card_file.is_file():
        raise FileNotFoundError(f"distill.heal.source: {folder} holds no heal adapter (no {ADAPTER_CARD}); write one with "
                                "`sad ship-heal`, or set distill.heal.source: null")
    card = json.loads(card_file.read_text())
    if card.get("role") != "heal_adapter":
        raise ValueError(f"distill.heal.source: {folder} is not a heal adapter (its card's role is {card.get('role')!r})")
    if card.get("layers_from_teacher") != keep:
        raise ValueError(f"distill.heal.source: {folder} was trained on the teacher's layers {card.get('layers_from_teacher')}, "
                         f"but distill.student_layers is {keep}: set it to {card.get('layers_from_teacher')}")
    if card.get("teacher") != teacher or teacher["weights"] is None:
        raise ValueError(f"distill.heal.source: {folder} was trained on a cut of the teacher {card.get('teacher')}, but "
                         f"this project's teacher is {teacher}: heal here instead (distill.heal: source: null, epochs: 1)")
    return PeftModel.from_pretrained(cut, str(folder)).merge_and_unload()


def heal(p: Params, student, tokenizer, keep: list[int], progress: bool = True) -> tuple[dict[str, Any], Any]:
    """Train ``student`` with CE on the expert's train demos (``distill.heal``): in place, or through a LoRA
    adapter (``distill.heal.lora``); dev loss on the expert's dev demos. Checkpoints under the stage's output
    path, so a killed run resumes (only into the same cut: ``keep``, the teacher's layers it holds, is in the
    checkpoint's key). Returns (metrics, the peft model to merge and keep, or None)."""
    from sad.segment import segment_episodes
    from sad.training import IMITATION, train_lm

    h = p.distill.heal
    demos = read_episodes(demos_file(p))
    if not demos:
        raise ValueError(f"{demos_file(p)}: no expert demos to heal the student on (rerun the demos stage, or set "
                         "distill.heal.epochs: 0)")
    windows = segment_episodes(demos, tokenizer, p.context.max_tokens, p.context.history_steps,
                               what=f"expert demos ({demos_file(p)})").windows.reset_index(drop=True)
    dev_windows = None
    if dev_demos_file(p).is_file():
        dev = read_episodes(dev_demos_file(p))
        if dev:
            dev_windows = segment_episodes(dev, tokenizer, p.context.max_tokens, p.context.history_steps,
                                           what=f"expert dev demos ({dev_demos_file(p)})").windows
    train = p.distill.train.model_copy(update={"epochs": h.epochs, "lr": h.lr, "precision": h.precision})
    key = fingerprint("heal", h.model_dump(), train.model_dump(), p.context.model_dump(), file_hash(demos_file(p)),
                      list(keep),
                      file_hash(teacher_dir(p) / "model.safetensors") if (teacher_dir(p) / "model.safetensors").is_file() else "")
    log.info("healing the student on %d expert demos (%d windows, %d tokens), %.3g epoch(s)%s", len(demos), len(windows),
             int(windows["n_tokens"].sum()), h.epochs, f", LoRA rank {h.lora.r}" if h.lora else "")
    model = student
    if h.lora is not None:
        from sad.pretrained import add_lora

        model = add_lora(student, h.lora, train.seed)
    result = train_lm(model, windows, IMITATION, train, tokenizer.pad_token_id, dev_windows=dev_windows,
                      checkpoint_dir=checkpoint_dir(student_init_dir(p)), fingerprint=key, progress=progress,
                      desc="heal student")
    metrics = {"demos": len(demos), "windows": len(windows), "tokens": int(windows["n_tokens"].sum()),
               "demos_sha256": file_hash(demos_file(p)), "epochs": h.epochs, "lr": h.lr, "steps": result.steps,
               "final_loss": result.final_loss, "seconds": result.seconds,
               "train_tokens_per_s": result.tokens_per_second, "resumed_from_step": result.resumed_from,
               "train_precision": result.precision, **({"lora": h.lora.model_dump()} if h.lora else {}),
               **{f"dev_{k}": v for k, v in result.dev.items()}}
    return metrics, (model if h.lora is not None else None)


def run_student_init(p: Params, progress: bool = True) -> dict[str, Any]:
    """Write ``models/student_init``: the teacher cut to ``distill.student_layers``, healed on the expert's
    demos when ``distill.heal.epochs`` > 0 (or, for from-scratch students, a card only)."""
    from sad.modeling import count_parameters, load_model, read_pretrained_arch
    from sad.pretrained import layer_subset
    from sad.tokenizer import load_tokenizer

    out = student_init_dir(p)
    if p.distill.student_layers is None:
        metrics: dict[str, Any] = {"from_scratch": True}
        with atomic_dir(out) as tmp:
            write_json_atomic(tmp / "card.json", {"role": "student_init", "from_scratch": True,
                                                  "note": "distill builds each student from scratch (distill.student)"})
        write_json_atomic(p.path("metrics", "student_init.json"), metrics)
        return metrics
    started = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir(p))
    teacher = load_model(teacher_dir(p))
    by_influence = isinstance(p.distill.student_layers, int)
    keep = resolve_student_layers(p, teacher, _teacher_train_windows(p) if by_influence else None)
    student = layer_subset(teacher, keep)
    metrics = {"from_scratch": False, "layers_from_teacher": keep, "parameters": count_parameters(student),
               "teacher_parameters": count_parameters(teacher)}
    metrics["compression"] = metrics["teacher_parameters"] / metrics["parameters"]
    h = p.distill.heal
    adapter = None
    if h.source is not None:
        student = apply_heal_adapter(student, Path(h.source), keep, teacher_identity(p))
        shipped = json.loads((Path(h.source) / "card.json").read_text())
        metrics["heal"] = {"source": h.source, **{k: shipped[k] for k in ("recipe", "commit", "heal") if k in shipped}}
        log.info("student_init: the heal adapter %s merged into the cut (its recipe: %s)", h.source, shipped.get("recipe"))
    elif h.epochs > 0:
        metrics["heal"], adapter = heal(p, student, tokenizer, keep, progress)
    card = {"role": "student_init", "layers_from_teacher": keep, **read_pretrained_arch(student),
            "healed": "heal" in metrics, **({"heal": metrics["heal"]} if "heal" in metrics else {})}
    with atomic_dir(out) as tmp:
        if adapter is not None:  # a LoRA heal: keep its adapter for `sad ship-heal`, then merge it
            from sad.pretrained import save_adapter

            save_adapter(adapter, tmp / HEAL_ADAPTER, f"the teacher's layers {keep}",
                         {"role": "heal_adapter", "layers_from_teacher": keep, "teacher": teacher_identity(p),
                          "heal": metrics["heal"]})
            student = adapter.merge_and_unload()
        student.eval()
        student.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / "card.json", card)
    import shutil

    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(p.path("metrics", "student_init.json"), metrics)
    log.info("student_init: %d of the teacher's layers %s, %d parameters (%.2fx fewer)%s", len(keep), keep,
             metrics["parameters"], metrics["compression"],
             f"; healed: dev CE {metrics['heal'].get('dev_ce', metrics['heal'].get('heal', {}).get('dev_ce', float('nan'))):.3f}"
             if "heal" in metrics else "")
    return metrics
