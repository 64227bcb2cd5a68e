"""Generation metrics on known cases."""

import numpy as np
import pytest

from generate import metrics as M


def _cloud(n, d, center, seed, scale=1.0):
    return np.random.default_rng(seed).normal(center, scale, size=(n, d))


def test_identical_sets():
    x = _cloud(300, 8, 0.0, 0)
    assert M.fid(x, x) == pytest.approx(0.0, abs=1e-6)
    assert M.precision_recall(x, x) == (1.0, 1.0)


def test_fid_of_a_shifted_gaussian_is_the_squared_shift():
    a, b = _cloud(4000, 4, 0.0, 1), _cloud(4000, 4, 0.0, 2) + np.array([3.0, 0, 0, 0])
    assert M.fid(a, b) == pytest.approx(9.0, rel=0.05)
    assert M.fid(a, _cloud(4000, 4, 0.0, 3)) < 0.05  # two samples of one distribution


def test_disjoint_clusters():
    real, fake = _cloud(200, 8, 0.0, 4), _cloud(200, 8, 50.0, 5)
    p, r = M.precision_recall(real, fake)
    assert p == pytest.approx(0.0, abs=0.01) and r == pytest.approx(0.0, abs=0.01)
    assert M.fid(real, fake) > 1000


def test_mode_collapse_keeps_precision_and_loses_recall():
    real = _cloud(400, 4, 0.0, 6)
    collapsed = _cloud(400, 4, 0.0, 7, scale=0.05)  # all samples near one point of the real manifold
    p, r = M.precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.2


def test_consistency_and_diversity():
    x = _cloud(10, 16, 0.0, 8)
    assert M.consistency(x, x) == pytest.approx(1.0)
    assert M.consistency(x, -x) == pytest.approx(-1.0)
    same = np.repeat(x[:1], 5, axis=0)
    assert M.mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-12)
    assert M.diversity([same], x) == pytest.approx(0.0, abs=1e-12)
    assert M.diversity([x], x) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.fid(x[:1], x)


def test_class_match_finds_the_class_and_ignores_a_shared_offset():
    rng = np.random.default_rng(3)
    shared = 20 * rng.normal(size=32)  # what every image has in common: cosines are high everywhere
    centres = rng.normal(size=(4, 32))
    real = [shared + c + 0.3 * rng.normal(size=(10, 32)) for c in centres]
    own = np.concatenate([shared + c + 0.3 * rng.normal(size=(5, 32)) for c in centres])
    labels = np.repeat(np.arange(4), 5)
    assert M.consistency(own, np.roll(own, 5, axis=0)) > 0.9  # consistency cannot tell the classes apart
    center = np.concatenate(real).mean(0)  # ... centred on the reals' mean it can:
    same_class = np.concatenate([shared + c + 0.3 * rng.normal(size=(5, 32)) for c in centres])
    assert M.consistency(own, same_class, center) > 0.7
    assert abs(M.consistency(own, np.roll(own, 5, axis=0), center)) < 0.5
    assert M.consistency(own, own, center) == pytest.approx(1.0)
    gain = M.paired_gain(M.pair_cosines(own, same_class, center), M.pair_cosines(own, np.roll(own, 5, axis=0), center))
    assert gain["higher"] == 20 and gain["mean_diff"] > 0.5 and gain["p_t"] < 1e-6
    assert M.paired_gain(np.ones(5), np.ones(5))["p_wilcoxon"] == 1.0  # no difference at all
    assert M.class_match(own, labels, real) == 1.0
    assert M.class_match(own, (labels + 1) % 4, real) == 0.0  # every sample carries another class
    generic = shared + 0.3 * rng.normal(size=(400, 32))  # samples with no class at all: about chance
    assert 0.1 < M.class_match(generic, np.arange(400) % 4, real) < 0.4
    assert M.class_match(np.concatenate(real), np.repeat(np.arange(4), 10), real, leave_one_out=True) == 1.0


def test_mcnemar_counts_discordant_samples():
    a = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1], bool)
    b = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], bool)
    r = M.mcnemar(a, b)
    assert (r["only_a"], r["only_b"], r["n"]) == (7, 1, 10)
    assert r["p"] == pytest.approx(0.0703125)  # 2 * P(X <= 1), X ~ Binomial(8, 0.5)
    assert M.mcnemar(a, a)["p"] == 1.0


def test_class_matches_is_per_row():
    real = [_cloud(30, 4, 0.0, 1) + np.array([5.0, 0, 0, 0]), _cloud(30, 4, 0.0, 2) + np.array([0, 5.0, 0, 0])]
    rows = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [5.0, 0, 0, 0]])
    hits = M.class_matches(rows, np.array([0, 1, 1]), real)
    assert hits.tolist() == [True, True, False]
    assert M.class_match(rows, np.array([0, 1, 1]), real) == pytest.approx(2 / 3)
