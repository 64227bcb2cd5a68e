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


def _photos(photos_dir) -> list:
    """The 300 shared photos, in RGB."""
    images = []
    for name in sorted(os.listdir(photos_dir)):
        with Image.open(os.path.join(photos_dir, name)) as img:
            images.append(img.convert("RGB"))
    assert len(images) == 300
    return images


def _logo(w: int, h: int) -> Image.Image:
    """A drawn logo: a red ellipse on near-white (two flat colours)."""
    logo = Image.new("RGB", (w, h), (250, 250, 250))
    ImageDraw.Draw(logo).ellipse((0, 0, w // 2, h // 2), fill=(200, 20, 20))
    return logo


def test_thumb_size_is_pillows_thumbnail():
    for w in (1, 2, 3, 50, 127, 128, 129, 255, 256, 333, 500, 640, 1000, 4001):
        for h in (1, 2, 7, 100, 128, 129, 375, 499, 1000, 3001):
            img = Image.new("1", (w, h))
            img.thumbnail((FLAT_THUMB, FLAT_THUMB), Image.NEAREST)
            assert (thumb_size(w, h) or (w, h)) == img.size, (w, h)


def test_flat_share_as_before_on_every_photo_and_drawn_logos(photos_dir):
    images = _photos(photos_dir)
    rng = np.random.default_rng(3)
    for w, h in ((1, 1), (128, 128), (129, 128), (1000, 3), (3, 1000), (300, 60), (64, 640)):
        logo = _logo(w, h)
        images += [logo, logo.convert("P"), logo.convert("L"), Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))]
    for img in images:
        for colours in (1, 8, 64):
            assert top_colour_share(img, colours) == _share_as_before(img, colours), (img.size, img.mode, colours)


def test_read_rows_gives_every_row_of_every_row_group(tmp_path):
    """ReadRows (core/stageio: the row-group reader filter and pair use) against pyarrow's own reader: every
    row of two files of several row groups each (and a file with none), in full and by columns."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from core.stageio import READ_BATCH, ReadRows

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
    # ties at the median: flat, striped and stepped images (imagehash's median and > decide them)
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8).repeat(20), (120, 1))
    edge = {"flat": Image.new("RGB", (300, 200), (120, 77, 31)), "black": Image.new("L", (64, 64)),
            "ramp": Image.fromarray(ramp), "stripes": Image.fromarray((np.indices((200, 300))[0] // 10 % 2 * 255).astype(np.uint8)),
            "tiny": Image.new("RGB", (7, 5), (9, 9, 9))}
    for name, img in edge.items():
        for size in (8, 16, 3):
            factor = min(img.size) // (PHASH_REDUCE_FACTOR * size)
            assert phash_hex(img, size) == str(imagehash.phash(img.reduce(factor) if factor > 1 else img, hash_size=size)), (name, size)
    # the bits of the 4n x 4n pixels themselves against imagehash's: random, two-level (ties at
    # the median) and constant arrays
    from filter.hashing import _phash_bits

    rng = np.random.default_rng(11)
    for n in (3, 4, 5, 8, 16):
        for k in range(40):
            px = (rng.integers(0, 256, (4 * n, 4 * n)) if k % 3 == 0 else rng.integers(0, 2, (4 * n, 4 * n)) * 255 if k % 3 == 1 else np.full((4 * n, 4 * n), k)).astype(np.uint8)
            assert np.array_equal(_phash_bits(px, n), imagehash.phash(Image.fromarray(px), hash_size=n).hash.ravel()), (n, k)


def test_filter_tunes_the_allocators_once():
    """core/memory.tune_allocators (called by filter's run and each worker's ValidateAndHash.setup):
    Arrow's buffers come from the system pool afterwards (mimalloc's huge-page arena re-faulted
    every image's bytes, issue 34), glibc's thresholds are set, and a second call changes nothing."""
    import pyarrow as pa

    from core import memory

    assert memory.tune_allocators() is True  # glibc: mallopt answered 1 for both thresholds
    assert pa.default_memory_pool().backend_name == "system"
    assert memory.tune_allocators() is True and pa.default_memory_pool().backend_name == "system"


def test_flat_share_is_the_exact_share_at_or_over_the_threshold(photos_dir):
    """filter/signals.flat_share (the stage's flat-image check: a bound from the three channel
    histograms first, the exact share only when the bound does not decide) answers what
    top_colour_share compared with the threshold answers, share included, on every photo, drawn
    logos, noise, and images made so that the bound passes where the exact share does not (two
    values per channel: each channel's top value covers half the pixels, the top colour an eighth)."""
    from filter.signals import flat_share

    images = _photos(photos_dir)
    rng = np.random.default_rng(5)
    for w, h in ((1, 1), (128, 128), (300, 60), (64, 640)):
        logo = _logo(w, h)
        corners = Image.fromarray((rng.integers(0, 2, (h, w, 3)) * 255).astype(np.uint8))  # 8 colours, 2 values a channel
        images += [logo, logo.convert("L"), corners, Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))]
    bound_passed_exact_not = 0
    for img in images:
        for colours in (1, 2, 8, 64, 255, 256):
            exact = top_colour_share(img, colours)
            for share in (0.0, 0.3, 0.5, 0.8, 1.0):
                assert flat_share(img, colours, share) == (exact if exact >= share else None), (img.size, img.mode, colours, share)
                bound_passed_exact_not += colours == 1 and share == 0.3 and exact < 0.3 and img.width * img.height > 1000 and len(img.getcolors(16) or ()) == 8
    assert bound_passed_exact_not >= 2  # the corners images: the exact step decided them


