"""Condition inversion for interpolation (issue 33, point 5), measured on real photos.

Trains the `tiny` U-Net (32 px, pixels) on the shared ImageNet photos, each conditioned on its own
efficientnet-lite0 embedding (the offline encoder), then interpolates between photo pairs of
different classes twice with the same noise: with the encoder's embeddings of the ends, and with
embeddings inverted for `--invert` steps (`generate.sample.invert_condition`). Per pair:

* ends: how close the end frames come back to the end photos (pixel RMSE at 32 px, and cosine of
  their encoder embeddings);
* path: consecutive-frame pixel distances d_i; evenness = max d_i / mean d_i (1 = even steps) and
  detour = sum d_i / |last - first| (1 = a straight path).

    python benchmarks/inversion.py [--train-steps 300] [--invert 40] [--pairs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _common import SMOKE_HELP, need_shared, report


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--invert-batch", type=int, default=8, help="noises per inversion step")
    ap.add_argument("--invert", type=int, default=40)
    ap.add_argument("--invert-lr", type=float, default=0.02)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--frames", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--noise", type=float, default=0.5, help="noise level of the interpolation")
    ap.add_argument("--every", type=int, default=3, help="use every N-th photo (default 3: 10 of each class's 30)")
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    if args.smoke:
        args.train_steps, args.batch, args.invert, args.pairs, args.frames, args.steps, args.every = 2, 4, 1, 1, 3, 2, 10

    import numpy as np
    import torch

    from core.encoders import load_encoder
    from generate import sample as S
    from generate.images import embed, read_image, to_model
    from train.data import augment
    from train.diffusion import EMA, diffusion_loss, make_scheduler
    from train.models import build_model

    photos = need_shared("photos-imagenet-sample")
    names = sorted(n for n in os.listdir(photos) if n.lower().endswith((".jpeg", ".jpg", ".png")))[:: args.every]
    images = [read_image(os.path.join(photos, n)) for n in names]
    enc = load_encoder("efficientnet-lite0")
    conds = torch.from_numpy(embed(enc, images))
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build_model("tiny", conds.shape[1])
    ema = EMA(model, 0.995)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    sch = make_scheduler()
    rng = np.random.default_rng(0)
    start = time.time()
    for step in range(args.train_steps):
        idx = rng.integers(0, len(images), args.batch)
        x = torch.from_numpy(np.stack([augment(images[i], 32, rng) for i in idx]))
        loss = diffusion_loss(model, sch, x, conds[idx], 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model, step)
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    net = ema.model.eval()

    def path_stats(frames: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ea, eb) -> dict:
        f = frames.flatten(1).double()
        d = (f[1:] - f[:-1]).norm(dim=1)
        e = torch.from_numpy(embed(enc, S.to_pil(frames)))
        rmse = lambda u, v: float(((u - v) ** 2).mean().sqrt() / 2 * 255)  # noqa: E731 - in 0..255 grey levels
        return {
            "end_rmse": (rmse(frames[0], a) + rmse(frames[-1], b)) / 2,
            "end_cosine": float((e[0] @ ea + e[-1] @ eb) / 2),
            "evenness": float(d.max() / d.mean()),
            "detour": float(d.sum() / (f[-1] - f[0]).norm()),
        }

    # pairs of photos of different classes (the folder is sorted by class: 30 per class)
    per = len(images) // 10
    pairs = [(k * per + 1, ((k + 5) % 10) * per + 2) for k in range(args.pairs)]
    rows = {"encoder": [], "inverted": []}
    for ia, ib in pairs:
        xa, xb = to_model([images[ia], images[ib]], 32, "cpu")
        ea, eb = conds[ia], conds[ib]
        ends = {"encoder": (ea, eb), "inverted": tuple(S.invert_condition(net, x, c, args.invert, args.invert_lr, batch=args.invert_batch, seed=i) for i, (x, c) in enumerate(((xa, ea), (xb, eb))))}
        for kind, (ca, cb) in ends.items():
            frames, _ = S.interpolate(net, xa, xb, ca, cb, args.frames, (args.noise, args.noise), 1, seed=0, steps=args.steps)
            rows[kind].append(path_stats(frames[0], xa, xb, ea, eb))
    summary = {kind: {m: float(np.mean([r[m] for r in rs])) for m in rs[0]} for kind, rs in rows.items()}
    better = {m: sum((i[m] < e[m]) if m != "end_cosine" else (i[m] > e[m]) for i, e in zip(rows["inverted"], rows["encoder"])) for m in rows["encoder"][0]}
    print(f"\n== condition inversion ({args.invert} steps) vs the encoder's embeddings: {len(pairs)} photo pairs, tiny U-Net after {args.train_steps} steps ==")
    print(f"  {'':10s} {'end RMSE':>9s} {'end cosine':>11s} {'evenness':>9s} {'detour':>7s}")
    for kind, s in summary.items():
        print(f"  {kind:10s} {s['end_rmse']:9.2f} {s['end_cosine']:11.3f} {s['evenness']:9.3f} {s['detour']:7.3f}")
    print(f"  inverted better in (of {len(pairs)}): " + ", ".join(f"{m} {n}" for m, n in better.items()))
    enc_s, inv_s = summary["encoder"], summary["inverted"]
    result = report(
        f"condition inversion ({args.invert} steps): end RMSE with the encoder's embeddings / with inverted ones",
        [("end RMSE, encoder embeddings", enc_s["end_rmse"], "grey levels"), ("end RMSE, inverted", inv_s["end_rmse"], "grey levels"), ("path evenness, encoder", enc_s["evenness"], "max/mean step"), ("path evenness, inverted", inv_s["evenness"], "max/mean step")],
        enc_s["end_rmse"] / inv_s["end_rmse"], 1.0,
    )
    doc = {"args": vars(args), "summary": summary, "per_pair": rows, "inverted_better_in": better, "pairs": [(names[a], names[b]) for a, b in pairs]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
