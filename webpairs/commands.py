"""Stage subcommands of the `webpairs` command line (each registrar adds one working command)."""

from __future__ import annotations

import dataclasses
import os
import time

from core import config
from core.stageio import StageError
from webpairs.common import BEAM_NOTE, print_stats, stage_parser
from webpairs.errors import UserError

DEFAULT_VAE_HELP = "vae:stabilityai/sd-vae-ft-mse"  # core/latents.py DEFAULT_VAE (not imported: torch stays unloaded for --help)


def _run_stage(fn, stage_name: str, *args, **kwargs) -> int:
    """Run a stage function, print its reconciled counts; turn known failures into one-line errors."""
    start = time.time()
    try:
        stats = fn(*args, **kwargs)
    except (StageError, config.ConfigError, FileNotFoundError) as err:
        raise UserError(str(err)) from err
    print_stats(stats, time.time() - start)
    return 0


def _load_config(cls, args, section: str):
    """The stage config: YAML file (args.config) overridden by every command-line flag the user
    gave whose name is a field of `cls` (flags default to None, so an absent flag changes nothing)."""

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return config.load(cls, args.config, section=section, **overrides)


def _input_slice_args(p) -> None:
    p.add_argument("--paths-prefix", metavar="URL", help="root for the relative paths of a *.paths(.gz) manifest (default: the manifest's own, e.g. https://data.commoncrawl.org/ or s3://commoncrawl/)")
    p.add_argument("--max-files", type=int, metavar="N", help="read at most N input files (default: all)")
    p.add_argument("--files-from", type=int, metavar="K", help="skip the first K input files of the sorted list or manifest (default 0)")


