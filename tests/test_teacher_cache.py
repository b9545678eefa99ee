import pytest
import torch

from sad.config import MethodParams
from sad.segment import segment_episodes
from sad.teacher_cache import StaleCacheError, build_topk_cache, generated_logits, generated_positions, load_cache, save_cache
from sad.training import collate, method_loss


@pytest.fixture(scope="module")
def windows(demos, tokenizer):
    return segment_episodes(demos[:4], tokenizer, 512).windows.reset_index(drop=True)


def test_cache_round_trips_and_matches_online_teacher_at_full_k(windows, tokenizer, tiny_model_factory, tmp_path):
    teacher = tiny_model_factory(hidden=32, seed=5)
    vocab = teacher.config.vocab_size
    cache = build_topk_cache(teacher, windows, top_k=vocab, temperatures=[1.0, 2.0], pad_id=tokenizer.pad_token_id,
                             windows_hash="abc", progress=False)
    save_cache(cache, windows, tmp_path / "cache")
    loaded = load_cache(tmp_path / "cache", "abc")
    assert torch.equal(loaded.indices, cache.indices) and torch.equal(loaded.offsets, cache.offsets)
    n_positions = sum(len(generated_positions(r, a)) for r, a in zip(windows["reason_mask"], windows["act_mask"]))
    assert int(loaded.offsets[-1]) == n_positions
    # with k = V the cached objective equals the online one (up to the cache's float16)
    student = tiny_model_factory(hidden=16, seed=6)
    rows = list(range(3))
    batch = collate(windows.iloc[rows][["input_ids", "reason_mask", "act_mask"]].to_dict("records"), tokenizer.pad_token_id)
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for temperature in (1.0, 2.0):
        method = MethodParams(loss="sad", temperature=temperature)
        online, _ = method_loss(method, s_logits, batch, t_logits)
        cached, _ = method_loss(method, s_logits, batch, loaded.batch_targets(rows, temperature))
        # float16 keeps log-probs to 2^-11 of their size (about 3e-3 at log p = -7): on a KL of 0.02 the
        # cached value may differ in its third digit (0.28% on the demos of 2026-12-04's ALFWorld splits)
        assert cached.item() == pytest.approx(online.item(), rel=5e-3)


def test_small_k_cache_is_a_few_percent_of_full_logits(windows, tokenizer, tiny_model_factory):
    teacher = tiny_model_factory(hidden=32, seed=5)
    cache = build_topk_cache(teacher, windows, top_k=8, temperatures=[1.0], pad_id=tokenizer.pad_token_id,
                             windows_hash="abc", progress=False)
    assert cache.indices.dtype == torch.int16 and cache.logp["logp@1"].dtype == torch.float16
    # per position: 8 int16 ids + 8 float16 log-probs + one float32 tail, against V float32 logits
    assert cache.nbytes / cache.full_logits_bytes() == pytest.approx((8 * 2 + 8 * 2 + 4) / (teacher.config.vocab_size * 4))
    assert (cache.entropy_sum > 0).all()


