"""How every stage lays out and owns its output directory, and the pipeline options it runs with.

A stage directory holds:
    <name>/part-*.parquet      kept records with the stage's schema (links, images, pairs, ...)
    rejected/part-*.parquet    Rejected records (reason from the stage's closed set)
    stats.json                 {"stage", "input", "kept", "rejected": {reason: n}, ...}
    _SUCCESS                   written last, once the counts reconcile: JSON naming the stage and
                               every file of the output (readers take this list, never a glob)

The integrity contract (`StageOutput`): a stage locks its `--out` (sibling `.NAME.lock` with pid,
host and start time), writes into the sibling `.NAME.partial/`, and swaps it in only after the
counts reconcile, so the previous output stays readable until then and two outputs never mix.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
import types
from typing import Any, Iterable, Iterator, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.filesystem import BeamIOError
from apache_beam.options.pipeline_options import PipelineOptions

from core.records import REJECTED_SCHEMA

# FnApiRunner runs in-process and never downloads anything; Beam's default DirectRunner would
# try to fetch a Prism binary at run time.
DEFAULT_RUNNER = "FnApiRunner"
STATS_FILE = "stats.json"
# Parquet row groups of ~8 MiB (Beam's default buffers 64 MiB): writers hold one row group in memory,
# and readers that fetch by (file, row group) pointer (shards, for the image bytes) read one.
ROW_GROUP_BYTES = 8 * 1024 * 1024
SUCCESS_FILE = "_SUCCESS"
# The command that makes each stage's output (named in errors about a missing or wrong input).
COMMANDS = {"extract": "webpairs crawl extract", "download": "webpairs crawl download", "filter": "webpairs filter", "pair": "webpairs pair", "shards": "webpairs shards", "train": "webpairs train"}


class StageError(RuntimeError):
    """A stage that cannot run or whose outputs do not reconcile; the message says which."""


def pipeline_options(beam_args: Optional[list[str]] = None, **defaults: Any) -> PipelineOptions:
    """Beam options from pass-through command-line flags, FnApiRunner unless --runner is given.
    (`--runner dask` needs its cluster: use `stage_pipeline`.)"""
    args = list(beam_args or [])
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args = [f"--runner={DEFAULT_RUNNER}"] + args
    return _Options(args, save_main_session=False, **defaults)


class _Options(PipelineOptions):
    """PipelineOptions that make each view (`view_as(StandardOptions)`, ...) once. Beam asks for a
    view in every `apply`, result-type inference and type check: about 1,000 per stage, each one a
    new argparse parser over the flags, 0.4 s of the driver per stage. Views share the options'
    values (`_all_options`), so a kept view reads and writes what a new one would."""

    def view_as(self, cls):
        views = self.__dict__.setdefault("_views", {})  # not setattr: PipelineOptions refuses unknown names
        if cls not in views:
            views[cls] = super().view_as(cls)
        return views[cls]


def _split_flags(args: list[str]) -> tuple[list[str], Optional[str], Optional[str], int]:
    """Take the runner and webpairs' Dask flags out of the Beam flags: (other flags, --runner,
    --dask-address, --dask-workers); `--flag value` and `--flag=value` alike, the last one wins."""
    rest, found = [], {}
    it = iter(args)
    for a in it:
        name, eq, value = a.partition("=")
        if name in ("--runner", "--dask-address", "--dask-workers"):
            found[name] = value if eq else next(it, "")
        else:
            rest.append(a)
    workers = found.get("--dask-workers", "0")
    try:
        workers = int(workers)
    except ValueError:
        raise StageError(f"--dask-workers must be a whole number, not {workers!r}") from None
    return rest, found.get("--runner"), found.get("--dask-address"), workers


def check_runner_flags(beam_args: Optional[list[str]]) -> tuple[list[str], Optional[str], Optional[str], int]:
    """`_split_flags`, refusing Dask flags without `--runner dask` (the CLI calls it before a stage
    starts, so a wrong flag fails at once, not after the encoder has loaded)."""
    args, runner, address, workers = _split_flags(list(beam_args or []))
    if (runner or "").lower() != "dask" and (address or workers):
        raise StageError("--dask-address and --dask-workers need --runner dask")
    return args, runner, address, workers


WEBPAIRS_BEAM_FLAGS = ("--runner", "--dask-address", "--dask-workers")  # taken out by _split_flags


def beam_flag_names() -> set[str]:
    """Every flag Beam's pipeline options know (the classes Beam itself parses with, the Dask
    runner's included) plus webpairs' own runner flags: a pass-through flag outside this set would
    be discarded by Beam without a word."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    try:
        import apache_beam.runners.dask.dask_runner  # noqa: F401 - registers DaskOptions
    except ImportError:
        pass
    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {}
    for cls in PipelineOptions.__subclasses__():  # as PipelineOptions.get_all_options does
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's own way to list them
    return {s for action in parser._actions for s in action.option_strings} | set(WEBPAIRS_BEAM_FLAGS)  # noqa: SLF001


_DOFN_SPECS: dict = {}


def _specs_key(dofn) -> Optional[tuple]:
    """What Beam's `get_dofn_specs(dofn)` depends on, or None where that is not just the class: the
    class's methods' default arguments (state and timer parameters). Beam reads only the DoFn's
    bound methods, so beam.Map/FlatMap's CallableWrapperDoFn, whose `process` is the wrapped plain
    function in its instance dict, answers as its class does (the key holds no function: Beam
    unpickles those afresh for every bundle processor). A DoFn with bound methods of its own in its
    instance dict (a Map of a bound method included), or another `_inspect_` hook, is left to Beam."""
    from apache_beam.transforms.core import CallableWrapperDoFn

    cls = type(dofn)
    own = getattr(dofn, "__dict__", {})
    if any(isinstance(v, types.MethodType) for v in own.values()):  # bound methods of its own: Beam's own answer
        return None
    if isinstance(dofn, CallableWrapperDoFn):  # `process` is the wrapped function in its dict: not a bound
        return (cls,) if "process" in own else None  # method, so Beam skips it (and its `_inspect_process`)
    if any(name.startswith("_inspect_") for name in dir(cls)):  # other hooks (type-check wrappers): Beam's own
        return None
    return (cls,)


def memo_dofn_specs() -> None:
    """Beam's `userstate.get_dofn_specs` (a DoFn's state and timer specs) answered once per DoFn
    class in this process. Beam asks it 2-3 times of every DoFn instance it builds (pipeline
    construction, each bundle processor's operations), and each answer runs `inspect.signature`
    on every method of the DoFn: ~450 asks, ~0.4 CPU s of each stage run's ~1 s fixed cost
    (filter, issue 34). The answer depends only on the class's methods (`_specs_key`); what it
    returns is a fresh copy of the sets each time. Idempotent; Beam's own function stays the one
    asked for anything `_specs_key` does not recognise."""
    from apache_beam.transforms import userstate

    if getattr(userstate.get_dofn_specs, "_webpairs_memo", False):
        return
    original = userstate.get_dofn_specs

    def get_dofn_specs(dofn):
        key = _specs_key(dofn)
        if key is None:
            return original(dofn)
        found = _DOFN_SPECS.get(key)
        if found is None:
            found = _DOFN_SPECS[key] = original(dofn)
        return set(found[0]), set(found[1])

    get_dofn_specs._webpairs_memo = True
    get_dofn_specs.__wrapped__ = original
    userstate.get_dofn_specs = get_dofn_specs


