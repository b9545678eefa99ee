"""Stage ``teacher_logits``: the teacher's top-k log-probs on every window, shared by all methods."""

from __future__ import annotations

from typing import Any

from sad.config import Params
from sad.io import write_json_atomic
from sad.stages.layout import file_hash, segments_dir, teacher_dir, teacher_logits_dir


def run_teacher_logits(p: Params, progress: bool = True) -> dict[str, Any]:
    """Cache the teacher's top-k log-probs (and entropies) at every generated position of the windows."""
    import time

    from sad.modeling import load_model, play_dtype
    from sad.segment import load_windows
    from sad.teacher_cache import build_topk_cache, save_cache

    windows = load_windows(segments_dir(p))
    dtype = play_dtype(p.distill.teacher_logits.precision, setting="distill.teacher_logits.precision",
                       compute_bound=True)
    teacher = load_model(teacher_dir(p), dtype=dtype)
    started = time.perf_counter()
    cache = build_topk_cache(teacher, windows, p.distill.teacher_logits.top_k, p.distill.temperatures(),
                             teacher.config.pad_token_id or 0, file_hash(segments_dir(p) / "windows.parquet"),
                             p.distill.teacher_logits.batch_size, progress=progress)
    seconds = time.perf_counter() - started
    save_cache(cache, windows, teacher_logits_dir(p))
    positions = int(cache.offsets[-1])
    metrics = {"positions": positions, "top_k": cache.top_k, "temperatures": p.distill.temperatures(),
               "dtype": str(dtype).removeprefix("torch."),
               "cache_bytes": cache.nbytes, "full_logits_bytes": cache.full_logits_bytes(),
               "bytes_ratio": cache.nbytes / max(cache.full_logits_bytes(), 1), "seconds": seconds,
               "mean_teacher_entropy": float(cache.entropy_sum.sum()) / max(positions, 1)}
    write_json_atomic(p.path("metrics", "teacher_logits.json"), metrics)
    return metrics
