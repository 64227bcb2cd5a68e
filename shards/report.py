"""`webpairs stats`: pair statistics from stage outputs, as a text summary and a self-contained HTML report.

Reads only what stages write (stats.json, parquet, manifest.json, shard tars), so it works on one
stage directory or on a run directory holding several.
"""

from __future__ import annotations

import base64
import collections
import glob
import html
import io
import json
import os
import tarfile
from typing import Optional
from urllib.parse import urlsplit

import numpy as np

from core.stageio import is_complete, read_stats, read_table, stage_files
from shards import quality

STAGE_ORDER = ["extract", "download", "filter", "pair", "shards"]


def find_stage_dirs(root: str) -> dict[str, str]:
    """Stage name -> complete stage directory, for `root` itself and its sub-directories (two levels)."""
    found: dict[str, str] = {}
    candidates = [root] + sorted(glob.glob(os.path.join(root, "*"))) + sorted(glob.glob(os.path.join(root, "*", "*")))
    for d in candidates:
        stats = read_stats(d) if os.path.isdir(d) and is_complete(d) else None
        if stats and stats.get("stage") and stats["stage"] not in found:
            found[stats["stage"]] = d
    return found


def _quantiles(values) -> str:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return "n/a"
    q = np.percentile(v, [0, 25, 50, 75, 100])
    return "min {:.3g}  p25 {:.3g}  median {:.3g}  p75 {:.3g}  max {:.3g}  (n={})".format(*q, v.size)


def funnel(data: dict) -> list[tuple[str, int]]:
    """From links to pairs: what each step kept, with the unit it counts (links, URLs, images,
    pairs), from the stages' stats and the pair rows. The same rows in `stats` and the report."""
    st = data["stages"]
    rows: list[tuple[str, int]] = []
    dl = st.get("download", {})
    if "extract" in st or dl:
        rows.append(("links found on pages", st["extract"]["kept"] if "extract" in st else dl["input"]))
    if "urls" in dl:
        rows.append(("distinct image URLs", dl["urls"]))
        rows.append(("URLs selected for download", dl["urls_selected"]))
        if dl.get("urls_evidence"):
            rows.append(("URLs fetched once as boilerplate evidence", dl["urls_evidence"]))
        rows.append(("URLs downloaded", dl["urls_downloaded"]))
        rows.append(("distinct images downloaded", dl["images"]))
    if "filter" in st and "images_kept" in st["filter"]:
        rows.append(("images kept by filter", st["filter"]["images_kept"]))
    if "paired_images" in data:
        rows.append(("images in a pair", data["paired_images"]))
    if "pair" in st:
        rows.append(("pairs", st["pair"].get("pairs", 0)))
    return rows


def collect(root: str) -> dict:
    """Everything the report shows, as plain data."""
    stages = find_stage_dirs(root)
    if not stages:
        raise FileNotFoundError(f"no stage output (stats.json) under {root}")
    data: dict = {"root": root, "stages": {name: read_stats(d) for name, d in stages.items()}, "dirs": stages}
    image_dir = stages.get("pair") or stages.get("filter")
    if image_dir and stage_files(image_dir, "images"):
        imgs = read_table(image_dir, "images", columns=["page_url", "width", "height", "image_url"]).to_pandas()
        data["images_per_page"] = imgs.groupby("page_url").size().tolist()
        data["widths"], data["heights"] = imgs.width.tolist(), imgs.height.tolist()
        data["top_domains"] = collections.Counter(urlsplit(u).netloc for u in imgs.page_url).most_common(10)
    if "pair" in stages and stage_files(stages["pair"], "pairs"):
        pairs = read_table(stages["pair"], "pairs").to_pandas()
        data["similarity"] = pairs.similarity.tolist()
        data["paired_images"] = len(set(pairs.cond_image_id) | set(pairs.target_image_id))
        data["pairs_per_page"] = pairs.groupby("page_url").size().tolist()
        data["pairs_with_boilerplate"] = quality.pairs_with_boilerplate(stages["pair"], quality.pair_max_distance(stages["pair"]), pairs[quality.PAIR_COLUMNS].to_dict("records"))
    if "filter" in stages and stage_files(stages["filter"], "occurrences"):
        data["pages_per_site"] = quality.pages_per_site(stages["filter"])
    if "shards" in stages:
        manifest_path = os.path.join(stages["shards"], "manifest.json")
        if os.path.exists(manifest_path):
            with open(manifest_path) as fh:
                data["manifest"] = json.load(fh)
    return data