@contextlib.contextmanager
def stage_pipeline(beam_args: Optional[list[str]] = None) -> Iterator[beam.Pipeline]:
    """A Beam pipeline for a stage. `--runner dask` runs it on dask.distributed (core/dask_runner.py):
    on the cluster at `--dask-address tcp://HOST:PORT`, or on a LocalCluster of `--dask-workers N`
    processes (default: the cores) started here and closed after; each element of a Create (an
    input file, or a row group: `row_groups`) is one partition unless --dask_npartitions or
    --dask_partition_size say otherwise."""
    args, runner, address, workers = check_runner_flags(beam_args)
    memo_dofn_specs()  # Beam's per-DoFn introspection once per class (a Dask worker keeps Beam's own)
    if (runner or "").lower() != "dask":
        with beam.Pipeline(options=pipeline_options(args + ([f"--runner={runner}"] if runner else []))) as p:
            yield p
        return
    from core.dask_runner import RUNNER_PATH, dask_cluster

    if not any(a.startswith(("--dask_npartitions", "--dask_partition_size")) for a in args):
        args.append("--dask_partition_size=1")
    with dask_cluster(address, workers) as scheduler:
        with _DaskPipeline(options=pipeline_options([f"--runner={RUNNER_PATH}", f"--dask_client_address={scheduler}"] + args)) as p:
            yield p


@contextlib.contextmanager
def frozen_gc(collect: bool = True) -> Iterator[None]:
    """The objects that exist when a stage starts (modules, Beam's and pyarrow's classes: ~1.4 x
    10^5 after pair's imports) moved out of the garbage collector's sight for the stage
    (`gc.freeze`, undone after): each full collection during the stage then walks only what the
    stage made (a full collection of pair at 20,000 images cost ~0.1 CPU s, six of them ~0.6 of its
    ~20 s; issue 34). What the stage drops is collected as before. One full collection first, so
    that garbage already there (filter's, in `webpairs run`) is not held frozen for the stage. Only
    the outermost block unfreezes: a block inside another, or inside someone else's `gc.freeze`,
    leaves the heap frozen as it found it. `collect=False` skips the first collection (extract
    freezes once per input file, where ~0.1 CPU s a file would count)."""
    import gc

    with _FREEZE_LOCK:  # nested in one of these blocks: known without gc.get_freeze_count, which
        # walks the whole frozen heap (~10 ms at 1.4 x 10^5 objects; extract asks once per file)
        mine = _FREEZE_DEPTH[0] == 0 and gc.get_freeze_count() == 0  # else nested, or frozen by someone else
        _FREEZE_DEPTH[0] += 1
    try:
        if mine and collect:
            gc.collect()  # what is garbage already goes now, not held frozen for the whole stage
        gc.freeze()
        yield
    finally:
        with _FREEZE_LOCK:
            _FREEZE_DEPTH[0] -= 1
        if mine:
            gc.unfreeze()


_FREEZE_DEPTH = [0]  # frozen_gc blocks open in this process
_FREEZE_LOCK = threading.Lock()


class ArrowTableCoder(beam.coders.Coder):
    """pyarrow tables as Arrow IPC streams; their size for Beam's element-size metrics is the
    table's `nbytes`. With the default coder (pickle) Beam pickled every table a step makes just to
    measure it: an output's first ten elements are always sampled, and a stage's outputs are a few
    large tables (extract: ~115 MB pickled a Common Crawl file, ~0.06 CPU s, issue 34)."""

    def encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def decode(self, data: bytes) -> pa.Table:
        return pa.ipc.open_stream(data).read_all()

    def _create_impl(self):
        from apache_beam.coders.coder_impl import CallbackCoderImpl

        return CallbackCoderImpl(self.encode, self.decode, lambda table: table.nbytes)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return pa.Table

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)


def of_tables(*pcolls) -> None:
    """Mark PCollections whose elements are pyarrow tables, so that Beam encodes and measures them
    with ArrowTableCoder (an untyped DoFn's outputs are `Any`: pickled)."""
    for pcoll in pcolls:
        pcoll.element_type = pa.Table


class _DaskPipeline(beam.Pipeline):
    """A pipeline that goes to the Dask runner without Beam's runner-API round trip: Beam makes it
    (proto and back) for runners outside the Fn API only as a check, and it cost a second of the
    driver's time per stage; the Dask runner pickles every DoFn itself (core/dask_runner.py)."""

    def run(self, test_runner_api="AUTO"):
        return super().run(test_runner_api=False)


def is_complete(out_dir: str) -> bool:
    """True when a stage directory was finished (its `_SUCCESS` marker exists)."""
    return FileSystems.exists(os.path.join(out_dir, SUCCESS_FILE))


def _write_stats(_, out_dir: str, stage: str, input_count: int, kept: int, reasons: dict, extra: dict, **counts):
    stats = {
        **{k: int(v) for k, v in counts.items()},
        "stage": stage,
        "input": int(input_count),
        "kept": int(kept),
        "rejected": {k: int(v) for k, v in sorted(reasons.items())},
        **extra,
    }
    with FileSystems.create(os.path.join(out_dir, STATS_FILE)) as fh:
        fh.write(json.dumps(stats, indent=2, sort_keys=True).encode())
    return stats


class _SumCounts(beam.CombineFn):
    """{key: n} dicts (one a bundle, from `_Tally`) summed key by key: one global combine of every
    count of a stage, whatever the number of rows counted."""

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, counts: dict, more: dict) -> dict:
        for key, n in more.items():
            counts[key] = counts.get(key, 0) + n
        return counts

    def merge_accumulators(self, accumulators) -> dict:
        merged: dict = {}
        for counts in accumulators:
            self.add_input(merged, counts)
        return merged

    def extract_output(self, counts: dict) -> dict:
        return counts


def _reason_counts(table) -> dict:
    """{reason: rows} of a pyarrow table of rejected rows."""
    return {vc["values"]: vc["counts"] for vc in table.column("reason").value_counts().to_pylist()}


