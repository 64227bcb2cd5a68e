"""Generation metrics on encoder features (numpy in, floats out).

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to two feature sets.
- Precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around its
  points with radius = distance to the k-th nearest neighbour in the same set; precision is the share
  of generated points inside the real manifold, recall the share of real points inside the generated one.
- Consistency: mean cosine between each condition and the samples made from it.
- Diversity: mean pairwise cosine distance between samples of one condition, divided by the same
  quantity over real images of the class (1.0 = as varied as real photos of the class).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
from scipy import linalg


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b) of two (N,D) feature sets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 feature vectors per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # fewer samples than dimensions: singular covariances are expected
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # regularise as the reference implementation does
            eps = np.eye(len(cov_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)))


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.maximum(d, 0.0))


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _distances(x, x)
    k = min(k, len(x) - 1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _coverage(points: np.ndarray, manifold: np.ndarray, k: int) -> float:
    """Share of `points` inside the k-NN manifold of `manifold`."""
    inside = _distances(points, manifold) <= _radii(manifold, k)[None, :] + 1e-9
    return float(inside.any(axis=1).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real` with k-NN manifolds."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("precision/recall need at least 2 feature vectors per set")
    return _coverage(fake, real, k), _coverage(real, fake, k)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def consistency(conds: np.ndarray, samples: np.ndarray, center: Optional[np.ndarray] = None) -> float:
    """Mean cosine between row i of `conds` and row i of `samples` (the sample made from it).

    With `center` (the mean feature of the real images), it is subtracted from both first: the
    cosine then compares directions away from what every image shares, which at low resolution
    otherwise dominates (every pair of 32 px images has a cosine near 0.37 on pooled CNN features)."""
    return float(pair_cosines(conds, samples, center).mean())


def pair_cosines(conds: np.ndarray, samples: np.ndarray, center: Optional[np.ndarray] = None) -> np.ndarray:
    """Cosine of each (condition, sample) row pair, optionally centred (see `consistency`)."""
    if center is not None:
        conds, samples = np.asarray(conds, np.float64) - center, np.asarray(samples, np.float64) - center
    return (_unit(conds) * _unit(samples)).sum(-1)


def paired_gain(a: np.ndarray, b: np.ndarray) -> dict:
    """How per-sample scores `a` compare with `b` on the same samples (same conditions and noise):
    mean difference, rows where a > b, paired t-test and Wilcoxon signed-rank p-values."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(a, b) if np.any(d != 0) else None
    return {"mean_diff": float(d.mean()), "higher": int((d > 0).sum()), "n": int(len(d)), "t": float(t.statistic), "p_t": float(t.pvalue), "p_wilcoxon": float(w.pvalue) if w is not None else 1.0}


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean cosine distance over distinct pairs of rows (0 when fewer than 2)."""
    if len(x) < 2:
        return 0.0
    u = _unit(x)
    sims = u @ u.T
    n = len(u)
    return float((1.0 - sims)[~np.eye(n, dtype=bool)].mean())


def diversity(samples_by_condition: list[np.ndarray], real: np.ndarray) -> float:
    """Mean pairwise distance within each condition's samples, relative to the real images."""
    base = mean_pairwise_distance(real)
    within = [mean_pairwise_distance(s) for s in samples_by_condition if len(s) >= 2]
    if base <= 0 or not within:
        return float("nan")
    return float(np.mean(within) / base)


def class_matches(features: np.ndarray, labels: np.ndarray, real_by_class: list[np.ndarray], leave_one_out: bool = False) -> np.ndarray:
    """Per row: is its nearest class centroid (mean unit feature of each class's real images, by
    cosine) its own class `labels[i]`? A bool array; its mean is `class_match`.

    Unlike `consistency`, this cancels what all images share (at low resolution every pair of
    images has a high cosine), so it shows whether a sample carries its condition's class. With
    `leave_one_out`, `features` are the real images themselves, in `real_by_class` order, and each
    is left out of its own class's centroid."""
    feats = _unit(features)
    labels = np.asarray(labels)
    sums = np.stack([_unit(r).sum(0) for r in real_by_class])
    counts = np.array([len(r) for r in real_by_class], dtype=np.float64)
    scores = feats @ _unit(sums / counts[:, None]).T  # (rows, classes): cosine to each centroid
    if leave_one_out:  # each row's own-class centroid without the row itself
        own = (sums[labels] - feats) / np.maximum(counts[labels] - 1, 1)[:, None]
        scores[np.arange(len(feats)), labels] = (_unit(own) * feats).sum(-1)
    return scores.argmax(1) == labels


def class_match(features: np.ndarray, labels: np.ndarray, real_by_class: list[np.ndarray], leave_one_out: bool = False) -> float:
    """The share of rows that `class_matches` (see there); chance is 1 / number of classes."""
    hits = class_matches(features, labels, real_by_class, leave_one_out)
    return float(hits.mean()) if len(hits) else 0.0


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired yes/no outcomes on the same samples: rows only `a` got right, only `b` got right, and
    the exact two-sided McNemar p-value (binomial test on the discordant rows)."""
    from scipy import stats

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    p = float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    return {"only_a": only_a, "only_b": only_b, "n": int(len(a)), "p": p}
