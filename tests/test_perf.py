"""FLOP counts by hand, and the accelerator benchmark's code path run on CPU."""

import pytest
import yaml

from sad.bench.peak import inference_flops_per_token, matmul_peak_flops, train_flops_per_token


def test_flop_counts_by_hand():
    # 6N + 6 L d S: N=1000, L=2, d=8, S=10 -> 6000 + 960
    assert train_flops_per_token(1000, 2, 8, 10) == 6960
    # 2N + 4 L d C: N=1000, L=2, d=8, C=10 -> 2000 + 640
    assert inference_flops_per_token(1000, 2, 8, 10) == 2640


def test_matmul_peak_is_positive_and_plausible():
    peak = matmul_peak_flops(n=256, seconds=0.2)
    assert 1e8 < peak < 1e13


def test_gpu_benchmark_runs_on_cpu(tmp_path, capsys):
    from sad.bench.gpu import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "tokenizer": {"vocab_size": 300}, "context": {"max_tokens": 128, "max_new_tokens": 16},
        "teacher": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
        "distill": {"student": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
    }))
    out = main(["--device", "cpu", "--params", str(params), "--json"])
    assert out["device"] == "cpu" and out["matmul_peak_flops_per_s"] > 0
    for name in ("student", "teacher"):
        assert 0 < out[f"train_{name}"]["mfu"] < 2 and out[f"train_{name}"]["tokens_per_s"] > 0
        assert out[f"rollout_{name}"]["batched"]["rows"] == 8 and out[f"rollout_{name}"]["speedup"] > 0


def test_gpu_benchmark_takes_a_teachers_shapes_from_its_config(tmp_path):
    """``--config``: the real teacher's shapes with random weights (nothing to load), its layer-subset student."""
    import json

    from sad.bench.gpu import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32,
                                  "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "intermediate_size": 64}))
    out = main(["--device", "cpu", "--config", str(config), "--keep", "0,2", "--seq", "32", "--json"])
    assert out["distill_sad"]["layers_kept"] == [0, 2] and out["distill_sad"]["tokens_per_s"] > 0
    assert out["distill_sad"]["student_parameters"] < out["distill_sad"]["teacher_parameters"]
    for name in ("student", "teacher"):
        assert out[f"train_{name}"]["tokens_per_s"] > 0 and out[f"rollout_{name}"]["batched"]["rows"] == 4


def test_distillation_benchmark_runs_on_cpu_with_a_layer_subset_student(tiny_model_factory):
    import torch

    from sad.bench.gpu import distill_mfu
    from sad.pretrained import layer_subset

    teacher = tiny_model_factory(hidden=16, layers=3, seed=0)
    student = layer_subset(teacher, [0, 2])
    out = distill_mfu(teacher, student, batch=2, seq=32, steps=2, device=torch.device("cpu"), dtype=torch.float32,
                      peak=1e10)
    assert out["tokens_per_s"] > 0 and 0 < out["mfu"] and out["student_parameters"] < out["teacher_parameters"]


def test_decode_batch_ceiling_times_one_row_against_a_batch_and_restores_the_attention(tiny_model_factory):
    from sad.bench.evaluation import decode_batch_ceiling

    model = tiny_model_factory(hidden=32, layers=2).eval()
    before = model.config._attn_implementation
    out = decode_batch_ceiling(model, batch_size=4, written=40, repeats=2)
    assert out["batch_size"] == 4 and out["written_positions"] == 40
    assert out["step_ms_one_row"] > 0 and out["step_ms_batch"] > 0
    assert out["tokens_per_s_ratio"] == 4 * out["step_ms_one_row"] / out["step_ms_batch"]
    assert model.config._attn_implementation == before  # the sliced attention is set for the timing only


