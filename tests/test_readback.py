"""Read-back suite: what a run writes reads back right, every row and every sample, through readers
this project did not write (tarfile, webdataset, wids, Ray Data, Hugging Face `datasets`, DuckDB,
pyarrow).

One small crawl is built three ways, once each for the module:
- `inprocess`: every stage called in this process (Beam's in-process runner);
- `dask`: the Beam stages on a dask.distributed LocalCluster of 2 workers (`--runner dask`; the
  download, img2dataset's and not a Beam stage, is the in-process run's);
- `cwd`: every stage a `webpairs` subprocess started from a different working directory, with
  relative and absolute paths mixed.
The crawl: three WARC files (one gzipped) of pages on three sites whose URLs end in `>`, hold
unicode and query strings; their images are PNG, CMYK JPEG, EXIF-rotated JPEG, greyscale JPEG and
plain JPEG, served from 127.0.0.1; shards of at most 5 samples.
"""

from __future__ import annotations

import collections
import functools
import glob
import hashlib
import html
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from core import sample_layout as layout
from core.stageio import read_stats, read_success, read_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("links", "download", "filter", "pair", "shards")
FORMATS = ("jpeg", "png", "cmyk", "exif", "grey")
# (site, path): pages whose URLs a crawler must keep as they are
PAGES = [
    ("a.test", "/search?q=<b>"),
    ("a.test", "/wiki/Café_ü?x=1&y=two words"),
    ("a.test", "/tag/<em>"),
    ("b.test", "/p/日本語.html"),
    ("b.test", "/list?page=2&sort=-date&q=a%20b"),
    ("b.test", "/end>"),
    ("c.test", "/plain.html"),
    ("c.test", "/ünï/?q=\"x\"&r=<1>"),
    ("c.test", "/index.php?id=7#frag"),
]
IMAGES_PER_PAGE = 4
SAMPLES_PER_SHARD = 5


