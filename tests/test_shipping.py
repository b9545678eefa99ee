"""The shipped teacher: a source used as it is becomes the teacher unchanged, and `sad ship-teacher` writes
it with its model card."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture()
def in_tmp(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def test_a_source_used_as_it_is_becomes_the_teacher_unchanged(in_tmp, demos, tokenizer, tiny_model_factory):
    """teacher.finetune: false: pretrained -> tokenizer -> teacher copy the source's weights and tokenizer,
    and the teacher's card keeps the source's card (its recipe and measured success)."""
    import torch

    from sad.config import parse_params
    from sad.modeling import load_model, read_card, save_model
    from sad.stages import demos_file, run_pretrained, run_teacher, run_tokenizer, teacher_dir
    from sad.tokenizer import load_tokenizer

    shipped = in_tmp / "shipped"
    source_model = tiny_model_factory(hidden=32, layers=1, seed=3)
    save_model(source_model, tokenizer, shipped, {"recipe": "sad profile teacher && ...", "measured": {"test": 0.5}})
    p = parse_params({"teacher": {"source": str(shipped), "finetune": False}})
    demos_file(p).parent.mkdir(parents=True)
    demos_file(p).write_text("".join(json.dumps(e.to_dict()) + "\n" for e in demos))
    run_pretrained(p)
    run_tokenizer(p)
    metrics = run_teacher(p, progress=False)
    assert metrics["finetuned"] == 0
    teacher = load_model(teacher_dir(p))
    for (name, a), (_, b) in zip(source_model.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_tokenizer(teacher_dir(p)).get_vocab() == tokenizer.get_vocab()
    card = read_card(teacher_dir(p))
    assert card["method"] == "as is" and card["shipped"]["source_card"]["recipe"].startswith("sad profile teacher")


def test_ship_teacher_writes_weights_tokenizer_and_a_model_card(in_tmp, tokenizer, tiny_model_factory):
    from sad.modeling import load_model, read_card, save_model
    from sad.shipping import RECIPE, ship_teacher

    trained = in_tmp / "models" / "teacher"
    save_model(tiny_model_factory(hidden=32, layers=1), tokenizer, trained, {"data_hash": "abc", "final_loss": 0.1})
    eval_file = in_tmp / "teacher.json"
    with pytest.raises(FileNotFoundError, match="evaluate the teacher first"):
        ship_teacher(trained, eval_file, {}, in_tmp / "assets" / "teacher")
    eval_file.write_text(json.dumps({
        "splits": {"test": {"overall": {"success_rate": 0.5, "invalid_action_rate": 0.1},
                            "envs": {"hotpotqa": {"success_rate": 0.5, "episodes": 4}}}},
        "step_accuracy": {"step_accuracy": 0.75, "envs": {"hotpotqa": {"step_accuracy": 0.75}}}}))
    params = {"project": {"profile": "teacher"}, "context": {"max_tokens": 512}, "teacher": {"train": {"epochs": 2}}}
    card = ship_teacher(trained, eval_file, params, in_tmp / "assets" / "teacher")
    target = in_tmp / "assets" / "teacher"
    load_model(target)
    written = read_card(target)
    assert written["recipe"] == RECIPE and written["data_hash"] == "abc"
    assert written["measured"]["test"]["envs"]["hotpotqa"]["success_rate"] == 0.5
    assert written["measured"]["step_accuracy"] == {"all": 0.75, "hotpotqa": 0.75}
    readme = (target / "README.md").read_text()
    assert "test success: 50.0% (hotpotqa 50.0% of 4)" in readme and "hotpotqa 75.0%" in readme
    assert card["weights_sha256"]

