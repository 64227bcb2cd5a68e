"""`webpairs scrub RUN --blocklist FILE | --urls FILE`: take images out of a finished run.

A take-down request or a newly listed hash arrives after the run is made. Scrub finds the images
(by the bytes download kept: sha256 and md5 of the bytes, and PDQ, stored by filter for every kept
image and computed from the bytes for the others; or by an image URL), and every link to them
(every URL that served the same bytes), then rewrites each stage of the run:

* extract (`links/`): the links leave the kept rows and become rejected rows with reason
  `scrubbed` (the detail names the list entry or URL): that is the one place they are counted;
* every later stage forgets them, as if extract had rejected them: their rows leave the kept
  tables (download's `downloads/` with the bytes, `occurrences/`, its `_plan/` tables and
  img2dataset's shards; filter's `images/` (pointers to download's bytes; a blurred image's
  own bytes), `occurrences/`; pair's `images/` and
  every pair with one of them; the shard tars, the index and the manifest) and their rejected
  rows, and each `stats.json` is recounted (input, kept, rejected by reason, extra counts);
* an image left without a pair on its page because its partners were scrubbed leaves pair's kept
  rows as rejected `scrubbed` too (its pairs are gone), so pair still reconciles;
* the shard tars that held a removed sample are rewritten (members copied in order; the index gets
  the new byte offsets, the manifest the new sizes and sha256), empty shards are deleted;
* the HTML report is written again.

Parquet files are rewritten row group by row group (an emptied row group stays, empty), so the
(file, row group) pointers that filter's images hold into download's `downloads/` (rewritten with
download's own parquet settings) and that pair rows and pair images hold into filter's `images/`
stay valid; filter and pair then record the rewritten outputs they point into (`made_from`).
Each stage is rewritten in a sibling folder (hard links for untouched files), marked complete
(`_SUCCESS` after the counts reconcile) and swapped in; a rerun finds nothing more to remove.
A model trained on the run has seen the images: scrub says so and leaves `train/` alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.records import REJECTED_SCHEMA, download_parquet_options, stable_id
from core.stageio import MADE_FROM, STATS_FILE, StageError, finish_stage, is_complete, read_success

REASON = "scrubbed"
DIRS = {"extract": "links", "download": "download", "filter": "filter", "pair": "pair", "shards": "shards"}


def _parquets(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.join(root, n) for n in names if n.endswith(".parquet") and not n.startswith(".")]
    return sorted(out)


def _read(folder: str, columns: Optional[list] = None) -> pa.Table:
    files = _parquets(folder)
    tables = []
    for f in files:
        pf = pq.ParquetFile(f)
        cols = [c for c in (columns or pf.schema_arrow.names) if c in pf.schema_arrow.names]
        tables.append(pf.read(columns=cols))
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({c: pa.array([], pa.string()) for c in (columns or [])})


def _col(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else []


# ---------------------------------------------------------------- what to remove


def read_url_list(path: str) -> dict[str, str]:
    try:
        with open(path) as fh:
            lines = [line.split("#", 1)[0].strip() for line in fh]
    except OSError as err:
        raise StageError(f"cannot read --urls {path}: {err.strerror}") from None
    return {u: f"url in {path}" for u in lines if u}


def find_matches(run: str, index=None, urls: Optional[dict] = None) -> tuple[dict, dict]:
    """({image_id: why}, {image_url: why}) of what to remove: the images whose bytes match the
    blocklist index (exact digests; PDQ from filter's stored hash, else from the bytes) or that a
    listed URL served, and every URL that served one of them."""
    from core.perceptual import pdq_of_bytes

    urls = dict(urls or {})
    download = os.path.join(run, DIRS["download"])
    occ = _read(os.path.join(download, "occurrences"), ["image_url", "image_id"])
    images: dict[str, str] = {}
    for url, image in zip(_col(occ, "image_url"), _col(occ, "image_id")):
        if url in urls and image:
            images.setdefault(image, urls[url])
    if index is not None:
        stored = {}
        for f in _parquets(os.path.join(run, DIRS["filter"], "images")):
            t = pq.read_table(f, columns=["image_id", "pdq"]) if "pdq" in pq.ParquetFile(f).schema_arrow.names else None
            if t is not None:
                stored.update((i, p) for i, p in zip(_col(t, "image_id"), _col(t, "pdq")) if p)
        for f in _parquets(os.path.join(download, "downloads")):
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=["image_id", "sha256", "image_bytes"])
                for image, sha, data in zip(_col(t, "image_id"), _col(t, "sha256"), _col(t, "image_bytes")):
                    hit = index.lookup_exact("sha256", bytes.fromhex(sha)) if sha else None
                    if not hit and data is not None:
                        hit = index.lookup_exact("md5", hashlib.md5(data).digest())
                    if not hit and index.has_pdq:
                        pdq = bytes.fromhex(stored[image]) if image in stored else (pdq_of_bytes(data) or (None,))[0] if data else None
                        found = index.lookup_pdq(pdq) if pdq else None
                        hit = f"{found[0]}, distance {found[1]}" if found else None
                    if hit:
                        images.setdefault(image, hit)
    for url, image in zip(_col(occ, "image_url"), _col(occ, "image_id")):
        if image in images:
            urls.setdefault(url, images[image])
    return images, urls


# ---------------------------------------------------------------- rewriting a stage


class StageRewrite:
    """A copy of a complete stage folder (hard links) to rewrite, then check, mark and swap in."""

    def __init__(self, stage_dir: str, stage: str):
        if not is_complete(stage_dir):
            raise StageError(f"scrub: {stage_dir} is not a complete `{stage}` output")
        self.final, self.stage = stage_dir.rstrip("/"), stage
        parent, name = os.path.split(self.final)
        self.path = os.path.join(parent, f".{name}.scrub")
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.copytree(self.final, self.path, copy_function=os.link)
        with open(os.path.join(self.path, STATS_FILE)) as fh:
            self.stats = json.load(fh)
        self.new_rejected: list[dict] = []

    def rewrite(self, part: str, drop: Callable[[pa.Table], pa.Array], columns: Optional[list] = None) -> pa.Table:
        """Drop rows (mask from `drop`) from every parquet file under `part`, row group by row
        group; returns the dropped rows (their `columns`)."""
        dropped = []
        for f in _parquets(os.path.join(self.path, part)):
            pf = pq.ParquetFile(f)
            groups = [pf.read_row_group(g) for g in range(pf.num_row_groups)]
            masks = [drop(t) if t.num_rows else pa.array([], pa.bool_()) for t in groups]
            if not any(pc.any(m).as_py() for m in masks if len(m)):
                continue
            tmp = f + ".scrub-tmp"
            # download's downloads/ as download writes them (every image's bytes are read from there)
            options = download_parquet_options(pf.schema_arrow.names) if part == "downloads" and self.stage == "download" else {}
            with pq.ParquetWriter(tmp, pf.schema_arrow, **options) as writer:
                for t, m in zip(groups, masks):
                    if t.num_rows:
                        gone = t.filter(m)
                        dropped.append(gone.select([c for c in (columns or gone.column_names) if c in gone.column_names]))
                        t = t.filter(pc.invert(m))
                    writer.write_table(t, row_group_size=max(t.num_rows, 1))
            os.replace(tmp, f)
        return pa.concat_tables(dropped, promote_options="default") if dropped else pa.table({})

    def drop_rejected(self, links: set) -> None:
        """Remove rejected rows of these records; their reasons' counts go down."""
        gone = self.rewrite("rejected", lambda t: pc.is_in(t.column("record_id"), pa.array(sorted(links), pa.string())), ["reason"])
        for reason in _col(gone, "reason"):
            self.stats["rejected"][reason] -= 1
            if not self.stats["rejected"][reason]:
                del self.stats["rejected"][reason]

    def add_rejected(self, rows: list[dict]) -> None:
        self.new_rejected += rows
        if rows:
            self.stats["rejected"][REASON] = self.stats["rejected"].get(REASON, 0) + len(rows)

    def commit(self) -> dict:
        if self.new_rejected:
            os.makedirs(os.path.join(self.path, "rejected"), exist_ok=True)
            n = len([f for f in os.listdir(os.path.join(self.path, "rejected")) if f.startswith("scrubbed-")])
            pq.write_table(pa.Table.from_pylist(self.new_rejected, schema=REJECTED_SCHEMA), os.path.join(self.path, "rejected", f"scrubbed-{n:05d}.parquet"))
        with open(os.path.join(self.path, STATS_FILE), "w") as fh:
            json.dump(self.stats, fh, indent=2, sort_keys=True)
        os.remove(os.path.join(self.path, "_SUCCESS"))
        stats = finish_stage(self.path, self.stage)
        old = self.path[: -len(".scrub")] + ".old"
        os.rename(self.final, old)
        os.rename(self.path, self.final)
        shutil.rmtree(old)
        return stats


def _isin(column: str, values) -> Callable[[pa.Table], pa.Array]:
    values = pa.array(sorted(v for v in values if v is not None), pa.string())
    return lambda t: pc.fill_null(pc.is_in(t.column(column), values), False)


def _either(*masks) -> Callable[[pa.Table], pa.Array]:
    def mask(t):
        out = masks[0](t)
        for m in masks[1:]:
            out = pc.or_(out, m(t))
        return out
    return mask


# ---------------------------------------------------------------- the stages


def _restamp(rewrite: "StageRewrite", upstream: str) -> None:
    """The stage being rewritten points into `upstream` (filter into download, pair into filter),
    which scrub has just rewritten in place, row groups kept: its record of that input (MADE_FROM)
    takes the new output's id, so that it is not taken for one made from an older input."""
    stamp = rewrite.stats.get(MADE_FROM)
    if isinstance(stamp, dict) and stamp.get("id") and os.path.isdir(upstream):
        stamp["id"] = read_success(upstream).get("id")


def scrub_run(run: str, images: dict, urls: dict, report: bool = True) -> dict:
    """Remove the images (ids) and URLs from every stage of `run`; returns what was removed."""
    d = {s: os.path.join(run, name) for s, name in DIRS.items()}
    present = [s for s in DIRS if os.path.isdir(d[s])]
    if not present:
        raise StageError(f"scrub: {run} holds no stage output (links/, download/, filter/, pair/, shards/)")
    removed: dict = {"images": len(images), "urls": len(urls)}
    why = lambda url, image=None: images.get(image) or urls.get(url) or REASON  # noqa: E731
    links: set = set()
    if "download" in present:
        occ = _read(os.path.join(d["download"], "occurrences"), ["link_id", "image_url", "image_id"])
        links |= {l for l, u, i in zip(_col(occ, "link_id"), _col(occ, "image_url"), _col(occ, "image_id")) if u in urls or i in images}
    if "extract" in present:
        ext = StageRewrite(d["extract"], "extract")
        gone = ext.rewrite("links", _isin("image_url", urls), ["link_id", "image_url"])
        links |= set(_col(gone, "link_id"))
        ext.stats["kept"] -= gone.num_rows
        ext.add_rejected([{"record_id": l, "stage": "extract", "reason": REASON, "detail": why(u)[:500], "url": u} for l, u in zip(_col(gone, "link_id"), _col(gone, "image_url"))])
        removed["extract"] = gone.num_rows
        extract_kept_removed = gone.num_rows
        ext.commit()
    else:
        extract_kept_removed = None
    link_mask = _isin("link_id", links)
    if "download" in present:
        dl = StageRewrite(d["download"], "download")
        gone = dl.rewrite("occurrences", link_mask, ["reason"])
        kept_links_removed = sum(r is None for r in _col(gone, "reason"))
        before = sum(dl.stats["rejected"].values())
        dl.drop_rejected(links)
        dl.stats["input"] -= extract_kept_removed if extract_kept_removed is not None else kept_links_removed + before - sum(dl.stats["rejected"].values())
        if dl.stats["input"] != dl.stats["kept"] - kept_links_removed + sum(dl.stats["rejected"].values()):
            raise StageError(f"scrub: download's rows of the removed links do not match extract's ({extract_kept_removed}); the run's stages disagree")
        dl.stats["kept"] -= kept_links_removed
        gone_images = dl.rewrite("downloads", _isin("image_id", images), ["image_id"])
        dl.stats["images"] = dl.stats.get("images", 0) - gone_images.num_rows
        results = dl.rewrite("_plan/results", _either(_isin("image_url", urls), _isin("image_id", images)), ["image_id", "image_url"])
        dl.stats["urls_downloaded"] = dl.stats.get("urls_downloaded", 0) - sum(i is not None for i in _col(results, "image_id"))
        plan_file = os.path.join(dl.path, "_plan", "plan.parquet")
        if os.path.exists(plan_file) and "urls" in dl.stats:  # the funnel's URL counts
            plan = pq.read_table(plan_file, columns=["image_url", "reason"])
            gone_plan = [(u, r) for u, r in zip(_col(plan, "image_url"), _col(plan, "reason")) if u in urls]
            dl.stats["urls"] -= len({u for u, _ in gone_plan})
            dl.stats["urls_selected"] -= len({u for u, r in gone_plan if r is None})
        dl.rewrite("", _any_mask(urls, links, images))  # the rest: _plan/, img2dataset's shards (each round)
        removed["download"] = {"links": kept_links_removed, "images": gone_images.num_rows}
        dl.commit()
        filter_input_removed = kept_links_removed
    if "filter" in present:
        fi = StageRewrite(d["filter"], "filter")
        gone_occ = fi.rewrite("occurrences", link_mask, ["link_id"])
        before = sum(fi.stats["rejected"].values())
        fi.drop_rejected(links)
        rejected_removed = before - sum(fi.stats["rejected"].values())
        fi.stats["input"] -= filter_input_removed
        fi.stats["kept"] -= filter_input_removed - rejected_removed
        gone_images = fi.rewrite("images", _isin("image_id", images), ["image_id"])
        fi.stats["images_kept"] = fi.stats.get("images_kept", 0) - gone_images.num_rows
        if "images" in fi.stats:
            fi.stats["images"] -= removed.get("download", {}).get("images", 0)
        removed["filter"] = {"links": filter_input_removed - rejected_removed, "images": gone_images.num_rows}
        pair_input_removed = filter_input_removed - rejected_removed
        _restamp(fi, d["download"])
        fi.commit()
    pairs_removed: set = set()
    if "pair" in present:
        pa_ = StageRewrite(d["pair"], "pair")
        gone_pairs = pa_.rewrite("pairs", _either(_isin("cond_image_id", images), _isin("target_image_id", images)), ["pair_id"])
        pairs_removed = set(_col(gone_pairs, "pair_id"))
        pa_.stats["pairs"] = pa_.stats.get("pairs", 0) - len(pairs_removed)
        remaining = _read(os.path.join(pa_.path, "pairs"), ["page_url", "cond_image_id", "target_image_id"])
        paired = set(zip(_col(remaining, "page_url"), _col(remaining, "cond_image_id"))) | set(zip(_col(remaining, "page_url"), _col(remaining, "target_image_id")))
        gone_imgs = pa_.rewrite("images", lambda t: pa.array([i in images or (p, i) not in paired for p, i in zip(_col(t, "page_url"), _col(t, "image_id"))], pa.bool_()), ["image_id", "page_url", "image_url"])
        own = sum(i in images for i in _col(gone_imgs, "image_id"))
        partners = [(p, u) for i, p, u in zip(_col(gone_imgs, "image_id"), _col(gone_imgs, "page_url"), _col(gone_imgs, "image_url")) if i not in images]
        pa_.stats["kept"] -= own + len(partners)
        before = sum(pa_.stats["rejected"].values())
        pa_.drop_rejected(links)
        rejected_removed = before - sum(pa_.stats["rejected"].values())
        pa_.add_rejected([{"record_id": stable_id(p, u), "stage": "pair", "reason": REASON, "detail": "every pair of this image on its page was with a scrubbed image", "url": u} for p, u in partners])
        pa_.stats["input"] -= pair_input_removed
        if own + rejected_removed != pair_input_removed:
            raise StageError(f"scrub: pair's rows of the removed links ({own} kept + {rejected_removed} rejected) do not match filter's ({pair_input_removed}); the run's stages disagree")
        pa_.rewrite("boilerplate", lambda t: pc.and_(pc.equal(t.column("kind"), "url"), _isin("key", urls)(t)))
        removed["pair"] = {"pairs": len(pairs_removed), "links": own, "partners_without_pair": len(partners)}
        _restamp(pa_, d["filter"])
        pa_.commit()
    if "shards" in present:
        removed["shards"] = _scrub_shards(d["shards"], pairs_removed)
    if report and os.path.exists(os.path.join(run, "report.html")):
        from browse.report import write_report

        write_report(run, os.path.join(run, "report.html"))
    removed["links"] = len(links)
    return removed


def _any_mask(urls: dict, links: set, images: dict) -> Callable[[pa.Table], pa.Array]:
    """Rows that name a removed link, URL or image in any of the usual columns (download's plan
    tables, img2dataset's output with its `url` and `sha256` of the bytes, ...)."""
    checks = {"link_id": _isin("link_id", links), "image_url": _isin("image_url", urls), "url": _isin("url", urls), "image_id": _isin("image_id", images)}

    def mask(t):
        m = pa.array([False] * t.num_rows, pa.bool_())
        for column, check in checks.items():
            if column in t.column_names and pa.types.is_string(t.schema.field(column).type):
                m = pc.or_(m, check(t))
        if "sha256" in t.column_names and images:
            m = pc.or_(m, pa.array([bool(v) and v[:16] in images for v in _col(t, "sha256")], pa.bool_()))
        return m
    return mask


def _scrub_shards(shards_dir: str, pairs_removed: set) -> dict:
    """Rewrite the tars holding removed samples; index, manifest and stats follow."""
    from core import sample_layout as layout
    from shards.writer import _members, _ShardFile, write_wids

    sh = StageRewrite(shards_dir, "shards")
    index = _read(os.path.join(sh.path, "index"))
    hit_shards = sorted({s for k, s in zip(_col(index, "key"), _col(index, "shard")) if k in pairs_removed})
    meta = {r["key"]: r for r in index.to_pylist()}
    new_rows: dict[str, dict] = {}
    summaries = {}
    for name in hit_shards:
        path = os.path.join(sh.path, name)
        samples: dict[str, dict] = {}
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key in pairs_removed or not member.isfile():
                    continue
                samples.setdefault(key, {"key": key, "files": {}, "meta": meta[key]})["files"][ext] = tar.extractfile(member).read()
        os.remove(path)  # the hard link of the copy: the original stays until the swap
        if not samples:
            summaries[name] = None
            continue
        shard = _ShardFile(sh.path, name)
        for sample in samples.values():
            new_rows[sample["key"]] = shard.add(sample, _members(sample))
        summaries[name] = shard.close()
    sh.rewrite("index", _isin("key", pairs_removed))
    for f in _parquets(os.path.join(sh.path, "index")):  # the new byte offsets of the rewritten shards
        t = pq.read_table(f)
        if not any(k in new_rows for k in _col(t, "key")):
            continue
        rows = [dict(r, offset=new_rows[r["key"]]["offset"], size=new_rows[r["key"]]["size"]) if r["key"] in new_rows else r for r in t.to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), f + ".scrub-tmp")
        os.replace(f + ".scrub-tmp", f)
    sh.drop_rejected(pairs_removed)
    written = len([k for k in pairs_removed if k in meta])
    before_rejected_total = sh.stats["input"] - sh.stats["kept"]
    sh.stats["kept"] -= written
    sh.stats["input"] -= written + (before_rejected_total - sum(sh.stats["rejected"].values()))
    with open(os.path.join(sh.path, layout.MANIFEST)) as fh:
        manifest = json.load(fh)
    manifest["shards"] = [summaries.get(s["shard"], s) for s in manifest["shards"] if summaries.get(s["shard"], s) is not None]
    manifest["samples"] = sum(s["samples"] for s in manifest["shards"])
    manifest["pairs_in"] = manifest.get("pairs_in", 0) - len(pairs_removed)
    manifest.setdefault("scrubbed", []).append({"pairs": written, "shards_rewritten": [s for s in hit_shards if summaries[s]], "shards_deleted": [s for s in hit_shards if not summaries[s]]})
    os.remove(os.path.join(sh.path, layout.MANIFEST))  # a hard link: write a new file
    with open(os.path.join(sh.path, layout.MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
    if os.path.exists(os.path.join(sh.path, layout.WIDS)):
        os.remove(os.path.join(sh.path, layout.WIDS))  # a hard link too
    write_wids(sh.path, manifest["shards"])  # wids numbers the samples that are left
    sh.commit()
    return {"pairs": written, "shards_rewritten": sum(1 for s in hit_shards if summaries[s]), "shards_deleted": sum(1 for s in hit_shards if not summaries[s])}
