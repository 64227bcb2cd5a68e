"""What pair leaves held between its steps on the in-process runner (issue 34, seventh sitting: at
the 16x scale input its peak rose by ~150 MB right after verification).

- Beam's in-process worker keeps every side input a step reads, decoded, in its state cache under
  the bundle's own cache token, to the pipeline's end (until 100 MB of them): copy_of (65,363
  entries, read by two steps), the keep signals and the boilerplate flags stayed resident.
  core/memory.no_side_input_cache, which pair runs under, turns that cache off.
- The copy groups' verified pairs crossed the runner as pyarrow tables in a ToList, whose
  CombineGlobally keeps its result as a side input to the end: now they are files, and only their
  paths cross.
"""

import gc
import json

import apache_beam as beam
import pyarrow as pa

from core.memory import no_side_input_cache


class Marker:
    """A side input's element whose live instances the test counts."""

    def __init__(self, k: int):
        self.k = k


def _count_markers(_, out: str) -> None:
    gc.collect()
    with open(out, "w") as fh:
        json.dump(sum(isinstance(o, Marker) for o in gc.get_objects()), fh)


def _pipeline(out: str, n: int) -> None:
    """A step reads n Markers as a side input; a later step (after a GroupByKey, so in a stage that
    runs once the first is done) counts the Markers still alive."""
    with beam.Pipeline(runner="DirectRunner") as p:
        markers = p | "Markers" >> beam.Create(range(n)) | "Make" >> beam.Map(Marker)
        used = p | "One" >> beam.Create([0]) | "Use" >> beam.Map(lambda x, ms: x + sum(1 for _ in ms), beam.pvalue.AsIter(markers))
        _ = used | "Key" >> beam.Map(lambda x: (0, x)) | "Group" >> beam.GroupByKey() | "Count" >> beam.Map(_count_markers, out)


def test_a_side_input_is_not_held_after_its_step(tmp_path):
    out = str(tmp_path / "count.json")
    _pipeline(out, 2000)  # the runner's default: the worker's cache keeps the decoded side input
    with open(out) as fh:
        held_before = json.load(fh)
    with no_side_input_cache():
        _pipeline(out, 2000)
    with open(out) as fh:
        held = json.load(fh)
    assert held_before >= 2000  # what pair's steps left held (copy_of twice, the flags, the signals)
    assert held == 0  # dropped with the bundle that read them
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    assert worker_handlers.STATE_CACHE_SIZE_MB == 100  # restored after the block


def test_pair_runs_without_the_side_input_cache(monkeypatch, tmp_path):
    """run_pair's pipeline runs inside no_side_input_cache (the worker it makes has no cache)."""
    import pairing.pipeline as pp

    seen = []

    def spy(*args, **kwargs):
        from apache_beam.runners.portability.fn_api_runner import worker_handlers

        seen.append(worker_handlers.STATE_CACHE_SIZE_MB)
        raise RuntimeError("stop here")

    monkeypatch.setattr(pp, "stage_pipeline", spy)
    try:
        pp._pair_steps([], [], str(tmp_path), pp.PairConfig(), None, (), str(tmp_path / "f"), str(tmp_path / "s"))
    except RuntimeError:
        pass
    assert seen == [0]


def test_verified_pairs_cross_as_files_with_every_pair(tmp_path):
    """_EdgeTables writes every verified pair (none of the others) into Arrow files and yields only
    their paths; the groups read every pair back."""
    from pairing.copies import EDGE_TABLE_ROWS, _EdgeTables, read_edge_tables

    rows = [{"image_a": f"a{k:06d}", "image_b": f"b{k:06d}", "copy": k % 3 != 0} for k in range(EDGE_TABLE_ROWS + 500)]
    out = tmp_path / "paths.json"
    with beam.Pipeline(runner="DirectRunner") as p:
        paths = p | beam.Create(rows) | beam.ParDo(_EdgeTables(str(tmp_path / "edges")))
        _ = paths | beam.combiners.ToList() | beam.Map(lambda ps: out.write_text(json.dumps(ps)))
    listed = json.loads(out.read_text())
    assert listed and all(isinstance(x, str) for x in listed)  # paths, not tables
    tables = read_edge_tables(listed)
    assert all(isinstance(t, pa.Table) for t in tables)
    got = sorted(zip(*(pa.concat_tables(tables).column(c).to_pylist() for c in ("image_a", "image_b"))))
    assert got == sorted((r["image_a"], r["image_b"]) for r in rows if r["copy"])


def test_the_copy_map_is_read_once_a_bundle_and_dropped_after(tmp_path):
    """The spills that key records by their kept dress get copy_of's file path as their side input
    and read the map from it once a bundle (`load`), holding nothing of it once the bundle ends;
    each record is keyed as the map says."""
    import pyarrow.ipc as ipc

    from pairing.copies import read_copy_of
    from pairing.spill import SpillByKey, read_groups

    path = str(tmp_path / "copy_of.arrow")
    table = pa.table({"member": ["b", "c"], "kept": ["a", "a"]})
    with open(path, "wb") as fh, ipc.new_file(fh, table.schema) as writer:
        writer.write_table(table)
    loads = []

    def load(paths):
        loads.append(list(paths))
        return read_copy_of(paths)

    spill = SpillByKey(str(tmp_path / "spill"), "links", 4, lambda r, c: (c.get(r, r), r.encode()), load)
    spill.start_bundle()
    for r in ["a", "b", "c", "d", "b"]:
        spill.process(r, [path])
    files = [wv.value[1][1] for wv in spill.finish_bundle()]
    assert loads == [[path]]  # once for the bundle's five records
    assert spill.loaded is None  # nothing of the map held after the bundle
    assert {k: sorted(v) for k, v in read_groups(files).items()} == {"a": [b"a", b"b", b"b", b"c"], "d": [b"d"]}
    assert read_copy_of([]) == {}
