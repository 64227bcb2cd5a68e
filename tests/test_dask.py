"""The Beam stages on dask.distributed: a LocalCluster of 2 worker processes gives the same stats and
the same record, pair and sample ids as the in-process runner (the session pipeline's outputs)."""

from __future__ import annotations

import json
import os

import apache_beam as beam
import pytest

from core.config import CrawlConfig, FilterConfig, PairConfig, ShardConfig
from core.stageio import StageError, read_stats, read_table, stage_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY_DASK = os.path.join(ROOT, "deploy", "dask")


@pytest.fixture(scope="module")
def dask_args():
    """One LocalCluster of 2 worker processes for the module (each stage submits to it)."""
    from core.dask_runner import dask_cluster

    with dask_cluster(None, 2) as address:
        yield ["--runner", "dask", "--dask-address", address]


def _ids(stage_dir: str, part: str, column: str) -> list:
    return sorted(read_table(stage_dir, part, [column]).column(column).to_pylist())


def _same_stats(a: str, b: str) -> None:
    sa, sb = read_stats(a), read_stats(b)
    assert sa == sb and sa["input"] > 0


def _manifest_container(component: str) -> dict:
    """The one container of deploy/dask/daskcluster.yaml's `worker` or `scheduler`."""
    import yaml

    doc = yaml.safe_load(open(os.path.join(DEPLOY_DASK, "daskcluster.yaml")))
    (container,) = doc["spec"][component]["spec"]["containers"]
    return container


def _fresh_python(code: str, env: dict) -> str:
    """What `python -c code` prints in a process with none of this one's Dask settings (DASK_*
    variables, the malloc variables a nanny may have set) and `env` added."""
    import subprocess
    import sys

    run_env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_") and k not in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")}
    return subprocess.run([sys.executable, "-c", code], env={**run_env, **env}, capture_output=True, text=True, check=True).stdout


def _visited(build, partition_size: int):
    """The Dask runner's visitor after it walked the pipeline `build(p)` makes (Beam's Dask
    overrides applied, as `run_pipeline` does): its bags, without running anything."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.dask.overrides import dask_overrides

    from core.dask_runner import DaskRunner

    p = beam.Pipeline(options=PipelineOptions([f"--dask_partition_size={partition_size}"]))
    build(p)
    p.replace_all(dask_overrides())
    visitor = DaskRunner.to_dask_bag_visitor({"partition_size": partition_size})
    p.visit(visitor)
    return visitor


def test_the_runner_keeps_outputs_apart_and_runs_every_branch(tmp_path, dask_args):
    """Beam 2.77's DaskRunner (the bugs core/dask_runner.py fixes): tagged outputs leaked into the
    main output's consumers, finish_bundle output was lost and only one sink of several ran."""

    def split(x):
        yield beam.pvalue.TaggedOutput("odd", {"n": x}) if x % 2 else x

    class SumInFinishBundle(beam.DoFn):
        def start_bundle(self):
            self.total = 0

        def process(self, x):
            self.total += x

        def finish_bundle(self):
            from apache_beam.transforms.window import GlobalWindow
            from apache_beam.utils.windowed_value import WindowedValue

            yield WindowedValue(self.total, 0, (GlobalWindow(),))

    with stage_pipeline(dask_args) as p:
        out = p | "Numbers" >> beam.Create(range(6)) | beam.FlatMap(split).with_outputs("odd", main="even")
        odd = out.odd | "Odd" >> beam.Map(lambda r: r["n"])
        even = out.even | "Even" >> beam.Map(lambda x: x * 10)
        _ = (odd, even) | beam.Flatten() | "Both" >> beam.io.WriteToText(str(tmp_path / "both"))
        _ = p | "More" >> beam.Create(range(10)) | beam.ParDo(SumInFinishBundle()) | "Sum" >> beam.io.WriteToText(str(tmp_path / "sum"))

    def read(prefix):
        return sorted(int(line) for name in os.listdir(tmp_path) if name.startswith(prefix) for line in open(tmp_path / name))

    assert read("both") == [0, 1, 3, 5, 20, 40] and sum(read("sum")) == 45
    assert not [n for n in os.listdir(tmp_path) if n.startswith("beam-temp")]  # every sink finalised


