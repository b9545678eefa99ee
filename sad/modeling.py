"""Model construction, saving and loading (safetensors only)."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from sad.config import ArchParams
from sad.io import atomic_dir, write_json_atomic

log = logging.getLogger(__name__)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 matmul instructions (x86 ``avx512_bf16`` or AMX, ARM ``bf16``), read from the
    ``flags`` / ``Features`` lines of ``cpuinfo`` (default: ``/proc/cpuinfo``; False where it cannot be read).
    Without them PyTorch emulates bf16 on CPU: a healing step of the 8-layer student took 127 s under bf16
    autocast against 4-5 s in fp32 on a 2-core AVX2 EPYC (2026-12-04); with them bf16 was 1.7x faster than fp32
    for a SmolLM2 LoRA step."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


#: bf16 is used for ``precision: auto`` (and honoured for ``bf16``) in training and the top-k cache on a CPU only
#: where a bf16 matmul runs at least this much faster than fp32: bf16 instructions alone do not make it fast
#: (measured below). Play needs the instructions only (:func:`play_dtype`)
BF16_MIN_SPEEDUP = 1.15


def measure_bf16_speedup() -> float:
    """fp32 time / bf16 time of a [256, 576] x [576, 1536] matmul on this CPU (best of 5 rounds of 10 each,
    with the threads torch uses here; about 0.3 s). 0.49-0.71x on a 2-core Intel Xeon with avx512_bf16 and
    avx512_fp16 but no AMX (2026-12-06; 0.35-0.52x at other shapes), where a training step under bf16 autocast
    ran at 0.72x fp32; on the 2-core AMD EPYC with avx512_bf16 bf16 matmuls ran 1.8x fp32 (331 against 187
    GFLOP/s) and the default's distillation 2.1x faster."""
    import time

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 576, generator=gen), torch.randn(576, 1536, generator=gen)

    def best_time(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(10):
                x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        return best_time(a, b) / best_time(a.bfloat16(), b.bfloat16())


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("unknown" where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("model name")),
                "unknown")


