"""The dask graph the Dask runner makes of a stage's pipeline, built but not run: what a partition
is (core/dask_runner holds a partition's outputs until it ends, so a partition must be a bounded
unit of work)."""

from __future__ import annotations

import contextlib

import pytest


def dask_bags(monkeypatch, module, run) -> dict:
    """{full label: dask bag} of the pipeline that `run()` builds through `module.stage_pipeline`,
    translated as the Dask runner translates it with one Create element a partition (core/stageio's
    default on Dask). The pipeline is built, not run."""
    import apache_beam as beam
    from apache_beam.runners.dask.overrides import dask_overrides

    from core.dask_runner import DaskRunner

    graphs: dict = {}

    class Built(Exception):
        pass

    @contextlib.contextmanager
    def built_only(beam_args=None):
        p = beam.Pipeline()
        yield p
        p.replace_all(dask_overrides())
        visitor = DaskRunner.to_dask_bag_visitor({"partition_size": 1})
        p.visit(visitor)
        graphs.update({node.full_label: bag for node, bag in visitor.bags.items() if bag is not None})
        raise Built

    monkeypatch.setattr(module, "stage_pipeline", built_only)
    with pytest.raises(Built):
        run()
    return graphs
