"""Beam's Dask runner, with the fixes every webpairs stage needs (Beam 2.77).

`apache_beam.runners.dask.dask_runner.DaskRunner` translates a pipeline into dask.bag operations
and runs it on a dask.distributed cluster (a LocalCluster of worker processes here; Kubernetes,
SLURM or a cloud service elsewhere). As shipped (reproduced in tests/test_dask.py, listed in
docs/cluster.md):

1. A multi-output ParDo (`.with_outputs(...)`) is one bag holding every output: each consumer of
   one output also received the others' elements. Here each consumer reads only its own output.
2. A bundle's results were collected before `finish_bundle` ran, so what a DoFn emits there was
   lost (RunInference's last batch; the file names of Beam's file sinks, whose files were then
   never finalised). Here they are collected after it.
3. Only the bag of the last transform visited was computed: a pipeline with several sinks ran one.
   Here every leaf is.
4. A side input's bag was recomputed inside every task that read it. Here it is one dask.delayed
   list per PCollection, shared by its readers.
5. Each bundle unpickled, inspected and set up its DoFn anew (a model in `setup` loaded once per
   partition). Here a worker process keeps each DoFn, set up once, for every bundle (bounded LRU).
6. A GroupByKey shuffled as many partitions as its input had, and a Flatten's output has the sum
   of its inputs' partitions: a task shuffle costs about n^2 tasks for n partitions (4,800 of
   filter's 6,300 tasks on 8 input files), and every key was hashed with dask's `tokenize`. Here a
   GroupByKey first merges its input to the pipeline's parallelism (the most partitions a source
   has: one per input row group, `core.stageio.row_groups`, or per input file) and hashes keys
   with crc32 (`_key_hash`).
7. Beam's runners lift combiners (combine within each bundle before the shuffle); this one did
   not: each CombineGlobally (every count a stage writes to stats.json: 7 of extract's 10
   GroupByKeys) shuffled its input over n x n tasks to a single key. Here a global combine is a
   tree reduction of per-partition accumulators (`_combine_globally`), and the GroupByKey that a
   file sink uses to gather its written file names (all under one key) gathers them into one
   partition without a shuffle.
8. Linear chains of tasks are fused walking the graph in topological order (`_fused`), so a
   GroupByKey's grouped partitions always fuse into the ParDo that reads them (dask's own walk
   follows set order and broke that chain in some runs, and the scheduler then stacked the heavy
   ParDo's partitions on one worker).
9. A partition's outputs wait in its worker until every consumer has run, and dask's own order
   ran partitions of an earlier step before the consumers of finished ones (a file sink's
   `initialize_write`, which its bundles wait for, was queued behind every source partition):
   outputs piled up with the input. Here each task's priority is its depth, and a side input
   computed from a few tasks comes first (`_priorities`).
10. A GroupByKey had as many partitions as its input: one partition grouped in place stayed one.
   The copy step (pairing/copies.py) finds its candidates in one element and spreads the row
   groups to featurize and the blocks to verify with a GroupByKey: every row group and block ran
   in one task on one worker, and every check row of the stage (~500,000 at one Common Crawl
   file) was one partition held as dicts (issue 34). Here the groups are split into
   `parallelism` partitions when the input has fewer (each key's values stay in one partition),
   each slice a task of its own that is not fused into its reader (`_spread`).
11. A worker's resident memory only grew: each bundle frees what it made, but glibc keeps freed
   pages inside its heap until a trim, and the next steps' objects land among them (pair with
   the copy step at one Common Crawl file rose 340 -> 430 MB a worker over the steps after its
   copy groups; issue 34). Here a worker gives freed pages back after a bundle whenever its
   resident memory grew by TRIM_GROWTH since its last trim (`_give_back_freed_memory`).
12. A worker sends a task's result to another (`get_data`) through distributed's `serialize`,
   which takes a plain list (tuple, set, dict) element by element, each with a header and frames of
   its own: pair's side input of boilerplate flags, 39,475 (16-byte digest, pages) tuples at one
   Common Crawl file, became 78,952 frames, 1.5 s and +78 MB on the sending worker (the stage's
   peak there) and +41 MB on the receiving one (issue 34). Here a bundle's outputs, a selected
   output, a side input, a GroupByKey's groups and `_spread`'s slices are `_Elements`, a list
   that distributed pickles whole.

Select it with `--runner dask` (core/stageio.py): with `--dask-address tcp://HOST:PORT` it submits
to that cluster, otherwise a LocalCluster of `--dask-workers` processes is started and closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterable, Iterator, Optional

from apache_beam import TaggedOutput
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.runners.dask.dask_runner import DaskRunner as BeamDaskRunner
from apache_beam.runners.dask.dask_runner import DaskRunnerResult
from apache_beam.runners.dask.overrides import _GroupByKeyOnly
from apache_beam.runners.dask.transform_evaluator import TRANSLATIONS, NoOp
from apache_beam.transforms.sideinputs import SideInputMap

RUNNER_PATH = "core.dask_runner.DaskRunner"

# A Dask nanny starts its worker with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to the
# OS). Setting that variable also turns off glibc's dynamic mmap threshold, so every buffer over
# 128 KiB (a decoded image, a parquet page) is a fresh mmap and its pages fault in again: filter's
# bundles ran 1.5x slower than in-process. Unset, glibc behaves as in any process. The LocalCluster
# here uses this; deploy/dask sets it on a cluster's workers (DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON).
# And Arrow's buffers come from its system pool (glibc malloc), as every stage sets in process
# (core/memory.py system_arrow_pool, which on Dask sets the driver's pool only): with mimalloc, pair's
# copy-step candidate search on its worker peaked 35 MB higher at one Common Crawl file (386 vs 351
# MB; reading the images' ids, embeddings and pHashes kept 82 MB resident against 47; issue 34).
# And glibc's malloc keeps at most two arenas: by default each thread that allocates (the worker's
# task thread, its event loop, Arrow's and OpenMP's pools) gets an arena of its own, up to 8 a core,
# and what each keeps after a bundle (partly used pages, which a trim cannot give back) adds up:
# at one Common Crawl file pair's workers peaked at 363-400 MB (over three sittings), and at 329-340
# MB with two arenas (1x: 300-303 MB), in the same CPU time (issue 34).
WORKER_ENVIRON = {"MALLOC_TRIM_THRESHOLD_": None, "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}
WORKER_CONFIG = {f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in WORKER_ENVIRON.items()}

# The scheduler hands a worker of one thread a second ready source bundle while it runs the first
# (worker-saturation 1.1 rounds up to 2 slots), and a worker busy with the small tasks after a bundle
# has no slot left: extract's 8 file bundles went 5/3 to 2 workers in some runs (one bundle's time
# lost). At 1.0 a worker gets its next source bundle when it has nothing else to do: greedy, 4/4.
# The LocalCluster here uses it; deploy/dask sets it on a cluster's scheduler.
SCHEDULER_CONFIG = {"distributed.scheduler.worker-saturation": 1.0}


class _ListIterator:
    """A computed side input (a list) as the windowed values `SideInputMap` iterates."""

    def __init__(self, values: list, window_fn):
        self.values, self.window_fn = values, window_fn

    def __iter__(self):
        for item in self.values:
            yield te.get_windowed_value(item, self.window_fn)


_DOFNS: dict = {}  # per worker process: (pickled fn, label) -> (DoFn or CombineFn, DoFn signature, [set up?])
_MAX_DOFNS = 256


def _cached_fn(fn_bytes: bytes, label: str, combine: bool = False):
    """The worker's instance of a transform's DoFn (or CombineFn): unpickled (and inspected) once
    per process and reused by every bundle, as Beam runners reuse them (a model in `setup` loads
    once). A CombineFn is set up here; a DoFn by its first bundle (its invoker runs `setup`)."""
    import hashlib

    from apache_beam.internal import pickler

    key = (hashlib.sha1(fn_bytes).digest(), label)
    if key in _DOFNS:
        _DOFNS[key] = _DOFNS.pop(key)  # most recently used last
        return _DOFNS[key]
    while len(_DOFNS) >= _MAX_DOFNS:  # a long-lived cluster runs many pipelines: bounded, torn down
        old_fn, _, was_set_up = _DOFNS.pop(next(iter(_DOFNS)))
        if was_set_up[0]:
            old_fn.teardown()
    fn = pickler.loads(fn_bytes)
    if combine:
        fn.setup()
        _DOFNS[key] = (fn, None, [True])
    else:
        _DOFNS[key] = (fn, te.DoFnSignature(fn), [False])
    return _DOFNS[key]


TRIM_GROWTH = 8 << 20  # resident bytes a worker may gain over its level after the last trim before it trims again
_RSS_AFTER_TRIM = [None]  # per worker process: resident bytes after its last trim (or the least seen since)
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_bytes():
    """This process's resident memory in bytes, or None where /proc is not there (not Linux)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def _give_back_freed_memory() -> None:
    """After a bundle: when the worker's resident memory grew by TRIM_GROWTH or more since its
    last trim (the least it was since), give freed heap pages back to the system
    (core/memory.py `release_free_memory`, glibc's malloc_trim) (fix 11). A worker runs thousands
    of bundles of different steps one after the other, each freeing what it made; glibc keeps
    those pages (a freed page in the middle of the heap is only returned by a trim), and the
    next step's objects land among them, so a worker's resident memory rose step by step with
    the input (pair with the copy step at one Common Crawl file: 340 -> 430 MB in the steps
    after its copy groups, with 15-35 MB of task results held; issue 34). A trim costs ~2-15 ms
    on a few hundred MB, so it runs only after growth, not after every small bundle (~5,000 at
    that size). Outputs do not change."""
    from core.memory import release_free_memory

    rss = _resident_bytes()
    if rss is None:  # nothing to measure, nothing done
        return
    last = _RSS_AFTER_TRIM[0]
    if last is not None and rss < last + TRIM_GROWTH:
        _RSS_AFTER_TRIM[0] = min(last, rss)
        return
    if release_free_memory():
        rss = _resident_bytes() or rss
    _RSS_AFTER_TRIM[0] = rss


