"""Helpers shared by the benchmarks: paths, timing, and a result table."""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


SMOKE_HELP = "smallest size, one run: checks that the benchmark runs and prints its figures (tests/test_benchmarks_smoke.py); its timings mean nothing"


def need_shared(sub: str) -> str:
    path = os.path.join(SHARED, sub)
    if not os.path.exists(path):
        sys.exit(f"benchmark needs {path} (clone ../shared beside the project)")
    return path


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def timed_cpu(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process) of one call: on a shared machine the CPU
    time of an in-process run is what another tenant cannot inflate."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start, time.process_time() - cpu


def paired_median(ratios: list[float]) -> tuple[float, str]:
    """(the median, a line listing every round's) of per-round ratios, each from a baseline and a
    stage timed back to back. On a shared machine the speed drifts by 10-20 % within minutes: the
    fastest of each, taken minutes apart, can pair a fast baseline with a slow stage, while a
    baseline and a stage timed back to back drift together (seen on this project's 2-core machine:
    bare loop 239-284 images/s over six rounds, each round's ratio 0.88-1.17)."""
    import statistics

    med = statistics.median(ratios)
    return med, f"each round: {', '.join(f'{r:.2f}' for r in ratios)} (median {med:.2f})"


def report(name: str, rows: list[tuple[str, float, str]], ratio: float, goal: float, notes: tuple = ()) -> dict:
    """Print a small table (and `notes`, lines of text) and the ratio against its goal; returns a
    dict for run_all."""
    print(f"\n== {name} ==")
    for label, value, unit in rows:
        print(f"  {label:45s} {value:10.1f} {unit}")
    for line in notes:
        print(f"  {line}")
    verdict = "meets" if ratio >= goal else "BELOW"
    print(f"  {'ratio':45s} {ratio:10.2f}   (goal >= {goal}: {verdict})")
    return {"benchmark": name, "ratio": ratio, "goal": goal, "rows": rows}


def mark_complete(out_dir: str, stage: str, n: int) -> None:
    """Make a hand-written stage folder a complete output, as the stage leaves it (reconciled
    stats.json, then `_SUCCESS`), so the next stage accepts it."""
    import json

    from core.stageio import finish_stage

    with open(os.path.join(out_dir, "stats.json"), "w") as fh:
        json.dump({"stage": stage, "input": n, "kept": n, "rejected": {}}, fh)
    finish_stage(out_dir, stage)


def photo_downloads(out_dir: str, repeat: int, files: int = 1, side: int = 0, photos: int = 0) -> list[bytes]:
    """A complete `crawl download` output of the 300 shared photos `repeat` times, in `files`
    parquet files, one link per image row (each repeat counts as its own image, so that filter
    does the work `repeat` times); returns the image bytes in row order. With `side` the photos
    are re-encoded first (JPEG q90, long side `side` px); with `photos` only the first that many
    (a smoke run's size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA, write_downloads

    folder = need_shared("photos-imagenet-sample")
    blobs = [open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))[: photos or None]]
    if side:
        blobs = [_resized_jpeg(b, side) for b in blobs]
    rows = [
        {"image_id": f"{r}-{i}", "page_url": f"http://example.org/p{i // 4}", "image_url": f"http://example.org/{r}/{i}.jpg", "alt": "a photo", "position": i % 4, "image_bytes": b, "sha256": None, "links": 1}
        for r in range(repeat)
        for i, b in enumerate(blobs)
    ]
    links = [{"link_id": r["image_id"], "page_url": r["page_url"], "site": "example.org", "image_url": r["image_url"], "alt": r["alt"], "position": r["position"], "image_id": r["image_id"]} for r in rows]
    os.makedirs(os.path.join(out_dir, "downloads"))
    os.makedirs(os.path.join(out_dir, "occurrences"))
    per_file = -(-len(rows) // files)
    for f in range(files):
        write_downloads(pa.Table.from_pylist(rows[f * per_file : (f + 1) * per_file], schema=DOWNLOAD_SCHEMA), os.path.join(out_dir, "downloads", f"part-{f}.parquet"))  # as download writes them
        pq.write_table(pa.Table.from_pylist(links[f * per_file : (f + 1) * per_file], schema=DOWNLOAD_OCCURRENCE_SCHEMA), os.path.join(out_dir, "occurrences", f"part-{f}.parquet"))
    mark_complete(out_dir, "download", len(rows))
    return [r["image_bytes"] for r in rows]


def _resized_jpeg(data: bytes, side: int) -> bytes:
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = side / max(img.size)
    buf = io.BytesIO()
    img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS).save(buf, "JPEG", quality=90)
    return buf.getvalue()
