"""`webpairs train`: Ray Train (TorchTrainer, DDP) training of the image-conditioned diffusion model.

main phases: (1) config and Ray; (2) TorchTrainer with ScalingConfig/RunConfig; per worker:
(3) model (U-Net or DiT backbone, in pixel or VAE latent space), EMA, optimizer, restored from the
latest checkpoint if any; (4) the step loop: stream batches (stored latents, or pixels the VAE
encodes on the device), v-prediction loss with CFG dropout under bf16 autocast (GPU; `precision`),
optionally torch.compile'd, gradient accumulation (DDP syncs once per optimizer step) and clipping, EMA;
(5) every `checkpoint_every` steps and at the end: safetensors weights + optimizer + step, reported
to Ray (every rank reports; rank 0 attaches the checkpoint). A rerun with the same RUN_DIR resumes,
and so does Ray after a worker dies (FailureConfig).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from typing import ClassVar, Optional

log = logging.getLogger(__name__)
RUN_NAME = "train"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Trainer settings (YAML section `train`)."""

    preset: str = "tiny"  # model size, see train/models.py PRESETS (unet) and DIT_PRESETS (dit)
    backbone: str = "unet"  # or "dit" (a diffusers PixArt transformer, DiT-S/B/L/XL presets)
    image_size: int = 0  # pixels; 0 = the preset's
    latent: str = ""  # "" = vae:stabilityai/sd-vae-ft-mse at >= 256 px, else pixels; "none" = pixels; vae:<id or folder>
    precision: str = "auto"  # "auto": bf16 autocast on a GPU, fp32 on CPU; "bf16" or "fp32" anywhere
    compile: bool = False  # torch.compile the model for training
    compile_backend: str = "inductor"  # torch.compile backend ("eager"/"aot_eager" check the plumbing cheaply)
    steps: int = 200  # optimizer steps in total (a resumed run continues to this number)
    batch_size: int = 8  # per worker and micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-4
    warmup: int = 20  # linear warm-up steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # probability of the null condition (classifier-free guidance)
    prediction: str = "v_prediction"  # or "epsilon"
    pairing: str = "same-page"  # or "self": condition on the target itself (reconstruction baseline)
    encoder: str = ""  # "" = use the embeddings stored in the shards; else compute with this encoder
    encoder_weights: str = ""
    workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    loader_workers: int = 1  # DataLoader processes per rank
    shuffle_buffer: int = 256
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 100  # EMA sample grid of fixed condition images every N steps (0: off)
    sample_steps: int = 20  # sampler steps for those grids
    sample_conditions: int = 4  # fixed condition images in the grid
    max_failures: int = 2  # worker-group restarts Ray may do (resuming from the last checkpoint)
    seed: int = 0
    fail_at_step: int = -1  # testing only: rank 1 exits once at this step (fault tolerance test)

    RANGES: ClassVar[dict] = {
        "steps": (1, 10**9), "batch_size": (1, 65536), "grad_accum": (1, 4096), "lr": (1e-8, 1.0), "warmup": (0, 10**9), "weight_decay": (0.0, 1.0),
        "grad_clip": (0.0, 1e6), "ema_decay": (0.0, 1.0), "p_uncond": (0.0, 1.0), "workers": (1, 100_000), "loader_workers": (0, 256),
        "shuffle_buffer": (1, 10**7), "checkpoint_every": (1, 10**9), "keep_checkpoints": (1, 1000), "log_every": (1, 10**9), "sample_every": (0, 10**9),
        "sample_steps": (1, 1000), "sample_conditions": (1, 64), "max_failures": (-1, 1000), "seed": (0, 2**32 - 1), "fail_at_step": (-1, 10**9),
        "image_size": (0, 4096),
    }
    CHOICES: ClassVar[dict] = {
        "preset": ("tiny", "small", "base", "large", "base256", "large512", "S", "B", "L", "XL"), "backbone": ("unet", "dit"), "prediction": ("v_prediction", "epsilon"),
        "pairing": ("same-page", "self"), "precision": ("auto", "bf16", "fp32"), "compile_backend": ("inductor", "eager", "aot_eager", "cudagraphs"),
    }

    def resolved_size(self) -> int:
        """The image size in pixels (ValueError for a preset the backbone lacks)."""
        from train.models import preset_of

        return self.image_size or preset_of(self.backbone, self.preset).image_size

    def resolved_latent(self) -> str:
        """The latent space: the SD VAE by default at 256 px and above, else pixels."""
        from core.latents import DEFAULT_VAE, normalise
        from train.models import LATENT_MIN_SIZE

        if not self.latent.strip():
            return DEFAULT_VAE if self.resolved_size() >= LATENT_MIN_SIZE else "pixel"
        return normalise(self.latent)


