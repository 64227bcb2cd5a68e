"""`webpairs sample variations|edit|interpolate` and `webpairs eval`: commands over a trained checkpoint."""

from __future__ import annotations

import argparse
import os

from webpairs.errors import UserError

CKPT_HELP = "a `webpairs train` run directory (its latest checkpoint) or one checkpoint folder"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the PNGs, sheet.png and meta.json")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (0 = unconditional; default 3.0)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps over the whole schedule (default 50)")
    p.add_argument("--sampler", choices=["ddim", "dpm"], default="ddim", help="DDIM or DPM-Solver++ (default ddim)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same pixels (default 0)")
    _model_args(p)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--encoder", default="", help="condition encoder: must be the one the checkpoint records (only checkpoints that record none need it)")
    p.add_argument("--backbone", default="", choices=["", "unet", "dit"], help="refuse a checkpoint of another backbone (default: take the recorded one)")
    p.add_argument("--latent", default="", metavar="vae:ID", help="refuse a checkpoint of another latent space ('none' = pixels; default: take the recorded one)")
    p.add_argument("--encoder-weights", default="", metavar="FILE", help="local weights for that encoder")


def register_sample(sub, handlers) -> None:
    p = sub.add_parser("sample", help="image variations, SDEdit edits and interpolations from a checkpoint")
    ops = p.add_subparsers(dest="op", metavar="OP", required=True)

    v = ops.add_parser("variations", help="new images that keep the semantics of IMG", description="Sample n images conditioned on the frozen embedding of IMG (classifier-free guidance).")
    v.add_argument("checkpoint", help=CKPT_HELP)
    v.add_argument("--image", required=True, help="the condition image")
    v.add_argument("--n", type=int, default=8, help="how many variations (default 8)")
    _common(v)

    e = ops.add_parser("edit", help="SDEdit: noise a guide part-way and denoise it back", description="SDEdit (Meng et al. 2021): noise GUIDE to --strength of the schedule (0.3-0.6 recommended) and denoise it, conditioned on --cond or on the guide itself. With --mask (white = may change) the rest of the guide stays as it is.")
    e.add_argument("checkpoint", help=CKPT_HELP)
    e.add_argument("--guide", required=True, help="a stroke painting or an image to change")
    e.add_argument("--strength", type=float, default=0.5, help="noise level t0 in [0, 1] (default 0.5; 0 returns the guide)")
    e.add_argument("--mask", help="mask image: white = region that may change")
    e.add_argument("--cond", help="condition image (default: the guide)")
    e.add_argument("--n", type=int, default=4, help="how many edits (default 4)")
    _common(e)

    i = ops.add_parser("interpolate", help="frames between two images (shared noise, slerp, CLIP-ranked)", description="Wang & Golland (2023): noise A and B with shared noise, slerp the noisy images and the condition embeddings, denoise; K candidates per frame (other seeds and noise levels), the best kept by CLIP score of --rank-prompt minus --negative-prompt (text-tower encoders) or by closeness to the interpolated embedding.")
    i.add_argument("checkpoint", help=CKPT_HELP)
    i.add_argument("--a", required=True, help="first image")
    i.add_argument("--b", required=True, help="last image")
    i.add_argument("--frames", type=int, default=9, help="frames including both ends (default 9)")
    i.add_argument("--noise", default="0.30..0.55", help="noise level range LOW..HIGH, fractions of the schedule (default 0.30..0.55)")
    i.add_argument("--candidates", type=int, default=4, help="candidates per frame (default 4)")
    i.add_argument("--rank-prompt", default="", help="rank candidates by CLIP similarity to this text")
    i.add_argument("--negative-prompt", default="", help="... minus the similarity to this text")
    i.add_argument("--invert", type=int, default=0, metavar="N", help="condition inversion: optimise each end's embedding for N steps so that the model reconstructs that end, then interpolate between those (default 0: the encoder's embeddings)")
    i.add_argument("--invert-lr", type=float, default=0.02, help="Adam learning rate of the inversion (default 0.02)")
    _common(i)
    handlers["sample"] = cmd_sample

    ev = sub.add_parser("eval", help="few-shot generation scored against held-out real images (FID, precision/recall, consistency, diversity)", description="Condition on --shots images of each class, generate --samples-per-class images per guidance scale, score them against the class's other images on encoder features; prints a table and writes JSON. With --compare RUN_A RUN_B, both models get the same conditions, noise and metric encoder, and the table pairs them (the Semantica ablation: same-page pairs against self-pairing).")
    ev.add_argument("checkpoint", nargs="?", help=CKPT_HELP + " (or --compare RUN_A RUN_B)")
    ev.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="evaluate two models on the same conditions and noise and print paired statistics of A against B")
    ev.add_argument("--images", required=True, help="folder with one sub-folder per class (or a flat folder with --topics)")
    ev.add_argument("--topics", type=int, default=0, help="cut a flat folder's sorted images into N contiguous classes (e.g. 10 for photos-imagenet-sample)")
    ev.add_argument("--shots", type=int, default=1, help="condition images per class (default 1)")
    ev.add_argument("--samples-per-class", type=int, default=8, help="default 8")
    ev.add_argument("--guidance", type=float, nargs="+", default=[3.0, 0.0], help="guidance scales to score; 0 = unconditional baseline (default: 3.0 0.0)")
    ev.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    ev.add_argument("--sampler", choices=["ddim", "dpm"], default="ddim")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--metric-encoder", default="", help="encoder for the metric features (default: the model's encoder)")
    ev.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds of precision/recall (default 3)")
    ev.add_argument("--out", default="", help="JSON result file (default CHECKPOINT/eval.json, with --compare RUN_A/compare.json); contact sheets go beside it")
    _model_args(ev)
    handlers["eval"] = cmd_eval


def _load(args, checkpoint: str = ""):
    from core.encoders import EncoderUnavailable, load_encoder
    from generate.images import CheckpointError, load_model

    checkpoint = checkpoint or args.checkpoint
    if not os.path.exists(checkpoint):
        raise UserError(f"checkpoint {checkpoint} does not exist")
    try:
        loaded = load_model(checkpoint, args.device, ema=not args.raw_weights, encoder=args.encoder, backbone=args.backbone, latent=args.latent)
        encoder = load_encoder(loaded.encoder_name, args.encoder_weights)
    except (CheckpointError, EncoderUnavailable) as err:
        raise UserError(str(err)) from err
    return loaded, encoder


def _image(path: str):
    from generate.images import read_image

    if not os.path.isfile(path):
        raise UserError(f"image {path} does not exist")
    try:
        return read_image(path)
    except ValueError as err:
        raise UserError(str(err)) from err


def _noise_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(".."))
    except ValueError as err:
        raise UserError(f"--noise must look like 0.30..0.55, got {text!r}") from err
    return lo, hi