def _run_bundle(items, fn_bytes, label, args, kwargs, window_fn, side_specs, *side_values):
    """One dask partition through a DoFn: start_bundle, process, finish_bundle (setup once per
    worker process); returns what it emitted, collected after finish_bundle (fix 2). Side inputs
    arrive computed."""
    _, signature, set_up = _cached_fn(fn_bytes, label)
    receivers = te.OneReceiver()
    handler = te._OutputHandler(
        window_fn=window_fn, main_receivers=receivers[None], tagged_receivers=receivers, per_element_output_counter=None,
        output_batch_converter=None, process_yields_batches=False, process_batch_yields_elements=False,
    )
    side_inputs = [SideInputMap(view, options, _ListIterator(values, mapping)) for (view, options, mapping), values in zip(side_specs, side_values)]
    invoker = te.DoFnInvoker.create_invoker(
        signature, handler, context=te.DoFnContext(label, state=None), side_inputs=side_inputs,
        input_args=list(args), input_kwargs=kwargs, user_state_context=None, bundle_finalizer_param=te.DoFn.BundleFinalizerParam(),
    )
    if not set_up[0]:
        invoker.invoke_setup()
        set_up[0] = True
    invoker.invoke_start_bundle()
    for item in items:  # windowed here, not in a task of its own before the bundle
        invoker.invoke_process(te.get_windowed_value(item, window_fn))
    invoker.invoke_finish_bundle()
    _give_back_freed_memory()  # fix 11
    # plain values as Beam's version returns them (global windows); tagged ones keep their tag
    return _Elements(TaggedOutput(v.tag, v.value.value) if isinstance(v, TaggedOutput) else v.value for v in receivers.values)


