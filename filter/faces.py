"""Faces in kept images (`filter --faces detect|blur|off`): OpenCV's frontal-face Haar cascade,
the model file bundled in the opencv-python-headless wheel (`cv2.data.haarcascades`: no download,
works offline).

`detect` stores each kept image's face count and boxes (filter's `images/`: `faces`,
`face_boxes` as flat x, y, w, h groups in the image's pixels); `blur` also blurs every box
(a Gaussian blur as wide as the box, strong enough that the cascade finds no face there again) in the image's bytes,
which filter then stores re-encoded as JPEG, so the shards, the embedding and everything after
see only the blurred image (download's copy keeps the original).

The cascade runs on a greyscale copy scaled to at most `DETECT_SIDE` pixels; the settings were tuned on the 300 animal photos of ../shared's ImageNet sample
(false positives) and scikit-image's astronaut photo (a face): see README's "Unsafe content".
"""

from __future__ import annotations

import io
import threading
from typing import Optional

import numpy as np

DETECT_SIDE = 640  # detection on a copy at most this large (speed; boxes scaled back)
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 19  # overlapping detections a face needs: at 19, none of the sample's 295 photos without people
MIN_FACE_SHARE = 0.08  # a face's side is at least this share of the image's short side ...
MIN_FACE_PIXELS = 24  # ... and at least this many pixels (the cascade's own window)

_local = threading.local()


def _cascade():
    cascade = getattr(_local, "cascade", None)
    if cascade is None:
        import cv2

        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if cascade.empty():
            raise RuntimeError("OpenCV's bundled haarcascade_frontalface_default.xml did not load")
        _local.cascade = cascade
    return cascade


def detect_faces(img) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) in the pixels of a Pillow RGB image, largest first."""
    import cv2

    grey = np.asarray(img.convert("L"))
    h, w = grey.shape
    scale = min(1.0, DETECT_SIDE / max(h, w))
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    side = max(MIN_FACE_PIXELS, int(MIN_FACE_SHARE * min(grey.shape)))
    found = _cascade().detectMultiScale(grey, scaleFactor=SCALE_FACTOR, minNeighbors=MIN_NEIGHBORS, minSize=(side, side))
    boxes = [tuple(int(round(v / scale)) for v in box) for box in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: -b[2] * b[3])


def flat_boxes(boxes) -> list[int]:
    return [v for box in boxes for v in box]


def blur_faces(img, boxes):
    """A copy of the Pillow RGB image with every box blurred (a kernel the size of the box)."""
    import cv2
    from PIL import Image

    arr = np.array(img.convert("RGB"))
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = max(0, x), max(0, y), min(arr.shape[1], x + w), min(arr.shape[0], y + h)
        if x1 <= x0 or y1 <= y0:
            continue
        k = max(3, max(w, h) | 1)  # a kernel as wide as the face, sigma a quarter of it: no face left
        arr[y0:y1, x0:x1] = cv2.GaussianBlur(arr[y0:y1, x0:x1], (k, k), max(w, h) / 4)
    return Image.fromarray(arr)


def jpeg_bytes(img, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


DETECT_MIN_SIDE = 480  # a scaled decode smaller than this (and than the image) is decoded again for detection


def apply(record: dict, img, mode: str, size: Optional[tuple] = None, redecode=None) -> Optional[object]:
    """Fill `faces` and `face_boxes` of a kept image's record (mode detect or blur). `img` may be a
    scaled decode (filter decodes a JPEG at a DCT scale): `size` is the image's true (width,
    height), the boxes are stored in its pixels, and `redecode(side)` decodes it again with sides
    of at least `side` (0: full size): for detection when `img` is too small for the cascade, and
    at full size for the blur. With blur and faces found, the record's bytes become the blurred
    full-size JPEG, and that blurred full-size image is returned (for the embedding); else None."""
    if mode == "off":
        return None
    size = size or img.size
    probe = img
    if redecode is not None and min(img.size) < min(DETECT_MIN_SIDE, min(size)):
        probe = redecode(DETECT_MIN_SIDE)
    boxes = detect_faces(probe)
    sx, sy = size[0] / probe.width, size[1] / probe.height
    scaled = [(round(x * sx), round(y * sy), round(w * sx), round(h * sy)) for x, y, w, h in boxes]
    record["faces"], record["face_boxes"] = len(boxes), flat_boxes(scaled)
    if mode == "blur" and boxes:
        original = redecode(0) if redecode is not None and tuple(size) != tuple(probe.size) else probe
        blurred = blur_faces(original, scaled)  # at the image's true size: what is stored (and embedded)
        record["image_bytes"], record["format"] = jpeg_bytes(blurred), "JPEG"
        return blurred
    return None
