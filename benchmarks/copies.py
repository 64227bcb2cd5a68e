"""The copy step of `pair` at scale (pairing/copies.py): its candidate search and its verification.

Candidates: `find_candidates` (what the step runs on one worker: a faiss HNSW index over the
embeddings plus the mirror-aware pHash multi-index) on N synthetic embeddings (--dim, float32
after reading the stored float16) in topics (same-topic cosine about 0.5-0.7, the range where the
loose threshold lets many same-topic photos through), 10 % of them copies of another (cosine about
0.9), each size in a fresh child process so its peak RSS is its own. Baseline in the same run: the
exact all-pairs search (a numpy matmul in blocks) at the sizes where it is feasible, to show the
growth (all pairs: quadratic; the index: about linear).

Verification: the Beam step `FindCopies` as `pair` runs it (pairing/pipeline.py `copy_inputs`
reads ids, embeddings, pHashes and byte pointers; only the candidates' bytes are read) on N
synthetic images, on the in-process runner and on Dask (`--runner dask`, a LocalCluster of 2
workers). The images are generated first, in a child process of their own, into filter-like
parquet files (image_id, image_bytes, embedding, phash; 2,000 images a file, row groups of 500):
distinct 128-160 px mosaics (random colours upscaled plus blobs), the last 10 % dresses of a
random earlier one (crop 88 %, mirror, colour grade + quality 45, 75 % resize, in turn), with
64-d topic embeddings (a dress has its original's plus noise) and their real pHashes. Reported:
time, CPU (with the Dask workers'), peak RSS of the driver and of the Dask workers, pairs checked
per image (bounded by copy_max_candidates), images whose bytes were read, the features on disk,
the recall of the planted dresses and what was removed that was not planted. Baseline in the same
run (up to --bare-below images): a bare OpenCV loop over the same candidate pairs (pyarrow read,
every candidate's features held in a dict, the same `verify`): its CPU, and its peak RSS, which
grows with the images as the old step's joins did.

    python benchmarks/copies.py --small                 # 10^4 embeddings, 10^3 images: a minute
    python benchmarks/copies.py --candidates 10000 100000 1000000 --verify 10000 100000 --runner both
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, SMOKE_HELP, report


def synthetic_embeddings(n: int, dim: int, seed: int = 0, copy_share: float = 0.1):
    """(embeddings float32 unit rows, pHashes, {copy row: its original row})."""
    import numpy as np

    rng = np.random.default_rng(seed)
    topics = max(1, n // 50)
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    emb = centres[rng.integers(0, topics, size=n)] + rng.normal(scale=0.9, size=(n, dim)).astype(np.float32)
    n_copies = int(n * copy_share)
    perm = rng.permutation(n)
    copies = perm[:n_copies]  # copies and originals are disjoint: an original is not itself moved
    originals = perm[n_copies:][rng.integers(0, n - n_copies, size=n_copies)]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[copies] = emb[originals] + rng.normal(scale=0.5 / np.sqrt(dim), size=(len(copies), dim)).astype(np.float32)  # cosine about 0.9
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)
    flips = rng.integers(0, 64, size=(len(copies), 3)).astype(np.uint64)
    hashes[copies] = hashes[originals] ^ (np.uint64(1) << flips[:, 0]) ^ (np.uint64(1) << flips[:, 1]) ^ (np.uint64(1) << flips[:, 2])
    return emb, [f"{int(h):016x}" for h in hashes], dict(zip(copies.tolist(), originals.tolist()))


def _cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (Dask's workers, once closed): on a
    shared machine the wall time depends on the neighbours, the CPU time much less."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_candidates(n: int, dim: int, exact: bool) -> dict:
    """One size of the candidate step (run in a child process)."""
    import numpy as np

    from core.config import PairConfig
    from pairing.copies import find_candidates

    emb, hashes, planted = synthetic_embeddings(n, dim)
    ids = [f"{i:012d}" for i in range(n)]
    base = _peak_rss_mb()
    start, cpu = time.perf_counter(), _cpu_seconds()
    cands = find_candidates(ids, emb, hashes, PairConfig())
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    found = {(int(a), int(b)) for a, b, _, _ in cands}
    recall = np.mean([(min(c, o), max(c, o)) in found for c, o in planted.items()]) if planted else 1.0
    out = {"n": n, "dim": dim, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": base, "candidates": len(cands), "per_image": 2 * len(cands) / n, "planted_recall": float(recall)}
    if exact:
        start, cpu = time.perf_counter(), _cpu_seconds()
        for lo in range(0, n, 4096):  # the all-pairs baseline: every cosine, in blocks
            sims = emb[lo : lo + 4096] @ emb.T
            np.argpartition(-sims, 11, axis=1)[:, :11]
        out["all_pairs_seconds"], out["all_pairs_cpu_seconds"] = time.perf_counter() - start, _cpu_seconds() - cpu
    return out


IMAGES_PER_FILE = 2_000  # synthetic filter files: 2,000 images each, row groups of 500 (~3 MB)


def _mosaic(seed: int, i: int):
    """Image i: a distinct 128-160 x 110-127 px mosaic (random 6x8 colours upscaled, plus 24x32 blobs)."""
    import cv2
    import numpy as np

    g = np.random.default_rng(seed * 1_000_003 + i)
    w, h = int(g.integers(128, 161)), int(g.integers(110, 128))
    base = g.integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    blobs = g.integers(0, 256, size=(24, 32, 3)).astype(np.uint8)
    return cv2.addWeighted(img, 0.6, cv2.resize(blobs, (w, h), interpolation=cv2.INTER_LINEAR), 0.4, 0)


def write_synthetic_images(n: int, out_dir: str, seed: int = 0, copy_share: float = 0.1) -> tuple[list[str], dict]:
    """Filter-like image files (image_id, image_bytes, embedding, phash) of n synthetic images,
    written file by file (memory: one file): distinct mosaics, the last 10 % dresses of a random
    earlier one (crop 88 %, mirror, grade + quality 45, 75 % resize, in turn), with topic embeddings
    (64-d; a dress has its original's, plus a little noise) and pHashes. Returns (files, {dress id:
    original id})."""
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from filter.hashing import phash_hex

    rng = np.random.default_rng(seed)
    emb, _, _ = synthetic_embeddings(n, 64, seed, copy_share=0.0)
    n_copies = int(n * copy_share)
    originals = rng.choice(n - n_copies, size=n_copies)
    kinds = ("crop", "mirror", "grade", "resize")
    schema = pa.schema([("image_id", pa.string()), ("image_bytes", pa.binary()), ("embedding", pa.list_(pa.float16())), ("phash", pa.string())])
    files, planted = [], {}
    for lo in range(0, n, IMAGES_PER_FILE):
        rows = []
        for i in range(lo, min(n, lo + IMAGES_PER_FILE)):
            if i >= n - n_copies:
                o = int(originals[i - (n - n_copies)])
                img = _mosaic(seed, o)
                kind = kinds[i % len(kinds)]
                if kind == "crop":
                    h, w = img.shape[:2]
                    img = img[int(h * 0.1) :, int(w * 0.12) :]
                elif kind == "mirror":
                    img = img[:, ::-1]
                elif kind == "grade":
                    img = np.clip(img.astype(np.int16) * 1.2 - 10, 0, 255).astype(np.uint8)
                else:
                    img = cv2.resize(img, (img.shape[1] * 3 // 4, img.shape[0] * 3 // 4), interpolation=cv2.INTER_AREA)
                quality = 45 if kind == "grade" else 85
                e = emb[o] + np.random.default_rng(i).normal(scale=0.02, size=emb.shape[1])
                planted[f"{i:012d}"] = f"{o:012d}"
            else:
                img, quality, e = _mosaic(seed, i), 90, emb[i]
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, quality])
            rows.append({"image_id": f"{i:012d}", "image_bytes": buf.tobytes(), "embedding": (e / np.linalg.norm(e)).astype(np.float16),
                         "phash": phash_hex(Image.fromarray(np.ascontiguousarray(img[:, :, ::-1])))})
        path = os.path.join(out_dir, f"images-{lo // IMAGES_PER_FILE:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema), path, row_group_size=500)
        files.append(path)
    return files, planted


def child_make(n: int, data_dir: str) -> dict:
    """Write the synthetic images of size n (run in a child process, once for both runners)."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    files, planted = write_synthetic_images(n, data_dir)
    with open(os.path.join(data_dir, "planted.json"), "w") as fh:
        json.dump(planted, fh)
    return {"n": n, "files": len(files), "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu, "bytes": sum(os.path.getsize(f) for f in files)}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def child_bare(n: int, data_dir: str) -> dict:
    """The bare-library baseline (run in a child process): every candidate pair the Beam step
    checked (candidates.json), in a plain loop: pyarrow reads the files, OpenCV features of each
    candidate image held in a dict (memory grows with the images, as the old joins held them),
    the same `verify`. CPU seconds and peak RSS."""
    import pyarrow.parquet as pq

    from core.config import PairConfig
    from pairing.copies import image_features, verify

    cfg = PairConfig()
    pairs = json.load(open(os.path.join(data_dir, "candidates.json")))
    files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))
    wanted = {x for a, b, _, _ in pairs for x in (a, b)}
    start, cpu = time.perf_counter(), _cpu_seconds()
    feats = {}
    for f in files:
        t = pq.read_table(f, columns=["image_id", "image_bytes"])
        for image_id, data in zip(t.column("image_id").to_pylist(), t.column("image_bytes").to_pylist()):
            if image_id in wanted:
                feats[image_id] = image_features(data, cfg.copy_max_side, cfg.copy_max_keypoints)
    copies = sum(verify(feats[a], feats[b], cfg)["copy"] for a, b, _, _ in pairs if feats[a] is not None and feats[b] is not None)
    return {"n": n, "checks": len(pairs), "copies": int(copies), "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu, "peak_rss_mb": _peak_rss_mb()}


class _RssSampler:
    """RSS of this process and of the largest child (a Dask worker) every 0.2 s, the peaks before
    and after the first feature file appeared: the candidate step, then reading bytes, featurising
    and verifying (the candidate step ends before any feature is written). In MB."""

    def __init__(self, feature_dir: str, trace: str = ""):
        import threading

        self.feature_dir, self.peak, self.workers, self.stop = feature_dir, [0.0, 0.0], [0.0, 0.0], threading.Event()
        self.trace = trace  # a file to append "seconds phase rss_mb largest_child_mb" to every 10 s (a long run's progress)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        me = psutil.Process()
        start = last = time.perf_counter()
        while not self.stop.is_set():
            if self.trace and time.perf_counter() - last >= 10:
                last = time.perf_counter()
                rss = me.memory_info().rss / 2**20
                kids = [c.memory_info().rss / 2**20 for c in me.children(recursive=True)]
                with open(self.trace, "a") as fh:
                    fh.write(f"{last - start:.0f} {int(os.path.isdir(self.feature_dir))} {rss:.0f} {max(kids, default=0):.0f}\n")
            phase = int(os.path.isdir(self.feature_dir))
            self.peak[phase] = max(self.peak[phase], me.memory_info().rss / 2**20)
            for child in me.children(recursive=True):  # the Dask workers: the largest one
                try:
                    self.workers[phase] = max(self.workers[phase], child.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def child_verify(n: int, runner: str, data_dir: str, trace: str = "", keep_candidates: bool = False) -> dict:
    """The Beam copy step on the n synthetic images of `data_dir` (run in a child process): the
    same reads as `pair` (pairing/pipeline.py copy_inputs: ids, embeddings, pHashes and pointers;
    FindCopies reads the candidates' bytes by pointer) on the in-process runner or on Dask."""
    import apache_beam as beam

    from core.config import PairConfig
    from core.stageio import stage_pipeline
    from pairing.copies import FindCopies
    from pairing.pipeline import copy_inputs

    files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".parquet"))
    planted = json.load(open(os.path.join(data_dir, "planted.json")))
    cfg = PairConfig()
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        out, feature_dir = os.path.join(tmp, "out"), os.path.join(tmp, "features")
        beam_args = ["--runner", "dask", "--dask-workers", "2"] if runner == "dask" else []
        sampler = _RssSampler(feature_dir, trace)
        start, cpu = time.perf_counter(), _cpu_seconds()
        with sampler, stage_pipeline(beam_args) as p:
            light = copy_inputs(p, files)
            found = {"light": light} | FindCopies(cfg, feature_dir, candidates=keep_candidates, copy_of=True)
            _ = found["copy_of"] | "AllCopies" >> beam.combiners.ToList() | "CopyJson" >> beam.Map(json.dumps) | "WriteCopies" >> beam.io.WriteToText(out + ".copy_of", shard_name_template="")
            _ = (found["checks"] | "Verdict" >> beam.Map(lambda r: int(r["copy"])) | "AllChecks" >> beam.combiners.ToList()
                 | "CheckJson" >> beam.Map(lambda v: json.dumps([sum(v), len(v)])) | "WriteChecks" >> beam.io.WriteToText(out + ".checks", shard_name_template=""))
            _ = found["images_read"] | "CountRead" >> beam.combiners.Count.Globally() | "ReadJson" >> beam.Map(json.dumps) | "WriteRead" >> beam.io.WriteToText(out + ".read", shard_name_template="")
            if keep_candidates:  # for the bare baseline (child_bare)
                _ = (found["candidates"] | "AllCandidates" >> beam.combiners.ToList() | "CandJson" >> beam.Map(json.dumps)
                     | "WriteCand" >> beam.io.WriteToText(os.path.join(data_dir, "candidates.json"), shard_name_template=""))
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        copy_of = dict(json.load(open(out + ".copy_of")))
        verified, checked = json.load(open(out + ".checks"))
        images_read = json.load(open(out + ".read"))
        feature_bytes = _dir_bytes(feature_dir)
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the Dask workers (reaped when the cluster closed)
    result = {"n": n, "runner": runner, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": _peak_rss_mb(), "workers_peak_rss_mb": children if runner == "dask" else 0.0,
              "candidate_phase_rss_mb": sampler.peak[0], "verify_phase_rss_mb": sampler.peak[1], "worker_candidate_phase_rss_mb": sampler.workers[0], "worker_verify_phase_rss_mb": sampler.workers[1],
              "checked": checked, "checked_per_image": checked / n, "verified": verified, "images_read": images_read, "feature_mb": feature_bytes / 2**20,
              "images_removed": len(copy_of), "planted": len(planted)}

    def family(x):
        return planted.get(x, x)

    result["planted_recall"] = sum(1 for c, o in planted.items() if copy_of.get(c, c) == copy_of.get(o, o)) / max(1, len(planted))
    result["removed_not_planted"] = sum(1 for m, k in copy_of.items() if family(m) != family(k))
    return result


