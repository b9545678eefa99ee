"""A byte-level BPE tokenizer trained on the demonstrations (the embedded default).

Teacher and students share it, which logit distillation requires. It is *copy-friendly*: every
space and punctuation character is a token of its own and merges stay inside words, so a word is
tokenised the same wherever it stands (``[Raos``, `` Raos`` and ``(Raos`` all end in the tokens of
``Raos``). Agents copy names, titles and ids from their context into actions; with plain byte-level
BPE the copy and its source are often different token sequences, which a small model cannot learn
to copy (measured in issue #15: only 68-70% of action arguments were tokenised like their source).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\w]|_"), behavior="isolated"),  # each space/punctuation char alone
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (run the 'tokenizer' stage, or point to a Hugging Face model folder)")
    return AutoTokenizer.from_pretrained(str(path))


def check_compatible(teacher_tok, student_tok, teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Logit distillation compares distributions over one vocabulary: fail early otherwise."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        raise ValueError(
            f"tokenizers differ: {teacher_name} has {len(tv)} tokens, {student_name} {len(sv)} "
            f"({only_t} only in {teacher_name}, {only_s} only in {student_name}, or ids differ). "
            "Logit distillation needs one shared tokenizer: use the teacher's tokenizer for the student."
        )
