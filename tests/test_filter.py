"""filter: validation of every awkward image kind, hashes, embeddings, and the stage on the test web."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from core.config import FilterConfig
from core.records import phash_distance
from filter.hashing import phash_hex
from filter.validate import Invalid, ValidImage, validate

CFG = FilterConfig()


def _bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_modes_become_rgb():
    cmyk = validate(_bytes(Image.new("CMYK", (100, 80), (0, 255, 255, 0)), "JPEG"), CFG)
    assert isinstance(cmyk, ValidImage) and cmyk.image.mode == "RGB"
    r, g, b = cmyk.image.getpixel((50, 40))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    out = validate(_bytes(rgba, "PNG"), CFG)
    assert out.image.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white, not black
    pal = Image.new("P", (100, 100), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    assert validate(_bytes(pal, "PNG"), CFG).image.getpixel((1, 1)) == (10, 200, 30)
    deep = Image.new("I;16", (100, 100), 65535)
    assert validate(_bytes(deep, "PNG"), CFG).image.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_applied():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = validate(_bytes(img, "JPEG", exif=exif), CFG)
    assert (out.width, out.height) == (100, 200)


def test_animated_first_frame_or_reject():
    frames = [Image.new("RGB", (80, 80), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    kept = validate(data, CFG)
    assert isinstance(kept, ValidImage) and kept.animated
    assert validate(data, FilterConfig(animated="reject")) == Invalid("animated", "3 frames")


def test_bad_inputs_have_reasons(photos_dir):
    from webpairs.testweb import decompression_bomb_png

    jpeg = open(os.path.join(photos_dir, "n01440764_tench.JPEG"), "rb").read()
    cases = {
        b"": "empty",
        b"<svg xmlns='http://www.w3.org/2000/svg'></svg>": "unsupported_format",
        b"\xff\xd8\xff\xe0 this is not a jpeg at all": "decode_error",
        jpeg[: len(jpeg) // 2]: "truncated",
        decompression_bomb_png(): "decompression_bomb",
        decompression_bomb_png(7000): "decompression_bomb",  # below Pillow's own 2x guard: our header check
        _bytes(Image.new("RGB", (40, 300)), "PNG"): "too_small",
        _bytes(Image.new("RGB", (400, 100)), "PNG"): "bad_aspect",
    }
    for data, reason in cases.items():
        out = validate(data, CFG)
        assert isinstance(out, Invalid) and out.reason == reason, (reason, out)



def test_decode_error_detail_is_stable():
    """Pillow's "cannot identify image file" names the BytesIO it read, with its memory address
    (`<_io.BytesIO object at 0x7f...>`): a reject detail that changed from run to run. The detail
    is now the message alone, the same for every input that is not an image, in this process and
    in another one."""
    import subprocess
    import sys

    not_images = [b"not an image", b"<html><body>a page, not an image</body></html>", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a\x01\x00", b"\x00" * 64]
    held = []  # keep each buffer's neighbours alive so the streams do not reuse one address
    details = []
    for data in not_images:
        held.append(io.BytesIO(data))
        out = validate(data, CFG)
        assert isinstance(out, Invalid) and out.reason == "decode_error", out
        details.append(out.detail)
    assert all("0x" not in d and " object at " not in d for d in details), details
    assert set(details) == {"cannot identify image file"}
    code = "from core.config import FilterConfig; from filter.validate import validate; print(validate(b'not an image', FilterConfig()).detail)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == details[0]


def test_phash_survives_resize_and_recompression(photos_dir):
    names = sorted(os.listdir(photos_dir))[:40]
    imgs = [Image.open(os.path.join(photos_dir, n)).convert("RGB") for n in names]
    base = imgs[0]
    h = phash_hex(base)
    resized = base.resize((base.width // 2, base.height // 2))
    recompressed = Image.open(io.BytesIO(_bytes(base, "JPEG", quality=30)))
    assert phash_distance(h, phash_hex(resized)) <= 6
    assert phash_distance(h, phash_hex(recompressed)) <= 6
    others = [phash_distance(h, phash_hex(i)) for i in imgs[1:]]
    assert min(others) > 12 and np.mean(others) > 24  # unrelated photos are far apart (64-bit hash)
    assert len(phash_hex(base, hash_size=16)) == 64  # configurable size


@pytest.mark.parametrize("name", ["tiny-clip", "efficientnet-lite0"])
def test_embeddings_unit_length_and_deterministic(name, photos_dir):
    from core.encoders import load_encoder

    enc = load_encoder(name)
    files = sorted(os.listdir(photos_dir))[:4]
    x = np.stack([enc.preprocess(Image.open(os.path.join(photos_dir, f))) for f in files] + [enc.preprocess(Image.open(os.path.join(photos_dir, files[0])))])
    emb = enc.embed_images(x)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.allclose(emb[0], emb[-1], atol=1e-6)  # identical image, identical embedding
    assert not np.allclose(emb[0], emb[1], atol=1e-3)
    assert np.allclose(load_encoder(name).embed_images(x[:1]), emb[:1], atol=1e-5)  # every worker builds the same model


def test_missing_model_fails_at_start_with_instructions(tmp_path):
    from core.stageio import StageError
    from filter.pipeline import encoder_info

    with pytest.raises(StageError, match="--encoder-weights"):
        encoder_info(FilterConfig(encoder="open_clip:ViT-B-32"))
    with pytest.raises(StageError, match="unknown encoder"):
        encoder_info(FilterConfig(encoder="nope"))


@pytest.fixture(scope="module")
def download_dir(pipeline_dirs):
    return pipeline_dirs["download"]


def test_filter_stage_on_test_web(tmp_path, download_dir, test_web):
    from core.stageio import read_stats, read_table
    from filter.pipeline import run_filter

    out = str(tmp_path / "filter")
    stats = run_filter(download_dir, out, FilterConfig(encoder="tiny-clip", batch_size=8))
    images = read_table(out, "images").to_pandas()
    rejected = read_table(out, "rejected").to_pandas()
    occurrences = read_table(out, "occurrences").to_pandas()
    downloads = read_table(download_dir, "downloads").to_pandas()
    links = read_table(download_dir, "occurrences").to_pandas()
    kept_links = occurrences[occurrences.filter_reason.isna()]
    # counts are per link; images are per distinct content, each embedded once
    assert stats["input"] == links.reason.isna().sum() == len(kept_links) + len(rejected) == stats["kept"] + sum(stats["rejected"].values())
    assert stats["images"] == len(downloads) and stats["images_kept"] == len(images) and images.image_id.is_unique
    assert len(occurrences) == len(links) and set(kept_links.image_id) == set(images.image_id)
    got = dict(zip(rejected.url, rejected.reason))
    for url, (stage, reason) in test_web.bad.items():
        if stage == "filter":
            assert got.get(url) == reason, url
    assert set(got) == {u for u, (s, _) in test_web.bad.items() if s == "filter"}
    assert set(test_web.good) <= set(kept_links.image_url)
    emb = np.stack(images.embedding.map(np.asarray))
    assert emb.shape[1] == 64 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    assert images.clip_score.notna().all() and images.encoder.eq("tiny-clip").all()
    # exact copies under two URLs share their content id (and its one row)
    group = test_web.near_duplicate_groups[0]
    ids = kept_links.set_index("image_url").image_id
    assert ids[group[0]] == ids[[u for u in group if u.endswith("exact.jpg")][0]]
    assert read_stats(out)["encoder"] == "tiny-clip"
    # an optional minimum CLIP score rejects with its own reason, and counts still reconcile
    strict = run_filter(download_dir, str(tmp_path / "strict"), FilterConfig(encoder="tiny-clip", min_clip_score=float(np.median(images.clip_score))))
    assert strict["rejected"]["low_clip_score"] >= len(images) // 2 - 1


def test_timm_encoder_from_a_local_weights_file(tmp_path, photos_dir):
    """The timm path of the registry, offline: weights come from a local file, never a hub."""
    import timm
    import torch

    from core.encoders import load_encoder

    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    path = tmp_path / "resnet10t.pth"
    torch.save(model.state_dict(), path)
    enc = load_encoder("timm:resnet10t", str(path))
    x = enc.preprocess(Image.open(os.path.join(photos_dir, "n01440764_tench.JPEG")))
    emb = enc.embed_images(x[None])
    assert emb.shape == (1, model.num_features) and abs(np.linalg.norm(emb) - 1) < 1e-5
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(model.eval()(torch.from_numpy(x[None])), dim=-1).numpy()
    assert np.allclose(emb, ref, atol=1e-5)  # the file's weights were the ones loaded