def test_stale_or_missing_cache_is_refused(windows, tokenizer, tiny_model_factory, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher_logits"):
        load_cache(tmp_path / "nowhere")
    cache = build_topk_cache(tiny_model_factory(seed=5), windows, 4, [1.0], tokenizer.pad_token_id, "old", progress=False)
    save_cache(cache, windows, tmp_path / "c")
    with pytest.raises(StaleCacheError, match="rerun the teacher_logits stage"):
        load_cache(tmp_path / "c", "new")
    with pytest.raises(StaleCacheError, match="temperature 3"):
        cache.batch_targets([0], 3.0)


def test_mismatched_cache_rows_are_an_error(windows, tokenizer, tiny_model_factory):
    cache = build_topk_cache(tiny_model_factory(seed=5), windows, 4, [1.0], tokenizer.pad_token_id, "h", progress=False)
    batch = collate(windows.iloc[[0]][["input_ids", "reason_mask", "act_mask"]].to_dict("records"), tokenizer.pad_token_id)
    logits = tiny_model_factory(seed=6)(input_ids=batch["input_ids"]).logits
    with pytest.raises(ValueError, match="cover"):
        method_loss(MethodParams(loss="token_kd"), logits, batch, cache.batch_targets([1], 1.0))


def test_the_same_cache_is_written_byte_for_byte_the_same(windows, tokenizer, tiny_model_factory, tmp_path):
    """DVC hashes the stage output: a rerun that computes the same cache must not change its hash. A
    multi-key safetensors metadata map is written in a per-process random order, so the metadata is one key."""
    from safetensors import safe_open

    cache = build_topk_cache(tiny_model_factory(seed=5), windows, 4, [1.0], tokenizer.pad_token_id, "h", progress=False)
    written = []
    for name in ("a", "b", "c"):
        save_cache(cache, windows, tmp_path / name)
        written.append((tmp_path / name / "topk.safetensors").read_bytes())
    assert written[0] == written[1] == written[2]
    with safe_open(str(tmp_path / "a" / "topk.safetensors"), framework="pt") as fh:
        assert len(fh.metadata()) == 1
    loaded = load_cache(tmp_path / "a", "h")
    assert (loaded.vocab_size, loaded.windows_hash, loaded.top_k) == (cache.vocab_size, "h", cache.top_k)


def test_windows_batched_by_length_keep_their_order_in_the_cache(windows, tokenizer, tiny_model_factory):
    """Batches are formed in order of window length (less padding); every window's rows stay where the
    windows' order puts them: the same cache as one window at a time."""
    teacher = tiny_model_factory(hidden=32, seed=5)
    lengths = windows["input_ids"].map(len)
    assert lengths.nunique() > 2 and not lengths.is_monotonic_increasing  # batching by length reorders them
    args = dict(top_k=8, temperatures=[1.0, 2.0], pad_id=tokenizer.pad_token_id, windows_hash="h", progress=False)
    batched = build_topk_cache(teacher, windows, batch_size=3, **args)
    single = build_topk_cache(teacher, windows, batch_size=1, **args)
    assert torch.equal(batched.offsets, single.offsets) and torch.equal(batched.indices, single.indices)
    for key in single.logp:
        assert torch.allclose(batched.logp[key].float(), single.logp[key].float(), atol=2e-3)
    for key in single.tail:
        assert torch.allclose(batched.tail[key], single.tail[key], atol=1e-4)
    assert torch.allclose(batched.entropy_sum, single.entropy_sum, rtol=1e-4)


def test_generated_logits_are_the_full_forward_at_generated_positions_with_an_fp32_head(windows, tokenizer,
                                                                                        tiny_model_factory):
    """The cache reads logits only where a loss reads them; a bf16 teacher's head runs in fp32."""
    teacher = tiny_model_factory(hidden=32, seed=5).eval()
    batch = collate(windows.iloc[:3][["input_ids", "reason_mask", "act_mask"]].to_dict("records"), tokenizer.pad_token_id)
    generated = (batch["reason_mask"][:, 1:] + batch["act_mask"][:, 1:]) > 0
    with torch.no_grad():
        full = teacher(input_ids=batch["input_ids"]).logits[:, :-1][generated]
        selected = generated_logits(teacher, batch["input_ids"], generated)
        assert selected.shape == (int(generated.sum()), teacher.config.vocab_size)
        assert torch.allclose(selected, full, atol=1e-5)
        bf16 = generated_logits(teacher.to(torch.bfloat16), batch["input_ids"], generated)
    assert bf16.dtype == torch.float32
    # the bf16 body moves the logits a little; the same top-1 nearly everywhere
    assert (bf16.argmax(-1) == full.argmax(-1)).float().mean() > 0.95
    assert (bf16 - full).abs().max() < 0.5


def test_the_cache_head_applies_each_architectures_own_logit_processing_and_refuses_an_unknown_one():
    """Gemma 2's soft-capping and Cohere's logit scale are applied as their own forward does (the cache holds the
    teacher's distribution, not its raw head's); a forward that changes its logits otherwise is refused."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from sad.logits import check_head_matches_forward

    small = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 0}
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    generated = torch.ones(2, 8, dtype=torch.bool)
    for model in (Gemma2ForCausalLM(Gemma2Config(**small, head_dim=8, final_logit_softcapping=0.5)),
                  CohereForCausalLM(CohereConfig(**small, logit_scale=4.0))):
        model.eval()
        with torch.no_grad():
            head = model.get_output_embeddings()
            head.weight.mul_(50)  # logits large enough that the processing matters
            own = model(input_ids=ids).logits[:, :-1][generated]
            assert torch.allclose(generated_logits(model, ids, generated), own, atol=1e-4), type(model).__name__
        check_head_matches_forward(model, ids[:1], generated[:1])
    model.config.logit_scale = 1.0  # the forward still multiplies by 4 (its own copy): unknown to the cache head
    with pytest.raises(ValueError, match="CohereForCausalLM's forward post-processes its logits"):
        check_head_matches_forward(model, ids[:1], generated[:1])
    # an online teacher is checked the same way before the first training step
    import pandas as pd

    from sad.config import TrainParams
    from sad.training import train_lm

    window = {"input_ids": ids[0].tolist(), "reason_mask": [0, 1, 1, 1, 0, 0, 0, 0, 0], "act_mask": [0, 0, 0, 0, 1, 1, 0, 0, 0]}
    student = CohereForCausalLM(CohereConfig(**small))
    with pytest.raises(ValueError, match="CohereForCausalLM's forward post-processes its logits"):
        train_lm(student, pd.DataFrame([window] * 4), MethodParams(loss="sad"), TrainParams(epochs=1, batch_size=2), 0,
                 teacher=model, progress=False)


def test_online_targets_are_fp32_under_bf16_autocast_and_give_the_loss_of_the_full_logits(windows, tokenizer,
                                                                                           tiny_model_factory):
    """A training loop's online teacher reads its targets like the cache (fp32 head at the generated positions),
    not the bf16 logits the full forward gives under autocast; the loss is that of the full logits."""
    teacher, student = tiny_model_factory(hidden=32, seed=5).eval(), tiny_model_factory(hidden=32, seed=6)
    batch = collate(windows.iloc[:3][["input_ids", "reason_mask", "act_mask"]].to_dict("records"), tokenizer.pad_token_id)
    generated = (batch["reason_mask"][:, 1:] + batch["act_mask"][:, 1:]) > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert teacher(input_ids=batch["input_ids"]).logits.dtype == torch.bfloat16  # what the loop used to read
        assert generated_logits(teacher, batch["input_ids"], generated).dtype == torch.float32
    method = MethodParams(loss="sad")
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"]).logits
        full = method_loss(method, logits, batch, teacher(input_ids=batch["input_ids"]).logits)[0]
        selected = method_loss(method, logits, batch, generated_logits(teacher, batch["input_ids"], generated))[0]
    assert torch.allclose(full, selected, atol=1e-6)
