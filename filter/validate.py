"""Safe decoding and validation of downloaded image bytes with Pillow (pure functions, no Beam).

Decisions: the decompression-bomb limit is checked explicitly from the header before any pixel is
decoded (and Pillow's own guard stays on as a backstop); vector formats (SVG) are rejected;
animated images keep their first frame by default (`animated: reject` drops them); EXIF
orientation is applied; a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8, Pillow's
`Image.draft`) that still gives each use the pixels it needs (`decode_side`), while the width and
height recorded and checked are the true ones from the header; CMYK, palette, alpha, greyscale and 16-bit modes become 8-bit RGB (alpha
composited on white).
"""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Optional, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from core.config import FilterConfig
from core.perceptual import luma_image
from core.sample_layout import to_rgb

# Closed set of reasons of the validation step.
EMPTY = "empty"
UNSUPPORTED = "unsupported_format"
DECODE_ERROR = "decode_error"
TRUNCATED = "truncated"
BOMB = "decompression_bomb"
ANIMATED = "animated"
TOO_SMALL = "too_small"
BAD_ASPECT = "bad_aspect"

RASTER_FORMATS = {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO"}


@dataclasses.dataclass(frozen=True)
class Invalid:
    """Why an image was rejected."""

    reason: str
    detail: str = ""


@dataclasses.dataclass
class ValidImage:
    """A decoded 8-bit RGB image (or, decoded with `luma`, a JPEG's "L" luma plane) and what we
    learned about the original. `image` may be a JPEG decoded at a DCT scale (each side at least the `side` asked of `decode`, or the full image);
    `width` and `height` are always the original's (after EXIF orientation)."""

    image: Image.Image
    format: str
    width: int
    height: int
    animated: bool


PHASH_INPUT_FACTOR = 8  # pHash resizes to 4 x hash_size px; decoding at twice that keeps it within a bit


def decode_side(cfg: FilterConfig, encoder_size: int = 0, flat_thumb: int = 0, pdq_side: int = 0) -> int:
    """The smallest side the decoded pixels need for every use of one filter run: pHash (twice its
    4 x hash_size input: 64 px by default), the flat-image thumbnail, the encoder's input size, and
    the PDQ hash's `pdq_side` (core/perceptual.MAX_SIDE: PDQ must see the pixels that
    `pdq_of_bytes` sees, or the stored hash drifts from the blocklist's by ~16 of 256 bits)."""
    return max(PHASH_INPUT_FACTOR * cfg.phash_size, flat_thumb if cfg.flat_colours else 0, encoder_size, pdq_side)


def _true_size(img: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """The header's (width, height) as `ImageOps.exif_transpose` will orient it (5-8 swap sides)."""
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - unreadable EXIF: exif_transpose ignores it as well
        orientation = None
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")  # e.g. <_io.BytesIO object at 0x7f...>


def _detail(err: BaseException) -> str:
    """A reject detail from a decoder's exception, the same on every run: Pillow names the
    stream it read (`cannot identify image file <_io.BytesIO object at 0x...>`); that memory
    address goes."""
    return _OBJECT_REPR.sub("", str(err)).strip()[:200]


def _looks_like_svg(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower()


def validate(data: Optional[bytes], cfg: FilterConfig, side: int = 0) -> Union[ValidImage, Invalid]:
    """Decode `data` safely (see `decode` for `side`) and check it against the thresholds of `cfg`."""
    result = decode(data, cfg, side)
    if isinstance(result, Invalid):
        return result
    return check_shape(result, cfg) or result


def decode(data: Optional[bytes], cfg: FilterConfig, side: int = 0, luma: bool = False) -> Union[ValidImage, Invalid]:
    """Decode `data` safely into 8-bit RGB (no size threshold applied yet: the image is hashed
    whatever its size, as boilerplate evidence). With `side` > 0 a JPEG is decoded at the smallest
    DCT scale whose sides stay >= `side` (every scanline is still decoded, so truncation and
    corruption are found as before); 0 decodes every pixel.

    With `luma` a YCbCr or greyscale JPEG is decoded as its luma (Y) plane alone, an "L" image
    (`core/perceptual.luma_image`): what filter hashes (pHash, PDQ) and screens for flatness; anything else is
    decoded into RGB as without it."""
    if not data:
        return Invalid(EMPTY, "0 bytes")
    if _looks_like_svg(data):
        return Invalid(UNSUPPORTED, "SVG (vector format)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return Invalid(BOMB, _detail(err))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return Invalid(DECODE_ERROR, _detail(err))
    fmt = img.format or "?"
    if fmt not in RASTER_FORMATS:
        return Invalid(UNSUPPORTED, fmt)
    w, h = img.size
    if w * h > cfg.max_pixels:  # from the header: nothing decoded yet
        return Invalid(BOMB, f"{w}x{h} > {cfg.max_pixels} pixels")
    animated = getattr(img, "n_frames", 1) > 1
    if animated and cfg.animated == "reject":
        return Invalid(ANIMATED, f"{img.n_frames} frames")
    try:
        img.seek(0)
        plane = luma and luma_image(img, side)  # a YCbCr or greyscale JPEG: its Y plane, at the scale below
        if not plane and side and fmt == "JPEG" and min(w, h) >= 2 * side:  # 1/2 scale or smaller fits
            img.draft(img.mode, (side, side))
        img.load()
    except Image.DecompressionBombError as err:
        return Invalid(BOMB, _detail(err))
    except OSError as err:
        reason = TRUNCATED if "truncated" in str(err).lower() else DECODE_ERROR
        return Invalid(reason, _detail(err))
    except (ValueError, SyntaxError, EOFError) as err:
        return Invalid(DECODE_ERROR, _detail(err))
    try:
        width, height = _true_size(img, (w, h)) if img.size != (w, h) else (None, None)
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an image that needs no turn
        rgb = img if plane else to_rgb(img)
    except (OSError, ValueError) as err:
        return Invalid(DECODE_ERROR, _detail(err))
    if width is None:  # decoded in full: the pixels are the true size
        width, height = rgb.size
    return ValidImage(rgb, fmt, width, height, animated)


def check_shape(image: ValidImage, cfg: FilterConfig) -> Optional[Invalid]:
    """The size and aspect thresholds of a decoded image, or None when it passes."""
    w, h = image.width, image.height
    if min(w, h) < cfg.min_side:
        return Invalid(TOO_SMALL, f"{w}x{h} < {cfg.min_side}")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        return Invalid(BAD_ASPECT, f"{w}x{h} aspect {max(w, h) / min(w, h):.2f} > {cfg.max_aspect}")
    return None


def configure_pillow(cfg: FilterConfig) -> None:
    """Set Pillow's own decompression-bomb guard explicitly (a backstop to the header check)."""
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels
