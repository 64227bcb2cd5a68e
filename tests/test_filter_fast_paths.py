"""Filter's faster steps (issue 34) give what the steps they replace gave: the flat-image share
without a full-size copy first, and the downloads read a batch of rows at a time."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from filter.signals import FLAT_THUMB, thumb_size, top_colour_share


def _share_as_before(image: Image.Image, colours: int) -> float:
    """The measure as filter/signals computed it before issue 34: a converted copy, thumbnailed."""
    thumb = image.convert("RGB")
    thumb.thumbnail((FLAT_THUMB, FLAT_THUMB), Image.NEAREST)
    a = np.asarray(thumb, dtype=np.int32)
    codes = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    counts = np.unique(codes, return_counts=True)[1]
    counts.sort()
    return float(counts[::-1][:colours].sum() / codes.size)


def test_thumb_size_is_pillows_thumbnail():
    for w in (1, 2, 3, 50, 127, 128, 129, 255, 256, 333, 500, 640, 1000, 4001):
        for h in (1, 2, 7, 100, 128, 129, 375, 499, 1000, 3001):
            img = Image.new("1", (w, h))
            img.thumbnail((FLAT_THUMB, FLAT_THUMB), Image.NEAREST)
            assert (thumb_size(w, h) or (w, h)) == img.size, (w, h)


def test_flat_share_as_before_on_every_photo_and_drawn_logos(photos_dir):
    images = []
    for name in sorted(os.listdir(photos_dir)):
        with Image.open(os.path.join(photos_dir, name)) as img:
            images.append(img.convert("RGB"))
    assert len(images) == 300
    rng = np.random.default_rng(3)
    for w, h in ((1, 1), (128, 128), (129, 128), (1000, 3), (3, 1000), (300, 60), (64, 640)):
        logo = Image.new("RGB", (w, h), (250, 250, 250))
        ImageDraw.Draw(logo).ellipse((0, 0, w // 2, h // 2), fill=(200, 20, 20))
        images += [logo, logo.convert("P"), logo.convert("L"), Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))]
    for img in images:
        for colours in (1, 8, 64):
            assert top_colour_share(img, colours) == _share_as_before(img, colours), (img.size, img.mode, colours)


def test_read_rows_gives_every_row_of_every_row_group(tmp_path):
    """ReadRows (filter's reader of downloads/ and occurrences/) against pyarrow's own reader: every
    row of two files of several row groups each (and a file with none), in full and by columns."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from filter.pipeline import READ_BATCH, ReadRows

    files, expected = [], []
    for f, n in enumerate((3 * READ_BATCH + 5, 17, 0)):
        rows = [{"image_id": f"{f}-{i}", "image_bytes": bytes([i % 256]) * (i + 1), "links": i} for i in range(n)]
        path = str(tmp_path / f"part-{f}.parquet")
        schema = pa.schema([("image_id", pa.string()), ("image_bytes", pa.binary()), ("links", pa.int64())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=50)
        files.append(path)
    expected = pq.read_table(str(tmp_path)).to_pylist()
    assert len(expected) == 3 * READ_BATCH + 5 + 17 and pq.ParquetFile(files[0]).num_row_groups == 4
    with beam.Pipeline() as p:
        full = p | "Files" >> beam.Create(files) | "Read" >> ReadRows()
        some = p | "Files2" >> beam.Create(files) | "Read2" >> ReadRows(["image_id", "links"])
        assert_that(full, equal_to(expected), label="full")
        assert_that(some, equal_to([{"image_id": r["image_id"], "links": r["links"]} for r in expected]), label="columns")


def test_phash_hex_is_imagehash_str(photos_dir):
    """filter/hashing.phash_hex packs the bits itself: the hex imagehash prints, for every photo and
    the hash sizes filter allows (8, 16, and an odd 3 that imagehash formats itself)."""
    import imagehash

    from filter.hashing import PHASH_REDUCE_FACTOR, phash_hex

    names = sorted(os.listdir(photos_dir))
    assert len(names) == 300
    for name in names:
        with Image.open(os.path.join(photos_dir, name)) as img:
            rgb = img.convert("RGB")
        for size in (8, 16, 3):
            factor = min(rgb.size) // (PHASH_REDUCE_FACTOR * size)
            expected = str(imagehash.phash(rgb.reduce(factor) if factor > 1 else rgb, hash_size=size))
            assert phash_hex(rgb, size) == expected, (name, size)


def test_filter_tunes_the_allocators_once():
    """core/memory.tune_allocators (called by filter's run and each worker's ValidateAndHash.setup):
    Arrow's buffers come from the system pool afterwards (mimalloc's huge-page arena re-faulted
    every image's bytes, issue 34), glibc's thresholds are set, and a second call changes nothing."""
    import pyarrow as pa

    from core import memory

    assert memory.tune_allocators() is True  # glibc: mallopt answered 1 for both thresholds
    assert pa.default_memory_pool().backend_name == "system"
    assert memory.tune_allocators() is True and pa.default_memory_pool().backend_name == "system"
