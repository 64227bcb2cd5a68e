"""Filter's link join without a shuffle (issue 34): verdicts, score rejects and links are spilled by
join bucket and each bucket is joined on its own, so the in-process runner no longer holds every
link and verdict of the input (a CoGroupByKey did). Every link's outcome is checked against what it
must be, with one bucket and with many, and the outputs are read back with DuckDB."""

from __future__ import annotations

import hashlib
import io
import json
import os

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from core.config import FilterConfig


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _images(photos_dir: str) -> list[tuple[bytes, str]]:
    """(bytes, the image's own verdict: None or the reason) of every kind filter tells apart."""
    out = []
    names = sorted(os.listdir(photos_dir))[:12]
    for i, name in enumerate(names):  # photos, small enough to be quick
        with Image.open(os.path.join(photos_dir, name)) as img:
            img = img.convert("RGB")
            img.thumbnail((160, 160))
            out.append((_jpeg(img), None))
    for i in range(4):  # flat logos
        logo = Image.new("RGB", (200, 80), (250, 250, 250))
        ImageDraw.Draw(logo).rectangle((10, 10, 60 + i * 10, 40), fill=(200, 20, 20))
        out.append((_png(logo), "flat_image"))
    rng = np.random.default_rng(5)
    out.append((_png(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))), "too_small"))
    out.append((_png(Image.fromarray(rng.integers(0, 256, (70, 400, 3), dtype=np.uint8))), "bad_aspect"))
    out.append((b"not an image at all", "decode_error"))
    out.append((b"", "empty"))
    return out


image_verdicts: dict = {}  # link_id -> its image's own verdict (None: the image passes)
input_links: dict = {}  # link_id -> its occurrence row as download wrote it


def _download(root: str, photos_dir: str, missing=False, position_type=None) -> dict:
    """A complete download output: every image above with 1-4 links over two sites (some with a
    declared size under min_side, some whose URL names a logo, some fetched only as boilerplate
    evidence); returns {link_id: the filter_reason its occurrence must have}."""
    from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA
    from core.stageio import finish_stage

    rows, links, expected = [], [], {}
    image_verdicts.clear()
    input_links.clear()
    for i, (data, verdict) in enumerate(_images(photos_dir)):
        iid = hashlib.sha256(data + bytes([i])).hexdigest()[:16]
        rows.append({"image_id": iid, "image_url": f"http://a.example/img/{i}.jpg", "page_url": "http://a.example/p0", "alt": f"a photo {i}", "position": 0, "image_bytes": data, "sha256": hashlib.sha256(data).hexdigest(), "links": 1})
        for k in range(1 + i % 4):
            site = "a.example" if k % 2 == 0 else "b.example"
            url = f"http://{site}/{'logo' if (i + k) % 5 == 0 else 'img'}/{i}-{k}.jpg"
            link = {"link_id": f"l{i}-{k}", "page_url": f"http://{site}/p{k}", "site": site, "image_url": url, "alt": f"alt {i}" if k else None, "position": k,
                    "declared_width": 20 if (i + k) % 7 == 3 else None, "declared_height": None, "image_id": iid, "reason": "url_boilerplate" if (i * 3 + k) % 11 == 5 else None}
            links.append(link)
            input_links[link["link_id"]] = link
            image_verdicts[link["link_id"]] = verdict
            if link["reason"]:
                expected[link["link_id"]] = link["reason"]
            elif verdict:
                expected[link["link_id"]] = verdict
            elif link["declared_width"]:
                expected[link["link_id"]] = "declared_too_small"
            else:
                expected[link["link_id"]] = None
    if missing:  # True: an id that downloads/ lacks; "null": no id at all
        links.append({**links[0], "link_id": "orphan", "image_id": "0123456789abcdef" if missing is True else None})
    occurrence_schema = DOWNLOAD_OCCURRENCE_SCHEMA
    if position_type is not None:  # an occurrences file written with other integer types (older or hand-made)
        occurrence_schema = occurrence_schema.set(occurrence_schema.get_field_index("position"), pa.field("position", position_type))
    for name, data, schema in (("downloads", rows, DOWNLOAD_SCHEMA), ("occurrences", links, occurrence_schema)):
        os.makedirs(os.path.join(root, name))
        for f in range(2):  # two files, several row groups each
            pq.write_table(pa.Table.from_pylist(data[f::2], schema=schema), os.path.join(root, name, f"part-{f}.parquet"), row_group_size=5)
    with open(os.path.join(root, "stats.json"), "w") as fh:
        json.dump({"stage": "download", "input": len(links), "kept": len(links), "rejected": {}}, fh)
    finish_stage(root, "download")
    return expected