def summary_text(data: dict) -> str:
    """The plain-text summary table printed by `webpairs stats`."""
    lines = [f"webpairs stats: {data['root']}", "", f"{'stage':10s} {'input':>8s} {'kept':>8s} {'rejected':>9s}  reasons"]
    for name in sorted(data["stages"], key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99):
        s = data["stages"][name]
        rej = sum(s["rejected"].values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"{name:10s} {s['input']:>8d} {s['kept']:>8d} {rej:>9d}  {reasons}")
    lines.append("")
    steps = funnel(data)
    if steps:
        lines.append("funnel (links -> pairs):")
        lines += [f"  {label:44s} {n:>10,d}" for label, n in steps]
        lines.append("")
    if "images_per_page" in data:
        lines.append(f"images per page:   {_quantiles(data['images_per_page'])}")
        lines.append(f"image width:       {_quantiles(data['widths'])}")
        lines.append(f"image height:      {_quantiles(data['heights'])}")
    if "pairs_per_page" in data:
        lines.append(f"pairs per page:    {_quantiles(data['pairs_per_page'])}")
        lines.append(f"similarity:        {_quantiles(data['similarity'])}")
    if "pairs_with_boilerplate" in data:
        bad, total = data["pairs_with_boilerplate"]
        lines.append(f"pairs with boilerplate: {bad} of {total} ({bad / total:.1%})" if total else "pairs with boilerplate: 0 of 0")
    if data.get("pages_per_site"):
        sites = data["pages_per_site"]
        lines.append(f"pages per site:    {_quantiles(list(sites.values()))}; {len(sites)} sites, most: " + ", ".join(f"{s} ({n})" for s, n in list(sites.items())[:5]))
    if "manifest" in data:
        m = data["manifest"]
        lines.append(f"shards:            {len(m['shards'])} files, {m['samples']} samples, encoder {m.get('encoder')}, code {m.get('code_version')}")
    if data.get("top_domains"):
        lines.append("top domains:       " + ", ".join(f"{d} ({n})" for d, n in data["top_domains"]))
    return "\n".join(lines)


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(data: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    order = [s for s in STAGE_ORDER if s in data["stages"]]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(order, [data["stages"][s]["input"] for s in order], color="#c8d6e5", label="input")
    ax.bar(order, [data["stages"][s]["kept"] for s in order], color="#2e86de", label="kept")
    ax.set_title("records kept per stage")
    ax.legend()
    plots.append(("funnel", _figure_png(fig)))
    data = {**data, "pages_per_site_values": list(data.get("pages_per_site", {}).values())}
    for key, title, bins in (("similarity", "pair similarity", 20), ("images_per_page", "images per page", 15), ("pairs_per_page", "pairs per page", 15), ("pages_per_site_values", "pages per site", 15)):
        if data.get(key):
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.hist(data[key], bins=bins, color="#10ac84")
            ax.set_title(title)
            plots.append((key, _figure_png(fig)))
    if data.get("widths"):
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.scatter(data["widths"], data["heights"], s=6, alpha=0.6)
        ax.set_xlabel("width")
        ax.set_ylabel("height")
        ax.set_title("image sizes")
        plots.append(("sizes", _figure_png(fig)))
    return plots


def example_pairs(shards_dir: str, n: int = 8) -> list[dict]:
    """The first n samples of the first shards: thumbnails (base64 JPEG) and metadata."""
    from PIL import Image

    samples: dict[str, dict] = collections.OrderedDict()
    with open(os.path.join(shards_dir, "manifest.json")) as fh:  # the shards it lists, never a glob
        tars = [os.path.join(shards_dir, s["shard"]) for s in json.load(fh)["shards"]]
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key not in samples and len(samples) >= n:
                    break
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        if len(samples) >= n:
            break
    out = []
    for key, files in list(samples.items())[:n]:
        item = {"key": key, "meta": json.loads(files.get("json", b"{}"))}
        for side in ("cond", "target"):
            img = Image.open(io.BytesIO(files[f"{side}.jpg"]))
            img.thumbnail((160, 160))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=80)
            item[side] = base64.b64encode(buf.getvalue()).decode()
        out.append(item)
    return out