def _image(fmt: str, page: int, k: int) -> tuple[bytes, str]:
    """(bytes, content type) of image k of a page, in the given format (a generated photo of the
    page's topic, so that the images of one page are alike)."""
    from webpairs.testweb import generated_photo

    photo = generated_photo(page, k, (200 + 12 * k, 150 + 6 * page))
    buf = io.BytesIO()
    if fmt == "png":
        photo.save(buf, "PNG")
        return buf.getvalue(), "image/png"
    if fmt == "cmyk":
        photo.convert("CMYK").save(buf, "JPEG", quality=90)
    elif fmt == "exif":  # stored sideways, orientation 6: shown rotated 90 degrees clockwise
        exif = Image.Exif()
        exif[0x0112] = 6
        photo.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif)
    elif fmt == "grey":
        photo.convert("L").save(buf, "JPEG", quality=90)
    else:
        photo.save(buf, "JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"


def _build_web(folder: str, base: str) -> dict:
    """Routes of the image server, three WARC files of the pages; returns the ground truth."""
    from webpairs.testweb import Route, write_warc

    routes, pages, images = {}, {}, {}
    for p, (site, path) in enumerate(PAGES):
        tags = []
        for k in range(IMAGES_PER_PAGE):
            fmt = FORMATS[(p + k) % len(FORMATS)]
            data, ctype = _image(fmt, p, k)
            src = f"/img/{p}/{k}.{'png' if fmt == 'png' else 'jpg'}"
            routes[src] = Route(body=data, content_type=ctype)
            alt = f"Foto {k} · página {p} <{fmt}> & \"más\""
            images[base + src] = {"bytes": data, "format": fmt, "alt": alt}
            tags.append(f'<img src="{base}{src}" alt="{html.escape(alt)}">')
        pages[f"http://{site}{path}"] = "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + "\n".join(tags) + "</body></html>"
    urls = list(pages)
    warcs = os.path.join(folder, "warcs")
    for i, name in enumerate(("one.warc.gz", "two.warc", "three.warc")):
        write_warc(os.path.join(warcs, name), {u: pages[u] for u in urls[i::3]})
    return {"routes": routes, "pages": urls, "images": images, "warcs": warcs}


def _run_in_process(web: dict, out: str, beam_args=None, download=None) -> None:
    from core.config import CrawlConfig, DownloadConfig, FilterConfig, PairConfig, ShardConfig
    from crawl.download import run_download
    from crawl.extract import run_extract
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair
    from shards.writer import run_shards

    d = {s: os.path.join(out, s) for s in STAGES}
    run_extract(os.path.join(web["warcs"], "*.warc*"), d["links"], CrawlConfig(allow_hosts=("127.0.0.1",)), beam_args)
    if download:  # the dask run: download is img2dataset, not a Beam stage; it reuses a download
        os.symlink(download, d["download"])
    else:
        run_download(d["links"], d["download"], DownloadConfig(allow_hosts=("127.0.0.1",), processes=1, timeout=10))
    run_filter(d["download"], d["filter"], FilterConfig(encoder="efficientnet-lite0"), beam_args)
    run_pair(d["filter"], d["pair"], PairConfig(sim_low=0.0, sim_high=0.99), beam_args)
    run_shards(d["pair"], d["shards"], ShardConfig(samples_per_shard=SAMPLES_PER_SHARD), beam_args)


def _run_from_elsewhere(web: dict, out: str) -> None:
    """Each stage a `webpairs` process started in its own directory; relative paths are relative
    to that directory, some inputs and outputs absolute."""
    exe = os.path.join(os.path.dirname(sys.executable), "webpairs")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    root = os.path.dirname(out)
    d = {s: os.path.join(out, s) for s in STAGES}

    def rel(path: str, cwd: str) -> str:
        return os.path.relpath(path, cwd)

    steps = [
        ("w-extract", lambda c: ["crawl", "extract", rel(web["warcs"], c) + "/*.warc*", "--out", rel(d["links"], c), "--allow-hosts", "127.0.0.1"]),
        ("w-download", lambda c: ["crawl", "download", d["links"], "--out", rel(d["download"], c), "--allow-hosts", "127.0.0.1", "--processes", "1", "--timeout", "10"]),
        ("/", lambda c: ["filter", rel(d["download"], c), "--out", rel(d["filter"], c), "--encoder", "efficientnet-lite0"]),
        ("w-pair", lambda c: ["pair", rel(d["filter"], c), "--out", d["pair"], "--sim-low", "0.0", "--sim-high", "0.99"]),
        ("w-shards", lambda c: ["shards", d["pair"] + "/", "--out", rel(d["shards"], c), "--samples-per-shard", str(SAMPLES_PER_SHARD)]),
    ]
    for where, args in steps:
        cwd = where if where == "/" else os.path.join(root, where)
        os.makedirs(cwd, exist_ok=True)
        r = subprocess.run([exe, *args(cwd)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (args(cwd), r.stdout[-2000:], r.stderr[-4000:])


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    from webpairs.testweb import serve_routes

    folder = str(tmp_path_factory.mktemp("readback-web"))
    routes: dict = {}
    with serve_routes(routes) as base:
        truth = _build_web(folder, base)
        routes.update(truth["routes"])
        truth["base"] = base
        yield truth


@pytest.fixture(scope="module")
def runs(tmp_path_factory, web):
    """The three runs, each built on first use."""

    @functools.lru_cache(maxsize=None)
    def build(kind: str) -> str:
        out = str(tmp_path_factory.mktemp(f"readback-{kind}") / "run")
        if kind == "inprocess":
            _run_in_process(web, out)
        elif kind == "dask":
            from core.dask_runner import dask_cluster

            with dask_cluster(None, 2) as address:
                _run_in_process(web, out, ["--runner", "dask", "--dask-address", address], download=os.path.join(build("inprocess"), "download"))
        else:
            _run_from_elsewhere(web, out)
        return out

    return build


KINDS = ["inprocess", "dask", "cwd"]


@pytest.fixture(scope="module", params=KINDS)
def run(request, runs):
    return runs(request.param)


# ---- readers ------------------------------------------------------------------------------------


def _tars(run: str) -> list[str]:
    manifest = json.load(open(os.path.join(run, "shards", layout.MANIFEST)))
    return [os.path.join(run, "shards", s["shard"]) for s in manifest["shards"]]


def _by_tarfile(run: str) -> dict:
    """key -> {extension: bytes}, and key -> [(name, header offset, end of padded data)]."""
    samples, spans = {}, collections.defaultdict(list)
    for t in _tars(run):
        with tarfile.open(t) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
                spans[key].append((os.path.basename(t), m.name, m.offset, m.offset_data + -(-m.size // 512) * 512))
    return samples, spans


# ---- checks ---------------------------------------------------------------------------------------


def test_every_index_row_holds_exactly_its_samples_members(run):
    samples, spans = _by_tarfile(run)
    index = read_table(os.path.join(run, "shards"), "index").to_pylist()
    assert len(index) == len(samples) > 3 * SAMPLES_PER_SHARD and sorted(r["key"] for r in index) == sorted(samples)
    for row in index:
        mine = spans[row["key"]]
        assert {m[0] for m in mine} == {row["shard"]}
        assert row["offset"] == mine[0][2] and row["size"] == mine[-1][3] - mine[0][2], row
        with open(os.path.join(run, "shards", row["shard"]), "rb") as fh:
            fh.seek(row["offset"])
            chunk = fh.read(row["size"])
        with tarfile.open(fileobj=io.BytesIO(chunk + b"\0" * 1024)) as tar:
            got = {m.name: tar.extractfile(m).read() for m in tar}
        assert got == {f"{row['key']}.{ext}": data for ext, data in samples[row["key"]].items()}


def test_tarfile_webdataset_ray_and_hf_datasets_agree(run, tmp_path):
    import datasets
    import ray
    import webdataset as wds

    truth, _ = _by_tarfile(run)
    tars = _tars(run)
    exts = {layout.COND_JPG, layout.TARGET_JPG, layout.COND_NPY, layout.META_JSON}
    assert all(set(s) == exts for s in truth.values())
    # webdataset, undecoded
    got = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)}
    assert got == truth
    # Ray Data, undecoded
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(tars, decoder=None).take_all()
    finally:
        ray.shutdown()
    assert len(rows) == len(truth)
    assert {r["__key__"]: {k: bytes(r[k]) for k in exts} for r in rows} == truth
    # Hugging Face datasets' webdataset builder: images as undecoded bytes, json and npy decoded
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf"))
    ds = ds.cast_column(layout.COND_JPG, datasets.Image(decode=False)).cast_column(layout.TARGET_JPG, datasets.Image(decode=False))
    assert len(ds) == len(truth)
    for row in ds:
        want = truth[row["__key__"]]
        assert row[layout.COND_JPG]["bytes"] == want[layout.COND_JPG] and row[layout.TARGET_JPG]["bytes"] == want[layout.TARGET_JPG]
        assert row[layout.META_JSON] == json.loads(want[layout.META_JSON])
        assert np.array_equal(np.asarray(row[layout.COND_NPY], dtype=np.float16), np.load(io.BytesIO(want[layout.COND_NPY])))


def test_random_access_by_key_with_wids(run, tmp_path):
    import duckdb
    import wids

    truth, _ = _by_tarfile(run)
    shards = os.path.join(run, "shards")
    desc = json.load(open(os.path.join(shards, layout.WIDS)))
    manifest = json.load(open(os.path.join(shards, layout.MANIFEST)))
    assert [(s["url"], s["nsamples"], s["filesize"]) for s in desc["shardlist"]] == [(s["shard"], s["samples"], os.path.getsize(os.path.join(shards, s["shard"]))) for s in manifest["shards"]]
    ds = wids.ShardListDataset(os.path.join(shards, layout.WIDS), cache_dir=str(tmp_path / "wids"), transformations=[])
    assert len(ds) == len(truth)
    # key -> wids sample number: the README's query (shards in name order, samples by offset)
    numbers = dict(duckdb.sql(f"SELECT key, row_number() OVER (ORDER BY shard, \"offset\") - 1 FROM read_parquet('{shards}/index/*.parquet')").fetchall())
    keys = sorted(truth)
    np.random.default_rng(0).shuffle(keys)
    for key in keys:  # in random order
        sample = ds[numbers[key]]
        assert sample["__key__"] == key
        assert {k[1:]: v.getvalue() if hasattr(v, "getvalue") else v for k, v in sample.items() if not k.startswith("__")} == truth[key]


def _small(img: Image.Image) -> np.ndarray:
    """An image at 1/8 of its size (box filter): what is left after JPEG's re-encoding noise."""
    return np.asarray(img.reduce(8), dtype=np.float32)


def test_every_sample_equals_the_stages_it_came_from(run, web):
    truth, _ = _by_tarfile(run)
    pairs = {p["pair_id"]: p for p in read_table(os.path.join(run, "pair"), "pairs").to_pylist()}
    index = {r["key"]: r for r in read_table(os.path.join(run, "shards"), "index").to_pylist()}
    images = {r["image_id"]: r for r in read_table(os.path.join(run, "filter"), "images").to_pylist()}
    # filter's rows point to their bytes in download's row (issue 34): follow each pointer
    from downloads import pointed_bytes

    assert all(r["image_bytes"] is None for r in images.values())
    for r, data in zip(images.values(), pointed_bytes(list(images.values()), os.path.join(run, "download"))):
        r["image_bytes"] = data
    occurrences = read_table(os.path.join(run, "filter"), "occurrences").to_pylist()
    assert sorted(truth) == sorted(pairs) == sorted(index)
    formats = collections.Counter()
    for key, sample in truth.items():
        p = pairs[key]
        meta = json.loads(sample[layout.META_JSON])
        assert meta == {k: p[k] for k in layout.META_FIELDS}
        assert {k: index[key][k] for k in ("page_url", "cond_image_id", "target_image_id", "similarity")} == {k: p[k] for k in ("page_url", "cond_image_id", "target_image_id", "similarity")}
        cond = images[p["cond_image_id"]]
        assert np.array_equal(np.load(io.BytesIO(sample[layout.COND_NPY])), np.asarray(cond["embedding"], dtype=np.float16))
        for side in ("cond", "target"):
            img = images[p[f"{side}_image_id"]]
            served = web["images"][p[f"{side}_url"]]
            assert img["image_bytes"] == served["bytes"] and p[f"{side}_alt"] == served["alt"]  # the page's alt text, unicode and all
            jpg = sample[f"{side}.jpg"]
            if served["format"] == "jpeg":  # a plain RGB JPEG is stored as downloaded
                assert jpg == served["bytes"]
            formats[served["format"]] += 1
            shown = Image.open(io.BytesIO(jpg))
            original = ImageOps.exif_transpose(Image.open(io.BytesIO(served["bytes"]))).convert("RGB")
            assert shown.mode == "RGB" and shown.size == original.size == (img["width"], img["height"])
            assert _small(shown).shape == _small(original).shape and np.abs(_small(shown) - _small(original)).mean() < 2  # the same picture, upright
    assert set(formats) == set(FORMATS)  # every kind of image made it into a sample
    # the page URLs are the captured ones: `>` at the end, unicode, queries (percent-encoded once)
    from crawl.urls import normalize_url

    expected = {normalize_url(u, u)[0] for u in web["pages"]}
    assert {o["page_url"] for o in occurrences} == expected
    assert {p["page_url"] for p in pairs.values()} == expected
    assert any(u.endswith("%3E") for u in expected)


def _parts(stage_dir: str) -> dict[str, list[str]]:
    marker = read_success(stage_dir)
    parts = collections.defaultdict(list)
    for f in marker["files"]:
        if f.endswith(".parquet"):
            parts[f.split("/", 1)[0]].append(os.path.join(stage_dir, f))
    return parts


def test_duckdb_and_pyarrow_agree_and_stats_count_the_rows(run):
    import duckdb

    for stage in STAGES:
        stage_dir = os.path.join(run, stage)
        parts = _parts(stage_dir)
        counts = {}
        for part, files in parts.items():
            n = 0
            for f in files:
                ours = pq.read_table(f)
                rel = duckdb.sql(f"SELECT * FROM read_parquet('{f}')")
                assert rel.columns == ours.column_names
                rows = rel.fetchall()
                assert rows == [tuple(r.values()) for r in ours.to_pylist()], f
                n += len(rows)
            counts[part] = n
            assert duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchone()[0] == n
        stats = read_stats(stage_dir)
        rejected = collections.Counter()
        if "rejected" in parts:
            rejected.update(dict(duckdb.sql(f"SELECT reason, count(*) FROM read_parquet({parts['rejected']!r}) GROUP BY reason").fetchall()))
        assert dict(rejected) == {k: v for k, v in stats["rejected"].items() if v}, stage
        assert stats["input"] == stats["kept"] + sum(rejected.values()), stage
        main = {"links": "links", "download": "occurrences", "filter": "occurrences", "pair": "images", "shards": "index"}[stage]
        assert counts[main] == stats["kept"] + (sum(rejected.values()) if stage in ("download", "filter") else 0), (stage, counts, stats)
    pair_stats = read_stats(os.path.join(run, "pair"))
    assert pair_stats["pairs"] == _count(run, "pair", "pairs") == _count(run, "shards", "index") == json.load(open(os.path.join(run, "shards", layout.MANIFEST)))["samples"]


def _count(run: str, stage: str, part: str) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in _parts(os.path.join(run, stage))[part])


def test_the_three_runs_write_the_same_samples(runs):
    """In process, on Dask and from other directories: the same shards holding the same samples
    (embeddings and similarities may differ in their last bits: the encoder batches differently)."""
    shards, samples = {}, {}
    for kind in KINDS:
        manifest = json.load(open(os.path.join(runs(kind), "shards", layout.MANIFEST)))
        shards[kind] = [(s["shard"], s["samples"]) for s in manifest["shards"]]
        for t, s in zip(_tars(runs(kind)), manifest["shards"]):
            assert hashlib.sha256(open(t, "rb").read()).hexdigest() == s["sha256"] and os.path.getsize(t) == s["bytes"]
        samples[kind], _ = _by_tarfile(runs(kind))
    assert shards["inprocess"] == shards["dask"] == shards["cwd"]
    for kind in ("dask", "cwd"):
        assert sorted(samples[kind]) == sorted(samples["inprocess"])
        for key, sample in samples[kind].items():
            ref = samples["inprocess"][key]
            assert {k: v for k, v in sample.items() if k not in (layout.COND_NPY, layout.META_JSON)} == {k: v for k, v in ref.items() if k not in (layout.COND_NPY, layout.META_JSON)}
            ma, mb = json.loads(sample[layout.META_JSON]), json.loads(ref[layout.META_JSON])
            assert abs(ma.pop("similarity") - mb.pop("similarity")) < 1e-3 and ma == mb
            a, b = (np.load(io.BytesIO(x[layout.COND_NPY])).astype(np.float32) for x in (sample, ref))
            assert np.abs(a - b).max() < 2e-3


# ---- what a person sees: the browser and the report (headless Chromium) --------------------------

# every <img> of the cards in `sel`: the bytes the page fetched, and its pixels as decoded by Chromium
_DECODE_JS = """async (sel) => {
  const b64 = (u8) => { let s = ""; for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode.apply(null, u8.subarray(i, i + 0x8000)); return btoa(s); };
  const out = [];
  for (const card of document.querySelectorAll(sel)) {
    const imgs = [];
    for (const img of card.querySelectorAll("img")) {
      img.loading = "eager";
      await img.decode();
      const c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const px = ctx.getImageData(0, 0, c.width, c.height).data;
      const body = new Uint8Array(await (await fetch(img.currentSrc || img.src)).arrayBuffer());
      imgs.push({alt: img.alt, w: c.width, h: c.height, px: b64(new Uint8Array(px.buffer)), body: b64(body)});
    }
    out.push({key: card.dataset.key, imgs: imgs});
  }
  return out;
}"""


def _browser():
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (.ci/run installs it)")
    return chromium, pytest.importorskip("playwright.sync_api")


def _pixels(shown: dict) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(shown["px"]), np.uint8).reshape(shown["h"], shown["w"], 4)[..., :3].astype(np.int16)


def _same_picture(shown: dict, jpeg: bytes) -> None:
    """Chromium's decoding of what it showed is PIL's decoding of `jpeg` (JPEG decoders may differ
    by a level or two in a pixel)."""
    want = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)
    got = _pixels(shown)
    assert got.shape == want.shape and np.abs(got - want).mean() < 1.5, (got.shape, want.shape)


def _cards(page, truth: dict, sel: str = ".pair") -> list[str]:
    """Check every card in `sel`: each image is its own key's shard member, bytes and pixels."""
    import base64

    cards = page.evaluate(_DECODE_JS, sel)
    assert cards
    for card in cards:
        assert [i["alt"] for i in card["imgs"]] == ["condition", "target"]
        for shown, ext in zip(card["imgs"], (layout.COND_JPG, layout.TARGET_JPG)):
            member = truth[card["key"]][ext]
            assert base64.b64decode(shown["body"]) == member, (card["key"], ext)
            _same_picture(shown, member)
    return [c["key"] for c in cards]


def test_browser_cards_show_each_pairs_own_images(runs, tmp_path):
    """`webpairs browse` in headless Chromium: the first page, a page of one site and a page of a
    similarity range; every card's two images are its own key's shard members."""
    import socket

    chromium, sync_api = _browser()
    run = runs("inprocess")
    truth, _ = _by_tarfile(run)
    index = {r["key"]: r for r in read_table(os.path.join(run, "shards"), "index").to_pylist()}
    exe = os.path.join(os.path.dirname(sys.executable), "webpairs")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    server = subprocess.Popen([exe, "browse", run, "--port", "0"], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stdout:
            if line.startswith("open "):
                url = line.split()[1]
                break
        assert url, server.stderr.read()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                page.wait_for_function("+document.body.dataset.renders > 0", timeout=60_000)
                first = _cards(page, truth)
                assert len(first) == 24 == len(set(first))
                # one site
                from core.sites import site_of

                site = "b.test"
                n = int(page.evaluate("document.body.dataset.renders"))
                page.select_option("#site", site)
                page.wait_for_function(f"+document.body.dataset.renders > {n}", timeout=60_000)
                keys = _cards(page, truth)
                assert keys and all(site_of(index[k]["page_url"]) == site for k in keys)
                # a similarity range
                sims = sorted(r["similarity"] for r in index.values())
                lo, hi = sims[len(sims) // 3], sims[2 * len(sims) // 3]
                n = int(page.evaluate("document.body.dataset.renders"))
                page.select_option("#site", "")  # a change of site renders on its own: wait for it first
                page.wait_for_function(f"+document.body.dataset.renders > {n}", timeout=60_000)
                n = int(page.evaluate("document.body.dataset.renders"))
                page.fill("#smin", f"{lo:.4f}")
                page.fill("#smax", f"{hi:.4f}")
                page.click("#apply")
                page.wait_for_function(f"+document.body.dataset.renders > {n}", timeout=60_000)
                keys = _cards(page, truth)
                assert len(keys) == min(24, sum(round(lo, 4) <= v <= round(hi, 4) for v in sims))
                assert all(round(lo, 4) - 1e-6 <= index[k]["similarity"] <= round(hi, 4) + 1e-6 for k in keys)
                assert not errors and not page.inner_text("#message")
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_report_example_pairs_show_their_own_thumbnails(runs, tmp_path):
    """The HTML report's example pairs (thumbnails inlined in the page): each is the thumbnail of
    its own key's shard member, as Chromium decodes it."""
    import base64

    from browse.quality import _thumb
    from browse.report import write_report

    chromium, sync_api = _browser()
    run = runs("inprocess")
    truth, _ = _by_tarfile(run)
    report = tmp_path / "report.html"
    write_report(run, str(report))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"file://{report}")
            cards = page.evaluate(_DECODE_JS, "div.pair")
        finally:
            browser.close()
    assert len(cards) == 12 and len({c["key"] for c in cards}) == 12
    for card in cards:
        for shown, ext in zip(card["imgs"], (layout.COND_JPG, layout.TARGET_JPG)):
            thumb = base64.b64decode(_thumb(truth[card["key"]][ext], 160))
            assert base64.b64decode(shown["body"]) == thumb, (card["key"], ext)
            _same_picture(shown, thumb)