def _child(kind: str, n: int, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--n", str(n)] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"n": n, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="10^4 embeddings and 10^3 images (minutes on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    ap.add_argument("--candidates", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="embedding counts for the candidate step")
    ap.add_argument("--dim", type=int, default=256, help="embedding size for the candidate step (efficientnet-lite0: 1280)")
    ap.add_argument("--exact-below", type=int, default=100_000, help="also time the all-pairs baseline up to this size")
    ap.add_argument("--verify", type=int, nargs="*", default=[10_000, 100_000], help="image counts for the verification step")
    ap.add_argument("--runner", choices=("inprocess", "dask", "both"), default="both", help="where the verification step runs")
    ap.add_argument("--data-dir", default=None, help="where the synthetic image files are written (default: a temporary folder; removed after each size)")
    ap.add_argument("--trace", default="", help="append the verification's RSS every 10 s to this file (seconds, phase 0 candidates / 1 verification, RSS MB, largest worker MB)")
    ap.add_argument("--bare-below", type=int, default=10_000, help="also run the bare OpenCV loop (all features in memory) up to this many images")
    ap.add_argument("--child", choices=("candidates", "make", "verify", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--exact", type=int, default=0, help=argparse.SUPPRESS)  # candidates: the all-pairs baseline too; verify: keep the candidate list for the bare loop
    ap.add_argument("--on", default="inprocess", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "candidates":
        print(json.dumps(child_candidates(args.n, args.dim, bool(args.exact))))
        return []
    if args.child == "make":
        print(json.dumps(child_make(args.n, args.data_dir)))
        return []
    if args.child == "verify":
        print(json.dumps(child_verify(args.n, args.on, args.data_dir, args.trace, bool(args.exact))))
        return []
    if args.child == "bare":
        print(json.dumps(child_bare(args.n, args.data_dir)))
        return []
    if args.small:
        args.candidates, args.verify = [10_000], [1_000]
    if args.smoke:
        args.candidates, args.verify, args.runner = [6_000], [60], "inprocess"
    results = []
    print("== copies: candidate step (find_candidates: faiss HNSW + pHash multi-index) ==")
    for n in args.candidates:
        r = _child("candidates", n, dim=args.dim, exact=int(n <= args.exact_below))
        results.append({"step": "candidates", **r})
        if "error" in r:
            print(f"  n={n:>9,}  error: {r['error']}")
            continue
        base = f"; all pairs {r['all_pairs_seconds']:.1f} s, CPU {r['all_pairs_cpu_seconds']:.1f} s ({r['all_pairs_cpu_seconds'] / r['cpu_seconds']:.1f}x the index's CPU)" if "all_pairs_seconds" in r else ""
        print(f"  n={n:>9,} dim={r['dim']}: {r['seconds']:7.1f} s, CPU {r['cpu_seconds']:7.1f} s ({r['cpu_seconds'] / n * 1e6:6.1f} us/image), peak RSS {r['peak_rss_mb']:7.0f} MB, {r['per_image']:.1f} candidates/image, planted copies found {r['planted_recall']:.3f}{base}")
    runners = ("inprocess", "dask") if args.runner == "both" else (args.runner,)
    print("== copies: verification (the Beam step FindCopies: candidates' bytes by pointer, features once per image on disk, blocks of pairs, SIFT + RANSAC) ==")
    import shutil

    for n in args.verify:
        data_dir = tempfile.mkdtemp(prefix=f"copies-{n}-", dir=args.data_dir)
        try:
            made = _child("make", n, data_dir=data_dir)
            if "error" in made:
                results.append({"step": "verify", **made})
                print(f"  n={n:>7,} making the images: error: {made['error']}")
                continue
            print(f"  n={n:>7,} synthetic images: {made['files']} files, {made['bytes'] / 2**20:.0f} MB, made in {made['seconds']:.0f} s")
            for runner in runners:
                r = _child("verify", n, on=runner, data_dir=data_dir, trace=args.trace, exact=int(runner == "inprocess" and n <= args.bare_below))
                results.append({"step": "verify", **r})
                if "error" in r:
                    print(f"  n={n:>7,} {runner:9s} error: {r['error']}")
                    continue
                workers = (f", workers' peak RSS {r['workers_peak_rss_mb']:6.0f} MB (largest worker: candidate phase {r['worker_candidate_phase_rss_mb']:.0f} MB, verification phase {r['worker_verify_phase_rss_mb']:.0f} MB)" if runner == "dask"
                           else f" (candidate phase {r['candidate_phase_rss_mb']:.0f} MB, verification phase {r['verify_phase_rss_mb']:.0f} MB)")
                print(f"  n={n:>7,} {runner:9s}: {r['seconds']:7.1f} s, CPU {r['cpu_seconds']:7.1f} s ({r['cpu_seconds'] / n * 1e3:5.1f} ms/image, {r['cpu_seconds'] / max(1, r['checked']) * 1e3:5.1f} ms/check), driver peak RSS {r['peak_rss_mb']:6.0f} MB{workers}, "
                      f"{r['checked_per_image']:.1f} pairs checked/image, bytes read of {r['images_read']} images, features on disk {r['feature_mb']:.0f} MB, "
                      f"{r['images_removed']} removed, planted dresses found {r['planted_recall']:.3f}, removed not planted {r['removed_not_planted']}")
            if n <= args.bare_below and "inprocess" in runners and os.path.exists(os.path.join(data_dir, "candidates.json")):
                r = _child("bare", n, data_dir=data_dir)
                results.append({"step": "bare", **r})
                if "error" in r:
                    print(f"  n={n:>7,} bare loop error: {r['error']}")
                    continue
                print(f"  n={n:>7,} bare loop: {r['seconds']:7.1f} s, CPU {r['cpu_seconds']:7.1f} s ({r['cpu_seconds'] / max(1, r['checks']) * 1e3:5.1f} ms/check), peak RSS {r['peak_rss_mb']:6.0f} MB (every feature in memory), {r['copies']} copies")
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    cand = [r for r in results if r["step"] == "candidates" and "error" not in r]
    if cand:
        rows = [(f"n={r['n']:,}: CPU s", r["cpu_seconds"], "s") for r in cand] + [(f"n={r['n']:,}: peak RSS", r["peak_rss_mb"], "MB") for r in cand]
        rows += [(f"n={r['n']:,}: candidates per image", r["per_image"], "") for r in cand]
        exact = [r for r in cand if "all_pairs_cpu_seconds" in r]
        rows += [(f"n={r['n']:,}: all pairs CPU s", r["all_pairs_cpu_seconds"], "s") for r in exact]
        if exact:
            report("copies: candidates (all pairs CPU / index CPU at the largest exact size)", rows, exact[-1]["all_pairs_cpu_seconds"] / max(1e-9, exact[-1]["cpu_seconds"]), 1.0)
        else:
            report("copies: candidates (planted copies found)", rows, float(min(r["planted_recall"] for r in cand)), 0.95)
    ver = [r for r in results if r["step"] == "verify" and "error" not in r]
    if ver:
        rows = [(f"n={r['n']:,} {r['runner']}: {k}", r[k], u) for r in ver for k, u in (("seconds", "s"), ("cpu_seconds", "s"), ("peak_rss_mb", "MB"), ("checked_per_image", "pairs"), ("removed_not_planted", "images"))]
        rows += [(f"n={r['n']:,} {r['runner']}: {k}", r[k], "MB") for r in ver for k in (("workers_peak_rss_mb", "worker_candidate_phase_rss_mb", "worker_verify_phase_rss_mb") if r["runner"] == "dask" else ("candidate_phase_rss_mb", "verify_phase_rss_mb"))]
        report("copies: verification (planted dresses found)", rows, float(min(r["planted_recall"] for r in ver)), 0.95)
        bare = {r["n"]: r for r in results if r["step"] == "bare" and "error" not in r}
        local = [r for r in ver if r["runner"] == "inprocess" and r["n"] in bare]
        if local:  # the bare OpenCV loop's CPU / the in-process Beam step's, at the largest size with both
            rows = [(f"n={r['n']:,}: Beam step in-process CPU s", r["cpu_seconds"], "s") for r in local] + [(f"n={r['n']:,}: Beam step peak RSS", r["peak_rss_mb"], "MB") for r in local]
            rows += [(f"n={r['n']:,}: bare loop CPU s", bare[r["n"]]["cpu_seconds"], "s") for r in local] + [(f"n={r['n']:,}: bare loop peak RSS", bare[r["n"]]["peak_rss_mb"], "MB") for r in local]
            report("copies: verification, bare OpenCV loop CPU / the Beam step's", rows, bare[local[-1]["n"]]["cpu_seconds"] / max(1e-9, local[-1]["cpu_seconds"]), 0.5)
    if any("error" in r for r in results):
        raise SystemExit("copies: " + "; ".join(f"{r['step']} n={r['n']}: {r['error']}" for r in results if "error" in r))
    return results


if __name__ == "__main__":
    main()
