"""Pair quality for `webpairs stats`: pairs that hold boilerplate, pages per site, and a gallery of
what each boilerplate reason removed, from the stage outputs of a run.

The boilerplate check is independent of the code that removed it: it takes pair's flag table
(`boilerplate/`) and tests every paired image against it with a brute-force pHash distance, so a
flaw in the LSH neighbourhoods or in the marking shows up here as a non-zero count.
"""

from __future__ import annotations

import base64
import io
from typing import Optional

import numpy as np
import pyarrow.compute as pc

from core.sites import site_of
from core.stageio import POINTER, fill_bytes, read_success, read_table, stage_files

FILTER_REASONS = ("flat_image", "declared_too_small", "too_small", "bad_aspect", "url_word")
PAIR_REASONS = ("boilerplate_site", "boilerplate_global")
DOWNLOAD_REASONS = ("boilerplate_url_site", "boilerplate_url_global", "declared_too_small", "not_raster")


def _bits(hexes) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


PAIR_COLUMNS = ["cond_image_id", "target_image_id", "page_url", "cond_url", "target_url"]  # what the check reads of a pair


def pairs_with_boilerplate(pair_dir: str, max_distance: int, pairs: list[dict]) -> tuple[int, int]:
    """(pairs with an image that is flagged boilerplate of its site or of the crawl, all pairs);
    `pairs` are the run's pair rows (PAIR_COLUMNS at least), as the report has read them."""
    if not stage_files(pair_dir, "boilerplate"):
        return 0, len(pairs)
    flags = read_table(pair_dir, "boilerplate").to_pylist()
    images = read_table(pair_dir, "images", ["image_id", "phash"]).to_pylist()
    phash = {r["image_id"]: r["phash"] for r in images}
    content: dict[str, list[str]] = {}
    urls: dict[str, set] = {}
    for f in flags:
        if f["kind"] == "content":
            content.setdefault(f["scope"], []).append(f["key"])
        else:
            urls.setdefault(f["scope"], set()).add(f["key"])
    arrays = {scope: _bits(keys) for scope, keys in content.items()}

    def flagged(image_id: str, url: str, site: str) -> bool:
        for scope in (site, "*"):
            if url in urls.get(scope, ()):
                return True
            if scope in arrays and image_id in phash:
                distance = _popcount(arrays[scope] ^ np.uint64(int(phash[image_id], 16)))
                if (distance <= max_distance).any():
                    return True
        return False

    bad = sum(
        flagged(p["cond_image_id"], p["cond_url"], site_of(p["page_url"])) or flagged(p["target_image_id"], p["target_url"], site_of(p["page_url"]))
        for p in pairs
    )
    return bad, len(pairs)


def pages_per_site(filter_dir: str) -> dict[str, int]:
    """Site -> pages with at least one downloaded image (filter's occurrences)."""
    occ = read_table(filter_dir, "occurrences", ["site", "page_url"]).to_pandas()
    return occ.drop_duplicates().groupby("site").size().sort_values(ascending=False).to_dict()


def _thumb(data: bytes, side: int = 96) -> Optional[str]:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a report shows what it can; a broken image is shown as its URL
        return None
    return base64.b64encode(buf.getvalue()).decode()


