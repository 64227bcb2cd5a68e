"""filter throughput: the stage without encoder vs bare loops, and the RunInference encoder step vs
a bare batched forward of the same encoder at the same batch size.

Bare loops (the same images, this process, CPU time):
- decode every pixel + sha256 + pHash: the naive loop issue 34 measures the stage against;
- the same with the JPEG decoded at the DCT scale pHash and the flat thumbnail alone would need
  (Pillow's `Image.draft`);
- the same work as the stage's hashes: every pixel + sha256 + pHash + PDQ (pdqhash on the image
  fitted to 512 px, Meta's reference), since filter stores a PDQ for the blocklist (issue 32).

Then each step's CPU ms per image outside Beam (the bare loop's and the stage's; what the stage run
costs beyond its steps is Beam, reading and writing parquet, the links and the stats), and PDQ by
core/perceptual (NumPy, the stage's) against pdqhash (the reference, Meta's C++; the same bits,
tests/test_pdq.py).

The stage runs with `--faces off`: face detection (`--faces detect`, the default) is a model like
the encoder, a Haar cascade at <= 640 px; its CPU time per image is printed on its own.

Input: the shared real photos (../shared/data/photos-imagenet-sample, 500 x 375 px typically),
written as a downloads parquet (`--repeat` copies so that Beam's fixed start-up is not what gets
timed). `--side N` re-encodes them larger first (JPEG q90, long side N px: web photos are larger
than ImageNet's).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import tempfile
import time

import numpy as np

from _common import SMOKE_HELP, paired_median, photo_downloads, report, timed, timed_cpu


def bare_checks(blobs: list[bytes], side: int = 0, pdq: bool = False) -> int:
    """The per-image work without the pipeline: decode (every pixel, or with `side` a JPEG at the
    smallest DCT scale whose sides stay >= side), sha256, pHash (and with `pdq` Meta's PDQ of the
    image fitted to 512 px, as its reference hashes)."""
    import imagehash
    import pdqhash
    from PIL import Image

    for b in blobs:
        img = Image.open(io.BytesIO(b))
        if side:
            img.draft(img.mode, (side, side))
        img.load()
        hashlib.sha256(b).hexdigest()
        rgb = img.convert("RGB")
        str(imagehash.phash(rgb))
        if pdq:
            rgb.thumbnail((512, 512))
            pdqhash.compute(np.asarray(rgb))
    return len(blobs)


def step_ms(blobs: list[bytes], cfg) -> dict:
    """CPU ms per image of each step, outside Beam, on the distinct images of `blobs`: the bare
    loop's steps and the stage's (ValidateAndHash's calls, in its order), and PDQ by pdqhash (both
    PDQs include fitting a larger image to 512 px, as the stage does)."""
    import time

    import imagehash
    import pdqhash
    from PIL import Image

    from core.perceptual import MAX_SIDE, pdq_hex
    from filter.hashing import phash_hex, sha256_hex
    from filter.signals import FLAT_THUMB, flat_share
    from filter.validate import check_shape, decode, decode_side

    blobs = list(dict.fromkeys(blobs))  # each photo once
    side = decode_side(cfg, 0, FLAT_THUMB, MAX_SIDE) if cfg.scaled_decode else 0
    decoded = [decode(b, cfg, side, luma=True) for b in blobs]  # a YCbCr JPEG's luma plane, as the stage
    rgbs = [decode(b, cfg, side).image for b in blobs]
    full = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]

    def pdq_reference(img):  # what core/perceptual did before issue 34: fit to 512 px, then pdqhash
        if max(img.size) > MAX_SIDE:
            img = img.copy()
            img.thumbnail((MAX_SIDE, MAX_SIDE))
        return pdqhash.compute(np.asarray(img))

    def bare_decode():
        for b in blobs:
            img = Image.open(io.BytesIO(b))
            img.load()
            img.convert("RGB")

    def each(fn, items):  # nothing kept: a list of decoded images would time page faults too
        return lambda: [None for x in items if fn(x) is None]

    steps = {
        "bare: decode every pixel + convert('RGB')": bare_decode,
        "bare: sha256": each(lambda b: hashlib.sha256(b).hexdigest(), blobs),
        "bare: pHash (imagehash, every pixel)": each(lambda img: str(imagehash.phash(img)), full),
        "stage: decode (filter/validate.decode: header checks, EXIF, luma plane)": each(lambda b: decode(b, cfg, side, luma=True), blobs),
        "stage: sha256": each(sha256_hex, blobs),
        "stage: pHash (box-reduced copy)": each(lambda d: phash_hex(d.image, cfg.phash_size), decoded),
        "stage: size, aspect and flat-image checks (+ RGB decodes the screen asks)": each(lambda i: check_shape(decoded[i], cfg) or flat_share(decoded[i].image, cfg.flat_colours, cfg.flat_share, lambda: decode(blobs[i], cfg, side).image), range(len(blobs))),
        "stage: PDQ (core/perceptual, NumPy)": each(lambda d: pdq_hex(d.image), decoded),
        "PDQ by pdqhash (the reference, not run by the stage)": each(pdq_reference, rgbs),
    }
    from core.memory import one_blas_thread, release_blas_thread

    one_blas_thread()  # as the stage's hashing runs (filter/pipeline.ValidateAndHash.setup)
    try:
        return _best_ms(steps, len(blobs))
    finally:
        release_blas_thread()


def _best_ms(steps: dict, n: int) -> dict:
    """{name: CPU ms an item, the best of two calls} of each `steps[name]()` over `n` items."""
    out = {}
    for name, call in steps.items():
        best = float("inf")
        for _ in range(2):
            start = time.process_time()
            call()
            best = min(best, time.process_time() - start)
        out[name] = 1000 * best / n
    return out


def plane_drift(blobs: list[bytes], cfg) -> dict:
    """What hashing the luma plane moves (issue 34), on the distinct photos: PDQ bits against Meta's
    Python reference on the RGB decode (Image.open + thumbnail((512, 512)) + pdqhash), pHash bits
    against imagehash on every RGB pixel (filter's pHash before issue 34), and how many images the
    flat screen sends to an RGB decode."""
    import imagehash
    import pdqhash
    from PIL import Image

    from core.perceptual import MAX_SIDE, distance, pdq_of_bytes
    from filter.hashing import phash_hex
    from filter.signals import FLAT_THUMB, flat_share
    from filter.validate import decode, decode_side

    side = decode_side(cfg, 0, FLAT_THUMB, MAX_SIDE)
    pdq_bits, phash_bits, rgb_decodes, planes = [], [], 0, 0
    for b in dict.fromkeys(blobs):
        full = Image.open(io.BytesIO(b)).convert("RGB")
        ref = full.copy()
        ref.thumbnail((MAX_SIDE, MAX_SIDE))
        bits, _ = pdqhash.compute(np.asarray(ref))
        pdq_bits.append(distance(pdq_of_bytes(b)[0], np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()))
        plane = decode(b, cfg, side, luma=True).image
        planes += plane.mode == "L"
        phash_bits.append(imagehash.hex_to_hash(phash_hex(plane, cfg.phash_size)) - imagehash.phash(full))
        calls = []
        flat_share(plane, cfg.flat_colours, cfg.flat_share, lambda: calls.append(1) or decode(b, cfg, side).image)
        rgb_decodes += bool(calls)
    return {"pdq": np.array(pdq_bits), "phash": np.array(phash_bits), "rgb_decodes": rgb_decodes, "planes": planes}


def face_ms(blobs: list[bytes], cfg) -> float:
    """CPU ms per image of `--faces detect` alone (filter/faces.apply on the stage's decode)."""
    import time

    from core.perceptual import MAX_SIDE
    from filter import faces
    from filter.signals import FLAT_THUMB
    from filter.validate import decode, decode_side

    side = decode_side(cfg, 0, FLAT_THUMB, MAX_SIDE)
    decoded = [(b, decode(b, cfg, side)) for b in blobs]
    start = time.process_time()
    for b, d in decoded:
        faces.apply({}, d.image, "detect", (d.width, d.height), lambda s, b=b: decode(b, cfg, s).image)
    return 1000 * (time.process_time() - start) / len(decoded)


def bare_forward(encoder, images: list, batch: int) -> int:
    """Preprocess + batched forward (and the alt-text score when the encoder has a text tower) on
    already decoded images, no Beam (the stage decodes once for validation, so decoding is not part
    of its encoder step either)."""
    for i in range(0, len(images), batch):
        x = np.stack([encoder.preprocess(img) for img in images[i : i + batch]])
        emb = encoder.embed_images(x)
        if encoder.has_text:  # the stage also scores each image against its alt text
            emb @ encoder.embed_texts(["a photo"] * len(x)).T
    return len(images)


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=8, help="copies of the 300 photos for the no-encoder comparison (8: 2,400 images, so that Beam's fixed cost weighs little, as in a real download shard)")
    ap.add_argument("--encoder", default="efficientnet-lite0", help="encoder of the registry (default works offline)")
    ap.add_argument("--encoder-images", type=int, default=200, help="images for the encoder comparison")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-encoder", action="store_true", help="only the comparison without encoder")
    ap.add_argument("--runs", type=int, default=5, help="rounds of the no-encoder comparison: each times the loops and the stage back to back; the goal is judged on the median of the rounds' ratios")
    ap.add_argument("--side", type=int, default=0, help="re-encode the photos with this long side first (0: as they are, ~500 px)")
    ap.add_argument("--face-images", type=int, default=100, help="images the face detector is timed on")
    ap.add_argument("--step-images", type=int, default=300, help="distinct images each step is timed on outside Beam (300: every photo)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args, beam_args = ap.parse_known_args()
    if args.smoke:
        args.repeat, args.encoder_images, args.batch_size, args.runs, args.face_images, args.step_images = 1, 8, 4, 1, 4, 16
        args.encoder = "tiny-clip"  # the same RunInference path; efficientnet-lite0 made this the dearest smoke run (~350 CPU s under load)
    import torch

    from core.config import FilterConfig
    from core.encoders import load_encoder
    from filter.pipeline import run_filter
    from filter.signals import FLAT_THUMB
    from filter.validate import decode_side

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        blobs = photo_downloads(tmp, args.repeat, side=args.side)
        cfg = FilterConfig(encoder="none", faces="off")  # faces: timed apart below
        side = decode_side(cfg, 0, FLAT_THUMB)  # what pHash and the flat thumbnail alone need (the stage also keeps PDQ's 512 px)
        loops = {"full": lambda: bare_checks(blobs), "scaled": lambda: bare_checks(blobs, side), "pdq": lambda: bare_checks(blobs, pdq=True)}
        small = os.path.join(tmp, "quarter")  # the stage on a quarter of the images too: the slope is its cost an image beyond Beam's start-up
        quarter = max(1, args.repeat // 4)
        photo_downloads(small, quarter, side=args.side, photos=0 if quarter < args.repeat else 75)  # a smoke run's too: 75 of its 300
        run_filter(small, os.path.join(small, "warm"), cfg, beam_args)  # imports and first-run caches, not timed
        best = {k: [float("inf"), float("inf")] for k in (*loops, "stage", "quarter")}  # [wall, cpu]
        rounds = []  # each round's CPU seconds of the every-pixel loop, the stage and its quarter, back to back, then the other loops
        for i in range(args.runs):  # they take turns; each one's best counts, and each round's ratios
            stage_runs = {"stage": lambda i=i: run_filter(tmp, os.path.join(tmp, f"nocode{i}"), cfg, beam_args), "quarter": lambda i=i: run_filter(small, os.path.join(small, f"nocode{i}"), cfg, beam_args)}
            cpu_of = {}
            for key in ("full", "stage", "quarter", "scaled", "pdq"):
                out, wall, cpu = timed_cpu(loops.get(key) or stage_runs[key])
                best[key] = [min(best[key][0], wall), min(best[key][1], cpu)]
                cpu_of[key] = cpu
                if key == "full":
                    n = out
                elif key == "stage":
                    stats = out
                elif key == "quarter":
                    quarter_n = out["input"]
            rounds.append(cpu_of)
        m = stats["input"]
        rows = [("images", n, "images")]
        labels = {"full": "bare loop, every pixel", "scaled": f"bare loop, DCT-scaled to >= {side} px", "pdq": "bare loop, every pixel, + PDQ (512 px)"}
        for kind, col in (("wall", 0), ("CPU", 1)):
            rows += [(f"{labels[k]} ({kind}, best)", n / best[k][col], "images/s") for k in loops] + [(f"webpairs filter --encoder none --faces off ({kind}, best)", m / best["stage"][col], "images/s")]
        rate = {k: n / best[k][1] for k in loops}
        stage_rate = m / best["stage"][1]
        # CPU time: FnApiRunner runs in this process, so its CPU time is the stage's; on a shared
        # machine it is the measure other tenants cannot inflate (wall time is printed too). Each
        # goal is judged on the median of the rounds' own ratios (the loop and the stage measured
        # back to back): this machine's speed drifts by 10-20 % within minutes, so the best of
        # each, taken minutes apart, can pair a fast loop with a slow stage or the reverse.

        def paired(loop: str) -> tuple[float, str]:  # the stage's images/s over the loop's, each round
            return paired_median([(m / r["stage"]) / (n / r[loop]) for r in rounds])

        def fastest(loop: str) -> str:
            return f"the fastest of each over {len(rounds)} rounds: {stage_rate / rate[loop]:.2f}"

        whole = paired("full")
        results.append(report("filter without encoder / bare loop decoding every pixel (CPU time, median of paired rounds)", rows, whole[0], 1.0, (whole[1], fastest("full"))))
        if stats["input"] > quarter_n:  # CPU an image beyond the run's fixed cost (Beam's start-up, the stats): the slope of two sizes
            slope_rate = (stats["input"] - quarter_n) / max(best["stage"][1] - best["quarter"][1], 1e-9)
            fixed_s = best["stage"][1] - stats["input"] / slope_rate
            per_image = paired_median([((m - quarter_n) / max(r["stage"] - r["quarter"], 1e-9)) / (n / r["full"]) for r in rounds])
            results.append(report(f"filter without encoder, per image beyond the run's fixed cost ({fixed_s:.2f} CPU s) / bare loop decoding every pixel (CPU time, median of paired rounds)",
                                  [rows[2 + len(loops)], (f"webpairs filter, slope of {quarter_n} -> {stats['input']} images (CPU, best of each)", slope_rate, "images/s")], per_image[0], 1.0, (per_image[1],)))
        scaled, with_pdq = paired("scaled"), paired("pdq")
        results.append(report("filter without encoder / bare loop with the same DCT-scaled decode (CPU time, median of paired rounds)", [rows[-3], rows[-1]], scaled[0], 0.5, (scaled[1], fastest("scaled"))))
        results.append(report("filter without encoder / bare loop of the same hashes, PDQ included (CPU time, median of paired rounds)", [rows[-2], rows[-1]], with_pdq[0], 0.8, (with_pdq[1], fastest("pdq"))))
        print(f"  wall-time ratios: {(m / best['stage'][0]) / (n / best['full'][0]):.2f} (every pixel), {(m / best['stage'][0]) / (n / best['scaled'][0]):.2f} (DCT-scaled), {(m / best['stage'][0]) / (n / best['pdq'][0]):.2f} (+ PDQ)")
        steps = step_ms(list(dict.fromkeys(blobs))[: args.step_images], cfg)
        stage_ms = 1000 / stage_rate
        print("\n  CPU ms per image, step by step (outside Beam, each photo once; best of 2):")
        for name, value in steps.items():
            print(f"    {name:70s} {value:6.2f}")
        bare_sum = sum(v for k, v in steps.items() if k.startswith("bare"))
        own = sum(v for k, v in steps.items() if k.startswith("stage"))
        print(f"    {'bare loop, sum of its steps (the loop itself: ' + format(1000 / rate['full'], '.2f') + ')':70s} {bare_sum:6.2f}")
        print(f"    {'stage, sum of its steps':70s} {own:6.2f}")
        print(f"    {'stage run (' + format(stage_ms, '.2f') + ') - its steps: Beam, parquet read + write, links, stats':70s} {stage_ms - own:6.2f}")
        pdq_ratio = steps["PDQ by pdqhash (the reference, not run by the stage)"] / steps["stage: PDQ (core/perceptual, NumPy)"]
        results.append(report("PDQ: core/perceptual (NumPy, pdqhash's bits) / pdqhash (CPU time a photo)", [("pdqhash, ms per image", steps["PDQ by pdqhash (the reference, not run by the stage)"], "ms"), ("core/perceptual, ms per image", steps["stage: PDQ (core/perceptual, NumPy)"], "ms")], pdq_ratio, 2.0))
        drift = plane_drift(blobs[: args.step_images * args.repeat], cfg)
        d, p = drift["pdq"], drift["phash"]
        print(f"\n  The luma plane's hashes ({drift['planes']} of {len(d)} photos decoded as planes; the flat screen asked {drift['rgb_decodes']} for an RGB decode):")
        print(f"    PDQ bits from Meta's reference on the RGB decode: mean {d.mean():.2f}, max {d.max()} (a match is <= 31; implementations agree within ~11)")
        print(f"    pHash bits from imagehash on every RGB pixel: mean {p.mean():.2f}, max {p.max()} (goal: mean <= 1)")
        ms = face_ms(blobs[: args.face_images], FilterConfig(encoder="none"))
        print(f"  --faces detect (the default) adds {ms:.1f} CPU ms per kept image: the stage with it would run at about {1000 / (1000 / stage_rate + ms):.0f} images/s")
    if args.skip_encoder:
        return results

    with tempfile.TemporaryDirectory() as tmp:
        blobs = photo_downloads(tmp, 1, photos=args.encoder_images if args.smoke else 0)[: args.encoder_images]  # a smoke run's stage runs see only these
        from PIL import Image

        enc = load_encoder(args.encoder)
        decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
        bare_forward(enc, decoded[:8], 8)  # warm-up
        # RunInference's BatchElements adapts the batch size up to --batch-size, and on a CPU small
        # batches can be faster, so the baseline is the bare forward at its best batch size.
        best = {}
        for b in sorted({1, 4, 8, 16, args.batch_size}):
            if b <= args.batch_size:
                best[b] = timed(bare_forward, enc, decoded, b)[1]
        best_batch = min(best, key=best.get)
        n, fwd_s = len(decoded), best[best_batch]
        _, none_s = timed(run_filter, tmp, os.path.join(tmp, "none"), FilterConfig(encoder="none"), beam_args)
        stats, full_s = timed(run_filter, tmp, os.path.join(tmp, "enc"), FilterConfig(encoder=args.encoder, batch_size=args.batch_size), beam_args)
        _, fixed_s = timed(run_filter, tmp, os.path.join(tmp, "fixed"), FilterConfig(encoder=args.encoder, batch_size=args.batch_size, fixed_batch=True), beam_args)
        # the encoder step's share of the stage = full run minus the same run without the encoder
        step_s = max(full_s - none_s, 1e-9)
        fixed_step_s = max(fixed_s - none_s, 1e-9)
        results.append(
            report(
                f"filter encoder step ({args.encoder}, batch {args.batch_size}, {torch.get_num_threads()} threads)",
                [("images", n, "images"), (f"bare preprocess + forward, best batch {best_batch}", n / fwd_s, "images/s"), ("RunInference step, adaptive batches (stage minus no-encoder stage)", stats["input"] / step_s, "images/s")],
                (stats["input"] / step_s) / (n / fwd_s),
                0.8,
            )
        )
        results.append(
            report(
                f"filter encoder step at the same batch size ({args.batch_size})",
                [(f"bare preprocess + forward, batch {args.batch_size}", n / best[args.batch_size], "images/s"), (f"RunInference step, fixed batch {args.batch_size}", stats["input"] / fixed_step_s, "images/s")],
                (stats["input"] / fixed_step_s) / (n / best[args.batch_size]),
                0.8,
            )
        )
    return results


if __name__ == "__main__":
    main()