def _csv(value: str) -> list[str]:
    """A repeatable flag's value: one item or several, comma separated."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _allow_hosts_arg(p) -> None:
    p.add_argument(
        "--allow-hosts",
        metavar="HOST,IP,CIDR",
        action="extend",
        type=_csv,
        help="hosts exempt from the private-address rule of the URL policy (e.g. 127.0.0.1 for the loopback test web); repeatable; default: none",
    )


def _resolve_arg(p) -> None:
    p.add_argument("--resolve", metavar="HOST:ADDR[,...]", action="extend", type=_csv, help="pin host names to addresses, as curl's --resolve (the URL policy applies to ADDR); repeatable")


def _consent_arg(p, what: str) -> None:
    p.add_argument("--consent", choices=("on", "off"), help=f"on (default): {what}; off: ignore them, only for sites you own (one warning line per run)")


def _safety_args(p) -> None:
    g = p.add_argument_group("nsfw score (LAION's CLIP-based NSFW head on the image embedding)")
    g.add_argument("--max-nsfw", type=float, metavar="T", help="reject images whose nsfw score (0-1, 1 = NSFW) is above T, with reason nsfw (default off; needs a head: see --safety-encoder)")
    g.add_argument("--safety-encoder", metavar="NAME", help="the encoder whose embedding the head scores (default: the main encoder; LAION's heads fit open_clip:ViT-B-32 and open_clip:ViT-L-14, so with another --encoder, --safety-encoder open_clip:ViT-B-32 embeds each image a second time for the score; 'none': no score)")
    g.add_argument("--safety-encoder-weights", metavar="FILE", help="local weights file for --safety-encoder")
    g.add_argument("--safety-head", metavar="FILE|URL", help="the head, in LAION's format (a PyTorch state dict: norm.mean, norm.variance, linear_1..N); default LAION's head for the safety encoder, downloaded on first use into torch's hub cache (cache only with --offline)")


def _blocklist_args(p) -> None:
    g = p.add_argument_group("unsafe content (a match is never written to any file of the run)")
    g.add_argument("--blocklist", action="append", metavar="FILE", help="hash list: lines sha256:<hex>, md5:<hex> or pdq:<64 hex> (Meta's PDQ), # comments; a matching image is rejected as blocklisted as its bytes arrive (repeatable)")
    g.add_argument("--blocklist-pdq-distance", type=int, metavar="BITS", help="a pdq: entry matches images within this many bits (default 31)")


def register_crawl(sub, handlers) -> None:
    crawl = sub.add_parser("crawl", help="crawl stage: extract image links from WARC/WAT, download the images")
    crawl_sub = crawl.add_subparsers(dest="crawl_command", metavar="STEP", required=True)
    p = stage_parser(
        crawl_sub,
        "extract",
        "Extract one link record per <img> (src/srcset), <picture><source> and og:image from WARC/WAT files.",
        "WARC/WAT file, folder, glob or Common Crawl *.paths(.gz) manifest; local or any fsspec URL "
        "(https://data.commoncrawl.org/..., s3://commoncrawl/..., gs://...; gzip or plain)",
    )
    _allow_hosts_arg(p)
    _consent_arg(p, "a page whose X-Robots-Tag header or <meta name=robots> says noai or noimageai gives no image (page_opt_out)")
    _input_slice_args(p)
    p.set_defaults(crawl_handler=cmd_crawl_extract)

    p = crawl_sub.add_parser(
        "download",
        help="download the linked images that can make a pair, each distinct URL once, with img2dataset",
        description=(
            "Plan, then download, the links of a `crawl extract` output. The plan rejects, each with its own "
            "reason, links the URL policy refuses, links declared smaller than --min-side, non-raster sources "
            "(.svg, .ico), image URLs that are boilerplate by their link counts (on more than "
            "--boilerplate-pages pages, or on --site-share of a site's pages), links past the per-page cap and "
            "pages left with fewer than 2 candidates. img2dataset then fetches each distinct selected URL once; "
            "every link is resolved to its image (occurrences/), identical bytes are kept once (downloads/). "
            "The URL policy also applies to redirect targets. Before any image of a site, its robots.txt and "
            "/.well-known/tdmrep.json are asked once (kept in OUT/consent/, so a rerun asks again none): a URL they "
            "refuse is robots_disallowed or tdm_reserved; an image response with tdm-reservation: 1 or an "
            "X-Robots-Tag opt-out is refused on its headers, without reading the body. At most "
            "--per-host-connections connections go to one host at once, Crawl-delay is honoured, and a 429/503 "
            "Retry-After is waited for. Rerunning into the same --out resumes: finished shards are kept."
        ),
    )
    p.add_argument("input", help="a `crawl extract` output directory (or its links/ parquet files)")
    p.add_argument("--out", required=True, help="output directory: downloads/ (one row per image), occurrences/ (one per link), rejected/, stats.json, img2dataset/, _plan/")
    p.add_argument("--config", help="YAML file with `download` keys (see core/config.py DownloadConfig)")
    _allow_hosts_arg(p)
    p.add_argument("--processes", type=int, help="img2dataset processes (default 2)")
    p.add_argument("--threads", type=int, help="download threads per process (default 16)")
    p.add_argument("--timeout", type=float, help="seconds a connect or read may wait (default 10)")
    p.add_argument("--deadline", type=float, help="seconds one image may take in all, redirects included (default 30)")
    p.add_argument("--max-image-bytes", type=int, help="larger images are cut off and rejected as too_large (default 20 MiB)")
    _resolve_arg(p)
    p.add_argument("--retries", type=int, help="extra attempts per URL (default 0)")
    g = p.add_argument_group("consent and politeness")
    _consent_arg(g, "robots.txt (token webpairs, else *), TDMRep and the opt-out headers of image responses are honoured")
    g.add_argument("--contact", metavar="URL", help="named in the User-Agent, webpairs/<version> (+URL), so a site owner can learn about the crawl (default: the project's page)")
    g.add_argument("--per-host-connections", type=int, metavar="N", help="connections open at once to one host, across all download processes (default 4; 1 to a host whose robots.txt has a Crawl-delay)")
    g.add_argument("--max-retry-after", type=float, metavar="SECONDS", help="a 429/503 answer's Retry-After up to this is waited for and the image asked again (default 60; 0: never)")
    g.add_argument("--retry-failed", action="store_true", help="on a finished download in --out: fetch again only the links that failed for a transient reason (timeout, 5xx, 429, connection error), keep everything else, write a complete new output")
    p.add_argument("--resize-mode", help="img2dataset resize mode; default 'no' keeps the original bytes for filter")
    p.add_argument("--image-size", type=int, help="target side when resizing (default 512)")
    p.add_argument("--samples-per-shard", type=int, help="images per img2dataset shard, the unit of resume (default 1000)")
    p.add_argument("--distributor", help="multiprocessing (default), ray or pyspark")
    g = p.add_argument_group("which links are worth a fetch (each rule is its own reason in rejected/)")
    g.add_argument("--min-side", type=int, help="reject links whose declared width or height is under this (default 64, as filter's; 0: off)")
    g.add_argument("--skip-extensions", metavar="EXT,...", help="non-raster sources never fetched (default svg,svgz,ico; '' for none)")
    g.add_argument("--no-url-boilerplate", dest="url_boilerplate", action="store_false", default=None, help="fetch image URLs that repeat across pages (default: reject them as boilerplate_url_site/global)")
    g.add_argument("--boilerplate-pages", type=int, help="an image URL on more than this many pages is boilerplate_url_global (default 10)")
    g.add_argument("--site-share", type=float, help="... or on at least this share of its site's pages (default 0.5) ...")
    g.add_argument("--site-min-pages", type=int, help="... and at least this many of them: boilerplate_url_site (default 3)")
    g.add_argument("--no-boilerplate-evidence", dest="boilerplate_evidence", action="store_false", default=None, help="never fetch a flagged URL (default: once, so pair's content rule sees the logo in its other sizes)")
    g.add_argument("--max-links-per-page", type=int, help="fetch the first N candidate links of a page by position (default 64; 0: no cap)")
    g.add_argument("--min-links-per-page", type=int, help="pages left with fewer candidates cannot make a pair: page_too_few_links (default 2)")
    g.add_argument("--plan-memory", help="memory limit of the plan's DuckDB, which spills to disk beyond it; it also sets DuckDB's threads, one per 64MB of it, at most one per usable core (default 64MB: one thread, bounded on any machine; give a cluster node more, e.g. 1GB for 15 threads, to spill less and run faster)")
    _blocklist_args(p)
    p.set_defaults(crawl_handler=cmd_crawl_download)

    def dispatch(args, beam_args):
        return args.crawl_handler(args, beam_args)

    dispatch.accepts_beam_args = True
    handlers["crawl"] = dispatch


def cmd_crawl_extract(args, beam_args) -> int:
    from crawl.extract import run_extract

    cfg = _load_config(config.CrawlConfig, args, "crawl")
    return _run_stage(run_extract, "crawl extract", args.input, args.out, cfg, beam_args)


def cmd_crawl_download(args, beam_args) -> int:
    if beam_args:
        raise UserError(f"unrecognized arguments: {' '.join(beam_args)} (download runs img2dataset, not Beam)")
    from crawl.download import run_download

    cfg = _load_config(config.DownloadConfig, args, "download")
    return _run_stage(run_download, "crawl download", args.input, args.out, cfg, retry_failed=args.retry_failed)


def register_filter(sub, handlers) -> None:
    p = stage_parser(
        sub,
        "filter",
        "Validate, hash (sha256 + pHash), embed (frozen encoder via RunInference) and score every downloaded image.",
        "a `crawl download` output directory (or its downloads/ parquet files)",
    )
    p.add_argument("--encoder", help="encoder name (default open_clip:ViT-B-32, downloaded on first use unless --offline; efficientnet-lite0 works offline; 'none' skips embedding). See `webpairs encoders`")
    p.add_argument("--encoder-weights", metavar="FILE", help="local weights file for the encoder")
    p.add_argument("--batch-size", type=int, help="RunInference batch size (default 32)")
    p.add_argument("--min-side", type=int, help="reject images whose short side is smaller (default 64)")
    p.add_argument("--max-aspect", type=float, help="reject long/short side ratios above this (default 3.0)")
    p.add_argument("--min-clip-score", type=float, help="reject images whose alt-text CLIP score is lower (default off; LAION used 0.28)")
    p.add_argument("--flat-share", type=float, help="reject as flat_image (logo-, icon-like) when the 8 most frequent colours cover this share of the pixels (default 0.8; --flat-colours 0 turns it off)")
    p.add_argument("--flat-colours", type=int, help="how many colours --flat-share counts (default 8; 0: rule off)")
    p.add_argument("--faces", choices=("detect", "blur", "off"), help="faces in kept images (OpenCV's bundled Haar cascade): detect stores each image's face count and boxes (default), blur also blurs them in the stored image (so in the shards, as DataComp does), off skips it")
    p.add_argument("--reject-url-words", action="store_true", default=None, help="reject images whose URL path names logo, icon, sprite, avatar, badge or button (off by default; stats count them either way)")
    _safety_args(p)
    handlers["filter"] = cmd_filter
    cmd_filter.accepts_beam_args = True


def cmd_filter(args, beam_args) -> int:
    from filter.pipeline import run_filter

    cfg = _load_config(config.FilterConfig, args, "filter")
    return _run_stage(run_filter, "filter", args.input, args.out, cfg, beam_args)


def register_pair(sub, handlers) -> None:
    p = stage_parser(
        sub,
        "pair",
        "Group images by page, drop boilerplate (content or URL on a large share of its site's pages, or on more than K pages anywhere), collapse near-duplicates, pick (condition, target) pairs whose similarity lies in a band.",
        "a `filter` output directory (or its images/ parquet files)",
    )
    p.add_argument("--boilerplate-pages", type=int, help="content or an image URL on more than this many pages anywhere is boilerplate_global (default 10)")
    p.add_argument("--site-share", type=float, help="content or an image URL on at least this share of its site's pages ... (default 0.5)")
    p.add_argument("--site-min-pages", type=int, help="... and on at least this many of them is boilerplate_site (default 3)")
    p.add_argument("--sim-low", type=float, help="lower end of the similarity band (default 0.2)")
    p.add_argument("--sim-high", type=float, help="upper end of the similarity band (default 0.95)")
    p.add_argument("--max-pairs-per-page", type=int, help="pairs sampled per page (default 16)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--no-copies", dest="copies", action="store_false", default=None, help="skip the copy step (the same photo in other dresses across pages and sites is kept once; on by default)")
    p.add_argument("--copy-min-inliers", type=int, help="matches agreeing on one similarity transform for a copy (default 20)")
    p.add_argument("--copy-max-candidates", type=int, help="candidate partners each image proposes for verification; an image takes part in at most twice that many checks (default 10)")
    handlers["pair"] = cmd_pair
    cmd_pair.accepts_beam_args = True

    p = stage_parser(
        sub,
        "shards",
        "Write webdataset pair shards ({key}.cond.jpg, {key}.target.jpg, {key}.cond.npy, {key}.json), a parquet index and manifest.json.",
        "a `pair` output directory (pairs/ and images/ parquet)",
    )
    p.add_argument("--samples-per-shard", type=int, help="target samples per shard (default 1000)")
    p.add_argument("--max-shard-bytes", type=int, help="byte limit per shard file, a bound of its size on disk; a sample larger than a whole shard is rejected (default 256 MiB)")
    p.add_argument("--no-embedding", dest="store_embedding", action="store_false", default=None, help="do not store the condition embedding ({key}.cond.npy)")
    handlers["shards"] = cmd_shards
    cmd_shards.accepts_beam_args = True


def cmd_pair(args, beam_args) -> int:
    from pairing.pipeline import run_pair

    cfg = _load_config(config.PairConfig, args, "pair")
    if cfg.sim_low > cfg.sim_high:
            raise UserError(f"pair: empty similarity band [{cfg.sim_low}, {cfg.sim_high}]")
    return _run_stage(run_pair, "pair", args.input, args.out, cfg, beam_args)


def cmd_shards(args, beam_args) -> int:
    from shards.writer import run_shards

    cfg = _load_config(config.ShardConfig, args, "shards")
    return _run_stage(run_shards, "shards", args.input, args.out, cfg, beam_args)


def register_stats(sub, handlers) -> None:
    p = sub.add_parser(
        "stats",
        help="pair statistics of a run or stage directory (text, and an HTML report with plots)",
        description="Print counts per stage and per reject reason, images and pairs per page, the similarity distribution, image sizes and top domains. Reads only stage outputs (stats.json, parquet, manifest.json, shards).",
    )
    p.add_argument("input", help="a stage directory or a run directory holding several")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report with plots and example pairs")
    handlers["stats"] = cmd_stats


def cmd_stats(args, _beam_args) -> int:
    from browse.report import write_report
    try:
        print(write_report(args.input, args.html))
    except FileNotFoundError as err:
        raise UserError(str(err)) from err
    if args.html:
        print(f"HTML report: {args.html}")
    return 0


def register_browse(sub, handlers) -> None:
    p = sub.add_parser(
        "browse",
        help="a local web app over a run: pairs (by site, page, similarity, random sample), rejects by reason, sites",
        description="Serve a read-only web app on 127.0.0.1 over a run directory: pages of pairs (condition, target, similarity, page, site, alt texts) filtered by site, page and similarity range, in random or similarity order; the rejects of every stage by reason, with the image where the stage had one; a per-site table. Queries are DuckDB over the run's parquet; images are read from the shard tars by offset. Stop with Ctrl-C.",
    )
    p.add_argument("input", help="a run directory (with a complete shards output) or a shards directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    handlers["browse"] = cmd_browse


def cmd_browse(args, _beam_args) -> int:
    from browse.data import BrowseError
    from browse.server import BrowseServer

    if not os.path.isdir(args.input):
        raise UserError(f"{args.input} is not a directory")
    try:
        server = BrowseServer(args.input, args.host, args.port)
    except BrowseError as err:
        raise UserError(str(err)) from err
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); pick another --port") from err
    s = server.data.summary()
    print(f"webpairs browse: {s['pairs']:,} pairs on {s['pages']:,} pages of {s['sites']:,} sites, {s['rejects']:,} rejects")
    print(f"open {server.url}  (Ctrl-C stops; read-only)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


def register_run(sub, handlers) -> None:
    p = sub.add_parser(
        "run",
        help="the main job: extract -> download -> filter -> pair -> shards -> stats -> train -> sample, resumable",
        description="Run every stage on WARC/WAT input, each into its own sub-directory of --out; stages already complete (_SUCCESS) are skipped, so a rerun after a kill continues (training from its last checkpoint). Writes OUT/report.html after the shards, then trains (Ray Train) and samples grids.\n\n" + BEAM_NOTE,
    )
    p.add_argument("input", help="WARC/WAT file, folder or glob (local or fsspec URL)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML with sections crawl, download, filter, pair, shards")
    _allow_hosts_arg(p)
    _resolve_arg(p)
    _consent_arg(p, "pages' noai/noimageai opt-outs, robots.txt, TDMRep and image opt-out headers are honoured")
    _input_slice_args(p)
    p.add_argument("--encoder", help="filter encoder (default open_clip:ViT-B-32, downloaded on first use; efficientnet-lite0 works offline)")
    p.add_argument("--encoder-weights", metavar="FILE", help="local weights for the encoder")
    _model_flags(p)
    p.add_argument("--ray-address", help="train on an existing Ray cluster (default: a local ray.init())")
    _blocklist_args(p)
    _safety_args(p)
    handlers["run"] = cmd_run
    cmd_run.accepts_beam_args = True

    p = sub.add_parser(
        "demo",
        help="the main job on a loopback test web that webpairs serves itself (works offline)",
        description="Serve the loopback test web on 127.0.0.1 (generated images, or --photos), then run the main job on it with the offline efficientnet-lite0 encoder. A rerun reuses the port and skips finished stages.\n\n" + BEAM_NOTE,
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--photos", help="folder of real photos, e.g. ../shared/data/photos-imagenet-sample (default: generated images)")
    p.add_argument("--config", help="YAML with sections crawl, download, filter, pair, shards, train, sample")
    p.add_argument("--pages", type=int, default=12, help="pages of the test web (default 12)")
    p.add_argument("--topics", type=int, default=6, help="photo topics of the test web (default 6)")
    _model_flags(p)
    handlers["demo"] = cmd_demo
    cmd_demo.accepts_beam_args = True


def _model_flags(p) -> None:
    p.add_argument("--steps", type=int, help="training steps (default: the train section, else 200; demo 300)")
    p.add_argument("--preset", help="model size: tiny, small, base, large (default tiny)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    p.add_argument("--no-train", dest="model", action="store_false", help="stop after the shards and the report")
    p.add_argument("--overwrite", action="store_true", help="write into an --out that holds files this project did not make (default: refuse)")


def _train_flags(args) -> dict:
    return {k: v for k, v in (("steps", args.steps), ("preset", args.preset), ("workers", args.workers)) if v is not None}


def _print_run_end(out: str, done: dict) -> None:
    print(f"\nrun directory: {out}")
    print(f"pair shards:   {os.path.join(out, 'shards')}")
    print(f"HTML report:   {os.path.join(out, 'report.html')}")
    if "train" in done:
        print(f"checkpoint:    {done['train']['checkpoint']} (step {done['train']['step']})")
        print(f"EMA grids:     {os.path.join(out, 'train', 'samples')}")
    for kind, sheet in done.get("sample", {}).items():
        print(f"{kind + ':':14s} {sheet}")


def cmd_run(args, beam_args) -> int:
    from webpairs.run import RunConfig, run_pipeline

    try:
        crawl = {k: getattr(args, k) for k in ("paths_prefix", "max_files", "files_from") if getattr(args, k) is not None}
        if args.consent is not None:
            crawl["consent"] = args.consent
        download = {k: v for k, v in (("resolve", args.resolve), ("consent", args.consent)) if v is not None}
        download.update({k: getattr(args, k) for k in ("blocklist", "blocklist_pdq_distance") if getattr(args, k) is not None})
        safety = {k: getattr(args, k) for k in ("max_nsfw", "safety_encoder", "safety_encoder_weights", "safety_head") if getattr(args, k) is not None}
        cfg = RunConfig.load(args.config, allow_hosts=args.allow_hosts, crawl_overrides=crawl, download_overrides=download, encoder=args.encoder, encoder_weights=args.encoder_weights, **safety)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **_train_flags(args)))
        done = run_pipeline(args.input, args.out, cfg, beam_args, model=args.model, ray_address=args.ray_address, overwrite=args.overwrite)
    except (StageError, config.ConfigError) as err:
        raise UserError(str(err)) from err
    _print_run_end(args.out, done)
    return 0


def cmd_demo(args, beam_args) -> int:
    from webpairs.run import demo

    if args.photos and not os.path.isdir(args.photos):
        raise UserError(f"--photos {args.photos} is not a folder")
    try:
        done = demo(args.out, args.photos, beam_args, args.config, args.pages, args.topics, args.model, _train_flags(args), overwrite=args.overwrite)
    except (StageError, config.ConfigError) as err:
        raise UserError(str(err)) from err
    _print_run_end(args.out, done)
    return 0


def register_train(sub, handlers) -> None:
    p = sub.add_parser(
        "train",
        help="train the image-conditioned diffusion model on pair shards with Ray Train (DDP)",
        description=(
            "Train the Semantica-style diffusion model: it denoises the target image given the frozen embedding of the "
            "condition image (stored in the shards, or computed with --encoder). Runs a Ray TorchTrainer (an embedded "
            "ray.init() unless --ray-address). Checkpoints (safetensors + optimizer) go to RUN_DIR/train; rerunning with "
            "the same --out resumes from the latest one. Logs: RUN_DIR/metrics.jsonl and RUN_DIR/tensorboard."
        ),
    )
    p.add_argument("input", help="a `webpairs shards` output directory (or a glob of .tar shards)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs)")
    p.add_argument("--config", help="YAML with `train` keys (see train/train.py TrainConfig)")
    p.add_argument("--workers", type=int, help="Ray Train workers / DDP ranks (default 2)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per Ray worker (refused when the cluster has fewer), bf16 autocast, TF32, pinned-memory loader")
    p.add_argument("--ray-address", help="address of an existing Ray cluster (default: start a local one)")
    p.add_argument("--steps", type=int, help="total optimizer steps (default 200)")
    p.add_argument("--preset", help="model size: unet tiny (CPU tests), small, base (64 px), large (128 px), base256, large512; dit tiny, S, B, L, XL (256 px, patch 2)")
    p.add_argument("--backbone", choices=["unet", "dit"], help="unet (diffusers UNet2DConditionModel, default) or dit (diffusers PixArt transformer: cross-attention on the condition tokens)")
    p.add_argument("--image-size", type=int, help="resolution in pixels (default: the preset's)")
    p.add_argument("--latent", metavar="vae:ID", help=f"train in a diffusers AutoencoderKL's latent space: vae:<hub id or save_pretrained folder>, downloaded on first use (cache only with --offline); 'none' = pixels. Default: {DEFAULT_VAE_HELP} at 256 px and above, pixels below")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="autocast: auto = bf16 on a GPU, fp32 on CPU (default auto)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (minutes of compilation, then faster steps)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (DDP syncs once per step; default 1)")
    p.add_argument("--loader-workers", type=int, help="DataLoader processes per worker (default 1)")
    p.add_argument("--batch-size", type=int, help="per worker (default 8)")
    p.add_argument("--pairing", choices=["same-page", "self"], help="condition on the paired image (default) or on the target itself")
    p.add_argument("--encoder", help="compute conditions with this encoder instead of the stored embeddings")
    handlers["train"] = cmd_train


def cmd_train(args, _beam_args) -> int:
    from core.latents import LatentUnavailable
    from train.train import TrainConfig, run_training
    try:
        cfg = _load_config(TrainConfig, args, "train")
    except config.ConfigError as err:
        raise UserError(str(err)) from err
    try:
        out = run_training(args.input, args.out, cfg, args.ray_address)
    except (FileNotFoundError, ValueError, LatentUnavailable) as err:
        raise UserError(str(err)) from err
    print(f"trained to step {out['step']} (loss {out['loss']:.4f}); checkpoint: {out['checkpoint']}")
    return 0


def register_latents(sub, handlers) -> None:
    p = sub.add_parser(
        "latents",
        help="store each target's VAE latent in the shards, so training never runs the VAE encoder",
        description=(
            "Copy a `webpairs shards` output into --out with every sample's target encoded by a diffusers AutoencoderKL: "
            "{key}.latent.npy (posterior mean of the centre crop at --image-size, float16) and {key}.latent.json (VAE, "
            "scale factor, size); a new index and manifest.json (its `latent` entry). `webpairs train --latent` with the "
            "same VAE and size then reads the latents instead of encoding every step."
        ),
    )
    p.add_argument("input", help="a `webpairs shards` output directory")
    p.add_argument("--out", required=True, help="the shards with latents (a new folder)")
    p.add_argument("--latent", default=DEFAULT_VAE_HELP, metavar="vae:ID", help=f"vae:<hub id or save_pretrained folder> (default {DEFAULT_VAE_HELP}; downloaded on first use, cache only with --offline)")
    p.add_argument("--image-size", type=int, default=256, help="the training resolution in pixels (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="images per VAE call (default 16)")
    p.add_argument("--device", default="cpu", help="torch device for the VAE, e.g. cuda (default cpu)")
    handlers["latents"] = cmd_latents


def cmd_latents(args, _beam_args) -> int:
    from core.latents import LatentUnavailable
    from shards.latents import run_latents

    if args.image_size < 8 or args.batch_size < 1:
        raise UserError("--image-size must be at least 8 and --batch-size at least 1")
    return _run_stage(_latents_or_user_error, "latents", run_latents, LatentUnavailable, args)


def _latents_or_user_error(run_latents, unavailable, args) -> dict:
    try:
        return run_latents(args.input, args.out, args.latent, args.image_size, args.batch_size, args.device)
    except (unavailable, ValueError) as err:
        raise UserError(str(err)) from err


def _register_sampling(sub, handlers) -> None:
    from webpairs.sample_cmds import register_sample

    register_sample(sub, handlers)


def register_scrub(sub, handlers) -> None:
    p = sub.add_parser(
        "scrub",
        help="remove images from a finished run (a hash blocklist or a list of image URLs): every stage's rows, the shards, index, manifest and report",
        description=(
            "Take images out of a finished run directory after a take-down request or a new hash list: the images whose bytes match "
            "--blocklist (sha256/md5 of the bytes, PDQ within --blocklist-pdq-distance bits: filter stores every kept image's PDQ) or "
            "that a URL of --urls served, with every link to them. Their links become `scrubbed` rejects of extract and leave every "
            "later stage (rows, bytes, img2dataset's shards, pairs, shard tars, index, manifest; stats recounted); the report is "
            "written again. Prints what it removed. A model trained on the run is not changed."
        ),
    )
    p.add_argument("run", help="a run directory (links/, download/, filter/, pair/, shards/)")
    p.add_argument("--blocklist", action="append", metavar="FILE", help="hash list (sha256:, md5:, pdq: lines, as crawl download --blocklist); repeatable")
    p.add_argument("--blocklist-pdq-distance", type=int, default=31, metavar="BITS", help="a pdq: entry matches images within this many bits (default 31)")
    p.add_argument("--urls", action="append", metavar="FILE", help="image URLs to remove, one a line (# comments); repeatable")
    handlers["scrub"] = cmd_scrub


def cmd_scrub(args, _beam_args) -> int:
    from crawl.blocklist import load_lists
    from webpairs.scrub import find_matches, read_url_list, scrub_run

    if not (args.blocklist or args.urls):
        raise UserError("give --blocklist FILE or --urls FILE (what to remove)")
    if not os.path.isdir(args.run):
        raise UserError(f"{args.run} is not a run directory")
    if not 0 <= args.blocklist_pdq_distance <= 63:
        raise UserError(f"--blocklist-pdq-distance {args.blocklist_pdq_distance} is out of range (0 to 63)")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="webpairs-blocklist-") as tmp:
        try:
            index = load_lists(args.blocklist, args.blocklist_pdq_distance, tmp) if args.blocklist else None
            urls = {}
            for path in args.urls or ():
                urls.update(read_url_list(path))
            images, matched_urls = find_matches(args.run, index, urls)
            for image, why in sorted(images.items()):
                print(f"image {image}: {why}")
            removed = scrub_run(args.run, images, matched_urls)
        except (StageError, config.ConfigError) as err:
            raise UserError(str(err)) from err
    parts = [f"{removed['images']} images, {removed['links']} links"]
    for stage in ("extract", "download", "filter", "pair", "shards"):
        if stage in removed:
            value = removed[stage]
            parts.append(f"{stage}: " + (", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else f"{value} links"))
    print("scrubbed " + "; ".join(parts))
    if os.path.isdir(os.path.join(args.run, "train")):
        print(f"note: the model in {os.path.join(args.run, 'train')} was trained on the removed images; train it again to forget them")
    return 0


REGISTRARS = [register_crawl, register_filter, register_pair, register_stats, register_browse, register_run, register_train, register_latents, _register_sampling, register_scrub]
