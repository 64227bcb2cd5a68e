"""Filter decodes a JPEG once at the smallest DCT scale its uses need (issue 34): the true size from
the header, pHash within a bit of the full decode's, embeddings within the encoder's tolerance,
and the same verdicts and pairs on the test webs as decoding every pixel."""

from __future__ import annotations

import io
import os

import imagehash
import numpy as np
import pytest
from PIL import Image

from core.config import CrawlConfig, DownloadConfig, FilterConfig, PairConfig
from filter.signals import FLAT_THUMB
from filter.validate import BAD_ASPECT, TOO_SMALL, TRUNCATED, Invalid, ValidImage, decode, decode_side, validate

CFG = FilterConfig(encoder="none")
SIDE = decode_side(CFG, 0, FLAT_THUMB)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _photos(photos_dir: str, n: int) -> list[bytes]:
    return [open(os.path.join(photos_dir, name), "rb").read() for name in sorted(os.listdir(photos_dir))[:n]]


def test_decode_side_is_what_each_use_needs():
    from core.perceptual import MAX_SIDE

    assert SIDE == FLAT_THUMB == 128  # pHash 64 (2 x its 32 px input), the flat thumbnail 128
    assert decode_side(CFG, 224, FLAT_THUMB, MAX_SIDE) == MAX_SIDE  # PDQ sees what pdq_of_bytes sees
    assert decode_side(FilterConfig(flat_colours=0), 0, FLAT_THUMB) == 64
    assert decode_side(FilterConfig(flat_colours=0, phash_size=16), 0, FLAT_THUMB) == 128
    assert decode_side(CFG, 224, FLAT_THUMB) == 224  # the encoder's input size


def test_scaled_decode_keeps_the_true_size(photos_dir):
    img = Image.open(os.path.join(photos_dir, sorted(os.listdir(photos_dir))[0])).convert("RGB").resize((1200, 900))
    out = decode(_jpeg(img), CFG, SIDE)
    assert isinstance(out, ValidImage)
    assert (out.width, out.height) == (1200, 900)  # from the header
    assert out.image.size == (300, 225) and min(out.image.size) >= SIDE  # 1/4 scale: 1/8 would be < 128
    assert out.image.mode == "RGB"
    full = decode(_jpeg(img), CFG)
    assert full.image.size == (1200, 900) and (full.width, full.height) == (1200, 900)


def test_scaled_decode_applies_exif_orientation_to_the_true_size():
    img = Image.new("RGB", (1000, 600), (200, 30, 30))
    img.paste((20, 20, 220), (0, 0, 500, 600))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the picture is 600 wide, 1000 high
    for side in (0, SIDE):
        out = decode(_jpeg(img, exif=exif.tobytes()), CFG, side)
        assert (out.width, out.height) == (600, 1000), side
        assert out.image.width < out.image.height, side  # the pixels are turned as well


def test_size_and_aspect_verdicts_use_the_true_size():
    # 1100 x 300: 1/2 scale decodes 550 x 150; the aspect (3.67 > 3) and sizes are the original's
    wide = validate(_jpeg(Image.new("RGB", (1100, 300), (90, 140, 200))), CFG, SIDE)
    assert isinstance(wide, Invalid) and wide.reason == BAD_ASPECT and "1100x300" in wide.detail
    small = validate(_jpeg(Image.new("RGB", (600, 60), (90, 140, 200))), FilterConfig(encoder="none", max_aspect=20), SIDE)
    assert isinstance(small, Invalid) and small.reason == TOO_SMALL and "600x60" in small.detail