class _Elements(list):
    """A partition's (or a side input's) elements: a list that distributed pickles as one object
    when a worker sends it to another (fix 12). Its `serialize` takes a plain list, tuple, set or
    dict element by element when a worker hands it on (`type(x) in (list, ...)`, not isinstance):
    (16-byte digest, pages) tuples went out as two frames each, (str, str, str) tuples as one."""

    __slots__ = ()


def _concat(parts: list) -> list:
    return _Elements(item for part in parts for item in part)


def _main_output(part) -> list:
    return _Elements(x for x in part if not isinstance(x, TaggedOutput))


def _tagged_output(part, tag: str) -> list:
    return _Elements(x.value for x in part if isinstance(x, TaggedOutput) and x.tag == tag)


def _combine_fn(fn_bytes: bytes):
    """The worker's CombineFn of a global combine, set up once per process (`_cached_fn`)."""
    return _cached_fn(fn_bytes, "combine", combine=True)[0]


def _accumulate(items, fn_bytes: bytes) -> list:
    """A partition of a global combine's (None, value) pairs -> [its accumulator]."""
    fn = _combine_fn(fn_bytes)
    return [fn.add_inputs(fn.create_accumulator(), (value for _, value in items))]


def _merge(parts, fn_bytes: bytes) -> list:
    """[accumulator] lists (of partitions, or of earlier merges) -> [their merge], [] if none."""
    accumulators = [acc for part in parts for acc in part]
    if not accumulators:
        return []
    return [_combine_fn(fn_bytes).merge_accumulators(accumulators)]


