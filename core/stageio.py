"""How every Beam stage lays out its output directory, and the pipeline options it runs with.

A stage directory holds:
    <name>/part-*.parquet      kept records with the stage's schema (links, images, pairs, ...)
    rejected/part-*.parquet    Rejected records (reason from the stage's closed set)
    stats.json                 {"stage", "input", "kept", "rejected": {reason: n}, ...}
    _SUCCESS                   written last by the driver once the counts reconcile
"""

from __future__ import annotations

import glob as globlib
import json
import os
from typing import Any, Iterable, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
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


class StageError(RuntimeError):
    """A stage that cannot run or whose outputs do not reconcile; the message says which."""


def pipeline_options(beam_args: Optional[list[str]] = None, **defaults: Any) -> PipelineOptions:
    """Beam options from pass-through command-line flags, FnApiRunner unless --runner is given."""
    args = list(beam_args or [])
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args = [f"--runner={DEFAULT_RUNNER}"] + args
    return PipelineOptions(args, save_main_session=False, **defaults)


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


class WriteStageOutputs(beam.PTransform):
    """Write kept rows, rejected rows and stats.json for one stage.

    Input: a dict of PCollections `{"input": ..., "kept": ..., "rejected": ...}`; `input` is only
    counted (or give `input_count`, a PCollection of numbers that are summed), `kept` rows follow
    `schema` (or, with `kept_tables=True`, are pyarrow tables with that schema), `rejected` rows
    follow REJECTED_SCHEMA. Any other entry is counted too and lands in stats.json under its name
    (e.g. "pairs").
    """

    def __init__(self, out_dir: str, stage: str, name: str, schema: pa.Schema, extra: Optional[dict] = None, kept_tables: bool = False):
        super().__init__()
        self.out_dir, self.stage, self.name, self.schema = out_dir, stage, name, schema
        self.extra = extra or {}
        self.kept_tables = kept_tables

    def expand(self, pcolls):
        kept, rejected = pcolls["kept"], pcolls["rejected"]
        kept_path = os.path.join(self.out_dir, self.name, "part")
        if self.kept_tables:  # each table is written as it comes
            write = beam.io.WriteToParquetBatched(kept_path, self.schema, file_name_suffix=".parquet")
        else:
            write = beam.io.WriteToParquet(kept_path, self.schema, file_name_suffix=".parquet", row_group_buffer_size=ROW_GROUP_BYTES)
        _ = kept | "WriteKept" >> write
        _ = rejected | "WriteRejected" >> beam.io.WriteToParquet(
            os.path.join(self.out_dir, "rejected", "part"), REJECTED_SCHEMA, file_name_suffix=".parquet", row_group_buffer_size=ROW_GROUP_BYTES
        )
        if "input_count" in pcolls:
            n_input = pcolls["input_count"] | "SumInput" >> beam.CombineGlobally(sum)
        else:
            n_input = pcolls["input"] | "CountInput" >> beam.combiners.Count.Globally()
        if self.kept_tables:
            n_kept = kept | "KeptRows" >> beam.Map(lambda t: t.num_rows) | "SumKept" >> beam.CombineGlobally(sum)
        else:
            n_kept = kept | "CountKept" >> beam.combiners.Count.Globally()
        reasons = (
            rejected
            | "Reason" >> beam.Map(lambda r: r["reason"])
            | "CountReasons" >> beam.combiners.Count.PerElement()
        )
        counts = {
            name: beam.pvalue.AsSingleton(pc | f"Count_{name}" >> beam.combiners.Count.Globally())
            for name, pc in pcolls.items()
            if name not in ("input", "input_count", "kept", "rejected")
        }
        return (
            kept.pipeline
            | "StatsSeed" >> beam.Create([None])
            | "WriteStats"
            >> beam.Map(
                _write_stats,
                out_dir=self.out_dir,
                stage=self.stage,
                input_count=beam.pvalue.AsSingleton(n_input),
                kept=beam.pvalue.AsSingleton(n_kept),
                reasons=beam.pvalue.AsDict(reasons),
                extra=self.extra,
                **counts,
            )
        )


def finish_stage(out_dir: str) -> dict:
    """Check that stats.json reconciles, then mark the stage complete; returns the stats."""
    stats = read_stats(out_dir)
    if stats is None:
        raise StageError(f"{out_dir}: the stage wrote no {STATS_FILE}")
    rejected = sum(stats["rejected"].values())
    if stats["input"] != stats["kept"] + rejected:
        raise StageError(
            f"{stats['stage']}: counts do not reconcile: input {stats['input']} != kept {stats['kept']}"
            f" + rejected {rejected}"
        )
    with FileSystems.create(os.path.join(out_dir, SUCCESS_FILE)) as fh:
        fh.write(b"")
    return stats


def read_stats(out_dir: str) -> Optional[dict]:
    """The stage's stats.json, or None if absent."""
    path = os.path.join(out_dir, STATS_FILE)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as fh:
        return json.loads(fh.read())


def stage_files(path: str, name: str) -> list[str]:
    """Parquet files of a stage output: `path` may be a stage dir, a folder of parquet, or a glob."""
    if any(ch in path for ch in "*?["):
        pattern = path
    elif os.path.isdir(os.path.join(path, name)):
        pattern = os.path.join(path, name, "*.parquet")
    elif os.path.isdir(path):
        pattern = os.path.join(path, "*.parquet")
    else:
        pattern = path
    files = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not files and "://" not in pattern:
        files = sorted(globlib.glob(pattern))
    return files


def read_table(path: str, name: str, columns: Optional[Iterable[str]] = None) -> pa.Table:
    """Read a stage's parquet output into one table (small outputs, tests and reports)."""
    files = stage_files(path, name)
    if not files:
        raise StageError(f"no {name} parquet files under {path}")
    tables = [pq.read_table(FileSystems.open(f), columns=list(columns) if columns else None) for f in files]
    return pa.concat_tables(tables)


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


def fetch_rows(pointers: Iterable[tuple[str, int]], key: str, columns: list[str], wanted: Optional[set] = None) -> dict:
    """{key value: {column: value}} for the rows in the given (file, row group) pointers, reading one
    row group at a time; with `wanted`, only those keys are kept (memory: one row group plus the
    rows asked for)."""
    import pyarrow.compute as pc

    out: dict = {}
    by_file: dict[str, set] = {}
    for f, rg in pointers:
        by_file.setdefault(f, set()).add(rg)
    for f, groups in sorted(by_file.items()):
        with FileSystems.open(f) as fh:
            pf = pq.ParquetFile(fh)
            for rg in sorted(groups):
                t = pf.read_row_group(rg, columns=[key, *columns])
                if wanted is not None:
                    t = t.filter(pc.is_in(t.column(key), value_set=pa.array(sorted(wanted), type=t.schema.field(key).type)))
                for row in t.to_pylist():
                    out[row[key]] = row
    return out