def render_html(data: dict, examples: Optional[list[dict]] = None, gallery: Optional[list[dict]] = None) -> str:
    """A self-contained HTML page (inline PNG plots and thumbnails, no external resources)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>webpairs stats</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        ".plots img{margin:6px}.pairs{display:flex;flex-wrap:wrap}.pair{margin:8px;border:1px solid #ddd;padding:6px;font-size:12px;width:340px}</style></head><body>",
        # Records on <body> whether every plot decoded and whether any error occurred (tests read it).
        "<script>addEventListener('error',function(){document.body.dataset.errors=(+(document.body.dataset.errors||0))+1},true);"
        "addEventListener('load',function(){var p=[].slice.call(document.querySelectorAll('img.plot'));"
        "document.body.dataset.plotsTotal=p.length;document.body.dataset.plotsRendered=p.filter(function(i){return i.complete&&i.naturalWidth>0}).length})</script>",
        f"<h1>webpairs stats</h1><p>{esc(data['root'])}</p>",
        "<h2>Counts per stage</h2><table><tr><th>stage</th><th>input</th><th>kept</th><th>rejected</th><th style='text-align:left'>reasons</th></tr>",
    ]
    for name in [s for s in STAGE_ORDER if s in data["stages"]]:
        s = data["stages"][name]
        reasons = ", ".join(f"{esc(k)}={v}" for k, v in sorted(s["rejected"].items()))
        parts.append(f"<tr><td>{name}</td><td>{s['input']}</td><td>{s['kept']}</td><td>{sum(s['rejected'].values())}</td><td style='text-align:left'>{reasons}</td></tr>")
    parts.append("</table>")
    steps = funnel(data)
    if steps:
        parts.append("<h2>Funnel: links to pairs</h2><table id='funnel'><tr><th style='text-align:left'>step</th><th>count</th></tr>")
        parts += [f"<tr><td style='text-align:left'>{esc(label)}</td><td>{n:,}</td></tr>" for label, n in steps]
        parts.append("</table>")
    parts.append("<h2>Plots</h2><div class='plots'>")
    for name, png in _plots(data):
        parts.append(f"<img class='plot' id='plot-{name}' alt='{name}' src='data:image/png;base64,{png}'>")
    parts.append("</div>")
    if "pairs_with_boilerplate" in data:
        bad, total = data["pairs_with_boilerplate"]
        parts.append(f"<h2>Pair quality</h2><p id='pairs-with-boilerplate'>Pairs with an image flagged as boilerplate (of its site or of the crawl): {bad} of {total}</p>")
    if gallery:
        parts.append("<h2>What the boilerplate rules removed</h2>")
        for g in gallery:
            parts.append(f"<h3 class='reason' id='reason-{esc(g['reason'])}'>{esc(g['stage'])}: {esc(g['reason'])} ({g['count']} removed)</h3><div class='pairs'>")
            for ex in g["examples"]:
                img = f"<img src='data:image/jpeg;base64,{ex['thumb']}' alt='{esc(g['reason'])}'>" if ex["thumb"] else "(no image)"
                parts.append(f"<div class='pair'>{img}<br>{esc(ex['url'] or '')}<br>{esc(ex['detail'] or '')}</div>")
            parts.append("</div>")
    if data.get("top_domains"):
        parts.append("<h2>Top domains</h2><ul>" + "".join(f"<li>{esc(d)}: {n}</li>" for d, n in data["top_domains"]) + "</ul>")
    if examples:
        parts.append("<h2>Example pairs</h2><div class='pairs'>")
        for ex in examples:
            m = ex["meta"]
            parts.append(
                f"<div class='pair'><img src='data:image/jpeg;base64,{ex['cond']}' alt='condition'> "
                f"<img src='data:image/jpeg;base64,{ex['target']}' alt='target'><br>similarity {m.get('similarity', 0):.3f}<br>"
                f"{esc(m.get('page_url', ''))}</div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(root: str, html_path: Optional[str] = None) -> str:
    """Collect, print-ready summary; with html_path also write the HTML report. Returns the summary."""
    data = collect(root)
    text = summary_text(data)
    if html_path:
        examples = example_pairs(data["dirs"]["shards"]) if "shards" in data["dirs"] else None
        gallery = quality.boilerplate_gallery(data["dirs"])
        os.makedirs(os.path.dirname(os.path.abspath(html_path)), exist_ok=True)
        with open(html_path, "w") as fh:
            fh.write(render_html(data, examples, gallery))
    return text