def _extract(merged: list, fn_bytes: bytes) -> list:
    """The one merged accumulator -> [(None, output)] as CombinePerKey gives it; no input, no output
    (a CombineGlobally with defaults then injects its default, as on any runner)."""
    fn = _combine_fn(fn_bytes)
    return [(None, fn.extract_output(acc)) for acc in merged]


def _combine_globally(bag, combine_fn):
    """A CombinePerKey over (None, value) pairs as a tree reduction (fix 7): an accumulator per
    partition, merged 8 at a time into one partition: about n + n/7 tasks for n partitions where
    the GroupByKey's shuffle took n x n, and what moves is accumulators, not the values."""
    from functools import partial

    from apache_beam.internal import pickler
    from dask.bag import Bag

    fn_bytes = pickler.dumps(combine_fn)
    merged = bag.reduction(partial(_accumulate, fn_bytes=fn_bytes), partial(_merge, fn_bytes=fn_bytes), split_every=8, out_type=Bag, name="combine")
    return merged.map_partitions(_extract, fn_bytes)


def _is_global_combine(node) -> bool:
    """A CombinePerKey whose input CombineGlobally keyed with None (Beam's `_KeyWithNone`): one
    key, so its shuffle can be a reduction. (After Beam's runner-API round trip CombineGlobally
    itself is a plain PTransform; CombinePerKey and its combine fn, arguments curried in, survive.)"""
    from apache_beam.transforms.core import CombinePerKey, ParDo, _KeyWithNone

    if not isinstance(node.transform, CombinePerKey) or node.side_inputs or len(node.inputs) != 1:
        return False
    producer = getattr(node.inputs[0], "producer", None)
    return producer is not None and isinstance(producer.transform, ParDo) and isinstance(producer.transform.fn, _KeyWithNone)


def _gathers_file_names(node) -> bool:
    """The GroupByKey of Beam's file sinks (`WriteImpl`) that keys every written file's name with
    None to gather them for finalisation: one key, so one partition needs no shuffle (fix 7).
    (With `num_shards` the sink groups records by shard key before writing: that one shuffles.)"""
    gbk = node.parent  # the dask override's _GroupByKey composite around this _GroupByKeyOnly
    producer = getattr(gbk.inputs[0], "producer", None) if gbk is not None and gbk.inputs else None
    return producer is not None and producer.full_label.endswith("WriteImpl/Pair")


