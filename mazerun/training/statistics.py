"""Scores over seeds, aggregated as rliable publishes it (Agarwal et al., 2021, "Deep Reinforcement Learning at
the Edge of the Statistical Precipice").

rliable 1.2 itself does not import next to mazerun's pins: it imports arch, whose 7.x fails on
pandas 3. Its three methods are short, so they are written here on numpy alone:

- the interquartile mean (IQM), ``scipy.stats.trim_mean(scores, 0.25, axis=None)`` as in
  ``rliable.metrics.aggregate_iqm``: robust to one outlying seed, yet less noisy than the median;
- 95% intervals of a stratified bootstrap (``rliable.library.get_interval_estimates``): each
  task's runs are drawn with replacement from that task's own runs, and the interval is the
  2.5th and 97.5th percentile of the statistic over the resamples (the percentile method);
- performance profiles (``create_performance_profile``): the share of runs whose score exceeds
  each threshold tau, with bootstrap bands.

The resamples come from a seeded generator, so a report is the same each time it is made.
rliable 1.2 draws them from numpy's global stream (``np.random.choice``; its ``random_state`` does
not reach them): up to 5 runs both give the same percentiles (few distinct resamples), and with
more runs they differ by the bootstrap's Monte-Carlo error, as two calls of rliable do
(``bench/report.py`` holds the report against it).

Scores are arrays of shape (runs, tasks), as rliable takes them. A report groups runs by
config, whose env is one task, so there a stratum is the one column of a group's seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

INTERVAL_REPS = 50_000
"""Bootstrap resamples of a score interval: rliable's default for ``get_interval_estimates``."""
PROFILE_REPS = 2_000
"""Bootstrap resamples of each point of a profile or curve: rliable's default for ``create_performance_profile``."""
CONFIDENCE = 0.95

Aggregate = Callable[[np.ndarray], np.ndarray]
"""Maps samples of shape (k, n) to k values, one per row."""


def interquartile_means(samples: np.ndarray) -> np.ndarray:
    """The IQM of each row: ``int(0.25 * n)`` values cut at each end, the rest averaged (below 4 values, the mean)."""
    ordered = np.sort(samples, axis=1)
    cut = int(0.25 * ordered.shape[1])
    return ordered[:, cut:ordered.shape[1] - cut].mean(axis=1)


def means(samples: np.ndarray) -> np.ndarray:
    """The mean of each row."""
    return samples.mean(axis=1)


AGGREGATES: dict[str, Aggregate] = {"IQM": interquartile_means, "mean": means}


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval."""

    value: float
    low: float
    high: float


def score_matrix(scores: np.ndarray) -> np.ndarray:
    """``scores`` as (runs, tasks): a 1-D array is the runs of one task."""
    matrix = np.asarray(scores, dtype=np.float64)
    return matrix[:, None] if matrix.ndim == 1 else matrix


def stratified_resamples(scores: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``reps`` resamples of shape (runs, tasks), each task's runs drawn with replacement from its own column."""
    matrix = score_matrix(scores)
    runs, tasks = matrix.shape
    drawn = rng.integers(0, runs, size=(reps, runs, tasks))
    return matrix[drawn, np.arange(tasks)]


def interval_estimate(scores: np.ndarray, aggregate: Aggregate, *, reps: int = INTERVAL_REPS,
                      confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """``aggregate`` of all scores, with the percentile interval of a seeded stratified bootstrap."""
    matrix = score_matrix(scores)
    value = float(aggregate(matrix.reshape(1, -1))[0])
    resampled = stratified_resamples(matrix, reps, np.random.default_rng(seed)).reshape(reps, -1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(aggregate(resampled), [tail, 100 - tail])
    return Estimate(value, float(low), float(high))


def performance_profile(scores: np.ndarray, thresholds: np.ndarray, *, reps: int = PROFILE_REPS,
                        confidence: float = CONFIDENCE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The share of runs scoring above each threshold (rliable's score distribution), and its bootstrap band.

    Returns the profile and the band's lower and upper edges, each one value per threshold.
    """
    matrix = score_matrix(scores)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    profile = (matrix.reshape(-1, 1) > thresholds).mean(axis=0)
    resampled = stratified_resamples(matrix, reps, np.random.default_rng(seed)).reshape(reps, -1)
    shares = (resampled[:, :, None] > thresholds).mean(axis=1)  # (reps, thresholds)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(shares, [tail, 100 - tail], axis=0)
    return profile, low, high