class CheckpointError(ValueError):
    """A checkpoint folder whose files cannot be read; the message names the file."""


OPTIMIZER_FILE = "optimizer.safetensors"


def _optimizer_parts(state: dict) -> tuple[dict, dict]:
    """An optimizer state_dict as (tensors for safetensors, plain JSON): nothing needs pickle."""
    import torch

    tensors, plain = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain["scalars"].setdefault(str(idx), {})[name] = value
    return tensors, plain


def _optimizer_state(tensors: dict, plain: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in plain["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": plain["param_groups"]}


def _save(folder: str, model, ema, opt, step: int, cfg: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.model.state_dict().items()}, os.path.join(folder, "ema.safetensors"))
    tensors, plain = _optimizer_parts(opt.state_dict())
    save_file(tensors, os.path.join(folder, OPTIMIZER_FILE))
    with open(os.path.join(folder, "state.json"), "w") as fh:
        json.dump({"step": step, "config": cfg, "optimizer": plain, **meta}, fh)


def read_checkpoint(folder: str, parts: tuple = ("model", "ema", "optimizer")) -> dict:
    """Everything a checkpoint folder holds, read and checked before any of it is applied:
    {"step", "state" (state.json), "model", "ema", "optimizer" (state dicts)}. Nothing is unpickled:
    weights and optimizer tensors are safetensors, the rest JSON. CheckpointError names the file."""
    from safetensors.torch import load_file

    def read(name: str, loader):
        path = os.path.join(folder, name)
        try:
            return loader(path)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing") from None
        except Exception as err:  # noqa: BLE001 - any decoding failure means an unreadable file
            raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({type(err).__name__}: {str(err)[:200]})") from None

    def read_json(path):
        with open(path) as fh:
            doc = json.load(fh)
        int(doc["step"])
        return doc

    state = read("state.json", read_json)
    out = {"step": int(state["step"]), "state": state}
    for part in parts:
        if part == "optimizer":
            if "optimizer" in state:
                out["optimizer"] = _optimizer_state(read(OPTIMIZER_FILE, load_file), state["optimizer"])
            else:  # checkpoints of earlier versions: tensors and plain types only, never code
                import torch

                out["optimizer"] = read("optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu"))
        else:
            out[part] = read(f"{part}.safetensors", load_file)
    return out


def load_checkpoint_dir(folder: str, model, ema=None, opt=None) -> int:
    """Load weights (and EMA, optimizer when given) from a checkpoint folder; returns its step."""
    parts = ("model",) + (("ema",) if ema is not None else ()) + (("optimizer",) if opt is not None else ())
    ckpt = read_checkpoint(folder, parts)
    try:
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.model.load_state_dict(ckpt["ema"])
        if opt is not None:
            opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {folder} does not fit this model ({str(err)[:200]})") from None
    return ckpt["step"]


