"""Curriculum: order trajectories easy → hard and pace how fast the hard ones come in.

Difficulty of a trajectory τ (the paper's form, with the weights as parameters)::

    C(τ) = α · len_reason(τ) + β · len_act(τ) + γ · H̄_T(τ)

with lengths in tokens that carry the loss, and H̄_T the teacher's mean next-token entropy
(nats) over those tokens. Every window of an episode gets its episode's difficulty.

Pacing (competence-based, Platanios et al. 2019): at training progress ``f`` ∈ [0, 1] the
sampler draws batches from the easiest ``c(f)`` share of windows, with ``c(0) = start`` and
``c(f) = 1`` from ``f = ramp`` on; ``linear`` and ``sqrt`` grow continuously, ``step`` adds
the data in four equal stages. After the ramp, batches come from all data.

Within the available share, batches deal the windows like a shuffled deck, not a uniform sample
with replacement as in the paper: that one left 7% of the windows never drawn in a 3-epoch run
(n = 1,000, batch 4, start 0.3, ramp 0.5, linear). Each pass over the share draws every window in
it once, in a seeded random order; a window joining the share takes a random place in the whole
current pass (a place already dealt means the next pass), so the new windows mix in as with the
paper's sampler (mean difficulty rank per tenth of training 202, 249, 342, 398, 504, then ~490,
against its 189, 246, 317, 395, 471, ~500) and easy windows are still drawn more often (4.0
against 1.7 draws per window at the two ends of that run, the paper's 4.2 against 1.75). There,
every window is drawn; ``step`` pacing, whose last quarter of the data arrives at once, can still
leave a few (2 of 1,000 against the paper's sampler's 73).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from typing import Literal

import pandas as pd

Pacing = Literal["linear", "sqrt", "step"]


def trajectory_difficulty(windows: pd.DataFrame, entropy: pd.Series | None, alpha: float, beta: float,
                          gamma: float) -> pd.Series:
    """C(τ) per episode_id.

    windows: the window table (episode_id, reason_mask, act_mask); entropy: per window row
    (same index), the teacher's summed entropy over the window's generated tokens (or None
    when γ = 0).
    """
    reason = windows["reason_mask"].map(sum)
    act = windows["act_mask"].map(sum)
    frame = pd.DataFrame({"episode_id": windows["episode_id"], "reason": reason, "act": act})
    if gamma:
        if entropy is None:
            raise ValueError("curriculum gamma > 0 needs the teacher's token entropies (the teacher_logits stage)")
        frame["entropy_sum"] = entropy.values
    else:
        frame["entropy_sum"] = 0.0
    per_episode = frame.groupby("episode_id", sort=False).sum()
    generated = (per_episode["reason"] + per_episode["act"]).clip(lower=1)
    mean_entropy = per_episode["entropy_sum"] / generated
    return alpha * per_episode["reason"] + beta * per_episode["act"] + gamma * mean_entropy


def competence(progress: float, pacing: Pacing, start: float, ramp: float) -> float:
    """Share of the (sorted) data available at training progress ``progress`` ∈ [0, 1]."""
    f = min(1.0, max(0.0, progress) / ramp) if ramp > 0 else 1.0
    if pacing == "linear":
        return start + (1.0 - start) * f
    if pacing == "sqrt":
        return math.sqrt(start * start + (1.0 - start * start) * f)
    if pacing == "step":
        return start + (1.0 - start) * math.floor(f * 4) / 4
    raise ValueError(f"unknown pacing {pacing!r}; use linear, sqrt or step")


def easy_to_hard(windows: pd.DataFrame, difficulty: pd.Series) -> list[int]:
    """Window row positions sorted by their episode's difficulty (ties: table order)."""
    keyed = windows["episode_id"].map(difficulty).tolist()
    return sorted(range(len(windows)), key=lambda i: (keyed[i], i))


def curriculum_batches(order: list[int], total_batches: int, batch_size: int, seed: int, pacing: Pacing,
                       start: float, ramp: float) -> list[list[int]]:
    """``total_batches`` batches of window positions from the easiest ``c(progress)`` share of ``order``
    (at least one batch's worth), dealt pass after pass in a seeded random order (each window once per
    pass, distinct within a batch; a window joining the share takes a random place in the whole current
    pass, one already dealt meaning the next pass). An empty ``order`` gives empty batches."""
    rng = random.Random(seed)
    n = len(order)
    deck: list[tuple[int, float, int]] = []  # (pass over the share, random place in it, position in ``order``)
    left: Counter[int] = Counter()  # windows in the deck per pass
    available, current, dealt = 0, 0, 0  # ``dealt``: windows drawn so far in the current pass
    out: list[list[int]] = []
    for b in range(total_batches):
        progress = b / max(1, total_batches - 1)
        pool = min(n, max(min(n, batch_size), math.ceil(competence(progress, pacing, start, ramp) * n)))
        for i in range(available, pool):
            # a random place in the whole current pass: one already dealt means the next pass
            dealt_share = dealt / (dealt + left[current]) if dealt + left[current] else 0.0
            joins = current + 1 if rng.random() < dealt_share else current
            heapq.heappush(deck, (joins, rng.random(), i))
            left[joins] += 1
        available = max(available, pool)
        drawn = []
        for _ in range(min(batch_size, len(deck))):  # distinct windows: they go back after the batch
            passed, _, i = heapq.heappop(deck)
            left[passed] -= 1
            if passed > current:
                current, dealt = passed, 0
            dealt += 1
            drawn.append((passed, i))
        for passed, i in drawn:
            heapq.heappush(deck, (passed + 1, rng.random(), i))
            left[passed + 1] += 1
        out.append([order[i] for _, i in drawn])
    return out
