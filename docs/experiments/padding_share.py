"""Padding share of distillation batches as ``train_lm`` builds them: length-grouped (methods without the
curriculum), the curriculum's (SAD and the methods that keep it), and plain shuffled ones for reference.

    python docs/experiments/padding_share.py <run folder> [...]    # a folder whose teacher_logits stage has run

Reads the folder's params.yaml (distill.train, distill.curriculum). README "Batches and their padding" quotes its output.
"""
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd  # noqa: E402

from sad.config import load_params  # noqa: E402
from sad.curriculum import easy_to_hard, trajectory_difficulty  # noqa: E402
from sad.segment import load_windows  # noqa: E402
from sad.teacher_cache import load_cache  # noqa: E402
from sad.training import batch_plan, split_dev  # noqa: E402


def padding(batches: list[list[int]], lengths: list[int]) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


for folder in map(Path, sys.argv[1:]):
    p = load_params(folder / "params.yaml")
    t, cur = p.distill.train, p.distill.curriculum
    windows = load_windows(folder / "data/segments").reset_index(drop=True)
    windows["cache_row"] = range(len(windows))
    train = split_dev(windows, t.dev_fraction, t.seed)[0].reset_index(drop=True)
    lengths = [int(n) for n in train["n_tokens"]]
    steps = math.ceil(t.epochs * len(lengths) / t.batch_size)
    entropy = pd.Series(load_cache(folder / "data/teacher_logits").entropy_sum.numpy()[train["cache_row"].to_numpy()],
                        index=train.index)
    order = easy_to_hard(train, trajectory_difficulty(train, entropy, cur.alpha, cur.beta, cur.gamma))
    shuffled = list(range(len(lengths)))
    random.Random(t.seed).shuffle(shuffled)
    print(f"{folder}: {len(lengths)} windows, mean {sum(lengths) / len(lengths):.0f} tokens, max {max(lengths)}; "
          f"{steps} batches of {t.batch_size}: padding "
          f"{padding(batch_plan(lengths, t.batch_size, steps, t.seed), lengths):.2%} length-grouped, "
          f"{padding(batch_plan(lengths, t.batch_size, steps, t.seed, order, cur), lengths):.2%} curriculum, "
          f"{padding([shuffled[i:i + t.batch_size] for i in range(0, len(shuffled), t.batch_size)], lengths):.2%} shuffled")