def test_fit_is_pillows_thumbnail_within_a_grey_level(photos_dir):
    """core/perceptual.fit (PDQ's fit to 512 px: Pillow's box reduction, then torch's antialiased
    bicubic) gives a new image of the size `img.copy(); img.thumbnail((512, 512))` gives, in every
    mode and shape (a loaded JPEG too), "L" for an "L" image and RGB for any other mode; on photos
    (RGB and luma planes, 600-3,000 px, so with and without the reduction, and sides that are not
    multiples of it) every pixel is within 2 grey levels of Pillow's thumbnail and 0.02 on average
    (resizing the whole reduced image, not the part the original covers, was 45 and 2.8 off), and
    torch's thread count does not change them."""
    import io

    import torch

    from core.perceptual import MAX_SIDE, fit

    rng = np.random.default_rng(7)
    shapes = ((513, 100), (100, 513), (1000, 1000), (512, 512), (512, 513), (4001, 3), (3, 4001), (1600, 1200), (1023, 767), (700, 20))
    for w, h in shapes:
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=90)
        jpeg = Image.open(io.BytesIO(buf.getvalue()))
        jpeg.load()
        for img in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("CMYK"), rgb.convert("1"), rgb.convert("LA"), jpeg):
            expected = img.copy()
            expected.thumbnail((MAX_SIDE, MAX_SIDE))
            got = fit(img)
            assert got.size == expected.size and got.mode == ("L" if img.mode == "L" else "RGB"), (w, h, img.mode)
            assert got is not img
    threads = torch.get_num_threads()
    checked = 0
    for name in sorted(os.listdir(photos_dir))[:20]:
        with Image.open(os.path.join(photos_dir, name)) as photo:
            photo = photo.convert("RGB")
        for long, mode in ((600, "RGB"), (900, "L"), (1300, "RGB"), (2101, "RGB"), (3000, "L")):
            img = photo.resize((long, round(long * photo.height / photo.width))).convert(mode)
            expected = img.copy()
            expected.thumbnail((MAX_SIDE, MAX_SIDE))
            got = fit(img)
            assert got.size == expected.size and got.mode == mode
            diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
            assert diff.max() <= 2 and diff.mean() < 0.02, (name, img.size, mode, diff.max(), diff.mean())  # 2 and 0.008 measured
            try:
                torch.set_num_threads(1)
                assert np.array_equal(np.asarray(fit(img)), np.asarray(got)), name
            finally:
                torch.set_num_threads(threads)
            checked += 1
    assert checked == 100


def test_pdq_luma_view_is_thepixel_view():
    """core/perceptual.pixel_view (a view of an "F" image's memory through Pillow's Arrow export) is
    np.asarray's copy, also for an image Pillow keeps in several blocks (over 16 MB: copied)."""
    from core.perceptual import pixel_view

    rng = np.random.default_rng(11)
    for w, h in ((5, 5), (64, 64), (500, 375), (375, 500), (511, 509), (2100, 2100), (5000, 4000)):
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for mode, dtype in (("F", np.float32), ("L", np.uint8)):
            f = rgb.convert(mode)
            view = pixel_view(f)
            assert view.shape == (h, w) and view.dtype == dtype
            assert np.array_equal(view, np.asarray(f)), (w, h, mode)
    mapped = Image.fromarray(rng.integers(0, 256, (100, 100), dtype=np.uint8))  # Pillow maps NumPy's memory
    assert mapped.readonly and np.array_equal(pixel_view(mapped), np.asarray(mapped))  # (its export crashed)


