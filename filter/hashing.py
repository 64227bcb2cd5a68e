"""Content hashes of an image: sha256 of the bytes and a perceptual hash (imagehash pHash)."""

from __future__ import annotations

import functools
import hashlib
import math

import imagehash
import numpy as np
from PIL import Image

from core.perceptual import pixel_view  # an L image's bytes without a copy
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
    shared photos (benchmarks/filter.py). The Lanczos resize itself is Pillow's, computed as two
    matrix products (`lanczos_resize`: the same pixels, ~0.3 -> ~0.05 ms). The hash of those
    pixels is imagehash's `phash`, step for step (`_phash_bits`), without its conversions of an
    image it would resize to the size it has (issue 34: ~0.1 of filter's ~4 ms an image)."""
    factor = min(image.size) // (PHASH_REDUCE_FACTOR * hash_size)
    if factor > 1:
        image = image.reduce(factor)
    side = 4 * hash_size  # imagehash's highfreq_factor 4
    if max(image.size) > LANCZOS_MAX_SIDE:  # a dense coefficient matrix of that side would be large: Pillow's own
        small = np.asarray(image.convert("L").resize((side, side), Image.Resampling.LANCZOS))
    else:
        grey = pixel_view(image) if image.mode == "L" else np.asarray(image.convert("L"))
        small = lanczos_resize(grey, side, side)
    bits = _phash_bits(small, hash_size)
    if bits.size % 8:  # imagehash's own hex (a Python loop over the bits) for odd sizes
        return str(imagehash.ImageHash(bits.reshape(hash_size, hash_size)))
    return np.packbits(bits).tobytes().hex()  # what str(ImageHash) prints, without its per-bit loop


def _phash_bits(pixels: np.ndarray, hash_size: int) -> np.ndarray:
    """imagehash.phash's bits (row-major) of a (4 hash_size)-square uint8 greyscale image: the same
    scipy.fftpack DCTs, of the first hash_size rows only along the second axis (each row's
    transform is its own, so the low-frequency block is the same numbers), and the same median
    (NumPy's: the mean of the two middle values of the block, or the middle one), compared with >.
    tests/test_filter_fast_paths.py checks it against imagehash on every shared photo."""
    import scipy.fftpack

    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0)[:hash_size], axis=1)[:, :hash_size].ravel()
    n = low.size
    if n % 2:
        median = np.partition(low, n // 2)[n // 2]
    else:
        part = np.partition(low, (n // 2 - 1, n // 2))
        median = (part[n // 2 - 1] + part[n // 2]) / 2
    return low > median


_PRECISION_BITS = 22  # Pillow's 8-bit resampling: fixed-point coefficients of 32 - 8 - 2 bits
LANCZOS_MAX_SIDE = 2048  # larger (a non-JPEG, or a thin strip pHash does not reduce): Pillow's resize


def _lanczos(x: float) -> float:
    """Pillow's Lanczos-3 kernel (libImaging/Resample.c), the same double operations."""
    if not -3.0 <= x < 3.0:
        return 0.0

    def sinc(v: float) -> float:
        if v == 0.0:
            return 1.0
        v = v * math.pi
        return math.sin(v) / v

    return sinc(x) * sinc(x / 3)


@functools.lru_cache(maxsize=512)
def _lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's Lanczos coefficients from `in_size` to `out_size` pixels as an (out, in) float64
    matrix of its fixed-point integers: `precompute_coeffs` (support scaled when reducing, bounds
    rounded as its int casts do, weights normalised to sum 1) and `normalize_coeffs_8bpc`."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    ss = 1.0 / filterscale
    matrix = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in weights:
            total += w
        if total != 0.0:
            weights = [w / total for w in weights]
        one = 1 << _PRECISION_BITS
        matrix[xx, xmin:xmin + xmax] = [int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in weights]
    return matrix


def lanczos_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """What Pillow's `Image.resize((width, height), LANCZOS)` makes of an 8-bit greyscale image
    (`pixels`, height x width uint8), pixel for pixel: its horizontal pass, then its vertical one,
    each an integer sum of pixels times fixed-point coefficients plus a half, shifted by 22 bits
    and clipped to 0-255. The sums are exact in float64 (< 2^36), so BLAS computes them exactly in
    any order. A side already of its size is not resampled, and an image over 100 times as tall as
    wide is resampled vertically first, as in Pillow
    (tests/test_filter_luma.py checks every pixel against Pillow on the photos and on noise)."""
    half, one = float(1 << (_PRECISION_BITS - 1)), float(1 << _PRECISION_BITS)

    def across(a):
        return a if a.shape[1] == width else np.clip(np.floor((a.astype(np.float64) @ _lanczos_matrix(a.shape[1], width).T + half) / one), 0, 255)

    def down(a):
        return a if a.shape[0] == height else np.clip(np.floor((_lanczos_matrix(a.shape[0], height) @ a.astype(np.float64) + half) / one), 0, 255)

    tall = pixels.shape[0] > pixels.shape[1] * 100 and height < pixels.shape[0]  # Pillow's Image.resize: the vertical pass first
    out = across(down(pixels)) if tall else down(across(pixels))
    return np.ascontiguousarray(out, dtype=np.uint8)
