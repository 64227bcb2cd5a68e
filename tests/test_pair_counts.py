"""Issue 34, pair + shards per core: the counts of stats.json tallied together (one combine instead
of a Count.Globally per entry) and the image reader's embeddings taken from the column give what
the steps they replace gave."""

import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest

from core.records import REJECTED_SCHEMA
from core.stageio import STATS_FILE, WriteStageOutputs, pipeline_options

SCHEMA = pa.schema([("id", pa.string())])


def _stats(out_dir: str, together: bool) -> dict:
    """stats.json of a stage with every kind of count: an input (with `together`, two PCollections;
    else their flatten), kept tables, rejected tables from two producers and rejected rows, other
    entries with elements, with none, and of tables (counted by rows)."""
    kept = [pa.table({"id": [f"k{i}" for i in range(n)]}, schema=SCHEMA) for n in (3, 0, 5)]
    reasons = ["too_small"] * 4 + ["near_duplicate"] * 2 + ["boilerplate_site"]
    rejected = [pa.Table.from_pylist([{"record_id": f"r{i}", "stage": "t", "reason": r, "detail": "", "url": ""} for i, r in enumerate(reasons[a:b])], schema=REJECTED_SCHEMA) for a, b in ((0, 3), (3, 7))]
    with beam.Pipeline(options=pipeline_options([])) as p:
        links = p | "Links" >> beam.Create(list(range(11)))
        stand_ins = p | "StandIns" >> beam.Create(["a", "b"])
        pair_tables = (p | "P1" >> beam.Create([kept[0], kept[2]]), p | "P2" >> beam.Create([kept[1]]))
        pcolls = {
            "kept": p | "Kept" >> beam.Create(kept),
            "rejected": (p | "Rej0" >> beam.Create(rejected[:1]), p | "Rej1" >> beam.Create(rejected[1:])),
            "links": links,
            "empty": p | "Empty" >> beam.Create([]),
            "pages": p | "Pages" >> beam.Create(["x"] * 7),
        }
        if together:
            pcolls.update(input=(links, stand_ins), pairs=pair_tables)
            write = WriteStageOutputs(out_dir, "t", "kept", SCHEMA, kept_tables=True, rejected_tables=True, table_counts=("pairs",))
        else:
            pcolls.update(input=(links, stand_ins) | "AllInput" >> beam.Flatten(), pairs=pair_tables | "AllPairs" >> beam.Flatten() | "Ones" >> beam.FlatMap(lambda t: [1] * t.num_rows))
            write = WriteStageOutputs(out_dir, "t", "kept", SCHEMA, kept_tables=True, rejected_tables=True)
        _ = pcolls | "Write" >> write
    with open(f"{out_dir}/{STATS_FILE}") as fh:
        return json.load(fh)


def test_counts_tallied_together_are_the_counts_of_a_combine_per_entry(tmp_path):
    one_by_one, together = _stats(str(tmp_path / "a"), False), _stats(str(tmp_path / "b"), True)
    assert together == one_by_one
    assert together == {"stage": "t", "input": 13, "kept": 8, "rejected": {"boilerplate_site": 1, "near_duplicate": 2, "too_small": 4},
                        "links": 11, "empty": 0, "pages": 7, "pairs": 8}


def test_rejected_rows_are_tallied_by_reason(tmp_path):
    rows = [{"record_id": str(i), "stage": "t", "reason": r, "detail": "", "url": ""} for i, r in enumerate(["a", "b", "a", "c", "a"])]
    with beam.Pipeline(options=pipeline_options([])) as p:
        pcolls = {"input": p | "In" >> beam.Create(range(9)), "kept": p | "Kept" >> beam.Create([{"id": "x"}] * 4), "rejected": p | "Rej" >> beam.Create(rows)}
        _ = pcolls | "Write" >> WriteStageOutputs(str(tmp_path), "t", "kept", SCHEMA)
    with open(tmp_path / STATS_FILE) as fh:
        assert json.load(fh) == {"stage": "t", "input": 9, "kept": 4, "rejected": {"a": 3, "b": 1, "c": 1}}


@pytest.mark.parametrize("value_type", [pa.float16(), pa.float32()])
def test_embeddings_from_the_column_equal_the_compacted_lists(value_type):
    from pairing.pipeline import _compact, embedding_arrays

    rng = np.random.default_rng(3)
    rows = []
    for i in range(300):
        if i % 17 == 0:
            rows.append(None)  # no embedding
        elif i % 29 == 0:
            rows.append([])  # an empty one
        else:
            rows.append((rng.normal(size=8 + i % 3) * 10.0 ** rng.integers(-6, 3)).astype(np.float16 if value_type == pa.float16() else np.float32).tolist())
    column = pa.chunked_array([pa.array(rows[:100], pa.list_(value_type)), pa.array(rows[100:], pa.list_(value_type))])
    got = embedding_arrays(column)
    assert len(got) == len(rows)
    for value, mine in zip(column.to_pylist(), got):
        want = _compact({"embedding": value})["embedding"]
        if want is None:
            assert mine is None
        else:
            assert mine.dtype == want.dtype == np.float16 and mine.shape == want.shape and mine.tobytes() == want.tobytes()
            assert mine.base is None or mine.base.size == mine.size  # its own copy, not a view of the row group's values


