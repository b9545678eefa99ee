"""Stage ``segment``: rollouts cut into [REASON]/[ACT] spans and token windows (schema-checked)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from sad.config import Params
from sad.io import atomic_dir, write_json_atomic
from sad.react import Episode
from sad.stages.layout import read_episodes, rollouts_file, segments_dir, tokenizer_dir

log = logging.getLogger(__name__)


def run_segment(p: Params) -> dict[str, Any]:
    """Cut the teacher's trajectories into REASON/ACT spans and masked token windows."""
    from sad.segment import save_segments, segment_episodes
    from sad.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir(p))
    episodes = read_episodes(rollouts_file(p))
    kept = [e for e in episodes if e.success] if p.segment.keep == "successful" else episodes
    if not kept:
        log.warning("no successful teacher episode: keeping all %d episodes", len(episodes))
        kept = episodes
    if p.segment.rejected_steps == "context":
        kept = [without_loss_on_rejected_steps(e) for e in kept]
    seg = segment_episodes(kept, tokenizer, p.context.max_tokens, p.context.history_steps, what=str(rollouts_file(p)))
    with atomic_dir(segments_dir(p)) as tmp:
        save_segments(seg, tmp)
    reason = int(sum(sum(m) for m in seg.windows["reason_mask"]))
    act = int(sum(sum(m) for m in seg.windows["act_mask"]))
    total = int(seg.windows["n_tokens"].sum())
    metrics = {"episodes": len(kept), "windows": len(seg.windows), "spans": len(seg.spans), "tokens": total,
               "reason_tokens": reason, "act_tokens": act, "context_tokens": total - reason - act}
    write_json_atomic(p.path("metrics", "segment.json"), metrics)
    return metrics


def without_loss_on_rejected_steps(episode: Episode) -> Episode:
    """A copy of ``episode`` whose rejected steps (``valid`` False) are context only (``imitate`` False)."""
    steps = [replace(s, imitate=s.imitate and s.valid) for s in episode.steps]
    return replace(episode, steps=steps)
