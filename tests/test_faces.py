"""Faces (issue 32): OpenCV's bundled Haar cascade finds the face of scikit-image's astronaut photo,
none in the ImageNet sample's photos of animals alone, and `--faces blur` blurs the face in the
image filter stores (so in the shards) while the rest of the picture keeps its pixels."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# The sample's photos with people in them (checked by eye: owners posing with their dogs); every
# other photo shows animals only.
PEOPLE = {
    "n02088466_bloodhound.JPEG", "n02093859_Kerry_blue_terrier.JPEG", "n02098286_West_Highland_white_terrier.JPEG",
    "n02105641_Old_English_sheepdog.JPEG", "n02108422_bull_mastiff.JPEG",
}
ASTRONAUT_FACE = (165, 55, 285, 175)  # x0, y0, x1, y1 around Eileen Collins' face in the 512 x 512 photo


def _astronaut():
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.astronaut())


def _sharpness(arr) -> float:
    import cv2

    return float(cv2.Laplacian(cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def test_the_astronaut_has_one_face_where_her_face_is():
    from filter.faces import detect_faces

    boxes = detect_faces(_astronaut())
    assert len(boxes) == 1
    x, y, w, h = boxes[0]
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert x0 <= x and y0 <= y and x + w <= x1 and y + h <= y1 and w >= 60


def test_no_face_in_the_photos_of_animals(photos_dir):
    from PIL import Image

    from filter.faces import detect_faces

    found = {}
    for name in sorted(os.listdir(photos_dir)):
        boxes = detect_faces(Image.open(os.path.join(photos_dir, name)).convert("RGB"))
        if boxes:
            found[name] = boxes
    assert len(os.listdir(photos_dir)) == 300
    assert set(found) <= PEOPLE  # not one of the 295 photos of animals alone
    assert len(found) >= 4  # and the people's faces are found


def test_blur_blurs_the_face_and_nothing_else():
    from filter.faces import blur_faces, detect_faces

    img = _astronaut()
    (x, y, w, h), = detect_faces(img)
    before, after = np.asarray(img), np.asarray(blur_faces(img, [(x, y, w, h)]))
    face = (slice(y, y + h), slice(x, x + w))
    assert _sharpness(np.ascontiguousarray(after[face])) < _sharpness(np.ascontiguousarray(before[face])) / 5
    outside = np.ones(before.shape[:2], bool)
    outside[face] = False
    assert np.array_equal(before[outside], after[outside])


@pytest.mark.parametrize("mode", ["detect", "blur", "off"])
def test_filter_stores_faces_and_blurs_the_stored_image(tmp_path, photos_dir, mode):
    """filter on a download output of the astronaut and two animal photos: face count and boxes in
    images/ (read back with pyarrow), blurred bytes only with --faces blur."""
    from PIL import Image

    from core.config import FilterConfig
    from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA
    from core.stageio import finish_stage, read_table
    from filter.faces import detect_faces
    from filter.pipeline import run_filter

    buf = io.BytesIO()
    _astronaut().save(buf, "PNG")
    big = io.BytesIO()  # a large JPEG: filter decodes it at a DCT scale, the boxes and the blur are at full size
    _astronaut().resize((1024, 1024), Image.LANCZOS).save(big, "JPEG", quality=92)
    blobs = {"astronaut": buf.getvalue(), "astronaut-1024": big.getvalue()}
    for name in ("n02085620_Chihuahua.JPEG", "n01443537_goldfish.JPEG"):
        blobs[name] = open(os.path.join(photos_dir, name), "rb").read()
    download = tmp_path / "download"
    (download / "downloads").mkdir(parents=True)
    (download / "occurrences").mkdir()
    rows = [{"image_id": f"id{i}", "image_url": f"http://example.org/{k}.jpg", "page_url": "http://example.org/p", "alt": "", "position": i, "image_bytes": b, "sha256": None, "links": 1} for i, (k, b) in enumerate(blobs.items())]
    pq.write_table(pa.Table.from_pylist(rows, schema=DOWNLOAD_SCHEMA), download / "downloads" / "part-0.parquet")
    links = [{"link_id": r["image_id"], "page_url": r["page_url"], "site": "example.org", "image_url": r["image_url"], "alt": "", "position": r["position"], "image_id": r["image_id"]} for r in rows]
    pq.write_table(pa.Table.from_pylist(links, schema=DOWNLOAD_OCCURRENCE_SCHEMA), download / "occurrences" / "part-0.parquet")
    (download / "stats.json").write_text(f'{{"stage": "download", "input": {len(rows)}, "kept": {len(rows)}, "rejected": {{}}}}')
    finish_stage(str(download), "download")
    run_filter(str(download), str(tmp_path / "filter"), FilterConfig(encoder="none", faces=mode))
    images = {r["image_id"]: r for r in read_table(str(tmp_path / "filter"), "images").to_pylist()}
    assert len(images) == len(blobs)
    # only a blurred image's bytes are stored; the others point to download's row (issue 34)
    assert {i for i, r in images.items() if r["image_bytes"] is not None} == ({r["image_id"] for r, name in zip(rows, blobs) if name.startswith("astronaut")} if mode == "blur" else set())
    from downloads import pointed_bytes

    for r, b in zip(images.values(), pointed_bytes(list(images.values()), download)):
        r["image_bytes"] = b
    for row, (name, data) in zip(rows, blobs.items()):
        got = images[row["image_id"]]
        if mode == "off":
            assert got["faces"] is None and got["face_boxes"] is None and got["image_bytes"] == data
            continue
        expected = detect_faces(Image.open(io.BytesIO(data)).convert("RGB"))
        assert got["faces"] == len(expected) == (1 if name.startswith("astronaut") else 0)
        if expected:  # the stored box is the face's, in the image's own pixels (within a few %)
            assert np.allclose(got["face_boxes"], expected[0], atol=0.06 * expected[0][2])
        else:
            assert got["face_boxes"] == []
        if mode == "blur" and name.startswith("astronaut"):
            stored = np.asarray(Image.open(io.BytesIO(got["image_bytes"])).convert("RGB"))
            original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert stored.shape == original.shape  # full size, not the scaled decode
            x, y, w, h = got["face_boxes"]
            x, y, w, h = x + w // 8, y + h // 8, w * 3 // 4, h * 3 // 4  # inside the blurred box, off its edges
            assert _sharpness(np.ascontiguousarray(stored[y:y + h, x:x + w])) < _sharpness(np.ascontiguousarray(original[y:y + h, x:x + w])) / 5
            assert not detect_faces(Image.fromarray(stored))  # the blurred face is no longer a face
        else:
            assert got["image_bytes"] == data
    # the report's safety section counts them
    from browse.report import collect, render_html, summary_text

    data = collect(str(tmp_path / "filter"))
    if mode == "off":
        assert "faces" not in data["safety"]
    else:
        assert data["safety"]["faces"] == {"checked": 4, "images_with_faces": 2, "faces": 2}
        assert "images with faces: 2 of 4 (2 faces)" in summary_text(data)
        assert "<h2>Safety</h2>" in render_html(data)


def test_faces_of_a_reduced_decode_are_boxed_and_blurred_at_the_true_size():
    """Filter decodes a large JPEG at a DCT scale (issue 34); the face boxes must still be in the
    image's own pixels and `blur` must keep the image's size (it re-decodes at full size)."""
    from PIL import Image

    from filter.faces import apply

    big = _astronaut().resize((2048, 2048), Image.LANCZOS)
    reduced = big.resize((512, 512), Image.LANCZOS)  # what a 1/4-scale draft decode gives
    record = {}
    out = apply(record, reduced, "blur", (2048, 2048), lambda side: big if side == 0 else big.resize((512, 512), Image.LANCZOS))
    x, y, w, h = record["face_boxes"]
    x0, y0, x1, y1 = (v * 4 for v in ASTRONAUT_FACE)
    assert record["faces"] == 1 and x0 <= x + w / 2 <= x1 and y0 <= y + h / 2 <= y1 and w > 200
    assert out.size == (2048, 2048) and Image.open(io.BytesIO(record["image_bytes"])).size == (2048, 2048)
    face = np.asarray(out)[y : y + h, x : x + w]
    assert _sharpness(face) < 0.2 * _sharpness(np.asarray(big)[y : y + h, x : x + w])