def checkpoint_folders(run_dir: str) -> list[str]:
    """Checkpoint folders of a run directory, newest (highest step) first."""
    import glob
    import re

    def step(folder: str) -> int:
        try:
            with open(os.path.join(folder, "state.json")) as fh:
                return int(json.load(fh)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            m = re.search(r"(\d+)$", folder)
            return int(m.group(1)) if m else -1

    folders = [f for f in glob.glob(os.path.join(run_dir, RUN_NAME, "checkpoint_*")) if os.path.isdir(f)]
    return sorted(folders, key=step, reverse=True)


def readable_checkpoints(run_dir: str) -> tuple[list[str], list[str]]:
    """([the newest readable checkpoint folder] or [], one message per unreadable newer one): reading
    stops at the first checkpoint that loads, the only one resume uses."""
    bad = []
    for folder in checkpoint_folders(run_dir):
        try:
            read_checkpoint(folder)
            return [folder], bad
        except CheckpointError as err:
            bad.append(str(err))
    return [], bad


def _restore(candidates: list[str], model, ema, opt, rank: int) -> int:
    """Step of the first candidate checkpoint that loads (0 when there is none); says which was skipped."""
    for folder in candidates:
        try:
            return load_checkpoint_dir(folder, model, ema, opt)
        except CheckpointError as err:
            if rank == 0:
                log.warning("%s; trying the previous checkpoint", err)
    if candidates:
        raise CheckpointError(f"no readable checkpoint among {', '.join(candidates)}")
    return 0


def _trim_metrics(run_dir: str, step: int) -> None:
    """Drop metric lines past the resumed step, so a step killed and redone is logged once."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    with open(path + ".tmp", "w") as fh:
        fh.writelines(kept)
    os.replace(path + ".tmp", path)


def _fixed_conditions(data, n: int, device):
    """The first n (embedding, target) pairs of the shards, in a fixed order (targets as the loader
    gives them: pixels, or stored latents)."""
    import dataclasses as dc

    import torch

    from train.data import PairStream

    stream = PairStream(dc.replace(data, num_workers=0, shuffle_buffer=1), epochs=1)
    conds, targets = [], []
    for x, cond, _ in stream:
        conds.append(cond)
        targets.append(x)
        if len(conds) == n:
            break
    return torch.stack(conds).to(device), torch.stack(targets)


def _sample_grid(model, fixed, cfg: TrainConfig, step: int, run_dir: str, writer, space=None, targets_are_latents: bool = False) -> None:
    """Row 1: the targets paired with the fixed conditions; row 2: EMA samples for those conditions
    (latent models: decoded by the VAE)."""
    import torch

    from train.diffusion import as_uint8, grid, sample, to_pil

    cond, targets = fixed
    images = sample(model, cond, steps=cfg.sample_steps, guidance=3.0, prediction=cfg.prediction, generator=torch.Generator(cond.device).manual_seed(0))
    if space is not None and not model.in_pixels:
        images = space.decode(images)
        if targets_are_latents:
            targets = space.decode(targets.to(cond.device))
    sheet = grid(to_pil(targets) + to_pil(images), cols=len(cond))
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    sheet.save(os.path.join(run_dir, "samples", f"step_{step:07d}.png"))
    writer.add_image("ema_samples", as_uint8(sheet), step, dataformats="HWC")


def _record_worker(run_dir: str, rank: int, world: int, device) -> None:
    """RUN_DIR/workers/rank-N.json: which Ray node and host run this rank (for operators and tests)."""
    import socket

    import ray

    os.makedirs(os.path.join(run_dir, "workers"), exist_ok=True)
    with open(os.path.join(run_dir, "workers", f"rank-{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world": world, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "device": str(device), "time": time.time()}, fh)


def make_optimizer(model, cfg: TrainConfig):
    """AdamW, fused (one kernel for all parameters: 5 % of a CPU step of `small`, benchmarks/train.py)."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def autocast_for(device, precision: str):
    """bf16 autocast on a GPU ("auto" or "bf16"), on CPU only with "bf16"; else a no-op context."""
    import torch

    on = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def build_for_training(cfg: TrainConfig, cond_dim: int, space, device):
    """The model of a config in its space, on `device` (channels_last for the U-Net's convolutions)."""
    import torch

    from train.models import build_model

    size = cfg.resolved_size()
    if size % space.factor:
        raise ValueError(f"image size {size} is not a multiple of the VAE's factor {space.factor}")
    model = build_model(cfg.preset, cond_dim, cfg.backbone, channels=space.channels, sample_size=size // space.factor, image_size=size)
    return model.to(device, memory_format=torch.channels_last) if cfg.backbone == "unet" else model.to(device)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from core.latents import load_space
    from train.data import DataConfig, make_loader
    from train.diffusion import EMA, diffusion_loss, make_scheduler

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = config["run_dir"]
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    torch.set_num_threads(max(1, config.get("threads_per_worker", 1)))
    if cfg.use_gpu and torch.cuda.is_available():
        from ray.train.torch import get_device

        device = get_device()  # the GPU Ray gave this worker (one per worker)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    _record_worker(run_dir, rank, world, device)

    # (3) model, EMA, optimizer; restore
    space = load_space(config["latent"], device)
    model = build_for_training(cfg, config["cond_dim"], space, device)
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model, cfg)
    checkpoint = ray.train.get_checkpoint()
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as folder:
        # Ray's latest checkpoint first, then the newest one the driver found readable
        candidates = [f for f in (folder, config.get("resume_from")) if f]
        step = _restore(list(dict.fromkeys(candidates)), model, ema, opt, rank)
    if rank == 0 and step:
        log.info("resumed from step %d", step)
        _trim_metrics(run_dir, step)
    lr_at = lambda s: cfg.lr * min(1.0, (s + 1) / max(1, cfg.warmup))  # noqa: E731
    ddp_model = prepare_model(model, parallel_strategy="ddp" if world > 1 else None, move_to_device=False)
    train_model = torch.compile(ddp_model, backend=cfg.compile_backend) if cfg.compile else ddp_model
    scheduler = make_scheduler(cfg.prediction)
    data = DataConfig(shards=config["shards"], image_size=model.image_size, batch_size=cfg.batch_size, pairing=cfg.pairing, encoder=cfg.encoder, encoder_weights=cfg.encoder_weights, shuffle_buffer=cfg.shuffle_buffer, num_workers=cfg.loader_workers, seed=cfg.seed + step, latent=config["latent"], pin_memory=device.type == "cuda")
    encode = not model.in_pixels and not config.get("stored_latents")  # pixels in, latents needed: the VAE encodes here
    batches = iter(make_loader(data, rank, world))
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank * 100003 + step)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    fixed = _fixed_conditions(data, cfg.sample_conditions, device) if rank == 0 and cfg.sample_every > 0 else None
    autocast = autocast_for(device, cfg.precision)
    fmt = torch.channels_last if cfg.backbone == "unet" else torch.contiguous_format

    # (4) step loop
    start, window = time.time(), []
    while step < cfg.steps:
        if cfg.fail_at_step == step and rank == 1 and not os.path.exists(os.path.join(run_dir, ".failed_once")):
            open(os.path.join(run_dir, ".failed_once"), "w").close()
            os._exit(1)  # simulate a crashed worker (fault-tolerance test)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, cond, _ = next(batches)
            x, cond = x.to(device, non_blocking=True), cond.to(device, non_blocking=True)
            if encode:
                with autocast:
                    x = space.encode(x).float()
            # DDP all-reduces the gradients on the last micro-step only
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 or world == 1 else ddp_model.no_sync()
            with sync:
                with autocast:
                    loss = diffusion_loss(train_model, scheduler, x.contiguous(memory_format=fmt), cond, cfg.p_uncond, generator) / cfg.grad_accum
                loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step)
        step += 1
        window.append(total)
        if rank == 0:
            writer.add_scalar("loss", total, step)
            writer.add_scalar("lr", lr_at(step - 1), step)
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": step, "loss": total, "time": time.time()}) + "\n")
            if step % cfg.log_every == 0:
                dt = time.time() - start
                sps = len(window) / dt
                log.info("(step=%07d) loss=%.4f steps/s=%.2f samples/s=%.1f", step, sum(window) / len(window), sps, sps * cfg.batch_size * cfg.grad_accum * world)
                start, window = time.time(), []
        if fixed is not None and step % cfg.sample_every == 0:
            _sample_grid(ema.model, fixed, cfg, step, run_dir, writer, space, targets_are_latents=bool(config.get("stored_latents")))
        # (5) checkpoints
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            metrics = {"step": step, "loss": total}
            if rank == 0:
                with tempfile.TemporaryDirectory() as folder:
                    _save(folder, model, ema, opt, step, config["train"], checkpoint_meta(config, model, space))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)
    if writer is not None:
        writer.close()


