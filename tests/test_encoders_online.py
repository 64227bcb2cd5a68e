"""Encoders download their weights when online and read only the cache with --offline (issue 14,
part 2), against a loopback model hub (HF_ENDPOINT on 127.0.0.1 serving a small timm model's
weights by the hub's resolve protocol). No test reaches a real hub."""

import os
import subprocess
import sys

import hubserver
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "resnet10t.c3_in1k"  # timm's smallest ImageNet model with weights on the hub (4.9 M parameters)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from safetensors.torch import save_file

    from core.torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    model = timm.create_model(MODEL, pretrained=False)
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    server, url, served = hubserver.serve(f"timm/{MODEL}", {"model.safetensors": path.read_bytes()})
    yield url, served
    server.shutdown()


def _webpairs(env, *args):
    return subprocess.run([sys.executable, "-m", "webpairs.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def test_weights_download_when_online_and_come_from_the_cache_offline(hub, tmp_path):
    endpoint, served = hub
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=ROOT, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
    name = f"timm:{MODEL}"
    # offline and not cached: listed as absent, then one sentence, nothing requested from the hub
    offline = _webpairs(env, "--offline", "encoders", name, "--check", name)
    listed = next(line for line in offline.stdout.splitlines() if line.startswith(name + " "))
    assert listed.split()[1:] == ["512", "no", "no"]  # dim, text tower, weights on this machine
    lines = offline.stderr.strip().splitlines()
    assert offline.returncode == 2 and len(lines) == 1 and "offline mode is on" in lines[0] and not served
    # online: downloaded into the usual cache
    online = _webpairs(env, "encoders", "--check", name)
    assert online.returncode == 0, online.stderr[-2000:]
    assert f"{name}: dim=512" in online.stdout and any("model.safetensors" in p for p in served)
    assert any(f.endswith("model.safetensors") for _, _, files in os.walk(tmp_path / "hf") for f in files)
    # offline again: from the cache, no request
    n = len(served)
    cached = _webpairs(env, "--offline", "encoders", name, "--check", name)
    assert cached.returncode == 0 and f"{name}: dim=512" in cached.stdout and len(served) == n
    listed = next(line for line in cached.stdout.splitlines() if line.startswith(name + " "))
    assert listed.split()[1:] == ["512", "no", "yes"]  # dim, text tower, weights on this machine
