"""Teacher logits as a versioned stage output: top-k log-probabilities at every generated position.

The ``teacher_logits`` stage runs the teacher once over the training windows and keeps, for
each position whose next token carries a loss (REASON or ACT), the teacher's ``k`` most
likely token ids and their log-probabilities at each distillation temperature, plus the
teacher's entropy there (the curriculum's γ term). Every KD method reads the same cache
instead of running the teacher inside its training loop.

Files (``data/teacher_logits/``): ``topk.safetensors`` (``indices`` [N, k] int16/int32,
``logp@τ`` [N, k] float16 and ``tail@τ`` [N] float32 (log of the mass outside the top-k)
per temperature, ``offsets`` [W+1] int64: window w owns rows
``offsets[w]:offsets[w+1]``) with the windows table's hash in its metadata, and
``stats.parquet`` (per window: generated tokens, summed teacher entropy).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sad.io import atomic_dir
from sad.logits import check_head_matches_forward, generated_logits, generated_mask

log = logging.getLogger(__name__)

TOPK_FILE = "topk.safetensors"
STATS_FILE = "stats.parquet"
METADATA_KEY = "sad_topk_cache"  # JSON: windows_hash, vocab_size, top_k


class StaleCacheError(ValueError):
    """The cache was computed for other windows or settings than the ones being trained on."""


def temperature_key(temperature: float) -> str:
    return f"logp@{float(temperature):g}"


@dataclass
class TopkCache:
    indices: torch.Tensor  # [N, k] int16 or int32
    logp: dict[str, torch.Tensor]  # temperature key -> [N, k] float16
    tail: dict[str, torch.Tensor]  # temperature key -> [N] float32, log-mass outside the top-k
    offsets: torch.Tensor  # [W + 1] int64
    entropy_sum: torch.Tensor  # [W] float32, teacher entropy summed over each window's generated positions
    vocab_size: int
    windows_hash: str

    @property
    def top_k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def nbytes(self) -> int:
        tensors = [self.indices, *self.logp.values(), *self.tail.values()]
        return sum(v.numel() * v.element_size() for v in tensors)

    def full_logits_bytes(self, dtype_bytes: int = 4) -> int:
        """Bytes the same positions would take as full fp32 logits."""
        return int(self.indices.shape[0]) * self.vocab_size * dtype_bytes

    def batch_targets(self, window_rows: list[int], temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher (log-probs [N, k] float32, ids [N, k] int64, tail log-mass [N]) for the windows'
        generated positions, in batch order then position order (the order of ``mask.nonzero()``)."""
        key = temperature_key(temperature)
        if key not in self.logp:
            raise StaleCacheError(f"the teacher-logit cache has no temperature {temperature:g} "
                                  f"(has {sorted(self.logp)}); rerun the teacher_logits stage")
        spans = [(int(self.offsets[w]), int(self.offsets[w + 1])) for w in window_rows]
        rows = torch.cat([torch.arange(a, b) for a, b in spans]) if spans else torch.zeros(0, dtype=torch.long)
        return self.logp[key][rows].float(), self.indices[rows].long(), self.tail[key.replace("logp", "tail")][rows].float()


def generated_positions(reason_mask: list[int], act_mask: list[int]) -> list[int]:
    """Logit positions t whose next token t+1 is generated (REASON or ACT)."""
    return [t for t in range(len(reason_mask) - 1) if reason_mask[t + 1] or act_mask[t + 1]]