def _key_hash(key) -> int:
    """A hash of a GroupByKey key that is the same in every worker process (Python's `hash` of a
    str is not: PYTHONHASHSEED), cheaper than dask's `tokenize` for the keys stages use."""
    import zlib

    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8", "surrogatepass"))
    if isinstance(key, bytes):
        return zlib.crc32(key)
    if isinstance(key, bool) or key is None:
        return int(bool(key))
    if isinstance(key, int):
        return key & 0xFFFFFFFF
    if isinstance(key, tuple):
        h = len(key)
        for part in key:
            h = (h * 1000003 ^ _key_hash(part)) & 0xFFFFFFFF
        return h
    from dask.base import tokenize

    return int(tokenize(key), 16)  # deterministic across processes for other types


def _group_key(item):
    return item[0]


def _grouped(kv):
    key, items = kv
    return key, [te.defenestrate(item[1]) for item in items]


def _grouped_partition(part) -> list:
    """A shuffled partition's (key, [(key, value)...]) groups as (key, [values]) (fix 12: `_Elements`)."""
    return _Elements(_grouped(kv) for kv in part)


def _group_partition(items) -> list:
    """A GroupByKey of one partition, in place."""
    from toolz import groupby

    return _Elements(_grouped(kv) for kv in groupby(_group_key, items).items())


def _slice(parts, k: int) -> list:
    """Slice `k` of a partition cut by `_spread` (fix 12: `_Elements`)."""
    return _Elements(parts[k])


@dataclasses.dataclass
class _GroupByKey(te.DaskBagOp):
    """Beam's GroupByKeyOnly as a dask task shuffle over at most `parallelism` partitions (fix 6),
    whose output has `parallelism` partitions however few its input has (fix 10)."""

    parallelism: int = 0  # the most partitions of any source of the pipeline (0: the input's; 1: gather)

    def apply(self, input_bag, side_inputs=None):
        from dask.bag.core import groupby_tasks

        bag = input_bag
        if self.parallelism and bag.npartitions > self.parallelism:
            bag = bag.repartition(npartitions=self.parallelism)
        if bag.npartitions == 1:  # nothing to shuffle
            grouped = bag.map_partitions(_group_partition)
        else:
            grouped = groupby_tasks(bag, _group_key, hash=_key_hash).map_partitions(_grouped_partition)
        if self.parallelism > grouped.npartitions:  # fix 10: spread the groups (each key stays whole)
            grouped = _spread(grouped, self.parallelism)
        return grouped


SPREAD = "spread-"  # the name of `_spread`'s slices: never fused into the task that reads them (`_fused`)


def _spread(bag, n: int):
    """`bag`'s partitions split into `n` (fix 10), each partition's list cut into consecutive
    slices (dask.bag's `split`): a task per partition makes the slices and a task per slice hands one
    on. A slice task is not fused into its reader, so a reader that the scheduler runs on another
    worker fetches its slice, not the whole partition (dask.bag's `repartition` makes the same
    tasks, and fusion then made every reader depend on the whole partition)."""
    from dask.bag.core import Bag, split
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    token = tokenize(bag, n)
    name, cut = f"{SPREAD}{token}", f"{SPREAD}split-{token}"
    div, mod = divmod(n, bag.npartitions)
    graph, j = {}, 0
    for i in range(bag.npartitions):
        k = div + (1 if i < mod else 0)
        graph[(cut, i)] = (split, (bag.name, i), k)
        for part in range(k):
            graph[(name, j)] = (_slice, (cut, i), part)
            j += 1
    return Bag(HighLevelGraph.from_collections(name, graph, dependencies=[bag]), name, n)


