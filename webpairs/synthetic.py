"""A generated run for the browser's tests and benchmark: N pairs on pages of S sites, with a pair
stage (pairs/ with URLs and alt texts, rejected/) and a shards stage (index/, manifest.json, one
real tar of a few distinct samples that the index rows point into, so any N stays small on disk).

    python -m webpairs.synthetic OUT --pairs 1000000 --sites 500
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD = "pairs-000000-000000.tar"


def _jpeg(rng: np.random.Generator, side: int = 64) -> bytes:
    from webpairs.testweb import generated_photo

    buf = io.BytesIO()
    generated_photo(int(rng.integers(0, 8)), int(rng.integers(0, 1000)), (side, side)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _complete(out_dir: str, stage: str, n_input: int, kept: int, rejected: dict) -> None:
    from core.stageio import finish_stage

    with open(os.path.join(out_dir, "stats.json"), "w") as fh:
        json.dump({"stage": stage, "input": n_input, "kept": kept, "rejected": rejected, "pairs": kept}, fh)
    finish_stage(out_dir, stage)


def make_run(out: str, pairs: int, sites: int = 50, pages_per_site: int = 0, distinct_samples: int = 64, rejects: int = 0, seed: int = 0, batch: int = 250_000) -> dict:
    """Write the run under `out` (pair/ and shards/); returns {"pairs", "sites", "pages"}."""
    rng = np.random.default_rng(seed)
    scores = np.random.default_rng(seed + 1)  # nsfw scores: a stream of their own (the other values stay as they were)
    pages_per_site = pages_per_site or max(1, pairs // (sites * 4))
    pair_dir, shards_dir = os.path.join(out, "pair"), os.path.join(out, "shards")
    for d in (os.path.join(pair_dir, "pairs"), os.path.join(pair_dir, "rejected"), os.path.join(shards_dir, "index")):
        os.makedirs(d, exist_ok=True)
    # one real shard: `distinct_samples` samples; index row i points at sample i % distinct_samples
    ranges = []
    with tarfile.open(os.path.join(shards_dir, SHARD), "w", format=tarfile.USTAR_FORMAT) as tar:
        for k in range(distinct_samples):
            start = tar.offset  # tarfile sets offsets on its own copies of the TarInfo, not on ours
            for ext, data in (("cond.jpg", _jpeg(rng)), ("target.jpg", _jpeg(rng)), ("json", b"{}")):
                info = tarfile.TarInfo(f"sample{k:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            ranges.append((start, tar.offset - start))
    offsets = np.array([r[0] for r in ranges], dtype=np.int64)
    sizes = np.array([r[1] for r in ranges], dtype=np.int64)
    for part, lo in enumerate(range(0, pairs, batch)):
        idx = np.arange(lo, min(pairs, lo + batch))
        site = rng.integers(0, sites, len(idx))
        page = rng.integers(0, pages_per_site, len(idx))
        page_url = [f"https://www.site{s:05d}.com/p/{p}.html" for s, p in zip(site, page)]
        keys = [f"{i:016x}" for i in idx]
        sim = rng.uniform(0.2, 0.8, len(idx)).astype(np.float32)
        nsfw = scores.uniform(0.0, 1.0, (2, len(idx))).astype(np.float32)
        index = pa.table({"key": keys, "shard": [SHARD] * len(idx), "offset": offsets[idx % distinct_samples], "size": sizes[idx % distinct_samples], "page_url": page_url, "cond_image_id": [f"c{i:015x}" for i in idx], "target_image_id": [f"t{i:015x}" for i in idx], "similarity": sim,
                          "cond_nsfw": nsfw[0], "target_nsfw": nsfw[1]})
        pq.write_table(index, os.path.join(shards_dir, "index", f"index-{part:05d}.parquet"))
        rows = pa.table({"pair_id": keys, "page_url": page_url, "cond_image_id": index["cond_image_id"], "target_image_id": index["target_image_id"], "similarity": sim, "cond_url": [u.replace(".html", "/a.jpg") for u in page_url], "target_url": [u.replace(".html", "/b.jpg") for u in page_url], "cond_alt": [f"photo {i} a" for i in idx], "target_alt": [f"photo {i} b" for i in idx],
                         "cond_nsfw": nsfw[0], "target_nsfw": nsfw[1]})
        pq.write_table(rows, os.path.join(pair_dir, "pairs", f"pairs-{part:05d}.parquet"))
    reasons = ["near_duplicate", "no_pair_in_band", "boilerplate_site"]
    rej = pa.table({"record_id": [f"r{i:015x}" for i in range(rejects)], "stage": ["pair"] * rejects, "reason": [reasons[i % 3] for i in range(rejects)], "detail": ["generated"] * rejects, "url": [f"https://www.site{i % sites:05d}.com/img/{i}.jpg" for i in range(rejects)]})
    pq.write_table(rej, os.path.join(pair_dir, "rejected", "rejected-00000.parquet"))
    counts = {r: len(range(k, rejects, 3)) for k, r in enumerate(reasons)}
    _complete(pair_dir, "pair", pairs + rejects, pairs, {r: n for r, n in counts.items() if n})
    with open(os.path.join(shards_dir, "manifest.json"), "w") as fh:
        json.dump({"shards": [{"shard": SHARD, "samples": distinct_samples}], "samples": pairs, "encoder": "generated"}, fh)
    _complete(shards_dir, "shards", pairs, pairs, {})
    return {"pairs": pairs, "sites": sites, "pages": sites * pages_per_site}


def make_train_shards(out: str, n: int = 16, side: int = 48, per_shard: int = 8, encoder: str = "tiny-clip", bad_targets: tuple = (), seed: int = 0) -> str:
    """A complete shards output of n generated pairs for training tests and benchmarks: tars of
    {key}.cond.jpg, .target.jpg (side x side, 8 colour themes), .cond.npy (the `encoder`'s embedding
    of the condition, named in manifest.json) and .json; targets listed in `bad_targets` are
    undecodable bytes. Returns `out`."""
    from PIL import Image

    from core import sample_layout as layout
    from core.encoders import load_encoder

    rng = np.random.default_rng(seed)
    enc = load_encoder(encoder)
    os.makedirs(out, exist_ok=True)
    shards = []
    for first in range(0, n, per_shard):
        name = layout.SHARD_PATTERN.format(file=0, seq=first // per_shard)
        count = min(per_shard, n - first)
        with tarfile.open(os.path.join(out, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, first + count):
                topic = i % 8
                cond = Image.open(io.BytesIO(_photo(topic, int(rng.integers(0, 1000)), side))).convert("RGB")
                target = _photo(topic, int(rng.integers(0, 1000)), side) if i not in bad_targets else b"not an image"
                key = f"{i:016x}"
                meta = {"pair_id": key, "page_url": f"https://synthetic.example/{i // 2}.html", "cond_image_id": f"c{i}", "target_image_id": f"t{i}", "similarity": 0.5, "encoder": encoder}
                buf = io.BytesIO()
                cond.save(buf, "JPEG", quality=90)
                files = {layout.COND_JPG: buf.getvalue(), layout.TARGET_JPG: target, layout.COND_NPY: layout.npy_bytes(enc.embed_images(enc.preprocess(cond)[None])[0]), layout.META_JSON: json.dumps(meta).encode()}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"shard": name, "samples": count})
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump({"stage": "shards", "shards": shards, "samples": n, "encoder": encoder}, fh)
    _complete(out, "shards", n, n, {})
    return out


def _photo(topic: int, index: int, side: int) -> bytes:
    from webpairs.testweb import generated_photo

    buf = io.BytesIO()
    generated_photo(topic, index, (side, side)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--sites", type=int, default=500)
    ap.add_argument("--rejects", type=int, default=100_000)
    args = ap.parse_args()
    print(make_run(args.out, args.pairs, args.sites, rejects=args.rejects))


if __name__ == "__main__":
    main()
