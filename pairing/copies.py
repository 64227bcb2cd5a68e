"""Copies across pages and sites: the same photo in another dress (cropped, mirrored, colour-graded
and recompressed, watermarked and framed, letterboxed, resized) is found, verified and kept once.

Three steps, each bounded:
1. candidates (`find_candidates`): an approximate nearest-neighbour search over filter's stored
   embeddings (faiss HNSW, inner product: the top `copy_top_k` per image with a cosine of at least
   `copy_min_cosine`), plus a mirror-aware pHash multi-index (four 16-bit chunks, each probed as is
   and, up to 131,072 images, with one bit flipped: every pair within 7 bits shares a probe (3
   above that, where the embeddings carry the search); those within
   `copy_phash_distance` are kept). Each image proposes its `copy_max_candidates` closest and takes
   part in at most twice that many pairs: never all pairs.
2. verification (`image_features`, `verify`): OpenCV SIFT on a downscaled, border-trimmed
   greyscale image (at most `copy_max_keypoints` keypoints), ratio-test matches, a similarity
   transform fitted with RANSAC (`cv2.estimateAffinePartial2D`), tried as is and mirrored (the
   mirror's features derived from the image's own: `mirror_features`). A pair
   is a copy when enough inliers agree, the transform is a plausible re-dress (scale, little
   rotation) and the shared region covers most of one image and a good share of the other, with
   the inliers spread over it (a shared watermark or a partial overlap of two burst crops is not
   a copy). Only the candidate images' bytes are read (through filter's row-group pointers), each
   one's features computed once and kept on disk; pairs are verified in blocks that read their
   features back, so a worker's memory does not grow with the images (`FindCopies`).
3. groups (`copy_groups`; in the pipeline `group_members`, the same on columns): the connected
   components of the verified pairs; each group keeps its member with
   the largest content (pixels inside trimmed borders; within 5 % counts as equal), then the least
   recompressed (JPEG quality estimated from the quantisation tables, then bytes per pixel); the
   others are copies of it.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np

COPY_DUPLICATE = "copy_duplicate"
NEAR_DUPLICATE = "near_duplicate"  # pairing/select.py's reason: a second dress on the same page
COPIES = "copies"  # tagged outputs of on_pages_with_copies
STAND_INS = "stand_ins"

# the standard JPEG luminance table (ITU T.81 K.1): quality 50 in libjpeg's scaling
_STD_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# 1. candidates
# ---------------------------------------------------------------------------------------------

def mirror_phash(phash: str) -> str:
    """The pHash of the mirrored image, from the hash alone: mirroring multiplies the DCT
    coefficient of horizontal frequency u by (-1)^u, so (with the median near zero) the bits of odd
    columns flip. imagehash lays the 8x8 low-frequency block out row by row, so column = bit % 8."""
    bits = int(phash, 16)
    n = len(phash) * 4
    side = int(math.isqrt(n))
    mask = 0
    for i in range(n):
        if (i % side) % 2 == 1:
            mask |= 1 << (n - 1 - i)
    return f"{bits ^ mask:0{len(phash)}x}"


def _chunks(h: int, n_chunks: int = 4, bits: int = 16) -> list[int]:
    return [(h >> (bits * c)) & ((1 << bits) - 1) for c in range(n_chunks)]


class PHashIndex:
    """Multi-index hashing over 64-bit pHashes: four 16-bit chunks, each a dict chunk -> rows.
    A query probes every chunk as is and with each single bit flipped, so every stored hash within
    2 * 4 - 1 = 7 bits is found (pigeonhole: one chunk differs in at most one bit); farther ones are
    found when a chunk is that close. Buckets above `max_bucket` (flat images share hashes) are
    skipped: they say nothing about copies."""

    def __init__(self, hashes: list[int], max_bucket: int = 256):
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(4)]
        for row, h in enumerate(hashes):
            for c, v in enumerate(_chunks(h)):
                self.tables[c].setdefault(v, []).append(row)
        self.max_bucket = max_bucket

    def query(self, h: int) -> set[int]:
        out: set[int] = set()
        for c, v in enumerate(_chunks(h)):
            table = self.tables[c]
            for probe in (v, *(v ^ (1 << b) for b in range(16))):
                rows = table.get(probe)
                if rows and len(rows) <= self.max_bucket:
                    out.update(rows)
        return out


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (numpy's bitwise_count: no 64-byte-per-value unpacking)."""
    return np.bitwise_count(np.asarray(x, dtype=np.uint64)).astype(np.int64)


def ann_neighbours(emb: np.ndarray, top_k: int, min_cosine: float, exact_below: int = 4096):
    """(rows i, rows j, cosine) of each row's top `top_k` neighbours with cosine >= min_cosine
    (i != j), by faiss: exact inner product for small sets, HNSW (M=16) above `exact_below`."""
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = x.shape
    faiss.normalize_L2(x)
    k = min(top_k + 1, n)
    if n <= exact_below:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = max(32, 2 * k)
    # one OpenMP thread: a worker is one core (Beam runs a worker per core), and faiss's threads
    # spin while they wait: at 2 x 10^4 images two threads cost 1.7x the CPU of one for the same
    # index (and a single-threaded HNSW build is deterministic: the same candidates every run)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(x)
        sims, idx = index.search(x, k)
    finally:
        faiss.omp_set_num_threads(threads)
    del index  # its vectors and graph (~30 MB at 77,327 images), before the results are sorted out
    rows = np.repeat(np.arange(n, dtype=np.int32), k)
    sims, idx = sims.reshape(-1), idx.reshape(-1)
    keep = (idx >= 0) & (idx != rows) & (sims >= min_cosine)
    return rows[keep], idx[keep].astype(np.int32), sims[keep]


PHASH_BATCH_HITS = 1 << 18  # raw pHash-index hits held at once (~100 bytes each at the peak of a batch: ~26 MB)


