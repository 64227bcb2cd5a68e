"""Regression tests for the five read-back defects of issue 30, each on a small hand-made run:

1. the shard index's byte range of every row holds exactly that sample's members (writer and the
   generated browse run);
2. pair's pointers to image bytes are absolute: `shards` works from any working directory;
3. a WARC-Target-URI that ends in `>` keeps it (only one `<...>` wrapper is removed);
4. `max_shard_bytes` bounds every tar file's size, whatever the limit;
5. shards written without embeddings train: the loader computes the condition with the manifest's
   encoder.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.config import PairConfig, ShardConfig
from core.stageio import finish_stage, read_stats, read_table

MIB = 1024 * 1024
# pages of the hand-made filter stage: images per page and their sides (noise JPEGs: ~3 bytes/pixel)
PAGES = [(5, 100 + 9 * k) for k in range(6)] + [(4, 150), (4, 220), (3, 260), (2, 850)]  # the last page's images are ~0.85 MB each


def _noise_jpeg(rng, side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _filter_stage(root: str, encoder: str = "tiny-clip", dim: int = 64) -> None:
    """A filter output made by hand: PAGES of noise JPEGs with random far-apart pHashes and
    embeddings whose cosines fall inside the pair band."""
    from core.records import IMAGE_SCHEMA, OCCURRENCE_SCHEMA, occurrence_of, rows_to_table

    rng = np.random.default_rng(30)
    rows = []
    for p, (n, side) in enumerate(PAGES):
        base = rng.normal(size=dim)
        for i in range(n):
            data = _noise_jpeg(rng, side + 7 * i)
            e = base + rng.normal(size=dim) * 0.8
            e /= np.linalg.norm(e)
            image_id = f"{p:02x}{i:02x}" + "0" * 12
            rows.append({"image_id": image_id, "page_url": f"http://site{p}.test/page?id={p}", "image_url": f"http://site{p}.test/img/{i}.jpg", "alt": f"image {i} of page {p}", "position": i,
                         "width": side + 7 * i, "height": side + 7 * i, "format": "JPEG", "sha256": image_id * 4, "phash": f"{int(rng.integers(0, 2**63)):016x}",
                         "embedding": e.astype(np.float32).tolist(), "encoder": encoder, "clip_score": None, "image_bytes": data})
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "occurrences"))
    pq.write_table(rows_to_table(rows, IMAGE_SCHEMA), os.path.join(root, "images", "part-0.parquet"), row_group_size=4)
    pq.write_table(rows_to_table([occurrence_of(r) for r in rows], OCCURRENCE_SCHEMA), os.path.join(root, "occurrences", "part-0.parquet"))
    with open(os.path.join(root, "stats.json"), "w") as fh:
        json.dump({"stage": "filter", "input": len(rows), "kept": len(rows), "rejected": {}}, fh)
    finish_stage(root, "filter")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """filter (by hand) -> pair, the pair stage started from the run's folder with relative paths."""
    from pairing.pipeline import run_pair

    root = tmp_path_factory.mktemp("defects") / "run"
    os.makedirs(root)
    _filter_stage(str(root / "filter"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        stats = run_pair("filter", "pair", PairConfig(sim_low=0.0, sim_high=0.999))
    finally:
        os.chdir(cwd)
    assert stats["pairs"] > 30
    return str(root)


def _sample_bytes(pair_dir: str, store_embedding: bool = True) -> dict:
    """key -> the tar-file size a shard holding only that sample would have, from the pair and
    filter stages' bytes (what the writer is expected to put in a tar: 512-byte headers, data
    padded to 512, two end blocks, a whole 10 KiB record)."""
    from core import sample_layout as layout

    pairs = read_table(pair_dir, "pairs").to_pylist()
    images = {r["image_id"]: r["image_bytes"] for f in glob.glob(os.path.join(os.path.dirname(pair_dir), "filter", "images", "*.parquet")) for r in pq.read_table(f, columns=["image_id", "image_bytes"]).to_pylist()}
    out = {}
    for p in pairs:
        meta = json.dumps({k: p[k] for k in layout.META_FIELDS}, sort_keys=True).encode()
        sizes = [len(images[p["cond_image_id"]]), len(images[p["target_image_id"]]), len(meta)] + ([len(layout.npy_bytes(np.zeros(64)))] if store_embedding else [])
        content = sum(512 + -(-s // 512) * 512 for s in sizes)
        out[p["pair_id"]] = -(-(content + 1024) // 10240) * 10240
    return out


def _check_index(shards_dir: str) -> int:
    """Every index row's byte range is exactly its key's members, in the order the tar has them."""
    index = read_table(shards_dir, "index").to_pylist()
    members: dict = {}
    for t in sorted(glob.glob(os.path.join(shards_dir, "*.tar"))):
        with tarfile.open(t) as tar:
            for m in tar:
                key = m.name.split(".", 1)[0]
                members.setdefault(key, []).append((os.path.basename(t), m.offset, m.offset_data + -(-m.size // 512) * 512, m.name, tar.extractfile(m).read()))
    assert sorted(r["key"] for r in index) == sorted(members)
    for row in index:
        mine = members[row["key"]]
        assert {m[0] for m in mine} == {row["shard"]}
        assert row["offset"] == mine[0][1] and row["size"] == mine[-1][2] - mine[0][1], row
        with open(os.path.join(shards_dir, row["shard"]), "rb") as fh:
            fh.seek(row["offset"])
            chunk = fh.read(row["size"])
        with tarfile.open(fileobj=io.BytesIO(chunk + b"\0" * 1024)) as tar:
            got = [(m.name, tar.extractfile(m).read()) for m in tar]
        assert got == [(m[3], m[4]) for m in mine]
    return len(index)


# ---- 1. the index -------------------------------------------------------------------------------


def test_every_index_row_holds_its_own_sample(small_run, tmp_path):
    from shards.writer import run_shards

    stats = run_shards(os.path.join(small_run, "pair"), str(tmp_path / "shards"), ShardConfig(samples_per_shard=7))
    assert len(glob.glob(str(tmp_path / "shards" / "*.tar"))) >= 4
    assert _check_index(str(tmp_path / "shards")) == stats["kept"] == stats["input"]


def test_generated_browse_run_index_points_at_each_sample(tmp_path):
    from webpairs.synthetic import SHARD, make_run

    make_run(str(tmp_path / "run"), pairs=40, sites=2, pages_per_site=3, distinct_samples=8)
    index = read_table(str(tmp_path / "run" / "shards"), "index").to_pylist()
    with tarfile.open(tmp_path / "run" / "shards" / SHARD) as tar:
        names = [(m.name, m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tar]
    for i, row in enumerate(index):
        k = i % 8
        mine = [n for n in names if n[0].startswith(f"sample{k:06d}.")]
        assert len(mine) == 3 and row["offset"] == mine[0][1] and row["size"] == mine[-1][2] - mine[0][1], (i, row)


# ---- 2. pointers from any directory --------------------------------------------------------------


def test_shards_run_from_another_directory_finds_the_images(small_run, tmp_path, monkeypatch):
    from shards.writer import run_shards

    pairs = read_table(os.path.join(small_run, "pair"), "pairs").to_pylist()
    for p in pairs:  # the pair stage was started with relative paths, its pointers are absolute
        for side in ("cond", "target"):
            assert os.path.isabs(p[f"{side}_bytes_file"]) and os.path.exists(p[f"{side}_bytes_file"])
    images = read_table(os.path.join(small_run, "pair"), "images", ["bytes_file"]).column(0).to_pylist()
    assert all(os.path.isabs(f) and os.path.exists(f) for f in images)
    elsewhere = tmp_path / "elsewhere"
    os.makedirs(elsewhere)
    monkeypatch.chdir(elsewhere)
    stats = run_shards(os.path.join(small_run, "pair"), "shards", ShardConfig())
    assert stats["kept"] == stats["input"] == len(pairs) and stats["rejected"] == {}
    assert _check_index(str(elsewhere / "shards")) == len(pairs)


# ---- 3. WARC-Target-URI ------------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    ("http://a.test/s?q=<b>", "http://a.test/s?q=<b>"),
    ("<http://a.test/s?q=<b>>", "http://a.test/s?q=<b>"),
    ("<http://a.test/>", "http://a.test/"),
    ("  http://a.test/x>  ", "http://a.test/x>"),
    ("<http://a.test/x", "<http://a.test/x"),
    (None, ""),
])
def test_target_uri_removes_one_wrapper(raw, expected):
    from crawl.warc import target_uri

    assert target_uri(raw) == expected


def test_page_url_ending_in_angle_bracket_survives_extract(tmp_path):
    from core.config import CrawlConfig
    from core.records import stable_id
    from crawl.extract import run_extract
    from crawl.urls import normalize_url
    from webpairs.testweb import write_warc

    urls = ["http://127.0.0.1:9/search?q=<b>", "http://127.0.0.1:9/tag/<em>", "http://127.0.0.1:9/plain"]
    write_warc(str(tmp_path / "in" / "a.warc"), {u: f'<html><body><img src="/img/{i}.jpg" alt="x"></body></html>' for i, u in enumerate(urls)})
    run_extract(str(tmp_path / "in" / "a.warc"), str(tmp_path / "links"), CrawlConfig(allow_hosts=("127.0.0.1",)))
    links = read_table(str(tmp_path / "links"), "links").to_pylist()
    expected = {normalize_url(u, u)[0] for u in urls}
    assert {r["page_url"] for r in links} == expected
    for r in links:
        assert r["page_url"].endswith(("%3E", ">", "plain")), r["page_url"]
        assert r["link_id"] == stable_id(r["page_url"], r["image_url"])


# ---- 4. max_shard_bytes ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [MIB, MIB + 777, 3 * MIB // 2, 5 * MIB // 2, 3 * MIB])
def test_max_shard_bytes_bounds_every_tar(small_run, tmp_path, limit):
    from shards.writer import run_shards

    out = str(tmp_path / "shards")
    stats = run_shards(os.path.join(small_run, "pair"), out, ShardConfig(samples_per_shard=1000, max_shard_bytes=limit))
    alone = _sample_bytes(os.path.join(small_run, "pair"))
    too_large = {k for k, v in alone.items() if v > limit}
    tars = sorted(glob.glob(os.path.join(out, "*.tar")))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert len(tars) >= 2
    for t, s in zip(tars, manifest["shards"]):
        assert os.path.getsize(t) <= limit, (t, os.path.getsize(t), limit)
        assert os.path.getsize(t) == s["bytes"]
    # a shard closes only when the next sample would not fit in it (never early)
    from shards.writer import tar_file_size

    index = read_table(out, "index").to_pylist()
    by_shard: dict = {}
    for r in index:
        by_shard.setdefault(r["shard"], []).append(r)
    order = sorted(by_shard)
    for a, b in zip(order, order[1:]):
        if a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0]:  # from the same pair file
            end = max(r["offset"] + r["size"] for r in by_shard[a])
            nxt = min(by_shard[b], key=lambda r: r["offset"])
            assert tar_file_size(end + nxt["size"]) > limit
    # a sample larger than any shard may be is rejected with its reason, and the counts reconcile
    assert {r["record_id"] for r in read_table(out, "rejected").to_pylist()} == too_large
    assert stats["rejected"] == ({"sample_over_max_shard_bytes": len(too_large)} if too_large else {})
    assert stats["kept"] == len(index) == stats["input"] - len(too_large) and len(too_large) < stats["input"]
    assert (limit < 2 * MIB) == bool(too_large)  # the 850-px page's pairs fit only the 3 MiB limit


# ---- 5. shards without embeddings train ---------------------------------------------------------


def test_shards_without_embeddings_train(small_run, tmp_path):
    import webdataset as wds

    from core.encoders import load_encoder
    from shards.writer import run_shards
    from train.data import DataConfig, PairStream, condition_dim, make_loader

    # 12 of the run's pairs (computing conditions is the slow part): a pair stage of their rows
    pair = tmp_path / "pair"
    os.makedirs(pair / "pairs")
    pq.write_table(read_table(os.path.join(small_run, "pair"), "pairs").slice(0, 12), pair / "pairs" / "part-0.parquet")
    with open(pair / "stats.json", "w") as fh:
        json.dump({"stage": "pair", "input": 12, "kept": 12, "rejected": {}}, fh)
    finish_stage(str(pair), "pair")
    out = str(tmp_path / "shards")
    stats = run_shards(str(pair), out, ShardConfig(store_embedding=False, samples_per_shard=5))
    assert stats["kept"] == 12
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["config"]["store_embedding"] is False and manifest["encoder"] == "tiny-clip"
    samples = list(wds.WebDataset(sorted(glob.glob(os.path.join(out, "*.tar"))), shardshuffle=False))
    assert len(samples) == stats["kept"] and not any("cond.npy" in s for s in samples)
    cfg = DataConfig(shards=out, num_workers=0, shuffle_buffer=1, batch_size=4)
    assert condition_dim(cfg) == 64
    encoder = load_encoder("tiny-clip")
    by_key = {s["__key__"]: s for s in samples}
    seen = {}
    for x, cond, key in PairStream(cfg, epochs=1):
        src = Image.open(io.BytesIO(by_key[key]["cond.jpg"])).convert("RGB")
        expected = encoder.embed_images(encoder.preprocess(src)[None])[0]
        assert np.allclose(cond.numpy(), expected, atol=1e-5)
        seen[key] = True
    assert sorted(seen) == sorted(by_key)
    batch = next(iter(make_loader(cfg, epochs=1)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].shape == (4, 64)
