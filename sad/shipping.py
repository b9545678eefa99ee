"""The shipped teacher: a teacher trained once with a long budget, versioned with the project.

In real use the teacher is a given, expensive model and a scheduled retrain re-distils students from
fresh rollouts; the embedded default does the same with a teacher trained once by the ``teacher``
profile (``sad profile teacher && dvc repro evaluate_teacher``) and copied here by
``sad ship-teacher``. ``teacher.source: assets/teacher`` with ``teacher.finetune: false`` makes the
pipeline start from it. The card says how it was made and what it does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

SHIPPED_TEACHER_DIR = Path("assets/teacher")
RECIPE = "sad profile {profile} && dvc repro evaluate_teacher && sad ship-teacher"
SHIPPED_HEAL_DIR = Path("assets/student_heal")
HEAL_RECIPE = "sad profile {profile} && dvc repro student_init && sad ship-heal"


def recipe(profile: str | None) -> str:
    """The commands that reproduce a teacher trained under ``profile`` (the teacher profile by default)."""
    return RECIPE.format(profile=profile or "teacher")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measured_success(eval_metrics: dict[str, Any]) -> dict[str, Any]:
    """Per split: success overall and per env, episodes, invalid actions; and step accuracy per env."""
    out: dict[str, Any] = {}
    for split, body in eval_metrics.get("splits", {}).items():
        out[split] = {"success_rate": body["overall"]["success_rate"],
                      "invalid_action_rate": body["overall"].get("invalid_action_rate"),
                      "envs": {env: {"success_rate": m["success_rate"], "episodes": m.get("episodes")}
                               for env, m in body["envs"].items()}}
    acc = eval_metrics.get("step_accuracy")
    if acc:
        out["step_accuracy"] = {"all": acc["step_accuracy"],
                                **{env: m["step_accuracy"] for env, m in acc["envs"].items()}}
    return out


def model_card_markdown(card: dict[str, Any]) -> str:
    """A human-readable model card (README.md of the shipped folder)."""
    if card.get("base"):
        what = (f"A LoRA adapter ({card.get('adapter_parameters', 0):,} parameters, rank {card['lora']['r']}) over "
                f"`{card['base']}` ({card.get('parameters', 0):,} parameters), trained by imitation of the expert demos "
                "of ALFWorld, HotPotQA-ReAct and WebShop (generated tasks). Loading this folder as `teacher.source` "
                "merges it into the base model, which must be installed (`make install` does).")
    else:
        what = (f"A {card.get('parameters', 0):,}-parameter Llama trained from scratch by imitation of the expert demos "
                "of ALFWorld, HotPotQA-ReAct and WebShop (generated tasks), with the project's copy-friendly BPE tokenizer.")
    lines = ["# The shipped SAD teacher", "", what,
             "", "## Recipe", "", f"    {card['recipe']}", "",
             f"- profile: `{card['profile']}`; commit `{card['commit']}`; demos sha256[:16] `{card.get('data_hash')}`",
             f"- architecture: `{json.dumps(card.get('arch'))}`; context {card['context']}",
             f"- training: `{json.dumps(card.get('train'))}`; final loss {card.get('final_loss')}; dev {card.get('dev')}",
             *([f"- trained further from `{card['init']['folder']}` (content sha256[:16] `{card['init']['hash']}`; its "
                f"recipe: `{card['init'].get('recipe', 'unknown')}`, commit `{card['init'].get('commit', 'unknown')}`)"]
               if card.get("init") else []),
             *([f"- provenance: {card['provenance']}"] if card.get("provenance") else []),
             "", f"## Measured (greedy, `agent.action_choice: {card.get('action_choice', 'free')}`)", ""]
    for split, m in card.get("measured", {}).items():
        if split == "step_accuracy":
            lines.append("- step accuracy (dev expert states): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in m.items()))
        else:
            envs = ", ".join(f"{env} {100 * e['success_rate']:.1f}% of {e['episodes']:g}" for env, e in m["envs"].items())
            lines.append(f"- {split} success: {100 * m['success_rate']:.1f}% ({envs})")
    return "\n".join(lines) + "\n"


def ship_teacher(teacher_dir: Path, eval_file: Path, params_dump: dict[str, Any], target: Path = SHIPPED_TEACHER_DIR,
                 domain_vocab: Path | None = None) -> dict[str, Any]:
    """Copy the trained teacher (weights, tokenizer) to ``target`` with its card (card.json + README.md) and, when
    its tokenizer was cut to a domain vocabulary (``domain_vocab``, the tokenizer stage's file), that vocabulary
    as :data:`sad.tokenizer.TRAINED_VOCAB_FILE`: projects that use the teacher keep every token it was trained with."""
    from sad.modeling import count_parameters, load_model, read_card, save_model
    from sad.tokenizer import TRAINED_VOCAB_FILE, load_tokenizer

    if not Path(teacher_dir).is_dir():
        raise FileNotFoundError(f"{teacher_dir}: not found; train the teacher first (a profile with a teacher recipe, "
                                "e.g. `sad profile teacher && dvc repro evaluate_teacher`)")
    if not eval_file.is_file():
        raise FileNotFoundError(f"{eval_file}: not found; evaluate the teacher first (dvc repro evaluate_teacher), "
                                "so that its card states what it does")
    model, tokenizer = load_model(teacher_dir), load_tokenizer(teacher_dir)
    trained = read_card(teacher_dir)
    init = trained.get("init") or {}
    if init and Path(init["folder"]).resolve() == Path(target).resolve():
        raise ValueError(f"{target} holds the adapter this teacher was trained from (teacher.init), which its recipe "
                         f"needs: ship it elsewhere (--to), or copy {target} first (e.g. to {target}-v1, the same "
                         f"content hash {init.get('hash')}) and point teacher.init there")
    adapter = teacher_dir / "adapter"
    base = read_card(adapter).get("base") if adapter.is_dir() else None
    if base and Path(base).expanduser().resolve() == Path(target).resolve():
        raise ValueError(f"{target} holds this teacher's base model (teacher.source: {base}), which its adapter needs "
                         f"to load: ship it elsewhere (--to), or copy {target} first (e.g. to {target}-v1) and point "
                         "teacher.source there")
    profile = params_dump.get("project", {}).get("profile")
    card = {**trained, "role": "teacher", "parameters": count_parameters(model), "recipe": recipe(profile),
            "profile": profile, "commit": _git_commit(),
            "context": params_dump["context"], "train": params_dump["teacher"]["train"],
            "measured": measured_success(json.loads(eval_file.read_text())),
            "action_choice": params_dump.get("agent", {}).get("action_choice", "free")}
    files = {TRAINED_VOCAB_FILE: domain_vocab} if domain_vocab is not None and domain_vocab.is_file() else {}
    if adapter.is_dir():  # a LoRA teacher ships its adapter alone; loading merges it into the base
        card = {**read_card(adapter), **card}
        _ship_adapter(adapter, target, card, model_card_markdown(card), files)
        weights = target / "adapter_model.safetensors"
    else:  # one folder, written whole
        save_model(model, tokenizer, target, card, readme=model_card_markdown(card), files=files)
        weights = target / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return {**card, "weights_sha256": digest}


def heal_card_markdown(card: dict[str, Any]) -> str:
    """A human-readable card (README.md) of a shipped heal adapter."""
    heal = card.get("heal", {})
    lora = heal.get("lora", {})
    return "\n".join([
        "# The shipped heal adapter of the SAD students", "",
        f"A LoRA adapter (rank {lora.get('r')}, {card.get('adapter_parameters', 0):,} parameters) over the teacher's layers "
        f"{card['layers_from_teacher']} (teacher `{card['teacher']['source']}`, weights sha256[:16] `{card['teacher']['weights']}`), "
        "trained with CE on the expert's train demos of ALFWorld, HotPotQA-ReAct and WebShop (generated tasks). "
        "`distill.heal.source` pointing here merges it into that cut in the `student_init` stage: every method "
        "starts from the healed cut without training it again.",
        "", "## Recipe", "", f"    {card['recipe']}", "",
        f"- profile: `{card['profile']}`; commit `{card['commit']}`; demos sha256[:16] `{heal.get('demos_sha256')}` "
        f"({heal.get('demos')} demos, {heal.get('tokens')} tokens)",
        f"- training: {heal.get('epochs')} epoch(s), {heal.get('steps')} steps, lr {heal.get('lr')}, "
        f"{heal.get('train_precision')}; {heal.get('seconds', 0):.0f} s",
        "", "## Measured", "",
        f"- dev CE {heal.get('dev_ce', float('nan')):.3f}, dev ACT-token accuracy {100 * heal.get('dev_act_accuracy', 0):.1f}% "
        "(the expert's dev demos)",
    ]) + "\n"


def ship_heal(student_init_dir: Path, params_dump: dict[str, Any], target: Path = SHIPPED_HEAL_DIR) -> dict[str, Any]:
    """Copy the heal adapter a LoRA heal left in ``student_init_dir`` (heal_adapter/) to ``target``, with its
    card (card.json + README.md): recipe, commit, data hash and dev numbers."""
    from safetensors import safe_open

    from sad.stages.student_init import HEAL_ADAPTER

    adapter = student_init_dir / HEAL_ADAPTER
    if not (adapter / "card.json").is_file():
        raise FileNotFoundError(f"{adapter}: no heal adapter; heal with a LoRA adapter first (distill.heal: epochs > 0 "
                                "and lora: {r: 32, alpha: 64}, then dvc repro student_init; profiles/heal.yaml does)")
    card = json.loads((adapter / "card.json").read_text())
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as fh:
        n = sum(_numel(fh.get_slice(k).get_shape()) for k in fh.keys())
    profile = params_dump.get("project", {}).get("profile")
    card = {**card, "recipe": HEAL_RECIPE.format(profile=profile or "heal"), "profile": profile,
            "commit": _git_commit(), "adapter_parameters": n}
    _ship_adapter(adapter, target, card, heal_card_markdown(card))
    return {**card, "weights_sha256": hashlib.sha256((target / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]}


def _ship_adapter(adapter: Path, target: Path, card: dict[str, Any], readme: str,
                  files: dict[str, Path] | None = None) -> None:
    """Write ``target`` whole: the adapter folder's files with ``card`` as its card.json, ``readme`` as README.md
    and ``files`` (name in the folder -> file to copy there)."""
    from sad.io import atomic_dir
    from sad.modeling import copy_files_into

    with atomic_dir(target) as tmp:
        for f in adapter.iterdir():
            if f.name != "card.json":
                shutil.copy2(f, tmp / f.name)
        (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(readme)
        copy_files_into(tmp, files or {})


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
