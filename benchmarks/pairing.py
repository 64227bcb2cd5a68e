"""Scale check of pair + shards: records/s and peak memory on a synthetic record set at 1x and 10x.

Each size runs in a fresh child process so that its peak RSS (ru_maxrss) is its own. Throughput
must not fall and peak memory must not grow more than 1.2x from 1x to 10x (issue 34). Also: records
per CPU-second of pair + shards (per core) against main's code before issue 34 (`--before-rev`,
taken from git and run on the same input at 10x in the same run; `--before-rate` instead when the
clone lacks it), and shards against a bare tarfile copy of the same bytes (the disk's side).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import ROOT, SMOKE_HELP, mark_complete, report

BEFORE_REV = "97f4931"  # main before issue 34 (2026-12-05): its pair + shards run on the same 10x input
BEFORE = 287.0  # records per CPU-second of that code at 10x on 2026-12-05's machine: only when git cannot give BEFORE_REV


def synthetic_images(n_pages: int, per_page: int, seed: int = 0) -> list[dict]:
    """ImageRecords: per page, embeddings scattered around a page topic; distinct pHashes and URLs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bases = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(16)]

    def jpeg(p: int, k: int) -> bytes:
        # each image its own small JPEG, as in a real filter output (an image id is a content
        # hash): shared bytes would let parquet's dictionary encoding shrink the row groups shards reads
        pixels = bases[(p + k) % 16].copy()
        pixels[0, :8] = np.frombuffer((p * 64 + k).to_bytes(8, "little") * 3, dtype=np.uint8).reshape(8, 3)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG")
        return buf.getvalue()

    rows = []
    for p in range(n_pages):
        topic = rng.normal(size=64)
        for k in range(per_page):
            e = topic + rng.normal(scale=1.2, size=64)
            e /= np.linalg.norm(e)
            h = f"{int(rng.integers(0, 2**63)):016x}"
            rows.append({
                "image_id": f"{p:08x}{k:08x}", "page_url": f"http://site{p % 97}.example/page{p}", "image_url": f"http://site{p % 97}.example/img/{p}/{k}.jpg",
                "alt": "", "position": k, "width": 64, "height": 64, "format": "JPEG", "sha256": h * 4, "phash": h,
                "embedding": e.astype(np.float16).tolist(), "encoder": "synthetic", "clip_score": None, "image_bytes": jpeg(p, k),
            })
    return rows


