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
from typing import Optional
from urllib.parse import urlsplit

import numpy as np

from core.stageio import is_complete, read_stats, read_table, stage_files
from browse import quality

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


SAFETY_REASONS = ("blocklisted", "scrubbed", "nsfw")  # issue 32: the hash blocklist at download, `webpairs scrub` later, filter's --max-nsfw
NSFW_BINS = 10  # the nsfw score histogram: ten bins of 0.1 over [0, 1] (a score of 1.0 in the last)


def nsfw_histogram(scores) -> dict:
    """{"scored", "edges", "counts", "max"} of filter's nsfw scores (None when nothing was scored)."""
    import numpy as np

    values = np.asarray([v for v in scores if v is not None], dtype=np.float64)
    if not len(values):
        return None
    counts, edges = np.histogram(values, bins=NSFW_BINS, range=(0.0, 1.0))
    return {"scored": int(len(values)), "edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts], "max": float(values.max())}


def safety(stats: dict, stages: dict) -> dict:
    """The safety section: refusals by stage and reason, the faces filter found and the histogram
    of its nsfw scores."""
    out: dict = {"reasons": {f"{stage} {reason}": s["rejected"][reason] for stage, s in stats.items() for reason in SAFETY_REASONS if s["rejected"].get(reason)}}
    if "filter" in stages and stage_files(stages["filter"], "images"):
        files = stage_files(stages["filter"], "images")
        import pyarrow.parquet as pq

        if "faces" in pq.ParquetFile(files[0]).schema_arrow.names:
            faces = [f for f in read_table(stages["filter"], "images", columns=["faces"]).column("faces").to_pylist() if f is not None]
            if faces:  # not with --faces off
                out["faces"] = {"checked": len(faces), "images_with_faces": sum(1 for f in faces if f), "faces": sum(faces)}
        if "nsfw" in pq.ParquetFile(files[0]).schema_arrow.names:
            hist = nsfw_histogram(read_table(stages["filter"], "images", columns=["nsfw"]).column("nsfw").to_pylist())
            if hist:  # not without a safety head
                out["nsfw"] = hist
    return out


def _has_safety(data: dict) -> bool:
    s = data.get("safety", {})
    return bool(s.get("reasons") or s.get("faces") or s.get("nsfw"))


def _nsfw_bins(hist: dict) -> list[tuple[str, int]]:
    e = hist["edges"]
    return [(f"{e[i]:.1f}-{e[i + 1]:.1f}", n) for i, n in enumerate(hist["counts"])]
# the reasons by which a site or a page refuses (crawl/consent.py): a rule each
CONSENT_REASONS = {
    "robots_disallowed": "robots.txt disallows it (or was unavailable: all disallowed for the run)",
    "tdm_reserved": "TDMRep reserves it (tdmrep.json, or tdm-reservation: 1 on the image)",
    "opt_out": "X-Robots-Tag opt-out on the image response",
    "page_opt_out": "the page opts out (X-Robots-Tag or <meta name=robots> noai/noimageai)",
}


def consent_summary(stages: dict) -> Optional[dict]:
    """Links and hosts refused by each consent rule, and the sites whose robots.txt or tdmrep.json
    could not be read; None when no consent-aware download or extract is in the run."""
    rules, failures, mode = {}, [], None
    for stage in ("extract", "download"):
        if stage not in stages or not stage_files(stages[stage], "rejected"):
            continue
        rej = read_table(stages[stage], "rejected", columns=["reason", "detail", "url"]).to_pandas()
        rej = rej[rej.reason.isin(list(CONSENT_REASONS))]
        for reason, group in rej.groupby("reason"):
            hosts = group.url.map(lambda u: urlsplit(u).hostname or "")
            pages = group.detail.map(lambda d: (d or "").split(": ", 1)[0]) if reason == "page_opt_out" else None
            rules[reason] = {"stage": stage, "links": len(group), "hosts": hosts.nunique(), "pages": pages.nunique() if pages is not None else None}
    if "download" in stages:
        mode = read_stats(stages["download"]).get("consent", {}).get("mode")
        hosts_file = os.path.join(stages["download"], "consent", "hosts.parquet")
        if os.path.exists(hosts_file):
            import pyarrow.parquet as pq

            for r in pq.read_table(hosts_file).to_pylist():
                for what, key in (("robots.txt", "robots"), ("tdmrep.json", "tdmrep")):
                    if r[f"{key}_status"] in ("unavailable", "invalid"):
                        http = r[f"{key}_http"]
                        failures.append({"origin": r["origin"], "file": what, "status": r[f"{key}_status"], "why": f"HTTP {http}" if http else (r["error"] or "")[:160],
                                         "effect": "all of the site disallowed for this run" if key == "robots" else "no TDMRep rules known"})
    if not rules and not failures and mode is None:
        return None
    return {"mode": mode, "rules": rules, "failures": failures}


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
    if "pair" in stages:
        copies = quality.copy_groups(stages["pair"], thumbs=False, max_groups=0)
        if copies is not None:
            st = data["stages"]["pair"]
            data["copies"] = {"groups": copies["total_groups"], "removed": copies["removed"], "per_site": copies["per_site"],
                              **{k: st.get(k, 0) for k in ("copy_candidates", "copy_pairs_verified", "copy_images_removed", "copy_stand_ins")}}
    if "filter" in stages and stage_files(stages["filter"], "occurrences"):
        data["pages_per_site"] = quality.pages_per_site(stages["filter"])
    data["safety"] = safety(data["stages"], stages)
    consent = consent_summary(stages)
    if consent:
        data["consent"] = consent
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
    if _has_safety(data):
        s = data["safety"]
        text = ", ".join(f"{k}={v}" for k, v in s["reasons"].items()) or "nothing refused"
        if s.get("faces"):
            f = s["faces"]
            text += f"; images with faces: {f['images_with_faces']} of {f['checked']} ({f['faces']} faces)"
        lines.append(f"safety:            {text}")
        if s.get("nsfw"):
            h = s["nsfw"]
            lines.append(f"nsfw score ({h['scored']} images, max {h['max']:.3f}): " + ", ".join(f"{label}: {n}" for label, n in _nsfw_bins(h)))
    if "copies" in data:
        c = data["copies"]
        lines.append(f"copies across sites: {c['groups']} groups, {c['removed']} dresses removed ({c['copy_stand_ins']} stand-ins); {c['copy_candidates']} candidate pairs, {c['copy_pairs_verified']} verified as copies")
        if c["per_site"]:
            lines.append("copy groups per site: " + ", ".join(f"{s['site']} ({s['groups']})" for s in c["per_site"][:8]))
    if "manifest" in data:
        m = data["manifest"]
        lines.append(f"shards:            {len(m['shards'])} files, {m['samples']} samples, encoder {m.get('encoder')}, code {m.get('code_version')}")
    if data.get("top_domains"):
        lines.append("top domains:       " + ", ".join(f"{d} ({n})" for d, n in data["top_domains"]))
    if "consent" in data:
        lines += [""] + _consent_lines(data["consent"])
    return "\n".join(lines)


def _consent_lines(c: dict) -> list[str]:
    lines = [f"consent (download --consent {c['mode'] or '?'}):" + ("  OFF: robots.txt, TDMRep and opt-out headers were not asked" if c["mode"] == "off" else "")]
    for reason in CONSENT_REASONS:
        r = c["rules"].get(reason)
        if r:
            where = f"{r['pages']} pages" if r["pages"] is not None else f"{r['hosts']} hosts"
            lines.append(f"  {reason:18s} {r['links']:>8,d} links on {where} ({r['stage']})")
    if not c["rules"]:
        lines.append("  no link refused by a site")
    for f in c["failures"]:
        lines.append(f"  {f['file']} of {f['origin']} {f['status']} ({f['why']}): {f['effect']}")
    return lines


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
    # two units, two plots: extract .. pair count links (an image on a page), shards counts pairs
    order = [s for s in STAGE_ORDER if s in data["stages"] and s != "shards"]
    if order:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(order, [data["stages"][s]["input"] for s in order], color="#c8d6e5", label="input")
        ax.bar(order, [data["stages"][s]["kept"] for s in order], color="#2e86de", label="kept")
        ax.set_title("links kept per stage")
        ax.set_ylabel("links")
        ax.legend()
        plots.append(("links_per_stage", _figure_png(fig)))
    pairs = [(label, n) for label, n in (("made by pair", data["stages"].get("pair", {}).get("pairs")), ("written to shards", data["stages"].get("shards", {}).get("kept"))) if n is not None]
    if pairs:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar([p[0] for p in pairs], [p[1] for p in pairs], color="#10ac84")
        ax.set_title("pairs")
        ax.set_ylabel("pairs")
        plots.append(("pairs", _figure_png(fig)))
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


def _nsfw_png(hist: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(hist["edges"][:-1], hist["counts"], width=0.1, align="edge", color="#ee5253")
    ax.set_xlim(0, 1)
    ax.set_xlabel("nsfw score")
    ax.set_ylabel("images")
    ax.set_title("nsfw score (LAION's CLIP-based head)")
    return _figure_png(fig)


def example_pairs(run, per_band: int = 4) -> list[dict]:
    """Example pairs drawn across the run (browse.data.RunData.stratified: low, middle and high
    thirds of the similarity range, one pair per page, sites in turn), with thumbnails read from
    the shards by offset."""
    out = []
    for row in run.stratified(per_band):
        item = dict(row)
        for side in ("cond", "target"):
            item[side] = quality._thumb(run.pair_image(row["key"], side), 160)
        out.append(item)
    return out


def render_html(data: dict, examples: Optional[list[dict]] = None, gallery: Optional[list[dict]] = None, sites: Optional[dict] = None, queries: Optional[list[tuple[str, str]]] = None, copies: Optional[dict] = None) -> str:
    """A self-contained HTML page (inline PNG plots and thumbnails, no external resources)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>webpairs stats</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        ".plots img{margin:6px}.pairs{display:flex;flex-wrap:wrap}.pair{margin:8px;border:1px solid #ddd;padding:6px;font-size:12px;width:340px;overflow-wrap:anywhere}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>",
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
    if _has_safety(data):
        s = data["safety"]
        parts.append("<h2>Safety</h2><table id='safety'><tr><th style='text-align:left'>what</th><th>count</th></tr>")
        parts += [f"<tr><td style='text-align:left'>{esc(k)}</td><td>{v:,}</td></tr>" for k, v in s["reasons"].items()]
        if s.get("faces"):
            f = s["faces"]
            parts.append(f"<tr><td style='text-align:left'>filter: images with faces (of {f['checked']:,} checked)</td><td>{f['images_with_faces']:,}</td></tr><tr><td style='text-align:left'>filter: faces</td><td>{f['faces']:,}</td></tr>")
        parts.append("</table>")
        if s.get("nsfw"):
            h = s["nsfw"]
            parts.append(f"<h3>nsfw score of the images filter kept ({h['scored']:,} scored, 1 = NSFW)</h3><table id='nsfw-histogram'><tr><th style='text-align:left'>score</th><th>images</th></tr>")
            parts += [f"<tr><td style='text-align:left'>{label}</td><td>{n:,}</td></tr>" for label, n in _nsfw_bins(h)]
            parts.append(f"</table><img class='plot' id='plot-nsfw' alt='nsfw score histogram' src='data:image/png;base64,{_nsfw_png(h)}'>")
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
    if "consent" in data:
        c = data["consent"]
        parts.append(f"<h2>Consent</h2><p id='consent-mode'>download --consent {esc(str(c['mode'] or '?'))}" + (": robots.txt, TDMRep and opt-out headers were <b>not</b> asked" if c["mode"] == "off" else "") + "</p>")
        parts.append("<table id='consent'><tr><th style='text-align:left'>rule</th><th style='text-align:left'>what it means</th><th>links refused</th><th>hosts</th><th>pages</th></tr>")
        for reason, meaning in CONSENT_REASONS.items():
            r = c["rules"].get(reason)
            if r:
                parts.append(f"<tr><td style='text-align:left'>{reason}</td><td style='text-align:left'>{esc(meaning)}</td><td>{r['links']:,}</td><td>{r['hosts']:,}</td><td>{'' if r['pages'] is None else format(r['pages'], ',')}</td></tr>")
        parts.append("</table>")
        if c["failures"]:
            parts.append("<h3>Site files that could not be read</h3><table id='consent-failures'><tr><th style='text-align:left'>site</th><th>file</th><th>status</th><th style='text-align:left'>why</th><th style='text-align:left'>so</th></tr>")
            parts += [f"<tr><td style='text-align:left'>{esc(f['origin'])}</td><td>{f['file']}</td><td>{f['status']}</td><td style='text-align:left'>{esc(f['why'])}</td><td style='text-align:left'>{f['effect']}</td></tr>" for f in c["failures"]]
            parts.append("</table>")
    if copies is not None:
        c = data.get("copies", {})
        parts.append(f"<h2>Copies across sites</h2><p id='copy-summary'>{copies['total_groups']} copy groups: {copies['removed']} dresses removed, the kept dress first in each row "
                     f"({c.get('copy_candidates', 0)} candidate pairs checked, {c.get('copy_pairs_verified', 0)} verified as copies; {c.get('copy_stand_ins', 0)} pages show the kept dress in place of a removed one).</p>")
        for g in copies["groups"]:
            parts.append(f"<div class='pairs copy-group' data-kept='{esc(g['kept'])}'>")
            for m in g["members"]:
                img = f"<img src='data:image/jpeg;base64,{m['thumb']}' alt='{'kept' if m['kept'] else 'copy'}'>" if m["thumb"] else "(no image)"
                parts.append(f"<div class='pair {'kept' if m['kept'] else 'copy'}'>{img}<br><b>{'kept' if m['kept'] else 'removed'}</b> {m['width']}x{m['height']}<br>{esc(m['url'] or '')}</div>")
            parts.append("</div>")
        if copies["per_site"]:
            parts.append("<table id='copy-sites'><tr><th style='text-align:left'>site</th><th>copy groups</th><th>dresses removed (links)</th><th>kept dress stands in</th></tr>")
            parts += [f"<tr><td style='text-align:left'>{esc(s['site'] or '(none)')}</td><td>{s['groups']:,}</td><td>{s['removed']:,}</td><td>{s['stand_ins']:,}</td></tr>" for s in copies["per_site"][:50]]
            parts.append("</table>")
    if data.get("top_domains"):
        parts.append("<h2>Top domains</h2><ul>" + "".join(f"<li>{esc(d)}: {n}</li>" for d, n in data["top_domains"]) + "</ul>")
    if sites and sites["rows"]:
        parts.append(f"<h2>Sites</h2><table id='sites'><tr><th style='text-align:left'>site</th><th>pages</th><th>images</th><th>pairs</th><th>boilerplate links removed</th></tr>")
        parts += [f"<tr><td style='text-align:left'>{esc(r['site'] or '(none)')}</td><td>{r['pages']:,}</td><td>{r['images']:,}</td><td>{r['pairs']:,}</td><td>{r['boilerplate']:,}</td></tr>" for r in sites["rows"]]
        more = sites["total"] - len(sites["rows"])
        parts.append("</table>" + (f"<p>{more:,} more sites: <code>webpairs browse</code> lists them all.</p>" if more > 0 else ""))
    if examples:
        n_sites, n_pages = len({e["site"] for e in examples}), len({e["page_url"] for e in examples})
        parts.append(f"<h2>Example pairs</h2><p>{len(examples)} pairs drawn from {n_pages} pages of {n_sites} sites, the same number from the low, middle and high third of the similarity range; <code>webpairs browse RUN</code> pages through all of them.</p><div class='pairs'>")
        for ex in examples:
            parts.append(
                f"<div class='pair' data-band='{ex['band']}' data-key='{esc(ex['key'])}'><img src='data:image/jpeg;base64,{ex['cond']}' alt='condition'> "
                f"<img src='data:image/jpeg;base64,{ex['target']}' alt='target'><br><b>{ex['band']} similarity</b> {ex['similarity']:.3f} &middot; site {esc(ex['site'])}<br>"
                f"{esc(ex['page_url'])}<br>alt: {esc(ex['cond_alt'] or '')} &rarr; {esc(ex['target_alt'] or '')}</div>"
            )
        parts.append("</div>")
    if queries:
        parts.append("<h2>Query this run with DuckDB</h2><p>The same questions in SQL (<code>duckdb -c \"...\"</code>, or <code>duckdb.sql(...)</code> in Python):</p>")
        for question, sql in queries:
            parts.append(f"<h3>{esc(question)}</h3><pre class='sql'>{esc(sql)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(root: str, html_path: Optional[str] = None) -> str:
    """Collect, print-ready summary; with html_path also write the HTML report. Returns the summary."""
    data = collect(root)
    text = summary_text(data)
    if html_path:
        from browse.queries import examples as sql_examples

        examples = sites = None
        if "shards" in data["dirs"]:
            from browse.data import RunData

            run = RunData(root)
            try:
                examples, sites = example_pairs(run), run.sites(limit=20)
            finally:
                run.close()
        gallery = quality.boilerplate_gallery(data["dirs"])
        copies = quality.copy_groups(data["dirs"]["pair"]) if "pair" in data["dirs"] else None
        os.makedirs(os.path.dirname(os.path.abspath(html_path)), exist_ok=True)
        with open(html_path, "w") as fh:
            fh.write(render_html(data, examples, gallery, sites, sql_examples(data["dirs"]), copies))
    return text
