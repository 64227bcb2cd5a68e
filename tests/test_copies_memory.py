"""The copy step's candidate search holds memory bounded by its batches, not by the images
(issue 34: at 77,327 images the pHash index's batches of 20,000 queries held 347 MB, 4.7x their
memory at 4x fewer images, and find_candidates peaked at 444 MB; pair's peak grew 1.78x from 1x
to 16x). The answers stay the same: the same pHash pairs whatever the batches, the same candidates."""

import os
import tracemalloc

import numpy as np
import pytest

from core.config import PairConfig
from pairing.copies import find_candidates, mirror_phash, phash_neighbours

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clustered_hashes(n: int, cluster: int = 20, seed: int = 0) -> np.ndarray:
    """n 64-bit hashes in clusters of `cluster`, each a few bits from its cluster's base (photos'
    crops and re-encodings: many near hashes, so each query has many raw hits)."""
    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 2**63, size=n // cluster + 1, dtype=np.uint64)
    out = np.repeat(bases, cluster)[:n].copy()
    for bit_round in range(3):
        flip = np.uint64(1) << rng.integers(0, 64, size=n).astype(np.uint64)
        out ^= np.where(rng.random(n) < 0.7, flip, np.uint64(0))
    return out


def _sorted(triple):
    i, j, d = triple
    o = np.lexsort((d, j, i))
    return np.stack([i[o], j[o], d[o]])


def _brute_force(hashes: np.ndarray, max_distance: int) -> set:
    mask = np.uint64(int(mirror_phash("0" * 16), 16))
    out = set()
    for a in range(len(hashes)):
        d = np.minimum(np.bitwise_count(hashes[a] ^ hashes[a + 1 :]), np.bitwise_count((hashes[a] ^ mask) ^ hashes[a + 1 :]))
        out.update((a, a + 1 + int(k)) for k in np.flatnonzero(d <= max_distance))
    return out


def test_phash_pairs_are_the_same_in_batches_of_any_number_of_hits():
    hashes = _clustered_hashes(3000)
    whole = _sorted(phash_neighbours(hashes, 10, max_hits=1 << 40))  # one batch of every query (as before)
    for max_hits in (1, 97, 5000, 1 << 18):
        assert np.array_equal(_sorted(phash_neighbours(hashes, 10, max_hits=max_hits)), whole), max_hits
    found = {(int(i), int(j)) for i, j, d in whole.T if d <= 7}
    assert found == {p for p in _brute_force(hashes, 7)}  # every pair within 7 bits (mirror-aware) is found
    assert len(found) > 3000  # the clusters are close: many pairs


def test_phash_search_memory_is_bounded_by_the_hits_of_a_batch():
    """8,000 clustered hashes: batches of at most 2^14 raw hits peak at under half the memory of
    one batch of every query (what a batch of 20,000 queries was at this size; ~100 bytes a raw
    hit, 347 MB at the 16x scale input)."""
    hashes = _clustered_hashes(8000, seed=8)
    peaks = []
    for max_hits in (1 << 40, 1 << 14):
        tracemalloc.start()
        try:
            phash_neighbours(hashes, 10, max_hits=max_hits)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] <= 0.5 * peaks[0], peaks