class _ParDo(te.DaskBagOp):
    """A ParDo over the partitions of its input bag; each side input is computed once for the
    whole graph (a dask.delayed list handed to every partition), where Beam's translation
    recomputes the side input's bag inside every task that reads it."""

    def apply(self, input_bag, side_inputs=None):
        from apache_beam.internal import pickler

        transform = self.transform
        args, kwargs = transform.args, transform.kwargs  # side inputs as placeholders the invoker fills
        main_input = next(iter(self.applied.main_inputs.values()))
        window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
        specs = [(type(si), si._view_options(), si._window_mapping_fn) for si, _ in side_inputs or ()]
        values = [value for _, value in side_inputs or ()]  # dask.delayed lists (the visitor's _side)
        fn_bytes = pickler.dumps(transform.fn)  # the key of the worker's DoFn cache (_cached_fn)
        return input_bag.map_partitions(_run_bundle, fn_bytes, transform.label, args, kwargs, window_fn, specs, *values)


def _select(bag, producer, pcoll):
    """The elements of one output of `producer` (fix 1): main or one tag, unwrapped."""
    if len(producer.outputs) <= 1:
        return bag
    tag = pcoll.tag
    if tag is None or tag == "None":  # the main output
        return bag.map_partitions(_main_output)
    return bag.map_partitions(_tagged_output, tag)


class DaskRunner(BeamDaskRunner):
    """Beam's DaskRunner with the fixes of this module's docstring (1-12)."""

    def run_pipeline(self, pipeline, options):
        import dask.distributed as ddist
        from apache_beam.runners.dask.dask_runner import DaskOptions
        from apache_beam.runners.dask.overrides import dask_overrides

        dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
        client = ddist.Client(**dask_options)
        pipeline.replace_all(dask_overrides())
        visitor = self.to_dask_bag_visitor(bag_kwargs)
        pipeline.visit(visitor)
        consumed = {id(p.producer) for node in visitor.bags for p in list(node.inputs) + [si.pvalue for si in node.side_inputs] if getattr(p, "producer", None) is not None}
        leaves = [bag for node, bag in visitor.bags.items() if id(node) not in consumed and bag is not None]
        # every leaf (fix 3); side inputs are shared dask.delayed lists (_side), so graph
        # optimisation cannot duplicate a sink's initialize_write into each reader
        futures = client.compute(_fused(leaves, [side.key for side in visitor.sides.values()]), optimize_graph=False)
        return _Result(client, futures)

    @staticmethod
    def to_dask_bag_visitor(bag_kwargs=None):
        import collections

        from apache_beam import pvalue
        from apache_beam.pipeline import PipelineVisitor

        translations = dict(TRANSLATIONS)
        translations[te.apache_beam.ParDo] = _ParDo
        kwargs = bag_kwargs or {}

        @dataclasses.dataclass
        class Visitor(PipelineVisitor):
            bags: dict = dataclasses.field(default_factory=collections.OrderedDict)
            sides: dict = dataclasses.field(default_factory=dict)
            parallelism: int = 0  # the most partitions of a source (Create) bag so far
            lifting: Optional[tuple] = None  # (a global CombinePerKey being visited, its reduction's bag)

            def enter_composite_transform(self, node) -> None:
                if self.lifting is None and _is_global_combine(node):
                    self.lifting = (node, _combine_globally(self._input(node.inputs[0]), node.transform.fn))

            def leave_composite_transform(self, node) -> None:
                if self.lifting is not None and self.lifting[0] is node:
                    self.lifting = None

            def _side(self, pcoll):
                """A side input's elements as one dask.delayed list, made once per PCollection:
                every reader shares its tasks (no recomputation per reader)."""
                import dask

                if id(pcoll) not in self.sides:
                    parts = self._input(pcoll).to_delayed(optimize_graph=False)
                    self.sides[id(pcoll)] = dask.delayed(_concat)(parts)
                return self.sides[id(pcoll)]

            def _input(self, pcoll):
                producer = pcoll.producer
                return _select(self.bags[producer], producer, pcoll) if producer in self.bags else None

            def visit_transform(self, node) -> None:
                if self.lifting is not None:  # inside a lifted combine: its output is the reduction
                    combine, reduced = self.lifting
                    outputs = {id(pc) for pc in combine.outputs.values()}
                    self.bags[node] = reduced if any(id(pc) in outputs for pc in node.outputs.values()) else None
                    return
                if node.transform.__class__ is _GroupByKeyOnly:
                    op = _GroupByKey(node, bag_kwargs=kwargs, parallelism=1 if _gathers_file_names(node) else self.parallelism)
                else:
                    op = translations.get(node.transform.__class__, NoOp)(node, bag_kwargs=kwargs)
                op_kws = {"input_bag": None, "side_inputs": None}
                inputs = list(node.inputs)
                if inputs:
                    bag_inputs = [None if isinstance(v, pvalue.PBegin) else self._input(v) for v in inputs]
                    bag_inputs = [b for b, v in zip(bag_inputs, inputs) if b is not None or isinstance(v, pvalue.PBegin)]
                    op_kws["input_bag"] = bag_inputs[0] if len(bag_inputs) == 1 and not isinstance(op, te.Flatten) else bag_inputs
                if node.side_inputs:
                    op_kws["side_inputs"] = [(si, self._side(si.pvalue)) for si in node.side_inputs]
                self.bags[node] = op.apply(**op_kws)
                if not inputs or all(isinstance(v, pvalue.PBegin) for v in inputs):
                    bag = self.bags[node]
                    self.parallelism = max(self.parallelism, getattr(bag, "npartitions", 0) or 0)

        return Visitor()


