"""Uncertainty: bootstrap confidence intervals over episodes and training seeds, paired comparisons.

Results are a matrix ``values[seed][task]`` (e.g. 1.0 if the student trained with that seed
solved that task). The bootstrap is hierarchical: resample seeds with replacement, then tasks
with replacement (the same task draw for every seed, since seeds play the same tasks), and
average. Tasks from several environments (``strata``: one label per task) are resampled within
their environment, so each keeps its share of the tasks, as in the evaluation's design (20 per env).
Percentile intervals, a fixed generator seed: the same inputs give the same interval.

A percentile bootstrap collapses where every resample is alike: 0 of 20 tasks won gives [0, 0], as if
the agent could never win. For success (0/1 values) the interval is therefore widened, where it is
narrower, to the Wilson score interval of the observed rate over the tasks (seeds do not add tasks):
0/20 -> [0, 16.1%], 20/20 -> [83.9%, 100%]; over several strata, the observed rate +- z standard errors,
each stratum's read off its Wilson interval and combined as independent estimates weighted by their tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n_seeds: int
    n_tasks: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"41.7 [33.3, 50.0]"`` (percent by default)."""
        return f"{self.mean * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"


def _matrix(values: list[list[float]]) -> np.ndarray:
    m = np.asarray(values, dtype=float)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"expected a non-empty [seeds][tasks] matrix, got shape {m.shape}")
    return m


def _task_draws(n: int, n_boot: int, rng: np.random.Generator, strata: list[str] | None) -> np.ndarray:
    """[n_boot, N] task indices drawn with replacement, within each stratum when ``strata`` labels the tasks."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    if len(strata) != n:
        raise ValueError(f"strata label {len(strata)} tasks, the matrix has {n}")
    labels = np.asarray(strata)
    draws = np.empty((n_boot, n), dtype=np.int64)
    for label in sorted(set(strata)):
        where = np.flatnonzero(labels == label)
        draws[:, where] = where[rng.integers(0, len(where), size=(n_boot, len(where)))]
    return draws


def _resampled_means(m: np.ndarray, n_boot: int, rng: np.random.Generator, strata: list[str] | None = None) -> np.ndarray:
    """Means of ``n_boot`` hierarchical resamples of m [S, N] -> [n_boot]."""
    s, n = m.shape
    seeds = rng.integers(0, s, size=(n_boot, s))
    tasks = _task_draws(n, n_boot, rng, strata)
    # m[seeds][:, :, tasks] per resample: gather rows then columns
    rows = m[seeds]  # [n_boot, S, N]
    picked = np.take_along_axis(rows, tasks[:, None, :].repeat(s, axis=1), axis=2)
    return picked.mean(axis=(1, 2))


def wilson_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a success ``rate`` observed over ``n`` trials."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(max(rate * (1 - rate), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _stratified_wilson(m: np.ndarray, confidence: float, strata: list[str] | None) -> tuple[float, float]:
    """A score interval of the mean of m [S, N]: the observed mean +- z standard errors, each stratum's standard
    error read off its Wilson interval over its tasks (which stays positive at 0% and 100%), combined as
    independent estimates weighted by their share of the tasks; with one stratum, or when every value is the
    same, the Wilson interval itself."""
    from statistics import NormalDist

    labels = np.asarray(strata if strata is not None else ["all"] * m.shape[1])
    groups = sorted(set(labels.tolist()))
    if len(groups) == 1 or np.all(m == m.flat[0]):
        return wilson_interval(float(m.mean()), m.shape[1], confidence)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    variance = 0.0
    for label in groups:
        columns = m[:, labels == label]
        low, high = wilson_interval(float(columns.mean()), columns.shape[1], confidence)
        variance += (columns.shape[1] / m.shape[1] * (high - low) / (2 * z)) ** 2
    half, mean = z * float(np.sqrt(variance)), float(m.mean())
    return max(0.0, mean - half), min(1.0, mean + half)


def bootstrap_ci(values: list[list[float]], n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                 strata: list[str] | None = None) -> Interval:
    """Mean of ``values[seed][task]`` with a percentile bootstrap interval over seeds and tasks (tasks
    resampled within their ``strata`` label when given); for 0/1 values at least the (stratified) Wilson
    interval over the tasks, so that 0 or all tasks won is not reported as certain."""
    m = _matrix(values)
    means = _resampled_means(m, n_boot, np.random.default_rng(seed), strata)
    tail = (1 - confidence) / 2
    low, high = float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
    if np.isin(m, (0.0, 1.0)).all():
        w_low, w_high = _stratified_wilson(m, confidence, strata)
        low, high = min(low, w_low), max(high, w_high)
    return Interval(float(m.mean()), low, high, *m.shape)


@dataclass(frozen=True)
class PairedComparison:
    difference: Interval  # mean of a - b with its interval
    p_not_better: float  # bootstrap share of resamples where a - b <= 0 (one-sided)
    wins: int  # (seed, task) pairs where a > b
    losses: int  # where a < b

    def as_dict(self) -> dict:
        return {"difference": self.difference.as_dict(), "p_not_better": self.p_not_better,
                "wins": self.wins, "losses": self.losses}


def paired_comparison(a: list[list[float]], b: list[list[float]], n_boot: int = 2000, confidence: float = 0.95,
                      seed: int = 0, strata: list[str] | None = None) -> PairedComparison:
    """A against B on the same tasks and seed indices: the per-pair difference, bootstrapped (tasks within
    their ``strata`` label when given)."""
    ma, mb = _matrix(a), _matrix(b)
    if ma.shape != mb.shape:
        raise ValueError(f"paired comparison needs equal [seeds][tasks] shapes, got {ma.shape} and {mb.shape}")
    diff = ma - mb
    means = _resampled_means(diff, n_boot, np.random.default_rng(seed), strata)
    tail = (1 - confidence) / 2
    interval = Interval(float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), *diff.shape)
    return PairedComparison(interval, float((means <= 0).mean()), int((diff > 0).sum()), int((diff < 0).sum()))
