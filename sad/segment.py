"""Cut transcripts into [REASON]/[ACT] spans and token windows with masks ``m_r``, ``m_a``.

Character spans come from the transcript pieces (see :mod:`sad.react`); they map to token
positions through the tokenizer's offset mapping. A token whose characters straddle two
pieces is an error (it would belong to two kinds), reported with the episode id.

Episodes are cut into windows of at most ``max_tokens`` tokens: the prompt, up to
``history_steps`` earlier steps as context (no loss), then up to ``history_steps + 1`` steps
that carry the loss. As at play (:func:`sad.agent.fit_context`), history is never dropped
wholesale: a window's first loss step keeps the step before it, whole where it fits, else its head.

Windows are packed (several loss steps each), so a step's history in training is close to, not
always at least, what the agent sees at play (where block eviction, ``context.evict_to``, keeps
between half and all of the room). On the default's teacher rollouts (2026-12-06, 456 loss steps
after an episode's first): 14% trained with less history than at play (136 tokens fewer on
average), 29% with more; mean 323 tokens in training against 284 at play. Exactly play's context
for every step would take one window per step (several times the training tokens).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from sad.markers import SegmentationError, split_transcript
from sad.react import GENERATED_KINDS, Episode, episode_text
from sad.schemas import SpanSchema, StepSchema, WindowSchema, check_coverage, validate

__all__ = ["SegmentationError", "segment_episodes", "episode_windows", "tokenize_episode"]


@dataclass
class TokenizedEpisode:
    episode_id: str
    input_ids: list[int]
    piece_of_token: list[int]  # index of the piece each token belongs to
    pieces: list[tuple[str, str]]  # (kind, text)
    piece_starts: list[int]  # character offset of each piece


def transcript_pieces(episode: Episode) -> tuple[str, list[tuple[str, str]], list[int]]:
    """The rendered transcript cut by the ``react`` marker rules: (text, (kind, text) pieces, starts).

    Every step renders as REASON, ACT, observation; the rule-based split must find exactly
    that structure, otherwise the episode is rejected with the reason.
    """
    text = episode_text(episode)
    found = split_transcript(text, "react", episode.episode_id, allow_empty=True)
    kinds = [p.kind for p in found]
    expected = ["prompt"] + ["reason", "act", "observation"] * episode.n_steps
    if kinds != expected:
        raise SegmentationError(f"episode {episode.episode_id}: transcript pieces {kinds[:8]}... do not match "
                                f"{episode.n_steps} Thought/Action/Observation steps (a field holds a marker line?)")
    return text, [(p.kind, text[p.start:p.end]) for p in found], [p.start for p in found]


def tokenize_episode(episode: Episode, tokenizer) -> TokenizedEpisode:
    text, pieces, starts = transcript_pieces(episode)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    owners = []
    for tok_index, (s, e) in enumerate(enc["offset_mapping"]):
        piece = bisect.bisect_right(starts, s) - 1
        piece_end = starts[piece] + len(pieces[piece][1])
        if e > piece_end:
            raise SegmentationError(
                f"episode {episode.episode_id}: token {tok_index} ({text[s:e]!r}) straddles the boundary "
                f"between a {pieces[piece][0]} and a {pieces[piece + 1][0]} piece"
            )
        owners.append(piece)
    return TokenizedEpisode(episode.episode_id, list(enc["input_ids"]), owners, pieces, starts)


def _piece_token_ranges(tok: TokenizedEpisode) -> list[tuple[int, int]]:
    ranges = [[-1, -1] for _ in tok.pieces]
    for t, p in enumerate(tok.piece_of_token):
        if ranges[p][0] < 0:
            ranges[p][0] = t
        ranges[p][1] = t + 1
    for p, (a, _end) in enumerate(ranges):
        if a < 0:
            raise SegmentationError(f"episode {tok.episode_id}: piece {p} ({tok.pieces[p][0]}) has no tokens")
    return [(a, b) for a, b in ranges]


def _step_chunks(step_lengths: list[int], prompt_len: int, max_tokens: int, history_steps: int) -> list[list[int]]:
    """Group step indices into chunks that carry the loss: at most ``history_steps + 1`` steps
    (no limit for 0) whose tokens fit after the prompt. A chunk after the first keeps room for the step
    before it, whole where prompt, that step and its own first step fit together: at play an agent always
    sees its latest step (thought, action, the observation its next thought reacts to), and a window
    packed to the brim would give its first step a head of the previous thought at most (13% of the loss
    steps of the default's teacher rollouts, 2026-12-06)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    used = prompt_len
    for s, length in enumerate(step_lengths):
        full = history_steps > 0 and len(current) > history_steps
        if current and (used + length > max_tokens or full):
            chunks.append(current)
            current, used = [], prompt_len + min(step_lengths[s - 1], max(0, max_tokens - prompt_len - length))
        current.append(s)
        used += length
    if current:
        chunks.append(current)
    return chunks


def episode_windows(episode: Episode, tokenizer, max_tokens: int, history_steps: int = 0) -> tuple[list[dict], list[dict]]:
    """Rows for the window table and the span table of one episode.

    A window is ``prompt + context steps + chunk steps``: the loss (masks) is on the chunk's
    REASON/ACT tokens only; the context is the ``history_steps`` steps before the chunk (0: as
    many as fit), so that every step is learnt with at least the history an agent will see.
    """
    tok = tokenize_episode(episode, tokenizer)
    ranges = _piece_token_ranges(tok)
    prompt_range = ranges[0]
    steps = [ranges[i:i + 3] for i in range(1, len(ranges), 3)]  # (reason, act, observation)
    step_first_piece = list(range(1, len(ranges), 3))
    prompt_len = prompt_range[1] - prompt_range[0]
    lengths = [rs[-1][1] - rs[0][0] for rs in steps]
    for s, (reason_range, act_range, _) in enumerate(steps):
        generated = (reason_range[1] - reason_range[0]) + (act_range[1] - act_range[0])
        if prompt_len + generated > max_tokens:
            raise SegmentationError(
                f"episode {episode.episode_id}: step {s}: its thought and action take {generated} tokens, more than "
                f"the {max_tokens - prompt_len} left after the {prompt_len}-token prompt (context.max_tokens="
                f"{max_tokens}); raise context.max_tokens or drop the episode")

    window_rows, span_rows = [], []
    for w, chunk in enumerate(_step_chunks(lengths, prompt_len, max_tokens, history_steps)):
        room = max_tokens - prompt_len - sum(lengths[s] for s in chunk)
        earliest = max(0, chunk[0] - history_steps) if history_steps else 0
        context: list[int] = []
        head_only: dict[int, int] = {}  # a context step kept only for its first n tokens
        for s in range(chunk[0] - 1, earliest - 1, -1):
            if lengths[s] > room:
                if not context and room > 0:  # as at play (sad.agent.fit_context): the latest step's head
                    context.insert(0, s)
                    head_only[s] = room
                break
            context.insert(0, s)
            room -= lengths[s]

        ids = list(tok.input_ids[prompt_range[0]:prompt_range[1]])
        reason = [0] * len(ids)
        act = [0] * len(ids)
        spans = []
        for s in context + chunk:
            with_loss = s in chunk and episode.steps[s].imitate
            for offset, (a, b) in enumerate(steps[s]):
                piece = step_first_piece[s] + offset
                kind = tok.pieces[piece][0]
                if s in head_only:
                    b = min(b, steps[s][0][0] + head_only[s])
                    if b <= a:
                        continue
                start = len(ids)
                ids.extend(tok.input_ids[a:b])
                reason.extend([1 if with_loss and kind == "reason" else 0] * (b - a))
                act.extend([1 if with_loss and kind == "act" else 0] * (b - a))
                if with_loss and kind in GENERATED_KINDS:
                    char_start = tok.piece_starts[piece]
                    spans.append((kind, char_start, char_start + len(tok.pieces[piece][1]), start, len(ids)))
        ids, reason, act = ids[:max_tokens], reason[:max_tokens], act[:max_tokens]
        spans = [(k, cs, ce, ts, min(te, max_tokens)) for k, cs, ce, ts, te in spans if ts < max_tokens]
        if sum(reason) + sum(act) == 0:
            continue
        window_rows.append({
            "episode_id": episode.episode_id, "window": w, "success": bool(episode.success),
            "n_tokens": len(ids), "input_ids": ids, "reason_mask": reason, "act_mask": act,
        })
        for i, (kind, cs, ce, ts, te) in enumerate(spans):
            span_rows.append({
                "episode_id": episode.episode_id, "window": w, "span": i, "kind": kind,
                "char_start": cs, "char_end": ce, "tok_start": ts, "tok_end": te,
            })
    return window_rows, span_rows


def steps_frame(episodes: Iterable[Episode]) -> pd.DataFrame:
    rows = [
        {"episode_id": ep.episode_id, "step": i, "thought": s.thought, "action": s.action,
         "observation": s.observation, "valid": bool(s.valid), "imitate": bool(s.imitate), "success": bool(ep.success)}
        for ep in episodes for i, s in enumerate(ep.steps)
    ]
    columns = ["episode_id", "step", "thought", "action", "observation", "valid", "imitate", "success"]
    return pd.DataFrame(rows, columns=columns).astype({"step": "int64", "valid": bool, "imitate": bool, "success": bool})


@dataclass
class Segments:
    steps: pd.DataFrame
    spans: pd.DataFrame
    windows: pd.DataFrame


def segment_episodes(episodes: list[Episode], tokenizer, max_tokens: int, history_steps: int = 0,
                     what: str = "episodes") -> Segments:
    """Validate trajectories, cut them into spans and windows, validate those too."""
    steps = validate(steps_frame(episodes), StepSchema, f"{what} (trajectories)")
    window_rows, span_rows = [], []
    for ep in episodes:
        w, s = episode_windows(ep, tokenizer, max_tokens, history_steps)
        window_rows.extend(w)
        span_rows.extend(s)
    windows = pd.DataFrame(window_rows, columns=["episode_id", "window", "success", "n_tokens", "input_ids", "reason_mask", "act_mask"])
    spans = pd.DataFrame(span_rows, columns=["episode_id", "window", "span", "kind", "char_start", "char_end", "tok_start", "tok_end"])
    windows = windows.astype({"window": "int64", "n_tokens": "int64", "success": bool})
    spans = spans.astype({c: "int64" for c in ["window", "span", "char_start", "char_end", "tok_start", "tok_end"]})
    windows = validate(windows, WindowSchema, f"{what} (token windows)")
    spans = validate(spans, SpanSchema, f"{what} (spans)")
    check_coverage(windows, spans, what)
    return Segments(steps=steps, spans=spans, windows=windows)


def save_segments(seg: Segments, folder) -> None:
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seg.steps.to_parquet(folder / "steps.parquet", index=False)
    seg.spans.to_parquet(folder / "spans.parquet", index=False)
    seg.windows.to_parquet(folder / "windows.parquet", index=False)


def load_windows(folder) -> pd.DataFrame:
    """Read and re-validate the window table written by :func:`save_segments`."""
    from pathlib import Path

    path = Path(folder) / "windows.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the 'segment' stage first)")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: unreadable Parquet file ({exc}); rerun the 'segment' stage") from None
    for col in ("input_ids", "reason_mask", "act_mask"):
        if col not in df:
            continue  # the schema names the missing column
        df[col] = df[col].map(lambda v: [int(x) for x in v])
    return validate(df, WindowSchema, str(path))
