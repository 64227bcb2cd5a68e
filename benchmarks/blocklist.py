"""The hash blocklist (crawl/blocklist.py) at 10^7 lines: load time, memory, lookups per second.

Two generated lists of `--lines` entries each (random digests, as a real list looks): an exact list
(sha256 and md5 lines, half each) and a PDQ list. Each step runs in its own child process so its
peak memory (VmHWM) is its own:

* compile: parse the text a block at a time and write the index (sorted digests; PDQ's 16
  chunk tables) -- what `crawl download --blocklist` does once in the driver;
* lookup: a fresh process maps the index (what each download worker does) and answers queries:
  exact digests (half listed, half not) and PDQ hashes (half within 0-31 bits of a listed hash,
  half random); its resident memory beyond the interpreter is the page cache it touched;
* baselines with the bare libraries, same lists, same run: a Python `set` of the exact lines
  (load time, memory, lookups/s) and a NumPy scan of all PDQ hashes per query (np.bitwise_count
  over the whole array: lookups/s).

Ratios: PDQ lookups/s (multi-index / scan) and the exact list's peak memory (set / index compile).
`--small` runs 10^5 lines (seconds), `--smoke` 2,000; the default 10^7 writes about 1.4 GB of lists and 1.5 GB of
index under a temporary folder and takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import ROOT, SMOKE_HELP, report

import numpy as np


def _vm(field: str) -> float:
    """A /proc/self/status field in MiB (VmHWM: peak resident; RssAnon: private memory)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _write_lists(folder: str, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    paths = {}
    for name in ("exact", "pdq"):
        path = os.path.join(folder, f"{name}.txt")
        with open(path, "w") as fh:
            fh.write(f"# generated {name} list, {n} entries\n")
            for start in range(0, n, 1_000_000):
                m = min(1_000_000, n - start)
                if name == "pdq":
                    blob = rng.integers(0, 256, (m, 32), dtype=np.uint8).tobytes().hex()
                    fh.write("".join(f"pdq:{blob[i * 64:(i + 1) * 64]}\n" for i in range(m)))
                else:
                    sha = rng.integers(0, 256, (m, 32), dtype=np.uint8).tobytes().hex()
                    md5 = rng.integers(0, 256, (m, 16), dtype=np.uint8).tobytes().hex()
                    fh.write("".join(f"sha256:{sha[i * 64:(i + 1) * 64]}\n" if i % 2 == 0 else f"md5:{md5[i * 32:(i + 1) * 32]}\n" for i in range(m)))
        paths[name] = path
    return paths


def _child(args) -> dict:
    sys.path.insert(0, ROOT)
    from crawl.blocklist import BlocklistIndex, compile_index

    base = _vm("VmRSS")
    rng = np.random.default_rng(1)
    if args.child == "compile":
        start = time.perf_counter()
        counts = compile_index([args.list], args.index)
        return {"seconds": time.perf_counter() - start, "peak_mib": _vm("VmHWM") - base, "entries": sum(counts.values())}
    if args.child == "lookup":
        start = time.perf_counter()
        index = BlocklistIndex(args.index, 31)
        load = time.perf_counter() - start
        queries = args.queries
        if index.has_pdq:
            listed = np.asarray(index.pdq[rng.integers(0, len(index.pdq), queries // 2)])
            near = np.unpackbits(listed, axis=1)
            for row in near:
                row[rng.choice(256, rng.integers(0, 32), replace=False)] ^= 1
            qs = [q.tobytes() for q in np.packbits(near, axis=1)] + [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(queries - queries // 2)]
            start = time.perf_counter()
            hits = sum(index.lookup_pdq(q) is not None for q in qs)
        else:
            keys, rows, _ = index.exact["sha256"]
            qs = [bytes(rows[i]) for i in rng.integers(0, len(rows), queries // 2)] + [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(queries - queries // 2)]
            start = time.perf_counter()
            hits = sum(index.lookup_exact("sha256", q) is not None for q in qs)
        seconds = time.perf_counter() - start
        return {"load_s": load, "per_s": queries / seconds, "hits": hits, "queries": queries, "rss_mib": _vm("VmRSS") - base, "anon_mib": _vm("RssAnon")}
    if args.child == "set":
        start = time.perf_counter()
        with open(args.list) as fh:
            entries = {line.strip().lower() for line in fh if line.strip() and not line.startswith("#")}
        load = time.perf_counter() - start
        sample = list(entries)[: args.queries // 2]
        qs = sample + ["sha256:" + rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for _ in range(args.queries - len(sample))]
        start = time.perf_counter()
        hits = sum(q in entries for q in qs)
        return {"load_s": load, "per_s": len(qs) / (time.perf_counter() - start), "hits": hits, "peak_mib": _vm("VmHWM") - base}
    if args.child == "scan":
        hashes = np.load(os.path.join(args.index, "pdq.npy")).view(np.uint64).reshape(-1, 4)
        qs = [rng.integers(0, 256, 32, dtype=np.uint8).view(np.uint64) for _ in range(args.queries)]
        start = time.perf_counter()
        for q in qs:
            int(np.bitwise_count(hashes ^ q).sum(1).min())
        return {"per_s": len(qs) / (time.perf_counter() - start)}
    raise SystemExit(f"unknown child mode {args.child}")


def _run_child(mode: str, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode] + [f"--{k}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=10_000_000, help="entries per list (default 10^7)")
    ap.add_argument("--small", action="store_true", help="10^5 lines")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--child")
    ap.add_argument("--list")
    ap.add_argument("--index")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return {}
    n = 2_000 if args.smoke else 100_000 if args.small else args.lines
    if args.smoke:
        args.queries = 200
    tmp = tempfile.mkdtemp(prefix="webpairs-bench-blocklist-")
    try:
        start = time.perf_counter()
        lists = _write_lists(tmp, n)
        print(f"generated 2 lists of {n:,} lines in {time.perf_counter() - start:.1f} s ({sum(os.path.getsize(p) for p in lists.values()) / 2**20:,.0f} MiB)")
        rows, out = [], {}
        for name, path in lists.items():
            index = os.path.join(tmp, f"{name}-index")
            comp = _run_child("compile", list=path, index=index)
            size = sum(os.path.getsize(os.path.join(index, f)) for f in os.listdir(index)) / 2**20
            look = _run_child("lookup", index=index, queries=args.queries)
            out[name] = {"compile": comp, "lookup": look, "index_mib": size}
            rows += [
                (f"{name}: compile (parse + index) seconds", comp["seconds"], "s"),
                (f"{name}: compile peak memory", comp["peak_mib"], "MiB"),
                (f"{name}: index on disk (memory-mapped)", size, "MiB"),
                (f"{name}: worker map time", look["load_s"] * 1000, "ms"),
                (f"{name}: lookups per second", look["per_s"], "/s"),
                (f"{name}: worker memory after lookups (RSS delta)", look["rss_mib"], "MiB"),
            ]
        base_set = _run_child("set", list=lists["exact"], queries=args.queries)
        base_scan = _run_child("scan", index=os.path.join(tmp, "pdq-index"), queries=max(20, args.queries // 1000 if n >= 10**6 else args.queries // 20))
        rows += [
            ("baseline Python set: load seconds", base_set["load_s"], "s"),
            ("baseline Python set: peak memory", base_set["peak_mib"], "MiB"),
            ("baseline Python set: lookups per second", base_set["per_s"], "/s"),
            ("baseline NumPy scan of all PDQ hashes: lookups per second", base_scan["per_s"], "/s"),
        ]
        ratio = out["pdq"]["lookup"]["per_s"] / base_scan["per_s"]
        res = report(f"blocklist, {n:,} lines per list", rows, ratio, goal=10.0 if n >= 10**6 else 1.0)
        print(f"  exact list peak memory: set / index compile = {base_set['peak_mib'] / max(out['exact']['compile']['peak_mib'], 1):.1f}x")
        print(f"  hits: exact {out['exact']['lookup']['hits']}/{args.queries}, pdq {out['pdq']['lookup']['hits']}/{args.queries} (half the queries are listed or near a listed hash)")
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