def test_write_rows_to_parquet_types_its_tables_and_writes_what_beams_writer_writes(tmp_path):
    """core/stageio.WriteRowsToParquet (every stage's row writer): the tables between its two steps
    are typed, so Beam sizes them with ArrowTableCoder instead of pickling each whole (issue 34: ~110
    MB a table of filter's images/), and the files hold what Beam's own WriteToParquet writes, row
    for row and row group for row group (read back with pyarrow)."""
    import apache_beam as beam

    from core.stageio import ArrowTableCoder, WriteRowsToParquet

    schema = pa.schema([("image_id", pa.string()), ("image_bytes", pa.binary()), ("position", pa.int32())])
    rows = [{"image_id": f"i{i}", "image_bytes": bytes([i % 256]) * (i * 37 % 5000), "position": i} for i in range(2500)]
    with beam.Pipeline() as p:
        made = p | beam.Create(rows)
        _ = made | "Ours" >> WriteRowsToParquet(str(tmp_path / "ours" / "part"), schema, file_name_suffix=".parquet", row_group_buffer_size=1 << 20)
        _ = made | "Beams" >> beam.io.WriteToParquet(str(tmp_path / "beams" / "part"), schema, file_name_suffix=".parquet", row_group_buffer_size=1 << 20)
    ours, beams = pq.read_table(str(tmp_path / "ours")), pq.read_table(str(tmp_path / "beams"))
    assert ours.num_rows == 2500 and sorted(ours.to_pylist(), key=lambda r: r["position"]) == sorted(beams.to_pylist(), key=lambda r: r["position"]) == rows
    groups = lambda d: sorted(pq.ParquetFile(str(f)).metadata.num_row_groups for f in (tmp_path / d).iterdir())  # noqa: E731
    assert groups("ours") == groups("beams")
    # the typed step: its output PCollection holds pa.Table, whose coder is ArrowTableCoder
    p = beam.Pipeline()
    out = p | beam.Create(rows[:3]) | "Ours" >> WriteRowsToParquet(str(tmp_path / "x" / "part"), schema)
    typed = [pc for pc in _outputs(p.transforms_stack[0]) if pc.element_type is pa.Table]
    assert typed and all(isinstance(beam.coders.registry.get_coder(pc.element_type), ArrowTableCoder) for pc in typed)
    assert out is not None


def _outputs(transform):
    found = list(transform.outputs.values())
    for part in transform.parts:
        found += _outputs(part)
    return found


def test_pdq_luma_view_with_padded_rows():
    """PILLOW_ALIGNMENT (Pillow's documented setting) pads each line of an image; Pillow's Arrow
    export still hands the memory over as w x h contiguous floats, so the view read padding bytes as
    pixels and PDQ gave a wrong hash with full confidence. Run in a child: the alignment is per process."""
    import subprocess
    import sys

    code = (
        "import numpy as np; from PIL import Image; from core.perceptual import pixel_view, _pdq_numpy, pdqhash_of_image\n"
        "rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (377, 501, 3), dtype=np.uint8))\n"
        "for w, h in ((5, 5), (7, 3), (501, 377), (64, 64), (128, 160), (512, 384)):\n"
        "    for mode in ('F', 'L'):\n"
        "        f = rgb.resize((w, h)).convert(mode); assert np.array_equal(pixel_view(f), np.asarray(f)), (w, h, mode)\n"
        "assert _pdq_numpy(rgb) in (None, pdqhash_of_image(rgb))\n"
    )
    env = {**os.environ, "PILLOW_ALIGNMENT": "64"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_binary_columns_are_joined_into_the_array_pyarrow_makes():
    """core/stageio._array (filter's images/ batches): a binary column of bytes made from one join
    is the array pa.array makes, nulls, empty values and a batch of photo-sized values included;
    anything else (a bytearray, a str) is left to pa.array."""
    from core.stageio import _array

    rng = np.random.default_rng(3)
    cases = [[rng.bytes(int(n)) for n in rng.integers(0, 120_000, 250)], [b"a", None, b"", b"xyz", None], [None, None], [b""], [], [b"a", bytearray(b"b")], ["s", b"x"]]
    for values in cases:
        made = _array(values, pa.binary())
        made.validate(full=True)
        assert made.equals(pa.array(values, type=pa.binary())) and made.null_count == sum(v is None for v in values)
        if values and all(type(v) is bytes for v in values):  # the join, not pa.array's builder: one buffer of the exact size
            assert made.buffers()[2].size == sum(len(v) for v in values)
    assert _array([1, None], pa.int64()).equals(pa.array([1, None], pa.int64()))


def test_downloads_files_keep_image_bytes_plain(tmp_path):
    """core/records.write_downloads (crawl download's downloads/): the image bytes neither compressed
    nor dictionary-encoded, the other columns as before (snappy, dictionary), and every row reads
    back, by pyarrow and by DuckDB, as written."""
    import duckdb

    from core.records import DOWNLOAD_SCHEMA, write_downloads

    rng = np.random.default_rng(5)
    rows = [{"image_id": f"{i:016x}", "image_url": f"http://a.example/{i}.jpg", "page_url": "http://a.example/", "alt": "a", "position": i, "image_bytes": rng.bytes(int(rng.integers(1, 180_000))), "sha256": None, "links": 1} for i in range(400)]
    path = str(tmp_path / "part-0.parquet")
    write_downloads(pa.Table.from_pylist(rows, schema=DOWNLOAD_SCHEMA), path)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups >= 2  # ~36 MB of bytes: row groups of ~16 MB, not one
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        chunks = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
        assert chunks["image_bytes"].compression == "UNCOMPRESSED" and not any("DICT" in e for e in chunks["image_bytes"].encodings)
        assert chunks["image_bytes"].total_uncompressed_size < 20 << 20
        assert chunks["image_url"].compression == "SNAPPY" and any("DICT" in e for e in chunks["image_url"].encodings)
    assert pq.read_table(path).to_pylist() == rows
    got = duckdb.sql(f"SELECT image_id, image_bytes FROM read_parquet('{path}') ORDER BY image_id").fetchall()
    assert [(r["image_id"], r["image_bytes"]) for r in rows] == [(i, bytes(b)) for i, b in got]
