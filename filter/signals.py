"""Cheap image-level boilerplate signals: they catch a logo or an icon seen once, where no
repetition across pages can (pure functions, no Beam).

- declared size: the page renders the image under the minimum side (an icon, a button, a thumb);
  only when the link declares a size, never stricter than the decoded-size rule.
- flat image: a few exact colours cover most pixels (logos, icons, spacers, buttons). Measured on
  the 300 real photos of ../shared/data (none above 0.59 with 8 colours) against logos drawn flat
  (0.99 native, 0.84 after resampling); JPEG-compressed logos spread over many colours and are left
  to the site rule of `pair`.
- URL words: path tokens such as `logo`, `icon`, `sprite` (off by default; the count of matches is
  reported either way).
"""

from __future__ import annotations

import re
from typing import Callable, Optional
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from core.perceptual import fit_size

DECLARED_TOO_SMALL = "declared_too_small"
FLAT_IMAGE = "flat_image"
URL_WORD = "url_word"

FLAT_THUMB = 128  # the measure runs on a nearest-neighbour thumbnail of at most this side


def declared_too_small(width: Optional[int], height: Optional[int], min_side: int) -> Optional[str]:
    """A detail when a declared (rendered) side is under `min_side`; None when none is declared
    or both are large enough."""
    small = [f"{name} {v}" for name, v in (("width", width), ("height", height)) if v is not None and 0 < v < min_side]
    return f"declared {', '.join(small)} < {min_side}" if small else None


def thumb_size(width: int, height: int, side: int = FLAT_THUMB) -> Optional[tuple[int, int]]:
    """The size `Image.thumbnail((side, side))` gives a width x height image (Pillow's rounding of
    the aspect ratio, core/perceptual.fit_size), or None when it fits already."""
    return None if side >= width and side >= height else fit_size(width, height, side)


def _flat_thumb(image: Image.Image) -> Image.Image:
    """The image's nearest-neighbour thumbnail (`thumbnail((FLAT_THUMB, FLAT_THUMB), NEAREST)`'s
    pixels, resized straight from the image: no full-size copy first), in RGB."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    size = thumb_size(*rgb.size)
    return rgb if size is None else rgb.resize(size, Image.NEAREST)  # nearest: no blended edge colours


def _share(thumb: Image.Image, colours: int) -> float:
    a = np.asarray(thumb)
    codes = np.sort(((a[..., 0].astype(np.int32) << 16) | (a[..., 1].astype(np.int32) << 8) | a[..., 2]), axis=None)
    ends = np.flatnonzero(codes[1:] != codes[:-1])
    counts = np.diff(np.concatenate(([-1], ends, [codes.size - 1])))  # of each distinct colour
    if counts.size > colours:
        counts = np.partition(counts, counts.size - colours)[-colours:]
    return float(counts.sum() / codes.size)


def top_colour_share(image: Image.Image, colours: int) -> float:
    """Share of pixels covered by the `colours` most frequent exact RGB colours, on the image's
    nearest-neighbour thumbnail (`thumbnail((FLAT_THUMB, FLAT_THUMB), NEAREST)`'s pixels, resized
    straight from the image: no full-size copy first)."""
    return _share(_flat_thumb(image), colours)


FLAT_SCREEN_MARGIN = 0.1  # a luma plane whose top levels cover >= share - this is checked in RGB


def flat_share(image: Image.Image, colours: int, share: float, rgb: Optional[Callable[[], Image.Image]] = None) -> Optional[float]:
    """`top_colour_share(image, colours)` when it is >= `share` (a flat image), else None.

    A bound first, from the thumbnail's three channel histograms (Pillow's, in C): the pixels of
    the `colours` most frequent colours have at most `colours` values in each channel, so they are
    no more than that channel's `colours` most frequent values cover. When the smallest of the
    three bounds is under `share`, so is the exact share, and the sort of every pixel's colour is
    skipped (on the 300 shared photos the bound decides 299; 0.05 ms against 0.16, issue 34).

    An "L" image with `rgb` is a JPEG's luma plane (filter/validate.decode with `luma`) and `rgb()`
    decodes the same pixels in RGB: the share is measured on RGB colours as ever, and the plane
    only screens. libjpeg's RGB is Y plus a chroma term per channel, so pixels of one RGB colour
    that no channel clips at 0 or 255 share one Y level (tests/test_filter_luma.py checks this on
    every pixel of the shared photos); the `colours` most frequent levels then bound the share as
    the channel histograms do. That is a bound for unclipped colours only: a colour that a channel
    clips (saturated, pure white or black) can come from several Y levels, so the plane is checked
    in RGB whenever its bound reaches share - FLAT_SCREEN_MARGIN (2 of the 300 photos). For clipped
    colours the margin is a heuristic, not a bound: a JPEG can be made to decode one clipped colour
    (#ff7800) from 23 Y levels, and a flat area of it is then missed (kept, not rejected as flat).
    On the shared photos and on drawn logos (saturated primaries included) the answers are the RGB
    check's (tests/test_filter_luma.py)."""
    if image.mode == "L" and rgb is not None:
        size = thumb_size(*image.size)
        thumb = image if size is None else image.resize(size, Image.NEAREST)  # the RGB thumbnail's pixels
        if colours < 256:
            bound = int(np.sort(np.array(thumb.histogram(), dtype=np.int64))[256 - colours:].sum())
            if bound / (thumb.width * thumb.height) < share - FLAT_SCREEN_MARGIN:
                return None
        image = rgb()
    thumb = _flat_thumb(image)
    if colours < 256:
        hist = np.array(thumb.histogram(), dtype=np.int64).reshape(3, 256)
        bound = int(np.partition(hist, 256 - colours, axis=1)[:, 256 - colours:].sum(axis=1).min())
        if float(bound / (thumb.width * thumb.height)) < share:
            return None
    found = _share(thumb, colours)
    return found if found >= share else None


_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_TOKEN = re.compile(r"[a-z]+")


def url_words(url: str, words: tuple[str, ...]) -> list[str]:
    """The words of `words` that name a token of the URL's path (plural and camelCase too:
    `/img/siteLogo.png`, `/icons/x.gif`); never a part of a longer word (`lexicon`)."""
    path = _CAMEL.sub("-", urlsplit(url).path)
    tokens = set(_TOKEN.findall(path.lower()))
    return [w for w in words if w in tokens or w + "s" in tokens]