def phash_neighbours(hashes: np.ndarray, max_distance: int, max_bucket: int = 256, batch: int = 20_000, flip_below: int = 1 << 17, max_hits: int = PHASH_BATCH_HITS):
    """(rows i, rows j, distance) of pHash pairs within `max_distance` bits, mirror-aware (each
    hash is also looked up mirrored), by multi-index hashing in numpy: four 16-bit chunks, each
    probed as is and, below `flip_below` images, with one bit flipped (every pair within 7 bits
    shares a probe; above it, within 3 bits: a chunk then holds n / 65536 random rows, and 17
    probes of each would make the raw hits grow with n per image). Queries go in batches of at most
    `batch` rows and at most `max_hits` raw hits (each row's hits counted first): the raw hits of
    a row grow with n (a bucket holds ~n / 65536 rows, more where photos' hashes cluster), so a
    batch of a fixed number of rows held ~4x the memory at 4x the images (347 MB at 77,327
    images, issue 34); buckets over `max_bucket` rows (flat images share hashes) are skipped."""
    n = len(hashes)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if n < 2:
        return empty
    h = hashes.astype(np.uint64)
    mirrored = h ^ np.uint64(_MIRROR_MASK)
    flips = np.concatenate([[0], 1 << np.arange(16)]).astype(np.uint64) if n < flip_below else np.zeros(1, np.uint64)
    tables = []
    for c in range(4):  # per chunk: rows sorted by the chunk's value, and where each of the 65,536 values starts
        key = ((h >> np.uint64(16 * c)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(key, kind="stable")
        starts = np.zeros(65537, np.int64)
        np.cumsum(np.bincount(key, minlength=65536), out=starts[1:])
        tables.append((np.uint64(16 * c), order, starts))

    def probes_of(rows):  # per table and query (as is, mirrored): (the table's row order, where each probe's bucket starts, its size)
        for shift, order, starts in tables:
            for q in (h[rows], mirrored[rows]):
                probes = (((q >> shift) & np.uint64(0xFFFF))[:, None] ^ flips[None, :]).reshape(-1).astype(np.int64)
                left = starts[probes]  # a table lookup per probe (two binary searches before)
                count = starts[probes + 1] - left
                count[count > max_bucket] = 0
                yield order, left, count

    hits = np.zeros(n, np.int64)  # each row's raw hits, so that a batch's hits are bounded
    for lo in range(0, n, batch):
        rows = np.arange(lo, min(n, lo + batch))
        for _, _, count in probes_of(rows):
            hits[rows] += count.reshape(len(rows), len(flips)).sum(axis=1)
    bounds, lo, total = [], 0, np.cumsum(hits)
    while lo < n:  # the longest run of rows from lo within `batch` rows and `max_hits` hits (at least one row)
        before = total[lo - 1] if lo else 0
        hi = int(np.searchsorted(total, before + max_hits, side="right"))
        hi = min(max(hi, lo + 1), lo + batch, n)
        bounds.append((lo, hi))
        lo = hi
    out_i, out_j, out_d = [], [], []
    for lo, hi in bounds:
        rows = np.arange(lo, hi)
        found_i, found_j = [], []
        for order, left, count in probes_of(rows):
            found = int(count.sum())
            if not found:
                continue
            found_i.append(rows[np.repeat(np.arange(len(count)) // len(flips), count)])
            offsets = np.arange(found) - np.repeat(np.cumsum(count) - count, count)
            found_j.append(order[np.repeat(left, count) + offsets])
        if not found_i:
            continue
        i, j = np.concatenate(found_i), np.concatenate(found_j)
        keep = i < j  # each pair once (both ends query, both hashes are looked up mirrored)
        i, j = i[keep], j[keep]
        dist = np.minimum(_popcount64(h[i] ^ h[j]), _popcount64(mirrored[i] ^ h[j]))
        keep = dist <= max_distance
        out_i.append(i[keep])
        out_j.append(j[keep])
        out_d.append(dist[keep])
    if not out_i:
        return empty
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


_MIRROR_MASK = int(mirror_phash("0" * 16), 16)  # the bits mirroring flips (odd columns)


class CandidateList:
    """The candidate pairs as arrays: a sequence of (id_a, id_b, cosine or nan, pHash distance or
    -1) tuples, each made when it is read (`find_candidates`' list, element for element), held as
    two int32 positions into `ids`, a float64 and an int16 a pair (~18 bytes, not the ~110 of a
    tuple with its float: 514,765 candidates at 77,327 images were 58 MB of tuples, and the
    freed tuples' memory stayed with the steps after; issue 34)."""

    def __init__(self, ids: list, a: np.ndarray, b: np.ndarray, cos: np.ndarray, dist: np.ndarray):
        self.ids, self.a, self.b, self.cos, self.dist = ids, a, b, cos, dist

    @classmethod
    def of(cls, tuples: list) -> "CandidateList":
        """A CandidateList of (id_a, id_b, cosine, distance) tuples (their ids listed once)."""
        names = sorted({x for t in tuples for x in t[:2]})
        at = {x: k for k, x in enumerate(names)}
        return cls(names, np.array([at[t[0]] for t in tuples], np.int32), np.array([at[t[1]] for t in tuples], np.int32),
                   np.array([t[2] for t in tuples], np.float64), np.array([t[3] for t in tuples], np.int16))

    def __len__(self) -> int:
        return len(self.a)

    def _tuple(self, k: int) -> tuple:
        return (self.ids[int(self.a[k])], self.ids[int(self.b[k])], float(self.cos[k]), int(self.dist[k]))

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self._tuple(i) for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._tuple(k)

    def __iter__(self):
        ids = self.ids
        for lo in range(0, len(self), 1 << 14):  # Python values of a slice at a time
            sl = slice(lo, lo + (1 << 14))
            for a, b, c, d in zip(self.a[sl].tolist(), self.b[sl].tolist(), self.cos[sl].tolist(), self.dist[sl].tolist()):
                yield (ids[a], ids[b], c, d)

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(x == y or (x[:2] == y[:2] and x[3] == y[3] and math.isnan(x[2]) and math.isnan(y[2])) for x, y in zip(self, other))

    def members(self) -> set:
        """The ids named by any pair."""
        return {self.ids[k] for k in np.unique(np.concatenate([self.a, self.b])).tolist()}


def find_candidates(ids: list[str], embeddings: Optional[np.ndarray], phashes: list[Optional[str]], cfg) -> list[tuple[str, str, float, int]]:
    """`candidate_list` as a list of tuples."""
    return list(candidate_list(ids, embeddings, phashes, cfg))


def candidate_list(ids: list[str], embeddings: Optional[np.ndarray], phashes: list[Optional[str]], cfg) -> CandidateList:
    """Candidate copy pairs (id_a < id_b, cosine or nan, mirror-aware pHash distance or -1): the
    embedding neighbours and the pHash neighbours of every image; each image proposes its closest
    `copy_max_candidates` (by cosine, then by pHash distance), and takes part in at most twice that
    many pairs (a hub keeps its closest). Linear in the images: each query returns a bounded list;
    the merging is numpy over those lists. Sorted by (id_a, id_b)."""
    if (embeddings is not None and len(embeddings) and len(embeddings) != len(ids)) or len(phashes) != len(ids):
        raise ValueError(f"candidate_list: {len(ids)} ids, {len(embeddings) if embeddings is not None else 0} embeddings and {len(phashes)} pHashes (one each an image)")
    if len(ids) < 2:
        return _no_candidates(ids)
    parts = [embedding_pairs(embeddings, cfg)] if embeddings is not None and len(embeddings) else []
    parts += phash_pairs(phashes, cfg)
    return choose_candidates(ids, parts, cfg)


def _no_candidates(ids) -> CandidateList:
    return CandidateList(list(ids), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float64), np.zeros(0, np.int16))


def _raw_part(i: np.ndarray, j: np.ndarray, n: int, cos: np.ndarray, dist: np.ndarray) -> tuple:
    """Raw neighbour pairs of rows i, j of n as (pair key min * n + max, cosine as float32 or nan,
    pHash distance as int16 or -1): 14 bytes a pair, where the rows, a float64 and an int64 held 32
    (faiss's cosines are float32: the same values; issue 34)."""
    key = np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j)
    return key, cos.astype(np.float32), dist.astype(np.int16)


def embedding_pairs(embeddings: np.ndarray, cfg) -> tuple:
    """The raw pairs (`_raw_part`) of each image and its faiss neighbours, of the rows of
    `embeddings` (one image a row)."""
    i, j, sims = ann_neighbours(embeddings, cfg.copy_top_k, cfg.copy_min_cosine)
    return _raw_part(i, j, len(embeddings), sims, np.full(len(i), -1, np.int16))


def phash_pairs(phashes: list[Optional[str]], cfg) -> list[tuple]:
    """[the raw pairs (`_raw_part`) of images within `copy_phash_distance` bits], [] when no image
    has a pHash or the distance is 0."""
    valid = np.array([bool(h) and len(h) == 16 for h in phashes])
    if not valid.any() or cfg.copy_phash_distance <= 0:
        return []
    rows = np.flatnonzero(valid)
    hashes = np.array([int(phashes[r], 16) for r in rows], dtype=np.uint64)
    i, j, dist = phash_neighbours(hashes, cfg.copy_phash_distance)
    return [_raw_part(rows[i], rows[j], len(phashes), np.full(len(i), np.nan, np.float32), dist)]


def choose_candidates(ids: list[str], parts: list[tuple], cfg) -> CandidateList:
    """`candidate_list` of the raw pairs `parts` (`embedding_pairs`, `phash_pairs`) of `ids`."""
    n = len(ids)
    none = _no_candidates(ids)
    if n < 2 or not parts:
        return none
    # what follows holds a few arrays of the raw pairs at a time (each dropped when used: at 77,327
    # images, 1.2 x 10^6 raw pairs, all of them alive together and the Python ints of the degree
    # loop were a 280 MB peak, issue 34), indices as int32, distances as int16 and cosines as
    # float32 (the same values, so the same sorts)
    key = np.concatenate([p[0] for p in parts])
    cos = np.concatenate([p[1] for p in parts])
    dist = np.concatenate([p[2] for p in parts])
    parts.clear()  # the caller's list: its arrays go now
    if not len(key):  # neighbour searches that found nothing (no two images close enough)
        return none
    # one row per pair: its cosine (if any) and its smallest pHash distance (if any)
    order = np.argsort(key, kind="stable")
    key = key[order]
    cos = cos[order]
    dist = dist[order]
    del order
    first = np.concatenate([[True], key[1:] != key[:-1]])
    group = np.cumsum(first, dtype=np.int32) - 1
    n_pairs = int(group[-1]) + 1
    pair_cos = np.full(n_pairs, np.nan, np.float32)
    has_cos = ~np.isnan(cos)
    pair_cos[group[has_cos]] = cos[has_cos]
    del cos, has_cos
    pair_dist = np.full(n_pairs, 99, np.int16)
    has_dist = dist >= 0
    np.minimum.at(pair_dist, group[has_dist], dist[has_dist])
    del dist, has_dist, group
    key = key[first]
    del first
    plo, phi = (key // n).astype(np.int32), (key % n).astype(np.int32)
    del key
    # cap partners per image: rank each image's pairs by cosine (pHash-only ones after, closest first)
    rank_cos = np.where(np.isnan(pair_cos), np.float32(-2.0), pair_cos)
    ends = np.concatenate([plo, phi])
    order = np.lexsort((np.concatenate([pair_dist, pair_dist]), -np.concatenate([rank_cos, rank_cos]), ends))
    ends = ends[order]
    pidx = (order % n_pairs).astype(np.int32)  # the pair of each end (ends are plo then phi)
    del order
    starts = np.concatenate([[True], ends[1:] != ends[:-1]])
    at = np.arange(len(ends), dtype=np.int32)
    pos = at - np.maximum.accumulate(np.where(starts, at, 0))
    del starts, at, ends
    allowed = np.zeros(n_pairs, bool)
    allowed[pidx[pos < cfg.copy_max_candidates]] = True
    del pidx, pos
    # ... and no image in more than 2 x copy_max_candidates checks (a hub that many images name as
    # a neighbour keeps its closest), so the work per image is bounded, not only its average
    chosen = np.flatnonzero(allowed)
    del allowed
    chosen = chosen[np.lexsort((pair_dist[chosen], -rank_cos[chosen]))]
    degree = np.zeros(n, np.int64)
    limit = 2 * cfg.copy_max_candidates
    take = np.zeros(len(chosen), bool)
    for lo in range(0, len(chosen), 1 << 16):  # in slices: no Python int of every pair at once
        part = chosen[lo : lo + (1 << 16)]
        for k, (a, b) in enumerate(zip(plo[part].tolist(), phi[part].tolist())):
            if degree[a] < limit and degree[b] < limit:
                degree[a] += 1
                degree[b] += 1
                take[lo + k] = True
    chosen = chosen[take]
    del take
    a, b = plo[chosen], phi[chosen]
    cos, dist = pair_cos[chosen].astype(np.float64), pair_dist[chosen].astype(np.int16)
    dist[dist == 99] = -1
    # each pair as (smaller id, larger id), in the order of (id_a, id_b): the ids' ranks as strings
    # (equal ids, equal ranks); the ids of the pipeline come sorted, so their ranks are their rows
    ids = list(ids)
    if all(ids[k] < ids[k + 1] for k in range(len(ids) - 1)):
        rank = np.arange(n, dtype=np.int64)
    else:
        rank = np.unique(np.array(ids, dtype=object), return_inverse=True)[1].astype(np.int64).reshape(-1)
    swap = rank[a] > rank[b]
    a, b = np.where(swap, b, a).astype(np.int32), np.where(swap, a, b).astype(np.int32)
    order = np.lexsort((dist, cos, rank[b], rank[a]))
    return CandidateList(ids, a[order], b[order], cos[order], dist[order])


# ---------------------------------------------------------------------------------------------
# 2. verification
# ---------------------------------------------------------------------------------------------

def jpeg_quality(img) -> int:
    """Estimated JPEG quality (1-100) from the luminance quantisation table (libjpeg's scaling of
    the standard table); 100 for images without one (PNG and other lossless formats)."""
    tables = getattr(img, "quantization", None)
    if not tables:
        return 100
    table = tuple(tables.get(0, next(iter(tables.values()))))
    q = _QUALITY_OF.get(table)
    if q is None:  # most images of a crawl share a few encoders' tables: each is estimated once
        luma = np.asarray(table, dtype=np.float64)
        if luma.size != 64:
            return 100
        scale = float(np.mean(luma / _STD_LUMA)) * 100.0  # libjpeg: table = std * scale / 100
        q = (200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale
        q = int(max(1, min(100, round(q))))
        if len(_QUALITY_OF) < 4096:
            _QUALITY_OF[table] = q
    return q


_QUALITY_OF: dict = {}  # luminance table -> estimated quality (bounded)


def trim_borders(grey: np.ndarray, tol: float = 6.0, max_share: float = 0.4) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the content inside uniform bars (letterbox, frame): rows and
    columns at the edges whose pixels barely vary, at most `max_share` of each side."""
    h, w = grey.shape
    g = grey.astype(np.float32)
    row_std, col_std = g.std(axis=1), g.std(axis=0)

    def run(values: np.ndarray, limit: int) -> int:
        n = 0
        while n < limit and values[n] < tol:
            n += 1
        return n

    top = run(row_std, int(h * max_share))
    bottom = h - run(row_std[::-1], int(h * max_share))
    left = run(col_std, int(w * max_share))
    right = w - run(col_std[::-1], int(w * max_share))
    if bottom - top < 8 or right - left < 8:
        return 0, h, 0, w
    return top, bottom, left, right


def image_features(data: bytes, max_side: int = 320, max_keypoints: int = 300, mirror: bool = True) -> Optional[dict]:
    """What verification needs of one image, computed once: SIFT keypoints (in pixels of the
    trimmed, downscaled content frame) and uint8 descriptors of the image and (`mirror`) of its
    mirror (`mirror_features`: derived from the image's own, not a second SIFT), the content frame
    in pixels and the recompression signals. None when the bytes do not decode."""
    import cv2
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))
        quality = jpeg_quality(img) if img.format == "JPEG" else 100
        ImageOps.exif_transpose(img, in_place=True)  # no copy of the decoded image (the same pixels)
        img = img.convert("L")
    except Exception:  # noqa: BLE001 - filter decoded it; a failure here only skips the image
        return None
    grey = np.asarray(img)
    full_h, full_w = grey.shape
    top, bottom, left, right = trim_borders(grey)
    content = grey[top:bottom, left:right]
    ch, cw = content.shape
    scale = min(1.0, max_side / max(ch, cw))
    if scale < 1.0:
        content = cv2.resize(content, (max(8, round(cw * scale)), max(8, round(ch * scale))), interpolation=cv2.INTER_AREA)
    sh, sw = content.shape
    kps, desc = _sift(max_keypoints).detectAndCompute(np.ascontiguousarray(content), None)
    if desc is None or not kps:
        pts, desc = np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8)
    else:
        pts = np.array([k.pt for k in kps], dtype=np.float32)
    f = {
        "w": sw, "h": sh,  # the frame the keypoints live in (trimmed, downscaled)
        "pts": pts, "desc": desc,
        "content": int((bottom - top) * (right - left)),  # pixels inside the trimmed borders
        "quality": quality, "bytes_per_pixel": len(data) / max(1, full_w * full_h),
    }
    return mirror_features(f) if mirror else f


_SIFTS = threading.local()  # per thread: {max_keypoints: detector}


def _sift(max_keypoints: int):
    """One OpenCV SIFT detector per (thread, keypoint cap), reused: a new one per image cost ~0.1
    ms of CPU (a seventh of a 64-px image's SIFT). Its descriptors come out as uint8 (OpenCV rounds
    each value to the nearest integer within 0..255, as np.rint + clip of its float ones did)."""
    import cv2

    cache = getattr(_SIFTS, "by_cap", None)
    if cache is None:
        cache = _SIFTS.by_cap = {}
    sift = cache.get(max_keypoints)
    if sift is None:
        sift = cache[max_keypoints] = cv2.SIFT_create(nfeatures=max_keypoints, nOctaveLayers=3, contrastThreshold=0.04, edgeThreshold=10, sigma=1.6, descriptorType=cv2.CV_8U)  # OpenCV's defaults; uint8 descriptors
    return sift


@contextlib.contextmanager
def one_opencv_thread():
    """OpenCV on the calling thread only, for a block of images (restored after): a worker is one
    core (Beam runs a worker per core), and on this 2-core machine OpenCV's second thread cost
    ~15 % more CPU for a small image's SIFT (its pool's threads wait actively). SIFT's keypoints
    are sorted before the cap, so its output does not depend on the threads."""
    import cv2

    # cv2.setNumThreads is one setting of the process: the first block to enter saves it, the last
    # to leave restores it (blocks of several runner threads overlap)
    with _OPENCV_LOCK:
        if _OPENCV_USERS[0] == 0:
            _OPENCV_USERS[1] = cv2.getNumThreads()
            cv2.setNumThreads(1)
        _OPENCV_USERS[0] += 1
    try:
        yield
    finally:
        with _OPENCV_LOCK:
            _OPENCV_USERS[0] -= 1
            if _OPENCV_USERS[0] == 0:
                cv2.setNumThreads(_OPENCV_USERS[1])


_OPENCV_LOCK = threading.Lock()
_OPENCV_USERS = [0, 0]  # blocks inside one_opencv_thread now, OpenCV's threads before the first


# SIFT is mirror-equivariant: the mirror's keypoints are the image's at x -> w - 0.5 - x (OpenCV
# puts a pixel's centre at +0.25 of it: its first octave is the image upsampled 2x), and with the
# keypoint's orientation mirrored too, a descriptor's 4 x 4 cells swap rows and each cell's 8
# orientation bins run backwards (bin o -> -o). Measured on the shared photos at 320 px: 90-93 %
# of the mirror's own SIFT keypoints within 0.25 px of these, their descriptors within 4 % (the
# rest: keypoints of the coarser octaves, whose every-second-pixel sampling is not symmetric).
_MIRROR_DESC = np.arange(128).reshape(4, 4, 8)[::-1, :, (8 - np.arange(8)) % 8].reshape(-1)


def mirror_features(f: dict) -> dict:
    """`f` with the SIFT features of its mirror image (pts_m, desc_m), derived from its own by the
    mirror's permutation of keypoints and descriptors: a second SIFT cost as much as the first."""
    if "desc_m" not in f:
        pts_m = np.array(f["pts"], dtype=np.float32, copy=True).reshape(-1, 2)
        pts_m[:, 0] = f["w"] - 0.5 - pts_m[:, 0]
        f = {**f, "pts_m": pts_m, "desc_m": np.ascontiguousarray(np.asarray(f["desc"]).reshape(-1, 128)[:, _MIRROR_DESC])}
    return f


def _polygon_area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clip_polygon(poly: np.ndarray, w: float, h: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex polygon to the rectangle [0, w] x [0, h]."""
    def clip(points, inside, cut):
        out = []
        for k in range(len(points)):
            p, q = points[k - 1], points[k]
            if inside(q):
                if not inside(p):
                    out.append(cut(p, q))
                out.append(q)
            elif inside(p):
                out.append(cut(p, q))
        return out

    def at_x(x0):
        return lambda p, q: (x0, p[1] + (q[1] - p[1]) * (x0 - p[0]) / ((q[0] - p[0]) or 1e-12))

    def at_y(y0):
        return lambda p, q: (p[0] + (q[0] - p[0]) * (y0 - p[1]) / ((q[1] - p[1]) or 1e-12), y0)

    pts = [tuple(p) for p in poly]
    for inside, cut in ((lambda p: p[0] >= 0, at_x(0)), (lambda p: p[0] <= w, at_x(w)), (lambda p: p[1] >= 0, at_y(0)), (lambda p: p[1] <= h, at_y(h))):
        pts = clip(pts, inside, cut)
        if not pts:
            return np.zeros((0, 2))
    return np.array(pts, dtype=np.float64)


def _match(desc_a: np.ndarray, desc_b: np.ndarray, ratio: float):
    import cv2

    if len(desc_a) < 2 or len(desc_b) < 2:
        return []
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    knn = matcher.knnMatch(desc_a.astype(np.float32), desc_b.astype(np.float32), k=2)
    return [m[0] for m in knn if len(m) == 2 and m[0].distance < ratio * m[1].distance]


def verify(fa: dict, fb: dict, cfg) -> dict:
    """Geometric check of one candidate pair: the best of (a, b) and (mirror of a, b). Returns
    {"copy", "inliers", "matches", "mirrored", "scale", "rotation", "overlap_small",
    "overlap_large", "spread"} (the measurements whatever the verdict, for the statistics)."""
    import cv2

    best = {"copy": False, "inliers": 0, "matches": 0, "mirrored": False, "scale": 0.0, "rotation": 0.0, "overlap_small": 0.0, "overlap_large": 0.0, "spread": 0.0}
    fa = mirror_features(fa)
    for mirrored in (False, True):
        pts_a, desc_a = (fa["pts_m"], fa["desc_m"]) if mirrored else (fa["pts"], fa["desc"])
        matches = _match(desc_a, fb["desc"], cfg.copy_ratio)
        res = {"copy": False, "inliers": 0, "matches": len(matches), "mirrored": mirrored, "scale": 0.0, "rotation": 0.0, "overlap_small": 0.0, "overlap_large": 0.0, "spread": 0.0}
        if len(matches) >= cfg.copy_min_inliers:
            src = np.float32([pts_a[m.queryIdx] for m in matches])
            dst = np.float32([fb["pts"][m.trainIdx] for m in matches])
            model, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.copy_ransac_px, maxIters=2000, confidence=0.995, refineIters=10)
            if model is not None and mask is not None:
                inl = mask.ravel().astype(bool)
                res["inliers"] = int(inl.sum())
                a, b = float(model[0, 0]), float(model[1, 0])
                s = math.hypot(a, b)
                res["scale"], res["rotation"] = s, math.degrees(math.atan2(b, a))
                if s > 0:
                    corners = np.array([[0, 0], [fa["w"], 0], [fa["w"], fa["h"]], [0, fa["h"]]], dtype=np.float64)
                    mapped = corners @ model[:, :2].T.astype(np.float64) + model[:, 2]
                    shared = _polygon_area(_clip_polygon(mapped, fb["w"], fb["h"]))  # in b's pixels
                    area_b = fb["w"] * fb["h"]
                    area_a_in_b = fa["w"] * fa["h"] * s * s
                    shares = sorted((shared / area_b, shared / area_a_in_b))
                    res["overlap_large"], res["overlap_small"] = shares[1], shares[0]  # of the smaller / larger picture
                    pin = dst[inl]
                    if len(pin) >= 3 and shared > 0:
                        hull = cv2.convexHull(pin.astype(np.float32)).reshape(-1, 2)
                        res["spread"] = _polygon_area(hull.astype(np.float64)) / shared
                res["copy"] = (
                    res["inliers"] >= cfg.copy_min_inliers
                    and 1.0 / cfg.copy_max_scale <= s <= cfg.copy_max_scale
                    and abs(res["rotation"]) <= cfg.copy_max_rotation
                    and res["overlap_large"] >= cfg.copy_min_containment
                    and res["overlap_small"] >= cfg.copy_min_coverage
                    and res["spread"] >= cfg.copy_min_spread
                )
        if (res["copy"], res["inliers"]) > (best["copy"], best["inliers"]):
            best = res
    return best


# ---------------------------------------------------------------------------------------------
# 3. groups
# ---------------------------------------------------------------------------------------------

def keep_order(info: dict) -> tuple:
    """Sort key of a group's members, best first: the largest content, then the least
    recompressed (estimated JPEG quality, then bytes per pixel), then the id."""
    return (-info.get("content", 0), -info.get("quality", 0), -info.get("bytes_per_pixel", 0.0), info["image_id"])


def copy_groups(edges: Iterable[tuple[str, str]], info: dict[str, dict]) -> dict[str, str]:
    """Union-find over verified pairs -> {member: kept member} for every member that is not kept
    (kept members map to nothing). `info` holds each member's keep_order fields."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for x in list(parent):
        groups.setdefault(find(x), []).append(x)
    out: dict[str, str] = {}
    for members in groups.values():
        kept = best_member(members, info)
        for m in members:
            if m != kept:
                out[m] = kept
    return out


def best_member(members: list[str], info: dict[str, dict], tolerance: float = 0.95) -> str:
    """The member a group keeps: among those whose content is within `tolerance` of the largest
    (a letterbox bar that JPEG ringing kept from the trim is no larger picture), the least
    recompressed (keep_order past the content)."""
    rows = [{"image_id": m, **info.get(m, {})} for m in members]
    largest = max(r.get("content", 0) for r in rows)
    near = [r for r in rows if r.get("content", 0) >= tolerance * largest]
    return min(near, key=lambda r: keep_order({**r, "content": 0}))["image_id"]


def connected_components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """The connected components of the undirected graph on nodes 0..n-1 with edges (a[i], b[i]):
    each node's label, the smallest node of its component. Hook and shortcut on arrays: each
    round hooks every edge's larger root under its smaller one, then jumps pointers until every
    node points at a root; it stops when every edge's two ends share a root (a few rounds).
    scipy's `connected_components` gives the same components, but importing scipy.sparse and its
    graph module cost the worker that runs the copy groups ~17 MB, at the highest point of pair
    on Dask at one Common Crawl file (issue 34)."""
    kind = np.int32 if n < 2**31 else np.int64  # (the positions come as int32)
    label = np.arange(n, dtype=kind)
    a, b = np.asarray(a, kind), np.asarray(b, kind)
    while True:
        la, lb = label[a], label[b]
        differ = la != lb
        if not differ.any():
            return label
        la, lb = la[differ], lb[differ]
        low, high = np.minimum(la, lb), np.maximum(la, lb)
        np.minimum.at(label, high, low)  # a root under the smallest root it meets (roots only: labels are roots here)
        while True:  # every node to its root
            up = label[label]
            if np.array_equal(up, label):
                break
            label = up


def group_members(edge_tables: Iterable, info_tables: Iterable, tolerance: float = 0.95) -> list[tuple[str, str]]:
    """`group_member_table`'s rows as (member, kept member) tuples, sorted."""
    table = group_member_table(edge_tables, info_tables, tolerance)
    return list(zip(table.column("member").to_pylist(), table.column("kept").to_pylist()))


def group_member_table(edge_tables: Iterable, info_tables: Iterable, tolerance: float = 0.95):
    """`copy_groups` on columns: a pyarrow table (member, kept) of every member that is not kept
    and its kept member, sorted by member (no Python object a member: as tuples of str, the
    65,363 answers at one Common Crawl file took ~19 MB in the worker that made them; issue 34),
    from pyarrow tables of verified pairs (image_a, image_b) and of the members' keep signals
    (image_id, content, quality, bytes_per_pixel). The groups are the connected components of the
    pairs (`connected_components`, over the ids' positions among the sorted distinct ids:
    `copy_groups`' union-find gives the same groups), each keeping `best_member`'s choice: among the members whose content
    is within `tolerance` of the largest, the highest quality, then the most bytes per pixel, then
    the smallest id. What is held is a few numbers a pair and an id, not a Python tuple a pair and a
    dict a member (~0.2 KB a pair and ~0.4 KB a member: ~100 MB at the 16x scale input, issue 34)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # The pairs' ids, every table's image_a then image_b as one column of chunks (nothing copied),
    # dictionary-encoded in one pass: one hash table, an int32 position a pair end. Concatenating
    # the columns and their unique ids, then looking each column up again, peaked at +50 MB in the
    # worker at one Common Crawl file (212,551 pairs), the highest point of pair on Dask (issue 34).
    edge_tables = [t for t in edge_tables if t.num_rows]
    if not edge_tables:
        return pa.table({"member": pa.array([], pa.string()), "kept": pa.array([], pa.string())})
    ends = pa.chunked_array([c for name in ("image_a", "image_b") for t in edge_tables for c in t.column(name).cast(pa.string()).chunks], pa.string())
    if ends.null_count:  # (`_EdgeTables` writes none)
        raise ValueError("copy groups: a verified pair without an image id")
    encoded = pc.dictionary_encode(ends)
    del ends
    ids = encoded.chunk(encoded.num_chunks - 1).dictionary  # every chunk's: the ids in order of first sight
    if any(len(c.dictionary) != len(ids) for c in encoded.chunks):  # (Arrow gives each chunk the final dictionary)
        raise AssertionError("dictionary_encode gave chunks different dictionaries")
    n = len(ids)
    order = pc.sort_indices(ids)  # UTF-8 byte order: Python's order of str
    rank = np.empty(n, np.int32)
    rank[order.to_numpy()] = np.arange(n, dtype=np.int32)
    ids = ids.take(order)
    at = rank[np.concatenate([c.indices.to_numpy() for c in encoded.chunks])]
    del encoded, order, rank
    pairs = len(at) // 2
    label = connected_components(at[:pairs], at[pairs:], n)
    del at
    content, quality, bpp = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float64)  # keep_order's defaults: no info
    info_tables = [t for t in info_tables if t.num_rows]
    if info_tables:  # every table's rows looked up at once
        column = lambda name, kind: pa.chunked_array([c for t in info_tables for c in t.column(name).cast(kind).chunks], kind)  # noqa: E731
        at = pc.index_in(column("image_id", pa.string()), value_set=ids)
        found = at.is_valid().to_numpy(zero_copy_only=False)
        at = at.to_numpy(zero_copy_only=False)[found].astype(np.int64)
        content[at] = column("content", pa.int64()).to_numpy()[found]
        quality[at] = column("quality", pa.int64()).to_numpy()[found]
        bpp[at] = column("bytes_per_pixel", pa.float64()).to_numpy()[found]
    groups = int(label.max()) + 1
    largest = np.zeros(groups, np.int64)
    np.maximum.at(largest, label, content)
    near = np.flatnonzero(content >= tolerance * largest[label])
    near = near[np.lexsort((near, -bpp[near], -quality[near], label[near]))]  # per group, best first
    first = np.ones(len(near), bool)
    first[1:] = label[near[1:]] != label[near[:-1]]
    kept_of = np.empty(groups, np.int64)
    kept_of[label[near[first]]] = near[first]
    kept = kept_of[label]
    members = np.flatnonzero(kept != np.arange(n))
    return pa.table({"member": ids.take(pa.array(members)), "kept": ids.take(pa.array(kept[members]))})


EDGE_TABLE_ROWS = 1 << 14  # verified pairs a step holds before they leave as a table


class _EdgeTables(beam.DoFn):
    """Check rows -> the verified ones' (image_a, image_b) written as Arrow IPC record batches of up
    to EDGE_TABLE_ROWS rows into one file per bundle under `edge_dir`; yields each file's path when
    the bundle ends. What crosses the runner is paths: the pairs as tables in a ToList (and the
    CombineGlobally's default, a side input the in-process runner keeps to the pipeline's end) were
    held three times over, ~8 MB each at 212,551 pairs (issue 34)."""

    def __init__(self, edge_dir: str):
        self.edge_dir = edge_dir.rstrip("/")

    def start_bundle(self):
        self.a, self.b = [], []
        self.out = None  # (file, writer, path) once a pair is verified

    def process(self, row):
        if row["copy"]:
            self.a.append(row["image_a"])
            self.b.append(row["image_b"])
            if len(self.a) >= EDGE_TABLE_ROWS:
                self._write()

    def _write(self):
        import uuid

        import pyarrow as pa
        from apache_beam.io.filesystems import FileSystems

        if self.out is None:
            path = f"{self.edge_dir}/{uuid.uuid4().hex}.arrow"
            fh = FileSystems.create(path)
            self.out = (fh, pa.ipc.new_file(fh, EDGE_SCHEMA), path)
        self.out[1].write_batch(pa.record_batch([pa.array(self.a, pa.string()), pa.array(self.b, pa.string())], schema=EDGE_SCHEMA))
        self.a, self.b = [], []

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        if self.a:
            self._write()
        if self.out is not None:
            fh, writer, path = self.out
            writer.close()
            fh.close()
            self.out = None
            yield GlobalWindows.windowed_value(path)


def _edge_schema():
    import pyarrow as pa

    return pa.schema([("image_a", pa.string()), ("image_b", pa.string())])


EDGE_SCHEMA = _edge_schema()


def read_edge_tables(paths: Iterable[str]) -> list:
    """The verified pairs' tables that `_EdgeTables` wrote (one table a file), in path order."""
    import pyarrow as pa
    from apache_beam.io.filesystems import FileSystems

    tables = []
    for path in sorted(paths):
        with FileSystems.open(path) as fh:
            tables.append(pa.ipc.open_file(fh).read_all())
    return tables


COPY_OF_FILE = "copy_of_file"  # FindCopies' output: the path of the file holding copy_of (`read_copy_of`)
COPY_OF_COUNT = "copy_of_count"  # FindCopies' output: how many members are not kept (one int)


class _Groups(beam.DoFn):
    """The paths of `_EdgeTables`' files -> tagged COPY_OF_COUNT, how many members group_members
    of their verified pairs gives, tagged COPY_OF_FILE, the path of one Arrow file under
    `copy_of_dir` holding each (member, kept member) (none when there are none), and with `pairs`
    each of them as an element too (as elements they waited in the worker until counted: 65,363
    tuples at one Common Crawl file; issue 34). The steps that key records by the kept member read that
    file (`read_copy_of`), one dict a bundle, dropped when the bundle ends: as a side input the map
    stayed held by each reading step's cached invoker (and the runner's state cache) to the end of
    the pipeline (~20 MB a reader at 65,363 entries; issue 34)."""

    def __init__(self, copy_of_dir: str, pairs: bool = False):
        self.copy_of_dir, self.pairs = copy_of_dir.rstrip("/"), pairs

    def process(self, paths, info_tables):
        import uuid

        import pyarrow as pa
        from apache_beam.io.filesystems import FileSystems

        from core.memory import release_free_memory

        release_free_memory()  # what verification left freed, before the groups add theirs
        table = group_member_table(read_edge_tables(paths), info_tables)
        if table.num_rows:
            path = f"{self.copy_of_dir}/{uuid.uuid4().hex}.arrow"
            with FileSystems.create(path) as fh, pa.ipc.new_file(fh, table.schema) as writer:
                writer.write_table(table)
            yield beam.pvalue.TaggedOutput(COPY_OF_FILE, path)
        yield beam.pvalue.TaggedOutput(COPY_OF_COUNT, table.num_rows)
        if self.pairs:
            yield from zip(table.column("member").to_pylist(), table.column("kept").to_pylist())


def read_copy_of(paths) -> dict:
    """{member: kept member} from the files `_Groups` wrote (FindCopies' COPY_OF_FILE output)."""
    import pyarrow as pa
    from apache_beam.io.filesystems import FileSystems

    out: dict = {}
    for path in sorted(paths):
        with FileSystems.open(path) as fh:
            table = pa.ipc.open_file(fh).read_all()
        out.update(zip(table.column("member").to_pylist(), table.column("kept").to_pylist()))
    return out


def _info_table(rows: list):
    """(image_id, {content, quality, bytes_per_pixel}) of a row group's featurised images -> one
    pyarrow table (group_members' info)."""
    import pyarrow as pa

    rows = sorted(rows)
    return pa.table({
        "image_id": pa.array([r[0] for r in rows], pa.string()),
        "content": pa.array([int(r[1]["content"]) for r in rows], pa.int64()),
        "quality": pa.array([int(r[1]["quality"]) for r in rows], pa.int64()),
        "bytes_per_pixel": pa.array([float(r[1]["bytes_per_pixel"]) for r in rows], pa.float64()),
    })


# ---------------------------------------------------------------------------------------------
# the Beam step
# ---------------------------------------------------------------------------------------------

class LightRows:
    """What the candidate search reads of filter's images, column by column: ids, pHashes, the
    (file, row group) where each image's bytes are, and the embeddings as one float16 matrix (a row
    without an embedding: `has_emb` False, its row zeros). No per-image Python object but the id and
    the pHash strings: at 10^5 images the rows as tuples of arrays (what the step collected before)
    held ~600 bytes an image twice over (the objects and the runner's pickled list)."""

    def __init__(self, ids: list, phashes: list, pointers: list, emb: Optional[np.ndarray], has_emb: np.ndarray, ragged: Optional[list] = None):
        self.ids, self.phashes, self.pointers = ids, phashes, pointers
        self.emb, self.has_emb = emb, has_emb
        self.ragged = ragged  # embeddings of unequal lengths (not one encoder's): the rows' own arrays

    @classmethod
    def read(cls, files: Iterable[str]) -> "LightRows":
        """image_id, embedding (as float16, as filter stores it) and phash of every row of the
        images files, row group by row group, with each row's (file, row group)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        ids: list = []
        phashes: list = []
        pointers: list = []
        blocks: list = []  # (float16 values of the embedded rows, has_emb, lengths) per row group
        for path in sorted(files):
            with FileSystems.open(path) as fh:
                pf = pq.ParquetFile(fh)
                for rg in range(pf.num_row_groups):
                    t = pf.read_row_group(rg, columns=["image_id", "embedding", "phash"])
                    ids += t.column("image_id").to_pylist()
                    phashes += t.column("phash").to_pylist()
                    pointers += [(path, rg)] * t.num_rows
                    col = t.column("embedding").combine_chunks()
                    if pa.types.is_null(col.type):  # a column written with no embedding at all (pyarrow's null type)
                        col = pa.nulls(len(col), pa.list_(pa.float16()))
                    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
                    values = pc.list_flatten(col)
                    values = values.to_numpy(zero_copy_only=False).astype(np.float16) if len(values) else np.zeros(0, np.float16)
                    blocks.append((values, lengths > 0, lengths))
        n = len(ids)
        has_emb = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, bool)
        lengths = np.concatenate([b[2] for b in blocks]) if blocks else np.zeros(0, np.int64)
        values = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, np.float16)
        dims = np.unique(lengths[has_emb])
        emb, ragged = None, None
        if len(dims) == 1:
            emb = np.zeros((n, int(dims[0])), np.float16)
            emb[has_emb] = values.reshape(-1, int(dims[0]))
        elif len(dims) > 1:  # not one encoder's embeddings: each row its own array (the search then fails as before)
            ends = np.cumsum(lengths)
            ragged = [values[e - k : e] if k else None for e, k in zip(ends.tolist(), lengths.tolist())]
        return cls(ids, phashes, pointers, emb, has_emb, ragged)

    def embedding(self, i: int) -> np.ndarray:
        return self.ragged[i] if self.ragged is not None else self.emb[i]


def _candidates(light: LightRows, cfg) -> CandidateList:
    """find_candidates over the images' ids, embeddings (those that have one) and pHashes, in id
    order (the order the index is built in: the same candidates whatever order the files come)."""
    order = sorted(range(len(light.ids)), key=light.ids.__getitem__)
    ids = [light.ids[i] for i in order]
    phashes = [light.phashes[i] for i in order]
    with_emb = [k for k, i in enumerate(order) if light.has_emb[i]]

    def matrix(rows):
        if light.ragged is None:
            return light.emb[[order[k] for k in rows]].astype(np.float32)
        return np.stack([np.asarray(light.embedding(order[k]), dtype=np.float32) for k in rows])

    if with_emb and len(with_emb) == len(ids):
        # candidate_list in its steps, so that the embeddings are not held longer than needed: the
        # float16 matrix goes once the float32 one is made (the caller needs only ids and pointers
        # from here on), and that one once faiss is done with it (before, both were held through
        # the pHash search and the merge: 30 MB at 77,327 64-d embeddings, ~6 KB an image at 512-d)
        if len(ids) < 2:
            return _no_candidates(ids)
        x = matrix(with_emb)
        light.emb = None
        parts = [embedding_pairs(x, cfg)]
        del x
        parts += phash_pairs(phashes, cfg)
        return choose_candidates(ids, parts, cfg)
    if with_emb:  # a mixed input (some images not embedded): search the embedded ones
        x = matrix(with_emb)
        light.emb = None  # (as above)
        sub = find_candidates([ids[k] for k in with_emb], x, [None] * len(with_emb), cfg)
        del x
        return CandidateList.of(_merge(sub, find_candidates(ids, None, phashes, cfg)))
    return candidate_list(ids, None, phashes, cfg)


def _merge(a: list, b: list) -> list:
    seen = {(x[0], x[1]): x for x in b}
    seen.update({(x[0], x[1]): x for x in a})
    return sorted(seen.values())


# Verification reads features from disk, a block of pairs at a time: what a worker holds is one
# row group of bytes (featurising) or one block's features (verifying), however many images.
VERIFY_BLOCK = 128  # candidate pairs verified together: at most 2 x 128 images' features (~80 KB each) held
IMAGES_READ = "images_read"  # tagged output of the featurising step: the ids whose bytes were read
_ARRAYS = ("pts", "desc", "pts_m", "desc_m")
_SCALARS = ("w", "h", "content", "quality", "bytes_per_pixel")


_FEATURE_MAGIC = b"WPF1"  # the layout below, version 1


def features_to_bytes(f: Optional[dict]) -> bytes:
    """One image's features as raw little-endian arrays (no pickle, no zip: an .npz cost ~0.3 ms
    each way, as much as the verification of its pairs): magic, int64 [keypoints, mirrored
    keypoints or -1], float64 scalars, then pts (float32 n x 2), desc (uint8 n x 128) and, when
    computed, pts_m and desc_m. Empty for an image that did not decode."""
    if f is None:
        return b""
    n, n_m = len(f["pts"]), (len(f["pts_m"]) if "pts_m" in f else -1)
    parts = [_FEATURE_MAGIC, np.array([n, n_m], "<i8").tobytes(), np.array([f[k] for k in _SCALARS], "<f8").tobytes()]
    for k in _ARRAYS[: 4 if n_m >= 0 else 2]:
        parts.append(np.ascontiguousarray(f[k], dtype="<f4" if k.startswith("pts") else np.uint8).tobytes())
    return b"".join(parts)


def features_from_bytes(data: bytes) -> Optional[dict]:
    """The features `features_to_bytes` wrote; None for an image that did not decode."""
    if not data:
        return None
    if data[:4] != _FEATURE_MAGIC:
        raise ValueError("not a features file of this version")
    n, n_m = np.frombuffer(data, "<i8", 2, 4).tolist()
    scalars = np.frombuffer(data, "<f8", len(_SCALARS), 20).tolist()
    f, at = {}, 20 + 8 * len(_SCALARS)
    for k in _ARRAYS[: 4 if n_m >= 0 else 2]:
        rows = n if not k.endswith("_m") else n_m
        if k.startswith("pts"):
            f[k] = np.frombuffer(data, "<f4", rows * 2, at).reshape(rows, 2)
            at += rows * 8
        else:
            f[k] = np.frombuffer(data, np.uint8, rows * 128, at).reshape(rows, 128)
            at += rows * 128
    f.update(zip(_SCALARS, scalars))
    f["w"], f["h"], f["content"], f["quality"] = int(f["w"]), int(f["h"]), int(f["content"]), int(f["quality"])
    return f


# One features file per row group of filter's images: the images' features one after another, then
# an index (each id's offset and length; length 0: did not decode), its offset and this magic in
# the last 12 bytes. A file per image cost a create, an open and an unlink each (~0.5 ms of CPU on
# this machine: more than the image's SIFT at 64 px).
_GROUP_MAGIC = b"WPG1"


def group_feature_path(feature_dir: str, pointer) -> str:
    """The features file of the candidates of one (filter file, row group)."""
    import hashlib

    name = hashlib.sha1(f"{pointer[0]}\0{int(pointer[1])}".encode("utf-8")).hexdigest()
    return "/".join((feature_dir.rstrip("/"), name[:2], name + ".feats"))


def write_group_features(path: str, items: Iterable[tuple[str, Optional[dict]]]) -> None:
    """(image_id, features or None) in order into one features file, streamed (one image's features
    in memory at a time)."""
    import json

    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    index, at = {}, 0
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        for image_id, f in items:
            data = features_to_bytes(f)
            fh.write(data)
            index[image_id] = (at, len(data))
            at += len(data)
        fh.write(json.dumps(index, separators=(",", ":")).encode("utf-8"))
        fh.write(np.array([at], "<i8").tobytes() + _GROUP_MAGIC)


def read_group_index(fh) -> dict:
    """{image_id: (offset, length)} of an open features file."""
    import json

    fh.seek(0, 2)
    end = fh.tell()
    fh.seek(end - 12)
    tail = fh.read(12)
    if tail[8:] != _GROUP_MAGIC:
        raise ValueError("not a features file of this version")
    start = int(np.frombuffer(tail[:8], "<i8")[0])
    fh.seek(start)
    return {k: tuple(v) for k, v in json.loads(fh.read(end - 12 - start)).items()}


class GroupIndex:
    """A features file's index ({image_id: (offset, length)}) as three arrays: the ids as sorted
    UTF-8 bytes, their offsets and their lengths, looked up by binary search. `_VerifyBlock` keeps
    the indexes of the files it read for its next blocks (a block names images of most row
    groups): as dicts of strings and tuples they were ~200 bytes an image, ~17 MB at one Common
    Crawl file's 77,327 candidates, held by each worker's DoFn to the end of the pipeline; as
    arrays ~30 bytes an image (issue 34)."""

    def __init__(self, index: dict):
        ids = sorted(index)
        keys = [x.encode("utf-8") for x in ids]  # (UnicodeEncodeError for a lone surrogate: see `load_group_features`)
        if any(b"\0" in k for k in keys):  # numpy's bytes drop trailing NULs
            raise ValueError("an id with a NUL character")
        self.ids = np.array(keys, dtype=bytes) if keys else np.zeros(0, "S1")
        self.at = np.array([index[x][0] for x in ids], np.int64)
        self.size = np.array([index[x][1] for x in ids], np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, image_id: str) -> tuple[int, int]:
        key = image_id.encode("utf-8")
        k = int(np.searchsorted(self.ids, key))
        if k == len(self.ids) or self.ids[k] != key:  # (a stored id compares as the bytes it holds: a query with NULs is not found)
            raise KeyError(image_id)
        return int(self.at[k]), int(self.size[k])


def load_group_features(path: str, ids: Iterable[str], index_cache: Optional[dict] = None) -> dict:
    """{image_id: features or None} of `ids` from one features file (each read at its offset);
    `index_cache` (path -> index) spares rereading the index of a file seen before (kept there as
    a `GroupIndex`)."""
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    out = {}
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        index = index_cache.get(path) if index_cache is not None else None
        if index is None:
            index = read_group_index(fh)
            if index_cache is not None:
                try:
                    index = GroupIndex(index)
                except (ValueError, UnicodeEncodeError):  # ids that bytes cannot hold as they are: the dict
                    pass
                index_cache[path] = index
        for image_id in sorted(ids, key=lambda x: index[x][0]):
            at, size = index[image_id]
            fh.seek(at)
            out[image_id] = features_from_bytes(fh.read(size)) if size else None
    return out


def _check_row(a: str, b: str, cos: float, dist: int, res: dict) -> dict:
    return {
        "image_a": a, "image_b": b, "cosine": None if math.isnan(cos) else cos, "phash_distance": None if dist < 0 else dist,
        "copy": bool(res["copy"]), "matches": res["matches"], "inliers": res["inliers"], "mirrored": bool(res["mirrored"]), "scale": res["scale"],
        "rotation": res["rotation"], "overlap_small": res["overlap_small"], "overlap_large": res["overlap_large"], "spread": res["spread"],
    }


def _candidates_and_reads(files: list, cfg) -> tuple[list, list, dict]:
    """(candidate pairs, [((file, row group), [the candidate ids whose bytes it holds])], {candidate
    id: its (file, row group)}) of filter's images `files` (LightRows: ids, embeddings, pHashes and
    row groups, read here column by column): each candidate image once, however many pairs name
    it; nothing for the others."""
    from core.memory import release_free_memory

    light = LightRows.read(files)
    candidates = _candidates(light, cfg)
    release_free_memory()  # the search's freed arrays (~180 MB at 77,327 images), before the steps that follow add theirs
    wanted = candidates.members()
    reads: dict = {}
    where: dict = {}
    for image_id, pointer in zip(light.ids, light.pointers):
        if image_id in wanted:
            reads.setdefault(pointer, []).append(image_id)
            where[image_id] = pointer
    return candidates, sorted(reads.items()), where


class _Featurize(beam.DoFn):
    """((file, row group), [[candidate image ids]]) -> the images' features written into the row
    group's features file under `feature_dir` (`group_feature_path`); yields (image_id, keep
    signals) and, tagged IMAGES_READ, every id whose bytes were read. Only the candidates' rows of
    the row group are kept (core.stageio.fetch_rows)."""

    def __init__(self, cfg, feature_dir: str):
        self.cfg, self.feature_dir = cfg, feature_dir

    def process(self, item):
        from core.memory import release_free_memory
        from core.stageio import fetch_rows

        release_free_memory()  # what the step before left freed (the candidate search), and the last row group's bytes
        (path, row_group), lists = item
        rows = fetch_rows([(path, row_group)], "image_id", ["image_bytes"], wanted={x for ids in lists for x in ids})
        out: list = []

        def features():
            for image_id in sorted(rows):
                data = rows.pop(image_id)["image_bytes"]
                out.append(beam.pvalue.TaggedOutput(IMAGES_READ, image_id))
                # the image's own features only: verify derives the mirror's (half the bytes on disk)
                f = image_features(data, self.cfg.copy_max_side, self.cfg.copy_max_keypoints, mirror=False) if data else None
                if f is not None:
                    out.append((image_id, {"content": f["content"], "quality": f["quality"], "bytes_per_pixel": f["bytes_per_pixel"]}))
                yield image_id, f

        with one_opencv_thread():
            write_group_features(group_feature_path(self.feature_dir, (path, row_group)), features())
        info = [x for x in out if not isinstance(x, beam.pvalue.TaggedOutput)]
        yield from (x for x in out if isinstance(x, beam.pvalue.TaggedOutput))
        if info:  # the row group's keep signals as one table (group_members' info)
            yield _info_table(info)


def _blocks(candidates, where: dict, feature_dir: str, size: int = VERIFY_BLOCK) -> list:
    """The sorted candidate list in blocks of `size` pairs (pairs of one image stay together), each
    pair with the (file, row group) of its two images (where their features are), or None. The
    blocks are written one after another into one file under `feature_dir`; what is returned is
    [(block number, (that file, offset, length))]: the GroupByKey that spreads the blocks over the
    workers carries references, not pairs (the in-process runner holds a GroupByKey's values
    decoded, ~250 bytes a candidate pair: ~130 MB for the 5 x 10^5 pairs of 10^5 images)."""
    import pickle

    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    if not candidates:
        return []
    path = "/".join((feature_dir.rstrip("/"), "_blocks", "candidates.blocks"))
    refs, at = [], 0
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        for k in range(0, len(candidates), size):
            data = pickle.dumps([(a, b, cos, dist, where.get(a), where.get(b)) for a, b, cos, dist in candidates[k : k + size]], protocol=pickle.HIGHEST_PROTOCOL)
            fh.write(data)
            refs.append((k // size, (path, at, len(data))))
            at += len(data)
    return refs


def _search(files: list, cfg, feature_dir: str, keep: bool = False) -> tuple:
    """The copy step's one search element: (how many candidate pairs, the row groups to read with
    their candidate ids (`_candidates_and_reads`), the references of the blocks to verify
    (`_blocks`, written here), the CandidateList when `keep` else None). The pairs and where each
    image is go to the blocks file here: as the step's output they waited in the worker until every
    reader of it had run (at 77,327 images ~25 MB beside the featurising that follows; issue 34)."""
    candidates, reads, where = _candidates_and_reads(files, cfg)
    refs = _blocks(candidates, where, feature_dir)
    return len(candidates), reads, refs, candidates if keep else None


def read_block(ref) -> list:
    """The candidate pairs of one block that `_blocks` wrote: ref = (file, offset, length)."""
    import pickle

    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    path, at, size = ref
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        fh.seek(at)
        return pickle.loads(fh.read(size))


def _index_weight(index) -> int:
    """What a kept features index counts against `_VerifyBlock._INDEX_IDS_KEPT`: its ids, each ~32
    bytes as a GroupIndex; an index of ids that bytes cannot hold stays a dict, ~200 bytes an id."""
    return len(index) * (1 if isinstance(index, GroupIndex) else 6)


class _VerifyBlock(beam.DoFn):
    """(block, [reference to its candidate pairs (`read_block`)]) -> one check row per pair whose
    two images decoded. The block's
    features are read from disk once each (each features file opened once a block, its index kept
    for the next blocks) and dropped with the block; `written` (the count of featurised images) is
    a side input only so that this runs after every feature is written.

    The indexes kept are bounded by the ids they hold (`_INDEX_IDS_KEPT`, ~32 bytes each), not by
    files: a block of 128 pairs names up to 256 row groups (~77 of the 185 row groups of candidates
    at one Common Crawl file), and with 64 indexes kept a worker reread 273,836 indexes there (0.5
    ms each) but none at a quarter of it: pair's CPU time grew as size^1.12 from 4x to 16x (issue 34)."""

    _INDEX_IDS_KEPT = 1 << 20  # ~32 MB of GroupIndex arrays: every index of ~13 Common Crawl files' candidates

    def __init__(self, cfg, feature_dir: str):
        self.cfg, self.feature_dir = cfg, feature_dir

    def setup(self):
        from collections import OrderedDict

        self.indexes = OrderedDict()
        self.ids_kept = 0  # the kept indexes' ids (`_index_weight`)

    def start_bundle(self):
        from core.memory import release_free_memory

        release_free_memory()  # what featurising left freed (row groups of image bytes), once a bundle

    def process(self, item, written):
        if not hasattr(self, "indexes"):  # a runner that skipped setup
            self.setup()
        _, refs = item
        pairs = [p for ref in refs for p in read_block(ref)]
        by_file: dict = {}
        for a, b, _, _, wa, wb in pairs:
            for image_id, pointer in ((a, wa), (b, wb)):
                if pointer is not None:
                    by_file.setdefault(group_feature_path(self.feature_dir, pointer), set()).add(image_id)
        feats: dict = {}
        for path, ids in sorted(by_file.items()):
            known = path in self.indexes
            try:
                feats.update(load_group_features(path, ids, self.indexes))
            finally:  # (an index is kept before its features are read: counted even when one fails)
                if not known and path in self.indexes:
                    self.ids_kept += _index_weight(self.indexes[path])
            self.indexes.move_to_end(path)
            while self.ids_kept > self._INDEX_IDS_KEPT and len(self.indexes) > 1:
                self.ids_kept -= _index_weight(self.indexes.popitem(last=False)[1])
        rows = []
        with one_opencv_thread():
            for a, b, cos, dist, _, _ in pairs:
                fa, fb = feats.get(a), feats.get(b)
                if fa is None or fb is None:
                    continue  # did not decode (or no bytes): the pair stays unverified (no copy)
                rows.append(_check_row(a, b, cos, dist, verify(fa, fb, self.cfg)))
        yield from rows


class FindCopies(beam.PTransform):
    """{"light": the paths of filter's images files (pairing/pipeline.py copy_inputs), of which the
    candidate search reads each image's (image_id, embedding or None, pHash, (file, row group) where
    its bytes are) column by column (`LightRows`)} -> {COPY_OF_COUNT: how many members are not kept (one int),
    COPY_OF_FILE: the path of a file holding each (member, kept member) (`read_copy_of`; none when there are none), "checks": one
    COPY_CHECK_SCHEMA row per verified candidate pair, "candidate_count": how many candidate pairs
    (one int), "images_read": the ids whose bytes were read; with `candidates=True` also
    "candidates": the candidate pairs, one element each; with `copy_of=True` also "copy_of": each
    (member, kept member), one element each}.

    Candidates are found on one worker (the index holds every embedding: faiss HNSW, linear in the
    images; the embeddings one float16 matrix), which also lists the row groups that hold candidates. Only those row groups are read,
    each once, keeping the candidates' rows; each candidate's features are computed once and
    written under `feature_dir`, one file a row group (the caller makes and removes it: a folder every worker can reach,
    e.g. under the stage's temporary output). The candidate pairs then go to the workers in blocks
    of VERIFY_BLOCK (written to one file under `feature_dir`; references cross the shuffle), which
    read the block's pairs and features back: a worker holds one row group or one
    block, so memory does not grow with the images, and what crosses the shuffles is ids."""

    def __init__(self, cfg, feature_dir: str, candidates: bool = False, copy_of: bool = False):
        super().__init__()
        if not feature_dir:
            raise ValueError("FindCopies needs a folder for the features (feature_dir)")
        self.cfg, self.feature_dir, self.candidates, self.copy_of = cfg, feature_dir, candidates, copy_of

    def expand(self, pcolls):
        cfg, feature_dir = self.cfg, self.feature_dir
        listed = pcolls["light"] | "CopyFiles" >> beam.combiners.ToList() | "Candidates" >> beam.Map(_search, cfg, feature_dir, self.candidates)
        # the stage counts the candidates; as elements they were one Dask partition of ~500,000
        # tuples at one Common Crawl file (the search's one element, flattened; issue 34)
        found = {"candidate_count": listed | "CountCandidates" >> beam.Map(lambda c: c[0])}
        if self.candidates:
            found["candidates"] = listed | "EachCandidate" >> beam.FlatMap(lambda c: c[3])
        # the row groups that hold candidates, spread over the workers by a GroupByKey
        by_group = listed | "RowGroups" >> beam.FlatMap(lambda c: c[1]) | "SpreadRowGroups" >> beam.GroupByKey()
        featurized = by_group | "Featurize" >> beam.ParDo(_Featurize(cfg, feature_dir)).with_outputs(IMAGES_READ, main="info")
        info = featurized.info
        written = info | "CountWritten" >> beam.combiners.Count.Globally()
        checks = (
            listed | "Blocks" >> beam.FlatMap(lambda c: c[2]) | "SpreadBlocks" >> beam.GroupByKey()
            | "Verify" >> beam.ParDo(_VerifyBlock(cfg, feature_dir), beam.pvalue.AsSingleton(written))
        )
        # the groups from tables of the verified pairs (written to files under `feature_dir`; their
        # paths cross the runner) and of the members' keep signals (a list of tuples and a dict of
        # every member held ~100 MB at 77,327 images: issue 34)
        edges = checks | "EdgeTables" >> beam.ParDo(_EdgeTables(feature_dir.rstrip("/") + "/_edges"))
        groups = edges | "Edges" >> beam.combiners.ToList() | "Groups" >> beam.ParDo(_Groups(feature_dir.rstrip("/") + "/_copy_of", self.copy_of), beam.pvalue.AsList(info)).with_outputs(COPY_OF_FILE, COPY_OF_COUNT, main="copy_of")
        if self.copy_of:
            found["copy_of"] = groups.copy_of
        return {**found, COPY_OF_COUNT: groups[COPY_OF_COUNT], COPY_OF_FILE: groups[COPY_OF_FILE], "checks": checks, "images_read": featurized[IMAGES_READ]}


_OWN_FIELDS = ("image_id", "width", "height", "bytes_file", "bytes_row_group")  # what a copies row names of its own dress


def on_pages_with_copies(item, image_fields: tuple, link_fields: tuple, stage: str):
    """(kept image id, {"image": [packed records of the group's dresses], "links": [packed links of
    any of them]}) -> the kept dress on each of its pages and on each page of its copies.

    A link of the kept dress: the image on its page, as without copies. A link of another dress:
    rejected, as `near_duplicate` when the kept dress is on the same page, else as
    `copy_duplicate`, and the kept dress stands in for it on that page (once per page; the stand-in
    is the record a link of the kept dress on that page would be: its id is stable_id(page, kept
    URL), its alt text and position the removed link's). So a photo shown on several pages stays
    on every one of them, in one dress. Tagged outputs: `rejected`, `copies` (COPY_SCHEMA rows),
    `stand_ins` (the stand-ins' ids, counted as inputs).

    Everything is yielded as it is made, and the links stay packed: what is held for a group is
    its packed links, one small sort key each (page, position, link id), the kept dress's record
    and five fields of each other dress (`_OWN_FIELDS`: a group has up to thousands of dresses),
    not a dict per link and per record made. A photo copied on many pages makes a group whose
    links grow with the crawl (19,306 links of one kept dress in scale.py's 16x crawl, 714 at 1x):
    a dict per link and every record held until the group's end made the join the stage's peak
    (issue 34)."""
    import pickle

    from core.records import Rejected, stable_id
    from core.sites import site_of

    kept_id, grouped = item
    # of each dress, what its copies rows name (image_id, width, height, bytes_file,
    # bytes_row_group), not its whole record: a photo's group has up to thousands of dresses;
    # the kept dress's whole record is made once (`kept`)
    i_id = image_fields.index("image_id")
    at_own = [image_fields.index(name) if name in image_fields else None for name in _OWN_FIELDS]
    records: dict = {}
    kept = None
    for b in grouped["image"]:
        values = pickle.loads(b)
        if values[i_id] == kept_id:
            kept = dict(zip(image_fields, values))
        records[values[i_id]] = tuple(values[k] if k is not None else None for k in at_own)
    packed_links = grouped["links"]
    if not records:
        if packed_links:
            from core.stageio import StageError

            raise StageError(f"pair: image {kept_id} of the filter occurrences is missing from its images/")
        return
    if kept is None:  # cannot happen (the group's key is one of its records); keep the first id's record (its last copy, as records holds)
        first = next(iter(records))
        for values in map(pickle.loads, grouped["image"]):
            if values[i_id] == first:
                kept = dict(zip(image_fields, values))
    at = {name: k for k, name in enumerate(link_fields)}
    i_image, i_page, i_url, i_pos, i_link = at["image_id"], at["page_url"], at["image_url"], at["position"], at["link_id"]
    on_page: set = set()
    kept_url = None  # the kept dress's smallest link URL (one URL of the kept dress)
    order = []  # (page, position, link id, index) of each link: the order links are handled in
    for k, b in enumerate(packed_links):
        t = pickle.loads(b)
        if t[i_image] == kept["image_id"]:
            on_page.add(t[i_page])
            if kept_url is None or t[i_url] < kept_url:
                kept_url = t[i_url]
        order.append((t[i_page], t[i_pos] or 0, t[i_link], k))
    order.sort()
    if kept_url is None:
        kept_url = kept.get("image_url")
    sequence = [o[3] for o in order]
    del order  # its sort keys (a tuple and the strings of three fields a link) are not held while the records are made
    stood_in: set[str] = set()
    for k in sequence:
        link = dict(zip(link_fields, pickle.loads(packed_links[k])))
        own = records.get(link["image_id"])
        if own is None:
            continue
        own_id, own_width, own_height, own_file, own_group = own
        if own_id == kept["image_id"]:
            r = dict(kept)
            r.update(link_id=link["link_id"], page_url=link["page_url"], image_url=link["image_url"], alt=link["alt"] or "", position=link["position"] or 0)
            yield r
            continue
        page = link["page_url"]
        same_page = page in on_page
        stand_in = not same_page and page not in stood_in
        if same_page:
            reason, detail = NEAR_DUPLICATE, f"near-duplicate of {kept['image_id']} on this page (another dress of it, verified as a copy)"
        else:
            reason, detail = COPY_DUPLICATE, f"copy of {kept['image_id']} ({kept_url}), the kept dress; it stands in on this page"
        yield beam.pvalue.TaggedOutput("rejected", Rejected(link["link_id"], stage, reason, detail, link["image_url"]).to_row())
        yield beam.pvalue.TaggedOutput(COPIES, {
            "link_id": link["link_id"], "page_url": page, "site": site_of(page), "image_id": own_id, "image_url": link["image_url"],
            "width": own_width, "height": own_height, "bytes_file": own_file, "bytes_row_group": own_group,
            "kept_image_id": kept["image_id"], "kept_image_url": kept_url, "kept_width": kept.get("width"), "kept_height": kept.get("height"),
            "kept_bytes_file": kept.get("bytes_file"), "kept_bytes_row_group": kept.get("bytes_row_group"), "stand_in": stand_in,
        })
        if stand_in:
            stood_in.add(page)
            r = dict(kept)
            r.update(link_id=stable_id(page, kept_url), page_url=page, image_url=kept_url, alt=link["alt"] or "", position=link["position"] or 0)
            yield beam.pvalue.TaggedOutput(STAND_INS, r["link_id"])
            yield r


def records_on_several_pages(grouped, image_fields: tuple, link_fields: tuple) -> bool:
    """Whether the records `on_pages_with_copies` makes of one group stand on more than one page,
    known before any is made: they stand on the pages of the links of the group's dresses (a kept
    dress's own, or a stand-in on a copy's page)."""
    import pickle

    ids = {pickle.loads(b)[image_fields.index("image_id")] for b in grouped["image"]}
    i_image, i_page = link_fields.index("image_id"), link_fields.index("page_url")
    first = None
    for b in grouped["links"]:
        t = pickle.loads(b)
        if t[i_image] in ids:
            if first is None:
                first = t[i_page]
            elif t[i_page] != first:
                return True
    return False
