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
