"""Copies across pages and sites (pairing/copies.py): candidates, verification, groups, and the
copy web end to end (every dress kind next to same-topic distinct photos and burst crops)."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from core.config import PairConfig
from core.records import phash_distance
from pairing.copies import PHashIndex, copy_groups, find_candidates, image_features, jpeg_quality, mirror_phash, verify
from webpairs.dresses import DRESSES, burst, dress


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _photos(photos_dir: str, first: int, n: int) -> list[Image.Image]:
    names = sorted(os.listdir(photos_dir))
    return [Image.open(os.path.join(photos_dir, names[i])).convert("RGB") for i in range(first, first + n)]


def test_mirror_phash_predicts_the_mirrored_images_hash(photos_dir):
    """The pHash of a mirrored photo, from the hash alone, is far closer to the real one than the
    original's hash is (so the pHash index finds mirrored copies)."""
    from filter.hashing import phash_hex

    near, far = [], []
    for img in _photos(photos_dir, 151, 20):
        h, hm = phash_hex(img), phash_hex(ImageOps.mirror(img))
        near.append(phash_distance(mirror_phash(h), hm))
        far.append(phash_distance(h, hm))
    assert max(near) <= 10 and np.median(near) <= 4, near  # approximate: the median moves a little
    assert min(far) >= 14 and np.median(far) >= 26, far
    assert mirror_phash(mirror_phash("0123456789abcdef")) == "0123456789abcdef"


def test_phash_index_finds_every_hash_within_seven_bits():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, size=300)]
    index = PHashIndex(base)
    for row, h in enumerate(base[:100]):
        q = h
        for bit in rng.choice(64, size=7, replace=False):
            q ^= 1 << int(bit)
        assert row in index.query(q)
    far = sum(len(index.query(int(x))) for x in rng.integers(0, 2**63, size=100))
    assert far < 100  # expected 100 x 4 x 17 x 300 / 65536 = 31 of 30,000: the index is no all-pairs scan


def test_candidates_are_bounded_per_image_and_never_all_pairs():
    """600 embeddings in 60 tight clusters of 10: every image gets its cluster mates as
    candidates, and never more than copy_max_candidates partners."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(60, 64))
    emb = np.repeat(centres, 10, axis=0) + rng.normal(scale=0.05, size=(600, 64))
    ids = [f"{i:04d}" for i in range(600)]
    cfg = PairConfig(copy_max_candidates=5, copy_top_k=10)
    cands = find_candidates(ids, emb, [None] * 600, cfg)
    per: dict[str, int] = {}
    for a, b, cos, _ in cands:
        assert a < b and cos >= cfg.copy_min_cosine
        per[a] = per.get(a, 0) + 1
        per[b] = per.get(b, 0) + 1
        assert int(a) // 10 == int(b) // 10  # only cluster mates
    assert len(cands) <= 600 * 5 and min(per.values()) >= 1 and len(per) == 600
    pairs = find_candidates(ids[:4], None, ["ffff0000ffff0000", "ffff0000ffff0003", mirror_phash("ffff0000ffff0000"), "0123456789abcdef"], cfg)
    assert [(a, b) for a, b, _, _ in pairs] == [("0000", "0001"), ("0000", "0002"), ("0001", "0002")]  # close and mirrored hashes


def test_jpeg_quality_estimate():
    img = Image.new("RGB", (64, 64), (120, 30, 200))
    for q in (45, 75, 90):
        assert abs(jpeg_quality(Image.open(io.BytesIO(_jpeg(img, q)))) - q) <= 2
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert jpeg_quality(Image.open(io.BytesIO(buf.getvalue()))) == 100


def test_every_dress_verifies_and_distinct_photos_do_not(photos_dir):
    """Each dress kind of 4 dog photos verifies against its original; no pair of 12 distinct dog
    photos does, nor the two burst crops of each of 3 scenes (different parts of one scene)."""
    cfg = PairConfig()
    rng = random.Random(0)
    dogs = _photos(photos_dir, 151, 12)
    feats = [image_features(_jpeg(d)) for d in dogs]
    for img, f in zip(dogs[:4], feats[:4]):
        for kind in DRESSES:
            out, q = dress(img, kind, rng)
            res = verify(image_features(_jpeg(out, q)), f, cfg)
            assert res["copy"], (kind, res)
            assert res["mirrored"] == (kind == "mirror")
    for i in range(len(dogs)):
        for j in range(i + 1, len(dogs)):
            assert not verify(feats[i], feats[j], cfg)["copy"], (i, j)
    inliers = []
    for scene in _photos(photos_dir, 7, 3):
        a, b = (image_features(_jpeg(burst(scene, part))) for part in (0, 1))
        res = verify(a, b, cfg)
        assert not res["copy"] and res["overlap_large"] < cfg.copy_min_containment, res
        inliers.append(res["inliers"])
    assert max(inliers) >= cfg.copy_min_inliers  # they do match, on a third of each: only the overlap rule tells them apart


def test_groups_keep_the_largest_then_the_least_recompressed():
    info = {"a": {"content": 100, "quality": 90}, "b": {"content": 200, "quality": 45}, "c": {"content": 200, "quality": 85}, "d": {"content": 50, "quality": 95}, "x": {"content": 10}, "y": {"content": 10}}
    assert copy_groups([("a", "b"), ("b", "c"), ("c", "d"), ("x", "y")], info) == {"a": "c", "b": "c", "d": "c", "y": "x"}
