"""The student_init stage: the teacher's layer cut, healed on the expert's demos once, is where every method starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sad.config import parse_params

from .conftest import distill_raw


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_initial_student_is_the_cut_and_healing_trains_it_on_the_demos(distill_project):
    from sad.modeling import load_model
    from sad.pretrained import layer_subset
    from sad.stages import run_student_init, student_init_dir

    p = parse_params(distill_raw([1], 0))
    metrics = run_student_init(p, progress=False)
    cut = layer_subset(load_model("models/teacher"), [1])
    bare = load_model(student_init_dir(p))
    assert bare.config.num_hidden_layers == 1 and metrics["layers_from_teacher"] == [1] and "heal" not in metrics
    assert all(torch.equal(v, _weights(cut)[k]) for k, v in _weights(bare).items())
    assert json.loads((student_init_dir(p) / "card.json").read_text())["healed"] is False

    p = parse_params(distill_raw([1], 1))
    metrics = run_student_init(p, progress=False)
    healed = load_model(student_init_dir(p))
    card = json.loads((student_init_dir(p) / "card.json").read_text())
    assert card["healed"] is True and card["layers_from_teacher"] == [1]
    assert metrics["heal"]["demos"] == 6 and metrics["heal"]["steps"] > 0 and "dev_ce" in metrics["heal"]
    changed = [k for k, v in _weights(healed).items() if not torch.equal(v, _weights(cut)[k])]
    assert changed, "healing left every weight as the cut had it"
    assert json.loads(Path("metrics/student_init.json").read_text())["heal"]["tokens"] > 0
    assert not Path(".checkpoints", *student_init_dir(p).parts).exists()  # the resume checkpoints go once written


def test_every_method_starts_from_the_initial_student_and_says_so(distill_project):
    from sad.stages import run_distill, run_student_init

    p = parse_params(distill_raw([0, 1], 1))
    with pytest.raises(FileNotFoundError, match="sad stage student_init"):
        run_distill(p, "sft", progress=False)
    run_student_init(p, progress=False)
    out = run_distill(p, "sft", progress=False)
    card = json.loads(Path("models/students/sft/seed0/card.json").read_text())
    assert out["layers_from_teacher"] == [0, 1] and out["healed"] is True
    assert card["arch"]["layers_from_teacher"] == [0, 1] and card["arch"]["healed"] is True

    scratch = parse_params(distill_raw(None, 1))  # from-scratch students: a card only, and distill builds them
    assert run_student_init(scratch, progress=False) == {"from_scratch": True}
    with pytest.raises(ValueError, match="rerun `sad stage student_init`"):
        run_distill(p, "sft", progress=False)
    assert run_distill(scratch, "sft", progress=False)["healed"] is False


def test_the_teacher_plays_the_first_rollout_tasks_of_each_env_while_the_expert_plays_them_all(rollout_project):
    from sad.environments import load_tasks
    from sad.stages.rollout import rollout_tasks

    train = load_tasks(rollout_project / "data" / "tasks", "alfworld", "train")
    assert [t.task_id for t in rollout_tasks(train, 2)] == [t.task_id for t in train[:2]]
    assert rollout_tasks(train, 0) == train and rollout_tasks(train, 100) == train


def test_a_lora_heal_ships_as_an_adapter_that_another_project_merges_into_the_same_cut(distill_project):
    """distill.heal.lora heals through an adapter the stage keeps; `sad ship-heal` ships it; distill.heal.source
    merges it into the same cut elsewhere (no training): the same weights as the healed student."""
    from sad.modeling import load_model
    from sad.pretrained import layer_subset
    from sad.shipping import ship_heal
    from sad.stages import run_distill, run_student_init, student_init_dir

    shutil.copytree("models/teacher", "teacher_src")  # the teacher as a source used as it is
    teacher = {"source": "teacher_src", "finetune": False}
    raw = distill_raw([0, 1], 1)
    raw["distill"]["heal"]["lora"] = {"r": 4, "alpha": 8}
    raw["teacher"] = teacher
    p = parse_params(raw)
    metrics = run_student_init(p, progress=False)
    healed = load_model(student_init_dir(p))
    assert metrics["heal"]["lora"]["r"] == 4 and metrics["heal"]["steps"] > 0
    assert (student_init_dir(p) / "heal_adapter" / "adapter_model.safetensors").is_file()
    bare = layer_subset(load_model(Path("models/teacher")), [0, 1])
    assert [k for k, v in _weights(healed).items() if not torch.equal(v, _weights(bare)[k])], "the heal changed nothing"

    card = ship_heal(student_init_dir(p), p.model_dump(), Path("shipped"))
    assert card["layers_from_teacher"] == [0, 1] and card["adapter_parameters"] > 0
    assert card["recipe"].endswith("sad ship-heal") and card["teacher"]["source"] == "teacher_src"
    assert "heal adapter" in Path("shipped/README.md").read_text()

    raw = distill_raw([0, 1], 0)
    raw["distill"]["heal"]["source"] = "shipped"
    raw["teacher"] = teacher
    q = parse_params(raw)
    applied = run_student_init(q, progress=False)
    merged = load_model(student_init_dir(q))
    assert applied["heal"]["source"] == "shipped" and json.loads((student_init_dir(q) / "card.json").read_text())["healed"]
    assert all(torch.allclose(v, _weights(healed)[k], atol=1e-6) for k, v in _weights(merged).items())
    assert run_distill(q, "sft", progress=False)["healed"] is True

    raw["distill"]["student_layers"] = [1]
    with pytest.raises(ValueError, match=r"set it to \[0, 1\]"):
        run_student_init(parse_params(raw), progress=False)
    raw["distill"]["student_layers"] = [0, 1]
    raw["teacher"] = {"source": "teacher_src", "finetune": True}  # a fine-tuned teacher is another teacher
    with pytest.raises(ValueError, match="heal here instead"):
        run_student_init(parse_params(raw), progress=False)
