"""Padding share of distillation batches: length-grouped as ``train_lm`` builds them, against plain shuffled ones.

    python docs/experiments/padding_share.py <run folder> [...]    # a folder whose segment stage has run

README "Batches are grouped by length" quotes its output (2026-12-07).
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sad.segment import load_windows  # noqa: E402
from sad.training import batch_plan, split_dev  # noqa: E402


def padding(batches: list[list[int]], lengths: list[int]) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


for folder in sys.argv[1:]:
    windows = load_windows(Path(folder) / "data/segments").reset_index(drop=True)
    train = split_dev(windows, 0.1, 0)[0].reset_index(drop=True)
    lengths = [int(n) for n in train["n_tokens"]]
    for batch in (4, 8):
        grouped = batch_plan(lengths, batch, 200, 0)
        order = list(range(len(lengths)))
        random.Random(0).shuffle(order)
        shuffled = [order[i:i + batch] for i in range(0, len(order), batch)]
        print(f"{folder}: {len(lengths)} windows, mean {sum(lengths) / len(lengths):.0f} tokens, max {max(lengths)}; "
              f"batch {batch}: padding {padding(grouped, lengths):.2%} length-grouped, {padding(shuffled, lengths):.2%} shuffled")