def _bytes_by_link(links_dir: str, images_dir: str, part: str, wanted: set) -> dict:
    """{link_id: image bytes} for the wanted links: the link's image (the `occurrences/` of
    `links_dir`) read from `images_dir`/`part`, only the rows that match."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def among(values) -> pa.Array:
        return pa.array(sorted(values), type=pa.string())

    image_of = {}
    for path in stage_files(links_dir, "occurrences"):
        t = pq.read_table(path, columns=["link_id", "image_id"], filters=pc.field("link_id").isin(among(wanted)))
        image_of.update(zip(t.column("link_id").to_pylist(), t.column("image_id").to_pylist()))
    if not image_of:
        return {}
    rows = {}
    for path in stage_files(images_dir, part):
        names = pq.ParquetFile(path).schema_arrow.names
        t = pq.read_table(path, columns=["image_id", "image_bytes"] + [c for c in POINTER if c in names], filters=pc.field("image_id").isin(among(set(image_of.values()))))
        rows.update((r["image_id"], r) for r in t.to_pylist())
    fill_bytes(rows.values())  # filter's images/ point to their bytes in download's downloads/
    data = {image: r["image_bytes"] for image, r in rows.items()}
    return {link: data[image] for link, image in image_of.items() if image in data}


def boilerplate_gallery(dirs: dict[str, str], per_reason: int = 4) -> list[dict]:
    """A few examples (distinct URLs) of what each boilerplate reason removed: reason, count,
    examples [{url, detail, thumb}], with the image where the run has it (download fetches a
    flagged URL once as evidence; links it never fetched are shown by URL)."""
    out = []
    sources = (
        ("download", DOWNLOAD_REASONS, ("download", "download", "downloads")),
        ("filter", FILTER_REASONS, ("download", "download", "downloads")),
        ("pair", PAIR_REASONS, ("filter", "filter", "images")),
    )
    for stage, reasons, (links_stage, images_stage, part) in sources:
        if stage not in dirs or links_stage not in dirs:
            continue
        rejected = read_table(dirs[stage], "rejected").to_pylist()
        for reason in reasons:
            rows = sorted((r for r in rejected if r["reason"] == reason), key=lambda r: r["url"] or "")
            if not rows:
                continue
            picked, seen = [], set()
            for r in rows:
                if r["url"] not in seen:
                    seen.add(r["url"])
                    picked.append(r)
                if len(picked) == per_reason:
                    break
            data = _bytes_by_link(dirs[links_stage], dirs[images_stage], part, {r["record_id"] for r in picked})
            examples = [{"url": r["url"], "detail": r["detail"], "thumb": _thumb(data[r["record_id"]]) if r["record_id"] in data else None} for r in picked]
            out.append({"stage": stage, "reason": reason, "count": len(rows), "examples": examples})
    return out


def pair_max_distance(pair_dir: str) -> int:
    """The pHash distance the pair run used (its config in stats.json)."""
    from core.stageio import read_stats

    read_success(pair_dir, "pair")
    return int((read_stats(pair_dir) or {}).get("config", {}).get("boilerplate_phash_distance", 4))


def copy_groups(pair_dir: str, max_groups: int = 12, thumbs: bool = True) -> Optional[dict]:
    """The copy groups of a pair run (its `copies/`, pairing/copies.py): {"groups": [{kept, members:
    [{image_id, url, width, height, kept, thumb}], sites}] (kept member first, the largest groups
    first), "per_site": [{site, groups, removed, stand_ins}], "total_groups", "removed"}; None
    when the run has no copy step."""
    from core.stageio import fetch_rows

    if not stage_files(pair_dir, "copies"):
        return None if not _has_copy_step(pair_dir) else {"groups": [], "per_site": [], "total_groups": 0, "removed": 0}
    rows = read_table(pair_dir, "copies").to_pylist()
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(r["kept_image_id"], {"kept": r["kept_image_id"], "members": {}, "sites": set(), "removed_links": 0})
        g["members"].setdefault(r["kept_image_id"], {"image_id": r["kept_image_id"], "url": r["kept_image_url"], "width": r["kept_width"], "height": r["kept_height"], "kept": True, "ptr": (r["kept_bytes_file"], r["kept_bytes_row_group"])})
        g["members"].setdefault(r["image_id"], {"image_id": r["image_id"], "url": r["image_url"], "width": r["width"], "height": r["height"], "kept": False, "ptr": (r["bytes_file"], r["bytes_row_group"])})
        g["sites"].add(r["site"])
        g["removed_links"] += 1
    per_site: dict[str, dict] = {}
    for r in rows:
        s = per_site.setdefault(r["site"], {"site": r["site"], "groups": set(), "removed": 0, "stand_ins": 0})
        s["groups"].add(r["kept_image_id"])
        s["removed"] += 1
        s["stand_ins"] += bool(r["stand_in"])
    ordered = sorted(groups.values(), key=lambda g: (-len(g["members"]), g["kept"]))[:max_groups]
    shown = [m for g in ordered for m in g["members"].values()]
    data = {}
    if thumbs and shown:
        ptrs = {m["ptr"] for m in shown if m["ptr"][0] is not None}
        data = {k: v["image_bytes"] for k, v in fetch_rows(ptrs, "image_id", ["image_bytes"], {m["image_id"] for m in shown}).items()}
    out_groups = []
    for g in ordered:
        members = sorted(g["members"].values(), key=lambda m: (not m["kept"], m["image_id"]))
        out_groups.append({
            "kept": g["kept"], "sites": sorted(g["sites"]), "removed_links": g["removed_links"],
            "members": [{k: v for k, v in m.items() if k != "ptr"} | {"thumb": _thumb(data[m["image_id"]]) if m["image_id"] in data else None} for m in members],
        })
    sites = sorted(({**s, "groups": len(s["groups"])} for s in per_site.values()), key=lambda s: (-s["groups"], s["site"]))
    return {"groups": out_groups, "per_site": sites, "total_groups": len(groups), "removed": len({r["image_id"] for r in rows})}


def _has_copy_step(pair_dir: str) -> bool:
    from core.stageio import read_stats

    return bool((read_stats(pair_dir) or {}).get("config", {}).get("copies"))
