"""CPU training speed, all measured in one run on the demo's shards (real photos when ../shared is
present):

1. the step of `small` as the trainer runs it now (cross-attention at 8 px only, channels_last,
   fused AdamW) against the step as it was (attention at 16 and 8 px, contiguous, foreach AdamW),
   one thread each as a Ray worker gets on 2 cores; `--compile` adds torch.compile of the new step;
2. is the data loader the bottleneck? loader samples/s against samples/s consumed by the steps;
3. `webpairs train` itself: samples/s over steps 10-40 with 2 workers x 1 thread and 1 worker x 2
   threads, and the time from the command's start to its first step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import SMOKE_HELP, ROOT, SHARED, report


def loader_rate(shards: str, batch: int, n_batches: int, workers: int) -> float:
    from train.data import DataConfig, make_loader

    it = iter(make_loader(DataConfig(shards=shards, batch_size=batch, num_workers=workers, shuffle_buffer=64)))
    next(it)  # start-up (worker processes, first shard) is not throughput
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - start)


def step_rate(model, cond_dim: int, batch: int, n_steps: int, channels_last: bool, fused: bool, compile_model: bool = False) -> tuple[float, float]:
    """(samples/s over n_steps, seconds of the first two steps: compilation when compiling)."""
    import torch

    from train.diffusion import diffusion_loss, make_scheduler

    size = model.preset.image_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    sch = make_scheduler()
    x, c = (torch.rand(batch, 3, size, size) * 2 - 1).contiguous(memory_format=fmt), torch.randn(batch, cond_dim)
    run = torch.compile(model) if compile_model else model

    def step():
        loss = diffusion_loss(run, sch, x, c, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()

    start = time.perf_counter()
    step()
    step()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps * batch / (time.perf_counter() - start), warm


def old_small(cond_dim: int):
    """`small` as it was before issue 18: cross-attention at 16 and 8 px."""
    import dataclasses

    from train.models import PRESETS, SemanticaUNet

    return SemanticaUNet(dataclasses.replace(PRESETS["small"], attention_blocks=2), cond_dim)


def trainer_rate(shards: str, run_dir: str, workers: int, steps: int = 40, preset: str = "small") -> tuple[float, float]:
    """(samples/s of `webpairs train --preset PRESET` over steps steps/4-steps, seconds from start to step 1)."""
    start = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "webpairs.cli", "train", shards, "--out", run_dir, "--steps", str(steps), "--workers", str(workers), "--preset", preset]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)  # cwd: benchmarks/train.py must not shadow the train package
    if out.returncode != 0:
        raise SystemExit(f"webpairs train failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        times = {d["step"]: d["time"] for d in map(json.loads, fh)}
    first = steps // 4
    return (steps - first) * 8 * workers / (times[steps] - times[first]), times[1] - start


def main() -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the new step (minutes of compilation)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    if args.smoke:  # the same calls on less: a 6-page demo web, batch 2, one timed step, `tiny` in the Ray run
        args.steps, args.batch = 1, 2
    import torch

    from train.data import DataConfig, condition_dim
    from train.models import build_model
    from webpairs.run import demo

    photos = os.path.join(SHARED, "photos-imagenet-sample")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        demo(os.path.join(tmp, "demo"), photos if os.path.isdir(photos) else None, model=False, **(dict(pages=6, topics=3) if args.smoke else {}))
        shards = os.path.join(tmp, "demo", "shards")
        dim = condition_dim(DataConfig(shards=shards))
        torch.manual_seed(0)
        torch.set_num_threads(1)  # what each of 2 Ray workers gets on 2 cores
        before, _ = step_rate(old_small(dim), dim, args.batch, args.steps, channels_last=False, fused=False)
        after, _ = step_rate(build_model("small", dim), dim, args.batch, args.steps, channels_last=True, fused=True)
        rows = [("before: attention 16+8 px, contiguous, foreach AdamW", before, "samples/s"), ("after: attention 8 px, channels_last, fused AdamW", after, "samples/s")]
        if args.compile:
            compiled, warm = step_rate(build_model("small", dim), dim, args.batch, args.steps, channels_last=True, fused=True, compile_model=True)
            rows.append((f"after + torch.compile ({warm:.0f} s to compile)", compiled, "samples/s"))
        results.append(report(f"small training step, 1 thread, batch {args.batch}: after / before", rows, after / before, 1.3))
        load = loader_rate(shards, args.batch, 4 if args.smoke else 40, args.loader_workers)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.loader_workers))
        for preset in ("tiny", "small"):
            rate, _ = step_rate(build_model(preset, dim), dim, args.batch, args.steps, channels_last=True, fused=True)
            results.append(report(f"train loader vs {preset} steps (batch {args.batch}, 1 process)", [("loader alone", load, "samples/s"), (f"{preset} training steps", rate, "samples/s")], load / rate, 3.0))
        if args.smoke:  # one Ray Train run proves the path (Ray's start-up is most of a smoke run); its figures stand for both
            one, first = trainer_rate(shards, os.path.join(tmp, "run1"), 1, 4, "tiny")
            two = one
        else:
            two, first = trainer_rate(shards, os.path.join(tmp, "run2"), 2, 40)
            one, _ = trainer_rate(shards, os.path.join(tmp, "run1"), 1, 40)
        results.append(report("webpairs train --preset small, steps 10-40: 2 workers x 1 thread / 1 worker x 2 threads", [("2 Ray workers (DDP), 1 thread each", two, "samples/s"), ("1 Ray worker, 2 threads", one, "samples/s")], two / one, 1.0))
        print(f"\n  time from `webpairs train` start to the first step (2 workers, local ray.init): {first:.1f} s")
    return results


if __name__ == "__main__":
    main()