def test_embeddings_of_a_null_typed_column_are_none():
    from pairing.pipeline import embedding_arrays

    assert embedding_arrays(pa.nulls(4)) == [None] * 4


def test_pair_and_shards_take_arrows_system_pool(monkeypatch):
    """run_pair and run_shards each call core/memory.system_arrow_pool (Arrow's buffers from the
    system pool, whose freed memory glibc reuses: mimalloc held ~40 MB more at shards' peak); the
    stages are stopped right after it, at their first read of the input."""
    import pairing.pipeline
    import shards.writer
    from core.config import PairConfig, ShardConfig

    called = []

    class Stop(Exception):
        pass

    def recorder():
        called.append(True)
        raise Stop

    for module in (pairing.pipeline, shards.writer):
        monkeypatch.setattr(module, "system_arrow_pool", recorder)
        monkeypatch.setattr(module, "stage_files", lambda *a, **k: ["part-0.parquet"])  # the input checks pass
    monkeypatch.setattr(pairing.pipeline, "check_columns", lambda *a, **k: None)
    monkeypatch.setattr(shards.writer, "_pair_files_info", lambda files: ([1], "tiny-clip"))
    with pytest.raises(Stop):
        pairing.pipeline.run_pair("/nonexistent/filter", "/nonexistent/pair", PairConfig())
    with pytest.raises(Stop):
        shards.writer.run_shards("/nonexistent/pair", "/nonexistent/shards", ShardConfig())
    assert called == [True, True]


def test_system_arrow_pool_sets_the_system_pool():
    from core.memory import system_arrow_pool

    before = pa.default_memory_pool()
    try:
        system_arrow_pool()
        assert pa.default_memory_pool().backend_name == "system"
    finally:
        pa.set_memory_pool(before)


def test_a_tally_starts_each_bundle_from_zero():
    """_Tally emits each bundle's own counts: Beam (and the Dask runner, one bundle a partition)
    runs many bundles on one DoFn instance, so a count carried over would be summed twice."""
    from core.stageio import _REASON, _Tally

    tally = _Tally("kept")
    emitted = []
    for bundle in (["a", "b", "c"], ["d"], []):
        tally.start_bundle()
        for element in bundle:
            tally.process(element)
        emitted += [wv.value for wv in tally.finish_bundle()]
    assert emitted == [{"kept": 3}, {"kept": 1}]
    reasons = _Tally(_REASON)
    emitted = []
    for bundle in ([{"reason": "a"}, {"reason": "b"}, {"reason": "a"}], [{"reason": "b"}]):
        reasons.start_bundle()
        for element in bundle:
            reasons.process(element)
        emitted += [wv.value for wv in reasons.finish_bundle()]
    assert emitted == [{(_REASON, "a"): 2, (_REASON, "b"): 1}, {(_REASON, "b"): 1}]
    rows = _Tally("pairs", rows=True)
    rows.start_bundle()
    for table in (pa.table({"x": [1, 2]}), pa.table({"x": [3]})):
        rows.process(table)
    assert [wv.value for wv in rows.finish_bundle()] == [{"pairs": 3}]


def test_rows_to_table_takes_any_iterable_of_mappings_and_refuses_tuples():
    from types import MappingProxyType

    from core.records import rows_to_table

    schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
    rows = [{"a": 1, "b": "x", "extra": 0}, {"a": 2}, MappingProxyType({"b": "z"})]
    want = [{"a": 1, "b": "x"}, {"a": 2, "b": None}, {"a": None, "b": "z"}]
    assert rows_to_table(rows, schema).to_pylist() == want
    assert rows_to_table(iter(rows), schema).to_pylist() == want  # a generator: walked once
    with pytest.raises(TypeError, match="rows must be mappings"):
        rows_to_table([{"a": 1}, (2, "y")], schema)


def test_frozen_gc_nests_and_leaves_someone_elses_freeze_frozen():
    import gc

    from core.stageio import frozen_gc

    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        outer = gc.get_freeze_count()
        with frozen_gc():
            pass
        assert gc.get_freeze_count() >= outer  # not unfrozen by the block
    finally:
        gc.unfreeze()
    with frozen_gc():
        with frozen_gc():
            pass
        assert gc.get_freeze_count() > 0  # the inner block left the outer one's freeze
    assert gc.get_freeze_count() == 0


