"""Safe decoding and validation of downloaded image bytes with Pillow (pure functions, no Beam).

Decisions: the decompression-bomb limit is checked explicitly from the header before any pixel is
decoded (and Pillow's own guard stays on as a backstop); vector formats (SVG) are rejected;
animated images keep their first frame by default (`animated: reject` drops them); EXIF
orientation is applied; CMYK, palette, alpha, greyscale and 16-bit modes become 8-bit RGB (alpha
composited on white).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Optional, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from core.config import FilterConfig
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
    """A decoded 8-bit RGB image and what we learned about the original."""

    image: Image.Image
    format: str
    width: int
    height: int
    animated: bool


def _looks_like_svg(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower()


def validate(data: Optional[bytes], cfg: FilterConfig) -> Union[ValidImage, Invalid]:
    """Decode `data` safely and check it against the thresholds of `cfg`."""
    result = decode(data, cfg)
    if isinstance(result, Invalid):
        return result
    return check_shape(result, cfg) or result


def decode(data: Optional[bytes], cfg: FilterConfig) -> Union[ValidImage, Invalid]:
    """Decode `data` safely into 8-bit RGB (no size threshold applied yet: the image is hashed
    whatever its size, as boilerplate evidence)."""
    if not data:
        return Invalid(EMPTY, "0 bytes")
    if _looks_like_svg(data):
        return Invalid(UNSUPPORTED, "SVG (vector format)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return Invalid(BOMB, str(err)[:200])
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return Invalid(DECODE_ERROR, str(err)[:200])
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
        img.load()
    except Image.DecompressionBombError as err:
        return Invalid(BOMB, str(err)[:200])
    except OSError as err:
        reason = TRUNCATED if "truncated" in str(err).lower() else DECODE_ERROR
        return Invalid(reason, str(err)[:200])
    except (ValueError, SyntaxError, EOFError) as err:
        return Invalid(DECODE_ERROR, str(err)[:200])
    try:
        img = ImageOps.exif_transpose(img) or img
        rgb = to_rgb(img)
    except (OSError, ValueError) as err:
        return Invalid(DECODE_ERROR, str(err)[:200])
    return ValidImage(rgb, fmt, rgb.size[0], rgb.size[1], animated)


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