def checkpoint_meta(config: dict, model, space) -> dict:
    """What sampling needs to rebuild the model and refuses to mix up: condition encoder, backbone,
    latent space (None for pixels), resolutions."""
    return {"cond_dim": config["cond_dim"], "encoder": config["encoder"], "backbone": model.backbone, "latent": space.describe(), "image_size": model.image_size, "sample_size": model.sample_size}


PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_worker_logs() -> None:
    """Ray worker start-up hook. Ray Train's placement-group cleaner asks the State API every second
    whether the controller is alive; without the dashboard (a local `ray.init()` here) that API is
    not served and each poll logs a warning to the console. Locally the placement group goes away
    with the Ray session anyway, so only the cleaner's errors are kept."""
    import logging

    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def ray_runtime_env() -> dict:
    """The runtime_env every `ray.init()` of the project passes (the trainer's, the tests')."""
    return {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}, "worker_process_setup_hook": quiet_worker_logs}


TRAIN_MARKER = "webpairs-train.json"  # marks a folder as a training run of this project


def run_training(shards: str, run_dir: str, cfg: TrainConfig, ray_address: Optional[str] = None) -> dict:
    """Train with Ray Train; returns {"step", "checkpoint", "loss"} of the final result. The run
    directory is locked while training (one trainer per RUN_DIR)."""
    from core.stageio import StageLock

    from train.data import shard_urls

    if not shard_urls(shards):  # also refuses an incomplete shards folder, in one sentence
        raise FileNotFoundError(f"no pair shards at {shards} (expected a `webpairs shards` output)")
    run_dir = os.path.abspath(run_dir)
    from core.console import quiet

    with StageLock(run_dir, "webpairs train"):
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, TRAIN_MARKER), "w") as fh:
            json.dump({"shards": shards, "config": dataclasses.asdict(cfg)}, fh, indent=1)
        with quiet(run_dir), _progress(run_dir, cfg):
            return _fit(shards, run_dir, cfg, ray_address)