class _WritesItsOwn(beam.DoFn):
    """Writes each element's rejected rows into a file of its own (core/stageio.py TableFile), as
    pair's join does, and emits only the file and the rows' {reason: count}."""

    def __init__(self, sink: str):
        self.sink = sink

    def process(self, rows):
        import collections

        from core.stageio import TableFile

        file = TableFile(self.sink, REJECTED_SCHEMA)
        file.write(pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA))
        yield beam.pvalue.TaggedOutput("written", file.close())
        yield beam.pvalue.TaggedOutput("counts", dict(collections.Counter(r["reason"] for r in rows)))


def test_files_a_step_wrote_itself_are_named_and_counted_and_a_lost_bundles_file_removed(tmp_path):
    """Rejected rows a step wrote itself (pair's join, issue 34) are named beside the stage's sink's
    (`rejected/join-0000k-of-0000N`), counted by reason with the others, and a file never handed on
    (a bundle a runner lost and ran again) is removed by finish_stage: every row read back once,
    with pyarrow.dataset over the folder and from another working directory."""
    import os
    import subprocess
    import sys

    from core.stageio import TableFile, finish_stage, stage_files

    out = str(tmp_path / "stage")
    sink = os.path.join(out, "rejected", "join")
    rows = [{"record_id": f"j{i}", "stage": "t", "reason": "near_duplicate" if i % 3 else "copy_duplicate", "detail": f"d{i}", "url": f"http://x.example/{i}"} for i in range(10)]
    lost = TableFile(sink, REJECTED_SCHEMA)  # a retried bundle's first try: its file is never handed on
    lost.write(pa.Table.from_pylist(rows[:2], schema=REJECTED_SCHEMA))
    lost_path = lost.close()[1]
    others = [{"record_id": "p0", "stage": "t", "reason": "too_small", "detail": "", "url": ""}]
    with beam.Pipeline(options=pipeline_options([])) as p:
        made = p | "Chunks" >> beam.Create([rows[:4], rows[4:]]) | "Writes" >> beam.ParDo(_WritesItsOwn(sink)).with_outputs("written", "counts")
        pcolls = {
            "input": p | "In" >> beam.Create(range(13)), "kept": p | "Kept" >> beam.Create([pa.table({"id": ["k0", "k1"]}, schema=SCHEMA)]),
            "rejected": (p | "Rej" >> beam.Create([pa.Table.from_pylist(others, schema=REJECTED_SCHEMA)]),),
            "written": made.written, "rejected_counts": made.counts,
        }
        _ = pcolls | "Write" >> WriteStageOutputs(out, "t", "kept", SCHEMA, kept_tables=True, rejected_tables=True, written={sink: REJECTED_SCHEMA})
    stats = finish_stage(out)
    assert stats["rejected"] == {"copy_duplicate": 4, "near_duplicate": 6, "too_small": 1} and stats["input"] == 13 and stats["kept"] == 2
    assert not os.path.exists(lost_path)
    files = sorted(os.path.relpath(f, out) for f in stage_files(out, "rejected"))
    assert files == ["rejected/join-00000-of-00002.parquet", "rejected/join-00001-of-00002.parquet", "rejected/part-00000-of-00001.parquet"]
    code = "import pyarrow.dataset as ds, json, sys; print(json.dumps(ds.dataset(sys.argv[1], format='parquet').to_table().to_pylist()))"
    read = subprocess.run([sys.executable, "-c", code, os.path.join(out, "rejected")], cwd=str(tmp_path.parent), capture_output=True, text=True, timeout=120, check=True)
    got = sorted(json.loads(read.stdout), key=lambda r: r["record_id"])
    assert got == sorted(rows + others, key=lambda r: r["record_id"])


def test_files_written_for_a_sink_nobody_declared_are_an_error_not_lost(tmp_path):
    """A step's own files are named only for the sinks given to WriteStageOutputs: a file of any
    other sink would stay hidden and be removed while its rows were counted (found in review), so
    it is an error, and so are files given without sinks (or sinks without files)."""
    import os

    import pytest

    from core.stageio import StageError, TableFile, _name_table_files

    sink = os.path.join(str(tmp_path), "rejected", "join")
    file = TableFile(sink, REJECTED_SCHEMA)
    file.write(pa.Table.from_pylist([{"record_id": "r", "stage": "t", "reason": "x", "detail": "", "url": ""}], schema=REJECTED_SCHEMA))
    written = file.close()
    with pytest.raises(StageError, match="not declared"):
        _name_table_files([written], {os.path.join(str(tmp_path), "copies", "part"): REJECTED_SCHEMA})
    with pytest.raises(ValueError, match="written"):
        with beam.Pipeline(options=pipeline_options([])) as p:
            pcolls = {"input": p | "In" >> beam.Create([1]), "kept": p | "Kept" >> beam.Create([{"id": "a"}]), "rejected": p | "Rej" >> beam.Create([]), "written": p | "W" >> beam.Create([written])}
            _ = pcolls | "Write" >> WriteStageOutputs(str(tmp_path / "out"), "t", "kept", SCHEMA)