def test_truncated_jpeg_is_still_found_at_a_scale(photos_dir):
    data = _jpeg(Image.open(os.path.join(photos_dir, sorted(os.listdir(photos_dir))[1])).convert("RGB").resize((1000, 750)))
    for side in (0, SIDE):
        out = decode(data[: len(data) // 2], CFG, side)
        assert isinstance(out, Invalid) and out.reason == TRUNCATED, side


def test_phash_within_a_bit_of_the_full_decode(photos_dir):
    """Every shared photo: the stage's pHash (scaled decode) against the full decode's; on average
    within 1 bit, and no photo further than the near-duplicate distance."""
    diffs, n_scaled = [], 0
    for data in _photos(photos_dir, 300):
        full, scaled = decode(data, CFG), decode(data, CFG, SIDE)
        assert min(scaled.image.size) >= min(SIDE, *full.image.size)
        assert (scaled.width, scaled.height) == (full.width, full.height)
        n_scaled += scaled.image.size[0] < full.image.size[0]  # those with a short side < 256 stay whole
        diffs.append(imagehash.phash(full.image) - imagehash.phash(scaled.image))
    assert len(diffs) == 300 and n_scaled >= 250, n_scaled
    assert np.mean(diffs) <= 1.0, np.mean(diffs)
    assert max(diffs) <= PairConfig().near_duplicate_distance, max(diffs)


def test_phash_of_the_reduced_copy_within_a_bit_of_every_pixel(photos_dir):
    """filter/hashing.phash_hex box-reduces the image first (short side >= 16 x hash_size): on
    every shared photo, against imagehash's pHash of the full decode, 1 bit or less on average and
    never the near-duplicate distance."""
    from filter.hashing import phash_hex

    diffs = []
    for data in _photos(photos_dir, 300):
        full = decode(data, CFG).image
        diffs.append(imagehash.phash(full) - imagehash.hex_to_hash(phash_hex(full)))
    assert len(diffs) == 300 and sum(d > 0 for d in diffs) > 0  # the reduction does change some bits
    assert np.mean(diffs) <= 1.0, np.mean(diffs)
    assert max(diffs) < PairConfig().near_duplicate_distance, max(diffs)


def test_pdq_of_bytes_is_metas_512_px_reference_within_its_tolerance(photos_dir):
    """core/perceptual fits an image to 512 px before PDQ, as Meta's reference implementations do
    (Python: Image.open + thumbnail((512, 512))); a large JPEG is drafted at a DCT scale first. On
    photos enlarged to 1,600 px, the hash stays within Meta's 11-bit tolerance between
    implementations of that reference, and a photo of at most 512 px is hashed from every pixel
    (of its luma plane, issue 34: pdqhash of that plane exactly, the RGB reference within 11 bits)."""
    import pdqhash

    from core.perceptual import distance, pdq_of_bytes, pdq_of_image

    def reference(data: bytes) -> bytes:
        img = Image.open(io.BytesIO(data))
        img.thumbnail((512, 512))
        bits, _ = pdqhash.compute(np.asarray(img.convert("RGB")))
        return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()

    dists = []
    for data in _photos(photos_dir, 40):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if max(img.size) <= 512:  # every pixel of the plane
            plane = Image.open(io.BytesIO(data))
            plane.draft("L", None)
            assert pdq_of_bytes(data)[0] == pdq_of_image(plane.convert("RGB"))[0]
            assert distance(pdq_of_bytes(data)[0], reference(data)) <= 11
        big = _jpeg(img.resize((1600, round(1600 * img.height / img.width)), Image.BICUBIC))
        dists.append(distance(pdq_of_bytes(big)[0], reference(big)))
    assert len(dists) == 40 and max(dists) <= 11, dists


def test_embeddings_within_the_encoders_tolerance(photos_dir):
    """efficientnet-lite0 (224 px): each photo at 2x its size, embedded from the full decode and from
    the 1/2-scale decode the stage makes for it: cosine >= 0.99 on every image."""
    from core.encoders import load_encoder

    enc = load_encoder("efficientnet-lite0")
    side = decode_side(CFG, enc.image_size, FLAT_THUMB)
    full_px, scaled_px = [], []
    for data in _photos(photos_dir, 24):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        big = _jpeg(img.resize((img.width * 2, img.height * 2), Image.BICUBIC))
        full, scaled = decode(big, CFG), decode(big, CFG, side)
        assert scaled.image.size[0] < full.image.size[0] and min(scaled.image.size) >= enc.image_size
        full_px.append(enc.preprocess(full.image))
        scaled_px.append(enc.preprocess(scaled.image))
    a, b = enc.embed_images(np.stack(full_px)), enc.embed_images(np.stack(scaled_px))
    cos = (a * b).sum(axis=1)
    assert len(cos) == 24 and cos.min() >= 0.99, cos.min()


def test_stored_pdq_is_the_blocklist_pdq_of_the_bytes(tmp_path, photos_dir):
    """filter's stored PDQ (images.pdq, which `webpairs scrub` matches) is the hash that download's
    blocklist check computes from the bytes (pdq_of_bytes), for a photo and for one over 4096 px
    that both decode at a DCT scale, and for a photo whose EXIF says to turn it (filter hashes it
    upright; the blocklist hashed the stored orientation, 90 degrees off)."""
    from downloads import write_download

    from core.perceptual import pdq_of_bytes
    from core.stageio import read_table
    from filter.pipeline import run_filter

    img = Image.open(os.path.join(photos_dir, sorted(os.listdir(photos_dir))[2])).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    blobs = [_photos(photos_dir, 1)[0], _jpeg(img.resize((4400, 4200))), _jpeg(img, exif=exif.tobytes())]
    d = tmp_path / "download"
    rows = write_download(d, blobs)
    run_filter(str(d), str(tmp_path / "filter"), FilterConfig(encoder="none", max_pixels=50_000_000))
    stored = {r["image_id"]: r["pdq"] for r in read_table(str(tmp_path / "filter"), "images", ["image_id", "pdq"]).to_pylist()}
    assert len(stored) == 3
    for r in rows:
        assert stored[r["image_id"]] == pdq_of_bytes(r["image_bytes"])[0].hex()


def _filter_and_pair(download: str, out: str, scaled: bool, encoder: str) -> dict:
    from core.stageio import read_table
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair

    run_filter(download, os.path.join(out, "filter"), FilterConfig(encoder=encoder, scaled_decode=scaled))
    run_pair(os.path.join(out, "filter"), os.path.join(out, "pair"), PairConfig())
    occ = read_table(os.path.join(out, "filter"), "occurrences", ["link_id", "filter_reason", "width", "height", "phash"]).to_pylist()
    filter_rej = read_table(os.path.join(out, "filter"), "rejected", ["record_id", "reason"]).to_pylist()
    pair_rej = read_table(os.path.join(out, "pair"), "rejected", ["record_id", "reason"]).to_pylist()
    pairs = read_table(os.path.join(out, "pair"), "pairs", ["cond_image_id", "target_image_id"]).to_pylist()
    return {
        "verdicts": {r["link_id"]: (r["filter_reason"], r["width"], r["height"]) for r in occ},
        "phash": {r["link_id"]: r["phash"] for r in occ},
        "filter_rejected": sorted((r["record_id"], r["reason"]) for r in filter_rej),
        "pair_rejected": sorted((r["record_id"], r["reason"]) for r in pair_rej),
        "pairs": sorted((r["cond_image_id"], r["target_image_id"]) for r in pairs),
    }


def _assert_same(full: dict, scaled: dict) -> None:
    assert full["verdicts"] == scaled["verdicts"]  # every link: filter's reason and the true size
    assert full["filter_rejected"] == scaled["filter_rejected"]
    assert full["pair_rejected"] == scaled["pair_rejected"]  # near_duplicate, boilerplate, ... per link
    assert full["pairs"] == scaled["pairs"] and full["pairs"]
    bits = [bin(int(full["phash"][k], 16) ^ int(scaled["phash"][k], 16)).count("1") for k in full["phash"] if full["phash"][k]]
    assert bits and np.mean(bits) <= 1.0


def _phash_every_pixel(image, hash_size: int = 8) -> str:
    """The pHash filter stored before issue 34: imagehash on every decoded pixel."""
    return str(imagehash.phash(image, hash_size=hash_size))


def _full_as_before(download: str, out: str, encoder: str) -> dict:
    """filter + pair as before issue 34: every pixel decoded, pHash on all of them."""
    from filter import pipeline

    with pytest.MonkeyPatch.context() as mp:  # the in-process runner calls the module's function
        mp.setattr(pipeline, "phash_hex", _phash_every_pixel)
        return _filter_and_pair(download, out, False, encoder)


def test_same_verdicts_and_pairs_on_the_test_web_plan_on(tmp_path, pipeline_dirs):
    # the session's download of the test web (conftest: extract with allow_hosts 127.0.0.1, then
    # download at timeout 2.5 s, 1 process: this test's own run of both, done once)
    download = pipeline_dirs["download"]
    full = _full_as_before(download, str(tmp_path / "full"), "tiny-clip")
    scaled = _filter_and_pair(download, str(tmp_path / "scaled"), True, "tiny-clip")
    _assert_same(full, scaled)


def test_same_verdicts_and_pairs_on_the_multisite_web_plan_off(tmp_path):
    """The plan off: every boilerplate link reaches filter and pair, so pair's content rules
    (pHash across pages) decide them; the same with either decode."""
    from crawl.download import run_download
    from crawl.extract import run_extract
    from webpairs.multisite import serve_multisite_web

    with serve_multisite_web(str(tmp_path / "web"), n_sites=8, seed=0) as web:
        run_extract(web.warc_path, str(tmp_path / "links"), CrawlConfig(allow_hosts=("127.0.0.1",)))
        no_plan = dict(min_side=0, skip_extensions=(), url_boilerplate=False, max_links_per_page=0, min_links_per_page=0)
        run_download(str(tmp_path / "links"), str(tmp_path / "download"), DownloadConfig(allow_hosts=("127.0.0.1",), processes=1, **no_plan))
    full = _full_as_before(str(tmp_path / "download"), str(tmp_path / "full"), "tiny-clip")
    scaled = _filter_and_pair(str(tmp_path / "download"), str(tmp_path / "scaled"), True, "tiny-clip")
    _assert_same(full, scaled)
    reasons = {reason for _, reason in full["pair_rejected"]}
    assert {"boilerplate_site", "boilerplate_global"} & reasons, reasons
