"""Keyed rows spilled to disk by hash bucket, so that a step that needs every row of a key (an
image with its links, a page with its images) holds one bucket at a time, not a whole shuffle.

The in-process runner (FnApiRunner) holds the whole input of a GroupByKey or CoGroupByKey in
memory, as Python objects; pair's joins grew its peak memory with the input (issue 34). Here a
writer (`SpillByKey`, or `BucketWriter` inside a step that spills what it makes) appends each (key, bytes) row to the Arrow IPC file of its bucket
(crc32(key) mod `buckets`; one file per bucket and bundle, written a record batch at a time), and
emits only (bucket, (name, path)) for each file it closed. A GroupByKey of those few paths then
gives each bucket's files to one reader (`read_groups`), which has every row of each of its keys:
a key's rows are all in one bucket. The files are referenced only through the writers' outputs,
so a bundle that a runner retries (a worker killed on Dask) leaves at most unreferenced files,
which are removed with the folder when the stage ends.
"""

from __future__ import annotations

import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from core.memory import release_free_memory
from core.records import bucket_of

SCHEMA = pa.schema([("key", pa.string()), ("value", pa.binary())])
BATCH_ROWS = 2048  # rows of one bucket per record batch
BUFFER_BYTES = 4 << 20  # a writer writes every buffered row once it holds this many bytes
ROW_OVERHEAD = 120  # bytes of Python objects per buffered row beyond its key and value (str, bytes, list slots)
ROWS_PER_BUCKET = 4096  # what `bucket_count` aims at: rows of one input in a bucket
MAX_BUCKETS = 1024


def bucket_count(rows: int, per_bucket: int = 0) -> int:
    """Buckets for an input of about `rows` rows: ~`per_bucket` (ROWS_PER_BUCKET) rows in each, 1 to
    MAX_BUCKETS."""
    return max(1, min(MAX_BUCKETS, -(-rows // (per_bucket or ROWS_PER_BUCKET))))


def in_order(keys) -> list:
    """Keys sorted, a null key first (plain `sorted` cannot compare None with a string)."""
    return sorted(keys, key=lambda k: (k is not None, k or ""))


class SpillByKey(beam.DoFn):
    """(key str, value bytes) -> its bucket's file under `spill_dir`/`name`/; emits (bucket, (name,
    path)) for every file when the bundle ends. Memory: at most BUFFER_BYTES of rows (plus one
    record batch per bucket), whatever the input's size. With `keyed`, each element is first made
    into its (key, value) by `keyed(element, *side inputs)` (None: not spilled): the Map before the
    spill in the same step, without a Beam step of its own (its per-element cost and its share of
    the pipeline's fixed cost; issue 34). With `load`, `keyed` gets `load(*side inputs)` instead of
    the side inputs, made once a bundle and dropped when it ends.

    With `read`, each element is a unit of input (a (file, row group)) and `read(element)` yields
    its records: the read happens in this step, once its side inputs are ready. (On Dask a step
    waits for its side inputs, but a read of its own runs at once, and its rows waited as Python
    objects in the workers: pair's reads of filter's images and links, for the copy step's map,
    held every link at one Common Crawl file; issue 34.)"""

    def __init__(self, spill_dir: str, name: str, buckets: int, keyed=None, load=None, read=None):
        self.spill_dir, self.name, self.buckets = spill_dir.rstrip("/"), name, buckets
        self.keyed = keyed
        self.load = load  # side inputs -> what `keyed` gets instead of them, made once a bundle (see below)
        self.read = read  # an element -> its records (see above)

    def start_bundle(self):
        self.writer = BucketWriter(self.spill_dir, self.name, self.buckets)
        self.loaded = None  # (side inputs, load(side inputs)) of this bundle

    def process(self, element, *side):
        if self.load is not None:
            # `load` turns small side inputs (e.g. the paths of a file) into what `keyed` uses (the
            # map in that file), once a bundle, dropped when the bundle ends: a large side input
            # itself stays held by the runner's invoker after its step (issue 34)
            if self.loaded is None or self.loaded[0] != side:
                release_free_memory()  # what the step before left freed (the copy groups'), once a bundle
                self.loaded = (side, self.load(*side))
            side = (self.loaded[1],)
        if self.read is None:
            self._add(element, side)
        else:
            for record in self.read(element):
                self._add(record, side)

    def _add(self, kv, side: tuple) -> None:
        if self.keyed is not None:
            kv = self.keyed(kv, *side)
            if kv is None:
                return
        self.writer.add(*kv)

    def finish_bundle(self):
        for ref in self.writer.close():
            yield GlobalWindows.windowed_value(ref)
        self.loaded = None


class BucketWriter:
    """(key str, value bytes) rows appended to the Arrow IPC file of their bucket under
    `spill_dir`/`name`/ (one file per bucket and writer, a record batch at a time): what
    `SpillByKey` does with its elements, for a step that spills what it makes itself (pair's join
    spills its records by page: on Dask a step's outputs are one list in its worker until every
    consumer ran, and a photo copied on ~20,000 pages made ~20,000 records in one bucket's step;
    issue 34). Holds at most `buffer_bytes` (BUFFER_BYTES) of rows (plus one record batch per
    bucket); `close` closes the files and returns (bucket, (name, path)) for each, in bucket order."""

    def __init__(self, spill_dir: str, name: str, buckets: int, buffer_bytes: int = 0):
        self.spill_dir, self.name, self.buckets = spill_dir.rstrip("/"), name, buckets
        self.buffer_bytes = buffer_bytes or BUFFER_BYTES
        self.buffers: dict = {}  # bucket -> [keys, values, bytes]
        self.held = 0
        self.writers: dict = {}  # bucket -> (file, writer, path)

    def add(self, key, value: bytes) -> None:
        b = bucket_of(key, self.buckets)
        buf = self.buffers.get(b)
        if buf is None:
            buf = self.buffers[b] = [[], [], 0]
        buf[0].append(key)
        buf[1].append(value)
        size = len(value) + len(key or "") + ROW_OVERHEAD
        buf[2] += size
        self.held += size
        if len(buf[0]) >= BATCH_ROWS:
            self._flush(b)
        elif self.held >= self.buffer_bytes:
            for b in list(self.buffers):
                self._flush(b)

    def _flush(self, b: int) -> None:
        keys, values, size = self.buffers.pop(b)
        self.held -= size
        found = self.writers.get(b)
        if found is None:
            path = f"{self.spill_dir}/{self.name}/{b:05d}-{uuid.uuid4().hex}.arrow"
            fh = FileSystems.create(path)
            found = self.writers[b] = (fh, pa.ipc.new_file(fh, SCHEMA), path)
        found[1].write_batch(pa.record_batch([pa.array(keys, pa.string()), pa.array(values, pa.binary())], schema=SCHEMA))

    def close(self) -> list:
        for b in list(self.buffers):
            self._flush(b)
        refs = []
        for b, (fh, writer, path) in sorted(self.writers.items()):
            writer.close()
            fh.close()
            refs.append((b, (self.name, path)))
        self.writers = {}
        return refs


def read_groups(paths) -> dict:
    """{key: [values]} of the rows in `paths` (one bucket's files). The order of a key's values is
    not fixed (file names are random): callers sort what they need sorted."""
    groups: dict = {}
    for path in sorted(paths):
        with FileSystems.open(path) as fh:
            table = pa.ipc.open_file(fh).read_all()
        for key, value in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
            found = groups.get(key)
            if found is None:
                groups[key] = [value]
            else:
                found.append(value)
    return groups