def _is_spread(key) -> bool:
    return isinstance(key, tuple) and isinstance(key[0], str) and key[0].startswith(SPREAD)


def _fused(bags: list, sides: Iterable = ()) -> list:
    """The bags' graph culled and with every maximal linear chain fused into one task (fix 8):
    a chain is tasks where each is the only dependency of the next and the next its only
    dependent. dask.bag's own `fuse_linear_task_spec` walks the graph in dict order, which follows
    set iteration (PYTHONHASHSEED), and a walk that stops at a chain's first or last task leaves
    it out: in some runs a GroupByKey's shuffle join was fused with the ParDo that reads it, in
    others not, and then the scheduler, seeing only a short join task, put 6 or 7 of extract's 8
    grouped partitions on one worker (the heavy ParDo follows its input)."""
    from dask._task_spec import Alias, Task, convert_legacy_graph
    from dask.bag.core import Bag
    from dask.base import tokenize
    from dask.core import flatten, reverse_dict, toposort
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
    from dask.optimization import cull, default_fused_keys_renamer

    graph = convert_legacy_graph(dict(HighLevelGraph.merge(*[bag.__dask_graph__() for bag in bags])))
    keys = list(flatten([bag.__dask_keys__() for bag in bags]))
    culled, dependencies = cull(graph, keys)
    dependents = reverse_dict(dependencies)
    wanted = set(keys)

    def next_in_chain(a):
        """a's only dependent if a is that task's only dependency (and both may fuse), else None."""
        if len(dependents[a]) != 1 or a in wanted or culled[a].block_fusion or _is_spread(a):
            return None
        (b,) = dependents[a]
        return b if len(dependencies[b]) == 1 and not culled[b].block_fusion else None

    fused: dict = {}
    for key in toposort(culled, dependencies=dependencies):
        if len(dependencies[key]) == 1 and next_in_chain(next(iter(dependencies[key]))) == key:
            continue  # inside a chain that starts higher up
        chain = [key]  # key starts a chain: follow it down while each link holds
        while (b := next_in_chain(chain[-1])) is not None:
            chain.append(b)
        if len(chain) == 1:
            fused[key] = culled[key]
            continue
        name = default_fused_keys_renamer(chain)
        fused[name] = Task.fuse(*[culled[k] for k in chain], key=name)
        if name != chain[-1]:  # readers and requested keys still name the chain's last task
            fused[chain[-1]] = Alias(chain[-1], target=name)
    # no dask.bag `lazify` (it drops the `list` calls inside a task, so steps hand on iterators):
    # with it, a single-file extract's reject counts came out empty on these fused chains
    # (test_every_beam_stage_on_dask_matches_the_local_run); the lists stay lists
    name = "webpairs-pipeline-" + tokenize(*keys)
    layer = MaterializedLayer(fused, annotations={"priority": _priorities(fused, sides).get})  # fix 9
    merged = HighLevelGraph({name: layer}, {name: set()})
    return [Bag(merged, bag.name, bag.npartitions) for bag in bags]


