"""core/stageio.memo_dofn_specs (issue 34: Beam's per-DoFn introspection once per class) answers
what Beam's own `userstate.get_dofn_specs` answers, for stateless, stateful and timer DoFns, Map
and FlatMap wrappers, and falls back to Beam's own where an instance carries methods of its own."""

from __future__ import annotations

import types

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.transforms import userstate
from apache_beam.transforms.core import CallableWrapperDoFn
from apache_beam.transforms.timeutil import TimeDomain

from core.stageio import _specs_key, memo_dofn_specs, stage_pipeline


class _Counts(beam.DoFn):
    COUNT = userstate.BagStateSpec("count", VarIntCoder())
    FLUSH = userstate.TimerSpec("flush", TimeDomain.WATERMARK)

    def process(self, kv, count=beam.DoFn.StateParam(COUNT), flush=beam.DoFn.TimerParam(FLUSH)):
        count.add(kv[1])
        flush.set(0)

    @userstate.on_timer(FLUSH)
    def on_flush(self, count=beam.DoFn.StateParam(COUNT)):
        yield sum(count.read())


class _Plain(beam.DoFn):
    def process(self, x):
        yield x


def _beams_own(dofn):
    return userstate.get_dofn_specs.__wrapped__(dofn) if hasattr(userstate.get_dofn_specs, "__wrapped__") else userstate.get_dofn_specs(dofn)


def test_memoised_specs_are_beams():
    memo_dofn_specs()
    memo_dofn_specs()  # idempotent: one wrapper
    assert not hasattr(userstate.get_dofn_specs.__wrapped__, "__wrapped__")
    dofns = [_Counts(), _Counts(), _Plain(), _Plain(), CallableWrapperDoFn(lambda x: x), CallableWrapperDoFn(lambda x: [x])]
    for dofn in dofns:
        for _ in range(2):  # a miss, then the memo
            assert userstate.get_dofn_specs(dofn) == _beams_own(dofn), dofn
    state, timers = userstate.get_dofn_specs(_Counts())
    assert {s.name for s in state} == {"count"} and len(timers) == 1
    assert userstate.is_stateful_dofn(_Counts()) and not userstate.is_stateful_dofn(_Plain())
    found = userstate.get_dofn_specs(_Counts())
    found[0].clear()  # a caller changing its answer changes no later answer
    assert userstate.get_dofn_specs(_Counts())[0]


def test_a_dofn_with_its_own_bound_method_is_asked_of_beam():
    dofn = _Plain()
    dofn.start_bundle = types.MethodType(lambda self, flush=beam.DoFn.TimerParam(_Counts.FLUSH): None, dofn)
    assert _specs_key(dofn) is None
    assert _specs_key(_Plain()) == (_Plain,)
    memo_dofn_specs()
    assert userstate.get_dofn_specs(dofn) == _beams_own(dofn)
    assert userstate.get_dofn_specs(dofn)[1]  # the instance's timer parameter is seen


def test_a_stateful_pipeline_runs_with_the_memo():
    from apache_beam.testing.util import assert_that, equal_to

    memo_dofn_specs()
    with stage_pipeline([]) as p:
        sums = p | beam.Create([("a", 1), ("a", 2), ("b", 3), ("c", 5)]) | beam.ParDo(_Counts())
        assert_that(sums, equal_to([3, 3, 5]))


class _Big:
    pass


def test_the_memo_holds_no_wrapped_function_and_stays_small():
    """Map/FlatMap wrappers are memoised by their class alone: three pipelines of Maps whose
    functions hold an object leave neither the objects nor more entries behind; a Map of a bound
    method (whose parameters Beam reads) is left to Beam."""
    import gc
    import weakref

    from core import stageio

    memo_dofn_specs()
    refs = []
    sizes = []
    for _ in range(3):
        big = _Big()
        refs.append(weakref.ref(big))
        with stage_pipeline([]) as p:
            _ = p | beam.Create([1, 2]) | beam.Map(lambda x, big=big: x) | beam.FlatMap(lambda x: [x])
        del big, p, _
        sizes.append(len(stageio._DOFN_SPECS))
    gc.collect()
    assert all(r() is None for r in refs)
    assert sizes[0] == sizes[1] == sizes[2]
    assert _specs_key(CallableWrapperDoFn(_Plain().process)) is None
    assert _specs_key(CallableWrapperDoFn(lambda x: x)) == (CallableWrapperDoFn,)
