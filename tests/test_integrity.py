"""Stage integrity (issue 15): safe resume, outputs that cannot mix, complete upstreams only, one
writer per --out, input checks, config errors in one sentence, corrupt checkpoints, leftovers."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from core.stageio import StageError, StageLock, StageOutput, read_stats, read_table, stage_files
from webpairs.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def _one_error_line(capsys, command: str) -> str:
    """The whole stderr of a failed command: exactly one line `webpairs <command>: error: ...`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"webpairs {command}: error: "), err[-2000:]
    assert "Traceback" not in err
    return lines[0]


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


# 1. nothing under a run directory is unpickled ---------------------------------------------------


def test_a_planted_pickle_in_a_checkpoint_does_not_run(tmp_path):
    import pickle

    import torch

    from train.diffusion import EMA
    from train.models import build_model
    from train.train import CheckpointError, _save, load_checkpoint_dir

    model = build_model("tiny", 8)
    ema, opt = EMA(model), torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.randn(2, 8)).mean().backward()
    opt.step()
    good = tmp_path / "good"
    good.mkdir()
    _save(str(good), model, ema, opt, 7, {"preset": "tiny"}, {"cond_dim": 8})
    assert not [n for n in os.listdir(good) if n.endswith((".pt", ".pkl"))]
    fresh = build_model("tiny", 8)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert load_checkpoint_dir(str(good), fresh, EMA(fresh), fresh_opt) == 7
    k = next(iter(opt.state_dict()["state"]))
    a, b = opt.state_dict()["state"][k], fresh_opt.state_dict()["state"][k]
    assert torch.equal(a["exp_avg"], b["exp_avg"]) and float(a["step"]) == float(b["step"]) == 1.0

    # an old-format checkpoint whose optimizer.pt is a pickle that runs a command when loaded
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    os.remove(evil / "optimizer.safetensors")
    state = json.loads((evil / "state.json").read_text())
    del state["optimizer"]
    (evil / "state.json").write_text(json.dumps(state))
    proof = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    (evil / "optimizer.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint_dir(str(evil), fresh, EMA(fresh), fresh_opt)
    assert not proof.exists()


def test_no_code_unpickles_with_weights_only_false():
    found = subprocess.run(["git", "grep", "-n", "weights_only=False", "--", "*.py", ":!tests/*"], cwd=ROOT, capture_output=True, text=True)
    assert found.stdout == ""


# 2. a rerun into the same --out replaces the output whole; readers take the stage's file list ------


def test_rerun_of_shards_leaves_no_stale_shards(pipeline_dirs, tmp_path):
    from shards.writer import run_shards
    from core.config import ShardConfig
    from train.data import shard_urls

    out = str(tmp_path / "shards")
    first = run_shards(pipeline_dirs["pair"], out, ShardConfig(samples_per_shard=5))
    n_first = len([n for n in os.listdir(out) if n.endswith(".tar")])
    second = run_shards(pipeline_dirs["pair"], out, ShardConfig(samples_per_shard=40))
    tars = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert n_first > len(tars) and [s["shard"] for s in manifest["shards"]] == tars
    assert first["kept"] == second["kept"] == manifest["samples"]
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(shard_urls(out), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == second["kept"]  # no duplicate, nothing stale


def test_rerun_into_a_folder_with_an_old_parquet_reads_only_its_own_files(warc_dir, tmp_path):
    from core.config import CrawlConfig
    from crawl.extract import run_extract

    warc = os.path.join(warc_dir, "whirlwind.warc.gz")
    out = tmp_path / "links"
    run_extract(warc, str(out), CrawlConfig())
    shutil.copy(stage_files(str(out), "links")[0], out / "links" / "stray.parquet")  # an old file beside
    stats = run_extract(warc, str(out), CrawlConfig())
    assert not (out / "links" / "stray.parquet").exists()
    assert read_table(str(out), "links").num_rows == stats["kept"]


# 3. `run` refuses a folder it did not make --------------------------------------------------------


def test_run_refuses_an_out_with_foreign_files(tmp_path, capsys, warc_dir):
    from webpairs.run import claim_run_dir

    out = tmp_path / "mine"
    (out / "links").mkdir(parents=True)
    (out / "links" / "thesis.txt").write_text("a year of work")
    (out / "notes.txt").write_text("x")
    assert main(["run", os.path.join(warc_dir, "whirlwind.warc.gz"), "--out", str(out), "--no-train"]) == 2
    line = _one_error_line(capsys, "run")
    assert "not webpairs run output" in line and "links" in line and "--overwrite" in line
    assert (out / "links" / "thesis.txt").read_text() == "a year of work"
    claim_run_dir(str(out), overwrite=True)  # asked for: allowed, and nothing is deleted
    assert (out / "notes.txt").exists() and (out / "webpairs-run.json").exists()
    # a folder this project made is recognised by its markers
    own = tmp_path / "own"
    claim_run_dir(str(own))
    (own / "links").mkdir()
    with pytest.raises(StageError, match="links"):  # a stage folder without _SUCCESS is not ours
        claim_run_dir(str(own))


# 4. incomplete upstreams are refused --------------------------------------------------------------


@pytest.mark.parametrize(
    "command,upstream",
    [(["filter"], "download"), (["pair"], "filter"), (["shards"], "pair"), (["train"], "shards")],
)
def test_incomplete_upstream_is_refused(command, upstream, pipeline_dirs, tmp_path, capsys):
    src = _copy(pipeline_dirs[upstream], tmp_path / upstream)
    os.remove(os.path.join(src, "_SUCCESS"))  # what an interrupted stage looks like to an old reader
    assert main([*command, src, "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys, command[0])
    assert src in line and "not a complete" in line and "run `webpairs" in line
    assert not (tmp_path / "out").exists()


# 5. one writer per --out --------------------------------------------------------------------------


def test_two_pair_runs_on_one_out(pipeline_dirs, tmp_path):
    out = str(tmp_path / "pair")
    cmd = [sys.executable, "-m", "webpairs.cli", "pair", pipeline_dirs["filter"], "--out", out]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".pair.lock"
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-2000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1 and lines[0].startswith("webpairs pair: error: ")
    assert "being written by another webpairs run" in lines[0] and str(first.pid) in lines[0]
    assert read_stats(out) == read_stats(pipeline_dirs["pair"]) and not lock.exists()


def test_a_dead_runs_lock_is_taken_over_and_a_live_one_refuses(tmp_path):
    out = tmp_path / "x"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / ".x.lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "started": "then"}))
    with StageLock(str(out)) as lock:
        assert json.load(open(lock.path))["pid"] == os.getpid()
    assert not (tmp_path / ".x.lock").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".x.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(StageError, match=f"pid {sleeper.pid}"):
            StageLock(str(out)).acquire()
    finally:
        sleeper.kill()


# 6. wrong input -----------------------------------------------------------------------------------


def test_wrong_input_names_the_stage_that_makes_it(pipeline_dirs, tmp_path, capsys):
    assert main(["filter", pipeline_dirs["links"], "--out", str(tmp_path / "f"), "--encoder", "none"]) == 2
    line = _one_error_line(capsys, "filter")
    assert "`webpairs crawl extract` output" in line and "`webpairs crawl download` output" in line
    assert main(["pair", pipeline_dirs["download"], "--out", str(tmp_path / "p")]) == 2
    assert "`webpairs filter` output" in _one_error_line(capsys, "pair")
    # a folder marked as a filter output whose parquet lacks the contract's columns
    fake = _copy(pipeline_dirs["download"], tmp_path / "fake")
    marker = json.load(open(os.path.join(fake, "_SUCCESS")))
    marker["stage"] = "filter"
    marker["files"] = [f.replace("downloads/", "images/") for f in marker["files"]]
    os.rename(os.path.join(fake, "downloads"), os.path.join(fake, "images"))
    json.dump(marker, open(os.path.join(fake, "_SUCCESS"), "w"))
    assert main(["pair", fake, "--out", str(tmp_path / "p2")]) == 2
    line = _one_error_line(capsys, "pair")
    assert "lacks the columns" in line and "phash" in line


# 7. config errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,yaml_text,expect",
    [
        (["crawl", "extract"], "max_links_per_pagee: 3", "max_links_per_pagee"),
        (["crawl", "download"], "timeout: soon", "'timeout': 'soon' is not a number"),
        (["filter"], "min_side: abc", "'min_side': 'abc' is not a whole number"),
        (["filter"], "min_side: 0", "out of range"),
        (["pair"], "sim_low: [1]", "'sim_low'"),
        (["shards"], "samples_per_shard: 0", "'samples_per_shard': 0 is out of range"),
        (["train"], "steps: -5", "'steps': -5 is out of range"),
        (["run"], "shards:\n  samples_per_shard: 0", "samples_per_shard"),
    ],
)
def test_config_errors_are_one_sentence(command, yaml_text, expect, tmp_path, capsys, pipeline_dirs):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text + "\n")
    assert main([*command, pipeline_dirs["links"], "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert expect in _one_error_line(capsys, " ".join(command))


def test_every_numeric_config_key_has_a_range():
    from core import config
    from generate.images import SampleConfig
    from train.train import TrainConfig

    for cls in (config.CrawlConfig, config.DownloadConfig, config.FilterConfig, config.PairConfig, config.ShardConfig, TrainConfig, SampleConfig):
        missing = set(config.numeric_fields(cls)) - set(cls.RANGES)
        assert not missing, f"{cls.__name__}: {missing}"
        for key in config.numeric_fields(cls):  # and the default lies inside it
            config.build(cls, {key: getattr(cls(), key)}) if getattr(cls(), key) is not None else None


# 8. corrupt checkpoints -------------------------------------------------------------------------------


def test_sample_names_a_corrupt_checkpoint_file(tiny_run, photos_dir, tmp_path, capsys):
    run = _copy(tiny_run["run"], tmp_path / "run")
    from train.train import checkpoint_folders

    latest = checkpoint_folders(run)[0]
    with open(os.path.join(latest, "ema.safetensors"), "r+b") as fh:
        fh.write(b"\xff" * 64)
    image = os.path.join(photos_dir, "n01440764_tench.JPEG")
    assert main(["sample", "variations", run, "--image", image, "--n", "1", "--steps", "2", "--out", str(tmp_path / "g")]) == 2
    line = _one_error_line(capsys, "sample")
    assert os.path.join(latest, "ema.safetensors") in line and "corrupt" in line


def test_resume_skips_a_corrupt_checkpoint_and_says_which(tmp_path, caplog):
    import logging

    import torch

    from train.diffusion import EMA
    from train.models import build_model
    from train.train import _restore, _save, readable_checkpoints

    model = build_model("tiny", 8)
    ema, opt = EMA(model), torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (10, 20):  # Ray's layout: RUN_DIR/train/checkpoint_*
        folder = tmp_path / "train" / f"checkpoint_{step:06d}"
        folder.mkdir(parents=True)
        _save(str(folder), model, ema, opt, step, {"preset": "tiny"}, {"cond_dim": 8})
    newest = tmp_path / "train" / "checkpoint_000020"
    (newest / "model.safetensors").write_bytes(b"\0" * 16)
    good, bad = readable_checkpoints(str(tmp_path))
    assert good == [str(tmp_path / "train" / "checkpoint_000010")] and len(bad) == 1 and str(newest / "model.safetensors") in bad[0]
    with caplog.at_level(logging.WARNING, logger="train.train"):
        step = _restore([str(newest), good[0]], model, EMA(model), opt, rank=0)  # Ray's latest first, then the driver's pick
    assert step == 10 and str(newest / "model.safetensors") in caplog.text and "trying the previous checkpoint" in caplog.text


# 9 + lock: what a killed stage leaves is removed by the next run -------------------------------------


def test_leftovers_of_a_killed_stage_are_removed(pipeline_dirs, tmp_path):
    from core.config import ShardConfig
    from shards.writer import run_shards

    partial = tmp_path / ".shards.partial"
    (partial / "beam-temp-index-123").mkdir(parents=True)
    (partial / "beam-temp-index-123" / "x.parquet").write_bytes(b"half")
    (partial / ".pairs-000000-000000.tar.tmp-abcd").write_bytes(b"half a tar")
    (partial / "pairs-000000-000000.tar").write_bytes(b"a tar from another run")
    (tmp_path / ".shards.lock").write_text(json.dumps({"pid": 999999999, "host": socket.gethostname()}))
    run_shards(pipeline_dirs["pair"], str(tmp_path / "shards"), ShardConfig(samples_per_shard=25))
    assert sorted(os.listdir(tmp_path)) == ["shards"]
    names = os.listdir(tmp_path / "shards")
    assert not [n for n in names if n.startswith((".", "beam-temp"))]
    marker = json.load(open(tmp_path / "shards" / "_SUCCESS"))
    assert marker["stage"] == "shards" and sorted(n for n in names if n.endswith(".tar")) == sorted(f for f in marker["files"] if f.endswith(".tar"))


def test_a_failed_stage_keeps_the_previous_output(pipeline_dirs, tmp_path, monkeypatch):
    from core.config import ShardConfig
    from shards import writer

    out = str(tmp_path / "shards")
    before = writer.run_shards(pipeline_dirs["pair"], out, ShardConfig(samples_per_shard=25))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "_write_manifest", boom)
    with pytest.raises(Exception, match="disk full"):
        writer.run_shards(pipeline_dirs["pair"], out, ShardConfig(samples_per_shard=3))
    assert read_stats(out) == before and sorted(os.listdir(tmp_path)) == ["shards"]


def test_stage_output_commit_swaps_whole_folders(tmp_path):
    out = tmp_path / "s"
    for n in (1, 2):
        with StageOutput(str(out), "extract") as stage:
            assert stage.path.endswith(".s.partial") and os.path.isdir(stage.path)
            os.makedirs(os.path.join(stage.path, "links"))
            pq.write_table(__import__("pyarrow").table({"a": list(range(n))}), os.path.join(stage.path, "links", f"part-{n}.parquet"))
            json.dump({"stage": "extract", "input": n, "kept": n, "rejected": {}}, open(os.path.join(stage.path, "stats.json"), "w"))
            stage.commit()
    assert sorted(os.listdir(out / "links")) == ["part-2.parquet"] and sorted(os.listdir(tmp_path)) == ["s"]
    assert stage_files(str(out), "links", expected="extract") == [str(out / "links" / "part-2.parquet")]


@pytest.mark.parametrize("table_sinks", [False, True])
def test_no_sink_of_a_stage_deletes_another_sinks_files(tmp_path, table_sinks):
    """WriteStageOutputs writes each of several kept or rejected PCollections by a sink of its own
    into one folder. Beam's sink deletes whatever matches its own `<prefix>-*-of-<N>.parquet` before
    it renames its files into place, and the second sink's prefix was `part-1`: the first sink's
    `part-*-of-00001` matched its finished `part-1-00000-of-00001.parquet`, and those rows were
    lost whenever the second sink finished first (pair's and extract's rejected rows; found in
    review, 1 run in 3 in process). Every sink's glob must match its own files only, and every row
    must be back, whichever sink finishes first (one producer behind a GroupByKey, twice)."""
    import fnmatch

    import apache_beam as beam
    import duckdb
    import pyarrow as pa

    from core.records import REJECTED_SCHEMA
    from core.stageio import WriteStageOutputs, pipeline_options

    schema = pa.schema([("id", pa.string())])

    def table(prefix, n):
        return pa.table({"id": [f"{prefix}{i}" for i in range(n)]}, schema=schema)

    def rejected(prefix, n):
        return pa.Table.from_pylist([{"record_id": f"{prefix}{i}", "stage": "t", "reason": "too_small", "detail": "", "url": ""} for i in range(n)], schema=REJECTED_SCHEMA)

    for trial, late in enumerate((0, 1)):
        out = tmp_path / f"run{trial}"

        def source(p, label, tables, delayed):
            pc = p | label >> beam.Create(tables)
            if delayed:  # behind a shuffle: this sink finishes after the others
                pc = pc | f"{label}Key" >> beam.Map(lambda t: (0, t)) | f"{label}Group" >> beam.GroupByKey() | f"{label}Out" >> beam.FlatMap(lambda kv: kv[1])
            return pc

        with beam.Pipeline(options=pipeline_options([])) as p:
            kept = tuple(source(p, f"K{i}", [table(f"k{i}-", 3 + i)], i == late) for i in range(3))
            rej = tuple(source(p, f"R{i}", [rejected(f"r{i}-", 2 + i)], i != late) for i in range(3))
            _ = {"input": p | "In" >> beam.Create(range(3 + 4 + 5 + 2 + 3 + 4)), "kept": kept, "rejected": rej} | WriteStageOutputs(
                str(out), "t", "kept", schema, kept_tables=True, rejected_tables=True, table_sinks=table_sinks)
        for folder, column, want in (("kept", "id", {f"k{i}-{j}" for i in range(3) for j in range(3 + i)}), ("rejected", "record_id", {f"r{i}-{j}" for i in range(3) for j in range(2 + i)})):
            names = sorted(os.listdir(out / folder))
            for name in names:  # <prefix>-SSSSS-of-NNNNN.parquet: Beam's finalize glob of that sink
                prefix, _, _, shards = name.rsplit("-", 3)
                mine = fnmatch.filter(names, f"{prefix}-*-of-{shards}")
                assert all(n.rsplit("-", 3)[0] == prefix for n in mine), (name, mine)
            got = duckdb.sql(f"SELECT {column} FROM read_parquet('{out / folder}/*.parquet')").fetchall()
            assert sorted(r[0] for r in got) == sorted(want), (trial, folder)


def test_table_sinks_write_the_files_beams_sinks_write(tmp_path):
    """WriteStageOutputs(table_sinks=True) (a step a sink, files named when the stats are written:
    extract, issue 34) gives what Beam's parquet sinks give: the same file names (an empty sink one
    empty file with the schema), the same rows in each, the same stats.json; no hidden or
    temporary file is left once the stage is finished."""
    import apache_beam as beam
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.records import REJECTED_SCHEMA
    from core.stageio import WriteStageOutputs, finish_stage, pipeline_options

    schema = pa.schema([("id", pa.string()), ("n", pa.int32())])
    kept_tables = [pa.table({"id": [f"k{i}-{j}" for j in range(i + 1)], "n": list(range(i + 1))}, schema=schema) for i in range(4)]
    rejected_tables = [pa.Table.from_pylist([{"record_id": f"r{i}", "stage": "t", "reason": ("too_small", "bad_url")[i % 2], "detail": "", "url": ""}], schema=REJECTED_SCHEMA) for i in range(3)]
    outputs = {}
    for light in (False, True):
        out = tmp_path / f"light{light}"
        with beam.Pipeline(options=pipeline_options([])) as p:
            kept = (p | "K0" >> beam.Create(kept_tables), p | "K1" >> beam.Create([]).with_output_types(pa.Table))  # the second sink gets nothing
            rej = (p | "R0" >> beam.Create(rejected_tables[:2]), p | "R1" >> beam.Create(rejected_tables[2:]))
            _ = {"input": p | "In" >> beam.Create(range(10 + 3)), "kept": kept, "rejected": rej} | WriteStageOutputs(
                str(out), "t", "kept", schema, kept_tables=True, rejected_tables=True, table_sinks=light)
        stats = finish_stage(str(out))
        files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
        rows = {f: sorted(pq.read_table(out / f).to_pylist(), key=str) for f in files if f.endswith(".parquet")}
        schemas = {f: pq.read_schema(out / f).remove_metadata() for f in files if f.endswith(".parquet")}
        outputs[light] = (stats, [f for f in files if f != "_SUCCESS"], rows, schemas)
    assert outputs[True] == outputs[False]
    stats, files, rows, _ = outputs[True]
    assert files == ["kept/part-00000-of-00001.parquet", "kept/part_1-00000-of-00001.parquet", "rejected/part-00000-of-00001.parquet", "rejected/part_1-00000-of-00001.parquet", "stats.json"]
    assert rows["kept/part_1-00000-of-00001.parquet"] == [] and len(rows["kept/part-00000-of-00001.parquet"]) == 10
    assert stats["kept"] == 10 and stats["rejected"] == {"bad_url": 1, "too_small": 2}


def test_table_sinks_naming_survives_a_retried_stats_step(tmp_path):
    """The stats step names the table sinks' files (WriteStageOutputs(table_sinks=True)); a runner
    that re-runs a lost task (Dask, after a worker is lost) runs it again over files named already:
    that is no failure, as it is none for Beam's own sinks' finalize (files already renamed are
    skipped), and every row is still there once."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.stageio import _write_tallied_stats

    sink = tmp_path / "links" / "part"
    sink.parent.mkdir()
    schema = pa.schema([("id", pa.string())])
    written = []
    for i in range(3):
        tmp = sink.parent / f".part-{i}.parquet"
        pq.write_table(pa.table({"id": [f"r{i}"]}, schema=schema), tmp)
        written.append((str(sink), str(tmp)))
    args = dict(totals={}, names=[], out_dir=str(tmp_path), stage="t", extra={}, written=written, sinks={str(sink): schema})
    _write_tallied_stats(None, **args)
    _write_tallied_stats(None, **args)  # the retried task
    assert sorted(os.listdir(sink.parent)) == [f"part-0000{k}-of-00003.parquet" for k in range(3)]
    assert sorted(r[0] for r in duckdb.sql(f"SELECT id FROM read_parquet('{sink.parent}/*.parquet')").fetchall()) == ["r0", "r1", "r2"]


def test_table_sinks_of_rows_write_what_beams_row_sinks_write(tmp_path, monkeypatch):
    """Rows (kept, rejected and a `more` entry) through WriteStageOutputs(table_sinks=True): made
    into tables by `_RowsToTables`, then written a step a sink (filter, issue 34). The same file
    names, every row back with its values (nulls where a nullable field was left out), the same row
    groups (several a file: the group size is made small), the same stats.json as Beam's parquet sinks;
    the same columns have a dictionary, all but the binary one (a list column's too)."""
    import apache_beam as beam
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.records import REJECTED_SCHEMA
    from core import stageio
    from core.stageio import WriteStageOutputs, finish_stage, pipeline_options

    monkeypatch.setattr(stageio, "ROW_GROUP_BYTES", 300)  # a row group ends mid-bundle, for both sinks
    schema = pa.schema([pa.field("id", pa.string(), nullable=False), ("n", pa.int32()), ("blob", pa.binary()), ("vec", pa.list_(pa.float32()))])
    extra = pa.schema([("page", pa.string()), ("k", pa.int64())])
    kept = [{"id": f"k{i}", "n": i, "blob": os.urandom(20 + i), "vec": [float(i % 4)] * 3} if i % 3 else {"id": f"k{i}", "blob": None, "vec": None} for i in range(23)]
    rejected = [{"record_id": f"r{i}", "stage": "t", "reason": ("too_small", "bad_url")[i % 2], "detail": "", "url": ""} for i in range(5)]
    more = [{"page": f"p{i}", "k": i} for i in range(7)]
    outputs = {}
    for light in (False, True):
        out = tmp_path / f"light{light}"
        with beam.Pipeline(options=pipeline_options([])) as p:
            _ = {"input": p | "In" >> beam.Create(range(28)), "kept": p | "K" >> beam.Create(kept), "rejected": p | "R" >> beam.Create(rejected), "pages": p | "E" >> beam.Create(more)} | WriteStageOutputs(
                str(out), "t", "kept", schema, more={"pages": extra}, kept_batch_rows=4, table_sinks=light)
        stats = finish_stage(str(out))
        files = sorted(str(f.relative_to(out)) for f in out.rglob("*.parquet"))
        rows = {f: sorted(pq.read_table(out / f).to_pylist(), key=str) for f in files}
        meta = {f: pq.ParquetFile(out / f).metadata for f in files}
        groups = {f: [meta[f].row_group(g).num_rows for g in range(meta[f].num_row_groups)] for f in files}
        dictionaries = {f: {meta[f].row_group(0).column(c).path_in_schema: meta[f].row_group(0).column(c).has_dictionary_page for c in range(meta[f].num_columns)} for f in files if meta[f].num_row_groups}
        outputs[light] = (stats, files, rows, groups, {f: pq.read_schema(out / f).remove_metadata() for f in files}, dictionaries)
    kept_dictionaries = outputs[False][5]["kept/part-00000-of-00001.parquet"]
    assert kept_dictionaries == {"id": True, "n": True, "blob": True, "vec.list.item": True}  # Beam's sink: every column
    outputs[False][5]["kept/part-00000-of-00001.parquet"]["blob"] = False  # ours: the binary one not
    assert outputs[True] == outputs[False]
    stats, files, rows, groups, _, _ = outputs[True]
    assert len(groups["kept/part-00000-of-00001.parquet"]) > 2 and sum(groups["kept/part-00000-of-00001.parquet"]) == 23
    assert files == ["kept/part-00000-of-00001.parquet", "pages/part-00000-of-00001.parquet", "rejected/part-00000-of-00001.parquet"]
    assert rows["kept/part-00000-of-00001.parquet"] == sorted([{"id": r["id"], "n": r.get("n"), "blob": r["blob"], "vec": r["vec"]} for r in kept], key=str)
    assert rows["pages/part-00000-of-00001.parquet"] == sorted(more, key=str) and len(rows["rejected/part-00000-of-00001.parquet"]) == 5
    assert stats["input"] == 28 and stats["kept"] == 23 and stats["rejected"] == {"bad_url": 2, "too_small": 3} and stats["pages"] == 7
