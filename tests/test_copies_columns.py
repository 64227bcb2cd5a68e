"""The copy step's cheaper reads and SIFT (issue 34, fourth sitting): the candidate search reads
filter's images column by column (pairing/copies.py LightRows) and finds exactly the candidates,
row groups and pointers that the rows read one by one give; SIFT reused per thread with uint8
descriptors on one OpenCV thread gives the features of a fresh float SIFT rounded as before."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from core.config import PairConfig
from pairing.copies import VERIFY_BLOCK, _candidates_and_reads, _search, find_candidates, image_features, one_opencv_thread, read_block


def _write_images(tmp_path, rows: list[dict], embedding_type) -> list[str]:
    """Two filter-like images files of 7-row row groups (image_id, embedding, phash, image_bytes)."""
    schema = pa.schema([("image_id", pa.string()), ("embedding", embedding_type), ("phash", pa.string()), ("image_bytes", pa.binary())])
    files = []
    for part, chunk in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2 :])):
        path = str(tmp_path / f"images-{part}.parquet")
        pq.write_table(pa.Table.from_pylist(chunk, schema), path, row_group_size=7)
        files.append(path)
    return files


def _by_hand(files: list[str], cfg) -> tuple[list, dict]:
    """The candidates and pointers from the rows as pyarrow gives them one by one (to_pylist per
    row group), each embedding made float16 as filter stores it: what the step collected before."""
    rows = []
    for path in files:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for r in pf.read_row_group(rg, columns=["image_id", "embedding", "phash"]).to_pylist():
                e = None if r["embedding"] is None else np.asarray(r["embedding"], dtype=np.float16)
                rows.append((r["image_id"], e, r["phash"], (path, rg)))
    rows.sort(key=lambda r: r[0])
    ids = [r[0] for r in rows]
    embedded = [i for i, r in enumerate(rows) if r[1] is not None and len(r[1])]
    if len(embedded) == len(rows):
        cands = find_candidates(ids, np.stack([r[1].astype(np.float32) for r in rows]), [r[2] for r in rows], cfg)
    else:
        sub = find_candidates([ids[i] for i in embedded], np.stack([rows[i][1].astype(np.float32) for i in embedded]), [None] * len(embedded), cfg)
        seen = {(x[0], x[1]): x for x in find_candidates(ids, None, [r[2] for r in rows], cfg)}
        seen.update({(x[0], x[1]): x for x in sub})
        cands = sorted(seen.values())
    return cands, {r[0]: r[3] for r in rows}


def _rows(n: int, seed: int, missing: bool) -> list[dict]:
    """n images in topics of 5 (close embeddings) with pHashes near each other's in each topic;
    with `missing`, some rows have no embedding (null or empty) and some no pHash."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 5 + 1, 32))
    rows = []
    for i in range(n):
        e = centres[i // 5] + rng.normal(scale=0.5, size=32)
        h = int(rng.integers(0, 2**63)) if i % 5 == 0 else rows[i - i % 5]["_h"] ^ (1 << int(rng.integers(0, 64)))
        row = {"image_id": f"{rng.integers(0, 2**40):010x}", "embedding": (e / np.linalg.norm(e)).tolist(), "phash": f"{h:016x}", "image_bytes": b"x", "_h": h}
        if missing and i % 7 == 3:
            row["embedding"] = None if i % 2 else []
        if missing and i % 11 == 5:
            row["phash"] = None
        rows.append(row)
    random.Random(seed).shuffle(rows)
    return [{k: v for k, v in r.items() if k != "_h"} for r in rows]


def test_column_reads_find_the_same_candidates_and_pointers(tmp_path):
    """Every candidate pair (ids, cosine, pHash distance), every (file, row group) the featurising
    reads and every candidate's pointer equal those of the rows read one by one, for float16 and
    float32 embedding columns, with images that have no embedding (null, empty) or no pHash, and
    whatever order the files come in. The old step took rows, not files."""
    cfg = PairConfig(copy_min_cosine=0.3)
    for k, (etype, missing) in enumerate(((pa.list_(pa.float16()), False), (pa.list_(pa.float32()), True), (pa.list_(pa.float16()), True))):
        d = tmp_path / f"case{k}"
        d.mkdir()
        files = _write_images(d, _rows(150, k, missing), etype)
        want, where_want = _by_hand(files, cfg)
        assert len(want) > 50
        for order in (files, files[::-1]):
            cands, reads, where = _candidates_and_reads(order, cfg)
            assert [(a, b, d_) for a, b, _, d_ in cands] == [(a, b, d_) for a, b, _, d_ in want]
            assert np.array_equal(np.array([c[2] for c in cands]), np.array([c[2] for c in want]), equal_nan=True)
            named = {x for a, b, _, _ in want for x in (a, b)}
            assert where == {x: where_want[x] for x in named}
            assert [(p, sorted(ids)) for p, ids in reads] == sorted({p: sorted(x for x in named if where_want[x] == p) for p in {where_want[x] for x in named}}.items())


def test_the_search_step_writes_every_pair_to_its_blocks_and_keeps_none(tmp_path):
    """The copy step's search element (`_search`) holds the count, the row groups to read and the
    blocks' references, not the pairs (they waited in the worker as its output, ~25 MB at 77,327
    images; issue 34): the blocks read back (`read_block`), in order, are every candidate pair of
    `_candidates_and_reads` with both images' pointers, in blocks of VERIFY_BLOCK."""
    cfg = PairConfig(copy_min_cosine=0.3)
    files = _write_images(tmp_path, _rows(400, 7, True), pa.list_(pa.float16()))
    cands, reads, where = _candidates_and_reads(files, cfg)
    assert len(cands) > VERIFY_BLOCK  # several blocks
    for keep in (False, True):
        feature_dir = tmp_path / f"features-{keep}"
        count, step_reads, refs, kept = _search(files, cfg, str(feature_dir), keep)
        assert count == len(cands) and step_reads == reads
        assert (kept is None) if not keep else (kept == cands)  # (CandidateList: nan cosines equal)
        assert [k for k, _ in refs] == list(range(len(refs))) and len(refs) == -(-len(cands) // VERIFY_BLOCK)
        back = [row for _, ref in refs for row in read_block(ref)]
        assert len(back) == len(cands)
        for (a, b, cos, dist, wa, wb), want in zip(back, cands):
            assert (a, b, dist) == (want[0], want[1], want[3]) and (cos == want[2] or (np.isnan(cos) and np.isnan(want[2])))
            assert (wa, wb) == (where[a], where[b])
    assert _search([], cfg, str(tmp_path / "none")) == (0, [], [], None)


def test_column_reads_of_no_images_and_of_one(tmp_path):
    files = _write_images(tmp_path, _rows(2, 0, False)[:1], pa.list_(pa.float16()))  # an empty file and a file of one image
    assert _candidates_and_reads(files, PairConfig()) == ([], [], {})
    assert _candidates_and_reads([], PairConfig()) == ([], [], {})


def _old_features(data: bytes, max_side: int = 320, max_keypoints: int = 300) -> dict:
    """image_features as main computed it before: a fresh float SIFT per image, its descriptors
    rounded and clipped to uint8, OpenCV's default threads."""
    import cv2

    from pairing.copies import jpeg_quality, trim_borders

    img = Image.open(io.BytesIO(data))
    quality = jpeg_quality(img) if img.format == "JPEG" else 100
    ImageOps.exif_transpose(img, in_place=True)
    grey = np.asarray(img.convert("L"))
    top, bottom, left, right = trim_borders(grey)
    content = grey[top:bottom, left:right]
    ch, cw = content.shape
    scale = min(1.0, max_side / max(ch, cw))
    if scale < 1.0:
        content = cv2.resize(content, (max(8, round(cw * scale)), max(8, round(ch * scale))), interpolation=cv2.INTER_AREA)
    kps, desc = cv2.SIFT_create(nfeatures=max_keypoints).detectAndCompute(content, None)
    if desc is None or not kps:
        return {"pts": np.zeros((0, 2), np.float32), "desc": np.zeros((0, 128), np.uint8), "quality": quality}
    return {"pts": np.array([k.pt for k in kps], dtype=np.float32), "desc": np.clip(np.rint(desc), 0, 255).astype(np.uint8), "quality": quality}


def test_reused_uint8_sift_on_one_thread_gives_the_old_features(photos_dir):
    """Keypoints and descriptors (bit for bit, uint8) of 24 shared photos and their dresses
    (mirrored crop, 3/4 resize, black frame, 64-px thumbnail, PNG with alpha) equal a fresh float
    SIFT's rounded as before, on OpenCV's default threads and on one."""
    names = sorted(os.listdir(photos_dir))[200:224]
    datas = []
    for name in names:
        im = Image.open(os.path.join(photos_dir, name)).convert("RGB")
        w, h = im.size
        for v in (im, ImageOps.mirror(im.crop((w // 10, h // 10, w - w // 10, h - h // 10))), im.resize((w * 3 // 4, h * 3 // 4)), ImageOps.expand(im, border=24, fill=0), im.resize((64, 48))):
            buf = io.BytesIO()
            v.save(buf, "JPEG", quality=70)
            datas.append(buf.getvalue())
        buf = io.BytesIO()
        im.convert("RGBA").save(buf, "PNG")
        datas.append(buf.getvalue())
    threaded = [image_features(d, mirror=False) for d in datas]
    with one_opencv_thread():
        single = [image_features(d, mirror=False) for d in datas]
    for d, a, b in zip(datas, threaded, single):
        old = _old_features(d)
        assert len(old["pts"]) > 0
        for f in (a, b):
            assert f["desc"].dtype == np.uint8 and f["pts"].dtype == np.float32
            assert np.array_equal(f["pts"], old["pts"]) and np.array_equal(f["desc"], old["desc"]) and f["quality"] == old["quality"]


def test_an_embedding_column_of_the_null_type_leaves_the_phash_candidates(tmp_path):
    # a table made with every embedding None stores the column as pyarrow's null type: its images
    # have no embedding, and their pHashes still make candidates (as before the column reads)
    path = str(tmp_path / "nulltype.parquet")
    pq.write_table(pa.Table.from_pylist([{"image_id": f"{i:04x}", "embedding": None, "phash": "0000000000000000", "image_bytes": b"x"} for i in range(3)]), path)
    assert pq.read_schema(path).field("embedding").type == pa.null()
    pairs = _candidates_and_reads([path], PairConfig())[0]
    assert sorted(tuple(sorted(p[:2])) for p in pairs) == [("0000", "0001"), ("0000", "0002"), ("0001", "0002")]


def test_overlapping_blocks_keep_opencv_on_one_thread_until_the_last_leaves():
    import threading

    import cv2

    before = cv2.getNumThreads()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    inside_b_after_a: list = []

    def first():
        with one_opencv_thread():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with one_opencv_thread():
            b_in.set()
            a_out.wait(10)
            inside_b_after_a.append(cv2.getNumThreads())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inside_b_after_a == [1] and cv2.getNumThreads() == before
