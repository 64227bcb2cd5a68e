"""Content hashes of an image: sha256 of the bytes and a perceptual hash (imagehash pHash)."""

from __future__ import annotations

import hashlib

import imagehash
import numpy as np
from PIL import Image

from core.records import phash_distance  # noqa: F401 - re-exported: the pHash contract lives in core


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of the raw bytes (exact-duplicate identity)."""
    return hashlib.sha256(data).hexdigest()


def image_id(sha256: str) -> str:
    """The ImageRecord id: the first 16 hex digits of the sha256."""
    return sha256[:16]


PHASH_REDUCE_FACTOR = 16  # the image is box-reduced first while its short side stays >= this x hash_size


def phash_hex(image: Image.Image, hash_size: int = 8) -> str:
    """pHash (DCT of a downscaled greyscale image) as hex; robust to resizing and recompression.

    imagehash resizes to 4 x hash_size px with Lanczos, whose cost grows with the input; a box
    reduction (`Image.reduce`, an integer factor) to a short side of at least 16 x hash_size first
    halves the time on 500-px photos and moves the hash by 0.41 bits on average (max 4) on the 300
    shared photos (benchmarks/filter.py)."""
    factor = min(image.size) // (PHASH_REDUCE_FACTOR * hash_size)
    if factor > 1:
        image = image.reduce(factor)
    bits = imagehash.phash(image, hash_size=hash_size).hash.ravel()
    if bits.size % 8:  # imagehash's own hex (a Python loop over the bits) for odd sizes
        return str(imagehash.ImageHash(bits.reshape(hash_size, hash_size)))
    return np.packbits(bits).tobytes().hex()  # what str(ImageHash) prints, without its per-bit loop

