"""A `crawl download` output written directly (no web): each image in `blobs` one row of
downloads/ and one link of occurrences/, all on one page, so that filter can run on chosen bytes."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA
from core.stageio import finish_stage


def write_download(folder, blobs: list[bytes]) -> list[dict]:
    """Write the download stage at `folder` (a finished stage: stats.json, marker); returns its
    downloads rows (image_id, image_bytes, ...) in the order of `blobs`."""
    rows, links = [], []
    for i, b in enumerate(blobs):
        iid = hashlib.sha256(b).hexdigest()[:16]
        rows.append({"image_id": iid, "image_url": f"http://a.example/{i}.jpg", "page_url": "http://a.example/p", "alt": "", "position": i, "image_bytes": b, "sha256": hashlib.sha256(b).hexdigest(), "links": 1})
        links.append({"link_id": f"l{i}", "page_url": "http://a.example/p", "site": "a.example", "image_url": f"http://a.example/{i}.jpg", "alt": "", "position": i, "declared_width": None, "declared_height": None, "image_id": iid, "reason": None})
    for name, data, schema in (("downloads", rows, DOWNLOAD_SCHEMA), ("occurrences", links, DOWNLOAD_OCCURRENCE_SCHEMA)):
        os.makedirs(os.path.join(folder, name))
        pq.write_table(pa.Table.from_pylist(data, schema=schema), os.path.join(folder, name, "part-0.parquet"))
    with open(os.path.join(folder, "stats.json"), "w") as fh:
        json.dump({"stage": "download", "input": len(rows), "kept": len(rows), "rejected": {}}, fh)
    finish_stage(str(folder), "download")
    return rows


def pointed_bytes(rows: list[dict], downloads_dir=None) -> list:
    """The bytes each filter images/ row stands for, read with pyarrow alone (not the project's
    `fetch_rows`): the row's own bytes when it holds them (a blurred JPEG), else the row its pointer
    (`bytes_file`, `bytes_row_group`) names, which must be in download's `downloads_dir/downloads/`
    when given and hold the same image id (None where it does not)."""
    out, groups = [], {}
    for r in rows:
        if r.get("image_bytes") is not None:
            assert r.get("bytes_file") is None, "a row holds bytes and a pointer"
            out.append(r["image_bytes"])
            continue
        f, g = r["bytes_file"], r["bytes_row_group"]
        if downloads_dir is not None:
            assert os.path.dirname(f) == os.path.join(os.path.abspath(str(downloads_dir)), "downloads"), f
        if (f, g) not in groups:
            t = pq.ParquetFile(f).read_row_group(g, columns=["image_id", "image_bytes"])
            groups[f, g] = dict(zip(t.column("image_id").to_pylist(), t.column("image_bytes").to_pylist()))
        out.append(groups[f, g].get(r["image_id"]))
    return out