@contextlib.contextmanager
def _progress(run_dir: str, cfg: TrainConfig):
    """One progress line for the whole training (steps, loss, ETA) on the console, from the
    metrics.jsonl that rank 0 appends: the driver never sees the workers' loop otherwise."""
    import threading

    from tqdm import tqdm

    from core.console import console

    path = os.path.join(run_dir, "metrics.jsonl")
    stop = threading.Event()
    bar = tqdm(total=cfg.steps, desc="train", unit="step", file=console(), dynamic_ncols=True)

    def poll():
        offset, started = 0, False
        while not stop.wait(1.0):
            try:
                with open(path) as fh:
                    fh.seek(offset)
                    lines = fh.readlines()
                    offset = fh.tell()
            except OSError:
                continue
            docs = []
            for line in lines:
                try:
                    docs.append(json.loads(line))
                except ValueError:
                    continue  # a line being written
            if docs:
                if not started:  # the rate (and ETA) counts from the first step, not from Ray's start-up
                    bar.reset(total=cfg.steps)
                    started = True
                bar.n = min(cfg.steps, docs[-1]["step"])  # absolute: a resumed run starts at its checkpoint
                bar.set_postfix_str(f"loss {docs[-1]['loss']:.4f}", refresh=False)
                bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def _fit(shards: str, run_dir: str, cfg: TrainConfig, ray_address: Optional[str]) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from core.latents import load_space
    from train.data import DataConfig, condition_dim, shards_encoder, stored_latents

    # (1) config, the checkpoint to resume from, and Ray
    size, latent = cfg.resolved_size(), cfg.resolved_latent()  # ValueError: preset of another backbone, bad --latent
    data = DataConfig(shards=shards, pairing=cfg.pairing, encoder=cfg.encoder, encoder_weights=cfg.encoder_weights)
    cond_dim = condition_dim(data)
    encoder = cfg.encoder or shards_encoder(shards) or ""  # recorded in checkpoints: sampling embeds with it
    stored = False
    if latent != "pixel":
        space = load_space(latent)  # downloads once here (cache-only offline); the workers read the cache
        if size % space.factor:
            raise ValueError(f"image size {size} is not a multiple of {latent}'s factor {space.factor}")
        stored = stored_latents(shards, latent, size)
        if not stored:
            log.warning("the shards carry no %s latents at %d px: the VAE encodes every target on the fly (run `webpairs latents %s --latent %s --image-size %d --out DIR` once to skip that)", latent, size, shards, latent, size)
        del space
    _check_checkpoint_matches(run_dir, cfg, latent, encoder)
    good, bad = readable_checkpoints(run_dir)
    if bad and not good:
        raise CheckpointError(f"no readable checkpoint in {os.path.join(run_dir, RUN_NAME)} ({len(bad)} unreadable, the newest: {bad[0]}); delete that folder to train from scratch")
    for message in bad:
        log.warning("%s; skipped", message)
    if bad:
        log.warning("resuming from the previous good checkpoint %s", good[0])
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=True, runtime_env=ray_runtime_env())
    # (2) the trainer
    threads = max(1, (os.cpu_count() or 2) // max(1, cfg.workers))
    if cfg.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < cfg.workers:
            raise ValueError(f"--use-gpu needs one GPU per worker: {cfg.workers} worker(s), but the Ray cluster has {gpus:g} GPU(s)")
    config = {"train": dataclasses.asdict(cfg), "shards": os.path.abspath(shards) if "://" not in shards else shards, "run_dir": run_dir, "cond_dim": cond_dim, "encoder": encoder, "threads_per_worker": threads, "resume_from": good[0] if good else None, "latent": latent, "stored_latents": stored}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": 1, "GPU": 1} if cfg.use_gpu else None),
        run_config=RunConfig(
            storage_path=run_dir,
            name=RUN_NAME,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    out = {"step": result.metrics.get("step"), "loss": result.metrics.get("loss"), "checkpoint": result.checkpoint.path if result.checkpoint else None}
    with open(os.path.join(run_dir, "latest.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    return out


def _check_checkpoint_matches(run_dir: str, cfg: TrainConfig, latent: str, encoder: str) -> None:
    """Resuming into a run trained with another backbone, preset, latent space or encoder is refused
    in one sentence (the weights would not fit, or would mean something else)."""
    folders = checkpoint_folders(run_dir)
    if not folders:
        return
    try:
        state = read_checkpoint(folders[0], ())["state"]
    except CheckpointError:
        return  # the readable-checkpoint logic reports it
    recorded = {
        "backbone": state.get("backbone", "unet"),
        "preset": state.get("config", {}).get("preset", "tiny"),
        "latent space": (state.get("latent") or {}).get("vae", "pixel"),
        "condition encoder": state.get("encoder") or encoder,
    }
    wanted = {"backbone": cfg.backbone, "preset": cfg.preset, "latent space": latent, "condition encoder": encoder}
    differ = [f"{k} {recorded[k]} (asked: {wanted[k]})" for k in recorded if recorded[k] != wanted[k]]
    if differ:
        raise ValueError(f"{run_dir} holds checkpoints of another model: {', '.join(differ)}; train into a new --out")


def smoothed(losses: list[float], window: int = 10) -> list[float]:
    """Moving average (for judging a noisy diffusion loss)."""
    return [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]


def read_losses(run_dir: str) -> list[tuple[int, float]]:
    """(step, loss) pairs rank 0 logged, in order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [(d["step"], d["loss"]) for d in map(json.loads, fh)]