SMALL_SIDE = 16  # a side input computed from at most this many tasks runs first (fix 9)


def _priorities(graph: dict, sides: Iterable = ()) -> dict:
    """Each task's priority (dask runs a worker's ready tasks, and hands out queued source
    partitions, highest first; fix 9):

    * its depth, the longest chain of tasks from a source down to it: the consumers of a
      finished partition run before the worker starts a partition of an earlier step, so outputs
      are consumed as they come instead of piling up (filter's JoinLinks partitions all became
      ready at once, after the side inputs they wait for, and ran one after the other first);
    * above every depth, a side input computed from at most SMALL_SIDE tasks, with those tasks: a
      file sink's `initialize_write`, which every bundle of its writer waits for, was a source
      partition like the input's and came after all of them, so every partition's rows (filter's
      images, with their bytes) waited in the workers until the whole input had been read."""
    from dask.core import get_dependencies, toposort

    dependencies = {key: get_dependencies(graph, key) for key in graph}
    priority: dict = {}
    for key in toposort(graph, dependencies=dependencies):
        priority[key] = 1 + max((priority[d] for d in dependencies[key]), default=-1)
    first = max(priority.values(), default=0) + 1
    for side in sides:
        if side not in graph:
            continue
        upstream, todo = {side}, [side]
        while todo and len(upstream) <= SMALL_SIDE:
            for dep in dependencies[todo.pop()]:
                if dep not in upstream:
                    upstream.add(dep)
                    todo.append(dep)
        if len(upstream) <= SMALL_SIDE:
            priority.update(dict.fromkeys(upstream, first))
    return priority


class _Result(DaskRunnerResult):
    """Closes its client once the pipeline is done (a client left open retries a scheduler that
    the LocalCluster has already stopped, with a page of errors)."""

    def wait_until_finish(self, duration=None) -> str:
        try:
            return super().wait_until_finish(duration)
        finally:
            self.client.close()


@contextlib.contextmanager
def dask_cluster(address: Optional[str], workers: int) -> Iterator[str]:
    """The scheduler address: `address` as given, or a LocalCluster of `workers` processes
    (one thread each) that is closed when the block ends."""
    if address:
        yield address
        return
    import dask
    from distributed import LocalCluster

    # silence_logs: the cluster's own shutdown chatter (heartbeats to a closed scheduler) stays quiet;
    # no statistical profiler in the workers (a stack sample every 10 ms slowed filter's Python work);
    # WORKER_CONFIG: glibc's own malloc thresholds and Arrow's system pool in the workers; SCHEDULER_CONFIG: one source bundle
    # per worker at a time
    with dask.config.set({"distributed.worker.profile.enabled": False, **WORKER_CONFIG, **SCHEDULER_CONFIG}), _driver_environment_kept():
        with LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.CRITICAL) as cluster:
            yield cluster.scheduler_address


@contextlib.contextmanager
def _driver_environment_kept() -> Iterator[None]:
    """A LocalCluster's nannies run in this process and write their workers' pre-spawn environment
    (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1, and WORKER_ENVIRON's
    ARROW_DEFAULT_MEMORY_POOL and MALLOC_ARENA_MAX) into its `os.environ` for good:
    after a stage on Dask, torch in the driver (sampling, eval) and every process it starts (Ray's
    training workers, img2dataset) would run on one thread. Those variables get their old values back
    when the cluster closes; the workers keep the nanny's."""
    import dask

    names = list(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
