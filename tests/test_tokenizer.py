"""The domain vocabulary: a pretrained BPE cut to the tokens the demos use, and a model cut to match."""

from __future__ import annotations

import pytest
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Thought: I need a mug. Action: take mug 1 from countertop 2",
    "Observation: You arrive at countertop 2. On the countertop 2, you see a mug 1, and a saltshaker 3.",
    "search[organic green tea, price lower than 30.00 dollars] click[B07XYZ1234] click[buy now]",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
] * 20


@pytest.fixture(scope="module")
def byte_level_bpe():
    """A plain byte-level BPE like SmolLM2's (GPT-2 pre-tokenisation, no copy-friendly split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")


def test_a_domain_tokenizer_gives_the_same_tokens_on_its_domain_and_round_trips_everything(byte_level_bpe):
    from sad.tokenizer import domain_token_ids, restrict_tokenizer

    domain = CORPUS[1:4]
    keep = domain_token_ids(byte_level_bpe, domain)
    cut = restrict_tokenizer(byte_level_bpe, keep)
    assert len(cut) == len(keep) < len(byte_level_bpe)
    assert keep == sorted(keep) and set(byte_level_bpe.all_special_ids) <= set(keep)
    assert (cut.eos_token, cut.pad_token) == (byte_level_bpe.eos_token, byte_level_bpe.pad_token)
    for text in domain:
        source = byte_level_bpe(text, add_special_tokens=False)["input_ids"]
        ids = cut(text, add_special_tokens=False)["input_ids"]
        assert [keep[i] for i in ids] == source
    for text in (CORPUS[0], CORPUS[4], "naïve café, 東京 ✓"):  # outside the domain: smaller pieces, same text
        ids = cut(text, add_special_tokens=False)["input_ids"]
        assert cut.decode(ids) == text
    assert len(cut(CORPUS[4])["input_ids"]) > len(byte_level_bpe(CORPUS[4])["input_ids"])


def test_a_restricted_tokenizer_saves_and_loads_with_its_kept_ids(byte_level_bpe, tmp_path):
    from sad.tokenizer import DOMAIN_VOCAB_FILE, domain_token_ids, load_tokenizer, read_domain_vocab, restrict_tokenizer

    keep = domain_token_ids(byte_level_bpe, CORPUS[1:2])
    restrict_tokenizer(byte_level_bpe, keep).save_pretrained(str(tmp_path))
    assert read_domain_vocab(tmp_path) is None
    (tmp_path / DOMAIN_VOCAB_FILE).write_text(f'{{"source_ids": {keep}}}')
    assert read_domain_vocab(tmp_path) == keep and len(load_tokenizer(tmp_path)) == len(keep)
    (tmp_path / DOMAIN_VOCAB_FILE).write_text('{"ids": []}')
    with pytest.raises(ValueError, match="damaged domain vocabulary.*rerun the tokenizer stage"):
        read_domain_vocab(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_a_vocabulary_cut_model_gives_the_source_logits_at_the_kept_ids(tied):
    """logits of the cut model [1, T, K] == the source's logits [1, T, V] at keep_ids; ids renumbered."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sad.modeling import count_parameters, restrict_vocabulary

    class Ids:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=tied)).eval()
    before = count_parameters(model)
    keep = [0, 1, 2, 5, 7, 11, 13, 40, 49]
    source_ids = [5, 7, 11, 40, 2, 49]
    with torch.no_grad():
        full = model(torch.tensor([source_ids])).logits
        restrict_vocabulary(model, keep, Ids)
        cut = model(torch.tensor([[keep.index(i) for i in source_ids]])).logits
    assert cut.shape == (1, len(source_ids), len(keep))
    assert torch.allclose(cut, full[..., keep], atol=1e-6)
    assert before - count_parameters(model) == (50 - len(keep)) * 16 * (1 if tied else 2)
    assert model.config.vocab_size == len(keep) and model.config.eos_token_id == 2
