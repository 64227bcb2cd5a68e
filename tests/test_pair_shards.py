"""pair + shards on the test web's pipeline output: ground truth, reconciliation, round trips."""

import glob
import json
import os
import pickle

import numpy as np
import pytest

from core.config import PairConfig
from core.records import phash_distance
from core.stageio import finish_stage, read_stats, read_table
from pairing.select import band_keys, collapse_near_duplicates, page_outcome, select_pairs


def _img(i, phash, emb, w=100, h=100, pos=0):
    return {"image_id": f"id{i}", "phash": phash, "embedding": emb, "width": w, "height": h, "position": pos, "page_url": "p", "image_url": f"u{i}"}


def test_near_duplicates_keep_the_largest():
    imgs = [_img(0, "ffff0000ffff0000", [1, 0], 50, 50), _img(1, "ffff0000ffff0001", [1, 0], 200, 100), _img(2, "0000ffff0000ffff", [0, 1])]
    kept, dropped = collapse_near_duplicates(imgs, 4)
    assert [k["image_id"] for k in kept] == ["id1", "id2"]
    assert dropped == [(imgs[0], "id1")]


def test_band_keys_find_every_close_pair():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = int(rng.integers(0, 2**63))
        flips = rng.choice(64, size=4, replace=False)
        b = a
        for f in flips:
            b ^= 1 << int(f)
        ha, hb = f"{a:016x}", f"{b:016x}"
        assert phash_distance(ha, hb) == 4
        assert set(band_keys(ha, 4)) & set(band_keys(hb, 4))


def test_pairs_in_band_ordered_capped_and_deterministic():
    vecs = [[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]]
    far = ["0000000000000000", "ffffffff00000000", "00000000ffffffff", "ffffffffffffffff"]
    imgs = [_img(i, far[i], v, pos=i) for i, v in enumerate(vecs)]
    cfg = PairConfig(sim_low=0.5, sim_high=0.95)
    pairs, used = select_pairs("p", imgs, cfg)
    assert {(p.cond_image_id, p.target_image_id) for p in pairs} == {("id0", "id1"), ("id1", "id0"), ("id1", "id2"), ("id2", "id1")}
    assert used == {"id0", "id1", "id2"}
    capped = PairConfig(sim_low=-1, sim_high=1, max_pairs_per_page=3)
    a, _ = select_pairs("p", imgs, capped)
    b, _ = select_pairs("p", imgs, capped)
    assert len(a) == 3 and a == b
    _, kept, rejected = page_outcome("p", imgs, cfg)
    assert [r[1] for r in rejected] == ["no_pair_in_band"] and len(kept) == 3
    _, kept, rejected = page_outcome("p", imgs[:1], cfg)
    assert kept == [] and rejected[0][1] == "page_too_small"


def test_pair_stage_on_test_web(pipeline_dirs, test_web):
    from core.records import stable_id

    out = pipeline_dirs["pair"]
    stats = read_stats(out)
    occurrences = read_table(pipeline_dirs["filter"], "occurrences").to_pandas()
    links_in = occurrences[occurrences.filter_reason.isna()]
    rejected = read_table(out, "rejected").to_pandas()
    kept = read_table(out, "images").to_pandas()
    pairs = read_table(out, "pairs").to_pandas()
    assert stats["input"] == len(links_in) == len(kept) + len(rejected)  # per link: each image on each page
    assert sorted(rejected.record_id.tolist() + [stable_id(r.page_url, r.image_url) for r in kept.itertuples()]) == sorted(links_in.link_id)
    assert stats["pairs"] == len(pairs) > 0 and stats["pages"] == len(test_web.pages)
    # the logo (on every page) is never downloaded for its links: download fetched it once as
    # evidence, and pair still counts it as the site's boilerplate on every page
    logo = occurrences[occurrences.image_url.isin(test_web.boilerplate)]
    assert (logo.filter_reason == "boilerplate_url_global").all() and len(logo) == len(test_web.pages)
    assert not kept.image_url.isin(test_web.boilerplate).any()
    flags = read_table(out, "boilerplate").to_pandas()
    logo_flags = flags[(flags.kind == "url") & flags.key.isin(test_web.boilerplate)]
    pages = dict(zip(logo_flags.scope, logo_flags.pages))
    assert pages == {"127.0.0.1": len(test_web.pages), "*": PairConfig().boilerplate_pages + 1}  # global counts stop at K+1
    # each planted near-duplicate group collapses to one image
    for group in test_web.near_duplicate_groups:
        survivors = set(kept.image_url) & set(group)
        dropped = rejected[rejected.url.isin(group)]
        assert len(survivors) <= 1 and (dropped.reason == "near_duplicate").all()
        assert len(dropped) >= len(group) - 1
    # no pair joins two pages, every similarity is inside the band, no content pair twice
    cfg = PairConfig()
    page_of = kept.groupby("image_id").page_url.apply(set)
    for p in pairs.itertuples():
        assert p.page_url in page_of[p.cond_image_id] and p.page_url in page_of[p.target_image_id]
        assert cfg.sim_low <= p.similarity <= cfg.sim_high and p.cond_image_id != p.target_image_id
    assert not pairs.duplicated(["cond_image_id", "target_image_id"]).any()
    assert (pairs.groupby("page_url").size() <= cfg.max_pairs_per_page).all()


