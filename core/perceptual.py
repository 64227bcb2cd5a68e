"""PDQ, Meta's 256-bit perceptual hash (the `pdqhash` package), shared by crawl (the blocklist) and
filter (the hash stored for every kept image, which `webpairs scrub` matches later).

A hash is 32 bytes; its hex form is the one ThreatExchange and Meta's tools print (bit 0 of
`pdqhash.compute`'s vector is the most significant bit of the first hex digit). Distances are
Hamming distances in bits; Meta calls two hashes within 31 bits a confident match.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

PDQ_BYTES = 32
PDQ_MATCH_DISTANCE = 31  # Meta's confident-match threshold
# larger images are scaled down to fit MAX_SIDE first (JPEG: by DCT draft, then Pillow's thumbnail),
# as Meta's reference implementations do (C++ `DOWNSAMPLE_DIMS = 512`, Python `thumbnail((512, 512))`:
# the Jarosz filter's cost grows with the side cubed). Below it PDQ must see every pixel: a hash of
# a 1/2-scale decode of a 500-px photo drifts by 17 of 256 bits on average (max 44), over Meta's
# 11-bit tolerance between implementations (measured on the 300 shared photos, issue 34)
MAX_SIDE = 512
MAX_PIXELS = 100_000_000  # a declared size above this is not decoded at all (decompression bomb)


def pdq_of_image(img) -> tuple[bytes, int]:
    """(32-byte hash, quality 0-100) of a Pillow image (frame 0 of an animation)."""
    import pdqhash

    if img.width > MAX_SIDE or img.height > MAX_SIDE:
        img = img.copy()
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    arr = np.ascontiguousarray(np.asarray(img if img.mode == "RGB" else img.convert("RGB")))  # no copy of RGB pixels
    bits, quality = pdqhash.compute(arr)
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes(), int(quality)


def pdq_hex(img) -> str:
    """The PDQ hash of a Pillow image as 64 hex digits (what filter stores for every kept image)."""
    return pdq_of_image(img)[0].hex()


def pdq_of_bytes(data: bytes) -> Optional[tuple[bytes, int]]:
    """The PDQ hash of encoded image bytes, or None when Pillow cannot decode them (or they declare
    more than MAX_PIXELS pixels). The image is hashed upright (its EXIF orientation applied), as
    filter decodes it, so the hash download's blocklist check computes is the one filter stores."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return None
            if img.format == "JPEG" and (img.width > MAX_SIDE or img.height > MAX_SIDE):
                img.draft("RGB", (MAX_SIDE, MAX_SIDE))
            img.load()
            upright = ImageOps.exif_transpose(img)
            return pdq_of_image(upright if upright is not None else img)
    except Exception:  # noqa: BLE001 - not an image Pillow reads: no perceptual hash
        return None


def hex_to_pdq(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != PDQ_BYTES:
        raise ValueError(f"a PDQ hash is {PDQ_BYTES * 2} hex digits, not {len(text)}")
    return raw


def distance(a: bytes, b: bytes) -> int:
    """Hamming distance in bits of two 32-byte hashes."""
    return int(np.bitwise_count(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())