def test_candidates_of_clustered_images_are_bounded_and_symmetric():
    """find_candidates (the merge, the caps, the degree loop in slices) on 3,000 images in clusters:
    every pair once, id_a < id_b, no image in more than 2 x copy_max_candidates pairs, the pHash-only
    pairs with their distance and no cosine, the same list from the ids in another order."""
    rng = np.random.default_rng(3)
    n = 3000
    hashes = _clustered_hashes(n, seed=3)
    emb = np.repeat(rng.normal(size=(n // 20 + 1, 32)), 20, axis=0)[:n] + rng.normal(scale=0.05, size=(n, 32))
    ids = [f"img{i:05d}" for i in range(n)]
    cfg = PairConfig(copy_max_candidates=4)
    cands = find_candidates(ids, emb, [f"{int(h):016x}" for h in hashes], cfg)
    assert cands == sorted(cands) and len({(a, b) for a, b, _, _ in cands}) == len(cands)
    degree: dict = {}
    for a, b, cos, dist in cands:
        assert a < b and (cos >= cfg.copy_min_cosine or (np.isnan(cos) and 0 <= dist <= cfg.copy_phash_distance))
        degree[a] = degree.get(a, 0) + 1
        degree[b] = degree.get(b, 0) + 1
    assert max(degree.values()) <= 8 and len(degree) > 0.9 * n
    # the same images named in reverse order: the same pairs (the merge does not depend on the order)
    rev = find_candidates(ids[::-1], emb[::-1], [f"{int(h):016x}" for h in hashes[::-1]], cfg)
    assert {(a, b) for a, b, _, _ in rev} == {(a, b) for a, b, _, _ in cands}


def _random_groups(seed: int, n: int = 3000, edges: int = 2600):
    """Random verified pairs over n ids (chains, stars, a few large components, repeated and
    reversed pairs) and keep signals with ties: equal contents, contents within 5 % of the largest,
    equal qualities and bytes per pixel, members without signals."""
    import random

    rng = random.Random(seed)
    ids = [f"{rng.getrandbits(64):016x}" for _ in range(n)]
    pairs = []
    for _ in range(edges):
        a, b = rng.sample(ids[: n // 2], 2) if rng.random() < 0.6 else rng.sample(ids, 2)
        pairs.append((a, b))
    pairs += [(b, a) for a, b in rng.sample(pairs, 200)] + rng.sample(pairs, 100)
    info = {}
    for x in ids:
        if rng.random() < 0.05:
            continue  # no signals: keep_order's zeros
        info[x] = {"content": rng.choice([10_000, 10_000, 9_600, 9_500, 9_499, 12_000, 400]), "quality": rng.choice([75, 90, 90, 100]), "bytes_per_pixel": rng.choice([0.5, 0.25, 0.25, 1 / 3])}
    return pairs, info


def _tables(pairs, info, chunks: int):
    import pyarrow as pa

    edge_tables = [pa.table({"image_a": [a for a, _ in pairs[k::chunks]], "image_b": [b for _, b in pairs[k::chunks]]}) for k in range(chunks)]
    rows = sorted(info.items())
    info_tables = [
        pa.table({"image_id": pa.array([x for x, _ in rows[k::chunks]], pa.string()), "content": pa.array([r["content"] for _, r in rows[k::chunks]], pa.int64()),
                  "quality": pa.array([r["quality"] for _, r in rows[k::chunks]], pa.int64()), "bytes_per_pixel": pa.array([r["bytes_per_pixel"] for _, r in rows[k::chunks]], pa.float64())})
        for k in range(chunks)
    ]
    return edge_tables, info_tables


def test_groups_on_columns_are_copy_groups():
    """group_members (the pipeline's groups step: components and choices on columns) gives
    copy_groups' (member, kept) for every member, on random graphs with ties, in any chunking."""
    from pairing.copies import copy_groups, group_members

    for seed in range(4):
        pairs, info = _random_groups(seed)
        expected = sorted(copy_groups(pairs, info).items())
        assert len(expected) > 1000
        for chunks in (1, 7):
            assert group_members(*_tables(pairs, info, chunks)) == expected
    assert group_members([], []) == [] and group_members(*_tables([], {}, 1)) == []


def test_groups_hold_numbers_not_a_tuple_per_pair():
    """The groups step's memory: copy_groups over Python tuples and a dict of members (what the
    pipeline collected: a ToList of pairs, an AsDict of the members' signals) held ~3.6x what
    group_members holds over the same pairs as tables (both with their 27,611 (member, kept)
    answers: ~5 MB). Traced: Python objects and numpy arrays (pyarrow's buffers are not: here the
    distinct ids, ~1 MB)."""
    from pairing.copies import copy_groups, group_members

    pairs, info = _random_groups(9, n=40_000, edges=36_000)
    edge_tables, info_tables = _tables(pairs, info, 4)
    group_members(*_tables(pairs[:50], info, 1))  # the imports before anything is traced
    peaks = []
    for run in ("columns", "tuples"):
        tracemalloc.start()
        try:
            if run == "columns":
                group_members(edge_tables, info_tables)
            else:  # what the step received before: the pairs and signals as Python objects
                got = [(a, b) for t in edge_tables for a, b in zip(t.column(0).to_pylist(), t.column(1).to_pylist())]
                signals = {x: {"content": c, "quality": q, "bytes_per_pixel": r} for t in info_tables for x, c, q, r in zip(*(t.column(k).to_pylist() for k in range(4)))}
                sorted(copy_groups(got, signals).items())
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[0] * 2.5 < peaks[1], peaks


def test_the_groups_step_writes_its_answers_without_a_python_object_a_member(tmp_path):
    """The pipeline's groups step (`_Groups`) on 27,611 answers: the copy_of file it writes holds
    copy_groups' (member, kept) for every member, row by row (read with pyarrow), and its count is
    theirs. It makes no Python object a member: its traced peak is below what the answers take as
    (member, kept) tuples of str (group_members' list). Before, it built that list and two more
    lists from it to make the table (65,363 answers at one Common Crawl file: +27 MB in its
    worker, which kept that high-water mark to the end; issue 34)."""
    import pyarrow as pa

    from pairing.copies import COPY_OF_COUNT, COPY_OF_FILE, EDGE_SCHEMA, _Groups, copy_groups, group_members

    pairs, info = _random_groups(9, n=40_000, edges=36_000)
    edge_tables, info_tables = _tables(pairs, info, 4)
    paths = []
    for i, t in enumerate(edge_tables):
        paths.append(str(tmp_path / f"edges{i}.arrow"))
        with pa.OSFile(paths[-1], "wb") as fh, pa.ipc.new_file(fh, EDGE_SCHEMA) as writer:
            writer.write_table(t.cast(EDGE_SCHEMA))
    group_members(*_tables(pairs[:50], info, 1))  # the imports before anything is traced
    peaks, outs = {}, None
    for run in ("step", "tuples"):
        tracemalloc.start()
        try:
            if run == "step":
                outs = list(_Groups(str(tmp_path / "copy_of")).process(paths, info_tables))
            else:
                answers = group_members(edge_tables, info_tables)
            peaks[run] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    expected = sorted(copy_groups(pairs, info).items())
    assert answers == expected and len(expected) == 27_611
    got = {o.tag: o.value for o in outs}
    assert set(got) == {COPY_OF_FILE, COPY_OF_COUNT} and got[COPY_OF_COUNT] == len(expected)
    table = pa.ipc.open_file(got[COPY_OF_FILE]).read_all()
    assert list(zip(table.column("member").to_pylist(), table.column("kept").to_pylist())) == expected
    assert peaks["step"] < 0.8 * peaks["tuples"], peaks


def test_the_candidate_search_lets_the_embeddings_go_before_the_phash_search_and_the_merge():
    """`_candidates` (the pipeline's search over LightRows) on 6,000 images, once with 64-d and once
    with 512-d embeddings (a real CLIP's width): its traced peak is the same, since the float16 and
    float32 matrices are freed once faiss is done, before the pHash search and the merge of the raw
    pairs. Before, the float32 matrix was held to the end: the 512-d peak was higher by exactly its
    extra 448 floats an image (6,139 against 4,348 bytes an image; issue 34, 16x: 354 -> 297 MB)."""
    import pairing.copies as pc

    n = 6000
    hashes = [f"{int(h):016x}" for h in _clustered_hashes(n, seed=5)]
    ids = [f"img{i:05d}" for i in range(n)]
    peaks, found, lights = {}, {}, []
    for d in (64, 512):
        rng = np.random.default_rng(5)
        emb = (np.repeat(rng.normal(size=(n // 20 + 1, d)), 20, axis=0)[:n] + rng.normal(scale=0.05, size=(n, d))).astype(np.float16)
        light = pc.LightRows(list(ids), list(hashes), [("f", 0)] * n, emb, np.ones(n, bool))
        del emb
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            found[d] = pc._candidates(light, PairConfig())
            peaks[d] = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        lights.append(light)
    assert len(found[64]) > n and len(found[512]) > n  # clusters: many candidates
    extra_float32 = (512 - 64) * 4 * n
    assert peaks[512] - peaks[64] < 0.25 * extra_float32, (peaks, extra_float32)
    assert all(light.emb is None for light in lights)  # the LightRows' matrices were let go too


def test_verification_keeps_each_features_index_as_arrays(tmp_path):
    """The indexes `_VerifyBlock` keeps for its next blocks (one per features file, i.e. per row
    group of filter's images: all of them at one Common Crawl file) are `GroupIndex` arrays, ~32
    bytes an image, not dicts of strings and tuples (~200: ~17 MB held by each worker to the end
    of the pipeline at 77,327 candidates; issue 34). Every id reads back its own features through
    the kept index, and an id not in the file is a KeyError."""
    from pairing.copies import GroupIndex, load_group_features, read_group_index, write_group_features

    rng = np.random.default_rng(1)
    ids = [f"{int(x):016x}" for x in rng.integers(0, 2**63, 2997)] + ["é-日本", "\x7f", "z" * 40]  # (and ids not hex, of other lengths)

    def feats(k: int):
        if k % 9 == 4:
            return None  # did not decode: length 0
        n = 1 + k % 17
        return {"pts": np.full((n, 2), k, np.float32), "desc": np.full((n, 128), k % 251, np.uint8), "w": 64, "h": 48, "content": k, "quality": 90, "bytes_per_pixel": 0.5}

    path = str(tmp_path / "group.feats")
    write_group_features(path, ((x, feats(k)) for k, x in enumerate(ids)))
    cache: dict = {}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        got = load_group_features(path, ids[:10], cache)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert isinstance(cache[path], GroupIndex) and len(cache[path]) == len(ids)
    assert held < 64 * len(ids) + 200_000, held  # the index kept, and the 10 images' features read
    with open(path, "rb") as fh:
        as_dict = read_group_index(fh)
    assert all(cache[path][x] == as_dict[x] for x in ids)  # every id: its offset and length
    got.update(load_group_features(path, ids, cache))  # every id, through the kept index
    for k, x in enumerate(ids):
        want = feats(k)
        assert (got[x] is None) if want is None else (got[x]["content"] == k and got[x]["pts"].shape == want["pts"].shape and int(got[x]["desc"][0, 0]) == k % 251)
    for missing in ("0" * 16, ids[0] + "x", ids[0][:-1], "", "é", ids[0] + "\0"):
        with pytest.raises(KeyError):
            cache[path][missing]
    # ids that numpy's bytes cannot hold as they are (a NUL inside): the index stays a dict, found
    odd = [f"a\0{k}" for k in range(5)] + ["b\0"]
    path2 = str(tmp_path / "odd.feats")
    write_group_features(path2, ((x, feats(k)) for k, x in enumerate(odd)))
    assert set(load_group_features(path2, odd, cache)) == set(odd) and isinstance(cache[path2], dict)


def test_the_groups_find_the_ids_of_the_pairs_in_one_pass():
    """group_member_table's Arrow buffers at their peak are less than twice the pairs' own columns
    (here 150,300 pairs in 8 tables), and it gives copy_groups' answers. It dictionary-encodes the
    tables' id columns in one pass (one hash table, an int32 a pair end). Before, it concatenated
    the two columns into a third, took their unique ids, then looked each column up again: ~3.5x
    the columns (at one Common Crawl file's 212,551 pairs, +50 MB in its worker, the highest point
    of pair on Dask; issue 34), and without importing scipy (its connected components cost that
    worker ~17 MB of imports: `connected_components` on arrays). Measured in a fresh interpreter: the peak of Arrow's system pool
    (what a Dask worker uses) less what was allocated before the call; numpy's by tracemalloc."""
    import json
    import subprocess
    import sys

    code = f"""
import json, sys, tracemalloc
sys.path[:0] = {[ROOT, os.path.dirname(__file__)]!r}
import pyarrow as pa
pa.set_memory_pool(pa.system_memory_pool())
from test_copies_memory import _random_groups, _tables
from pairing.copies import copy_groups, group_member_table, group_members
pairs, info = _random_groups(11, n=30_000, edges=150_000)
edge_tables, info_tables = _tables(pairs, info, 8)
group_members(*_tables(pairs[:50], info, 1))
pool = pa.default_memory_pool()
held, before = pool.bytes_allocated(), pool.max_memory()
tracemalloc.start()
table = group_member_table(edge_tables, info_tables)
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
right = list(zip(table.column("member").to_pylist(), table.column("kept").to_pylist())) == sorted(copy_groups(pairs, info).items())
print(json.dumps(dict(right=right, scipy=any(m.split(".")[0] == "scipy" for m in sys.modules), before=before, arrow=pool.max_memory() - held, traced=traced, columns=sum(t.nbytes for t in edge_tables))))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["right"], got
    assert not got["scipy"], "the groups imported scipy (~17 MB in the worker that runs them)"
    assert got["arrow"] > got["before"] - got["columns"]  # the call's peak is the pool's highest (what came before was lower)
    assert got["arrow"] < 2.0 * got["columns"], got
    assert got["arrow"] + got["traced"] < 3.0 * got["columns"], got


def test_connected_components_on_arrays_are_union_find_components():
    """pairing/copies.py `connected_components` labels each node with the smallest node of its
    component, as a union-find over the same edges gives them: random graphs from sparse to dense,
    a long path whose nodes are shuffled (many hooks in a chain), isolated nodes, no edges."""
    from pairing.copies import connected_components

    def union_find(a, b, n):
        parent = list(range(n))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
        return np.array([find(x) for x in range(n)])

    rng = np.random.default_rng(3)
    cases = [(rng.integers(0, n, e), rng.integers(0, n, e), n) for n, e in ((1, 0), (10, 4), (2000, 500), (2000, 1900), (2000, 8000), (30000, 60000))]
    order = rng.permutation(20000)
    cases.append((order[:-1], order[1:], 20000))  # a path through every node in a random order
    for a, b, n in cases:
        got = connected_components(a, b, n)
        assert np.array_equal(got, union_find(a, b, n)), n


def test_verification_reads_each_features_index_once_past_64_row_groups(tmp_path, monkeypatch):
    """`_VerifyBlock` keeps the features indexes it read, bounded by the ids they hold, not by 64
    files. At one Common Crawl file a block of 128 pairs names ~77 of 185 row groups: with 64
    indexes kept (an LRU) the blocks reread 273,836 indexes, 0.5 ms each, none at a quarter of the
    size, and pair's CPU time grew as size^1.12 from 4x to 16x (issue 34). Here 100 row groups of 4
    images, row group g showing picture g % 10, and 400 pairs in 4 blocks that each name most row
    groups: each index is read once (the LRU of 64 read 144), and each pair is judged on its own
    two images (a copy exactly when both show the same picture)."""
    import io as _io

    from PIL import Image

    import pairing.copies as pc

    rng = np.random.default_rng(5)
    pictures = []
    for _ in range(10):
        buf = _io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
        pictures.append(pc.image_features(buf.getvalue(), mirror=False))
    assert all(f is not None for f in pictures)
    feature_dir = str(tmp_path / "features")
    where = {}
    for g in range(100):
        pointer = ("/data/images/part-0.parquet", g)
        ids = [f"{g:03d}-{k}" for k in range(4)]
        where.update((x, pointer) for x in ids)
        path = pc.group_feature_path(feature_dir, pointer)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pc.write_group_features(path, ((x, pictures[g % 10]) for x in ids))
    pairs = []
    for k in range(400):  # the first 200 pairs show one picture twice, the others two pictures
        ga, round_ = k % 100, k // 100
        gb = (ga + 10 * (1 + round_)) % 100 if k < 200 else (ga + 10 * round_ + 1) % 100
        pairs.append((f"{ga:03d}-{round_}", f"{gb:03d}-{(round_ + 1) % 4}", 0.9, -1))
    pairs.sort()
    assert len(set(pairs)) == 400
    refs = pc._blocks(pairs, where, feature_dir)
    assert len(refs) == 4

    reads = []
    real = pc.read_group_index
    monkeypatch.setattr(pc, "read_group_index", lambda fh: reads.append(fh.name) or real(fh))
    step = pc._VerifyBlock(PairConfig(), feature_dir)
    step.setup()
    rows = [row for k, ref in refs for row in step.process((k, [ref]), 4 * 100)]
    assert len(reads) == len(set(reads)) == 100  # each index once
    assert sorted((r["image_a"], r["image_b"]) for r in rows) == [(a, b) for a, b, _, _ in pairs]
    for r in rows:
        same = int(r["image_a"][:3]) % 10 == int(r["image_b"][:3]) % 10
        assert r["copy"] == same and (r["inliers"] > 0) == same, r
    assert sum(r["copy"] for r in rows) == 200
    assert step.ids_kept == sum(len(x) for x in step.indexes.values()) == 400

    # bounded: with room for 10 ids, at most two indexes of 4 ids stay (and never fewer than one)
    monkeypatch.setattr(pc._VerifyBlock, "_INDEX_IDS_KEPT", 10)
    small = pc._VerifyBlock(PairConfig(), feature_dir)
    small.setup()
    again = [row for k, ref in refs for row in small.process((k, [ref]), 4 * 100)]
    assert sorted(map(str, again)) == sorted(map(str, rows))
    assert 1 <= len(small.indexes) <= 2 and small.ids_kept == sum(len(x) for x in small.indexes.values()) <= 10

    # a block naming an id its features file lacks fails, and the index it read stays counted
    fresh = pc._VerifyBlock(PairConfig(), feature_dir)
    fresh.setup()
    bad = pc._blocks([("000-9", "010-0", 0.9, -1)], {"000-9": where["000-0"], "010-0": where["010-0"]}, str(tmp_path / "bad"))
    with pytest.raises(KeyError):
        list(fresh.process((bad[0][0], [bad[0][1]]), 4 * 100))
    assert fresh.ids_kept == sum(len(x) for x in fresh.indexes.values()) > 0
