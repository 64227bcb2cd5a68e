"""What download fetches: links -> distinct URLs -> selected -> downloaded -> kept -> paired.

Two inputs, each through download -> filter (efficientnet-lite0) -> pair twice, in one run:
- the real pages of ../shared/data/warc (extract's links; each image URL is answered from
  127.0.0.1 under a name made from the original URL, at the size its links declare, or 500x375);
- a generated crawl with web-like repetition (webpairs/gencrawl.py: heavy-tailed site sizes, site
  logos and icons, Zipf-popular ads and photos, declared sizes on 80 % of links).

Columns: "before" is what download did before the plan: one request per link the URL policy allows
(the same pairs come out: a URL's bytes do not depend on the page). "dedupe" fetches each distinct
URL once with every selection rule off; "plan" is the default (dedupe and the rules). The ratio for
run_all: downloads per paired image, before / plan, on the generated crawl (goal >= 3, with the
same pairs as dedupe).

Then the peak memory (VmHWM, a child process each) of download preparation on 10^5 and 10^6
generated links: the plan (crawl/plan.py: batches + DuckDB) against the old preparation (the
whole links table as Python dicts, sorted), goal for the plan: growth <= 1.5x.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from _common import SMOKE_HELP, ROOT, SHARED, need_shared, report

NO_RULES = dict(min_side=0, skip_extensions=(), url_boilerplate=False, max_links_per_page=0, min_links_per_page=0)


def _pipeline(links_dir: str, out: str, rules: bool, encoder: str, faces: str = "detect") -> dict:
    from core.config import DownloadConfig, FilterConfig, PairConfig
    from core.stageio import read_table
    from crawl.download import run_download
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair

    d = {k: os.path.join(out, k) for k in ("download", "filter", "pair")}
    dl = run_download(links_dir, d["download"], DownloadConfig(allow_hosts=("127.0.0.1",), processes=1, threads=16, timeout=30, deadline=60, **({} if rules else NO_RULES)))
    flt = run_filter(d["download"], d["filter"], FilterConfig(encoder=encoder, faces=faces))
    pr = run_pair(d["filter"], d["pair"], PairConfig())
    pairs = read_table(d["pair"], "pairs", ["pair_id", "cond_image_id", "target_image_id"]).to_pandas()
    return {
        "links": dl["input"], "urls": dl["urls"], "selected": dl["urls_selected"], "fetched": dl["urls_selected"] + dl.get("urls_evidence", 0),
        "downloaded": dl["urls_downloaded"], "images": dl["images"], "kept": flt["images_kept"],
        "paired": len(set(pairs.cond_image_id) | set(pairs.target_image_id)), "pairs": pr["pairs"], "pair_ids": set(pairs.pair_id), "rejected": dl["rejected"],
    }


def _policy_allowed(links_dir: str) -> int:
    """How many links the old download fetched: every link the URL policy allows."""
    from core.stageio import read_table
    from crawl.urls import AllowList, policy_reason

    allow = AllowList(("127.0.0.1",))
    return sum(policy_reason(u, allow) is None for u in read_table(links_dir, "links", ["image_url"]).column(0).to_pylist())


def _funnel(name: str, links_dir: str, tmp: str, encoder: str, faces: str = "detect") -> dict:
    dedupe = _pipeline(links_dir, os.path.join(tmp, name + "-dedupe"), False, encoder, faces)
    plan = _pipeline(links_dir, os.path.join(tmp, name + "-plan"), True, encoder, faces)
    before = _policy_allowed(links_dir)
    print(f"\n== fetch plan: {name} ==")
    print(f"  {'':34s} {'before':>10s} {'dedupe':>10s} {'plan':>10s}")
    rows = [("links", "links"), ("distinct image URLs", "urls"), ("URLs fetched", "fetched"), ("URLs downloaded", "downloaded"), ("distinct images", "images"), ("images kept by filter", "kept"), ("images in a pair", "paired"), ("pairs", "pairs")]
    for label, key in rows:
        b = before if key == "fetched" else "" if key in ("downloaded", "images") else dedupe[key]
        print(f"  {label:34s} {b:>10} {dedupe[key]:>10,d} {plan[key]:>10,d}")
    per_before = before / max(1, dedupe["paired"])
    per_plan = plan["fetched"] / max(1, plan["paired"])
    print(f"  {'downloads per paired image':34s} {per_before:>10.2f} {dedupe['fetched'] / max(1, dedupe['paired']):>10.2f} {per_plan:>10.2f}")
    same = dedupe["pair_ids"] == plan["pair_ids"]
    print(f"  same pairs with and without the rules: {same} ({len(dedupe['pair_ids'] ^ plan['pair_ids'])} differ)")
    print(f"  plan's rejections: {dict(sorted(plan['rejected'].items(), key=lambda kv: -kv[1]))}")
    return {"before": before, "dedupe": dedupe, "plan": plan, "ratio": per_before / per_plan if per_plan else 0.0, "same_pairs": same, "selected_share": plan["fetched"] / max(1, before)}


def real_pages_links(tmp: str, port: int, pages: int = 0) -> str:
    """extract's links of the shared real pages, each image URL renamed onto 127.0.0.1:port (a name
    from the original URL, with the size its links declare, largest first, or 500x375)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from _common import mark_complete
    from core.config import CrawlConfig
    from core.stageio import read_table
    from crawl.extract import run_extract

    run_extract(need_shared("warc"), os.path.join(tmp, "real-extract"), CrawlConfig())
    links = read_table(os.path.join(tmp, "real-extract"), "links").to_pandas()
    if pages:  # the first `pages` pages only (--smoke)
        links = links[links.page_url.isin(links.page_url.unique()[:pages])]
    size = {}
    for r in links.itertuples():
        w, h = r.width if r.width == r.width and r.width else 0, r.height if r.height == r.height and r.height else 0
        old = size.get(r.image_url, (0, 0))
        size[r.image_url] = (max(old[0], int(w)), max(old[1], int(h)))

    def rename(url: str) -> str:
        w, h = size[url]
        w, h = (w or (h * 4 // 3 if h else 500)), (h or (w * 3 // 4 if w else 375))
        path = url.split("?")[0].lower()
        ext = path.rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else "jpg"
        ext = ext if ext in ("jpg", "jpeg", "png", "gif", "webp", "svg", "ico") else "jpg"
        return f"http://127.0.0.1:{port}/real/{hashlib.sha1(url.encode()).hexdigest()[:16]}_{max(1, w)}x{max(1, h)}.{ext}"

    links["image_url"] = links.image_url.map(rename)
    out = os.path.join(tmp, "real-links")
    os.makedirs(os.path.join(out, "links"))
    pq.write_table(pa.Table.from_pandas(links, preserve_index=False).cast(pq.read_schema(next(iter(__import__("glob").glob(os.path.join(tmp, "real-extract", "links", "*.parquet")))))), os.path.join(out, "links", "part-0.parquet"))
    mark_complete(out, "extract", len(links))
    return out


def memory_child(mode: str, links_dir: str) -> dict:
    """Prepare the download of `links_dir` (mode "plan" or "old"): {mode, peak_mib (peak RSS), fetched}."""
    from core.config import DownloadConfig
    from core.stageio import read_table, stage_files
    from crawl.urls import AllowList, policy_reason

    cfg = DownloadConfig(allow_hosts=("127.0.0.1",), plan_memory=os.environ.get("PLAN_MEMORY", DownloadConfig.plan_memory))
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "plan":
            from crawl import plan

            con = plan.connect(os.path.join(tmp, "spill"), cfg.plan_memory)
            plan.check_links(stage_files(links_dir, "links"), os.path.join(tmp, "links"), AllowList(cfg.allow_hosts), cfg)
            counts = plan.make_plan(con, os.path.join(tmp, "links"), tmp, cfg)
            n = counts["urls_fetched"]
        else:  # the preparation before the plan: every link a dict, sorted, policy-checked, written
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = sorted(read_table(links_dir, "links").to_pylist(), key=lambda r: r["link_id"])
            allow = AllowList(cfg.allow_hosts)
            allowed = [r for r in rows if policy_reason(r["image_url"], allow) is None]
            pq.write_table(pa.Table.from_pylist([{c: r[c] for c in ("image_url", "alt", "link_id", "page_url", "position")} for r in allowed]), os.path.join(tmp, "links.parquet"))
            n = len(allowed)
    with open("/proc/self/status") as fh:
        hwm_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return {"mode": mode, "peak_mib": hwm_kb / 1024, "fetched": n}


def _memory(tmp: str, sizes: list[int], smoke: bool = False) -> dict:
    from webpairs.gencrawl import write_links

    out = {}
    for n in sizes:
        links_dir = os.path.join(tmp, f"mem-{n}")
        rows = write_links(links_dir, n, 8000, seed=1, files=8)
        for mode in ("plan", "old"):
            if smoke:  # in this process: the code paths run, the peaks mean nothing
                out[(mode, n)] = {**memory_child(mode, links_dir), "links": rows}
                continue
            res = subprocess.run([sys.executable, __file__, "--memory-child", mode, links_dir], capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            out[(mode, n)] = {**json.loads(res.stdout.strip().splitlines()[-1]), "links": rows}
    print("\n== download preparation: peak memory ==")
    for mode in ("plan", "old"):
        cells = "  ".join(f"{out[(mode, n)]['links']:>9,d} links {out[(mode, n)]['peak_mib']:7.0f} MiB" for n in sizes)
        print(f"  {mode:5s} {cells}  growth {out[(mode, sizes[-1])]['peak_mib'] / out[(mode, sizes[0])]['peak_mib']:.2f}x")
    return {mode: out[(mode, sizes[-1])]["peak_mib"] / out[(mode, sizes[0])]["peak_mib"] for mode in ("plan", "old")}


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", type=int, default=10_000, help="links of the generated crawl for the funnel")
    ap.add_argument("--memory-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--faces", default="detect", choices=("detect", "off"), help="filter's face detection in the funnel runs (detect: the stage's default; it decides no verdict here, only its cost)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    if args.smoke:
        args.links, args.memory_sizes, args.encoder, args.faces = 400, [2000, 4000], "tiny-clip", "off"  # faces: ~100 ms an image was a third of the smoke run
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return []
    from webpairs import gencrawl

    photos = need_shared("photos-imagenet-sample")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        port = gencrawl.free_port()
        with gencrawl.serve(photos, port):
            real = _funnel("real pages (../shared/data/warc)", real_pages_links(tmp, port, 6 if args.smoke else 0), tmp, args.encoder, args.faces)
            gen_dir = os.path.join(tmp, "generated-links")
            gencrawl.write_links(gen_dir, args.links, port, seed=0)
            gen = _funnel(f"generated crawl ({args.links:,} links)", gen_dir, tmp, args.encoder, args.faces)
        results.append(report("fetch plan: downloads per paired image, before / plan (generated crawl)", [("same pairs (1 = yes)", float(gen["same_pairs"]), ""), ("fetched / links allowed (generated)", gen["selected_share"] * 100, "%"), ("fetched / links allowed (real pages)", real["selected_share"] * 100, "%")], gen["ratio"] if gen["same_pairs"] else 0.0, 3.0))
        if not args.skip_memory:
            growth = _memory(tmp, args.memory_sizes, args.smoke)
            results[-1]["memory_growth"] = growth["plan"]
    return results


if __name__ == "__main__":
    main()