def generate(tmp: str, n_pages: int, per_page: int, inline: bool = False) -> None:
    """Write the synthetic filter output (its own process: its memory is not the pipeline's), laid
    out as filter writes it: the bytes in a download-like downloads/ file, each filter row pointing
    to its row group there (a filter row group per download row group); `inline`: the bytes in the
    filter rows themselves, as filter wrote them before its pointers (main before issue 34 reads
    only those; today's code reads both)."""
    import pyarrow.parquet as pq

    from core.records import DOWNLOAD_SCHEMA, IMAGE_SCHEMA, OCCURRENCE_SCHEMA, occurrence_of, rows_to_table

    os.makedirs(os.path.join(tmp, "filter", "images"))
    os.makedirs(os.path.join(tmp, "download", "downloads"))
    rows = synthetic_images(n_pages, per_page)
    for i in range(0, len(rows), 5000):  # several input files, as a real filter output has
        chunk = rows[i : i + 5000]
        bytes_file = os.path.abspath(os.path.join(tmp, "download", "downloads", f"part-{i:08d}.parquet"))
        pq.write_table(rows_to_table([{**r, "sha256": None, "links": 1} for r in chunk], DOWNLOAD_SCHEMA), bytes_file, row_group_size=1000, compression="none")
        for j, r in enumerate(chunk):
            if not inline:
                r.update(image_bytes=None, bytes_file=bytes_file, bytes_row_group=j // 1000)
        pq.write_table(rows_to_table(chunk, IMAGE_SCHEMA), os.path.join(tmp, "filter", "images", f"part-{i:08d}.parquet"), row_group_size=1000)
    os.makedirs(os.path.join(tmp, "filter", "occurrences"))
    pq.write_table(rows_to_table([occurrence_of(r) for r in rows], OCCURRENCE_SCHEMA), os.path.join(tmp, "filter", "occurrences", "part-0.parquet"))
    mark_complete(os.path.join(tmp, "filter"), "filter", len(rows))


def bare_tar_copy(shard_dir: str, out_dir: str) -> tuple[int, int, float, float]:
    """The disk's side of `shards`: the members of the shards just written (read back with tarfile,
    one shard at a time, not timed) copied into tars of the same size, each fsynced. Returns
    (samples, bytes, wall, CPU)."""
    import glob
    import tarfile

    os.makedirs(out_dir)
    wall = cpu = 0.0
    samples = size = 0
    for i, path in enumerate(sorted(glob.glob(os.path.join(shard_dir, "*.tar")))):
        with tarfile.open(path) as tar:  # one shard's members in memory at a time
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        start, cpu0 = time.perf_counter(), time.process_time()
        with open(os.path.join(out_dir, f"bare-{i:06d}.tar"), "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w") as tar:
                for info, data in members:
                    tar.addfile(info, io.BytesIO(data))
                    size += len(data)
                    samples += info.name.endswith(".json")
            fh.flush()
            os.fsync(fh.fileno())
        wall, cpu = wall + time.perf_counter() - start, cpu + time.process_time() - cpu0
    return samples, size, wall, cpu


def _peak_mb(reset: bool = False) -> float:
    """VmHWM, the peak RSS of this process's own address space (ru_maxrss would include the parent's
    peak, which survives fork and exec, so run_all's big parent would leak into it); `reset` then
    sets the mark back to the current RSS (Linux: "5" into /proc/self/clear_refs)."""
    with open("/proc/self/status") as fh:
        mb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    if reset:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    return mb


def child(tmp: str) -> dict:
    import pairing.pipeline
    from core.config import PairConfig, ShardConfig
    from pairing.pipeline import run_pair
    from shards.writer import run_shards

    start, cpu0 = time.perf_counter(), time.process_time()
    copies = os.environ.get("WEBPAIRS_BENCH_COPIES", "1") == "1"  # --no-copies
    pair_stats = run_pair(os.path.join(tmp, "filter"), os.path.join(tmp, "pair"), PairConfig(sim_low=0.0, sim_high=0.99, copies=copies))
    pair_peak = _peak_mb(reset=True)
    mid, cpu1 = time.perf_counter(), time.process_time()
    shard_stats = run_shards(os.path.join(tmp, "pair"), os.path.join(tmp, "shards"), ShardConfig(samples_per_shard=2000))
    seconds = time.perf_counter() - start
    shards_s, shards_cpu, pair_cpu = time.perf_counter() - mid, time.process_time() - cpu1, cpu1 - cpu0
    shards_peak = _peak_mb()  # before the baseline, which holds a shard's bytes of its own
    bare_samples, bare_bytes, bare_s, bare_cpu = bare_tar_copy(os.path.join(tmp, "shards"), os.path.join(tmp, "bare"))
    return {"images": pair_stats["input"], "pairs": pair_stats["pairs"], "samples": shard_stats["kept"], "seconds": seconds, "peak_rss_mb": max(pair_peak, shards_peak), "pair_peak_mb": pair_peak, "shards_peak_mb": shards_peak,
            "pair_cpu": pair_cpu, "shards_s": shards_s, "shards_cpu": shards_cpu, "bare_samples": bare_samples, "bare_bytes": bare_bytes, "bare_s": bare_s, "bare_cpu": bare_cpu,
            "code": os.path.dirname(os.path.dirname(os.path.abspath(pairing.pipeline.__file__)))}  # which checkout ran


def before_code(rev: str, folder: str) -> str:
    """This repository's code at `rev`, unpacked into `folder` (git archive); "" when git or the
    revision is not there (a shallow clone, an unpacked tarball)."""
    import tarfile

    try:
        data = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        try:
            tar.extractall(folder, filter="data")
        except TypeError:  # Python before 3.11.4: no extraction filters (git's own archive)
            tar.extractall(folder)
    return folder


def run_size(n_pages: int, per_page: int, smoke: bool = False, code: str = "") -> dict:
    """One size's figures; `code`: a folder holding other code of this repository (`before_code`),
    run on the same records instead of this checkout's (laid out as that code's filter wrote them:
    the bytes inside the filter rows). A child that fails raises SystemExit with its last error lines."""
    with tempfile.TemporaryDirectory() as tmp:
        if smoke:  # one process: the code paths run, the figures mean nothing
            generate(tmp, n_pages, per_page)
            return child(tmp)
        subprocess.run([sys.executable, __file__, "--generate", tmp, "--pages", str(n_pages), "--per-page", str(per_page), *(["--inline"] if code else [])], check=True)
        proc = subprocess.Popen([sys.executable, __file__, "--child", tmp, *(["--code", code] if code else [])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            last = " | ".join(line for line in stderr.strip().splitlines()[-3:])
            raise SystemExit(f"pipeline child failed with status {proc.returncode}: {last}")
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pages", type=int, default=500, help="pages at 1x")
    ap.add_argument("--per-page", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    ap.add_argument("--no-copies", action="store_true", help="pair without its copy step (pairing/copies.py: one SIFT per candidate image, then a geometric check per candidate pair)")
    ap.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--before-rev", default=BEFORE_REV, help=f"the revision whose pair + shards this run compares with at 10x, on the same input (default {BEFORE_REV}: main before issue 34); '' to skip it")
    ap.add_argument("--before-rate", type=float, default=BEFORE, help=f"records per CPU-second to compare with when --before-rev is skipped or not in this clone (default {BEFORE:.0f}: {BEFORE_REV} on 2026-12-05's machine)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    if args.smoke:
        args.pages = 20
    if args.no_copies:
        os.environ["WEBPAIRS_BENCH_COPIES"] = "0"  # the children inherit it
    if args.generate:
        generate(args.generate, args.pages, args.per_page, args.inline)
        return {}
    if args.child:
        if args.code:  # another revision's pipeline (before_code): its packages before this checkout's
            sys.path.insert(0, args.code)
        print(json.dumps(child(args.child)))
        return {}
    small = run_size(args.pages, args.per_page, args.smoke)
    big = run_size(args.pages * (2 if args.smoke else 10), args.per_page, args.smoke)
    before = args.before_rate
    before_label = f"before ({BEFORE_REV} on 2026-12-05's machine)" if args.before_rate == BEFORE else "before (--before-rate)"
    if args.before_rev and not args.smoke:  # (a smoke run would time nothing)
        with tempfile.TemporaryDirectory() as code_dir:
            if before_code(args.before_rev, code_dir):
                try:
                    old = run_size(args.pages * 10, args.per_page, code=code_dir)
                except SystemExit as e:  # that code no longer runs here: say so and use the rate
                    print(f"  {args.before_rev}'s code did not run ({e}): comparing with {before:.0f}")
                else:
                    if os.path.realpath(old["code"]) != os.path.realpath(code_dir):
                        raise SystemExit(f"the run of {args.before_rev} imported the code in {old['code']}")
                    before, before_label = old["images"] / (old["pair_cpu"] + old["shards_cpu"]), f"before ({args.before_rev}'s code, this run, the same records at 10x)"
            else:
                print(f"  {args.before_rev} could not be read from git: comparing with {before:.0f}")
    r1, r10 = small["images"] / small["seconds"], big["images"] / big["seconds"]
    mem = big["peak_rss_mb"] / small["peak_rss_mb"]
    res = report(
        "pair + shards scale (1x -> 10x)",
        [
            ("1x images", small["images"], "records"), ("1x pairs", small["pairs"], "pairs"), ("1x throughput", r1, "records/s"), ("1x peak RSS", small["peak_rss_mb"], "MB"),
            ("10x images", big["images"], "records"), ("10x pairs", big["pairs"], "pairs"), ("10x throughput", r10, "records/s"), ("10x peak RSS", big["peak_rss_mb"], "MB"),
            ("peak memory growth 10x/1x (limit 1.2)", mem, "x"),
            ("pair's peak RSS 1x -> 10x", big["pair_peak_mb"], f"MB (from {small['pair_peak_mb']:.0f})"), ("shards' peak RSS 1x -> 10x", big["shards_peak_mb"], f"MB (from {small['shards_peak_mb']:.0f})"),
        ],
        r10 / r1,
        1.0,
    )
    print(f"  memory growth {mem:.2f}x ({'within' if mem <= 1.2 else 'ABOVE'} the 1.2x limit)")
    res["memory_growth"] = mem
    per_core = [r["images"] / (r["pair_cpu"] + r["shards_cpu"]) for r in (small, big)]
    core = report(
        "pair + shards per core (CPU seconds of the process)",
        [("1x pair CPU", small["pair_cpu"], "s"), ("1x shards CPU", small["shards_cpu"], "s"), ("1x pair + shards", per_core[0], "records per CPU-second"),
         ("10x pair CPU", big["pair_cpu"], "s"), ("10x shards CPU", big["shards_cpu"], "s"), ("10x pair + shards", per_core[1], "records per CPU-second"),
         (before_label, before, "records per CPU-second")],
        per_core[1] / before,
        3.0,
    )
    disk = report(
        "shards / a bare copy of the same bytes into tars (10x)",
        [("samples", big["samples"], "samples"), ("bytes in the tars", big["bare_bytes"] / 2**20, "MiB"), ("bare tarfile copy + fsync", big["bare_samples"] / big["bare_s"], "samples/s"),
         ("bare copy, disk rate", big["bare_bytes"] / 2**20 / big["bare_s"], "MiB/s"), ("webpairs shards", big["samples"] / big["shards_s"], "samples/s"),
         ("bare copy per CPU-second", big["bare_samples"] / max(big["bare_cpu"], 1e-9), "samples"), ("shards per CPU-second", big["samples"] / max(big["shards_cpu"], 1e-9), "samples")],
        (big["samples"] / big["shards_s"]) / (big["bare_samples"] / big["bare_s"]),
        0.5,
    )
    cpu = big["samples"] / max(big["shards_cpu"], 1e-9) / (big["bare_samples"] / max(big["bare_cpu"], 1e-9))
    print(f"  in CPU time (this process, not the disk): shards / bare copy = {cpu:.2f}")
    disk["cpu_ratio"] = cpu
    return [res, core, disk]


if __name__ == "__main__":
    main()
