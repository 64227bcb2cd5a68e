"""The pair-shard sample layout (webdataset), shared by `shards` (writer) and `train` (reader).

One sample per pair, all files sharing the key (the pair_id):

    {key}.cond.jpg     condition image, JPEG (original bytes when already JPEG, else re-encoded RGB)
    {key}.target.jpg   target image, JPEG
    {key}.cond.npy     condition embedding, float16 (D,), optional (ShardConfig.store_embedding)
    {key}.latent.npy   the target's VAE latent, float16 (C, S/f, S/f): the posterior mean of the centre
                       crop at `image_size`, unscaled; optional (`webpairs latents`)
    {key}.latent.json  {"vae", "scale_factor", "shift_factor", "image_size"} of that latent: the
                       diffusion model trains on (latent - shift_factor) * scale_factor
    {key}.json         {"pair_id", "page_url", "cond_url", "target_url", "cond_alt", "target_alt",
                        "cond_image_id", "target_image_id", "similarity", "encoder", "cond_nsfw",
                        "target_nsfw"} (the nsfw scores: null when filter had no safety head)

Shards are named `pairs-{file:06d}-{seq:06d}.tar` (the pair parquet file they come from, then a
sequence number); beside them `index/*.parquet` (key -> shard, byte
offsets, metadata), `manifest.json` (with a "latent" entry {"vae", "channels", "factor",
"scale_factor", "image_size"} when every sample carries a latent) and `wids.json` (the shard list
of webdataset's indexed reader, `wids`, for random access by sample number).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

COND_JPG = "cond.jpg"
TARGET_JPG = "target.jpg"
COND_NPY = "cond.npy"
LATENT_NPY = "latent.npy"
LATENT_JSON = "latent.json"
META_JSON = "json"
SHARD_PATTERN = "pairs-{file:06d}-{seq:06d}.tar"
META_FIELDS = ("pair_id", "page_url", "cond_url", "target_url", "cond_alt", "target_alt", "cond_image_id", "target_image_id", "similarity", "encoder", "cond_nsfw", "target_nsfw")  # {key}.json
MANIFEST = "manifest.json"
WIDS = "wids.json"  # shard list for webdataset's indexed reader: wids.ShardListDataset(".../wids.json")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha on white, 16-bit scaled down, CMYK/palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep the top 8 bits
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def as_jpeg(data: bytes, quality: int = 95) -> bytes:
    """JPEG bytes of an image: unchanged when already a baseline RGB JPEG, else decoded and re-encoded."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and img.mode == "RGB" and not img.getexif().get(0x0112):
        return data
    img.seek(0)
    rgb = to_rgb(ImageOps.exif_transpose(img) or img)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def npy_bytes(vector) -> bytes:
    """A float16 vector as .npy bytes (what webdataset's default decoder reads back)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(vector, dtype=np.float16))
    return buf.getvalue()
