"""`webpairs train --ray-address`: a Ray head and a second Ray node on this machine, one training
worker on each, trained through the address, then both stopped."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # 50 s: run with `pytest -m slow` (the deploy topology; train's code path is the default run's)
def test_train_on_a_two_node_cluster_through_its_address(tmp_path, pipeline_dirs):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run = str(tmp_path / "run")
        cmd = [sys.executable, "-m", "webpairs.cli", "train", pipeline_dirs["shards"], "--out", run, "--ray-address", cluster.address, "--workers", "2", "--steps", "6"]
        cfg = tmp_path / "t.yaml"
        cfg.write_text("train:\n  checkpoint_every: 3\n  log_every: 3\n  sample_every: 0\n")
        proc = subprocess.run(cmd + ["--config", str(cfg)], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "trained to step 6" in proc.stdout
        ray.init(address=cluster.address)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ranks = [json.load(open(os.path.join(run, "workers", f))) for f in sorted(os.listdir(os.path.join(run, "workers")))]
        assert len(alive) == 2 and [r["rank"] for r in ranks] == [0, 1]
        assert {r["node_id"] for r in ranks} == alive  # one rank on each node
    finally:
        ray.shutdown()
        cluster.shutdown()