class WriteRowsToParquet(beam.io.WriteToParquet):
    """Beam's WriteToParquet (row dicts -> parquet), with the pyarrow tables between its two steps
    (one per row group: `record_batch_size` rows at least, 1,000 by default, ~110 MB of filter's
    photos) typed as tables: Beam then measures them with ArrowTableCoder (their `nbytes`) instead
    of pickling every sampled one whole to estimate its size (an output's first ten always: 0.38
    CPU s of benchmarks/filter.py's 2,400-photo run in cProfile, issue 34). The same steps and
    files otherwise (tests/test_filter_fast_paths.py)."""

    def expand(self, pcoll):
        if not pcoll.is_bounded or self._schema is None:  # Beam's own paths (streaming, Beam schemas)
            return super().expand(pcoll)
        from apache_beam.io.iobase import Write
        from apache_beam.io.parquetio import _RowDictionariesToArrowTable

        convert = _RowDictionariesToArrowTable(self._schema, self._row_group_buffer_size, self._record_batch_size)
        return pcoll | beam.ParDo(convert).with_output_types(pa.Table) | Write(self._sink)


class WriteStageOutputs(beam.PTransform):
    """Write kept rows, rejected rows and stats.json for one stage.

    Input: a dict of PCollections `{"input": ..., "kept": ..., "rejected": ...}`; `input` is only
    counted (or give `input_count`, a PCollection, or a tuple of them, of numbers that are summed;
    with both, the input is their sum), `kept` rows follow
    `schema` (or, with `kept_tables=True`, are pyarrow tables with that schema; give `kept_count`,
    numbers that are summed, when the kept rows are not the records counted), `rejected` rows
    follow REJECTED_SCHEMA (or, with `rejected_tables=True`, are pyarrow tables with that schema,
    written as they come). With tables, `kept` and `rejected` may be tuples of PCollections, each
    written by its own sink. Any other entry is counted too and lands in stats.json under its name
    (e.g. "pairs"); the entries named in `more` ({name: schema}) are also written to `name/` (as
    tables when named in `table_counts` too).

    Every count (input, kept, reasons, the other entries) is tallied in the step that makes its
    elements (`_Tally`: one {count: n} a bundle) and summed by one global combine, read by the
    stats step as one side input (a Count.Globally per entry was 8 transforms each; 15 of them were
    ~0.8 CPU s of Beam's fixed cost in pair, issue 34). `input` and the other entries may also be
    tuples of PCollections (counted together), the entries named in `table_counts` hold
    pyarrow tables, counted by their rows, and those named in `given_counts` hold ints, counts
    made where the elements are (summed). `reason_stats` ({name: reason}) puts the number of
    rejected rows of a reason in stats.json under a name of its own too (extract's failed_files...),
    without a step of its own.

    `kept_batch_rows` is how many kept rows Beam's parquet writer converts to Arrow at a time (its
    default 1,000); a row group holds at least one such batch (filter's images: 250, see there).
    With `kept_group_key` (fields of the kept rows; `table_sinks` only), a row group ends only where
    those fields' values change (`_RowsToTables`).

    Steps that write their own tables as they make them (`TableFile`; pair's join) hand on the
    files: `written` ({sink path: schema}) names those sinks, and the entry "written" holds the
    (sink path, file) of each file (a PCollection or a tuple of them), named with the stage's
    other table files by the stats step; their rejected rows are counted by the entry
    "rejected_counts" ({reason: rows} dicts, summed), their other rows by `given_counts`.

    `table_sinks=True` writes the tables with `_WriteTables` (one step a sink: a parquet file a
    bundle, named when the stats are written) instead of Beam's parquet sink (nine steps, a shuffle
    and three side inputs each, ~0.08 CPU s of Beam's fixed cost a sink; extract has five: issue 34).
    Rows (kept, rejected and the `more` entries) are made into tables first by `_RowsToTables`
    (`kept_batch_rows` a batch, row groups as Beam's sink makes them); filter writes so.
    """

    def __init__(self, out_dir: str, stage: str, name: str, schema: pa.Schema, extra: Optional[dict] = None, kept_tables: bool = False, more: Optional[dict] = None, rejected_tables: bool = False,
                 table_counts: tuple = (), reason_stats: Optional[dict] = None, table_sinks: bool = False, kept_batch_rows: int = 1000, given_counts: tuple = (),
                 written: Optional[dict] = None, kept_group_key: tuple = ()):
        super().__init__()
        self.kept_group_key = tuple(kept_group_key)
        self.written = dict(written or {})  # sinks whose files the pipeline's own steps wrote (see above)
        self.kept_batch_rows = kept_batch_rows
        self.table_sinks = table_sinks
        self.out_dir, self.stage, self.name, self.schema = out_dir, stage, name, schema
        self.extra = extra or {}
        self.kept_tables = kept_tables
        self.rejected_tables = rejected_tables
        self.more = more or {}
        self.table_counts = tuple(table_counts)
        self.given_counts = tuple(given_counts)
        self.reason_stats = dict(reason_stats or {})

    def expand(self, pcolls):
        kept, rejected = pcolls["kept"], pcolls["rejected"]
        # With tables, `kept` and `rejected` may each be a tuple of PCollections: each is written
        # by its own sink (part-*, part_1-*, ...) and only their counts meet. (A Flatten of
        # PCollections made in different stages is held whole in memory by the local runner.)
        kept_all = list(kept) if isinstance(kept, (tuple, list)) else [kept]
        rejected_all = list(rejected) if isinstance(rejected, (tuple, list)) else [rejected]
        if (len(kept_all) > 1 and not self.kept_tables) or (len(rejected_all) > 1 and not self.rejected_tables):
            raise ValueError("several kept or rejected PCollections need kept_tables / rejected_tables")
        kept_path = os.path.join(self.out_dir, self.name, "part")
        rejected_path = os.path.join(self.out_dir, "rejected", "part")
        self._sinks: dict = dict(self.written)  # table sinks (and `written`'s): sink path -> schema
        self._written: list = []  # their (sink path, temporary file) PCollections
        if bool(self.written) != ("written" in pcolls):  # files nobody would name (removed unnamed, their rows counted)
            raise ValueError("WriteStageOutputs: give both the `written` sinks and the \"written\" files, or neither")
        if self.written:
            given = pcolls["written"]
            self._written += list(given) if isinstance(given, (tuple, list)) else [given]
        for pcs, path, label, schema, tables in ((kept_all, kept_path, "WriteKept", self.schema, self.kept_tables), (rejected_all, rejected_path, "WriteRejected", REJECTED_SCHEMA, self.rejected_tables)):
            for i, pc in enumerate(pcs):  # part-*, then part_1-*, part_2-*...
                # not part-1: each sink's finalize deletes what matches its own `part-*-of-N` first,
                # and that matched a second sink's finished part-1-00000-of-00001 (rows lost when
                # the second sink finished first: 1 run in 3 in process, found in review)
                sink_path, sink_label = (path, label) if i == 0 else (f"{path}_{i}", f"{label}{i}")
                self._sink(pc, sink_label, sink_path, schema, tables, self.kept_batch_rows if path == kept_path else 1000, self.kept_group_key if path == kept_path else ())
        for other, schema in self.more.items():  # tables when counted as tables (`table_counts`), else rows
            self._sink(pcolls[other], f"Write_{other}", os.path.join(self.out_dir, other, "part"), schema, other in self.table_counts, 1000)
        return self._stats(pcolls, kept_all, rejected_all)

    def _sink(self, pc, label: str, sink_path: str, schema: pa.Schema, tables: bool, rows: int, group_key: tuple = ()) -> None:
        """Write `pc` (pyarrow tables, or row dicts made into tables `rows` at a time) to `sink_path`."""
        if self.table_sinks:
            if not tables:  # rows: made into tables in the step that makes them
                pc = pc | f"{label}Tables" >> beam.ParDo(_RowsToTables(schema, rows, ROW_GROUP_BYTES, group_key)).with_output_types(pa.Table)
            self._sinks[sink_path] = schema
            self._written.append(pc | label >> beam.ParDo(_WriteTables(sink_path, schema)))
        elif tables:  # each table is written as it comes
            _ = pc | label >> beam.io.WriteToParquetBatched(sink_path, schema, file_name_suffix=".parquet")
        else:
            _ = pc | label >> WriteRowsToParquet(sink_path, schema, file_name_suffix=".parquet", row_group_buffer_size=ROW_GROUP_BYTES, record_batch_size=rows)

    def _stats(self, pcolls: dict, kept_all: list, rejected_all: list):
        """stats.json from one global combine of every count (see the class)."""
        tallies = []

        def tally(pcs, key, label: str, rows: bool = False) -> None:
            for i, pc in enumerate(pcs if isinstance(pcs, (tuple, list)) else [pcs]):
                tallies.append(pc | (f"{label}{i}" if i else label) >> beam.ParDo(_Tally(key, rows)))

        if "input_count" in pcolls:
            counts = pcolls["input_count"]
            for i, pc in enumerate(counts if isinstance(counts, (tuple, list)) else [counts]):
                tallies.append(pc | (f"TallyInputCount{i}" if i else "TallyInputCount") >> beam.Map(lambda n: {_INPUT: n}))
        if "input" in pcolls or "input_count" not in pcolls:
            tally(pcolls["input"], _INPUT, "TallyInput")
        if "kept_count" in pcolls:
            tallies.append(pcolls["kept_count"] | "TallyKeptCount" >> beam.Map(lambda n: {_KEPT: n}))
        else:
            tally(kept_all, _KEPT, "TallyKept", rows=self.kept_tables)
        for i, pc in enumerate(rejected_all):
            label = f"TallyReasons{i}" if i else "TallyReasons"
            if self.rejected_tables:
                tallies.append(pc | label >> beam.Map(lambda t: {(_REASON, k): v for k, v in _reason_counts(t).items()}))
            else:
                tallies.append(pc | label >> beam.ParDo(_Tally(_REASON)))
        if "rejected_counts" in pcolls:  # {reason: rows} of rejected rows written by the steps that made them
            counts = pcolls["rejected_counts"]
            for i, pc in enumerate(counts if isinstance(counts, (tuple, list)) else [counts]):
                tallies.append(pc | (f"TallyRejectedCounts{i}" if i else "TallyRejectedCounts") >> beam.Map(lambda d: {(_REASON, k): v for k, v in d.items()}))
        names = [name for name in pcolls if name not in ("input", "input_count", "kept", "kept_count", "rejected", "rejected_counts", "written")]
        for name in names:
            if name in self.given_counts:
                tallies.append(pcolls[name] | f"Tally_{name}" >> beam.Map(lambda n, key=(_COUNT, name): {key: n}))
            else:
                tally(pcolls[name], (_COUNT, name), f"Tally_{name}", rows=name in self.table_counts)
        totals = tallies | "AllTallies" >> beam.Flatten() | "SumTallies" >> beam.CombineGlobally(_SumCounts())
        written = {}
        if self._sinks:  # the files of every table sink, named by the step that writes the stats
            written = {"written": beam.pvalue.AsList(self._written | "AllWritten" >> beam.Flatten()), "sinks": self._sinks}
        return (
            kept_all[0].pipeline
            | "StatsSeed" >> beam.Create([None])
            | "WriteStats"
            >> beam.Map(_write_tallied_stats, totals=beam.pvalue.AsSingleton(totals), names=names, out_dir=self.out_dir, stage=self.stage, extra=self.extra, reason_stats=self.reason_stats, **written)
        )


