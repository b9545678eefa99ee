from pathlib import Path

import pytest
import torch

from sad.config import MethodParams, TrainParams
from sad.segment import segment_episodes
from sad.training import collate, length_grouped_batches, method_loss, mixed_precision, train_lm


@pytest.fixture(scope="module")
def windows(demos, tokenizer):
    return segment_episodes(demos, tokenizer, 512).windows


def test_length_grouped_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    batches = length_grouped_batches(lengths, batch_size=3, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert length_grouped_batches(lengths, 3, 0) == batches


def test_seeds_get_their_own_data_order_in_every_epoch():
    """Seed 1's first epoch is not seed 0's second (as with ``seed + epoch``): seeds differ by more than a shift."""
    from sad.training import batch_plan

    lengths = list(range(40))
    per_epoch = 10  # batches of 4
    seed0, seed1 = batch_plan(lengths, 4, 3 * per_epoch, seed=0), batch_plan(lengths, 4, 3 * per_epoch, seed=1)
    epochs0 = [seed0[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    epochs1 = [seed1[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    assert not any(a == b for a in epochs0 for b in epochs1)
    assert all(sorted(i for b in epoch for i in b) == lengths for epoch in epochs0 + epochs1)  # each epoch a pass


def test_collate_pads_right_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "reason_mask": [0, 1, 0], "act_mask": [0, 0, 1]},
            {"input_ids": [5], "reason_mask": [0], "act_mask": [0]}]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["act_mask"].tolist() == [[0, 0, 1], [0, 0, 0]]


@pytest.mark.parametrize("loss", ["sad", "token_kd", "sft"])
def test_each_method_trains_a_student_and_lowers_its_loss(loss, windows, tokenizer, tiny_model_factory):
    teacher = tiny_model_factory(hidden=32, layers=1, seed=1)
    student = tiny_model_factory(hidden=16, layers=1, seed=2)
    method = MethodParams(loss=loss)
    batch = collate(windows[["input_ids", "reason_mask", "act_mask"]].head(4).to_dict("records"), tokenizer.pad_token_id)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        before, _ = method_loss(method, student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch, t_logits)
    result = train_lm(student, windows, method, TrainParams(epochs=3, batch_size=4, lr=1e-2), tokenizer.pad_token_id,
                      teacher=teacher, progress=False)
    with torch.no_grad():
        after, parts = method_loss(method, student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch, t_logits)
    assert result.steps > 0 and result.tokens > 0
    assert after.item() < before.item()
    if loss == "sad":
        assert set(parts) == {"d_reason", "d_act"}


def test_precision_setting_maps_to_autocast(caplog):
    settings = [(p, gpu) for p in ("auto", "fp32", "bf16") for gpu in (False, True)]
    # auto: bf16 wherever it pays (a GPU, a CPU whose bf16 matmuls measure faster than fp32)
    assert [mixed_precision(p, gpu, cpu_bf16_fast=True) for p, gpu in settings] == \
        ["bf16", "bf16", "no", "no", "bf16", "bf16"]
    # a CPU where bf16 is slower (emulated, or measured): a recipe's bf16 runs in fp32, said in the log
    assert [mixed_precision(p, gpu, cpu_bf16_fast=False) for p, gpu in settings] == \
        ["no", "bf16", "no", "no", "no", "bf16"]
    assert "not faster than fp32" in caplog.text and "runs in fp32" in caplog.text


def test_cpu_bf16_detection_reads_the_cpu_flags():
    from sad.modeling import cpu_has_native_bf16

    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f {}\n"
    assert cpu_has_native_bf16(x86.format("avx512_bf16")) and cpu_has_native_bf16(x86.format("amx_bf16 amx_tile"))
    assert not cpu_has_native_bf16(x86.format("avx512_vnni"))
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # ARM
    assert not cpu_has_native_bf16("model name\t: a bf16 avx512_bf16 chip\nflags\t\t: fpu avx2\n")  # names don't count
    assert not cpu_has_native_bf16("")
    # this machine: its /proc/cpuinfo read the same way
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert cpu_has_native_bf16() == cpu_has_native_bf16(text)


def test_bf16_is_used_only_where_the_cpu_has_the_instructions_and_it_measures_faster(monkeypatch):
    """bf16 instructions alone do not decide it (a Xeon with avx512_bf16 ran bf16 matmuls at 0.3-0.5x fp32):
    the measured speedup must reach BF16_MIN_SPEEDUP; SAD_CPU_BF16 decides without measuring."""
    import sad.modeling as modeling

    assert modeling.cpu_bf16_speedup() > 0  # measured on this machine
    cases = {(True, 2.0): True, (True, 0.4): False, (True, modeling.BF16_MIN_SPEEDUP): True, (False, 2.0): False}
    monkeypatch.delenv("SAD_CPU_BF16", raising=False)
    for (flags, speedup), expected in cases.items():
        monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda flags=flags: flags)
        monkeypatch.setattr(modeling, "cpu_bf16_speedup", lambda speedup=speedup: speedup)
        modeling.cpu_bf16_is_fast.cache_clear()
        assert modeling.cpu_bf16_is_fast() is expected, (flags, speedup)
    for forced, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("SAD_CPU_BF16", forced)
        modeling.cpu_bf16_is_fast.cache_clear()
        assert modeling.cpu_bf16_is_fast() is expected
    monkeypatch.setenv("SAD_CPU_BF16", "yes")
    modeling.cpu_bf16_is_fast.cache_clear()
    with pytest.raises(ValueError, match="SAD_CPU_BF16='yes'"):
        modeling.cpu_bf16_is_fast()
    monkeypatch.delenv("SAD_CPU_BF16")
    modeling.cpu_bf16_is_fast.cache_clear()


def test_the_bf16_speedup_is_measured_once_per_machine_and_kept(monkeypatch, tmp_path, caplog):
    """Every later process (a resumed stage, another rank, the next stage) reads the kept number instead of a
    timing of its own that could land on the other side of BF16_MIN_SPEEDUP; a damaged file is measured past."""
    import json

    import sad.modeling as modeling

    monkeypatch.setenv("SAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(modeling, "measure_bf16_speedup", lambda: 0.5)
    modeling.cpu_bf16_speedup.cache_clear()
    assert modeling.cpu_bf16_speedup() == 0.5
    kept = json.loads((tmp_path / "cpu_bf16_speedup.json").read_text())
    [(key, value)] = kept.items()
    assert value == 0.5 and f"torch {torch.__version__}" in key and f"{torch.get_num_threads()} threads" in key

    def timing_again() -> float:
        raise AssertionError("measured again")

    monkeypatch.setattr(modeling, "measure_bf16_speedup", timing_again)
    modeling.cpu_bf16_speedup.cache_clear()  # a new process
    assert modeling.cpu_bf16_speedup() == 0.5

    (tmp_path / "cpu_bf16_speedup.json").write_text('{"torn')
    monkeypatch.setattr(modeling, "measure_bf16_speedup", lambda: 1.8)
    modeling.cpu_bf16_speedup.cache_clear()
    assert modeling.cpu_bf16_speedup() == 1.8 and "cannot be read" in caplog.text
    assert json.loads((tmp_path / "cpu_bf16_speedup.json").read_text()) == {key: 1.8}
    modeling.cpu_bf16_speedup.cache_clear()


def test_bf16_autocast_trains_on_cpu_with_fp32_weights(windows, tokenizer, tiny_model_factory, monkeypatch):
    """train.precision: bf16 on CPU: matmuls in bf16, weights and the loss in fp32, the loss goes down
    (autocast forced on CPUs without bf16 instructions too: the tiny model is fast even emulated)."""
    monkeypatch.setattr("sad.training.cpu_bf16_is_fast", lambda: True)
    student = tiny_model_factory(hidden=16, layers=1, seed=2)
    method = MethodParams(loss="sft")
    batch = collate(windows[["input_ids", "reason_mask", "act_mask"]].head(4).to_dict("records"), tokenizer.pad_token_id)

    def loss_now() -> float:
        with torch.no_grad():
            return method_loss(method, student(input_ids=batch["input_ids"]).logits, batch)[0].item()

    before = loss_now()
    train_lm(student, windows, method, TrainParams(epochs=3, batch_size=4, lr=1e-2, precision="bf16"), tokenizer.pad_token_id,
             progress=False)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert loss_now() < before
    plain = tiny_model_factory(hidden=16, layers=1, seed=2)  # the trained weights in a model never under autocast
    plain.load_state_dict(student.state_dict())
    with torch.no_grad():  # the trained model leaves without the autocast hook: it computes in fp32 afterwards
        assert torch.equal(student(input_ids=batch["input_ids"]).logits, plain(input_ids=batch["input_ids"]).logits)


def test_kd_methods_require_teacher_logits(windows, tokenizer, tiny_model_factory):
    student = tiny_model_factory()
    batch = collate(windows[["input_ids", "reason_mask", "act_mask"]].head(2).to_dict("records"), tokenizer.pad_token_id)
    logits = student(input_ids=batch["input_ids"]).logits
    with pytest.raises(ValueError, match="teacher logits"):
        method_loss(MethodParams(loss="sad"), logits, batch, None)


def test_training_is_deterministic_for_a_seed(windows, tokenizer, tiny_model_factory):
    runs = []
    for _ in range(2):
        model = tiny_model_factory(seed=3)
        train_lm(model, windows, MethodParams(loss="sft"), TrainParams(epochs=1, batch_size=4, seed=7), tokenizer.pad_token_id,
                 progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _resume_setup(windows, tiny_model_factory):
    from sad.config import CurriculumParams
    from sad.curriculum import easy_to_hard, trajectory_difficulty

    w = windows.reset_index(drop=True)
    order = easy_to_hard(w, trajectory_difficulty(w, None, 1.0, 1.0, 0.0))
    train = TrainParams(epochs=2, batch_size=4, lr=1e-2, seed=5, checkpoint_every=2, dev_fraction=0)
    return w, order, CurriculumParams(), train, tiny_model_factory(hidden=32, seed=1)


def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_with_the_same_weights(windows, tokenizer, tiny_model_factory, tmp_path):
    w, order, cur, train, teacher = _resume_setup(windows, tiny_model_factory)
    method = MethodParams(loss="sad", lambda_reason=0.5)
    kwargs = dict(teacher=teacher, curriculum_order=order, curriculum=cur, fingerprint="f1", progress=False)
    straight = tiny_model_factory(hidden=16, seed=2)
    full = train_lm(straight, w, method, train, tokenizer.pad_token_id, checkpoint_dir=tmp_path / "a", **kwargs)
    assert full.steps >= 5 and not (tmp_path / "a").exists()  # the finished model supersedes its checkpoint

    crashed = tiny_model_factory(hidden=16, seed=2)
    train_lm(crashed, w, method, train, tokenizer.pad_token_id, checkpoint_dir=tmp_path / "b", stop_after=3, **kwargs)
    assert (tmp_path / "b" / "trainer_state.pt").is_file()  # checkpoint of step 2 survives the crash at step 3
    state = torch.load(tmp_path / "b" / "trainer_state.pt", weights_only=True)
    assert [g["fused"] for g in state["optimizer"]["param_groups"]] == [True, True]  # decay / no decay, fused AdamW
    for group in state["optimizer"]["param_groups"]:  # as a library before fused AdamW saved it: resumed, the
        group["fused"] = None                          # run still steps the fused kernel (the same weights below)
    torch.save(state, tmp_path / "b" / "trainer_state.pt")
    resumed_model = tiny_model_factory(hidden=16, seed=2)  # a new process builds a fresh model
    resumed = train_lm(resumed_model, w, method, train, tokenizer.pad_token_id, checkpoint_dir=tmp_path / "b", **kwargs)
    assert resumed.resumed_from == 2
    assert torch.equal(_weights(resumed_model), _weights(straight))


def test_a_resumed_run_trains_in_the_precision_its_checkpoint_was_trained_in(windows, tokenizer, tiny_model_factory,
                                                                              tmp_path, monkeypatch, caplog):
    """precision: auto rests on a timing (the bf16 speed test), which a restarted process can land on the other
    side: a run begun under bf16 autocast and resumed where fp32 is chosen goes on in bf16 and ends with the
    uninterrupted run's weights. Only on a CPU that can merely emulate bf16 does it go on in fp32, said in the log."""
    monkeypatch.setattr("sad.training.cpu_bf16_is_fast", lambda: True)
    monkeypatch.setattr("sad.modeling.cpu_has_native_bf16", lambda: True)
    mixed_precision.cache_clear()
    w, _, _, train, _ = _resume_setup(windows, tiny_model_factory)
    method, pad = MethodParams(loss="sft"), tokenizer.pad_token_id
    bf16, fp32 = train.model_copy(update={"precision": "bf16"}), train.model_copy(update={"precision": "fp32"})
    straight = tiny_model_factory(hidden=16, seed=2)
    assert train_lm(straight, w, method, bf16, pad, checkpoint_dir=tmp_path / "a", progress=False).precision == "bf16"

    kwargs = dict(checkpoint_dir=tmp_path / "b", fingerprint="f1", progress=False)
    train_lm(tiny_model_factory(hidden=16, seed=2), w, method, bf16, pad, stop_after=3, **kwargs)
    resumed_model = tiny_model_factory(hidden=16, seed=2)
    resumed = train_lm(resumed_model, w, method, fp32, pad, **kwargs)  # this process resolves fp32
    assert resumed.resumed_from == 2 and resumed.precision == "bf16"
    assert torch.equal(_weights(resumed_model), _weights(straight))

    monkeypatch.setattr("sad.modeling.cpu_has_native_bf16", lambda: False)
    kwargs["checkpoint_dir"] = tmp_path / "c"
    train_lm(tiny_model_factory(hidden=16, seed=2), w, method, bf16, pad, stop_after=3, **kwargs)
    emulated = train_lm(tiny_model_factory(hidden=16, seed=2), w, method, fp32, pad, **kwargs)
    assert emulated.resumed_from == 2 and emulated.precision == "fp32" and "only emulate" in caplog.text
    mixed_precision.cache_clear()


def test_a_corrupt_or_foreign_checkpoint_is_ignored_not_half_used(windows, tokenizer, tiny_model_factory, tmp_path, caplog):
    w, _, _, train, _ = _resume_setup(windows, tiny_model_factory)
    method = MethodParams(loss="sft")
    reference = tiny_model_factory(hidden=16, seed=2)
    train_lm(reference, w, method, train, tokenizer.pad_token_id, progress=False)

    ckpt = tmp_path / "ckpt"
    train_lm(tiny_model_factory(hidden=16, seed=2), w, method, train, tokenizer.pad_token_id, checkpoint_dir=ckpt,
             fingerprint="f1", stop_after=3, progress=False)
    (ckpt / "trainer_state.pt").write_bytes(b"truncated garbage")
    model = tiny_model_factory(hidden=16, seed=2)
    result = train_lm(model, w, method, train, tokenizer.pad_token_id, checkpoint_dir=ckpt, fingerprint="f1", progress=False)
    assert result.resumed_from == 0 and "unreadable" in caplog.text
    assert torch.equal(_weights(model), _weights(reference))

    train_lm(tiny_model_factory(hidden=16, seed=2), w, method, train, tokenizer.pad_token_id, checkpoint_dir=ckpt,
             fingerprint="f1", stop_after=3, progress=False)
    other = train_lm(tiny_model_factory(hidden=16, seed=2), w, method, train, tokenizer.pad_token_id, checkpoint_dir=ckpt,
                     fingerprint="other-settings", progress=False)
    assert other.resumed_from == 0 and "other settings" in caplog.text

    # the same settings' checkpoint from a model of another shape (two layers): refused before any weight is copied
    train_lm(tiny_model_factory(hidden=16, layers=2, seed=3), w, method, train, tokenizer.pad_token_id,
             checkpoint_dir=tmp_path / "deeper", fingerprint="f1", stop_after=3, progress=False)
    model = tiny_model_factory(hidden=16, seed=2)
    result = train_lm(model, w, method, train, tokenizer.pad_token_id, checkpoint_dir=tmp_path / "deeper",
                      fingerprint="f1", progress=False)
    assert result.resumed_from == 0 and "do not fit" in caplog.text
    assert torch.equal(_weights(model), _weights(reference))

    # and the other way: a one-layer model's checkpoint lacks the second layer of a two-layer model
    from sad.training import load_checkpoint

    ckpt = tmp_path / "shallow"
    train_lm(tiny_model_factory(hidden=16, seed=3), w, method, train, tokenizer.pad_token_id, checkpoint_dir=ckpt,
             fingerprint="f1", stop_after=3, progress=False)
    deeper = tiny_model_factory(hidden=16, layers=2, seed=4)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    optimizer = torch.optim.AdamW(deeper.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert load_checkpoint(ckpt, deeper, optimizer, scheduler, "f1") is None and "are not in it" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())


def test_dev_split_holds_out_whole_episodes_and_dev_metrics_are_reported(windows, tokenizer, tiny_model_factory):
    from sad.training import split_dev

    train_w, dev_w = split_dev(windows, 0.3, seed=0)
    assert len(dev_w) > 0 and set(train_w["episode_id"]).isdisjoint(dev_w["episode_id"])
    assert len(train_w) + len(dev_w) == len(windows)
    result = train_lm(tiny_model_factory(hidden=16), train_w, MethodParams(loss="sft"),
                      TrainParams(epochs=1, batch_size=4, eval_every=1), tokenizer.pad_token_id, dev_windows=dev_w,
                      progress=False)
    assert set(result.dev) == {"loss", "ce", "act_accuracy"} and 0 <= result.dev["act_accuracy"] <= 1


def test_shards_split_a_global_batch_without_loss_or_overlap():
    from sad.training import shard

    batch = list(range(7))
    parts = [shard(batch, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]


def test_right_padding_leaves_real_positions_unchanged_without_a_mask(tiny_model_factory):
    model = tiny_model_factory(hidden=16)
    rows = [{"input_ids": [5, 6, 7, 8, 9], "reason_mask": [0] * 5, "act_mask": [0] * 5},
            {"input_ids": [5, 6], "reason_mask": [0] * 2, "act_mask": [0] * 2}]
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"]).logits
        alone = model(input_ids=torch.tensor([[5, 6]])).logits
    assert torch.allclose(padded[1, :2], alone[0], atol=1e-5)


def _lora_toy(dropout: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sad.config import LoraParams
    from sad.pretrained import add_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    return add_lora(model, LoraParams(r=4, alpha=8, dropout=dropout), 0)


def _toy_windows(n: int = 16):
    import random

    import pandas as pd

    rng, rows = random.Random(0), []
    for i in range(n):
        k = rng.randint(10, 20)
        rows.append({"input_ids": [rng.randrange(4, 50) for _ in range(k)], "reason_mask": [0] * 3 + [1] * (k - 6) + [0] * 3,
                     "act_mask": [0] * (k - 3) + [1] * 3, "episode_id": f"e{i}"})
    return pd.DataFrame(rows)


def test_a_resumed_run_with_dropout_ends_with_the_same_weights_and_counts_only_its_own_tokens_per_second(tmp_path):
    """The checkpoint keeps the random state, so dropout draws go on where they stopped; the resumed run's
    tokens/s counts the tokens it trained on, not those before its checkpoint."""
    from sad.training import IMITATION

    w, train = _toy_windows(), TrainParams(epochs=1, batch_size=2, lr=1e-2, precision="fp32", checkpoint_every=1)
    straight = _lora_toy(0.3)
    full = train_lm(straight, w, IMITATION, train, 0, progress=False, checkpoint_dir=tmp_path / "a", fingerprint="x")
    train_lm(_lora_toy(0.3), w, IMITATION, train, 0, progress=False, checkpoint_dir=tmp_path / "b", fingerprint="x",
             stop_after=4)
    resumed_model = _lora_toy(0.3)
    resumed = train_lm(resumed_model, w, IMITATION, train, 0, progress=False, checkpoint_dir=tmp_path / "b",
                       fingerprint="x")
    assert resumed.resumed_from == 4 and torch.equal(_weights(resumed_model), _weights(straight))
    assert resumed.tokens == full.tokens and 0 < resumed.resumed_tokens < resumed.tokens
    assert resumed.tokens_per_second == (resumed.tokens - resumed.resumed_tokens) / resumed.seconds


def test_logged_parts_cover_the_whole_global_batch_whatever_the_accumulation():
    """ce logged for a step is the step's loss (SFT), also when its windows come as 4 micro-batches (it used to be
    the last micro-batch's alone, about a quarter of it)."""
    from sad.training import IMITATION

    w = _toy_windows(8)
    logged = {}
    for batch, accum in ((4, 1), (1, 4)):
        records = []
        train = TrainParams(epochs=1, batch_size=batch, grad_accum=accum, lr=1e-2, precision="fp32")
        train_lm(_lora_toy(0.0), w, IMITATION, train, 0, progress=False, log_every=1,
                 on_log=lambda step, record, out=records: out.append(record))
        logged[(batch, accum)] = [(r["loss"], r["ce"]) for r in records if "ce" in r]
    for loss, ce in logged[(1, 4)] + logged[(4, 1)]:
        assert ce == pytest.approx(loss, rel=1e-5)


def test_a_batch_plan_is_the_same_for_any_number_of_processes_and_keeps_every_window():
    """No window is dropped for a short last batch (it used to be, under several processes, and a plan with fewer
    windows than processes never ended)."""
    from sad.training import batch_plan, shard

    plan = batch_plan(list(range(10, 19)), 4, 3, seed=0)
    assert sorted(i for b in plan for i in b) == list(range(9))
    few = batch_plan([5, 6, 7], 4, 2, seed=0)  # fewer windows than a global batch of 2 processes x 2
    assert len(few) == 2 and all(sorted(b) == [0, 1, 2] for b in few)
    assert [shard([8], r, 2) for r in range(2)] == [[8], []]  # an empty shard: train_lm runs it with no weight


def test_span_parts_are_token_weighted_means_over_the_step():
    """d_reason/d_act are per-micro-batch means over one span kind: over a step they are weighted by each
    micro-batch's tokens of that kind (a micro-batch with none of them adds nothing), the others add up."""
    from sad.training import _accelerator, _global_parts  # a real single-process accelerator

    # micro-batches: d_reason 2.0 over 10 REASON tokens, 4.0 over 30, and one with no REASON token (0.0 x 0)
    sums = {"d_reason": 2.0 * 10 + 4.0 * 30 + 0.0 * 0, "d_act": 1.0 * 5, "ce_act": 0.25 + 0.5}
    parts = _global_parts(sums, (40.0, 5.0), _accelerator("no", use_gpu=False))
    assert parts == pytest.approx({"d_reason": 3.5, "d_act": 1.0, "ce_act": 0.75})


def test_fused_adamw_where_its_kernel_runs_and_it_steps_as_the_default_does():
    from sad.training import fused_adamw

    assert fused_adamw([torch.zeros(3, requires_grad=True), torch.zeros(2, 2, dtype=torch.bfloat16)]) is True
    assert fused_adamw([torch.zeros(3, dtype=torch.long)]) is None
    assert fused_adamw([]) is None
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(t) for t in start]
    stepped = []
    for fused in (None, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        stepped.append([p.detach() for p in params])
    for default, fused in zip(*stepped):
        assert not torch.equal(default, start[0] if default.ndim == 2 else start[1])
        torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-6)
