"""Image bytes are stored once, in download's downloads/ (issue 34): filter's images/ rows point to
them and pair's rows point to filter's. `core/stageio.fetch_rows` and `fill_bytes` follow the chain;
checked here on files written with pyarrow, every row against the bytes it was written with."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from core.records import DOWNLOAD_SCHEMA, IMAGE_SCHEMA
from core.stageio import fetch_rows, fill_bytes


def _files(tmp_path):
    """A downloads file of 2 row groups (3 images each), a filter file pointing into it (one image
    stored: a blurred one), and a pair-like images file pointing into filter's."""
    blobs = {f"id{i}": os.urandom(100 + i) for i in range(6)}
    down = str(tmp_path / "downloads.parquet")
    rows = [{"image_id": k, "image_url": f"http://a/{k}", "page_url": "http://a/", "alt": "", "position": 0, "image_bytes": b, "sha256": None, "links": 1} for k, b in blobs.items()]
    pq.write_table(pa.Table.from_pylist(rows, schema=DOWNLOAD_SCHEMA), down, row_group_size=3)
    blurred = b"blurred JPEG"
    filt = str(tmp_path / "filter.parquet")
    frows = [{"image_id": k, "image_bytes": None, "bytes_file": down, "bytes_row_group": i // 3} for i, k in enumerate(blobs)]
    frows[4].update(image_bytes=blurred, bytes_file=None, bytes_row_group=None)
    pq.write_table(pa.Table.from_pylist(frows, schema=IMAGE_SCHEMA), filt, row_group_size=3)
    pair = str(tmp_path / "pair.parquet")
    prows = [{"image_id": k, "image_bytes": None, "bytes_file": filt, "bytes_row_group": i // 3} for i, k in enumerate(blobs)]
    pq.write_table(pa.Table.from_pylist(prows, schema=IMAGE_SCHEMA), pair, row_group_size=3)
    want = dict(blobs, id4=blurred)
    return down, filt, pair, want


def test_fetch_rows_follows_filter_and_pair_pointers_to_every_rows_bytes(tmp_path):
    down, filt, pair, want = _files(tmp_path)
    got = fetch_rows([(filt, 0), (filt, 1)], "image_id", ["image_bytes"])
    assert {k: r["image_bytes"] for k, r in got.items()} == want
    assert all(set(r) == {"image_id", "image_bytes"} for r in got.values())  # the pointer columns it added are gone
    got = fetch_rows([(pair, 0), (pair, 1)], "image_id", ["image_bytes"])  # two pointers deep
    assert {k: r["image_bytes"] for k, r in got.items()} == want
    got = fetch_rows([(pair, 1)], "image_id", ["image_bytes"], wanted={"id3", "id5"})
    assert {k: r["image_bytes"] for k, r in got.items()} == {"id3": want["id3"], "id5": want["id5"]}
    got = fetch_rows([(pair, 0)], "image_id", ["image_bytes"], hops=1)  # the bytes are two pointers away
    assert {k: r["image_bytes"] for k, r in got.items()} == dict.fromkeys(["id0", "id1", "id2"])
    got = fetch_rows([(filt, 0)], "image_id", ["image_bytes", "bytes_file"])  # asked for, the pointer stays
    assert {r["bytes_file"] for r in got.values()} == {down}


def test_fill_bytes_leaves_stored_bytes_and_gives_stale_pointers_nothing(tmp_path):
    down, filt, _, want = _files(tmp_path)
    rows = pq.read_table(filt).to_pylist()
    fill_bytes(rows)
    assert [r["image_bytes"] for r in rows] == [want[f"id{i}"] for i in range(6)]
    stale = [{"image_id": "id0", "image_bytes": None, "bytes_file": down, "bytes_row_group": 1},  # not in that row group
             {"image_id": "id1", "image_bytes": None, "bytes_file": down, "bytes_row_group": 7},  # past the file
             {"image_id": "idX", "image_bytes": None, "bytes_file": None, "bytes_row_group": None}]  # points nowhere
    fill_bytes(stale)
    assert [r["image_bytes"] for r in stale] == [None, None, None]


def test_filter_row_groups_hold_whole_download_row_groups_blurred_rows_or_not():
    """`_RowsToTables` with filter's group key: every row is written once, each download row group's
    rows are in one table (so shards reads it once), tables end only between download row groups and
    hold >= 250 rows but the last, and a blurred row (bytes, no pointer) never splits a table."""
    import random

    from core.stageio import _RowsToTables

    rng = random.Random(0)
    rows = []
    for g in range(12):
        for i in range(rng.choice([3, 150, 400])):
            blurred = rng.random() < 0.2
            rows.append({"image_id": f"{g}-{i}", "image_bytes": b"jpeg" if blurred else None, "bytes_file": None if blurred else "downloads/part-0.parquet", "bytes_row_group": None if blurred else g})
    step = _RowsToTables(IMAGE_SCHEMA, 250, 8 << 20, ("bytes_file", "bytes_row_group"))
    step.start_bundle()
    tables = [t for r in rows for t in step.process(r)] + [w.value for w in step.finish_bundle()]
    assert [r for t in tables for r in t.select(["image_id", "image_bytes", "bytes_file", "bytes_row_group"]).to_pylist()] == rows
    groups = [set(t.column("bytes_row_group").to_pylist()) - {None} for t in tables]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])  # no download row group in two tables
    assert len(tables) > 2 and all(t.num_rows >= 250 for t in tables[:-1])


def test_a_filter_made_from_an_earlier_download_is_refused_and_rerun(tmp_path):
    """Filter records the download output it points into (its `_SUCCESS` id); once download is made
    again, pair refuses the filter output in one sentence and `webpairs run` counts it stale."""
    import io

    import pytest
    from PIL import Image

    from downloads import write_download

    from core.config import FilterConfig, PairConfig
    from core.stageio import StageError, finish_stage, stale_input
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair

    blobs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (300, 200), (40 * i, 90, 200 - 50 * i)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    download, filt = tmp_path / "download", tmp_path / "filter"
    write_download(download, blobs)
    run_filter(str(download), str(filt), FilterConfig(encoder="none", faces="off", flat_colours=0))
    assert stale_input(str(filt)) is None
    finish_stage(str(download), "download")  # download made again (a rerun, a resume)
    assert stale_input(str(filt)) == str(download)
    with pytest.raises(StageError, match=r"points to image bytes in .*download, which was made again or removed after it: run `webpairs filter`"):
        run_pair(str(filt), str(tmp_path / "pair"), PairConfig())
    run_filter(str(download), str(filt), FilterConfig(encoder="none", faces="off", flat_colours=0))
    assert stale_input(str(filt)) is None