_INPUT, _KEPT, _REASON, _COUNT = "input", "kept", "reason", "count"  # the keys of `_Tally`'s counts


class _Tally(beam.DoFn):
    """Counts a bundle's elements (or, with `rows`, the rows of its pyarrow tables; with key
    _REASON, each rejected row under (_REASON, its reason)) and emits {key: n} when the bundle ends:
    what Count.Globally's lifted combine does in the producing step, without its eight transforms."""

    def __init__(self, key, rows: bool = False):
        self.key, self.rows = key, rows

    def start_bundle(self):
        self.counts: dict = {}

    def process(self, element):
        key = (_REASON, element["reason"]) if self.key == _REASON else self.key
        self.counts[key] = self.counts.get(key, 0) + (element.num_rows if self.rows else 1)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        if self.counts:
            yield GlobalWindows.windowed_value(self.counts)
        self.counts = {}


class _RowsToTables(beam.DoFn):
    """Row dicts -> pyarrow tables of `schema` (`WriteStageOutputs(table_sinks=True)` with rows),
    as Beam's parquet sink makes them (`_RowDictionariesToArrowTable`): `batch_rows` rows a record
    batch, a table (one row group) once the batches hold `group_bytes`, the rest when the bundle
    ends; a nullable field a row lacks is null, a required one it lacks is a KeyError. Beam's looks
    every field up in the schema for every row (~0.05 CPU ms a filter image, issue 34); here a
    column is one list comprehension a batch. With `group_key` (field names), tables end only where
    those fields' values change (`_keyed`; filter: the download row group a row's bytes are in, so
    that each download row group is pointed to from one filter row group and read once by shards)."""

    def __init__(self, schema: pa.Schema, batch_rows: int, group_bytes: int, group_key: tuple = ()):
        self.schema, self.batch_rows, self.group_bytes, self.group_key = schema, batch_rows, group_bytes, tuple(group_key)

    def start_bundle(self):
        self.rows: list = []
        self.batches: list = []
        self.size = 0
        self.count = 0  # rows in the table being made
        self.key = None

    def process(self, row):
        if self.group_key:
            yield from self._keyed(row)
            return
        self.rows.append(row)
        if len(self.rows) >= self.batch_rows:
            self._batch()
            if self.size >= self.group_bytes:
                yield self._table()

    def _keyed(self, row):
        """With `group_key`: a table ends only where the key changes, once it holds `batch_rows`
        rows or `group_bytes`, so rows of one key (filter: one download row group) share a row
        group, and a small key's rows join the next ones'. A row whose key is all null (filter: a
        blurred image, stored rather than pointed to) joins the current table."""
        key = tuple(row.get(k) for k in self.group_key)
        if any(v is not None for v in key):
            if key != self.key and self.key is not None and (self.count >= self.batch_rows or self.size >= self.group_bytes):
                if self.rows:
                    self._batch()
                yield self._table()
            self.key = key
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.batch_rows:
            self._batch()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        if self.rows:
            self._batch()
        if self.batches:
            yield GlobalWindows.windowed_value(self._table())

    def _batch(self) -> None:
        rows, self.rows = self.rows, []
        columns = [_array([r.get(f.name) for r in rows] if f.nullable else [r[f.name] for r in rows], f.type) for f in self.schema]
        batch = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        self.batches.append(batch)
        self.size += batch.nbytes

    def _table(self) -> pa.Table:
        table = pa.Table.from_batches(self.batches, schema=self.schema)
        self.batches, self.size, self.count = [], 0, 0
        return table