def test_every_beam_stage_on_dask_matches_the_local_run(tmp_path, dask_args, pipeline_dirs, test_web):
    from crawl.extract import run_extract
    from filter.pipeline import run_filter
    from pairing.pipeline import run_pair
    from shards.writer import run_shards

    d = {k: str(tmp_path / k) for k in ("links", "filter", "pair", "shards")}
    run_extract(test_web.warc_path, d["links"], CrawlConfig(allow_hosts=("127.0.0.1",)), dask_args)
    _same_stats(d["links"], pipeline_dirs["links"])
    assert _ids(d["links"], "links", "link_id") == _ids(pipeline_dirs["links"], "links", "link_id")
    run_filter(pipeline_dirs["download"], d["filter"], FilterConfig(encoder="efficientnet-lite0"), dask_args)  # RunInference on Dask
    _same_stats(d["filter"], pipeline_dirs["filter"])
    assert _ids(d["filter"], "images", "image_id") == _ids(pipeline_dirs["filter"], "images", "image_id")
    assert _ids(d["filter"], "occurrences", "link_id") == _ids(pipeline_dirs["filter"], "occurrences", "link_id")
    # the pointers to the bytes that Dask's workers wrote are the in-process run's (the same download rows)
    pointers = [{r["image_id"]: (r["image_bytes"], r["bytes_file"], r["bytes_row_group"]) for r in read_table(x, "images", columns=["image_id", "image_bytes", "bytes_file", "bytes_row_group"]).to_pylist()} for x in (d["filter"], pipeline_dirs["filter"])]
    assert pointers[0] == pointers[1] and all(b is None and f.startswith(os.path.join(pipeline_dirs["download"], "downloads", "")) for b, f, _ in pointers[0].values())
    run_pair(pipeline_dirs["filter"], d["pair"], PairConfig(), dask_args)
    _same_stats(d["pair"], pipeline_dirs["pair"])
    assert _ids(d["pair"], "pairs", "pair_id") == _ids(pipeline_dirs["pair"], "pairs", "pair_id")
    assert _ids(d["pair"], "rejected", "record_id") == _ids(pipeline_dirs["pair"], "rejected", "record_id")
    run_shards(pipeline_dirs["pair"], d["shards"], ShardConfig(samples_per_shard=25), dask_args)
    _same_stats(d["shards"], pipeline_dirs["shards"])
    ours, theirs = (json.load(open(os.path.join(x, "manifest.json"))) for x in (d["shards"], pipeline_dirs["shards"]))
    assert ours["samples"] == theirs["samples"] > 0
    assert _ids(d["shards"], "index", "key") == _ids(pipeline_dirs["shards"], "index", "key")


def test_dask_flags_need_the_dask_runner(tmp_path):
    with pytest.raises(StageError, match="need --runner dask"):
        with stage_pipeline(["--dask-workers", "2"]):
            pass
    with pytest.raises(StageError, match="whole number"):
        with stage_pipeline(["--runner", "dask", "--dask-workers", "two"]):
            pass