def test_generation_flops_count_every_token_run_through_the_model_at_the_plays_mean_context(tiny_model_factory):
    """A play's FLOPs: (generated + prefilled tokens) x (2 N + 4 L d C), C = a step's context (prefilled and
    reused tokens over blocks) plus half a block; utilisation against the peak, and the rates at the peak."""
    from types import SimpleNamespace

    from sad.bench.evaluation import generation_flops

    model = tiny_model_factory(hidden=32, layers=2)
    n = sum(t.numel() for t in model.parameters())
    stats = SimpleNamespace(blocks=4, generated_tokens=40, generation_seconds=2.0)
    out = generation_flops(model, stats, prefill_computed=60, prefill_reused=140, episodes=2, peak_flops_per_s=1e9)
    context = (60 + 140) / 4 + 40 / 4 / 2
    flops = (40 + 60) * (2 * n + 4 * 2 * 32 * context)
    assert out["mean_context_tokens"] == context and out["model_flops_per_s"] == pytest.approx(flops / 2.0)
    assert out["flop_utilisation"] == pytest.approx(flops / 2.0 / 1e9)
    assert out["generated_tokens_per_s_at_peak"] == pytest.approx(40 * 1e9 / flops)
    assert out["episodes_per_s_at_peak"] == pytest.approx(2 * 1e9 / flops)


def test_precision_benchmark_times_fp32_and_bf16_autocast_on_cpu():
    from transformers import LlamaConfig

    from sad.bench.training import benchmark_precision

    config = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    out = benchmark_precision(config, batch_size=2, seq_len=32, steps=1)
    assert out["fp32"]["tokens_per_s"] > 0 and out["bf16_autocast"]["tokens_per_s"] > 0
    assert out["bf16_speedup"] > 0 and out["matmul_peak_gflops"]["fp32"] > 0.1 and out["matmul_peak_gflops"]["bf16"] > 0.1


def test_training_benchmark_times_the_projects_own_teacher_and_layer_subset_student(tmp_path, monkeypatch):
    """With a pretrained teacher, the training benchmark builds the teacher stage's architecture and a student
    with len(distill.student_layers) of its layers (not the from-scratch sizes, which the default never
    trains); from scratch, it keeps teacher.arch and distill.student."""
    from transformers import LlamaConfig

    from sad.bench.training import benchmark_training, project_model_configs
    from sad.config import load_params, parse_params

    from .conftest import REPO

    monkeypatch.chdir(tmp_path)
    p = load_params(REPO / "params.yaml")  # the default: the shipped teacher, 8 of its layers per student
    LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=10, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True).save_pretrained("models/teacher")
    models = project_model_configs(p)
    assert models["from"] == "models/teacher" and models["teacher"]["num_hidden_layers"] == 10
    assert models["student"]["num_hidden_layers"] == len(p.distill.student_layers) == 8
    assert models["student"]["num_key_value_heads"] == 2 and models["student"]["vocab_size"] == 96
    assert project_model_configs(parse_params({"teacher": {"source": None}, "distill": {"student_layers": None}})) is None

    out = benchmark_training(p, steps=1, batch_size=2, max_tokens=128, isolated=False)
    # by hand: a layer = q, o 32x32 + k, v 32x16 (2 KV heads of 8) + gate, up, down 32x64 + 2 norms = 9,280;
    # + tied embedding 96x32 + final norm 32
    assert out["setup"]["teacher"] == {"parameters": 10 * 9280 + 96 * 32 + 32, "layers": 10, "hidden_size": 32}
    assert out["setup"]["student"]["layers"] == 8 and out["setup"]["vocab"] == 96
    assert out["setup"]["student"]["parameters"] == 8 * 9280 + 96 * 32 + 32
    assert out["mfu"]["teacher_sft"] > 0 and out["tokens_per_s"]["teacher_sft"] > 0
    # MFU against the peak of the dtype training runs in: bf16 under train.precision auto where the CPU has it
    from sad.modeling import cpu_bf16_is_fast

    assert out["mfu"]["dtype"] == ("bfloat16" if cpu_bf16_is_fast() else "float32")


def test_a_configurations_peak_memory_is_its_own_not_its_parents():
    """The bench runs each configuration in a child process; fork+exec hands the child its parent's ru_maxrss,
    so the child must read its own peak (VmHWM)."""
    import subprocess
    import sys

    held = bytearray(300 * 1024 * 1024)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: 300 MB resident in this process
    code = "from sad.bench.training import _rss_mb; print(_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 250, child
    del held