def bf16_speedup_file() -> Path:
    """Where the measured bf16 speedup of this machine is kept: ``$SAD_CACHE_DIR`` or ``~/.cache/sad``."""
    root = os.environ.get("SAD_CACHE_DIR") or Path.home() / ".cache" / "sad"
    return Path(root) / "cpu_bf16_speedup.json"


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """:func:`measure_bf16_speedup`, measured once per machine and kept in :func:`bf16_speedup_file` under a key of
    the CPU model, the bf16 flag, the torch version and its thread count: every later process (a resumed stage,
    the other rank of a multi-process run, the next stage) reads the same number, so ``precision: auto`` cannot
    land on the other side of :data:`BF16_MIN_SPEEDUP` between them. Delete the file to measure again; a file
    that cannot be read or written is measured past (logged)."""
    key = f"{_cpu_model()} | bf16 instructions {cpu_has_native_bf16()} | torch {torch.__version__} | " \
          f"{torch.get_num_threads()} threads"
    path = bf16_speedup_file()
    try:
        kept = json.loads(path.read_text()) if path.is_file() else {}
        if isinstance(kept, dict) and isinstance(kept.get(key), (int, float)):
            return float(kept[key])
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be read (%s): measuring the bf16 speedup again", path, exc)
        kept = {}
    speedup = measure_bf16_speedup()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**(kept if isinstance(kept, dict) else {}), key: round(speedup, 4)})
    except OSError as exc:
        log.warning("the measured bf16 speedup could not be kept in %s (%s): each process measures it", path, exc)
    return speedup


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 pays on this CPU: it has bf16 instructions (:func:`cpu_has_native_bf16`) and a bf16 matmul
    measures >= :data:`BF16_MIN_SPEEDUP` x fp32 (:func:`cpu_bf16_speedup`). ``SAD_CPU_BF16=1`` / ``0`` decides
    it without measuring (a machine whose result must not depend on a timing); ``1`` on a CPU without bf16
    instructions is honoured with a warning (emulated bf16 is ~28x slower)."""
    forced = os.environ.get("SAD_CPU_BF16", "").strip()
    if forced == "1" and not cpu_has_native_bf16():
        log.warning("SAD_CPU_BF16=1 on a CPU without bf16 instructions (avx512_bf16/AMX): bf16 is emulated here, "
                    "about 28x slower than fp32; unset it (measured) or set it to 0")
    if forced in {"0", "1"}:
        return forced == "1"
    if forced:
        raise ValueError(f"SAD_CPU_BF16={forced!r}: set it to 1 (bf16 pays on this CPU), 0 (it does not) or unset it "
                         "(measured)")
    if not cpu_has_native_bf16():
        return False
    speedup = cpu_bf16_speedup()
    fast = speedup >= BF16_MIN_SPEEDUP
    log.info("CPU bf16 matmul %.2fx fp32 (%s %.2fx; kept in %s): precision auto uses %s", speedup,
             ">=" if fast else "<", BF16_MIN_SPEEDUP, bf16_speedup_file(), "bf16" if fast else "fp32")
    return fast


def play_dtype(precision: str, bf16_ok: bool | None = None, setting: str = "agent.precision",
               compute_bound: bool = False) -> torch.dtype:
    """The dtype a model loaded to run without gradients uses (weights and KV cache) for ``precision``:
    ``agent.precision`` for agents, ``distill.teacher_logits.precision`` for the top-k cache (``setting``
    names it in the warning).

    ``fp32``: float32. ``bf16``: bfloat16, where it runs natively: for play (decoding, bound by reading the
    weights and the KV cache, which bf16 halves) a CPU with bf16 instructions (:func:`cpu_has_native_bf16`);
    for ``compute_bound`` work (the top-k cache's teacher forward over whole windows) a CPU whose bf16 matmuls
    also measure faster than fp32 (:func:`cpu_bf16_is_fast`). Measured: on the Intel Xeon whose bf16 matmuls
    run at 0.6x fp32 the teacher played the default's 60 test tasks in bf16 in 376.5 s against 384.8 s in
    fp32 (37 against 34 wins); on the AMD EPYC 1.9x faster. Elsewhere it runs in float32, with a warning when
    ``bf16`` was asked by name. ``auto``: bfloat16 where it runs natively, else float32. ``bf16_ok`` is
    decided when None."""
    if precision == "fp32":
        return torch.float32
    if bf16_ok is None:
        bf16_ok = cpu_bf16_is_fast() if compute_bound else cpu_has_native_bf16()
    if not bf16_ok:
        if precision == "bf16":
            where = ("a CPU whose bf16 matmuls are not faster than fp32 (no avx512_bf16/AMX, or measured slower)"
                     if compute_bound else "a CPU without bf16 instructions (avx512_bf16/AMX)")
            log.warning("%s bf16 asked on %s: the model runs in fp32; set %s: auto or fp32 to silence this",
                        setting, where, setting)
        return torch.float32
    return torch.bfloat16


def build_llama(arch: ArchParams, tokenizer, max_positions: int, seed: int = 0, vocab_size: int | None = None):
    """A fresh Llama-architecture causal LM sized by ``arch`` (tied input/output embeddings).

    ``vocab_size`` defaults to the tokenizer's size.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_model(model, tokenizer, path: str | Path, card: dict | None = None, readme: str | None = None,
               files: Mapping[str, Path] | None = None) -> None:
    """Write model (safetensors) + tokenizer + an optional card (and its README.md) + ``files`` (name in the
    folder -> file to copy there), atomically: the folder appears whole or not at all."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if card is not None:
            (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        if readme is not None:
            (tmp / "README.md").write_text(readme, encoding="utf-8")
        copy_files_into(tmp, files or {})


def copy_files_into(folder: Path, files: Mapping[str, Path]) -> None:
    """Copy each ``files`` value to ``folder / key`` (creating subfolders)."""
    for name, source in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / name)


def load_model(path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """Load a causal LM from a folder of safetensors weights (in ``dtype``, default as stored); never unpickles."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder (the stage that writes it has not run: `dvc status` "
                                "lists what is missing, `sad pipeline` or `dvc repro` writes it)")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors checkpoints are loaded)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=trust_remote_code,
                                                     **({"dtype": dtype} if dtype is not None else {}))
    except Exception as exc:  # noqa: BLE001 - safetensors, json and transformers raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot load the model ({first}); the weights or config.json are damaged or "
                         "half-written: rerun the stage that writes this folder") from exc
    model.eval()
    return model


def read_card(path: str | Path) -> dict:
    card = Path(path) / "card.json"
    return json.loads(card.read_text()) if card.is_file() else {}


def read_pretrained_arch(model) -> dict[str, int | str]:
    """The architecture numbers of a loaded model (for cards)."""
    c = model.config
    return {"hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
            "intermediate_size": getattr(c, "intermediate_size", None), "vocab_size": c.vocab_size}


def restrict_vocabulary(model, keep_ids: list[int], tokenizer):
    """Cut ``model``'s embedding and output head to the rows ``keep_ids`` (new id ``i`` is source id
    ``keep_ids[i]``, as in :func:`sad.tokenizer.restrict_tokenizer`), in place; returns the model.

    The logits of the result are the source's logits at ``keep_ids`` ([batch, seq, len(keep_ids)]): a
    model that only ever reads and writes domain text loses nothing, while its embedding shrinks to
    ``len(keep_ids) x hidden`` and its head costs that much per token."""
    index = torch.tensor(keep_ids, dtype=torch.long)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    new_embedding = torch.nn.Embedding(len(keep_ids), embedding.embedding_dim, dtype=embedding.weight.dtype)
    new_embedding.weight = torch.nn.Parameter(embedding.weight.detach()[index].clone())
    model.set_input_embeddings(new_embedding)
    if head is not None:
        new_head = torch.nn.Linear(head.in_features, len(keep_ids), bias=head.bias is not None,
                                   dtype=head.weight.dtype)
        new_head.weight = new_embedding.weight if tied else torch.nn.Parameter(head.weight.detach()[index].clone())
        if head.bias is not None:
            new_head.bias = torch.nn.Parameter(head.bias.detach()[index].clone())
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(keep_ids)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                setattr(config, key, getattr(tokenizer, key))
    return model
