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


DOMAIN_VOCAB_FILE = "domain_vocab.json"  # in a restricted tokenizer's folder: the source ids it keeps, in new-id order
# in a shipped teacher's folder (and the pretrained stage's copy of it): the domain vocabulary it was trained with, in
# the same format; the tokenizer stage keeps these ids too, so test text tokenizes as the teacher learned it
TRAINED_VOCAB_FILE = "trained_vocab.json"


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """A tokenizer.json's merges as pairs (the file stores either ``"a b"`` strings or ``[a, b]`` lists)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def domain_token_ids(tokenizer, texts: Iterable[str]) -> list[int]:
    """Source ids of the tokens a byte-level BPE ``tokenizer`` produces on ``texts``, plus every byte,
    every special token and, recursively, the two parents of each kept merge result; sorted.

    Keeping the parents is what makes :func:`restrict_tokenizer` reproduce the same tokens on these texts."""
    import json

    from tokenizers import pre_tokenizers

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"domain vocabulary needs a BPE tokenizer, got {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    parents: dict[str, tuple[str, str]] = {}
    for a, b in _merge_pairs(model["merges"]):
        parents.setdefault(a + b, (a, b))
    keep = {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}
    keep |= set(tokenizer.all_special_ids) | {t["id"] for t in spec["added_tokens"]}
    for text in texts:
        keep.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    by_id = {i: t for t, i in vocab.items()}
    stack = [by_id[i] for i in keep if i in by_id]
    while stack:
        for parent in parents.get(stack.pop(), ()):
            if vocab[parent] not in keep:
                keep.add(vocab[parent])
                stack.append(parent)
    return sorted(keep)


def restrict_tokenizer(tokenizer, keep_ids: list[int]):
    """The same byte-level BPE with only the tokens ``keep_ids`` (new id ``i`` is source id ``keep_ids[i]``)
    and the merges whose result is kept. On text whose tokens were all kept (with their parents, see
    :func:`domain_token_ids`) it gives the same tokens; other text falls back to smaller kept pieces,
    down to single bytes, so every text still round-trips."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    source = spec["model"]["vocab"]
    by_id = {i: t for t, i in source.items()}
    added = {t["id"]: t for t in spec["added_tokens"]}
    new_id = {old: new for new, old in enumerate(keep_ids)}
    spec["model"]["vocab"] = {by_id[old]: new for old, new in new_id.items() if old in by_id}
    kept = spec["model"]["vocab"]
    spec["model"]["merges"] = [[a, b] for a, b in _merge_pairs(spec["model"]["merges"])
                               if a + b in kept and a in kept and b in kept]
    missing = [i for i in keep_ids if i not in by_id and i not in added]
    if missing:
        raise ValueError(f"restrict_tokenizer: ids {missing[:5]} are not in the tokenizer's vocabulary")
    spec["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in spec["added_tokens"] if t["id"] in new_id]
    post = spec.get("post_processor") or {}
    for special in (post.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    restricted = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token, clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
        model_max_length=tokenizer.model_max_length,
    )
    if getattr(tokenizer, "chat_template", None):
        restricted.chat_template = tokenizer.chat_template
    return restricted


def read_domain_vocab(folder: str | Path, name: str = DOMAIN_VOCAB_FILE) -> list[int] | None:
    """The source ids a restricted tokenizer in ``folder`` keeps (new-id order), or None if it is not one
    (``name`` :data:`TRAINED_VOCAB_FILE`: those a shipped teacher was trained with, or None)."""
    import json

    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        return [int(i) for i in json.loads(path.read_text())["source_ids"]]
    except (ValueError, KeyError, TypeError) as exc:
        fix = "rerun the tokenizer stage" if name == DOMAIN_VOCAB_FILE else "ship the teacher again (sad ship-teacher)"
        raise ValueError(f"{path}: damaged domain vocabulary ({exc}); {fix}") from exc