def test_a_worker_killed_in_the_middle_of_pair(tmp_path, pipeline_dirs):
    """SIGKILL of a Dask worker process while `pair` runs on it: the nanny restarts the worker and
    Dask recomputes what was lost, so the stage completes with the in-process run's output; had it
    failed, it must say so in one sentence and a rerun must give that output, with nothing doubled."""
    import signal
    import threading
    import time

    from distributed import Client

    from core.dask_runner import dask_cluster
    from pairing.pipeline import run_pair

    out = str(tmp_path / "pair")
    with dask_cluster(None, 2) as address, Client(address) as client:
        outcome: dict = {}

        def run():
            try:
                outcome["stats"] = run_pair(pipeline_dirs["filter"], out, PairConfig(), ["--runner", "dask", "--dask-address", address])
            except Exception as err:  # noqa: BLE001 - the outcome is checked below
                outcome["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 60
        busy = {}
        while time.time() < deadline and not busy and thread.is_alive():
            busy = {w: tasks for w, tasks in client.processing().items() if tasks}
            time.sleep(0.05)
        assert busy, "pair never ran a task on the cluster"
        victim = next(iter(busy))
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive()
        with pytest.raises(ProcessLookupError):  # the worker did die (its nanny started another)
            os.kill(pid, 0)
        print(f"killed worker pid {pid} while it ran {len(busy[victim])} task(s); the stage", "failed: " + str(outcome["error"]) if "error" in outcome else "completed")
        if "error" in outcome:  # a clear sentence, then a rerun that completes
            assert "\n" not in str(outcome["error"]).strip(), outcome["error"]
            run_pair(pipeline_dirs["filter"], out, PairConfig(), ["--runner", "dask", "--dask-address", address])
    _same_stats(out, pipeline_dirs["pair"])
    assert _ids(out, "pairs", "pair_id") == _ids(pipeline_dirs["pair"], "pairs", "pair_id")
    pairs = _ids(out, "pairs", "pair_id")
    assert len(pairs) == len(set(pairs))  # nothing doubled
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no partial folder or lock left


def test_runner_from_the_config_file(tmp_path, dask_args, pipeline_dirs):
    """`beam:` in a --config file gives a stage its runner flags (here: the module's cluster)."""
    import subprocess
    import sys

    from distributed import Client, get_task_stream

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"beam:\n  runner: dask\n  dask-address: {dask_args[-1]}\npair:\n  seed: 0\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    with Client(dask_args[-1]) as client, get_task_stream(client) as tasks:
        out = subprocess.run([sys.executable, "-m", "webpairs.cli", "pair", pipeline_dirs["filter"], "--out", str(tmp_path / "pair"), "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(tasks.data) > 0  # the stage ran on the cluster
    _same_stats(str(tmp_path / "pair"), pipeline_dirs["pair"])
    cfg.write_text("beam: dask\n")
    bad = subprocess.run([sys.executable, "-m", "webpairs.cli", "pair", pipeline_dirs["filter"], "--out", str(tmp_path / "p2"), "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "section 'beam' must hold" in bad.stderr and "Traceback" not in bad.stderr


def test_wrong_runner_flags_fail_in_one_line_before_any_work(tmp_path):
    import subprocess
    import sys

    for flags, message in ((["--runner", "dask", "--dask-workers", "two"], "--dask-workers must be a whole number, not 'two'"), (["--dask-address", "tcp://x:1"], "--dask-address and --dask-workers need --runner dask")):
        out = subprocess.run([sys.executable, "-m", "webpairs.cli", "filter", str(tmp_path / "nothing"), "--out", str(tmp_path / "f"), *flags], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"webpairs filter: error: {message}"], out.stderr


def test_group_by_key_shuffles_at_the_pipelines_parallelism(tmp_path, dask_args):
    """A GroupByKey after a Flatten of three 8-file sources: Beam's translation shuffled 24
    partitions (576 split tasks); here the shuffle runs over 8 and the groups are still whole, for
    keys of every kind a stage uses (hashed the same in every worker process)."""
    import subprocess
    import sys

    from core.dask_runner import _key_hash

    keys = ["page", ("site", "page"), 7, b"\x00bytes", None, ("nested", (1, "x"))]

    def build(p):
        sources = [p | f"Source{i}" >> beam.Create([(keys[j % len(keys)], i * 100 + j) for j in range(48)]) for i in range(3)]
        return sources | beam.Flatten() | beam.GroupByKey() | beam.MapTuple(lambda k, vs: (repr(k), sorted(vs)))

    visitor = _visited(build, 6)
    assert visitor.parallelism == 8
    grouped = [bag for node, bag in visitor.bags.items() if node.full_label.endswith("GroupByKey/GroupByKey")]
    assert len(grouped) == 1 and grouped[0].npartitions == 8
    assert len(dict(grouped[0].__dask_graph__())) < 200  # 8 partitions shuffled, not 24 (576 splits)

    with stage_pipeline(dask_args) as p:
        _ = build(p) | beam.Map(json.dumps) | beam.io.WriteToText(str(tmp_path / "groups"))
    got = dict(json.loads(line) for name in os.listdir(tmp_path) if name.startswith("groups") for line in open(tmp_path / name))
    want = {repr(k): sorted(i * 100 + j for i in range(3) for j in range(48) if keys[j % len(keys)] == k) for k in keys}
    assert got == want  # one group per key: no key split between two partitions

    # a str key hashes alike under any PYTHONHASHSEED (Python's hash() would not)
    code = "from core.dask_runner import _key_hash; print([_key_hash(k) for k in %r])" % (keys,)
    runs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert runs == {str([_key_hash(k) for k in keys]) + "\n"}


def test_a_group_by_key_of_few_partitions_spreads_over_the_pipelines_parallelism(tmp_path, dask_args):
    """A GroupByKey whose input is one partition (a FlatMap of one element: the copy step's blocks
    and row groups, spread from its one candidate search) or two kept that many: every group ran in
    one task, and the stage's check rows were one partition (issue 34, fix 10). Here the groups are
    split over the pipeline's parallelism; each key's values stay whole, in one partition."""
    import dask

    def build(p):
        _ = p | "Wide" >> beam.Create(range(8))  # the pipeline's parallelism: 8 partitions
        one = p | "One" >> beam.Create([None]) | "Fan" >> beam.FlatMap(lambda _: [(k % 20, k) for k in range(200)])
        two = p | "Two" >> beam.Create([0, 1]) | "Fan2" >> beam.FlatMap(lambda i: [(f"k{k % 12}", i * 1000 + k) for k in range(60)])
        return {"one": one | "GroupOne" >> beam.GroupByKey() | "SortOne" >> beam.MapTuple(lambda k, vs: (k, sorted(vs))),
                "two": two | "GroupTwo" >> beam.GroupByKey() | "SortTwo" >> beam.MapTuple(lambda k, vs: (k, sorted(vs)))}

    from dask.core import get_dependencies

    from core.dask_runner import _fused

    visitor = _visited(build, 1)
    assert visitor.parallelism == 8
    bags = {node.full_label: bag for node, bag in visitor.bags.items() if bag is not None}
    # each reader of a spread partition depends on its own slice, not on the whole grouped partition
    # (so a reader the scheduler runs on another worker fetches its slice only)
    (fused,) = _fused([bags["SortOne"]])
    graph = dict(fused.__dask_graph__())

    def inputs(key):  # the task's own inputs, through the alias that names a fused chain
        deps = get_dependencies(graph, key)
        while len(deps) == 1 and not next(iter(deps))[0].startswith("spread-"):
            deps = get_dependencies(graph, next(iter(deps)))
        return deps

    slices = [inputs(key) for key in fused.__dask_keys__()]
    assert all(len(deps) == 1 and next(iter(deps))[0].startswith("spread-") and "split" not in next(iter(deps))[0] for deps in slices), slices
    assert len({next(iter(deps)) for deps in slices}) == 8
    want = {"one": {k: list(range(k, 200, 20)) for k in range(20)},
            "two": {f"k{j}": sorted(i * 1000 + k for i in (0, 1) for k in range(60) if k % 12 == j) for j in range(12)}}
    for name, label in (("one", "SortOne"), ("two", "SortTwo")):
        assert bags[label].npartitions == 8, name
        parts = [list(part) for part in dask.compute(*bags[label].to_delayed(), scheduler="sync")]
        assert sum(1 for part in parts if part) >= 4, (name, [len(part) for part in parts])  # spread, not one partition
        got = [kv for part in parts for kv in part]
        assert len(got) == len(want[name]) and dict(got) == want[name]  # each key once, with all its values

    with stage_pipeline(dask_args) as p:
        for name, pc in build(p).items():
            _ = pc | f"Json{name}" >> beam.Map(json.dumps) | f"Write{name}" >> beam.io.WriteToText(str(tmp_path / name))
    for name in ("one", "two"):
        rows = [json.loads(line) for f in os.listdir(tmp_path) if f.startswith(name + "-") for line in open(tmp_path / f)]
        assert len(rows) == len(want[name]) and {(int(k) if name == "one" else k): v for k, v in rows} == want[name]


def test_global_combines_and_file_names_are_gathered_without_a_shuffle(tmp_path, dask_args):
    """Every count of stats.json is a CombineGlobally, and a file sink gathers its written files'
    names under one key: Beam's translation shuffled each over n x n tasks (extract: 7 of its 10
    GroupByKeys). Here a global combine is a tree reduction and the names gather in one partition;
    results as on any runner, defaults (or none, without_defaults) for an empty input included."""

    def build(p):
        numbers = [p | f"Source{i}" >> beam.Create(range(i * 100, i * 100 + 48)) for i in range(3)] | beam.Flatten()
        empty = numbers | beam.Filter(lambda x: x < 0)
        outs = {
            "sum": numbers | "Sum" >> beam.CombineGlobally(sum),
            "count": numbers | "Count" >> beam.combiners.Count.Globally(),
            "mean": numbers | "Mean" >> beam.combiners.Mean.Globally(),
            "empty_count": empty | "EmptyCount" >> beam.combiners.Count.Globally(),
            "empty_without_defaults": empty | "NoDefault" >> beam.CombineGlobally(sum).without_defaults(),
            "per_key": numbers | beam.Map(lambda x: (x % 3, x)) | "PerKey" >> beam.CombinePerKey(sum) | beam.combiners.ToList(),
        }
        return outs

    def build_and_write(p):
        build(p)
        _ = p | beam.Create(["a"]) | beam.io.WriteToText(str(tmp_path / "unused"))

    visitor = _visited(build_and_write, 6)
    for node, bag in visitor.bags.items():
        if bag is None:
            continue
        keys = {k[0] if isinstance(k, tuple) else k for k in dict(bag.__dask_graph__())}
        shuffles = {k for k in keys if "shuffle" in k}
        label = node.full_label
        if label.startswith(("Sum/", "Count/", "Mean/", "EmptyCount/", "NoDefault/")) or "WriteImpl/" in label:
            assert not shuffles, label  # a reduction, or a gather into one partition
        if label.startswith("PerKey/") and label.endswith("GroupByKey/GroupByKey"):
            assert shuffles  # many keys: still a shuffle
    tasks = {node.full_label: len(dict(bag.__dask_graph__())) for node, bag in visitor.bags.items() if bag is not None}
    # 24 partitions: 24 accumulators merged 8 at a time (29 tasks); the shuffle took over 100
    assert tasks["Sum/CombinePerKey/Combine/ParDo(CombineValuesDoFn)"] - tasks["Sum/KeyWithVoid"] < 40

    with stage_pipeline(dask_args) as p:
        for name, pc in build(p).items():
            _ = pc | f"Json{name}" >> beam.Map(json.dumps) | f"Write{name}" >> beam.io.WriteToText(str(tmp_path / name))

    def read(name):
        return [json.loads(line) for f in os.listdir(tmp_path) if f.startswith(name + "-") for line in open(tmp_path / f)]

    values = [x for i in range(3) for x in range(i * 100, i * 100 + 48)]
    assert read("sum") == [sum(values)] and read("count") == [len(values)]
    assert read("mean") == [pytest.approx(sum(values) / len(values))]
    assert read("empty_count") == [0] and read("empty_without_defaults") == []
    assert sorted(map(tuple, read("per_key")[0])) == [(k, sum(x for x in values if x % 3 == k)) for k in range(3)]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("beam-temp")]  # every sink finalised


def test_a_local_cluster_leaves_the_drivers_thread_settings_as_they_were(monkeypatch):
    """The nannies of a LocalCluster run in the driver and wrote OMP_NUM_THREADS=1 (and MKL's,
    OpenBLAS's) into its environment for good: after a stage on Dask, torch in the driver and the
    processes it starts (Ray's training workers in `webpairs run`) ran on one thread. The workers
    keep the nanny's setting; the driver gets its own back (here: none, and 7)."""
    from distributed import Client

    from core.dask_runner import dask_cluster

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    with dask_cluster(None, 1) as address:
        with Client(address) as client:
            (workers,) = client.run(lambda: (os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS"))).values()
            # a fresh worker, before any stage's setup set a pool: Arrow's system pool from its start
            (pool,) = client.run(lambda: (os.environ.get("ARROW_DEFAULT_MEMORY_POOL"), __import__("pyarrow").default_memory_pool().backend_name)).values()
    assert workers == ("1", "7")  # the nanny's default, and the user's own setting where there is one
    assert pool == ("system", "system")
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "7"
    assert "ARROW_DEFAULT_MEMORY_POOL" not in os.environ  # the driver's own environment back


class _Fragments(beam.DoFn):
    """Makes ~150 MB of 2.5 KB objects, keeps every 40th (held by the worker's cached DoFn, the
    last one made among them, so the heap's top stays in use) and frees the rest: freed pages
    in the middle of the heap, which glibc keeps resident until a trim."""

    def process(self, n):
        self.kept = []
        junk = []
        for i in range(60_000):
            (self.kept if i % 40 == 39 else junk).append(b"x" * (2500 + i % 8))  # not one folded constant
        from core.dask_runner import _resident_bytes

        peak = _resident_bytes()
        del junk
        yield os.getpid(), peak


def _with_resident_bytes_now(found: tuple) -> str:
    """(worker pid, resident bytes at the first step's peak) -> the row with the bytes now."""
    from core.dask_runner import _resident_bytes

    return f"{found[0]} {found[1]} {_resident_bytes()}"


def test_a_worker_gives_freed_memory_back_after_a_bundle(tmp_path, dask_args):
    """Fix 11: once a bundle has freed what it made, its worker's resident memory falls back before
    the next step runs (a trim when it grew by TRIM_GROWTH or more); before, the freed pages
    stayed resident, and over thousands of bundles a worker's memory rose step by step (pair with
    the copy step at one Common Crawl file: 340 -> 430 MB; issue 34). Each row: the worker, its
    resident bytes at the first step's peak and at the start of the next step."""
    with stage_pipeline(dask_args) as p:
        _ = (
            p | "Two" >> beam.Create([0, 1]) | "Fragment" >> beam.ParDo(_Fragments())
            | "After" >> beam.Map(_with_resident_bytes_now) | beam.io.WriteToText(str(tmp_path / "rss"))
        )
    rows = [line.split() for name in os.listdir(tmp_path) if name.startswith("rss") for line in open(tmp_path / name)]
    assert len(rows) == 2
    for pid, peak, after in rows:
        assert int(after) < int(peak) - 80_000_000, f"worker {pid}: {int(peak) >> 20} MB at the peak, {int(after) >> 20} MB after"


def _malloc_arenas_with_threads(threads: int = 6) -> int:
    """How many malloc arenas this process has once `threads` threads, alive together, have each
    allocated (glibc gives a thread an arena of its own while there are fewer than its limit)."""
    import ctypes
    import tempfile
    import threading

    together = threading.Barrier(threads, timeout=60)  # a thread that fails breaks it: no hang
    held = []

    def allocate():
        together.wait()
        held.append([bytearray(4096) for _ in range(16)])  # over pymalloc's 512 bytes: glibc's malloc
        together.wait()

    running = [threading.Thread(target=allocate, daemon=True) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join(timeout=120)
    assert len(held) == threads, "a thread did not allocate"
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile(suffix=".xml") as tmp:
        fp = ctypes.c_void_p(libc.fopen(tmp.name.encode(), b"w"))
        assert fp.value, "fopen failed"
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        return tmp.read().decode().count("<heap nr=")  # the same file, written through its name


def test_workers_keep_glibcs_malloc_thresholds(dask_args):
    """A Dask nanny starts its worker with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    dynamic mmap threshold (filter's bundles ran 1.5x slower than in-process). The LocalCluster of
    `dask_cluster` leaves it unset, and so does the setting deploy/dask gives a cluster's workers;
    both give the workers Arrow's system pool, as every stage sets in process, and at most two
    malloc arenas however many threads allocate (pair at one Common Crawl file: its workers peaked
    at 363-400 MB with an arena a thread, 329-340 with two; issue 34)."""
    import ast
    import inspect

    from distributed import Client

    from core.dask_runner import WORKER_ENVIRON

    with Client(dask_args[-1]) as client:
        env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        pools = client.run(lambda: os.environ.get("ARROW_DEFAULT_MEMORY_POOL"))
        arenas = client.run(_malloc_arenas_with_threads)
    assert len(env) == 2 and set(env.values()) == {None}
    assert set(pools.values()) == {"system"}  # Arrow's system pool, as every stage sets in process
    assert len(arenas) == 2 and set(arenas.values()) <= {1, 2}, arenas  # an arena a thread: 7 or more
    # what the check counts in a process without the limit (this one's environment holds the
    # nannies' setting while the cluster is up: _fresh_python drops it)
    unlimited = _fresh_python(inspect.getsource(_malloc_arenas_with_threads) + "\nprint(_malloc_arenas_with_threads())", {})
    assert int(unlimited) >= 7

    setting = {e["name"]: e["value"] for e in _manifest_container("worker")["env"]}["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"]
    assert ast.literal_eval(setting) == WORKER_ENVIRON  # deploy/dask gives a cluster's workers what the LocalCluster's get
    slurm = open(os.path.join(DEPLOY_DASK, "slurm.py")).read()
    assert f'DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\\"{setting}\\"' in slurm
    code = "from distributed.nanny import _get_env_variables; print(sorted(_get_env_variables('distributed.nanny.pre-spawn-environ').items()))"
    for value, unset in ((setting, True), (None, False)):
        out = _fresh_python(code, {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": value} if value else {})
        assert ("MALLOC_TRIM_THRESHOLD_" not in out) is unset and "OMP_NUM_THREADS" in out
        assert ("('ARROW_DEFAULT_MEMORY_POOL', 'system')" in out) is unset
        assert ("('MALLOC_ARENA_MAX', '2')" in out) is unset


def test_a_stages_options_make_each_view_once():
    """Beam asks the options for a view (`view_as`) in every apply, result-type inference and type
    check, about 1,000 per stage, each a new argparse parse of the flags: 0.4 s of the driver per
    stage, while the workers wait. A stage's options make each view once; a write through one view
    is what every other view and the options themselves read."""
    from apache_beam.options.pipeline_options import StandardOptions, TypeOptions

    from core.stageio import pipeline_options

    options = pipeline_options(["--dask_partition_size=1"])
    assert options.view_as(StandardOptions) is options.view_as(StandardOptions)
    assert options.view_as(TypeOptions) is options.view_as(TypeOptions)
    options.view_as(StandardOptions).runner = "core.dask_runner.DaskRunner"
    assert options.view_as(StandardOptions).runner == options.get_all_options()["runner"] == "core.dask_runner.DaskRunner"
    options.view_as(TypeOptions).pipeline_type_check = False
    assert options.get_all_options()["pipeline_type_check"] is False


def test_the_scheduler_gives_a_worker_one_source_bundle_at_a_time(dask_args):
    """At Dask's default worker-saturation (1.1) a single-threaded worker holds a second ready
    source bundle while it runs one, and a worker busy with the small tasks after a bundle gets none:
    extract's 8 file bundles went 5 and 3 to 2 workers in some runs. At 1.0 each worker takes its
    next bundle when it is free. The LocalCluster, deploy/dask's Kubernetes scheduler and the SLURM
    example's scheduler all run at 1.0."""
    import importlib.util
    import sys

    from distributed import Client

    with Client(dask_args[-1]) as client:
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) == 1.0

    scheduler_env = {e["name"]: e["value"] for e in _manifest_container("scheduler").get("env", [])}
    code = "import dask, distributed; print(dask.config.get('distributed.scheduler.worker-saturation'))"
    assert float(_fresh_python(code, scheduler_env)) == 1.0

    spec = importlib.util.spec_from_file_location("slurm_example", os.path.join(DEPLOY_DASK, "slurm.py"))
    slurm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slurm)
    cluster = slurm.make_cluster(2, "4GB", "", "", "00:10:00", os.path.dirname(os.path.dirname(sys.executable)))
    try:
        assert cluster.scheduler.WORKER_SATURATION == 1.0  # the scheduler runs in the submitting process
    finally:
        cluster.close()


def test_a_grouped_partition_fuses_into_the_pardo_that_reads_it(tmp_path, dask_args):
    """Dask fuses linear chains walking the graph in dict order, which follows set iteration
    (PYTHONHASHSEED): in some runs a GroupByKey's grouped partitions were not fused into the ParDo
    that reads them, and the scheduler stacked that ParDo's partitions on one worker. `_fused` walks
    in topological order: each partition of the ParDo is one task reading the shuffle's pieces."""
    from dask._task_spec import Alias, DependenciesMapping

    from core.dask_runner import _fused

    def split(kv):
        key, values = kv
        yield beam.pvalue.TaggedOutput("odd", (key, len(values))) if key % 2 else (key, sum(values))

    def build(p):
        pairs = p | beam.Create([(i % 20, i) for i in range(160)]) | "Grouped" >> beam.GroupByKey()
        return pairs | "Split" >> beam.FlatMap(split).with_outputs("odd", main="even")

    def build_both(p):
        out = build(p)
        _ = out.even | "Even" >> beam.Map(str)
        _ = out.odd | "Odd" >> beam.Map(str)

    visitor = _visited(build_both, 20)
    (split_node,) = [node for node in visitor.bags if node.full_label.startswith("Split")]
    leaves = [bag for node, bag in visitor.bags.items() if node.full_label in ("Even", "Odd")]
    bags = _fused(leaves)
    graph = dict(bags[0].__dask_graph__())
    deps = DependenciesMapping(graph)
    parts = visitor.bags[split_node].npartitions
    assert parts == 8
    for i in range(parts):
        key = (visitor.bags[split_node].name, i)
        while isinstance(graph[key], Alias):  # a fused chain keeps its key as an alias
            key = graph[key].target
        assert len(deps[key]) == parts, key  # the ParDo's task reads the 8 shuffle pieces itself

    with stage_pipeline(dask_args) as p:  # and the fused graph computes what Beam would
        out = build(p)
        _ = out.even | "Even" >> beam.Map(json.dumps) | "WriteEven" >> beam.io.WriteToText(str(tmp_path / "even"))
    got = sorted(json.loads(line) for f in os.listdir(tmp_path) if f.startswith("even") for line in open(tmp_path / f))
    assert got == [[k, sum(i for i in range(160) if i % 20 == k)] for k in range(0, 20, 2)]


def _note(folder: str, what: str, i: int) -> None:
    """A worker's record that it ran `what` on element i, and when (the workers are local processes)."""
    import time

    with open(os.path.join(folder, f"{what}-{i}-{os.getpid()}"), "w") as fh:
        fh.write(str(time.monotonic_ns()))


def _read(i: int, folder: str):
    import time

    time.sleep(0.05)
    _note(folder, "read", i)
    return i


def _consume(i: int, init: str, folder: str):
    _note(folder, "consume", i)
    return i


def test_partitions_are_consumed_as_they_come(tmp_path, dask_args):
    """A partition's outputs wait in its worker until every consumer has run (core/dask_runner), so
    consumers must run as partitions finish (fix 9). In benchmarks/scale.py's filter a file sink's
    bundles waited for its `initialize_write` (a side input from one Create([None]) partition),
    which dask queued behind every source partition: the images, with their bytes, piled up in
    the workers until the whole input was read (peak 741 -> 1,086 MB from 1x to 16x). The graph
    now gives a side input computed from a few tasks, and those tasks, the highest priority, and
    every other task its depth, so a finished partition's consumers come before the next source
    partition; and the consumers of the first partitions run before the last are read. (This
    small graph does not reproduce the pile-up: its timing half also passes on the runner before
    fix 9, found in review; the priorities half is what fails there. benchmarks/scale.py --runners
    dask --stages filter measures the effect: 1.47x -> 1.09x from 1x to 16x.)"""
    from core.dask_runner import _fused, _priorities

    folder = str(tmp_path)
    n = 24

    def build(p):
        init = p | "DoOnce" >> beam.Create([None]) | "Init" >> beam.Map(lambda _: "ready")
        read = p | "Parts" >> beam.Create(list(range(n))) | "Read" >> beam.Map(_read, folder)
        return read | "Consume" >> beam.Map(_consume, beam.pvalue.AsSingleton(init), folder)

    with stage_pipeline(dask_args) as p:
        build(p)
    times = {}
    for name in os.listdir(folder):
        what, i, _ = name.split("-")
        times[what, int(i)] = int(open(os.path.join(folder, name)).read())
    assert sorted(i for what, i in times if what == "consume") == list(range(n))
    last_read = max(t for (what, _), t in times.items() if what == "read")
    first_consumed = sorted(t for (what, _), t in times.items() if what == "consume")
    assert first_consumed[n // 4] < last_read  # a quarter consumed before the input is read

    visitor = _visited(build, 1)  # the priorities themselves
    leaves = [bag for node, bag in visitor.bags.items() if node.full_label == "Consume"]
    (bag,) = _fused(leaves, [side.key for side in visitor.sides.values()])
    graph = dict(bag.__dask_graph__())
    priority = _priorities(graph, [side.key for side in visitor.sides.values()])
    (side,) = [side.key for side in visitor.sides.values()]
    top = max(priority.values())
    assert priority[side] == top and sum(1 for v in priority.values() if v == top) <= 3  # the side input and its Create, Init
    (layer,) = bag.__dask_graph__().layers.values()
    assert all(layer.annotations["priority"](key) == priority[key] for key in graph)


def test_elements_that_lead_to_bytes_cross_workers_as_one_pickle(tmp_path, dask_args):
    """distributed serializes a plain list element by element, a header and frames each, when its
    first element leads to bytes: pair's side input of 39,475 (16-byte digest, pages) flags was
    78,952 frames and +78 MB on the worker that sent it (issue 34). A bundle's outputs, a selected
    output and a side input are one pickle here (fix 12), and every element arrives: a side input
    of digests, made on the workers, read by a ParDo on both, each lookup checked."""
    import hashlib

    from distributed.protocol import dumps, loads, to_serialize

    from core.dask_runner import _concat, _group_partition, _grouped_partition, _main_output, _slice, _tagged_output

    flags = [(hashlib.blake2b(str(i).encode(), digest_size=16).digest(), i % 7) for i in range(5000)]
    outputs = flags[:2500] + [beam.pvalue.TaggedOutput("more", f) for f in flags[2500:]]
    keyed = [(f"k{i % 900}", f) for i, f in enumerate(flags)]
    shuffled = [(key, [kv for kv in keyed if kv[0] == key]) for key in sorted({k for k, _ in keyed})]
    for made in (_concat([flags[:2500], flags[2500:]]), _main_output(outputs), _tagged_output(outputs, "more"), _group_partition(keyed), _grouped_partition(shuffled), _slice([flags[:10], flags[10:]], 1)):
        frames = dumps({"op": "get_data", "data": {"k": to_serialize(made)}})
        assert len(frames) <= 4, len(frames)  # a plain list: two frames an element
        assert list(loads(frames)["data"]["k"]) == list(made) and len(made) >= 900
    assert len(dumps({"op": "get_data", "data": {"k": to_serialize(list(flags))}})) > 5000  # what it was without fix 12

    with stage_pipeline(dask_args) as p:
        side = p | "Ids" >> beam.Create(range(5000)) | "Digests" >> beam.Map(lambda i: (hashlib.blake2b(str(i).encode(), digest_size=16).digest(), i % 7))
        found = (
            p | "Keys" >> beam.Create(range(0, 5200, 13))
            | "Look" >> beam.Map(lambda i, d: f"{i} {d.get(hashlib.blake2b(str(i).encode(), digest_size=16).digest())}", beam.pvalue.AsDict(side))
        )
        _ = found | "Write" >> beam.io.WriteToText(str(tmp_path / "found"))
    got = sorted(line.strip() for name in os.listdir(tmp_path) if name.startswith("found") for line in open(tmp_path / name))
    assert got == sorted(f"{i} {i % 7 if i < 5000 else None}" for i in range(0, 5200, 13))
