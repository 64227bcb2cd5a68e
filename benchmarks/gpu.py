"""Training throughput and MFU on whatever machine this runs on (issue 33): one command.

    python benchmarks/gpu.py [--steps 20] [--peak-tflops X] [--compile] [--json gpu.json]

On a GPU it trains the `base` U-Net (64 px, pixels), DiT-B (256 px, SD-VAE latents: 32x32x4) and,
with >= 40 GiB of GPU memory, DiT-XL, for a fixed number of steps on synthetic shards (the latent
models read stored latents, as after `webpairs latents`), with the trainer's own pieces: the model
builder, bf16 autocast, fused AdamW, the shard loader (worker processes, prefetch, pinned memory).
On a CPU it runs small sizes (the `tiny` U-Net at 32 px, DiT-S at 64 px) and prints the same columns.

Per model: samples/s over the timed steps; the loader alone (samples/s, the same shards and
workers: does it keep up?); peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's
peak RSS so far); model FLOPs per sample (forward + backward of one training step, counted by
torch.utils.flop_counter.FlopCounterMode); MFU = FLOPs/sample x samples/s / the device's dense bf16
peak (table below by device name, or --peak-tflops). The bare-library baseline measured in the same
run: a square matmul in the training dtype (TFLOP/s), against which the step's achieved TFLOP/s is
also given. Figures go to JSON (--json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time

from _common import SMOKE_HELP, report

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets; the longest
# matching name wins ("H100 PCIe" before "H100")
PEAK_BF16_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.4,
    "GH200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "H800": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


def peak_for(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def _write_shards(out: str, n: int, cond_dim: int, image_side: int, latent, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    from core import sample_layout as layout
    from core.stageio import finish_stage

    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    per_shard, shards = 64, []
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (image_side, image_side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    for first in range(0, n, per_shard):
        name = layout.SHARD_PATTERN.format(file=0, seq=first // per_shard)
        count = min(per_shard, n - first)
        with tarfile.open(os.path.join(out, name), "w") as tar:
            for i in range(first, first + count):
                files = {layout.COND_JPG: jpeg, layout.TARGET_JPG: jpeg, layout.COND_NPY: layout.npy_bytes(rng.standard_normal(cond_dim)), layout.META_JSON: b"{}"}
                if latent:
                    c, s, size = latent
                    files[layout.LATENT_NPY] = layout.npy_bytes(rng.standard_normal((c, s, s)) / 0.18215)
                    files[layout.LATENT_JSON] = json.dumps({"vae": "vae:synthetic", "scale_factor": 0.18215, "shift_factor": 0.0, "image_size": size}).encode()
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{i:016x}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"shard": name, "samples": count})
    manifest = {"stage": "shards", "shards": shards, "samples": n, "encoder": "synthetic"}
    if latent:
        manifest["latent"] = {"vae": "vae:synthetic", "channels": latent[0], "factor": latent[2] // latent[1], "scale_factor": 0.18215, "image_size": latent[2]}
    with open(os.path.join(out, layout.MANIFEST), "w") as fh:
        json.dump(manifest, fh)
    with open(os.path.join(out, "stats.json"), "w") as fh:
        json.dump({"stage": "shards", "input": n, "kept": n, "rejected": {}}, fh)
    finish_stage(out, "shards")
    return out


class _Space:
    """The shape side of a latent space, without a VAE (the timed steps never run one)."""

    def __init__(self, channels: int, factor: int):
        self.channels, self.factor = channels, factor


def matmul_tflops(device, dtype, n: int, reps: int) -> float:
    """The bare-library baseline: TFLOP/s of an n x n matmul in `dtype` on `device`."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_model(spec: dict, args, device, tmp: str) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from train.data import DataConfig, make_loader
    from train.diffusion import diffusion_loss, make_scheduler
    from train.train import TrainConfig, autocast_for, build_for_training, make_optimizer

    latent = spec["latent"]
    size = spec["image_size"]
    space = _Space(4, 8) if latent else _Space(3, 1)
    lat = (4, size // 8, size) if latent else None
    n = 16 if args.smoke else max(256, spec["batch"] * 8)
    shards = _write_shards(os.path.join(tmp, spec["name"]), n, args.cond_dim, 64 if latent else size, lat)
    cfg = TrainConfig(backbone=spec["backbone"], preset=spec["preset"], image_size=size, latent="vae:synthetic" if latent else "none", batch_size=spec["batch"], precision=args.precision)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model = build_for_training(cfg, args.cond_dim, space, device)
    params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, cfg)
    run = torch.compile(model) if args.compile else model
    sch = make_scheduler()
    workers = args.loader_workers if args.loader_workers >= 0 else (min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 1)
    data = DataConfig(shards=shards, image_size=size, batch_size=spec["batch"], shuffle_buffer=64, num_workers=workers, latent=cfg.resolved_latent(), pin_memory=device.type == "cuda")
    autocast = autocast_for(device, args.precision)
    fmt = torch.channels_last if spec["backbone"] == "unet" else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)

    def loss_of(x, c):
        with autocast:
            return diffusion_loss(run, sch, x.to(device, non_blocking=True).contiguous(memory_format=fmt), c.to(device, non_blocking=True), 0.1, gen)

    batches = iter(make_loader(data))
    x, c, _ = next(batches)
    with FlopCounterMode(display=False) as counter:  # forward + backward of one step (uncompiled)
        with autocast:
            loss = diffusion_loss(model, sch, x.to(device).contiguous(memory_format=fmt), c.to(device), 0.1, gen)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    flops_per_sample = counter.get_total_flops() / spec["batch"]

    def step():
        x, c, _ = next(batches)
        loss = loss_of(x, c)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    _sync(device)
    seconds = time.perf_counter() - start
    rate = args.steps * spec["batch"] / seconds
    # the loader alone, the same workers (already started): samples/s it can deliver
    start = time.perf_counter()
    k = max(2 if args.smoke else 4, args.steps)
    for _ in range(k):
        next(batches)
    loader_rate = k * spec["batch"] / (time.perf_counter() - start)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    achieved = flops_per_sample * rate / 1e12
    row = {
        "model": spec["name"], "backbone": spec["backbone"], "preset": spec["preset"], "image_size": size, "space": "SD-VAE latents 4x%dx%d" % (size // 8, size // 8) if latent else f"pixels 3x{size}x{size}",
        "params_m": params / 1e6, "batch": spec["batch"], "steps": args.steps, "seconds": seconds, "samples_per_s": rate, "loader_samples_per_s": loader_rate,
        "gflops_per_sample": flops_per_sample / 1e9, "achieved_tflops": achieved, "peak_mem_gib": peak_mem, "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "precision": "bf16" if (args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")) else "fp32", "compiled": args.compile, "loader_workers": workers,
    }
    del model, opt, run, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=0, help="timed steps per model (default: 20 on a GPU, 4 on a CPU)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 5 on a GPU, 1 on a CPU; more with --compile)")
    ap.add_argument("--batch", type=int, default=0, help="batch size for every model (default: per model)")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak in TFLOP/s (default: the table by device name; none on a CPU)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model (compilation is not timed)")
    ap.add_argument("--loader-workers", type=int, default=-1, help="loader processes (default: cores - 1 up to 8 on a GPU, 1 on a CPU)")
    ap.add_argument("--cond-dim", type=int, default=768, help="condition embedding size (default 768, DINOv2-B)")
    ap.add_argument("--models", default="", help="comma-separated subset of the model names")
    ap.add_argument("--json", default="", help="write the figures here (default: gpu-<cuda|cpu>.json in the temporary folder)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch = args.steps or 1, args.warmup or 1, args.batch or 2
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    args.steps = args.steps or (20 if cuda else 4)
    args.warmup = args.warmup or ((10 if args.compile else 5) if cuda else 1)
    if cuda:
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        specs = [
            {"name": "unet-base-64px", "backbone": "unet", "preset": "base", "image_size": 64, "latent": False, "batch": 64},
            {"name": "dit-B-256px", "backbone": "dit", "preset": "B", "image_size": 256, "latent": True, "batch": 64},
        ]
        if mem >= 40:
            specs.append({"name": "dit-XL-256px", "backbone": "dit", "preset": "XL", "image_size": 256, "latent": True, "batch": 64})
    else:
        specs = [
            {"name": "unet-tiny-32px", "backbone": "unet", "preset": "tiny", "image_size": 32, "latent": False, "batch": 8},
            {"name": "dit-S-64px", "backbone": "dit", "preset": "S", "image_size": 64, "latent": True, "batch": 8},
        ]
    if args.models:
        wanted = set(args.models.split(","))
        specs = [s for s in specs if s["name"] in wanted]
    if args.smoke:
        specs = specs[:1]
    if args.batch:
        for s in specs:
            s["batch"] = args.batch
    peak = args.peak_tflops or (peak_for(name) if cuda else None)
    dtype = torch.bfloat16 if (args.precision == "bf16" or (args.precision == "auto" and cuda)) else torch.float32
    base = matmul_tflops(device, dtype, 8192 if cuda else (256 if args.smoke else 1024), 20 if cuda else 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            row = run_model(spec, args, device, tmp)
            row["mfu"] = row["achieved_tflops"] / peak if peak else None
            row["of_matmul"] = row["achieved_tflops"] / base
            rows.append(row)
    print(f"\n== training throughput on {name} ({'peak %.0f TFLOP/s dense bf16' % peak if peak else 'no peak known: pass --peak-tflops for MFU'}; bare {dtype} matmul: {base:.2f} TFLOP/s) ==")
    print(f"  {'model':16s} {'space':24s} {'params':>7s} {'batch':>5s} {'samples/s':>10s} {'loader/s':>9s} {'GFLOP/sample':>12s} {'TFLOP/s':>8s} {'MFU':>6s} {'of matmul':>9s} {'peak mem':>9s}")
    for r in rows:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "     -"
        print(f"  {r['model']:16s} {r['space']:24s} {r['params_m']:6.1f}M {r['batch']:5d} {r['samples_per_s']:10.1f} {r['loader_samples_per_s']:9.0f} {r['gflops_per_sample']:12.2f} {r['achieved_tflops']:8.3f} {mfu} {100 * r['of_matmul']:8.1f}% {r['peak_mem_gib']:7.2f}Gi")
    doc = {"device": name, "peak_tflops": peak, "matmul_tflops": base, "matmul_dtype": str(dtype), "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = args.json or os.path.join(tempfile.gettempdir(), f"gpu-{'cuda' if cuda else 'cpu'}.json")
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"  written: {path}")
    results = []
    for r in rows:
        results.append(report(f"gpu.py {r['model']}: loader keeps up (loader / step samples/s)", [("training steps", r["samples_per_s"], "samples/s"), ("loader alone", r["loader_samples_per_s"], "samples/s")], r["loader_samples_per_s"] / r["samples_per_s"], 1.0))
        if r["mfu"] is not None and r["model"].startswith("dit-B"):
            results.append(report(f"gpu.py {r['model']}: bf16 MFU", [("achieved", r["achieved_tflops"], "TFLOP/s"), ("peak (dense bf16)", peak, "TFLOP/s")], r["mfu"], 0.4))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
