"""Ray Train: 2 CPU workers train the tiny preset on the pipeline's shards, checkpoint, resume, survive a killed worker."""

import glob
import json
import os

import pytest

from train.train import TrainConfig, ray_runtime_env, read_checkpoint, read_losses, run_training, smoothed


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, runtime_env=ray_runtime_env())
    yield
    ray.shutdown()


def test_train_checkpoint_and_resume(tiny_run, pipeline_dirs, ray_session):
    run, out = tiny_run["run"], tiny_run["result"]  # 40 steps, checkpoints every 20 (tests/conftest.py)
    assert out["step"] == 40 and out["checkpoint"]
    losses = [l for _, l in read_losses(run)]
    s = smoothed(losses, 10)
    assert len(losses) == 40 and s[-1] < 0.75 * s[9]  # clearly below its start (0.73 -> 0.39 seen)
    ckpt = out["checkpoint"]
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"} <= set(os.listdir(ckpt))
    assert not [n for n in os.listdir(ckpt) if n.endswith((".pt", ".pkl"))]  # nothing to unpickle
    opt_state = read_checkpoint(ckpt)["optimizer"]
    assert int(next(iter(opt_state["state"].values()))["step"]) == 40
    # the same RUN_DIR again: continues from step 40 with the optimizer state
    out2 = run_training(pipeline_dirs["shards"], run, TrainConfig(steps=50, checkpoint_every=10, log_every=10, seed=0))
    steps = [st for st, _ in read_losses(run)]
    assert out2["step"] == 50 and steps[40:] == list(range(41, 51))
    opt_state = read_checkpoint(out2["checkpoint"])["optimizer"]
    assert int(next(iter(opt_state["state"].values()))["step"]) == 50  # Adam's count went on: state was restored
    assert len([d for d in glob.glob(os.path.join(run, "train", "checkpoint_*")) if os.path.isdir(d)]) == 2  # num_to_keep
    assert os.listdir(os.path.join(run, "tensorboard"))
    from PIL import Image

    grids = sorted(os.listdir(os.path.join(run, "samples")))
    assert grids == ["step_0000020.png", "step_0000040.png"]  # EMA sample grids of fixed conditions
    assert Image.open(os.path.join(run, "samples", grids[0])).size == (4 * 32, 2 * 32)


@pytest.mark.slow  # 60 s; tests/test_fault_injection.py kills and resumes a whole `webpairs train` in the default run
def test_a_killed_worker_resumes_from_the_last_checkpoint(tmp_path, pipeline_dirs, ray_session):
    run = str(tmp_path / "fault")
    out = run_training(pipeline_dirs["shards"], run, TrainConfig(steps=25, checkpoint_every=10, log_every=5, fail_at_step=15, max_failures=2))
    assert out["step"] == 25
    assert os.path.exists(os.path.join(run, ".failed_once"))  # rank 1 really died at step 15
    steps = [st for st, _ in read_losses(run)]
    # steps 11..15 ran twice (before the crash, and after restoring the step-10 checkpoint); the
    # metrics log was trimmed to the checkpoint on resume, so each step is logged once
    assert steps == list(range(1, 26))
    assert json.load(open(os.path.join(run, "latest.json")))["step"] == 25


@pytest.mark.slow  # 30 s; tests/test_integrity.py checks the same fallback without Ray
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tiny_run, pipeline_dirs, ray_session, tmp_path, caplog):
    """Issue 15 point 8: resume names the corrupt file and continues from the previous good checkpoint."""
    import logging
    import shutil

    from train.train import checkpoint_folders, read_checkpoint

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run["run"], run)
    folders = checkpoint_folders(run)
    assert len(folders) == 2 and read_checkpoint(folders[1])["step"] < read_checkpoint(folders[0])["step"]
    bad = os.path.join(folders[0], "model.safetensors")
    with open(bad, "r+b") as fh:
        fh.write(b"\x00" * 16)
    previous = read_checkpoint(folders[1])["step"]
    with caplog.at_level(logging.WARNING, logger="train.train"):
        out = run_training(pipeline_dirs["shards"], run, TrainConfig(steps=previous + 10, checkpoint_every=5, log_every=5, seed=0, sample_every=0))
    text = caplog.text
    assert bad in text and "resuming from the previous good checkpoint" in text
    assert out["step"] == previous + 10
    steps = [s for s, _ in read_losses(run)]
    assert steps == list(range(1, previous + 11))  # trimmed to the good checkpoint, then continued


def test_train_with_only_corrupt_checkpoints_is_one_line(tiny_run, pipeline_dirs, tmp_path, capsys):
    import shutil

    from train.train import checkpoint_folders
    from webpairs.cli import main

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run["run"], run)
    for folder in checkpoint_folders(run):
        with open(os.path.join(folder, "ema.safetensors"), "wb") as fh:
            fh.write(b"not a tensor file")
    assert main(["train", pipeline_dirs["shards"], "--out", run, "--steps", "60"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("webpairs train: error: no readable checkpoint in") and "delete that folder" in err[0]
