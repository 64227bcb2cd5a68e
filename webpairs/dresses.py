"""The dresses a republished photo comes in on other sites, for the copy test web and benchmark:
crop, mirror, colour grade + recompression, watermark + frame, 16:9 letterbox, 16:9 cut, resize;
and burst-like crops of one scene (different parts: distinct photos, not copies)."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw, ImageEnhance, ImageOps

DRESSES = ("crop", "mirror", "grade", "watermark_frame", "letterbox", "cut_16_9", "resize")


def dress(img: Image.Image, kind: str, rng: random.Random) -> tuple[Image.Image, int]:
    """(the photo in one dress, the JPEG quality it is published at)."""
    img = img.convert("RGB")
    w, h = img.size
    if kind == "crop":  # keeps 75-90 % of each side at a random offset
        fw, fh = rng.uniform(0.75, 0.9), rng.uniform(0.75, 0.9)
        cw, ch = int(w * fw), int(h * fh)
        x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        return img.crop((x, y, x + cw, y + ch)), 88
    if kind == "mirror":
        return ImageOps.mirror(img), 90
    if kind == "grade":  # a warm, punchy grade, recompressed at quality 45
        out = ImageEnhance.Color(img).enhance(rng.uniform(1.3, 1.6))
        out = ImageEnhance.Contrast(out).enhance(rng.uniform(1.15, 1.3))
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.85, 0.95))
        r, g, b = out.split()
        out = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.08) + 6)), g, b.point(lambda v: int(v * 0.9))))
        return out, 45
    if kind == "watermark_frame":  # a site's text mark, then a solid frame
        out = img.copy()
        mark = Image.new("RGBA", out.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(mark)
        text = f"(c) photo-agency-{rng.randrange(100):02d}.example"
        for k in range(3):
            draw.text((10 + k * w // 4, h - 24 - k * h // 4), text, fill=(255, 255, 255, 150))
        draw.rectangle((w - 90, 8, w - 8, 30), fill=(0, 0, 0, 110))
        out = Image.alpha_composite(out.convert("RGBA"), mark).convert("RGB")
        side = rng.randrange(12, 24)
        return ImageOps.expand(out, border=side, fill=tuple(rng.randrange(256) for _ in range(3))), 85
    if kind == "letterbox":  # padded with black bars to 16:9, at the photo's height
        canvas_w = max(w, int(round(h * 16 / 9)))
        canvas_h = max(h, int(round(canvas_w * 9 / 16)))
        canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
        canvas.paste(img, ((canvas_w - w) // 2, (canvas_h - h) // 2))
        return canvas, 85
    if kind == "cut_16_9":  # cut to 16:9 (top and bottom go)
        ch = min(h, int(w * 9 / 16))
        y = (h - ch) // 2
        return img.crop((0, y, w, y + ch)), 88
    if kind == "resize":
        f = rng.uniform(0.5, 0.75)
        return img.resize((max(64, int(w * f)), max(64, int(h * f))), Image.LANCZOS), 85
    raise ValueError(f"unknown dress {kind!r}")


def burst(img: Image.Image, part: int, parts: int = 2, keep: float = 0.6) -> Image.Image:
    """Part `part` of `parts` burst-like crops of one scene: each keeps `keep` of the width, the
    crops slide across it, so two of them share at most 2 * keep - 1 of the width (different parts
    of the scene, each a photo of its own)."""
    img = img.convert("RGB")
    w, h = img.size
    cw = int(w * keep)
    x = 0 if parts == 1 else round(part * (w - cw) / (parts - 1))
    return img.crop((x, 0, x + cw, h))