def _rows(con, out: str, name: str) -> list[tuple]:
    files = [os.path.join(out, f) for f in json.load(open(os.path.join(out, "_SUCCESS")))["files"] if f.startswith(name + "/")]
    return con.execute(f"SELECT * FROM read_parquet({files!r}) ORDER BY ALL").fetchall()


@pytest.mark.parametrize("join_links", [100_000, 7, 1])
def test_every_link_gets_its_images_verdict_in_any_number_of_buckets(tmp_path, photos_dir, monkeypatch, join_links):
    """Each link's occurrence row carries its image's hashes and the reason it must have (its own
    evidence reason, the image's verdict, a declared size under min_side), whether the join has one
    bucket (links read in place) or many (links spilled by bucket; 1 link a bucket at most); the
    rejected rows and stats.json agree, and the outputs equal the one-bucket run's, every row."""
    import filter.pipeline as fp
    from core.stageio import read_stats

    download = str(tmp_path / "download")
    expected = _download(download, photos_dir)
    monkeypatch.setattr(fp, "JOIN_LINKS", join_links)
    assert fp.join_buckets(len(expected)) == -(-len(expected) // join_links)
    out = str(tmp_path / "filter")
    stats = fp.run_filter(download, out, FilterConfig(encoder="none", faces="off"))
    con = duckdb.connect()
    occ = {r[0]: r for r in _rows(con, out, "occurrences")}
    assert set(occ) == set(expected)
    downloads = {r["image_id"]: r for r in pq.read_table(os.path.join(download, "downloads")).to_pylist()}
    for link_id, want in expected.items():
        row = dict(zip(("link_id", "page_url", "site", "image_url", "alt", "position", "image_id", "sha256", "phash", "width", "height", "filter_reason"), occ[link_id]))
        assert row["filter_reason"] == want, link_id
        assert row["sha256"] == hashlib.sha256(downloads[row["image_id"]]["image_bytes"]).hexdigest()
        assert (row["phash"] is None) == (row["width"] is None) == (image_verdicts[link_id] in ("decode_error", "empty"))
        source = input_links[link_id]  # the link's own columns, from the download row it came from
        assert (row["page_url"], row["site"], row["image_url"], row["alt"], row["position"], row["image_id"]) == (
            source["page_url"], source["site"], source["image_url"], source["alt"] or "", source["position"] or 0, source["image_id"]), link_id
    rejected = {r[0]: r[2] for r in _rows(con, out, "rejected")}  # link_id -> reason; evidence links are not counted
    assert rejected == {k: v for k, v in expected.items() if v and v != "url_boilerplate"}
    counted = [k for k, v in expected.items() if v != "url_boilerplate"]
    assert stats["input"] == len(counted) and stats["kept"] == sum(expected[k] is None for k in counted)
    assert read_stats(out) == stats and stats["occurrences"] == len(expected)
    from filter.signals import url_words

    words = [k for k, link in input_links.items() if not link["reason"] and image_verdicts[k] is None and url_words(link["image_url"], FilterConfig().url_words)]
    assert len(words) > 2 and stats["url_word_matches"] == len(words)
    assert not os.path.exists(os.path.join(out, fp.SPILL)) and not any(".spill" in f for f in json.load(open(os.path.join(out, "_SUCCESS")))["files"])
    if join_links != 100_000:  # the same rows as with one bucket
        monkeypatch.setattr(fp, "JOIN_LINKS", 100_000)
        one = str(tmp_path / "one")
        assert fp.run_filter(download, one, FilterConfig(encoder="none", faces="off")) == stats
        for name in ("images", "occurrences", "rejected"):
            assert _rows(con, out, name) == _rows(con, one, name), name


def test_score_rejects_reach_every_link_of_their_image_in_many_buckets(tmp_path, photos_dir, monkeypatch):
    """With an encoder and --min-clip-score, an image whose score is under it rejects each of its
    links as low_clip_score (through the score rejects' spill), in many join buckets: every link of
    the run without the threshold is checked."""
    import filter.pipeline as fp

    download = str(tmp_path / "download")
    expected = _download(download, photos_dir)
    monkeypatch.setattr(fp, "JOIN_LINKS", 5)
    free = str(tmp_path / "free")
    fp.run_filter(download, free, FilterConfig(encoder="tiny-clip", faces="off"))
    con = duckdb.connect()
    scores = dict(con.execute(f"SELECT image_id, clip_score FROM read_parquet({[os.path.join(free, f) for f in json.load(open(os.path.join(free, '_SUCCESS')))['files'] if f.startswith('images/')]!r})").fetchall())
    assert len(scores) == 12
    threshold = float(np.median(list(scores.values())))
    strict = str(tmp_path / "strict")
    stats = fp.run_filter(download, strict, FilterConfig(encoder="tiny-clip", faces="off", min_clip_score=threshold))
    occ = {r[0]: (r[6], r[11]) for r in _rows(con, strict, "occurrences")}
    low = 0
    for link_id, want in expected.items():
        image_id, got = occ[link_id]
        if want != "url_boilerplate" and image_verdicts[link_id] is None and scores[image_id] < threshold:  # before the link's own checks
            want, low = "low_clip_score", low + 1
        assert got == want, link_id
    assert low > 0 and stats["rejected"]["low_clip_score"] == low


def test_a_link_to_an_image_missing_from_downloads_is_an_error(tmp_path, photos_dir, monkeypatch):
    import filter.pipeline as fp
    from core.stageio import StageError

    for missing, name in ((True, "0123456789abcdef"), ("null", "None")):  # an unknown id; a link with no id
        download = str(tmp_path / f"download-{name}")
        _download(download, photos_dir, missing=missing)
        for join_links in (100_000, 4):
            monkeypatch.setattr(fp, "JOIN_LINKS", join_links)
            with pytest.raises(Exception) as err:
                fp.run_filter(download, str(tmp_path / f"filter-{name}-{join_links}"), FilterConfig(encoder="none", faces="off"))
            assert f"image {name} of the download occurrences is missing from its downloads/" in str(err.value), (name, join_links)
            assert isinstance(err.value, StageError) or "StageError" in repr(err.value)


def test_occurrences_with_other_integer_types_join_in_any_number_of_buckets(tmp_path, photos_dir, monkeypatch):
    """An occurrences file whose position is int64 (older or hand-made) is read as with one bucket
    when the links are spilled by bucket: the same rows, every one."""
    import filter.pipeline as fp

    download = str(tmp_path / "download")
    expected = _download(download, photos_dir, position_type=pa.int64())
    con = duckdb.connect()
    outs = {}
    for join_links in (100_000, 4):
        monkeypatch.setattr(fp, "JOIN_LINKS", join_links)
        outs[join_links] = str(tmp_path / f"filter{join_links}")
        fp.run_filter(download, outs[join_links], FilterConfig(encoder="none", faces="off"))
    occ = _rows(con, outs[4], "occurrences")
    assert {r[0] for r in occ} == set(expected)
    for name in ("images", "occurrences", "rejected"):
        assert _rows(con, outs[4], name) == _rows(con, outs[100_000], name), name


def test_the_link_join_crosses_no_shuffle(tmp_path, photos_dir, monkeypatch):
    """No link, verdict or score reject goes through a GroupByKey (the in-process runner holds a
    shuffle's whole input in memory: filter's peak grew 1.7x from 26,130 to 416,958 links with its
    CoGroupByKey): in the pipeline run_filter builds, without and with an encoder and in several
    buckets, the only shuffles left spread file names, row groups and bucket numbers (Reshuffle)
    and the sinks' file results (Write)."""
    import contextlib

    import apache_beam as beam
    from apache_beam.pipeline import PipelineVisitor

    import filter.pipeline as fp

    download = str(tmp_path / "download")
    _download(download, photos_dir)
    monkeypatch.setattr(fp, "JOIN_LINKS", 7, raising=False)
    shuffles: list = []

    class Visit(PipelineVisitor):
        def enter_composite_transform(self, node):
            if isinstance(node.transform, beam.CoGroupByKey):
                shuffles.append(node.full_label)

        def visit_transform(self, node):
            if isinstance(node.transform, beam.GroupByKey):
                shuffles.append(node.full_label)

    class Built(Exception):
        pass

    @contextlib.contextmanager
    def built_only(beam_args=None):  # the pipeline run_filter builds, looked at instead of run
        p = beam.Pipeline()
        yield p
        p.visit(Visit())
        raise Built

    monkeypatch.setattr(fp, "stage_pipeline", built_only)
    for encoder in ("none", "tiny-clip"):
        shuffles.clear()
        with pytest.raises(Built):
            fp.run_filter(download, str(tmp_path / encoder), FilterConfig(encoder=encoder, faces="off"))
        assert shuffles and all("Reshuffle" in label or label.startswith("Write/") for label in shuffles), shuffles


def test_the_spilled_join_on_dask_gives_the_local_rows(tmp_path, photos_dir, monkeypatch):
    """On Dask (2 worker processes) the spill files and the side inputs that name them reach every
    worker: with several join buckets every row equals the in-process run's."""
    import filter.pipeline as fp
    from core.dask_runner import dask_cluster

    download = str(tmp_path / "download")
    _download(download, photos_dir)
    monkeypatch.setattr(fp, "JOIN_LINKS", 6)
    local = str(tmp_path / "local")
    stats = fp.run_filter(download, local, FilterConfig(encoder="none", faces="off"))
    with dask_cluster(None, 2) as address:
        on_dask = str(tmp_path / "dask")
        assert fp.run_filter(download, on_dask, FilterConfig(encoder="none", faces="off"), ["--runner", "dask", "--dask-address", address]) == stats
    con = duckdb.connect()
    for name in ("images", "occurrences", "rejected"):
        assert _rows(con, on_dask, name) == _rows(con, local, name), name
    assert not os.path.exists(os.path.join(on_dask, fp.SPILL))


@pytest.mark.parametrize("join_links", [100_000, 7])
def test_each_dask_partition_is_one_row_group(tmp_path, photos_dir, monkeypatch, join_links):
    """On Dask a partition's outputs are held until it ends (core/dask_runner), so a partition must
    be a bounded unit of work: in the graph the Dask runner makes of run_filter's pipeline, the
    images are read and validated one downloads row group to a partition, and the link join runs
    one partition per join bucket and occurrences row group. (Before, a partition was a whole
    downloads file and a whole bucket: on benchmarks/scale.py's 8 files a worker's peak grew
    740 -> 1,476 MB from 1x to 16x.)"""
    import pyarrow.parquet as pq
    from daskgraph import dask_bags

    import filter.pipeline as fp
    from core.stageio import stage_files

    download = str(tmp_path / "download")
    _download(download, photos_dir)
    monkeypatch.setattr(fp, "JOIN_LINKS", join_links)
    graphs = dask_bags(monkeypatch, fp, lambda: fp.run_filter(download, str(tmp_path / "filter"), FilterConfig(encoder="none", faces="off")))
    groups = {name: sum(pq.ParquetFile(f).num_row_groups for f in stage_files(download, name, expected="download")) for name in ("downloads", "occurrences")}
    links = sum(pq.ParquetFile(f).metadata.num_rows for f in stage_files(download, "occurrences", expected="download"))
    buckets = fp.join_buckets(links)
    assert groups["downloads"] > 2 and groups["occurrences"] > 2 and buckets == (1 if join_links == 100_000 else -(-links // 7))
    assert graphs["Read/ReadRowGroup"].npartitions == groups["downloads"]
    assert graphs["Filter/ValidateAndHash/ParDo(ValidateAndHash)"].npartitions == groups["downloads"]
    assert graphs["Filter/JoinLinks/ParDo(JoinLinks)"].npartitions == buckets * groups["occurrences"]
