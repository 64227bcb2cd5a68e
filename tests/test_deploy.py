"""deploy/: the KubeRay manifests against the KubeRay schema, the container image definition, and
the Beam runner scripts run with a stand-in `webpairs` that parses their flags for real."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
SCHEMA = json.load(open(os.path.join(ROOT, "tests", "deploy", "kuberay_schema.json")))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def _pin(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==(\S+)$", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def _manifests():
    folder = os.path.join(DEPLOY, "kuberay")
    return [(n, doc) for n in sorted(os.listdir(folder)) if n.endswith(".yaml") for doc in yaml.safe_load_all(open(os.path.join(folder, n)))]


def _cluster_spec(doc):
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pods(doc):
    spec = _cluster_spec(doc)
    yield spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["template"]["spec"]


def test_kuberay_manifests_follow_the_schema():
    docs = _manifests()
    assert {d["kind"] for _, d in docs} == {"RayCluster", "RayJob"}
    for name, doc in docs:
        jsonschema.validate(doc, SCHEMA)  # raises with the offending path
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == _pin("ray"), name  # the cluster runs the Ray the project pins
        for group in spec.get("workerGroupSpecs", []):
            assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 1 << 30), (name, group["groupName"])
        for pod in _pods(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}, name  # every mount has its volume
            for c in pod["containers"]:
                assert c["image"].split("/")[-1].startswith("webpairs:"), c["image"]  # the Dockerfile's `webpairs` target


def test_the_schema_refuses_typos_and_wrong_types():
    (_, doc), *_ = [(n, d) for n, d in _manifests() if d["kind"] == "RayJob"]
    bad = json.loads(json.dumps(doc))
    bad["spec"]["shutdownAfterJobFinish"] = True  # typo of shutdownAfterJobFinishes
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_rayjob_entrypoint_is_a_valid_train_command():
    from webpairs.cli import build_parser

    parser, _ = build_parser()
    for _, doc in _manifests():
        if doc["kind"] != "RayJob":
            continue
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] == "webpairs"
        args = parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown flag
        assert args.command == "train" and args.ray_address == "auto" and args.use_gpu
        workers = sum(g["replicas"] for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
        assert args.workers == workers  # one DDP rank per GPU worker pod


def test_dockerfile_builds_the_project_for_a_gpu_as_a_non_root_user():
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    base = dict((alias, image) for image, alias in stages)
    assert args[base["webpairs"].strip("${}")].startswith("nvidia/cuda:")  # CUDA base image
    assert args["BEAM_SDK_IMAGE"].endswith(":" + _pin("apache-beam"))  # Beam's boot from the pinned SDK
    webpairs_stage = text.split("AS webpairs", 1)[1].split("AS beam-sdk", 1)[0]
    users = re.findall(r"^USER\s+(\S+)", webpairs_stage, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "bash scripts/setup.sh" in webpairs_stage and "TORCH_INDEX_URL" in webpairs_stage
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(\w+)/\s", webpairs_stage, re.M))
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) <= copied  # every package is in the image


@pytest.mark.parametrize("script,runner,needed", [
    ("dataflow.sh", "DataflowRunner", ("project", "region", "temp_location", "sdk_container_image")),
    ("flink.sh", "FlinkRunner", ("flink_master", "environment_type", "environment_config")),
    ("spark.sh", "SparkRunner", ("spark_master_url", "environment_type", "environment_config")),
    ("portable-local.sh", "PortableRunner", ("job_endpoint", "environment_type")),
])
def test_beam_runner_scripts_pass_flags_beam_knows(tmp_path, script, runner, needed):
    log = tmp_path / "calls.jsonl"
    stub = f'webpairs() {{ "{sys.executable}" "{os.path.join(ROOT, "tests", "deploy", "check_command.py")}" "$@"; }}; python() {{ :; }}; sleep() {{ :; }}; kill() {{ :; }}'
    env = dict(os.environ, PYTHONPATH=ROOT, CHECK_LOG=str(log), PROJECT="p", BUCKET="b")
    proc = subprocess.run(["bash", "-c", f'{stub}; source "$0" "warc/*.warc.gz" out', os.path.join(DEPLOY, "beam", script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [json.loads(line) for line in open(log)]
    beam_calls = [c for c in calls if c["command"] != "crawl download"]
    assert [c["command"] for c in beam_calls] == ["crawl extract", "filter", "pair", "shards"]
    for c in beam_calls:
        assert c["unknown"] == [], (c["command"], c["unknown"])  # every flag is a Beam pipeline option
        assert c["options"]["runner"] == runner
        assert all(c["options"].get(k) for k in needed), (c["command"], needed, c["options"])


def test_the_flag_checker_reports_unknown_flags(tmp_path):
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PYTHONPATH=ROOT, CHECK_LOG=str(log))
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "deploy", "check_command.py"), "pair", "in", "--out", "o", "--runner", "FlinkRunner", "--flink_mastr", "x"], env=env, check=True, timeout=120)
    assert json.loads(open(log).read())["unknown"] == ["flink_mastr"]


def _dask_schema() -> dict:
    schema = json.load(open(os.path.join(ROOT, "tests", "deploy", "daskcluster_schema.json")))
    schema["$defs"].update({k: v for k, v in SCHEMA["$defs"].items() if k in ("stringMap", "quantity", "resources", "container", "metadata")})
    return schema


def test_dask_cluster_manifest_follows_the_operator_schema():
    doc = yaml.safe_load(open(os.path.join(DEPLOY, "dask", "daskcluster.yaml")))
    schema = _dask_schema()
    jsonschema.validate(doc, schema)
    for role in ("scheduler", "worker"):
        pod = doc["spec"][role]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            assert c["image"].split("/")[-1].startswith("webpairs:") and c["args"][0] == "dask"
    worker = doc["spec"]["worker"]["spec"]["containers"][0]
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "1"  # single-threaded worker processes
    assert {m["name"] for m in worker["volumeMounts"]} <= {v["name"] for v in doc["spec"]["worker"]["spec"]["volumes"]}
    bad = json.loads(json.dumps(doc))
    bad["spec"]["workers"] = bad["spec"].pop("worker")  # a typo the operator would ignore
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["worker"]["replicas"] = "16"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_slurm_example_renders_a_job_of_single_threaded_workers_in_the_venv(tmp_path):
    """deploy/dask/slurm.py with dask-jobqueue: the sbatch script it would submit (nothing is submitted)."""
    out = subprocess.run([sys.executable, os.path.join(DEPLOY, "dask", "slurm.py"), "--print-script", "--cores", "8", "--memory", "32GB", "--partition", "cpu", "--venv", str(tmp_path / "venv")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    script = out.stdout
    assert "#SBATCH -p cpu" in script and "#SBATCH --cpus-per-task=8" in script
    assert f"source {tmp_path / 'venv'}/bin/activate" in script and f"{tmp_path / 'venv'}/bin/python -m distributed.cli.dask_worker" in script
    assert "--nthreads 1" in script and "--nworkers 8" in script
