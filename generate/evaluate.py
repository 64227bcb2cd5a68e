"""`webpairs eval`: few-shot generation scored against held-out real images (Semantica's protocol).

For each class: `shots` images (seeded choice) condition the model, the class's other images are the
held-out reals. `samples_per_class` samples are generated per guidance scale (the same seeds for
every scale, so the rows compare like with like). Samples, reals and conditions are all embedded at
the model's resolution by one metric encoder (any registry encoder; default: the model's own), and
scored with `generate/metrics.py` (consistency raw and centred on the reals' mean feature; class match: the share of samples whose nearest real-class centroid
is their condition's class; chance is 1/classes). A `real` reference row scores the held-out reals themselves as if
they were samples: the consistency a perfect model would reach.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from generate import metrics as M
from generate import sample as S
from generate.images import Loaded, embed, read_image, to_model

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def load_classes(images_dir: str, topics: int = 0) -> dict[str, list[str]]:
    """Class name -> image paths: one sub-folder per class, or (with `topics`) a flat folder whose
    sorted file names are cut into that many contiguous groups (ImageNet samples sorted by wnid)."""
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"--images {images_dir} is not a folder")

    def images(folder: str) -> list[str]:
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXT))

    if topics:
        flat = images(images_dir)
        if len(flat) < 3 * topics:
            raise ValueError(f"{images_dir} has {len(flat)} images: too few for {topics} topics of at least 3")
        per = len(flat) // topics
        return {f"topic_{t:02d}": flat[t * per : (t + 1) * per] for t in range(topics)}
    classes = {d: images(os.path.join(images_dir, d)) for d in sorted(os.listdir(images_dir)) if os.path.isdir(os.path.join(images_dir, d))}
    classes = {k: v for k, v in classes.items() if v}
    if not classes:
        raise ValueError(f"{images_dir} has no class sub-folders with images (or pass --topics N for a flat folder)")
    return classes


def _at_model_size(images: list[Image.Image], size: int) -> list[Image.Image]:
    return S.to_pil(to_model(images, size, "cpu"))


def evaluate(loaded: Loaded, encoder, classes: dict[str, list[str]], shots: int = 1, samples_per_class: int = 8, guidances: tuple[float, ...] = (3.0, 0.0), steps: int = 50, sampler: str = "ddim", seed: int = 0, metric_encoder=None, k: int = 3, sheet: Optional[str] = None) -> dict:
    """Scores per guidance scale plus the `real` reference row; see the module docstring."""
    metric_encoder = metric_encoder or encoder
    device = next(loaded.model.parameters()).device
    size = loaded.size
    reals, conds_feat, samples = [], {}, {g: [] for g in guidances}  # samples[g]: list per class of (cond_idx, feats)
    used, skipped, sheet_rows = [], [], []
    bar = tqdm(total=len(classes) * len(guidances), desc="eval", unit="class")
    for ci, (name, paths) in enumerate(sorted(classes.items())):
        rng = np.random.default_rng(seed + ci)
        order = [paths[i] for i in rng.permutation(len(paths))]
        cond_paths, real_paths = order[:shots], order[shots:]
        if len(real_paths) < 2:
            skipped.append(name)
            bar.update(len(guidances))
            continue
        used.append(name)
        cond_imgs = [read_image(p) for p in cond_paths]
        cond = torch.from_numpy(embed(encoder, cond_imgs)).to(device)
        which = np.arange(samples_per_class) % shots
        reals.append(embed(metric_encoder, _at_model_size([read_image(p) for p in real_paths], size)))
        conds_feat[name] = embed(metric_encoder, _at_model_size(cond_imgs, size))
        row = _at_model_size(cond_imgs[:1], size)
        for g in guidances:
            gen = torch.Generator(device=device).manual_seed(seed * 7919 + ci)  # same noise for every scale
            out = S.to_pil(loaded.decode(S.sample(loaded.model, cond[which], steps, g, sampler, loaded.prediction, gen)))  # at the model's resolution
            samples[g].append((which, embed(metric_encoder, out)))
            row += out if g == guidances[0] else []
            bar.update(1)
        sheet_rows.append(row)
    bar.close()
    if not used:
        raise ValueError("no class has more than `shots` + 1 images: nothing held out to compare with")
    real_all = np.concatenate(reals)
    center = real_all.mean(0)  # for the centred consistency: the reals' mean feature (no sample in it)
    # every scale uses the same conditions (`which`) per class: one condition row and label per sample
    conds_all = np.concatenate([conds_feat[n][w] for n, (w, _) in zip(used, samples[guidances[0]])])
    labels = np.concatenate([np.full(len(f), c) for c, (_, f) in enumerate(samples[guidances[0]])])
    fakes = {g: np.concatenate([f for _, f in samples[g]]) for g in guidances}
    centred = {g: M.pair_cosines(conds_all, fakes[g], center) for g in guidances}
    rows, per_sample = [], {}
    for g in guidances:
        fake_all = fakes[g]
        per_sample[str(g)] = {  # same order in every row and every model evaluated with the same arguments
            "consistency": M.pair_cosines(conds_all, fake_all).tolist(),
            "consistency_centered": centred[g].tolist(),
            "class_match": M.class_matches(fake_all, labels, reals).astype(int).tolist(),
            "diversity": [M.diversity([f[w == j] for j in range(shots)], real) for (w, f), real in zip(samples[g], reals)],  # per class
        }
        p, r = M.precision_recall(real_all, fake_all, k)
        rows.append({
            "guidance": g,
            "fid": M.fid(real_all, fake_all),
            "precision": p,
            "recall": r,
            "consistency": M.consistency(conds_all, fake_all),
            "consistency_centered": float(centred[g].mean()),
            "class_match": M.class_match(fake_all, labels, reals),
            "diversity": float(np.nanmean([M.diversity([f[w == j] for j in range(shots)], real) for (w, f), real in zip(samples[g], reals)])),
        })
    if 0.0 in centred:  # same conditions and noise in every row: a paired comparison with guidance 0
        for row in rows:
            if row["guidance"] != 0.0:
                row["centred_vs_unconditional"] = M.paired_gain(centred[row["guidance"]], centred[0.0])
    ref = np.concatenate([conds_feat[n][np.arange(len(real)) % shots] for n, real in zip(used, reals)])
    real_labels = np.concatenate([np.full(len(r), c) for c, r in enumerate(reals)])
    rows.append({"guidance": "real", "fid": None, "precision": None, "recall": None, "consistency": M.consistency(ref, real_all), "consistency_centered": M.consistency(ref, real_all, center), "class_match": M.class_match(real_all, real_labels, reals, leave_one_out=True), "diversity": 1.0})
    if sheet:
        S.grid([im.resize((64, 64), Image.NEAREST) for r in sheet_rows for im in r], cols=1 + samples_per_class).save(sheet)
    return {"checkpoint": loaded.path, "step": loaded.step, "encoder": loaded.encoder_name, "metric_encoder": metric_encoder.name, "shots": shots, "samples_per_class": samples_per_class, "steps": steps, "sampler": sampler, "seed": seed, "k": k, "classes": used, "skipped_classes": skipped, "real_images": int(len(real_all)), "rows": rows, "per_sample": per_sample}


def table(result: dict) -> str:
    """The result rows as a fixed-width table."""
    head = f"{'guidance':>9} {'FID':>9} {'precision':>9} {'recall':>7} {'consistency':>11} {'centred':>8} {'class match':>11} {'diversity':>9}"
    fmt = lambda v, w, d: f"{v:>{w}.{d}f}" if isinstance(v, float) else f"{'-' if v is None else v:>{w}}"  # noqa: E731
    lines = [head] + [f"{fmt(r['guidance'], 9, 1)} {fmt(r['fid'], 9, 2)} {fmt(r['precision'], 9, 3)} {fmt(r['recall'], 7, 3)} {fmt(r['consistency'], 11, 3)} {fmt(r.get('consistency_centered'), 8, 3)} {fmt(r.get('class_match'), 11, 3)} {fmt(r['diversity'], 9, 3)}" for r in result["rows"]]
    for r in result["rows"]:
        if "centred_vs_unconditional" in r:
            c = r["centred_vs_unconditional"]
            lines.append(f"guidance {r['guidance']} vs 0, centred consistency per sample: {c['mean_diff']:+.3f}, higher in {c['higher']}/{c['n']}, paired t {c['t']:.2f} (p {c['p_t']:.3f}), Wilcoxon p {c['p_wilcoxon']:.3f}")
    return "\n".join(lines)


PAIRED = ("consistency", "consistency_centered", "class_match", "diversity")


def compare(a: dict, b: dict) -> dict:
    """Two models evaluated with the same arguments (same conditions, same noise, same metric
    encoder): per guidance scale, paired statistics of A against B. Consistency (raw and centred)
    is paired per sample (paired t and Wilcoxon), class match per sample (exact McNemar on the
    samples only one model puts in its condition's class), diversity per class (paired t/Wilcoxon)."""
    same = ("shots", "samples_per_class", "steps", "sampler", "seed", "k", "classes", "metric_encoder", "real_images")
    differ = [key for key in same if a.get(key) != b.get(key)]
    if differ:
        raise ValueError(f"the two evaluations differ in {', '.join(differ)}: not a paired comparison")
    paired = {}
    for g in a["per_sample"]:
        if g not in b["per_sample"]:
            continue
        pa, pb = a["per_sample"][g], b["per_sample"][g]
        stats = {m: M.paired_gain(pa[m], pb[m]) for m in ("consistency", "consistency_centered")}
        stats["class_match"] = M.mcnemar(pa["class_match"], pb["class_match"])
        da, db = np.array(pa["diversity"], float), np.array(pb["diversity"], float)
        ok = ~(np.isnan(da) | np.isnan(db))
        stats["diversity"] = M.paired_gain(da[ok], db[ok]) if ok.sum() >= 2 else None
        paired[g] = stats
    return {"a": a, "b": b, "paired": paired}


def compare_table(result: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """The two models' rows interleaved per guidance scale, the real reference row, then one line
    per scale and measure with the paired statistics of A against B."""
    a, b = result["a"], result["b"]
    width = max(9, *(len(n) for n in names))
    head = f"{'model':<{width}} {'guidance':>8} {'FID':>8} {'precision':>9} {'recall':>7} {'consistency':>11} {'centred':>8} {'class match':>11} {'diversity':>9}"
    fmt = lambda v, w, d: f"{v:>{w}.{d}f}" if isinstance(v, float) else f"{'-' if v is None else v:>{w}}"  # noqa: E731

    def line(name, r):
        return f"{name:<{width}} {fmt(r['guidance'], 8, 1)} {fmt(r['fid'], 8, 2)} {fmt(r['precision'], 9, 3)} {fmt(r['recall'], 7, 3)} {fmt(r['consistency'], 11, 3)} {fmt(r.get('consistency_centered'), 8, 3)} {fmt(r.get('class_match'), 11, 3)} {fmt(r['diversity'], 9, 3)}"

    rows_b = {str(r["guidance"]): r for r in b["rows"]}
    lines = [head]
    for r in a["rows"]:
        if r["guidance"] == "real":
            lines.append(line("real", r))
            continue
        lines.append(line(names[0], r))
        if str(r["guidance"]) in rows_b:
            lines.append(line(names[1], rows_b[str(r["guidance"])]))
    lines.append(f"paired, {names[0]} minus {names[1]} (same conditions and noise):")
    for g, s in result["paired"].items():
        parts = []
        for m, label in (("consistency", "consistency"), ("consistency_centered", "centred")):
            c = s[m]
            parts.append(f"{label} {c['mean_diff']:+.3f} ({names[0]} higher in {c['higher']}/{c['n']}, t {c['t']:.2f}, p {c['p_t']:.3g}, Wilcoxon p {c['p_wilcoxon']:.3g})")
        c = s["class_match"]
        parts.append(f"class match: only {names[0]} {c['only_a']}, only {names[1]} {c['only_b']} of {c['n']} (McNemar p {c['p']:.3g})")
        if s["diversity"]:
            c = s["diversity"]
            parts.append(f"diversity per class {c['mean_diff']:+.3f} ({names[0]} higher in {c['higher']}/{c['n']}, t {c['t']:.2f}, p {c['p_t']:.3g})")
        lines.append(f"  guidance {g}: " + "; ".join(parts))
    return "\n".join(lines)


def side_by_side(paths: list[str], out: str, gap: int = 16) -> None:
    """Contact sheets next to each other, a white gap between them."""
    sheets = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(s.width for s in sheets) + gap * (len(sheets) - 1), max(s.height for s in sheets)), (255, 255, 255))
    x = 0
    for s in sheets:
        canvas.paste(s, (x, 0))
        x += s.width + gap
    canvas.save(out)


def write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
