"""The hash blocklist (issue 32): known-bad images are refused as their bytes arrive and no byte of
them reaches any file of the run; exact (sha256, md5) and perceptual (PDQ) entries; the index."""

import glob
import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.perceptual import distance, pdq_of_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "webpairs.cli", *args], env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})), capture_output=True, text=True, timeout=timeout)


def _jpeg(img, quality=90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _windows(body: bytes, n: int = 12, width: int = 40) -> list[bytes]:
    """Slices of the entropy-coded middle of an image (JPEG headers are shared by many files)."""
    return [body[int(o):int(o) + width] for o in np.linspace(len(body) // 4, len(body) - width - 8, n)]


def _run_files(*roots) -> dict[str, bytes]:
    """Every file under the roots (hidden ones too), and the decoded binary cells of each parquet
    file (whatever its compression), keyed by path."""
    out = {}
    for root in roots:
        for path in glob.glob(os.path.join(root, "**"), recursive=True, include_hidden=True):
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                out[path] = fh.read()
            if path.endswith(".parquet"):
                table = pq.read_table(path)
                cells = [v for col in table.columns if col.type in ("binary", "large_binary") for v in col.to_pylist() if v]
                out[path + "#cells"] = b"".join(cells)
    return out


def _found(files: dict[str, bytes], body: bytes) -> list[str]:
    return sorted({path for path, data in files.items() for w in _windows(body) if w in data})


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, photos_dir):
    """A loopback web of 6 pages of real photos with blocklisted images planted three ways (an
    exact copy, re-encoded at quality 60, resized to 80 %), one more exact copy as a boilerplate
    banner on every page (fetched once, as boilerplate evidence), and each PDQ-planted photo's
    nearest look-alike in the sample (by PDQ distance): `webpairs run --blocklist` through shards."""
    from PIL import Image

    from webpairs.testweb import Route, serve_routes, write_warc

    tmp = tmp_path_factory.mktemp("blocklist")
    names = sorted(os.listdir(photos_dir))
    raw = {n: open(os.path.join(photos_dir, n), "rb").read() for n in names}
    hashes = {n: pdq_of_bytes(raw[n])[0] for n in names}
    exact_sha, exact_md5, reenc, resized, banner = names[3], names[40], names[77], names[150], names[222]

    def nearest(name):
        return min((n for n in names if n != name), key=lambda n: distance(hashes[n], hashes[name]))

    lookalikes = {reenc: nearest(reenc), resized: nearest(resized)}
    img = lambda n: Image.open(io.BytesIO(raw[n]))  # noqa: E731
    bad = {  # path -> (served bytes, the entry kind that must match)
        "/img/exact-sha.jpg": (raw[exact_sha], "sha256"),
        "/img/exact-md5.jpg": (raw[exact_md5], "md5"),
        "/img/reencoded.jpg": (_jpeg(img(reenc), 60), "pdq"),
        "/img/resized.jpg": (_jpeg(img(resized).resize((img(resized).width * 4 // 5, img(resized).height * 4 // 5), Image.LANCZOS)), "pdq"),
        "/static/banner.jpg": (raw[banner], "sha256"),
    }
    chosen = [n for n in names[5::11] if n not in (exact_sha, exact_md5, reenc, resized, banner, *lookalikes.values())][:20]
    good = {f"/img/photo{i}.jpg": raw[n] for i, n in enumerate(chosen)}
    good.update({f"/img/lookalike{i}.jpg": raw[n] for i, n in enumerate(lookalikes.values())})
    good["/img/people.jpg"] = raw["n02088466_bloodhound.JPEG"]  # a dog and its owner's face (the browser's face filter)
    routes = {p: Route(body=b) for p, (b, _) in bad.items()} | {p: Route(body=b) for p, b in good.items()}
    planted = [p for p in bad if p.startswith("/img/")]
    good_paths = list(good)
    lists = [tmp / "list-a.txt", tmp / "list-b.txt"]
    lists[0].write_text(f"# trust and safety list A\n\nsha256:{hashlib.sha256(bad['/img/exact-sha.jpg'][0]).hexdigest()}\nmd5:{hashlib.md5(bad['/img/exact-md5.jpg'][0]).hexdigest().upper()}  # upper case\n")
    lists[1].write_text(f"pdq:{hashes[reenc].hex()}\npdq:{hashes[resized].hex()}\nsha256:{hashlib.sha256(raw[banner]).hexdigest()}\n")
    with serve_routes(routes) as base:
        pages = {}
        for p in range(6):
            imgs = good_paths[p * 4:(p + 1) * 4] + ([planted[p]] if p < len(planted) else []) + (["/img/lookalike0.jpg"] if p == 4 else []) + (["/img/lookalike1.jpg"] if p == 5 else []) + ["/static/banner.jpg"]
            pages[f"{base}/page/{p}.html"] = "<html><body>" + "".join(f'<img src="{src}" alt="photo {k}">' for k, src in enumerate(imgs)) + "</body></html>"
        warc = str(tmp / "web" / "web.warc.gz")
        write_warc(warc, pages)
        run, tmpdir = str(tmp / "run"), tmp / "tmpdir"
        tmpdir.mkdir()
        proc = _cli("run", warc, "--out", run, "--allow-hosts", "127.0.0.1", "--encoder", "efficientnet-lite0", "--no-train", "--blocklist", str(lists[0]), "--blocklist", str(lists[1]), env={"TMPDIR": str(tmpdir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": run, "tmpdir": str(tmpdir), "base": base, "bad": bad, "planted": planted, "good": good, "lists": [str(p) for p in lists], "lookalikes": lookalikes, "hashes": hashes, "raw": raw}


def test_no_byte_of_a_blocklisted_image_is_in_any_file_of_the_run(planted_run):
    files = _run_files(planted_run["run"], planted_run["tmpdir"])
    assert len(files) > 20
    for path, (body, _) in planted_run["bad"].items():
        assert not _found(files, body), path
    # the scan sees images where they are: every kept photo is in the download's files and in a shard
    in_shards = 0
    for path, body in planted_run["good"].items():
        where = _found(files, body)
        assert any("/download/" in w for w in where), (path, where)
        in_shards += any(w.endswith(".tar") for w in where)
    assert in_shards >= 10  # the photos that made a pair


def test_each_planted_image_has_a_blocklisted_row_naming_its_entry(planted_run):
    from core.stageio import read_stats, read_table

    run, base = planted_run["run"], planted_run["base"]
    rejected = read_table(os.path.join(run, "download"), "rejected").to_pandas()
    blocked = rejected[rejected.reason == "blocklisted"]
    assert sorted(blocked.url) == sorted(base + p for p in planted_run["planted"])
    for path in planted_run["planted"]:
        body, kind = planted_run["bad"][path]
        row = blocked[blocked.url == base + path].iloc[0]
        assert f"{kind}:" in row.detail and base + path in row.detail, row.detail
        if kind == "sha256":
            assert hashlib.sha256(body).hexdigest() in row.detail
        if kind == "md5":
            assert hashlib.md5(body).hexdigest() in row.detail
        listed = planted_run["lists"][0 if kind != "pdq" else 1]
        assert f"{listed} line" in row.detail
    pdq_rows = blocked[blocked.detail.str.contains("pdq:")]
    assert len(pdq_rows) == 2 and all("distance" in d for d in pdq_rows.detail)
    # the banner was fetched once as boilerplate evidence and refused there too: no image for it
    results = pq.read_table(os.path.join(run, "download", "_plan", "results")).to_pandas()
    banner = results[results.image_url == base + "/static/banner.jpg"]
    assert list(banner.reason) == ["blocklisted"] and banner.image_id.isna().all()
    stats = read_stats(os.path.join(run, "download"))
    assert stats["rejected"]["blocklisted"] == len(planted_run["planted"])
    from browse.report import collect, summary_text

    report = collect(run)
    assert report["safety"]["reasons"] == {"download blocklisted": len(planted_run["planted"])}
    assert f"safety:            download blocklisted={len(planted_run['planted'])}" in summary_text(report)
    assert "<h2>Safety</h2>" in open(os.path.join(run, "report.html")).read()
    assert stats["input"] == stats["kept"] + sum(stats["rejected"].values())


def test_look_alikes_and_other_photos_are_kept(planted_run):
    from core.stageio import read_table

    run, base = planted_run["run"], planted_run["base"]
    hashes = planted_run["hashes"]
    for original, lookalike in planted_run["lookalikes"].items():
        assert distance(hashes[original], hashes[lookalike]) > 31  # the nearest photo of the sample is still far
    occ = read_table(os.path.join(run, "download"), "occurrences").to_pandas()
    kept_urls = set(occ[occ.reason.isna() & occ.image_id.notna()].image_url)
    assert {base + p for p in planted_run["good"]} <= kept_urls
    images = read_table(os.path.join(run, "filter"), "images").to_pandas()
    assert {hashlib.sha256(b).hexdigest() for b in planted_run["good"].values()} <= set(images.sha256)


def test_index_matches_like_a_scan(tmp_path):
    """The multi-index PDQ lookup finds exactly what a full scan finds (random lists, random
    queries at every distance around the threshold), and exact lookups find every listed digest."""
    from crawl.blocklist import load_lists

    rng = np.random.default_rng(0)
    listed = rng.integers(0, 256, (20000, 32), dtype=np.uint8)
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(500)]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(f"pdq:{h.tobytes().hex()}" for h in listed) + "\n" + "\n".join(f"sha256:{d.hex()}" for d in digests) + "\n")
    for threshold in (31, 15, 40):
        index = load_lists([str(path)], threshold)
        for trial in range(300):
            q = np.unpackbits(listed[rng.integers(len(listed))])
            q[rng.choice(256, rng.integers(0, 50), replace=False)] ^= 1
            query = np.packbits(q)
            scan = np.unpackbits(listed ^ query, axis=1).sum(1)
            hit = index.lookup_pdq(query.tobytes())
            assert (hit is not None) == (scan.min() <= threshold)
            if hit:
                assert hit[1] == scan.min()
    assert all(index.lookup_exact("sha256", d) for d in digests)
    assert not any(index.lookup_exact("sha256", hashlib.sha256(str(-i).encode()).digest()) for i in range(1, 500))


@pytest.mark.parametrize(
    "text,message",
    [
        ("sha1:abcd\n", "line 1"),
        ("# ok\nsha256:abcd\n", "line 2"),
        ("md5:" + "zz" * 16 + "\n", "not hex"),
        ("pdq:" + "ab" * 31 + "\n", "64 hex digits"),
    ],
)
def test_a_bad_list_line_names_file_and_line(tmp_path, text, message):
    from core.config import ConfigError
    from crawl.blocklist import compile_index

    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        compile_index([str(bad)], str(tmp_path / "index"))


def test_a_bad_list_is_one_clear_error_on_the_command_line(tmp_path):
    from core.records import LINK_SCHEMA, LinkRecord, rows_to_table
    from core.stageio import finish_stage

    links = tmp_path / "links"
    (links / "links").mkdir(parents=True)
    pq.write_table(rows_to_table([LinkRecord("http://www.example.com/", "http://127.0.0.1:9/a.jpg").to_row()], LINK_SCHEMA), links / "links" / "part-0.parquet")
    (links / "stats.json").write_text('{"stage": "extract", "input": 1, "kept": 1, "rejected": {}}')
    finish_stage(str(links), "extract")
    bad = tmp_path / "bad.txt"
    bad.write_text("sha256:" + "ab" * 32 + "\nsha256:xyz\n")
    proc = _cli("crawl", "download", str(links), "--out", str(tmp_path / "dl"), "--blocklist", str(tmp_path / "nope.txt"), "--blocklist", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("webpairs crawl download: error: cannot read blocklist") and "nope.txt" in proc.stderr
    proc = _cli("crawl", "download", str(links), "--out", str(tmp_path / "dl"), "--blocklist", str(bad))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"webpairs crawl download: error: blocklist {bad} line 2:")
    assert not os.path.exists(tmp_path / "dl")  # refused before the stage started


def test_browse_filters_pairs_by_faces(planted_run):
    """`webpairs browse`'s pair filter by face count (faces of both images, filter's count)."""
    from browse.data import RunData
    from core.stageio import read_table

    run = planted_run["run"]
    faces = dict(zip(*read_table(os.path.join(run, "filter"), "images", columns=["image_id", "faces"]).to_pydict().values()))
    index = read_table(os.path.join(run, "shards"), "index").to_pandas()
    with_faces = {r.key for r in index.itertuples() if faces[r.cond_image_id] + faces[r.target_image_id] >= 1}
    assert 0 < len(with_faces) < len(index)
    data = RunData(run)
    try:
        got = data.pairs(fmin=1, limit=200)
        assert got["total"] == len(with_faces) and {r["key"] for r in got["rows"]} == with_faces
        assert all(r["faces"] >= 1 for r in got["rows"])
        none = data.pairs(fmax=0, limit=200)
        assert none["total"] == len(index) - len(with_faces) and not {r["key"] for r in none["rows"]} & with_faces
        assert data.pairs()["total"] == len(index)
    finally:
        data.close()


def test_scrub_removes_listed_images_from_every_stage_and_the_run_reads_back(planted_run, tmp_path):
    """`webpairs scrub` (kept last in this module: it rewrites the module's run) by a PDQ entry and
    by a URL: no byte of the two photos is left in any file, no row of any stage names them, every
    stage reconciles and agrees with the next, and every sample of the rewritten shards reads back
    by the index's byte ranges (tarfile) and through webdataset."""
    import json
    import tarfile

    import webdataset as wds

    from core.stageio import read_stats, read_table, stage_files

    run, base, raw = planted_run["run"], planted_run["base"], planted_run["raw"]
    good = planted_run["good"]
    by_pdq, by_url = "/img/photo0.jpg", "/img/photo5.jpg"
    listed = tmp_path / "takedown.txt"
    listed.write_text(f"# take-down\npdq:{pdq_of_bytes(good[by_pdq])[0].hex()}\n")
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{base}{by_url}\n")
    shards_before = read_stats(os.path.join(run, "shards"))["kept"]
    proc = _cli("scrub", run, "--blocklist", str(listed), "--urls", str(urls))
    assert proc.returncode == 0, proc.stderr[-2000:]
    removed_ids = {hashlib.sha256(good[p]).hexdigest()[:16] for p in (by_pdq, by_url)}
    assert all(f"image {i}:" in proc.stdout for i in removed_ids) and "scrubbed 2 images, 2 links" in proc.stdout

    files = _run_files(run)
    for path in (by_pdq, by_url):
        assert not _found(files, good[path]), path
    for path in ("/img/photo1.jpg", "/img/photo2.jpg"):  # the others are still there
        assert _found(files, good[path])
    # no row of any stage names them, except extract's scrubbed rejects
    for f in glob.glob(os.path.join(run, "**", "*.parquet"), recursive=True):
        t = pq.read_table(f)
        for col in ("image_id", "cond_image_id", "target_image_id"):
            if col in t.column_names:
                assert not removed_ids & set(t.column(col).to_pylist()), (f, col)
        for col in ("image_url", "url", "cond_url", "target_url", "key"):
            if col in t.column_names:
                named = {base + by_pdq, base + by_url} & set(t.column(col).to_pylist())
                if named:
                    assert f.startswith(os.path.join(run, "links", "rejected")), (f, col)
                    assert set(t.to_pandas().query("url in @named").reason) == {"scrubbed"}
    # every stage reconciles and agrees with the next
    stats = {s: read_stats(os.path.join(run, s)) for s in ("links", "download", "filter", "pair", "shards")}
    for s in stats.values():
        assert s["input"] == s["kept"] + sum(s["rejected"].values())
    assert stats["links"]["rejected"]["scrubbed"] == 2
    assert stats["download"]["input"] == stats["links"]["kept"] and stats["filter"]["input"] == stats["download"]["kept"]
    assert stats["pair"]["input"] == stats["filter"]["kept"] and stats["shards"]["input"] == stats["pair"]["pairs"]
    assert read_table(os.path.join(run, "pair"), "images").num_rows == stats["pair"]["kept"]
    assert stats["shards"]["kept"] < shards_before
    # the shards read back: manifest sizes and sha256, every index row's byte range, webdataset
    shards = os.path.join(run, "shards")
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    index = read_table(shards, "index").to_pandas()
    assert len(index) == manifest["samples"] == stats["shards"]["kept"]
    assert not removed_ids & (set(index.cond_image_id) | set(index.target_image_id))
    for entry in manifest["shards"]:
        data = open(os.path.join(shards, entry["shard"]), "rb").read()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    for row in index.itertuples():
        with open(os.path.join(shards, row.shard), "rb") as fh:
            fh.seek(row.offset)
            chunk = fh.read(row.size)
        with tarfile.open(fileobj=io.BytesIO(chunk + b"\0" * 1024)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        assert set(members) == {f"{row.key}.cond.jpg", f"{row.key}.target.jpg", f"{row.key}.json", f"{row.key}.cond.npy"}
        meta = json.loads(members[f"{row.key}.json"])
        assert (meta["cond_image_id"], meta["target_image_id"]) == (row.cond_image_id, row.target_image_id)
    wids = json.load(open(os.path.join(shards, "wids.json")))  # webdataset's indexed reader numbers what is left
    assert [(s["url"], s["nsamples"]) for s in wids["shardlist"]] == [(e["shard"], e["samples"]) for e in manifest["shards"]]
    tars = [os.path.join(shards, e["shard"]) for e in manifest["shards"]]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(index.key)
    assert len(stage_files(os.path.join(run, "filter"), "images", expected="filter")) >= 1
    # filter and pair record the rewritten outputs they point into, not the ones scrub replaced ...
    from core.stageio import stale_input

    assert stale_input(os.path.join(run, "filter")) is None and stale_input(os.path.join(run, "pair")) is None
    for f in stage_files(os.path.join(run, "download"), "downloads", expected="download"):  # ... and downloads/ keeps download's settings
        col = {c.path_in_schema: c for c in (pq.ParquetFile(f).metadata.row_group(0).column(i) for i in range(pq.ParquetFile(f).metadata.num_columns))}
        assert col["image_bytes"].compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in col["image_bytes"].encodings
    # pair's pointers into filter's rewritten images still hold: the shards build again from pair
    rebuilt = _cli("shards", os.path.join(run, "pair"), "--out", str(tmp_path / "shards-again"))
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert read_stats(str(tmp_path / "shards-again")) == {**stats["shards"], "rejected": {}}
    # a second scrub finds nothing more
    again = _cli("scrub", run, "--blocklist", str(listed), "--urls", str(urls))
    assert again.returncode == 0 and "scrubbed 0 images, 0 links" in again.stdout


def test_blocklist_in_the_config_file(tmp_path):
    from core.config import ConfigError, DownloadConfig, load

    cfg = tmp_path / "run.yaml"
    cfg.write_text("download:\n  blocklist: [a.txt, b.txt]\n  blocklist_pdq_distance: 20\n")
    got = load(DownloadConfig, str(cfg), section="download")
    assert got.blocklist == ("a.txt", "b.txt") and got.blocklist_pdq_distance == 20
    cfg.write_text("download:\n  blocklist_pdq_distance: 64\n")
    with pytest.raises(ConfigError, match="out of range"):
        load(DownloadConfig, str(cfg), section="download")
