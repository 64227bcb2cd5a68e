"""PDQ, Meta's 256-bit perceptual hash (the `pdqhash` package), shared by crawl (the blocklist) and
filter (the hash stored for every kept image, which `webpairs scrub` matches later).

A hash is 32 bytes; its hex form is the one ThreatExchange and Meta's tools print (bit 0 of
`pdqhash.compute`'s vector is the most significant bit of the first hex digit). Distances are
Hamming distances in bits; Meta calls two hashes within 31 bits a confident match.

The hash is the one `pdqhash.compute` (Meta's C++ reference, bound) gives on the image fitted to
512 px (`fit`), computed the same way with NumPy (issue 34): pdqhash spends ~1 ms a 500-px photo making float64 luma in its binding and
then runs four full-image box-filter passes, but PDQ reads the filtered image at 64 x 64 points
only. Here the luma is Pillow's "F" conversion ((299 R + 587 G + 114 B) / 1000 in float32, the
reference's coefficients), and the two box-filter passes per axis (Jarosz: windows clipped at the
edges, as `box1DFloat`) followed by the decimation are one 64 x n matrix per axis, applied as at
most 2w - 1 weighted rows (w = the window, <= 4 at 512 px); then the same 16 x 64 DCT, quality
metric and median threshold. The float sums differ from the reference's running float32 sums by
< 0.003 on the 16 x 16 coefficients (the 300 shared photos, tests/test_pdq.py), so where two
coefficients at the median are closer than PDQ_MARGIN (or the quality metric is that close to
another value) the image is hashed by pdqhash itself: the result is pdqhash's, bit for bit.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Optional

import numpy as np
import pyarrow as pa
from PIL import Image

from core.sample_layout import to_rgb

PDQ_BYTES = 32
PDQ_MATCH_DISTANCE = 31  # Meta's confident-match threshold
# larger images are scaled down to fit MAX_SIDE first (JPEG: by DCT draft, then `fit`),
# as Meta's reference implementations do (C++ `DOWNSAMPLE_DIMS = 512`, Python `thumbnail((512, 512))`).
# Below it PDQ must see every pixel: a hash of
# a 1/2-scale decode of a 500-px photo drifts by 17 of 256 bits on average (max 44), over Meta's
# 11-bit tolerance between implementations (measured on the 300 shared photos, issue 34)
MAX_SIDE = 512
MAX_PIXELS = 100_000_000  # a declared size above this is not decoded at all (decompression bomb)


def pdq_of_image(img) -> tuple[bytes, int]:
    """(32-byte hash, quality 0-100) of a Pillow image (frame 0 of an animation): pdqhash's of the
    image as `fit` fits it to MAX_SIDE px. An "L"
    image is hashed as its grey levels are (PDQ's luma of R = G = B = Y is Y): a JPEG's luma plane
    (`luma_image`) is hashed without any RGB."""
    if img.width > MAX_SIDE or img.height > MAX_SIDE:
        img = fit(img)  # "L" or "RGB"
    if img.mode == "L":  # _pdq_numpy's "F" of an L image is its plane
        return _pdq_numpy(img) or pdqhash_of_image(img.convert("RGB"))
    # RGB as filter decodes it (to_rgb: alpha on white, 16-bit scaled down), so that `pdq_of_bytes`
    # (download's blocklist check, scrub) hashes the pixels filter hashes and stores; until issue
    # 34's nineteenth sitting Pillow's convert("RGB") (alpha dropped, 16-bit clipped): 46-128 bits
    # from the stored hash of a PNG with transparency or a 16-bit PNG
    rgb = to_rgb(img)
    return _pdq_numpy(rgb) or pdqhash_of_image(rgb)


def fit_size(width: int, height: int, side: int = MAX_SIDE) -> tuple[int, int]:
    """The size `thumbnail((side, side))` gives a width x height image (Pillow's rounding of the
    aspect ratio): the image itself where it already fits."""
    if side >= width and side >= height:
        return width, height
    aspect = width / height

    def round_aspect(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    x = y = side
    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


REDUCING_GAP = 2.0  # as Pillow's thumbnail: a box reduction by int(scale / 2) first, then the bicubic


def fit(img, side: int = MAX_SIDE):
    """A new image of the size and pixels PDQ is computed from: an "L" image stays "L" (a JPEG's
    luma plane), any other mode becomes RGB as filter makes it (`to_rgb`); one over `side` px is scaled down as
    `thumbnail((side, side))` scales it (Meta's Python reference fits an image to 512 px so before
    PDQ; its C++ one with CImg): to `fit_size`'s size, by Pillow's own box `reduce` by int(scale /
    REDUCING_GAP) per axis first, as thumbnail does, then the antialiased bicubic (Keys, a = -0.5,
    the kernel stretched by the scale).

    The bicubic is torch's (`interpolate(mode="bicubic", antialias=True)` on uint8, made to match
    Pillow's): within 2 grey levels of Pillow's pixels (0.008 on average), ~1.3 ms of a 600 x 800 plane where Pillow's
    scalar loops took 2.4 (issue 34, nineteenth sitting: 0.25 ms an image over the 300 shared
    photos, 7 % of filter). The hash is Meta's Python reference's (Pillow's fit, then pdqhash) on
    every case tests/test_pdq.py tries: the 29 shared photos over 512 px, 200 enlarged to 1,600
    and 3,000 px, mosaics of photos at 1,000-3,000 px (0 bits apart). OpenCV's bicubic (no
    antialiasing) was 2x faster again but 2-3 bits off on the mosaics, 6 at most: too far for the
    blocklist's sake. Where a side is not a multiple of the reduction, the resize maps the part of
    the reduced image that the original covers, as Pillow does (resizing the whole reduced image
    instead shifted edges by up to 1/3 px, 45 grey levels on a sharp one)."""
    import torch
    import torch.nn.functional as F

    if img.mode != "L":
        img = to_rgb(img)
    size = fit_size(img.width, img.height, side)
    if size == img.size:
        return img.copy()
    factor = (int(img.width / size[0] / REDUCING_GAP) or 1, int(img.height / size[1] / REDUCING_GAP) or 1)
    # the part of the reduced image the original covers (Pillow's `box`): its last row or column
    # averages a partial block when a side is not a multiple of the factor
    box = (img.width / factor[0], img.height / factor[1])
    if factor != (1, 1):
        img = img.reduce(factor)
    pixels = torch.from_numpy(np.array(img))  # (h, w) or (h, w, 3) uint8
    planes = pixels[None, None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)[None]
    if box == img.size:
        out = F.interpolate(planes, size=(size[1], size[0]), mode="bicubic", antialias=True, align_corners=False)[0]
    else:  # torch maps output pixel o to (o + 0.5) / scale - 0.5 of its input, as Pillow's box does
        # nudged up by 1e-9 so that floor(side x scale) is never one short of the size (a side that
        # is a multiple: side x size / side in floats), and below the size + 1/2 (size x factor / side
        # <= 1/2 is over it), so the size exactly
        scale = (size[1] / box[1] * (1 + 1e-9), size[0] / box[0] * (1 + 1e-9))
        out = F.interpolate(planes, scale_factor=scale, mode="bicubic", antialias=True, align_corners=False, recompute_scale_factor=False)[0]
        if out.shape[1:] != (size[1], size[0]):  # not seen; the size then, as the whole reduced image
            out = F.interpolate(planes, size=(size[1], size[0]), mode="bicubic", antialias=True, align_corners=False)[0]
    return Image.fromarray(out[0].numpy() if img.mode == "L" else out.permute(1, 2, 0).contiguous().numpy())  # uint8: L or RGB


def pdqhash_of_image(rgb) -> tuple[bytes, int]:
    """(32-byte hash, quality) of an RGB Pillow image by the `pdqhash` binding (Meta's C++)."""
    import pdqhash

    bits, quality = pdqhash.compute(np.ascontiguousarray(np.asarray(rgb)))  # no copy of RGB pixels
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes(), int(quality)


# Coefficients at the median closer than this: pdqhash decides (see above). The two middle ones may
# each be off, so the NumPy bits are pdqhash's while the gap exceeds twice the largest difference:
# at most 0.0029 on the 300 shared photos in RGB (0.02 is 3.4x the 0.0058 needed) and 0.0013 on
# their luma planes, or any "L" image, whose pixels are PDQ's luma as they are (PLANE_MARGIN 0.01
# is 3.8x the 0.0026 needed). Planes had 0.02 until issue 34's eighteenth sitting, which sent 9 of
# the 300 to pdqhash (~6.7 ms each with the plane's RGB conversion, ~0.2 ms an image on average);
# at 0.01, 3.
PDQ_MARGIN = 0.02
PLANE_MARGIN = 0.01
QUALITY_MARGIN = 0.005  # a gradient step of the quality metric this close to an integer: it may round either way
_MIN_HASHABLE = 5  # Meta's MIN_HASHABLE_DIM: smaller images hash to zeros (pdqhash answers)
_DCT = np.sqrt(2.0 / 64) * np.cos((np.pi / 2 / 64) * np.outer(np.arange(1, 17), 2 * np.arange(64) + 1))  # PDQ's dct_matrix_64


@functools.lru_cache(maxsize=1024)
def _taps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PDQ's filter + decimation along an axis of n pixels as (rows (K, 64), weights (K, 64) in
    float32 and float64): output point o is sum_k weights[k, o] * pixel[rows[k, o]]. Two passes of
    Meta's `box1DFloat` (window w = ceil(n / 128); the mean over [i - (w - h), i + h - 1] clipped
    to the vector, h = (w + 2) // 2), read at `decimateFloat`'s points int((o + 0.5) * n / 64)."""
    w = (n + 127) // 128
    half = (w + 2) // 2
    before, after = w - half, half - 1

    def window(i: int) -> range:
        return range(max(0, i - before), min(n - 1, i + after) + 1)

    points = ((np.arange(64) + 0.5) * n / 64).astype(np.intp)
    taps = []
    for i in points:
        weights: dict[int, float] = {}
        outer = window(int(i))
        for m in outer:
            inner = window(m)
            for k in inner:
                weights[k] = weights.get(k, 0.0) + 1.0 / (len(outer) * len(inner))
        taps.append(sorted(weights.items()))
    depth = max(len(t) for t in taps)
    rows, wts = np.zeros((depth, 64), np.intp), np.zeros((depth, 64))
    for o, t in enumerate(taps):
        for k, (row, weight) in enumerate(t):
            rows[k, o], wts[k, o] = row, weight
        rows[len(t):, o] = t[-1][0]  # padding: weight 0
    return rows, wts.astype(np.float32), wts


def _downsampled(rgb) -> tuple[np.ndarray, np.ndarray]:
    """PDQ's 64 x 64 image (float64) of an RGB image and its 256 DCT coefficients (Meta's 16 x 16,
    row-major)."""
    # (299 R + 587 G + 114 B) / 1000 in float32; an L image's own bytes (a luma plane: the same
    # values, as the products below are float32 either way, without the ~0.1 ms "F" conversion)
    luma = pixel_view(rgb) if rgb.mode == "L" else pixel_view(rgb.convert("F"))
    rows, wr, _ = _taps(rgb.height)
    cols, _, wc = _taps(rgb.width)
    part = luma[rows[0]] * wr[0][:, None]  # 64 x width: the filter along the columns, at PDQ's rows
    for k in range(1, len(rows)):
        part += luma[rows[k]] * wr[k][:, None]
    part = part.astype(np.float64)
    small = part[:, cols[0]] * wc[0]  # 64 x 64: the same along the rows
    for k in range(1, len(cols)):
        small += part[:, cols[k]] * wc[k]
    return small, (_DCT @ small @ _DCT.T).ravel()  # (1..16) x (1..16) of the 64 x 64 DCT


def pixel_view(img) -> np.ndarray:
    """The pixels of an "F" (float32) or "L" (uint8) Pillow image as a read-only NumPy view, without
    the copy that `np.asarray` makes (`tobytes`, ~0.07 ms of a 500-px "F" image, issue 34):
    Pillow's Arrow export hands its own memory over. An image Pillow keeps in several blocks (over
    16 MB) is copied, and so is one under a PILLOW_ALIGNMENT or whose memory Pillow only maps
    (its Arrow export of those is not the pixels, or not safe)."""
    dtype = np.float32 if img.mode == "F" else np.uint8
    size = np.dtype(dtype).itemsize
    if Image.core.get_alignment() != 1 or img.readonly:  # PILLOW_ALIGNMENT set (lines Pillow may pad or
        return np.asarray(img)  # place apart), or memory Pillow maps from elsewhere (Image.fromarray)
    try:
        data = pa.array(img).buffers()[1]
    except ValueError:  # several blocks: no zero-copy export
        return np.asarray(img)
    if data.size < size * img.width * img.height:
        return np.asarray(img)
    return np.frombuffer(data, dtype=dtype, count=img.width * img.height).reshape(img.height, img.width)


def _pdq_numpy(rgb) -> Optional[tuple[bytes, int]]:
    """pdqhash's (hash, quality) of an RGB image, or None where it would take pdqhash itself to
    tell (a coefficient or the quality metric within PDQ_MARGIN, or PLANE_MARGIN for an "L" image, of
    flipping; a tiny image)."""
    if rgb.width < _MIN_HASHABLE or rgb.height < _MIN_HASHABLE:
        return None
    small, coef = _downsampled(rgb)
    low, high = np.partition(coef, (127, 128))[127:129]  # torben's median is the 128th smallest
    if high - low < (PLANE_MARGIN if rgb.mode == "L" else PDQ_MARGIN):
        return None
    grad = np.concatenate([(small[:-1] - small[1:]).ravel(), (small[:, :-1] - small[:, 1:]).ravel()]) * (100 / 255)
    steps = np.abs(np.trunc(grad))  # (int) of ((u - v) * 100) / 255
    total = int(steps.sum())
    if total - grad.size < 9000:  # else 100 however each step rounds (96 % of the shared photos)
        near = np.abs(grad - np.round(grad)) < QUALITY_MARGIN
        unsure = int(np.count_nonzero(near & (np.round(grad) != 0)))
        if unsure and min(100, (total - unsure) // 90) != min(100, (total + unsure) // 90):
            return None
    bits = (coef > low)[::-1]  # pdqhash's bit vector: bit i * 16 + j of Meta's hash, last first
    return np.packbits(bits).tobytes(), min(100, total // 90)


def pdq_hex(img) -> str:
    """The PDQ hash of a Pillow image as 64 hex digits (what filter stores for every kept image)."""
    return pdq_of_image(img)[0].hex()


def is_luma_jpeg(img) -> bool:
    """Whether libjpeg can hand over an opened (not yet loaded) image's luma plane alone: a
    baseline or progressive JPEG in YCbCr (Pillow's "RGB") or greyscale. Decoding "L" then skips
    the chroma planes' inverse DCT, their upsampling and the colour conversion (issue 34: ~0.6 of
    ~2 CPU ms a 500-px photo); the entropy decoding, and so every truncation and corruption check,
    is the same. CMYK and YCCK JPEGs are not."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and len(img.tile) == 1


def luma_image(img, side: int = MAX_SIDE) -> bool:
    """Set an opened (not yet loaded) JPEG in YCbCr or greyscale to decode as its luma (Y) plane
    alone, at the smallest DCT scale whose sides stay >= `side` (PDQ's MAX_SIDE fit by default; 0:
    every pixel); True when it will. What filter decodes
    for its hashes (filter/validate.decode with `luma`), so that download's blocklist check, filter's
    stored PDQ and `webpairs scrub` hash the same pixels (when filter decodes at MAX_SIDE, its
    default: with an encoder input over 512 px or `scaled_decode` off, a JPEG whose short side is
    between 1,024 px and twice that side is decoded at another scale there, ~2 bits apart, as before). PDQ of the plane against Meta's reference
    on the RGB decode: 0.2-0.5 bits of 256 on average (benchmarks/filter.py prints it each run;
    Meta's reference implementations agree within ~11, a match is <= 31)."""
    if not is_luma_jpeg(img):
        return False
    img.draft("L", (side, side) if side and min(img.size) >= 2 * side else None)
    return True


def pdq_of_bytes(data: bytes) -> Optional[tuple[bytes, int]]:
    """The PDQ hash of encoded image bytes, or None when Pillow cannot decode them (or they declare
    more than MAX_PIXELS pixels). The image is hashed upright (its EXIF orientation applied), as
    filter decodes it, and a YCbCr or greyscale JPEG from its luma plane (`luma_image`), so the
    hash download's blocklist check computes is the one filter stores."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return None
            if not luma_image(img) and img.format == "JPEG" and (img.width > MAX_SIDE or img.height > MAX_SIDE):
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