def cmd_sample(args, _beam_args) -> int:
    from generate import images as generate

    common = dict(guidance=args.guidance, steps=args.steps, sampler=args.sampler, seed=args.seed)
    if args.op == "variations":
        image = _image(args.image)
        loaded, enc = _load(args)
        paths = generate.variations(loaded, enc, image, args.out, n=args.n, **common)
    elif args.op == "edit":
        guide, mask, cond = _image(args.guide), args.mask and _image(args.mask), args.cond and _image(args.cond)
        loaded, enc = _load(args)
        try:
            paths = generate.edit(loaded, enc, guide, args.out, args.strength, mask or None, cond or None, n=args.n, **common)
        except ValueError as err:
            raise UserError(str(err)) from err
    else:
        a, b, noise = _image(args.a), _image(args.b), _noise_range(args.noise)
        loaded, enc = _load(args)
        try:
            paths = generate.interpolate(loaded, enc, a, b, args.out, args.frames, noise, args.candidates, args.rank_prompt, args.negative_prompt, **common, invert=args.invert, invert_lr=args.invert_lr)
        except ValueError as err:
            raise UserError(str(err)) from err
    print(f"{len(paths)} images ({loaded.size}x{loaded.size}) from step {loaded.step} in {args.out}; contact sheet: {os.path.join(args.out, 'sheet.png')}")
    return 0


def cmd_eval(args, _beam_args) -> int:
    from core.encoders import EncoderUnavailable, load_encoder
    from generate import evaluate

    if bool(args.checkpoint) == bool(args.compare):
        raise UserError("give one CHECKPOINT, or --compare RUN_A RUN_B (not both)")
    try:
        classes = evaluate.load_classes(args.images, args.topics)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    runs = args.compare or [args.checkpoint]
    models = [_load(args, run) for run in runs]
    if len({m.size for m, _ in models}) > 1:
        raise UserError(f"the models generate at different resolutions ({', '.join(f'{m.size}px' for m, _ in models)}): their samples cannot be scored on the same features")
    try:
        metric = load_encoder(args.metric_encoder) if args.metric_encoder else models[0][1]
    except EncoderUnavailable as err:
        raise UserError(str(err)) from err
    out = args.out or os.path.join(models[0][0].path if not args.compare else runs[0], "compare.json" if args.compare else "eval.json")
    base = os.path.splitext(out)[0]
    sheets = [f"{base}_sheet.png"] if not args.compare else [f"{base}_sheet_a.png", f"{base}_sheet_b.png"]
    results = []
    for (loaded, enc), sheet in zip(models, sheets):
        try:
            results.append(evaluate.evaluate(loaded, enc, classes, args.shots, args.samples_per_class, tuple(args.guidance), args.steps, args.sampler, args.seed, metric, args.k, sheet))
        except ValueError as err:
            raise UserError(str(err)) from err
    loaded = models[0][0]
    print(f"step {loaded.step}, {len(results[0]['classes'])} classes, {args.shots} shot(s), {args.samples_per_class} samples per class, metric encoder {results[0]['metric_encoder']}")
    if not args.compare:
        evaluate.write(results[0], out)
        print(evaluate.table(results[0]))
        print(f"written: {out} and {sheets[0]}")
        return 0
    result = evaluate.compare(*results)
    evaluate.write(result, out)
    names = ("A", "B")
    for name, run, (m, _) in zip(names, runs, models):
        print(f"{name}: {run} (step {m.step}, encoder {m.encoder_name})")
    print(evaluate.compare_table(result, names))
    side = f"{base}_sheets.png"
    evaluate.side_by_side(sheets, side)
    print(f"written: {out}, {sheets[0]}, {sheets[1]} and {side} (A left, B right)")
    return 0
