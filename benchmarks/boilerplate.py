"""Boilerplate recall, precision and pairs that hold boilerplate, on the multi-site loopback web.

The web (webpairs/multisite.py) has N sites of 2-15 pages, each with its own logo in 2-3 sizes
(flat PNG on most sites, JPEG on every fifth), its own share and feed icons, photos of its own,
a photo that recurs on two pages of most sites (content, not boilerplate) and a third-party ad on
pages of many sites. It runs through extract -> download -> filter -> pair at default settings
and is scored against the ground truth over every (page, image) occurrence:

  recall     boilerplate occurrences removed with a boilerplate reason / all boilerplate occurrences
  precision  boilerplate occurrences among all occurrences removed with a boilerplate reason
  pairs      pairs with a logo, icon or ad as condition or target (goal: 0)

Boilerplate reasons: too_small, declared_too_small, bad_aspect, flat_image, url_word (filter) and
boilerplate_site, boilerplate_global (pair). The `ratio` reported to run_all is min(recall,
precision) against the goal 0.98. Each seed is another web (site sizes, which sites have JPEG logos).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import SMOKE_HELP, SHARED, report, timed


def run_once(n_sites: int, seed: int, encoder: str) -> tuple[dict, dict]:
    from core.config import CrawlConfig, DownloadConfig, FilterConfig, PairConfig
    from crawl.download import run_download
    from crawl.extract import run_extract
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair
    from webpairs.multisite import serve_multisite_web, score_boilerplate

    photos = os.path.join(SHARED, "photos-imagenet-sample")
    with tempfile.TemporaryDirectory() as tmp, serve_multisite_web(tmp, photos_dir=photos if os.path.isdir(photos) else None, n_sites=n_sites, seed=seed) as web:
        d = {k: os.path.join(tmp, k) for k in ("links", "download", "filter", "pair")}
        run_extract(web.warc_path, d["links"], CrawlConfig(allow_hosts=("127.0.0.1",)))
        run_download(d["links"], d["download"], DownloadConfig(allow_hosts=("127.0.0.1",)))
        filter_stats = run_filter(d["download"], d["filter"], FilterConfig(encoder=encoder))
        pair_stats, pair_s = timed(run_pair, d["filter"], d["pair"], PairConfig())
        score = score_boilerplate(web, d)
    score["sites"], score["pages"] = n_sites, len(web.pages)
    return score, {"filter": filter_stats, "pair": pair_stats, "pair_s": pair_s}


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--encoder", default="efficientnet-lite0", help="filter's encoder (pairs need embeddings; boilerplate does not)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    if args.smoke:
        args.sites, args.seeds, args.encoder = 4, [0], "tiny-clip"
    results = []
    for seed in args.seeds:
        score, stats = run_once(args.sites, seed, args.encoder)
        print(f"\nseed {seed}: removed by reason {score['removed_by_reason']}; url_word would catch {stats['filter'].get('url_word_matches', 0)}")
        if score["missed"]:
            print("  missed boilerplate:", ", ".join(u.rsplit("/", 3)[-3] + "/" + u.rsplit("/", 1)[-1] for u in score["missed"]))
        if score["content_removed"]:
            print("  content removed as boilerplate:", len(score["content_removed"]))
        results.append(report(
            f"boilerplate, multi-site web seed {seed}",
            [
                ("sites / pages", score["pages"], f"pages on {score['sites']} sites"),
                ("occurrences (boilerplate)", score["occurrences"], f"({score['boilerplate_occurrences']} boilerplate)"),
                ("recall", 100 * score["recall"], "%"),
                ("precision", 100 * score["precision"], "%"),
                ("pairs", score["pairs"], "pairs"),
                ("pairs with boilerplate", score["pairs_with_boilerplate"], "pairs (goal 0)"),
                ("pair stage", stats["pair_s"], "s"),
            ],
            min(score["recall"], score["precision"]),
            0.98,
        ))
    return results


if __name__ == "__main__":  # img2dataset spawns workers: the guard is required
    main()
