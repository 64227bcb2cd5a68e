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
