"""Is the data loader the bottleneck? samples/s of the loader alone against samples/s consumed by
training steps (tiny and small presets, CPU), and the time from `webpairs train` to its first step.

Shards come from the demo pipeline on the loopback web (real photos when ../shared is present).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, SHARED, report


def loader_rate(shards: str, batch: int, n_batches: int, workers: int) -> float:
    from train.data import DataConfig, make_loader

    it = iter(make_loader(DataConfig(shards=shards, batch_size=batch, num_workers=workers, shuffle_buffer=64)))
    next(it)  # start-up (worker processes, first shard) is not throughput
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - start)


def train_rate(preset: str, cond_dim: int, batch: int, n_steps: int) -> float:
    import torch

    from train.diffusion import diffusion_loss, make_scheduler
    from train.models import build_model

    model = build_model(preset, cond_dim)
    size = model.preset.image_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sch = make_scheduler()
    x, c = torch.rand(batch, 3, size, size) * 2 - 1, torch.randn(batch, cond_dim)

    def step():
        loss = diffusion_loss(model, sch, x, c, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps * batch / (time.perf_counter() - start)


def time_to_first_step(shards: str, run_dir: str) -> float:
    start = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "webpairs.cli", "train", shards, "--out", run_dir, "--steps", "2", "--workers", "2"], env=env, cwd=ROOT, capture_output=True, text=True)  # cwd: benchmarks/train.py must not shadow the train package
    if out.returncode != 0:
        raise SystemExit(f"webpairs train failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return json.loads(fh.readline())["time"] - start


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loader-workers", type=int, default=1)
    args = ap.parse_args()
    import torch

    from train.data import DataConfig, condition_dim
    from webpairs.run import demo

    photos = os.path.join(SHARED, "photos-imagenet-sample")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        demo(os.path.join(tmp, "demo"), photos if os.path.isdir(photos) else None)
        shards = os.path.join(tmp, "demo", "shards")
        dim = condition_dim(DataConfig(shards=shards))
        load = loader_rate(shards, args.batch, 40, args.loader_workers)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.loader_workers))
        for preset, steps in (("tiny", 15), ("small", 5)):
            rate = train_rate(preset, dim, args.batch, steps)
            results.append(report(f"train loader vs {preset} steps (batch {args.batch}, 1 process)", [("loader alone", load, "samples/s"), (f"{preset} training steps", rate, "samples/s")], load / rate, 3.0))
        first = time_to_first_step(shards, os.path.join(tmp, "run"))
        print(f"\n  time from `webpairs train` start to the first step (2 workers, local ray.init): {first:.1f} s")
    return results


if __name__ == "__main__":
    main()