def test_shards_round_trip_with_webdataset_and_index(pipeline_dirs):
    import webdataset as wds

    out = pipeline_dirs["shards"]
    pairs = read_table(pipeline_dirs["pair"], "pairs").to_pandas()
    stats = read_stats(out)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    tars = sorted(glob.glob(os.path.join(out, "*.tar")))
    assert stats["input"] == len(pairs) == stats["kept"] == manifest["samples"]
    assert [os.path.basename(t) for t in tars] == [s["shard"] for s in manifest["shards"]]
    assert all(s["samples"] <= 25 for s in manifest["shards"]) and len(tars) >= 2
    import hashlib

    for t, s in zip(tars, manifest["shards"]):
        assert hashlib.sha256(open(t, "rb").read()).hexdigest() == s["sha256"]
    assert not glob.glob(os.path.join(out, ".*tmp*"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(pairs.pair_id)
    by_key = pairs.set_index("pair_id")
    for s in samples[:10]:
        meta = s["json"]
        assert meta["page_url"] == by_key.loc[s["__key__"]].page_url
        assert s["cond.jpg"].mode == "RGB" and s["target.jpg"].size[0] > 0
        assert s["cond.npy"].shape == (1280,) and abs(np.linalg.norm(s["cond.npy"].astype(np.float32)) - 1) < 1e-2
    # the index points at each sample's bytes
    index = read_table(out, "index").to_pandas()
    assert len(index) == len(samples)
    row = index.iloc[0]
    with open(os.path.join(out, row.shard), "rb") as fh:
        fh.seek(row.offset)
        header = fh.read(512)
    assert header[:100].rstrip(b"\0").decode().startswith(row.key)


def test_shards_readable_by_ray_data(pipeline_dirs):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        ds = ray.data.read_webdataset(pipeline_dirs["shards"] + "/", file_extensions=["tar"])
        rows = ds.take_all()
    finally:
        ray.shutdown()
    pairs = read_table(pipeline_dirs["pair"], "pairs").to_pandas()
    assert sorted(r["__key__"] for r in rows) == sorted(pairs.pair_id)
    assert all(r["cond.jpg"].ndim == 3 for r in rows[:5])


def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _mark_complete(folder, stage: str, n: int) -> None:
    """Mark a hand-made stage folder complete the way a stage does (reconciled stats, _SUCCESS)."""
    with open(folder / "stats.json", "w") as fh:
        json.dump({"stage": stage, "input": n, "kept": n, "rejected": {}}, fh)
    finish_stage(str(folder), stage)


def test_shared_pairs_dedup_and_shard_rejections(tmp_path):
    """Two pages show the same two images (x, y): their pairs are kept once, from the first page.
    In shards, a pair whose image bytes are not an image, and one whose image cannot be found,
    are rejected with their reasons, and every pair is accounted for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.config import ShardConfig
    from core.records import IMAGE_SCHEMA, OCCURRENCE_SCHEMA, occurrence_of, rows_to_table
    from pairing.pipeline import run_pair
    from shards.writer import run_shards

    def image(image_id, page, pos, phash, emb, data):
        e = np.asarray(emb, dtype=np.float32)
        return {"image_id": image_id, "page_url": page, "image_url": f"http://h.test/{image_id}.jpg", "alt": image_id, "position": pos, "width": 32, "height": 32,
                "format": "JPEG", "sha256": image_id * 4, "phash": phash, "embedding": (e / np.linalg.norm(e)).tolist(), "encoder": "test", "clip_score": None, "image_bytes": data}

    x, y = ("0000000000000000", [1, 0.2, 0]), ("ffffffff00000000", [1, 0.4, 0])
    rows = [
        image("aaaaaaaaaaaaaaaa", "http://a.test/", 0, *x, _jpeg(0)), image("bbbbbbbbbbbbbbbb", "http://a.test/", 1, *y, _jpeg(1)),
        image("aaaaaaaaaaaaaaaa", "http://b.test/", 0, *x, _jpeg(0)), image("bbbbbbbbbbbbbbbb", "http://b.test/", 1, *y, _jpeg(1)),
        image("cccccccccccccccc", "http://b.test/", 2, "00000000ffffffff", [1, 0, 0.3], b"not an image"),
    ]
    os.makedirs(tmp_path / "filter" / "images")
    pq.write_table(rows_to_table(rows, IMAGE_SCHEMA), tmp_path / "filter" / "images" / "part-0.parquet")
    os.makedirs(tmp_path / "filter" / "occurrences")
    pq.write_table(rows_to_table([occurrence_of(r) for r in rows], OCCURRENCE_SCHEMA), tmp_path / "filter" / "occurrences" / "part-0.parquet")
    _mark_complete(tmp_path / "filter", "filter", len(rows))
    stats = run_pair(str(tmp_path / "filter"), str(tmp_path / "pair"), PairConfig(sim_low=0.0, sim_high=0.999))
    pairs = read_table(str(tmp_path / "pair"), "pairs").to_pandas()
    # a->b, b->a once each (from http://a.test/, the first page), plus 4 pairs with c on page b
    assert stats["duplicate_pairs"] == 2 and stats["pairs"] == len(pairs) == 6
    ab = pairs[pairs.cond_image_id.isin(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]) & pairs.target_image_id.isin(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])]
    assert len(ab) == 2 and (ab.page_url == "http://a.test/").all()
    assert (pairs.cond_url == "http://h.test/" + pairs.cond_image_id + ".jpg").all() and pairs.cond_bytes_file.notna().all()
    # point one pair at an image that is not in its row group
    table = pq.read_table(tmp_path / "pair" / "pairs")
    ids = table.column("target_image_id").to_pylist()
    lost = next(i for i, (c, t) in enumerate(zip(table.column("cond_image_id").to_pylist(), ids)) if "cccccccccccccccc" not in (c, t))
    ids[lost] = "dddddddddddddddd"
    files = sorted(glob.glob(str(tmp_path / "pair" / "pairs" / "*.parquet")))
    for f in files:
        os.remove(f)
    pq.write_table(table.set_column(table.schema.get_field_index("target_image_id"), "target_image_id", pa.array(ids, pa.string())), files[0])
    finish_stage(str(tmp_path / "pair"))  # the edited folder lists its files again
    stats = run_shards(str(tmp_path / "pair"), str(tmp_path / "shards"), ShardConfig(samples_per_shard=2))
    assert stats["input"] == 6 and stats["kept"] == 1
    assert stats["rejected"] == {"missing_image": 1, "unreadable_image": 4}
    manifest = json.load(open(tmp_path / "shards" / "manifest.json"))
    assert manifest["samples"] == 1 and manifest["encoder"] == "test" and manifest["pairs_in"] == 6
    rejected = lambda d: sorted(zip(*(read_table(str(d), "rejected", ["record_id", "reason"]).column(c).to_pylist() for c in ("record_id", "reason"))))  # noqa: E731
    reasons = rejected(tmp_path / "shards")
    assert len(reasons) == 5 and {k for k, _ in reasons} | {pq.read_table(tmp_path / "shards" / "index").column("key")[0].as_py()} == set(table.column("pair_id").to_pylist())
    # the same pairs in three files, each its own writer, all sharing the one filter row group:
    # the same pair is kept and the same pairs are rejected for the same reasons
    from core.stageio import stage_files
    from shards import writer

    edited = pq.read_table(files[0])
    os.remove(files[0])
    for i in range(3):
        pq.write_table(edited.take(list(range(i, edited.num_rows, 3))), tmp_path / "pair" / "pairs" / f"part-{i}.parquet")
    finish_stage(str(tmp_path / "pair"))
    writer.PAIRS_PER_WRITER, before = 1, writer.PAIRS_PER_WRITER
    rows = [pq.read_metadata(f).num_rows for f in stage_files(str(tmp_path / "pair"), "pairs", expected="pair")]
    assert len(writer.writer_groups(rows=rows, pair_files=[""] * 3, per_writer=1)) == 3  # three writers
    try:
        three = run_shards(str(tmp_path / "pair"), str(tmp_path / "shards3"), ShardConfig(samples_per_shard=2))
    finally:
        writer.PAIRS_PER_WRITER = before
    assert three == stats and rejected(tmp_path / "shards3") == reasons
    assert pq.read_table(tmp_path / "shards3" / "index").column("key").to_pylist() == pq.read_table(tmp_path / "shards" / "index").column("key").to_pylist()


def test_the_download_plan_changes_what_is_fetched_not_the_pairs(tmp_path, pipeline_dirs):
    """The test web with every plan rule off (one fetch per distinct URL, nothing chosen) gives
    exactly the session run's pairs: its declared sizes are honest, so the rules only fetch less."""
    from core.config import DownloadConfig, FilterConfig
    from crawl.download import run_download
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair

    off = DownloadConfig(allow_hosts=("127.0.0.1",), timeout=2.5, processes=1, min_side=0, skip_extensions=(), url_boilerplate=False, max_links_per_page=0, min_links_per_page=0)
    stats = run_download(pipeline_dirs["links"], str(tmp_path / "download"), off)
    run_filter(str(tmp_path / "download"), str(tmp_path / "filter"), FilterConfig(encoder="efficientnet-lite0"))
    run_pair(str(tmp_path / "filter"), str(tmp_path / "pair"), PairConfig())
    planned = read_stats(pipeline_dirs["download"])
    assert planned["urls_selected"] + planned["urls_evidence"] < stats["urls_selected"]  # fewer fetches ...
    ids = lambda d: sorted(read_table(d, "pairs", ["pair_id"]).column(0).to_pylist())  # noqa: E731
    assert ids(str(tmp_path / "pair")) == ids(pipeline_dirs["pair"])  # ... the same pairs


def test_shard_file_writes_the_bytes_tarfile_writes(tmp_path):
    """_ShardFile writes the archive itself (one header per member, no tarfile object): its bytes
    are exactly tarfile's `mode="w|"` ustar archive of the same members, sizes on and off the
    512-byte blocks, empty data and a key long enough for ustar's name prefix included, and the
    index ranges and the predicted size hold."""
    import io
    import tarfile

    from shards.writer import _members, _ShardFile, tar_file_size

    rng = np.random.default_rng(0)
    samples = []
    for i, n in enumerate([0, 1, 511, 512, 513, 1024, 10_000, 70_001]):
        key = f"{i:04d}" + ("/".join(["k" * 60, "k" * 60]) if i == 5 else "")
        samples.append({"key": key, "meta": {"page_url": "p", "cond_image_id": "c", "target_image_id": "t", "similarity": 0.5},
                        "files": {"cond.jpg": rng.bytes(n), "target.jpg": rng.bytes(n // 3), "json": b"{}"}})
    shard = _ShardFile(str(tmp_path), "mine.tar")
    rows = []
    for s in samples:
        predicted = shard.size_with(_members(s))
        rows.append(shard.add(s))
        assert predicted == tar_file_size(shard.offset)
    summary = shard.close()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in s["files"].items():
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    mine = (tmp_path / "mine.tar").read_bytes()
    assert mine == buf.getvalue() and summary["bytes"] == len(mine) == tar_file_size(shard.offset)
    with tarfile.open(tmp_path / "mine.tar") as tar:
        got = {m.name: (m.offset, tar.extractfile(m).read()) for m in tar.getmembers()}
    for s, row in zip(samples, rows):
        for ext, data in s["files"].items():
            offset, read = got[f"{s['key']}.{ext}"]
            assert read == data and row["offset"] <= offset < row["offset"] + row["size"]


def test_shards_read_each_filter_row_group_once_however_many_pair_files_and_shards(pipeline_dirs, tmp_path, monkeypatch):
    """The image bytes are fetched once: each filter row group the pairs point into is read once,
    however many shards (it was read again for every shard's batch: time grew as size^1.24) and
    however many pair files and writers point into it (it was read again for every pair file: on
    Dask, where pair writes a file per bucket, shards' time grew as size^1.56; issue 34). The pairs
    split into five files, round robin so that every file needs every row group, each file its own
    writer, give the same samples, byte for byte, as the session's pair files in shards of 100,000,
    read back with tarfile; no fetched file is left in the output."""
    import hashlib
    import shutil
    import tarfile

    import pyarrow.parquet as pq

    from core.config import ShardConfig
    from core.stageio import StageError, stage_files
    from shards import writer
    from shards.writer import run_shards

    split = tmp_path / "pair"
    shutil.copytree(pipeline_dirs["pair"], split)
    table = read_table(pipeline_dirs["pair"], "pairs")
    for f in glob.glob(str(split / "pairs" / "*.parquet")):
        os.remove(f)
    for i in range(5):
        pq.write_table(table.take(list(range(i, table.num_rows, 5))), split / "pairs" / f"part-{i}.parquet")
    finish_stage(str(split))
    pair_files = stage_files(str(split), "pairs", expected="pair")
    pointed = [{(r[f"{s}_bytes_file"], r[f"{s}_bytes_row_group"]) for r in pq.read_table(f).to_pylist() for s in ("cond", "target")} for f in pair_files]
    assert len(pair_files) == 5 and all(p == pointed[0] for p in pointed)  # every file needs every row group
    # ... and each of those filter row groups points to its images' bytes in download's row groups
    behind = {(r["bytes_file"], r["bytes_row_group"]) for f, _ in pointed[0] for r in pq.read_table(f, columns=["bytes_file", "bytes_row_group"]).to_pylist()}
    assert behind and all("/download/downloads/" in f for f, _ in behind)

    reads = []
    original = pq.ParquetFile.read_row_group

    def counting(self, i, columns=None, **kw):
        if columns and "image_bytes" in columns:
            reads.append(i)
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(writer, "PAIRS_PER_WRITER", 1)  # a writer for each pair file
    with pytest.raises(StageError, match=r"cannot be written by Beam's file sinks"):  # one clear line, not Beam's rename error
        run_shards(str(split), str(tmp_path / "small[1]"), ShardConfig(samples_per_shard=3))
    small_dir = tmp_path / "small"
    stats = run_shards(str(split), str(small_dir), ShardConfig(samples_per_shard=3))
    assert stats["kept"] > 3 * 4 and len(reads) == len(pointed[0]) + len(behind)  # five pair files and writers: once each, not five times
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", original)
    monkeypatch.setattr(writer, "PAIRS_PER_WRITER", 100_000)  # one writer for all five
    monkeypatch.setattr(writer, "MIN_WRITERS", 1)
    one = run_shards(str(split), str(tmp_path / "one_writer"), ShardConfig(samples_per_shard=3))
    assert one == stats
    assert sorted(os.listdir(tmp_path / "one_writer")) == sorted(os.listdir(small_dir))  # the same shards, named by pair file
    shas = lambda d: [(s["shard"], s["samples"], s["sha256"]) for s in json.load(open(d / "manifest.json"))["shards"]]  # noqa: E731
    assert shas(small_dir) == shas(tmp_path / "one_writer")
    big = run_shards(pipeline_dirs["pair"], str(tmp_path / "big"), ShardConfig(samples_per_shard=100_000))
    assert big["kept"] == stats["kept"] and big["rejected"] == stats["rejected"]

    def members(folder):
        out = {}
        for t in sorted(glob.glob(os.path.join(folder, "*.tar"))):
            with tarfile.open(t) as tar:
                out.update({m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()})
        return out

    small = members(small_dir)
    assert small == members(tmp_path / "big") == members(tmp_path / "one_writer") and len(small) >= 3 * stats["kept"]
    assert not [n for n in os.listdir(small_dir) if "fetched" in n]


def test_a_row_group_past_its_file_fetches_nothing_so_its_images_are_missing(tmp_path):
    """FetchRowGroup on a row group number the filter file does not have writes no images file for
    its writers, so their pairs' images are not found (`missing_image`), as before; row group 0 of
    the same file gives each writer exactly the ids it wanted, bytes equal to the file's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.writer import FETCH_SCHEMA, IMAGES, WANT_SCHEMA, WANTS, FetchRowGroup, _ImageStore, _row_group_name, _write_table

    f = str(tmp_path / "images.parquet")
    ids = [f"{i:016x}" for i in range(4)]
    pq.write_table(pa.table({"image_id": ids, "image_bytes": [_jpeg(i) for i in range(4)]}), f)
    fetch = str(tmp_path / "fetched")
    for rg in (0, 99):
        for writer, wanted in ((0, ids[:2]), (1, ids[1:])):
            _write_table(f"{fetch}/{WANTS}/{_row_group_name(f, rg)}/{writer:06d}.parquet", pa.table({"image_id": wanted}, schema=WANT_SCHEMA))
    past = list(FetchRowGroup(fetch, False).process(((f, 99), [0, 1])))
    assert past == [] and not os.path.exists(f"{fetch}/{IMAGES}")
    assert _ImageStore([path for _, (_, _, path) in past]).get(ids[0]) is None  # the writer's store: not found
    got_files = list(FetchRowGroup(fetch, False).process(((f, 0), [0, 1])))
    assert got_files == [(w, (f, 0, f"{fetch}/{IMAGES}/{w:06d}/{_row_group_name(f, 0)}.parquet")) for w in (0, 1)]
    for writer, wanted in ((0, ids[:2]), (1, ids[1:])):
        got = pq.read_table(f"{fetch}/{IMAGES}/{writer:06d}/{_row_group_name(f, 0)}.parquet")
        assert got.schema == FETCH_SCHEMA and got.column("image_id").to_pylist() == wanted
        assert got.column("jpg").to_pylist() == [_jpeg(int(i, 16)) for i in wanted]


def test_writer_groups_deal_whole_pair_files_in_order():
    """Each pair file is in exactly one writer, in order; a writer closes once it has at least
    `per_writer` pairs, so only the last may have fewer; empty files go along with their
    neighbours."""
    from shards.writer import writer_groups

    files = [f"p{i}" for i in range(7)]
    rows = [5, 0, 3, 10, 1, 1, 0]
    groups = writer_groups(files, rows, 6, min_writers=1)
    assert [n for n, _ in groups] == list(range(len(groups)))
    assert [[f for _, f in g] for _, g in groups] == [["p0", "p1", "p2"], ["p3"], ["p4", "p5", "p6"]]
    assert [i for _, g in groups for i, _ in g] == list(range(7))
    assert [[f for _, f in g] for _, g in writer_groups(files, rows, 1, min_writers=1)] == [["p0"], ["p1", "p2"], ["p3"], ["p4"], ["p5"], ["p6"]]
    # a small input gets up to min_writers writers, as its files allow: 20 pairs / 4 -> 5 a writer
    assert [[f for _, f in g] for _, g in writer_groups(files, rows, 6, min_writers=4)] == [["p0"], ["p1", "p2", "p3"], ["p4", "p5", "p6"]]
    assert writer_groups([], [], 6) == [] and writer_groups(["p"], [0], 6) == [(0, [(0, "p")])]


def _jpeg_variants():
    """JPEG bytes in the layouts shards meets: plain, greyscale, CMYK, progressive, with an ICC
    profile, EXIF (with and without an orientation), XMP orientation, Adobe and COM segments, an
    MPO, fill bytes, 16-bit tables, truncated and corrupted headers, not a JPEG at all."""
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))

    def save(img, **kw):
        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        return buf.getvalue()

    plain = save(rgb, quality=90)
    out = {"plain": plain, "grey": save(rgb.convert("L")), "cmyk": save(rgb.convert("CMYK")), "progressive": save(rgb, progressive=True),
           "icc": save(rgb, icc_profile=b"\0" * 200), "comment": save(rgb, comment=b"hello"), "q100_16bit_free": save(rgb, quality=100)}
    exif = Image.Exif()
    out["exif_no_orientation"] = save(rgb, exif=exif.tobytes())
    for o in (1, 3, 6, 8):
        exif[0x0112] = o
        out[f"exif_orientation_{o}"] = save(rgb, exif=exif.tobytes())
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    out["xmp_orientation"] = save(rgb, xmp=xmp)
    buf = io.BytesIO()
    rgb.save(buf, "MPO", save_all=True, append_images=[rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    out["mpo"] = buf.getvalue()
    sof = plain.index(b"\xff\xc0")
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01"
    out["adobe"] = plain[:2] + app14 + plain[2:]
    out["adobe_short"] = plain[:2] + b"\xff\xee\x00\x07Adobe" + plain[2:]
    out["jfif_short"] = plain[:2] + b"\xff\xe0\x00\x06JFIF" + plain[2:]
    out["app5"] = plain[:2] + b"\xff\xe5\x00\x05abc" + plain[2:]
    out["fill_bytes"] = plain[:sof] + b"\xff" + plain[sof:]
    out["twelve_bit"] = plain[: sof + 4] + b"\x0c" + plain[sof + 5 :]
    out["four_layers_sof"] = plain[: sof + 9] + b"\x04" + plain[sof + 10 :]
    out["zero_width"] = plain[: sof + 7] + b"\x00\x00" + plain[sof + 9 :]
    dqt = plain.index(b"\xff\xdb")
    out["bad_dqt"] = plain[: dqt + 2] + b"\x00\x20" + plain[dqt + 4 :]
    out["short_length"] = plain[:dqt + 2] + b"\x00\x01" + plain[dqt + 4 :]
    out["truncated_header"] = plain[: sof + 5]
    out["no_sos"] = plain[: plain.index(b"\xff\xda")]
    out["sos_before_sof"] = plain[:2] + b"\xff\xda\x00\x02" + plain[2:]
    sof_length = int.from_bytes(plain[sof + 2 : sof + 4], "big")
    for k in (1, 2, 4):  # bytes after the 3-byte component records: Pillow cannot open it
        out[f"sof_junk_{k}"] = plain[: sof + 2] + (sof_length + k).to_bytes(2, "big") + plain[sof + 4 : sof + 2 + sof_length] + b"\x00" * k + plain[sof + 2 + sof_length :]
    out["dqt_16bit_truncated"] = plain[: dqt + 4] + bytes([plain[dqt + 4] | 0x10]) + plain[dqt + 5 :]  # a 16-bit table with 8-bit bytes
    out["over_twice_the_pixel_limit"] = plain[: sof + 5] + b"\xff\xff\xff\xff" + plain[sof + 9 :]  # 65,535 x 65,535
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    out["png"], out["empty"], out["soi_only"] = buf.getvalue(), b"", b"\xff\xd8\xff"
    return out


def test_plain_jpeg_check_agrees_with_as_jpeg():
    """shards passes a JPEG through unchanged when its markers say Pillow would (`plain_rgb_jpeg`)
    instead of opening it with Pillow: whenever the check says yes, `layout.as_jpeg` returns the
    bytes themselves, on every shared photo and on JPEGs in every layout the check must refuse
    (EXIF or XMP orientation, CMYK, greyscale, MPO, ICC, fill bytes, broken headers), and the
    plain and progressive ones, at least, pass."""
    from core import sample_layout as layout
    from shards.writer import plain_rgb_jpeg

    variants = _jpeg_variants()
    for path in sorted(glob.glob("/work/shared/data/photos-imagenet-sample/*"))[:300]:
        with open(path, "rb") as fh:
            variants[os.path.basename(path)] = fh.read()
    said_yes = set()
    for name, data in variants.items():
        try:
            same = layout.as_jpeg(data) is data
        except Exception:  # noqa: BLE001 - Pillow cannot read it: the check must not pass it
            same = False
        if plain_rgb_jpeg(data):
            said_yes.add(name)
            assert same, name
    assert {"plain", "progressive", "comment", "adobe", "app5", "q100_16bit_free"} <= said_yes
    assert not said_yes & {"cmyk", "grey", "icc", "mpo", "exif_orientation_6", "xmp_orientation", "fill_bytes", "twelve_bit", "bad_dqt", "png", "truncated_header", "no_sos", "sos_before_sof", "zero_width", "sof_junk_1", "sof_junk_2", "sof_junk_4", "dqt_16bit_truncated", "over_twice_the_pixel_limit"}


def test_npy_column_writes_what_npy_bytes_writes():
    """The shards' .npy bytes of a whole embedding column are `layout.npy_bytes` of each row (nulls
    and rows of other lengths included), and numpy reads them back to the same float16 values."""
    import io

    import pyarrow as pa

    from core import sample_layout as layout
    from shards.writer import _npy_column

    rng = np.random.default_rng(1)
    rows = [rng.normal(size=d).astype(np.float16).tolist() if d else None for d in (64, 64, 0, 3, 512, 64, 1)] + [[]]
    for column in (pa.array(rows, pa.list_(pa.float16())), pa.chunked_array([pa.array(rows[:3], pa.list_(pa.float16())), pa.array(rows[3:], pa.list_(pa.float16()))])):
        got = _npy_column(column)
        assert len(got) == len(rows)
        for row, data in zip(rows, got):
            if row is None:
                assert data == b""
                continue
            assert data == layout.npy_bytes(row)
            assert np.load(io.BytesIO(data)).tolist() == np.asarray(row, np.float16).tolist()


def test_page_outcome_equals_the_plain_double_loops():
    """collapse_near_duplicates and select_pairs (ints parsed once, the band as one NumPy mask)
    give exactly what the plain definitions give (each kept image compared by phash_distance, a
    double loop over ordered pairs with the float32 similarities compared to the band's ends):
    the same pairs in the same order, similarities, kept and rejected images, on 1,500 random
    pages with repeated ids, near and far pHashes, equal embeddings and band ends."""
    import random

    from core.records import PairRecord, stable_id
    from pairing.select import cosine_matrix

    def collapse_reference(images, max_distance):
        order = sorted(images, key=lambda r: (-(r["width"] * r["height"]), r["position"], r["image_id"]))
        kept, dropped = [], []
        for img in order:
            twin = next((k for k in kept if k["image_id"] == img["image_id"] or phash_distance(k["phash"], img["phash"]) <= max_distance), None)
            (kept.append(img) if twin is None else dropped.append((img, twin["image_id"])))
        return kept, dropped

    def select_reference(page_url, images, cfg):
        if len(images) < 2:
            return [], set()
        sims = cosine_matrix(images)
        candidates = [(i, j) for i in range(len(images)) for j in range(len(images)) if i != j and cfg.sim_low <= sims[i, j] <= cfg.sim_high]
        used = {images[i]["image_id"] for i, j in candidates} | {images[j]["image_id"] for i, j in candidates}
        rng = random.Random(stable_id(str(cfg.seed), page_url))
        if len(candidates) > cfg.max_pairs_per_page:
            candidates = sorted(rng.sample(candidates, cfg.max_pairs_per_page))
        return [PairRecord(page_url, images[i]["image_id"], images[j]["image_id"], float(sims[i, j])) for i, j in candidates], used

    rng = random.Random(1)
    for trial in range(1500):
        base, imgs = rng.getrandbits(64), []
        for k in range(rng.randrange(0, 14)):
            h = base if rng.random() < 0.3 else rng.getrandbits(64)
            for b in rng.sample(range(64), rng.randrange(0, 14)):
                h ^= 1 << b
            e = imgs[-1]["embedding"] if imgs and rng.random() < 0.2 else np.random.default_rng(trial * 100 + k).normal(size=16).astype(np.float16)
            imgs.append({"image_id": f"{rng.randrange(8):02d}", "phash": f"{h:016x}", "width": rng.choice([10, 20]), "height": 10, "position": rng.randrange(5), "embedding": e})
        cfg = PairConfig(sim_low=rng.choice([-1.0, 0.0, 0.2]), sim_high=rng.choice([0.5, 0.99, 1.0]), max_pairs_per_page=rng.choice([1, 3, 100]))
        assert collapse_near_duplicates(imgs, cfg.near_duplicate_distance) == collapse_reference(imgs, cfg.near_duplicate_distance)
        assert repr(select_pairs(f"http://p/{trial}", imgs, cfg)) == repr(select_reference(f"http://p/{trial}", imgs, cfg))


def test_stubs_are_build_stub_of_each_pair_row(pipeline_dirs):
    """The writer's stubs, built column by column, are `build_stub` of every pair row, in order."""
    import pyarrow.parquet as pq

    from core.config import ShardConfig
    from core.stageio import stage_files
    from shards.writer import PAIR_COLUMNS, WriteShards, build_stub

    n = 0
    for f in stage_files(pipeline_dirs["pair"], "pairs", expected="pair"):
        expected = [build_stub(r) for r in pq.read_table(f, columns=PAIR_COLUMNS).to_pylist()]
        assert list(WriteShards("", ShardConfig())._stubs(f)) == expected
        n += len(expected)
    assert n > 10


def test_each_dask_partition_of_pairs_reads_is_one_row_group(pipeline_dirs, tmp_path, monkeypatch):
    """On Dask a partition's outputs are held until it ends (core/dask_runner), so pair's reads of
    filter's output must be bounded units: in the graph the Dask runner makes of run_pair's
    pipeline, the images, the kept links and the two other reads of the occurrences (flags, kept
    keys) are one row group to a partition. (Before, they were a file each, and ReadAllFromParquet
    made every occurrence row one partition: at one Common Crawl file each worker peaked at 2.5 GB,
    6.3x its 1x peak, where the in-process runner holds 454 MB; issue 34.)

    The images and the kept links are read in the steps that spill them, which wait for the copy
    step's map (a side input): read in steps of their own, every row group's records were read at
    once and waited in the workers, as dicts, for the whole copy step (570 MB a worker at 16x,
    1.56x its 1x peak). Each spill partition is checked against its row group, row by row."""
    import shutil

    import dask
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dask.core import get_dependencies
    from daskgraph import dask_bags

    import pairing.pipeline as pp
    from core.stageio import stage_files

    filtered = str(tmp_path / "filter")
    shutil.copytree(pipeline_dirs["filter"], filtered)
    groups = {}
    for name in ("images", "occurrences"):  # the same rows, in row groups of 7 (a small web's are one)
        files = stage_files(filtered, name, expected="filter")
        for f in files:
            table = pq.read_table(f)
            pq.write_table(table, f, row_group_size=7)
        groups[name] = sum(pq.ParquetFile(f).num_row_groups for f in files)
    assert groups["images"] > 2 and groups["occurrences"] > 2, groups
    cfg = PairConfig()
    assert cfg.copies  # the default: the spills of images and links wait for the copy map
    graphs = dask_bags(monkeypatch, pp, lambda: pp.run_pair(filtered, str(tmp_path / "pair"), cfg))
    assert "Read" not in graphs and "ReadLinks/ReadRowGroup" not in graphs  # no read step of their own
    assert graphs["Pair/SpillImages"].npartitions == groups["images"]
    assert graphs["Pair/SpillLinks"].npartitions == groups["occurrences"]
    # the occurrences are read by the boilerplate flags' three spills, each row group in its own
    # partition, and counted where they are read: no step holds a row group's rows as its output
    assert not any(label.startswith(("ReadOccurrences", "ReadKeys")) or label.endswith("FlagBoilerplate/Pages") for label in graphs), sorted(graphs)
    for label in ("Pair/FlagBoilerplate/SpillUrls", "Pair/FlagBoilerplate/SpillHashes", "Pair/FlagBoilerplate/SpillSites", "CountKept"):
        assert graphs[label].npartitions == groups["occurrences"], label

    # each spill task waits for the copy map: the copy groups' step is among its ancestors
    copy_map = graphs["Pair/FindCopies/Groups/ParDo(_Groups)"].name
    for label in ("Pair/SpillImages", "Pair/SpillLinks"):
        graph = dict(graphs[label].__dask_graph__())
        for key in graphs[label].__dask_keys__():
            seen, todo = set(), [key]
            while todo:
                for dep in get_dependencies(graph, todo.pop()):
                    if dep not in seen:
                        seen.add(dep)
                        todo.append(dep)
            assert any(copy_map in str(dep) for dep in seen), (label, key)

    # and each partition holds exactly its row group's rows (computed here, without a cluster)
    def partitions(label: str) -> list:
        return [list(part) for part in dask.compute(*graphs[label].to_delayed(), scheduler="sync")]

    def row_group_rows(name: str, columns: list) -> list:
        return [pq.ParquetFile(f).read_row_group(g, columns=columns).to_pylist() for f in stage_files(filtered, name, expected="filter") for g in range(pq.ParquetFile(f).num_row_groups)]

    def same(got: list, expected: list) -> None:  # the same row groups, in any order of partitions
        key = lambda rows: json.dumps(sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str)), sort_keys=True, default=str)  # noqa: E731
        assert sorted(map(key, got)) == sorted(map(key, expected))

    def spilled(part: list, fields: tuple) -> list:  # the records a spill partition wrote, unpacked
        rows = []
        for _, (_, path) in part:
            table = pa.ipc.open_file(path).read_all()
            rows += [pp.unpack(value, fields) for value in table.column(1).to_pylist()]
        return rows

    # the boilerplate flags' spill of each site's occurrences: every occurrence of its row group
    from pairing.boilerplate import page_key

    def site_rows(part: list) -> list:
        rows = []
        for _, (_, path) in part:
            table = pa.ipc.open_file(path).read_all()
            rows += [[key, *pickle.loads(value)] for key, value in zip(table.column(0).to_pylist(), table.column(1).to_pylist())]
        return rows

    occurrences = row_group_rows("occurrences", pp.OCCURRENCE_COLUMNS)
    same([site_rows(part) for part in partitions("Pair/FlagBoilerplate/SpillSites")], [[[r["site"], r["image_url"], r["phash"], page_key(r["page_url"])] for r in rows] for rows in occurrences])
    kept_per_group = [sum(r["filter_reason"] is None for r in rows) for rows in row_group_rows("occurrences", ["filter_reason"])]
    assert sorted(n for part in partitions("CountKept") for n in part) == sorted(kept_per_group) and sum(kept_per_group) > 0
    kept_links = [[{k: r[k] for k in pp.LINK_FIELDS} for r in rows if r["filter_reason"] is None] for rows in row_group_rows("occurrences", pp.LINK_COLUMNS + ["filter_reason"])]
    same([spilled(part, pp.LINK_FIELDS) for part in partitions("Pair/SpillLinks")], kept_links)
    files = stage_files(filtered, "images", expected="filter")
    images = [[(r["image_id"], f, g) for r in pq.ParquetFile(f).read_row_group(g, columns=["image_id"]).to_pylist()] for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    got = [[(r["image_id"], r["bytes_file"], r["bytes_row_group"]) for r in spilled(part, pp.COPY_JOIN_FIELDS)] for part in partitions("Pair/SpillImages")]
    assert sorted(map(sorted, got)) == sorted(map(sorted, images))  # each partition one row group's images, with their pointers
