"""Content hashes of an image: sha256 of the bytes and a perceptual hash (imagehash pHash)."""

from __future__ import annotations

import hashlib

import imagehash
from PIL import Image

from core.records import phash_distance  # noqa: F401 - re-exported: the pHash contract lives in core


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of the raw bytes (exact-duplicate identity)."""
    return hashlib.sha256(data).hexdigest()


def image_id(sha256: str) -> str:
    """The ImageRecord id: the first 16 hex digits of the sha256."""
    return sha256[:16]


def phash_hex(image: Image.Image, hash_size: int = 8) -> str:
    """pHash (DCT of a downscaled greyscale image) as hex; robust to resizing and recompression."""
    return str(imagehash.phash(image, hash_size=hash_size))