def build_topk_cache(teacher, windows: pd.DataFrame, top_k: int, temperatures: list[float], pad_id: int,
                     windows_hash: str, batch_size: int = 8, progress: bool = True) -> TopkCache:
    """Run the teacher over every window (no grad) and keep top-k log-probs at generated positions.

    Windows are batched in order of length, so a batch pads little (on the default's 107M teacher, 32
    windows of 307-764 tokens: 34 s in batches of 8 against 57-65 s in file order in batches of 16);
    the cache keeps the windows' order: row-major, window by window, position by position."""
    from sad.losses import complement_logsumexp
    from sad.training import collate

    teacher.eval()
    vocab = int(teacher.config.vocab_size)
    k = min(top_k, vocab)
    index_dtype = torch.int16 if vocab <= torch.iinfo(torch.int16).max else torch.int32
    rows = windows[["input_ids", "reason_mask", "act_mask"]].to_dict("records")
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    keys = [temperature_key(t) for t in temperatures]
    # per window: top-k ids [n_i, k], log-probs and tail mass per temperature, generated count, entropy sum
    per_row: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], int, float] | None] = [None] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc="teacher logits", disable=not progress, unit="batch"):
        members = by_length[start:start + batch_size]
        batch = collate([rows[i] for i in members], pad_id)
        generated = generated_mask(batch)  # [B, T-1], next token generated
        if start == 0:  # once: the fp32 head gives what the teacher's own forward gives
            check_head_matches_forward(teacher, batch["input_ids"][:1], generated[:1])
        sel = generated_logits(teacher, batch["input_ids"], generated)  # [n, V] fp32, window by window
        counts = generated.sum(1).tolist()
        base = F.log_softmax(sel, dim=-1)
        token_entropy = -(base.exp() * base).sum(-1)  # [n]
        top = sel.topk(k, dim=-1).indices  # the same ids at any temperature
        logps, tails = [], []
        for t in temperatures:
            scaled = base if t == 1.0 else F.log_softmax(sel / t, dim=-1)
            logps.append(scaled.gather(-1, top).half())
            tails.append(complement_logsumexp(scaled, top))
        bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
        for j, i in enumerate(members):
            a, b = bounds[j], bounds[j + 1]
            per_row[i] = (top[a:b].to(index_dtype), [x[a:b] for x in logps], [x[a:b] for x in tails], counts[j],
                          float(token_entropy[a:b].sum()))
    done = [r for r in per_row if r is not None]
    indices = [r[0] for r in done]
    logp = {key: [r[1][n] for r in done] for n, key in enumerate(keys)}
    tail = {key: [r[2][n] for r in done] for n, key in enumerate(keys)}
    counts = [r[3] for r in done]
    entropy = [r[4] for r in done]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    return TopkCache(
        indices=torch.cat(indices) if indices else torch.zeros(0, k, dtype=index_dtype),
        logp={key: torch.cat(v) if v else torch.zeros(0, k, dtype=torch.float16) for key, v in logp.items()},
        tail={key.replace("logp", "tail"): torch.cat(v) if v else torch.zeros(0) for key, v in tail.items()},
        offsets=offsets, entropy_sum=torch.tensor(entropy, dtype=torch.float32), vocab_size=vocab,
        windows_hash=windows_hash,
    )


def save_cache(cache: TopkCache, windows: pd.DataFrame, folder: str | Path) -> None:
    """Write the cache atomically (a killed stage leaves no partial cache)."""
    from safetensors.torch import save_file

    tensors = {"indices": cache.indices.contiguous(), "offsets": cache.offsets, "entropy_sum": cache.entropy_sum,
               **{key: v.contiguous() for key, v in {**cache.logp, **cache.tail}.items()}}
    # One metadata key: safetensors writes a multi-key metadata map in a random order, which would give the
    # same cache a new hash on every run (and DVC would retrain every student after a forced rerun).
    metadata = {METADATA_KEY: json.dumps({"windows_hash": cache.windows_hash, "vocab_size": cache.vocab_size,
                                          "top_k": cache.top_k}, sort_keys=True)}
    stats = pd.DataFrame({
        "episode_id": windows["episode_id"].values, "window": windows["window"].values,
        "generated": (cache.offsets[1:] - cache.offsets[:-1]).numpy(), "entropy_sum": cache.entropy_sum.numpy(),
    })
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(Path(tmp) / TOPK_FILE), metadata=metadata)
        stats.to_parquet(Path(tmp) / STATS_FILE, index=False)


def load_cache(folder: str | Path, windows_hash: str | None = None) -> TopkCache:
    """Read the cache; with ``windows_hash``, refuse one computed for other windows."""
    from safetensors import safe_open

    path = Path(folder) / TOPK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the 'teacher_logits' stage first)")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        meta = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else meta  # else: a cache before one key
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    if windows_hash is not None and meta.get("windows_hash") != windows_hash:
        raise StaleCacheError(f"{path}: computed for windows {meta.get('windows_hash')}, but the segments are "
                              f"{windows_hash}; rerun the teacher_logits stage (dvc repro does)")
    return TopkCache(
        indices=tensors["indices"], offsets=tensors["offsets"], entropy_sum=tensors["entropy_sum"],
        logp={key: v for key, v in tensors.items() if key.startswith("logp@")},
        tail={key: v for key, v in tensors.items() if key.startswith("tail@")},
        vocab_size=int(meta.get("vocab_size", 0)), windows_hash=meta.get("windows_hash", ""),
    )
