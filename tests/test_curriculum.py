import pandas as pd
import pytest

from sad.curriculum import competence, curriculum_batches, easy_to_hard, trajectory_difficulty


def _windows():
    return pd.DataFrame([
        {"episode_id": "hard", "reason_mask": [0, 1, 1, 1, 1], "act_mask": [0, 0, 0, 0, 0]},
        {"episode_id": "hard", "reason_mask": [0, 0, 0, 0, 0], "act_mask": [0, 1, 1, 0, 0]},
        {"episode_id": "easy", "reason_mask": [0, 1, 0, 0, 0], "act_mask": [0, 0, 1, 0, 0]},
        {"episode_id": "mid", "reason_mask": [0, 1, 1, 0, 0], "act_mask": [0, 0, 0, 1, 0]},
    ])


def test_difficulty_is_the_weighted_sum_by_hand():
    w = _windows()
    entropy = pd.Series([4.0, 2.0, 0.5, 3.0])  # summed over each window's generated tokens
    c = trajectory_difficulty(w, entropy, alpha=1.0, beta=2.0, gamma=10.0)
    # hard: reason 4, act 2, mean entropy (4+2)/6 = 1 -> 4 + 4 + 10
    assert c["hard"] == pytest.approx(4 + 2 * 2 + 10 * 1.0)
    # easy: reason 1, act 1, mean entropy 0.5/2 -> 1 + 2 + 2.5
    assert c["easy"] == pytest.approx(1 + 2 + 2.5)
    assert c["mid"] == pytest.approx(2 + 2 + 10 * 1.0)
    assert easy_to_hard(w, c) == [2, 3, 0, 1]


def test_gamma_needs_entropies():
    with pytest.raises(ValueError, match="teacher_logits"):
        trajectory_difficulty(_windows(), None, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("pacing", ["linear", "sqrt", "step"])
def test_competence_starts_at_start_and_reaches_all_data_at_the_ramp(pacing):
    assert competence(0.0, pacing, 0.3, 0.5) == pytest.approx(0.3)
    assert competence(0.5, pacing, 0.3, 0.5) == pytest.approx(1.0)
    assert competence(0.9, pacing, 0.3, 0.5) == pytest.approx(1.0)
    values = [competence(f / 10, pacing, 0.3, 0.5) for f in range(11)]
    assert values == sorted(values)


def test_early_batches_come_from_the_easy_end():
    order = list(range(100))  # already easy -> hard
    batches = curriculum_batches(order, total_batches=50, batch_size=8, seed=0, pacing="linear", start=0.2, ramp=0.5)
    assert all(len(b) == len(set(b)) == 8 for b in batches)
    assert max(batches[0]) < 20  # the first batch only sees the easiest 20%
    assert max(max(b) for b in batches[-10:]) >= 80  # after the ramp, hard windows appear
    assert batches == curriculum_batches(order, 50, 8, 0, "linear", 0.2, 0.5)  # deterministic


def test_curriculum_batches_deal_every_window_and_keep_the_easy_ones_more_often():
    """Three epochs' worth of draws: no window is left out (a uniform sample with replacement, the paper's,
    skipped 7% of them), easy windows still come more often than hard ones, no window twice in a batch; windows
    joining the share mix in, not batches of new windows only (a step adds a quarter of the data at once)."""
    n, batch = 1000, 4
    batches = curriculum_batches(list(range(n)), 3 * n // batch, batch, 0, "linear", 0.3, 0.5)
    drawn = [0] * n
    for b in batches:
        assert len(set(b)) == len(b) == batch
        for i in b:
            drawn[i] += 1
    assert min(drawn) >= 1
    assert sum(drawn[:100]) > sum(drawn[-100:]) * 1.5  # the easiest tenth is available for more passes
    other_seed = curriculum_batches(list(range(n)), 3 * n // batch, batch, 1, "linear", 0.3, 0.5)
    assert other_seed != batches and sorted(map(sorted, other_seed)) != sorted(map(sorted, batches))
    stepped = curriculum_batches(list(range(n)), 3 * n // batch, batch, 0, "step", 0.3, 0.5)
    first_after_step = next(k for k, b in enumerate(stepped) if max(b) >= 475)  # the share grows from 475 to 825
    following = [i for b in stepped[first_after_step:first_after_step + 20] for i in b]
    assert 0.1 < sum(i >= 475 for i in following) / len(following) < 0.6  # mixed in, as 350/825 = 42% would be
    assert curriculum_batches([], 3, batch, 0, "linear", 0.3, 0.5) == [[], [], []]
