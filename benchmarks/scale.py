"""Does cost stay linear up to one Common Crawl file? Wall time, CPU time and peak memory of every
stage at 1x, 4x and 16x, on the in-process runner and on Dask with 2 workers.

16x is one Common Crawl file: about 35,000 pages and 800,000 image links for `crawl extract` and
the download plan (crawl/plan.py: the checks and the DuckDB plan; no fetch), and 10^5 images for
filter -> pair -> shards. The input is the generated crawl of webpairs/gencrawl.py: its pages
written as WARC records (extract's input, ~23 links a page), and its distinct image URLs made by
the loopback web's image maker (`gencrawl._image`: crops of the shared photos, flat PNG logos and
icons, GIF and SVG ads...) written as a complete download output, each link resolved to its image.
Smaller sizes are prefixes of the 16x crawl (whole sites first), so every size has the same shape.

Each (stage, size, runner) runs in its own child process: wall time, CPU time (the child's, plus
the Dask workers' on Dask) and peak RSS (VmHWM; on Dask the largest of the driver and the two
workers, each on a fresh cluster). Printed: the table, per stage the growth exponent b of
time ~ size^b (least squares on the log-log points) and the peak memory growth 16x/1x; the goals
are b <= 1.05 and memory <= 1.3x. Plots go to docs/figures/scale_time.png and scale_memory.png.

`--smoke`: tiny sizes on the in-process runner (checks that it runs). Results are written as JSON
(`--json`) after every step, so a long run that stops still leaves what it measured;
`--plot-only JSON` redraws the figures and the table from such a file.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from _common import ROOT, SMOKE_HELP, mark_complete, need_shared, report

STAGES = ("extract", "plan", "filter", "pair", "shards")
LINKS_PER_PAGE = 23  # Common Crawl: ~800,000 image links on ~35,000 pages of one file
FULL_PAGES, FULL_IMAGES = 35_000, 100_000  # at the largest size
FILTER_ENCODER, FILTER_FACES = "tiny-clip", "detect"  # filter's settings (--filter-encoder, --faces)
PORT = 8000  # the image URLs name 127.0.0.1:8000; nothing is served (download is not run)


# ---------------------------------------------------------------- input


def _pages_html(table) -> dict[str, str]:
    """gencrawl's links grouped into HTML pages of about LINKS_PER_PAGE links (consecutive pages
    of one site merged), page URL -> HTML."""
    import itertools

    pages: dict[str, str] = {}
    rows = zip(table.column("page_url").to_pylist(), table.column("image_url").to_pylist(), table.column("width").to_pylist(), table.column("height").to_pylist())
    current, imgs = None, []
    filler = "<p>" + "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20 + "</p>"
    for page, group in itertools.groupby(rows, key=lambda r: r[0]):
        if current is None or len(imgs) >= LINKS_PER_PAGE or page.split("/p")[0] != current.split("/p")[0]:
            if current is not None:
                pages[current] = f"<html><head><title>{current}</title></head><body><h1>A page</h1>{filler}{''.join(imgs)}{filler}</body></html>"
            current, imgs = page, []
        for _, url, w, h in group:
            size = f' width="{w}" height="{h}"' if w is not None else ""
            imgs.append(f'<div><img src="{url}"{size} alt="picture {len(imgs)}"></div>')
    if current is not None:
        pages[current] = f"<html><head><title>{current}</title></head><body>{filler}{''.join(imgs)}</body></html>"
    return pages


SMALL_JPEG = 3  # photos and ads are made at a third of their declared side (400x300 -> 133x100)


def small_path(path: str) -> str:
    """The image path with its JPEG size divided by SMALL_JPEG when both sides stay >= 64 (filter's
    min_side): gencrawl's maker draws the picture the same way, only smaller, so 10^5 images take
    minutes to make and filter decodes small JPEGs. Logos, icons, thumbnails keep their size."""
    head, name = path.rsplit("/", 1)
    stem, ext = name.rsplit(".", 1)
    if ext != "jpg" or "_" not in stem:
        return path
    base, size = stem.rsplit("_", 1)
    w, h = (int(v) for v in size.split("x"))
    if min(w, h) // SMALL_JPEG < 64:
        return path
    return f"{head}/{base}_{w // SMALL_JPEG}x{h // SMALL_JPEG}.{ext}"


def _make_image(url: str) -> bytes:
    from webpairs import gencrawl

    return gencrawl._image(small_path(url.split(f":{PORT}", 1)[1]), _PHOTOS)


def _init_photos(photos):
    """In each generator process: the photos decoded once (gencrawl's maker opens one per image;
    its `.convert("RGB")` copies the cached image, so the bytes made are the same)."""
    from PIL import Image

    global _PHOTOS
    _PHOTOS = photos
    opened, cache, known = Image.open, {}, set(photos)

    def cached_open(fp, *args, **kwargs):
        if isinstance(fp, str) and fp in known:
            if fp not in cache:
                cache[fp] = opened(fp).convert("RGB")
            return cache[fp]
        return opened(fp, *args, **kwargs)

    Image.open = cached_open


def generate(work: str, sizes: list[int], full_pages: int, full_images: int, files: int) -> None:
    """Write every size's extract input (WARC files) and filter input (a download output)."""
    import multiprocessing

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.records import DOWNLOAD_OCCURRENCE_SCHEMA, DOWNLOAD_SCHEMA
    from core.sites import site_of
    from webpairs import gencrawl
    from webpairs.testweb import write_warc

    top = max(sizes)
    photos_dir = need_shared("photos-imagenet-sample")
    photos = tuple(sorted(os.path.join(photos_dir, n) for n in os.listdir(photos_dir) if n.lower().endswith((".jpg", ".jpeg"))))

    # extract: pages of the generated crawl as WARC records, `files` files per size
    links = gencrawl.links_table(full_pages * LINKS_PER_PAGE, PORT, seed=3)
    pages = list(_pages_html(links).items())
    print(f"{links.num_rows:,} links on {len(pages):,} pages at {top}x", flush=True)
    for size in sizes:
        if os.path.isdir(os.path.join(work, f"warc-{size}")):
            continue  # made by an earlier run with the same --work
        chosen = pages[: max(files, len(pages) * size // top)]
        for f in range(files):
            write_warc(os.path.join(work, f"warc-{size}", f"part-{f:02d}.warc.gz"), dict(chosen[f::files]))
        print(f"generated {len(chosen):,} pages for size {size}", flush=True)

    # filter: a download output of a generated crawl with about `full_images` distinct images
    table = gencrawl.links_table(int(full_images * 4.4), PORT, seed=4)
    page_urls = table.column("page_url").to_pylist()
    order = {p: i for i, p in enumerate(dict.fromkeys(page_urls))}
    page_index = np.array([order[p] for p in page_urls])
    urls = table.column("image_url").to_pylist()
    distinct = sorted(set(urls))
    if len(distinct) < 2000:  # a smoke run: no worker processes
        _init_photos(photos)
        blobs = {u: _make_image(u) for u in distinct}
    else:
        with multiprocessing.Pool(2, initializer=_init_photos, initargs=(photos,)) as pool:
            blobs = dict(zip(distinct, pool.map(_make_image, distinct, chunksize=256)))
    import hashlib

    sha = {u: hashlib.sha256(b).hexdigest() for u, b in blobs.items()}
    for size in sizes:
        keep = page_index < max(2, len(order) * size // top)
        sub = table.filter(pa.array(keep))
        out = os.path.join(work, f"download-{size}")
        os.makedirs(os.path.join(out, "downloads"))
        os.makedirs(os.path.join(out, "occurrences"))
        occ = sub.to_pylist()
        links_of: dict[str, int] = {}
        first: dict[str, dict] = {}
        for r in occ:
            iid = sha[r["image_url"]][:16]
            links_of[iid] = links_of.get(iid, 0) + 1
            first.setdefault(iid, r)
        rows = [{"image_id": iid, "image_url": r["image_url"], "page_url": r["page_url"], "alt": r["alt"], "position": r["position"], "image_bytes": blobs[r["image_url"]], "sha256": sha[r["image_url"]], "links": links_of[iid]} for iid, r in sorted(first.items())]
        per = -(-len(rows) // files)
        for f in range(files):
            pq.write_table(pa.Table.from_pylist(rows[f * per : (f + 1) * per], schema=DOWNLOAD_SCHEMA), os.path.join(out, "downloads", f"part-{f:02d}.parquet"), row_group_size=500)
        occ_rows = [{"link_id": r["link_id"], "page_url": r["page_url"], "site": site_of(r["page_url"]), "image_url": r["image_url"], "alt": r["alt"], "position": r["position"], "declared_width": r["width"], "declared_height": r["height"], "image_id": sha[r["image_url"]][:16], "reason": None} for r in occ]
        per = -(-len(occ_rows) // files)
        for f in range(files):
            pq.write_table(pa.Table.from_pylist(occ_rows[f * per : (f + 1) * per], schema=DOWNLOAD_OCCURRENCE_SCHEMA), os.path.join(out, "occurrences", f"part-{f:02d}.parquet"))
        mark_complete(out, "download", len(occ_rows))
        print(f"generated {len(rows):,} images, {len(occ_rows):,} links for size {size}", flush=True)


# ---------------------------------------------------------------- one stage in a child


def _peak_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def _worker_usage():
    """In a Dask worker: (CPU seconds, peak RSS MB) of its process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, _peak_mb()


def _inputs(work: str, stage: str, size: int, runner: str) -> tuple[str, str]:
    """(input, output) of a stage; the input of plan, pair and shards is the upstream stage's output
    of this runner, or of the runner named by WEBPAIRS_SCALE_INPUTS_FROM (`--inputs-from`)."""
    base = os.path.join(work, f"out-{runner}-{size}")
    up = os.path.join(work, f"out-{os.environ.get('WEBPAIRS_SCALE_INPUTS_FROM') or runner}-{size}")
    src = {"extract": os.path.join(work, f"warc-{size}", "*.warc.gz"), "plan": os.path.join(up, "extract"), "filter": os.path.join(work, f"download-{size}"), "pair": os.path.join(up, "filter"), "shards": os.path.join(up, "pair")}[stage]
    return src, os.path.join(base, stage)


def child(work: str, stage: str, size: int, runner: str) -> dict:
    """Run one stage once: {stage, size, runner, records, wall, cpu, peak_mb}."""
    import contextlib
    import shutil

    from core.config import CrawlConfig, DownloadConfig, FilterConfig, PairConfig, ShardConfig

    src, out = _inputs(work, stage, size, runner)
    shutil.rmtree(out, ignore_errors=True)
    cluster = contextlib.nullcontext(None)
    if runner == "dask" and stage != "plan":
        from core.dask_runner import dask_cluster

        cluster = dask_cluster(None, 2)
    with cluster as address:
        client = None
        beam_args = None
        if address:
            from distributed import Client

            client = Client(address)
            beam_args = ["--runner", "dask", "--dask-address", address]
            before = client.run(_worker_usage)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        if stage == "extract":
            from crawl.extract import run_extract

            stats = run_extract(src, out, CrawlConfig(allow_hosts=("127.0.0.1",)), beam_args)
            n = stats["input"]
        elif stage == "plan":
            from core.stageio import stage_files
            from crawl import plan
            from crawl.urls import AllowList

            cfg = DownloadConfig(allow_hosts=("127.0.0.1",))
            os.makedirs(out)
            con = plan.connect(os.path.join(out, "spill"), cfg.plan_memory)
            plan.check_links(stage_files(src, "links", expected="extract"), os.path.join(out, "links"), AllowList(cfg.allow_hosts), cfg)
            counts = plan.make_plan(con, os.path.join(out, "links"), out, cfg)
            con.close()
            n = counts["links"]
        elif stage == "filter":
            from filter.pipeline import run_filter

            encoder, faces = os.environ.get("WEBPAIRS_SCALE_FILTER", f"{FILTER_ENCODER},{FILTER_FACES}").split(",")  # --filter-encoder, --faces
            n = run_filter(src, out, FilterConfig(encoder=encoder, faces=faces), beam_args)["input"]
        elif stage == "pair":
            from pairing.pipeline import run_pair

            copies = os.environ.get("WEBPAIRS_SCALE_COPIES", "1") == "1"  # --no-copies
            n = run_pair(src, out, PairConfig(sim_low=0.0, sim_high=0.99, copies=copies), beam_args)["input"]
        else:
            from shards.writer import run_shards

            n = run_shards(src, out, ShardConfig(), beam_args)["input"]
        wall = time.perf_counter() - start
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        peak = _peak_mb()
        processes = {"driver_mb": peak}  # which process the peak was (on Dask the driver runs the LocalCluster's scheduler)
        if client is not None:
            after = client.run(_worker_usage)
            cpu += sum(after[w][0] - before[w][0] for w in after if w in before)
            processes["workers_mb"] = sorted((after[w][1] for w in after), reverse=True)
            peak = max([peak] + processes["workers_mb"])
            client.close()
    return {"stage": stage, "size": size, "runner": runner, "records": n, "wall": wall, "cpu": cpu, "peak_mb": peak, **processes}


# ---------------------------------------------------------------- the table and the figures


def exponent(points: list[tuple[float, float]]) -> float:
    """b of y ~ x^b, least squares on the log-log points."""
    xs, ys = [math.log(x) for x, _ in points], [math.log(max(y, 1e-9)) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def summarise(results: list[dict]) -> list[dict]:
    print(f"\n  {'stage':8s} {'runner':10s} {'size':>4s} {'records':>9s} {'wall s':>8s} {'cpu s':>8s} {'records/cpu-s':>13s} {'peak MB':>8s}")
    for r in results:
        print(f"  {r['stage']:8s} {r['runner']:10s} {r['size']:>4d} {r['records']:>9,d} {r['wall']:8.1f} {r['cpu']:8.1f} {r['records'] / max(r['cpu'], 1e-9):13.0f} {r['peak_mb']:8.0f}")
    out = []
    for runner in dict.fromkeys(r["runner"] for r in results):
        for stage in STAGES:
            rows = sorted((r for r in results if r["stage"] == stage and r["runner"] == runner), key=lambda r: r["size"])
            if len(rows) < 2:
                continue
            b_wall = exponent([(r["records"], r["wall"]) for r in rows])
            b_cpu = exponent([(r["records"], r["cpu"]) for r in rows])
            # between the two largest sizes: the fixed start-up (Beam, the model, a cluster) that
            # flattens the curve at 1x weighs least there
            b_top = exponent([(r["records"], r["cpu"]) for r in rows[-2:]])
            mem = rows[-1]["peak_mb"] / rows[0]["peak_mb"]
            res = report(
                f"scale: {stage}, {runner}, {rows[0]['records']:,} -> {rows[-1]['records']:,} records",
                [("growth exponent of wall time x 100 (goal <= 105)", 100 * b_wall, ""), ("growth exponent of CPU time x 100", 100 * b_cpu, ""), (f"... between {rows[-2]['size']}x and {rows[-1]['size']}x, x 100", 100 * b_top, ""), (f"peak memory {rows[0]['size']}x -> {rows[-1]['size']}x", rows[-1]["peak_mb"], f"MB (from {rows[0]['peak_mb']:.0f} MB)"), ("peak memory growth (goal <= 1.3)", mem, "x")],
                min(1.05 / max(b_top, 0.01), 99.0),  # >= 1 when CPU time grows no faster than size^1.05 at the top
                1.0,
            )
            res.update(stage=stage, runner=runner, exponent_wall=b_wall, exponent_cpu=b_cpu, exponent_top=b_top, memory_growth=mem)
            out.append(res)
    return out


def plot(results: list[dict], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    for key, label, name in (("cpu", "CPU seconds (driver + workers)", "scale_time.png"), ("peak_mb", "peak RSS, MB (largest process)", "scale_memory.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=key == "peak_mb")
        for ax, runner in zip(axes, ("inprocess", "dask")):
            for colour, stage in enumerate(STAGES):  # one colour per stage in both panels
                rows = sorted((r for r in results if r["stage"] == stage and r["runner"] == runner), key=lambda r: r["size"])
                if rows:
                    xs = [r["records"] for r in rows]
                    ax.plot(xs, [r[key] for r in rows], "o-", color=f"C{colour}", label=stage)
                    if key == "cpu" and len(rows) > 1:  # linear growth from the 4x point (dotted)
                        ref = rows[-2]
                        ax.plot([xs[0], xs[-1]], [ref[key] * xs[0] / ref["records"], ref[key] * xs[-1] / ref["records"]], ":", color=f"C{colour}", linewidth=1)
            if key == "cpu":
                ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_xlabel("records (links for extract, plan, filter and pair; pairs for shards); dotted: linear from 4x", fontsize=7)
            ax.set_ylabel(label)
            ax.set_title({"inprocess": "in-process runner (FnApiRunner)", "dask": "Dask, 2 worker processes"}[runner])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(("time" if key == "cpu" else "peak memory") + " per stage, 1x -> 16x (16x = one Common Crawl file)")
        fig.tight_layout()
        path = os.path.join(folder, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- main


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="multiples of the smallest size; the largest is --pages pages and --images images")
    ap.add_argument("--pages", type=int, default=FULL_PAGES, help="pages for extract at the largest size (links: ~23 a page)")
    ap.add_argument("--images", type=int, default=FULL_IMAGES, help="distinct images for filter at the largest size")
    ap.add_argument("--files", type=int, default=8, help="input files per stage (Beam's and Dask's unit of parallelism)")
    ap.add_argument("--runners", nargs="+", default=["inprocess", "dask"], choices=["inprocess", "dask"])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--work", help="folder for inputs and outputs (kept: a second run reuses the inputs); default a temporary folder")
    ap.add_argument("--json", help="write the measurements here after every step")
    ap.add_argument("--figures", help="folder for scale_time.png and scale_memory.png ('' for none); default docs/figures (the README's plots), but only for a run of every stage on both runners or --plot-only: a run of some stages or one runner draws no figures unless this names a folder")
    ap.add_argument("--keep", action="store_true", help="keep each size's stage outputs in --work (a later run with --stages pair shards reads them)")
    ap.add_argument("--inputs-from", choices=["inprocess", "dask"], help="read each stage's input from this runner's outputs in --work (kept with --keep): e.g. pair and shards on Dask from the in-process filter output, which is the same")
    ap.add_argument("--no-copies", action="store_true", help="pair without its copy step (pairing/copies.py): on the generated crawl's photo crops most images are copy candidates, and the local runner holds the step's two joins of SIFT features in memory (8.6 GB at 1x on 2026-12-05)")
    ap.add_argument("--filter-encoder", default=FILTER_ENCODER, help=f"filter's --encoder (default {FILTER_ENCODER}: small, offline; 'none' times the decode and hashes alone, and pair then has no embeddings to pick pairs by)")
    ap.add_argument("--faces", default=FILTER_FACES, choices=["detect", "blur", "off"], help=f"filter's --faces (default {FILTER_FACES}, the product's default: ~70-120 CPU ms an image, most of filter's time)")
    ap.add_argument("--plot-only", help="a --json file of an earlier run: print its table and draw its figures")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    ap.add_argument("--generate", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.figures is None:
        whole = args.plot_only or (sorted(args.stages) == sorted(STAGES) and sorted(args.runners) == ["dask", "inprocess"])
        args.figures = os.path.join(ROOT, "docs", "figures") if whole else ""
        if not whole and not args.child and not args.generate:
            print("figures: none (a run of some stages or one runner would redraw the README's plots with part of them; --figures DIR draws them)", flush=True)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), args.child[3])))
        return []
    if args.plot_only:
        with open(args.plot_only) as fh:
            results = json.load(fh)
        out = summarise(results)
        if args.figures:
            print("figures:", ", ".join(plot(results, args.figures)))
        return out
    if args.smoke:
        args.sizes, args.pages, args.images, args.files, args.runners, args.figures = [1, 2], 30, 100, 2, ["inprocess"], ""
    if args.generate:
        generate(args.generate[0], args.sizes, args.pages, args.images, int(args.generate[1]))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=ROOT)
        env["WEBPAIRS_SCALE_FILTER"] = os.environ["WEBPAIRS_SCALE_FILTER"] = f"{args.filter_encoder},{args.faces}"
        if args.no_copies:
            env["WEBPAIRS_SCALE_COPIES"] = os.environ["WEBPAIRS_SCALE_COPIES"] = "0"
        if args.inputs_from:
            env["WEBPAIRS_SCALE_INPUTS_FROM"] = os.environ["WEBPAIRS_SCALE_INPUTS_FROM"] = args.inputs_from
        if not os.path.exists(os.path.join(work, f"download-{max(args.sizes)}", "_SUCCESS")):
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--generate", work, str(args.files), "--sizes", *map(str, args.sizes), "--pages", str(args.pages), "--images", str(args.images)]
            if args.smoke:  # one process: a smoke run proves the code paths, its figures mean nothing
                generate(work, args.sizes, args.pages, args.images, args.files)
            else:
                subprocess.run(cmd, check=True, env=env)
            print(f"inputs generated in {time.perf_counter() - start:.0f} s", flush=True)
        results = []
        if args.json and os.path.exists(args.json):  # an earlier run's rows (other stages or runners) stay
            with open(args.json) as fh:
                results = [r for r in json.load(fh) if not (r["runner"] in args.runners and r["stage"] in args.stages and r["size"] in args.sizes)]
        for runner in args.runners:  # every size on one runner first: a run cut short still has a curve
            for size in sorted(args.sizes):
                for stage in args.stages:
                    if runner == "dask" and stage == "plan":
                        continue  # DuckDB, not Beam: the same on both
                    if args.smoke:
                        row = child(work, stage, size, runner)
                    else:
                        proc = subprocess.run([sys.executable, __file__, "--child", work, stage, str(size), runner], env=env, capture_output=True, text=True)
                        if proc.returncode != 0:
                            raise SystemExit(f"scale: {stage} at {size}x on {runner} failed:\n{proc.stderr[-3000:]}")
                        row = json.loads(proc.stdout.strip().splitlines()[-1])
                    results = [r for r in results if (r["stage"], r["size"], r["runner"]) != (stage, size, runner)] + [row]
                    print(f"{stage:8s} {runner:10s} {size:>3d}x {row['records']:>9,d} records  wall {row['wall']:7.1f} s  cpu {row['cpu']:7.1f} s  peak {row['peak_mb']:6.0f} MB (driver {row.get('driver_mb', 0):.0f}{''.join(f', worker {w:.0f}' for w in row.get('workers_mb', []))})", flush=True)
                    if args.json:
                        with open(args.json, "w") as fh:
                            json.dump(results, fh, indent=1)
                if not args.keep:
                    shutil.rmtree(os.path.join(work, f"out-{runner}-{size}"), ignore_errors=True)  # GBs at 16x
    out = summarise(results)
    if args.figures:
        print("figures:", ", ".join(plot(results, args.figures)))
    return out


if __name__ == "__main__":  # multiprocessing and LocalCluster spawn processes: the guard is required
    main()