def _array(values: list, type_: pa.DataType) -> pa.Array:
    """`pa.array(values, type_)`; a binary column of bytes objects (filter's image bytes, before they
    became pointers; now only --faces blur's JPEGs) is made from
    one exact-size join of the values instead: pa.array appends them to a buffer that grows by
    doubling, and the last growth of a 250-photo batch (~19 MB) asked for 35-53 MB, past glibc's 32
    MB mmap ceiling, so every batch's bytes went into pages mapped, zeroed and unmapped afresh
    (issue 34, eighteenth sitting). The same array (tests/test_filter_fast_paths.py)."""
    if type_ != pa.binary() or not values or not all(v is None or type(v) is bytes for v in values):
        return pa.array(values, type=type_)
    lengths = np.fromiter((0 if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:  # over binary's 32-bit offsets: pa.array's answer, as before
        return pa.array(values, type=type_)
    nulls = sum(v is None for v in values)
    validity = pa.array([v is not None for v in values], type=pa.bool_()).buffers()[1] if nulls else None
    data = pa.py_buffer(b"".join(v for v in values if v is not None))  # the joined bytes, not copied again
    return pa.Array.from_buffers(type_, len(values), [validity, pa.py_buffer(offsets.astype(np.int32)), data], null_count=nulls)


@functools.lru_cache(maxsize=64)
def _dictionary_columns(schema: pa.Schema) -> tuple[str, ...]:
    """The parquet columns (leaf paths, as pyarrow's `use_dictionary` takes them: a list column's
    values are `name.list.item`) that get a dictionary, as in Beam's sink: all but those of binary
    fields (image bytes), whose values are all distinct: pyarrow would hash each until the
    dictionary page overflows (~0.04 CPU ms a filter image, issue 34)."""
    buf = pa.BufferOutputStream()  # the leaf paths as the writer names them: an empty file's
    pq.ParquetWriter(buf, schema, use_compliant_nested_type=False).close()
    parquet = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    binary = {f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    return tuple(path for path in (parquet.column(i).path for i in range(len(parquet))) if path.split(".")[0] not in binary)


class TableFile:
    """Pyarrow tables written, as they come, into one parquet file (Beam's parquet sink's writer
    settings) under a hidden name beside a sink's files (`sink_path`: FOLDER/PREFIX); `close`
    returns (sink_path, that file), or None when no table came. The stats step of
    `WriteStageOutputs` names the files it is handed (`_name_table_files`: Beam's
    `PREFIX-00000-of-00002.parquet`); a file of a failed or retried bundle, never handed on, stays
    hidden and `finish_stage` removes it. Used by `_WriteTables`, and by a step that writes its
    own rows as it makes them instead of emitting them (pair's join: on Dask a bundle's outputs
    wait in its worker until the bundle ends; issue 34)."""

    def __init__(self, sink_path: str, schema: pa.Schema):
        self.sink_path, self.schema = sink_path, schema
        self.writer = self.fh = self.tmp = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            import uuid

            from apache_beam.io.filesystem import CompressionTypes

            folder, prefix = os.path.split(self.sink_path)
            self.tmp = os.path.join(folder, f".{prefix}-{uuid.uuid4().hex}.parquet")
            if "://" in self.tmp:
                self.fh = FileSystems.create(self.tmp, compression_type=CompressionTypes.UNCOMPRESSED)
            else:  # a local file: Arrow writes it itself, not through a Python file object
                os.makedirs(folder, exist_ok=True)
                self.fh = pa.OSFile(self.tmp, "wb")
            self.writer = pq.ParquetWriter(self.fh, self.schema, compression="none", use_dictionary=list(_dictionary_columns(self.schema)), use_deprecated_int96_timestamps=False, use_compliant_nested_type=False)
        self.writer.write_table(table)

    def close(self) -> Optional[tuple]:
        if self.writer is None:
            return None
        self.writer.close()
        self.fh.close()
        written = (self.sink_path, self.tmp)
        self.writer = self.fh = self.tmp = None
        return written


class _WriteTables(beam.DoFn):
    """A sink of pyarrow tables (`WriteStageOutputs(table_sinks=True)`): each bundle's tables, as
    they come, into one `TableFile`; emits (sink path, that file) when the bundle ends. Only the
    files of bundles that succeeded reach `_name_table_files`, which gives them their names."""

    def __init__(self, sink_path: str, schema: pa.Schema):
        self.sink_path, self.schema = sink_path, schema

    def start_bundle(self):
        self.file = TableFile(self.sink_path, self.schema)

    def process(self, table):
        self.file.write(table)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        written = self.file.close()
        if written is not None:
            yield GlobalWindows.windowed_value(written)


def _name_table_files(written: list, sinks: dict) -> None:
    """The files `_WriteTables` wrote, renamed as Beam's file sinks name theirs (`PATH-00000-of-00002.parquet`,
    in the order of their temporary names); a sink that got no table gets one empty file, as Beam's do."""
    by_sink: dict = {}
    for sink_path, tmp in written:
        by_sink.setdefault(sink_path, []).append(tmp)
    unknown = sorted(set(by_sink) - set(sinks))
    if unknown:  # a file of a sink nobody declared would stay hidden and be removed, its rows counted
        raise StageError(f"files written for sinks that were not declared: {', '.join(unknown)}")
    for sink_path, schema in sinks.items():
        files = sorted(by_sink.get(sink_path, []))
        if not files:
            with FileSystems.create(f"{sink_path}-00000-of-00001.parquet") as fh:
                pq.ParquetWriter(fh, schema, compression="none", use_compliant_nested_type=False).close()
            continue
        dests = [f"{sink_path}-{k:05d}-of-{len(files):05d}.parquet" for k in range(len(files))]
        try:
            FileSystems.rename(files, dests)
        except BeamIOError:  # a retried stats step (a runner re-running a lost task): some are named already, as Beam's finalize allows
            left = [(src, dst) for src, dst in zip(files, dests) if FileSystems.exists(src)]
            if any(not FileSystems.exists(dst) for src, dst in zip(files, dests) if (src, dst) not in left):
                raise
            if left:
                FileSystems.rename([src for src, _ in left], [dst for _, dst in left])


def _write_tallied_stats(_, totals: dict, names: list, out_dir: str, stage: str, extra: dict, reason_stats: Optional[dict] = None, written: Optional[list] = None, sinks: Optional[dict] = None):
    if sinks:
        _name_table_files(written or [], sinks)
    reasons = {key[1]: n for key, n in totals.items() if isinstance(key, tuple) and key[0] == _REASON}
    counts = {name: totals.get((_COUNT, name), 0) for name in names}
    counts.update({name: reasons.get(reason, 0) for name, reason in (reason_stats or {}).items()})
    return _write_stats(None, out_dir, stage, totals.get(_INPUT, 0), totals.get(_KEPT, 0), reasons, extra, **counts)


def finish_stage(out_dir: str, stage: Optional[str] = None) -> dict:
    """Check that stats.json reconciles, then mark the stage complete with `_SUCCESS` listing every
    file of the output (leftovers of retried writers, hidden or `beam-temp*`, are removed first);
    returns the stats."""
    stats = read_stats(out_dir)
    if stats is None:
        raise StageError(f"{out_dir}: the stage wrote no {STATS_FILE}")
    rejected = sum(stats["rejected"].values())
    if stats["input"] != stats["kept"] + rejected:
        raise StageError(
            f"{stats['stage']}: counts do not reconcile: input {stats['input']} != kept {stats['kept']}"
            f" + rejected {rejected}"
        )
    fs, root = _fs(out_dir)
    files = []
    for path in sorted(fs.find(root, withdirs=False)):
        rel = path[len(root.rstrip("/")) + 1 :]  # fsspec paths: root-relative with "/"
        if any(part.startswith((".", "beam-temp")) for part in rel.split("/")):
            fs.rm(path)  # a temporary file of a retried or killed writer: never part of the output
        elif rel != SUCCESS_FILE:
            files.append(rel)
    # `id`: this output's own, new each time it is made, so that a stage pointing into it can tell
    # that it was made again since (`check_made_from`)
    marker = {"stage": stage or stats["stage"], "files": files, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "id": os.urandom(8).hex()}
    with FileSystems.create(os.path.join(out_dir, SUCCESS_FILE)) as fh:
        fh.write(json.dumps(marker, indent=1).encode())
    return stats


def read_stats(out_dir: str) -> Optional[dict]:
    """The stage's stats.json, or None if absent."""
    path = os.path.join(out_dir, STATS_FILE)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as fh:
        return json.loads(fh.read())


def read_success(stage_dir: str, expected: Optional[str] = None) -> dict:
    """The `_SUCCESS` marker of a complete stage output ({"stage", "files"}); a StageError in one
    sentence, naming the folder and what to run, when it is missing, old or from another stage."""
    want = COMMANDS.get(expected or "", "the stage that makes it")
    if not FileSystems.exists(stage_dir.rstrip("/") or "/"):
        raise StageError(f"{stage_dir} does not exist (expected a `{want}` output)")
    path = os.path.join(stage_dir, SUCCESS_FILE)
    if not FileSystems.exists(path):
        raise StageError(f"{stage_dir} is not a complete stage output (no {SUCCESS_FILE}: the stage was interrupted or never ran); run `{want}` into it first")
    with FileSystems.open(path) as fh:
        raw = fh.read()
    try:
        marker = json.loads(raw)
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list) or "stage" not in marker:
        raise StageError(f"{stage_dir} was written by an older webpairs (its {SUCCESS_FILE} lists no files); run `{want}` into it again")
    if expected and marker["stage"] != expected:
        raise StageError(f"{stage_dir} is a `{COMMANDS.get(marker['stage'], marker['stage'])}` output, but this command reads a `{want}` output")
    return marker


MADE_FROM = "made_from"  # stats.json key of a stage whose rows point into its input (filter, pair)


def made_from(stage_dir: str) -> dict:
    """What a stage whose rows point into the complete output `stage_dir` records of it in its
    stats.json (under MADE_FROM): the folder, absolute as its pointers are, and its `_SUCCESS` id."""
    path = _stage_path(stage_dir)
    return {"path": path, "id": read_success(path).get("id")}


def stale_input(stage_dir: str) -> Optional[str]:
    """The input folder that the complete stage `stage_dir` points into when that folder has been
    made again or removed since the stage ran (its pointers may then name rows that are not there);
    None when it is the same, or nothing is recorded (an output from before the ids)."""
    stamp = (read_stats(stage_dir) or {}).get(MADE_FROM)
    if not isinstance(stamp, dict) or not stamp.get("id"):
        return None
    try:
        now = read_success(stamp["path"]).get("id")
    except StageError:
        now = None
    return None if now == stamp["id"] else stamp["path"]


def check_made_from(stage_dir: str, command: str) -> None:
    """A StageError, one sentence, when `stale_input(stage_dir)`; `command` makes `stage_dir` again."""
    stale = stale_input(stage_dir)
    if stale:
        raise StageError(f"{stage_dir} points to image bytes in {stale}, which was made again or removed after it: run `{command}` into it again")


def _stage_path(path: str) -> str:
    """A stage folder as pointers name it: a local one absolute, so that pointers written from
    it (filter's and pair's bytes_file) hold on workers and from any working directory."""
    path = path.rstrip("/")
    return path if "://" in path else os.path.abspath(path)


def stage_files(path: str, name: str, expected: Optional[str] = None) -> list[str]:
    """The parquet files of part `name` (links, images, rejected, ...) of a complete stage output,
    as its `_SUCCESS` lists them. `path` is the stage directory (or its `name` sub-folder)."""
    path = _stage_path(path)
    if os.path.basename(path) == name and not FileSystems.exists(os.path.join(path, SUCCESS_FILE)):
        path = os.path.dirname(path)
    marker = read_success(path, expected)
    return [os.path.join(path, f) for f in marker["files"] if f.startswith(name + "/") and f.endswith(".parquet")]


def check_columns(files: list[str], schema: pa.Schema, stage_dir: str, expected: str) -> None:
    """Refuse input whose parquet lacks columns of the record contract, naming the stage that makes it."""
    if not files:
        return
    with FileSystems.open(files[0]) as fh:
        names = set(pq.ParquetFile(fh).schema_arrow.names)
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise StageError(f"{stage_dir} lacks the columns {', '.join(missing)} of a `{COMMANDS[expected]}` output; run `{COMMANDS[expected]}` to make this stage's input")


def parquet_rows(paths: Iterable[str]) -> int:
    """Rows of parquet files (any filesystem Beam knows), from their footers only."""
    total = 0
    for path in paths:
        with FileSystems.open(path) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def read_table(path: str, name: str, columns: Optional[Iterable[str]] = None) -> pa.Table:
    """Read a stage's parquet output into one table (small outputs, tests and reports)."""
    files = stage_files(path, name)
    if not files:
        raise StageError(f"no {name} parquet files under {path}")
    tables = []
    for f in files:
        # ParquetFile.read, not pq.read_table: read_table over a Python file object scans on Arrow's thread
        # pool, whose last callback can free the file after the interpreter began to exit and abort the
        # process ("terminate called without an active exception"; `webpairs stats <filter dir>` did).
        with FileSystems.open(f) as fh:
            tables.append(pq.ParquetFile(fh).read(columns=list(columns) if columns else None))
    return pa.concat_tables(tables)


def _fs(url: str):
    """(fsspec filesystem, path) of a local path or URL, with core.remote's options (an S3 output
    honours WEBPAIRS_S3_ENDPOINT as inputs do)."""
    from core.remote import filesystem

    return filesystem(url)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageLock:
    """An exclusive lock on an output folder: the sibling file `.NAME.lock` holding pid, host and
    start time. A lock left by a dead process on this host is taken over; a live one refuses."""

    def __init__(self, out_dir: str, command: str = ""):
        out_dir = out_dir.rstrip("/")
        self.out_dir, self.command = out_dir, command
        self.path = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.lock")
        self.held = False

    def _holder(self) -> Optional[dict]:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written this instant, or garbage: treated as held

    def acquire(self) -> "StageLock":
        if "://" in self.out_dir and not self.out_dir.startswith("file://"):
            return self  # object stores have no exclusive create: one writer per --out is the user's rule there
        os.makedirs(os.path.dirname(os.path.abspath(self.out_dir)), exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": self.command}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                    return self  # this process holds it already (a run locks its folder, then its stages)
                stale = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])
                if not stale:
                    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
                    raise StageError(f"{self.out_dir} is being written by another webpairs run ({who}); wait for it to end, or delete {self.path} if that run is gone") from None
                os.remove(self.path)  # a dead run's lock: take it over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(mine, fh)
            self.held = True
            return self
        raise StageError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                os.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _remove_tree(fs, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


def remove_folder(url: str) -> None:
    """Remove the folder at a local path or URL (core.remote's filesystem options), if it exists:
    a stage's temporary folders (pair's spill, shards' fetched images) before its commit."""
    _remove_tree(*_fs(url))


def _move_tree(fs, src: str, dst: str) -> None:
    """Move the folder `src` to `dst`: one atomic rename on a local filesystem; on an object store
    (s3fs, gcsfs: `fs.mv(src, dst, recursive=True)` copies the prefix's own pseudo-folder key there
    and fails) every object under `src` to the same relative key under `dst`, `_SUCCESS` last, so
    `dst/_SUCCESS` exists only once all of `src` is in `dst`."""
    if _is_local(fs):
        fs.mv(src, dst, recursive=True)
        return
    src, dst = src.rstrip("/"), dst.rstrip("/")
    fs.invalidate_cache(src)
    files = [f for f in fs.find(src, withdirs=False) if f.rstrip("/") != src]
    files.sort(key=lambda f: (f[len(src) + 1 :] == SUCCESS_FILE, f))
    for f in files:
        fs.mv(f, dst + f[len(src) :])
    _remove_tree(fs, src)  # pseudo-folder keys left by other writers
    fs.invalidate_cache(dst)


def _recover_swap(fs, out: str, old: str, partial: str) -> None:
    """Put an object store's output back in order after a commit killed mid-swap (`_move_tree`
    moves `_SUCCESS` last): `out/_SUCCESS` with the committed partial folder gone is the new output,
    complete (the old one's removal was cut short); `out/_SUCCESS` with the partial folder still
    there is the old output cut short while being parked, so the parked part goes back; no
    `out/_SUCCESS` is the new output cut short while moving in, so the parked old one replaces it."""
    success = out.rstrip("/") + "/" + SUCCESS_FILE
    if fs.exists(success):
        if fs.exists(partial.rstrip("/") + "/" + SUCCESS_FILE):
            _move_tree(fs, old, out)
        else:
            _remove_tree(fs, old)
    else:
        _remove_tree(fs, out)
        _move_tree(fs, old, out)


class StageOutput:
    """Owns a stage's `--out` while the stage runs (use as a context manager):

    * locks it (`StageLock`);
    * removes what a killed run left (`.NAME.partial/`, unless the stage resumes from it, and the
      old output parked by an interrupted swap, which is put back when the output is missing);
    * gives `path`, the sibling `.NAME.partial/` the stage writes into;
    * `commit()` reconciles the counts, writes `_SUCCESS` with the file list and swaps the partial
      folder in place of the old output (readable until that moment); on an error the partial
      folder is removed, unless `resumable` (download keeps img2dataset's finished shards there).
    """

    def __init__(self, out_dir: str, stage: str, resumable: bool = False):
        self.out_dir = out_dir.rstrip("/")
        self.stage, self.resumable = stage, resumable
        parent, name = os.path.dirname(self.out_dir), os.path.basename(self.out_dir)
        if not name:
            raise StageError(f"--out {out_dir!r} names no folder")
        if any(c in self.out_dir for c in "*?[]"):  # one rule for every stage: Beam's file sinks match their temporary files by pattern
            raise StageError(f"--out {out_dir!r}: a path with * ? [ or ] cannot be written by Beam's file sinks (they read it as a pattern); choose another name")
        self.path = os.path.join(parent, f".{name}.partial")
        self._old = os.path.join(parent, f".{name}.old")
        self.lock = StageLock(self.out_dir, COMMANDS.get(stage, stage))
        from core.remote import export_s3_endpoint

        export_s3_endpoint()  # the stage's Beam and s3fs writers reach the endpoint its readers do
        self.fs, _ = _fs(self.out_dir)
        self.committed = False

    def _p(self, url: str) -> str:
        return _fs(url)[1]

    def __enter__(self) -> "StageOutput":
        self.lock.acquire()
        try:
            fs, out, old, partial = self.fs, self._p(self.out_dir), self._p(self._old), self._p(self.path)
            if fs.exists(out) and not fs.isdir(out):
                raise StageError(f"--out {self.out_dir} is a file, not a folder")
            if fs.exists(old):
                if _is_local(fs):
                    if fs.exists(out):
                        fs.rm(old, recursive=True)
                    else:
                        fs.mv(old, out, recursive=True)  # a swap was interrupted between its two moves
                else:
                    _recover_swap(fs, out, old, partial)
            if fs.exists(partial) and not self.resumable:
                fs.rm(partial, recursive=True)
            fs.makedirs(partial, exist_ok=True)
        except BaseException:
            self.lock.release()
            raise
        return self

    def commit(self) -> dict:
        """Reconcile, mark complete and swap the new output in; returns the stats."""
        stats = finish_stage(self.path, self.stage)
        fs, out, old, partial = self.fs, self._p(self.out_dir), self._p(self._old), self._p(self.path)
        if fs.exists(out):  # two renames locally; key by key on an object store (`_move_tree`)
            _move_tree(fs, out, old)
        _move_tree(fs, partial, out)
        _remove_tree(fs, old)
        self.committed = True
        return stats

    def __exit__(self, exc_type, *_):
        try:
            partial = self._p(self.path)
            if not self.committed and not self.resumable and self.fs.exists(partial):
                self.fs.rm(partial, recursive=True)
        finally:
            self.lock.release()


class ReadParquetWithPointers(beam.DoFn):
    """Read parquet files row group by row group, adding to each row a pointer to where it lives
    (`bytes_file`, `bytes_row_group`), so later steps can drop heavy columns and fetch them back."""

    def __init__(self, columns: Optional[list] = None):
        self.columns = columns

    def process(self, path: str):
        with FileSystems.open(path) as fh:
            pf = pq.ParquetFile(fh)
            for rg in range(pf.num_row_groups):
                for row in pf.read_row_group(rg, columns=self.columns).to_pylist():
                    row["bytes_file"], row["bytes_row_group"] = path, rg
                    yield row


BYTES, POINTER = "image_bytes", ("bytes_file", "bytes_row_group")


def fetch_rows(pointers: Iterable[tuple[str, int]], key: str, columns: list[str], wanted: Optional[set] = None, hops: int = 2) -> dict:
    """{key value: {column: value}} for the rows in the given (file, row group) pointers, reading one
    row group at a time; with `wanted`, only those keys are kept (memory: one row group plus the
    rows asked for). Asked for `image_bytes`, a row that holds a pointer instead (filter's images/
    into download's downloads/) gets the bytes it points to (`fill_bytes`), through at most `hops`
    pointers (pair's images/ -> filter's -> download's is two)."""
    import pyarrow.compute as pc

    out: dict = {}
    by_file: dict[str, set] = {}
    for f, rg in pointers:
        by_file.setdefault(f, set()).add(rg)
    follow = BYTES in columns and key == "image_id" and hops > 0
    for f, groups in sorted(by_file.items()):
        with FileSystems.open(f) as fh:
            pf = pq.ParquetFile(fh)
            extra = [c for c in POINTER if follow and c in pf.schema_arrow.names and c not in columns]
            for rg in sorted(groups):
                if not 0 <= rg < pf.num_row_groups:  # a pointer past the file (stale): its rows are missing
                    continue
                t = pf.read_row_group(rg, columns=[key, *columns, *extra])
                if wanted is not None:
                    t = t.filter(pc.is_in(t.column(key), value_set=pa.array(sorted(wanted), type=t.schema.field(key).type)))
                for row in t.to_pylist():
                    out[row[key]] = row
    if follow:
        fill_bytes(out.values(), hops - 1)
        for row in out.values():
            for c in POINTER:
                if c not in columns:
                    row.pop(c, None)
    return out


def fill_bytes(rows: Iterable[dict], hops: int = 1) -> None:
    """Give each row (a dict with `image_id` and `image_bytes`) whose bytes are null but which
    points to them (`bytes_file`, `bytes_row_group`: filter's images/ rows point into download's
    downloads/ rather than hold a second copy, issue 34) the bytes of the row it points to, reading
    each row group pointed to once; a row already holding bytes, or pointing nowhere, stays as it is
    (null: the image is missing). `hops`: pointers the bytes may be behind past the first."""
    pointed = [r for r in rows if r.get(BYTES) is None and r.get(POINTER[0]) is not None]
    if not pointed:
        return
    found = fetch_rows({(r[POINTER[0]], r[POINTER[1]]) for r in pointed}, "image_id", [BYTES], wanted={r["image_id"] for r in pointed}, hops=hops)
    for r in pointed:
        r[BYTES] = found.get(r["image_id"], {}).get(BYTES)


# Readers of parquet files by row group (filter's downloads and occurrences, pair's occurrences).
READ_BATCH = 64  # rows converted to dicts at a time
READ_BUFFER = 1 << 20  # column chunks are read in pieces of this size, not whole


def _row_groups(path: str) -> list[tuple[str, int]]:
    with FileSystems.open(path) as fh:
        return [(path, i) for i in range(pq.ParquetFile(fh).num_row_groups)]


def row_groups(paths: list[str]) -> list[tuple[str, int]]:
    """(file, row group) of every row group of parquet files, from their footers (in the driver):
    a stage's units of work (filter's downloads and occurrences, pair's images and occurrences). On Dask each
    is one partition (`--dask_partition_size=1`), and a partition's outputs are held until it ends,
    so the work a worker holds at once is one row group's, whatever the size of the files (issue
    34: with one partition per file a worker's peak grew with the file; pair's occurrences read
    with ReadAllFromParquet were one partition of every row at 16x, 2.5 GB a worker)."""
    return [group for path in paths for group in _row_groups(path)]


def parquet_batches(item: tuple[str, int], columns: Optional[list], batch_size: int):
    """The record batches of one row group of a parquet file, read on the calling thread."""
    path, group = item
    with FileSystems.open(path) as fh:
        yield from pq.ParquetFile(fh, buffer_size=READ_BUFFER).iter_batches(batch_size=batch_size, row_groups=[group], columns=columns, use_threads=False)


class _ReadRowGroup(beam.DoFn):
    def __init__(self, columns: Optional[list] = None, pointers: bool = False):
        self.columns, self.pointers = columns, pointers

    def process(self, item: tuple[str, int]):
        path, group = item
        for batch in parquet_batches(item, self.columns, READ_BATCH):
            rows = batch.to_pylist()
            if self.pointers:
                for row in rows:
                    row[POINTER[0]], row[POINTER[1]] = path, group
            yield from rows


class ReadRowGroups(beam.PTransform):
    """(file, row group) items (`row_groups`) -> the rows of each as dicts, READ_BATCH rows at a
    time on the calling thread; with `pointers`, each row also names where it lives (`bytes_file`,
    `bytes_row_group`), so that what is written from it can point to its bytes (`fill_bytes`)."""

    def __init__(self, columns: Optional[list] = None, pointers: bool = False):
        super().__init__()
        self.columns, self.pointers = columns, pointers

    def expand(self, groups):
        return groups | "ReadRowGroup" >> beam.ParDo(_ReadRowGroup(self.columns, self.pointers))


class ReadRows(beam.PTransform):
    """Parquet files -> their rows as dicts, each row group its own element after a reshuffle (as
    ReadAllFromParquet splits them), read READ_BATCH rows at a time on the calling thread.
    ReadAllFromParquet passed each row group on as one pyarrow table (decoded whole, then every row
    at once as Python objects, and pickled once more by Beam to estimate its size) with pyarrow's
    thread pool, which cost more CPU than it saved: 0.38 vs 0.15 CPU-s for 2,400 photos' bytes
    (issue 34; the image bytes dominate a downloads file)."""

    def __init__(self, columns: Optional[list] = None):
        super().__init__()
        self.columns = columns

    def expand(self, files):
        return files | "RowGroups" >> beam.FlatMap(_row_groups) | "Spread" >> beam.Reshuffle() | "ReadRowGroup" >> beam.ParDo(_ReadRowGroup(self.columns))
